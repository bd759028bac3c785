"""Distillation throughput: `distillery distill` (online and cached teacher) vs TRL's GKDTrainer.

    PYTHONPATH=platform python benchmarks/distill_throughput.py [--steps 20] [--batch-size 8] [--vocab 32768]

Same teacher and student (small Llamas built locally, with the vocabulary padded to `--vocab` like
real checkpoints), same prepared rows in the same order, batch size, steps, AdamW learning rate
and gradient clipping, and the same loss: generalised JSD with beta 0.5 at temperature 1 and no
CE term (distill.alpha 1), which is what GKD trains with. TRL runs `GKDTrainer` with `lmbda=0`
(no student generations: off-policy, supervised KD) and `seq_kd` off, fed the prepared rows as
they are (token ids, labels) through a collator that pads them like distillery does, so both sides
see identical batches. Distillery runs with train.strategy=none and one worker, so the comparison
is one training process against one; Ray's start-up, the cache build and the final export are
reported apart and left out of the throughput.

Throughput is non-padding tokens per second over the steady-state steps (the first `--warmup`
steps are left out); distillery reads them from the run's metrics.jsonl, TRL's are counted from
the attention mask of each batch it trains on. The cached run reads the top-k teacher cache built
first by `run_cache_teacher` (the Hugging Face backend here; its time is reported on its own). The
cached teacher is the renormalised top-k (distill.top_k), so its loss is the sparse JSD, not the dense one.
Cache size: teacher bytes per target token on disk against dense float16 logits (2·V bytes).
Targets: cached distillery >= 1.5x TRL tokens/s; cache <= 1% of dense fp16 logits.
Prints a table and writes benchmarks/results/distill_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # prepared-data writer shared with the tests

from report import write_result  # noqa: E402  (same directory)
from train_throughput import rows, steady  # noqa: E402

TEACHER = dict(arch="llama", layers=4, hidden=256, heads=4, kv_heads=2, intermediate=688)
STUDENT = dict(arch="llama", layers=2, hidden=128, heads=4, kv_heads=2, intermediate=344)
LOSS = ["distill.loss=jsd", "distill.beta=0.5", "distill.temperature=1.0", "distill.alpha=1.0"]


def build(work: Path, vocab: int, n_rows: int) -> tuple[Path, Path, Path]:
    from prepared_fixture import write_prepared

    from distillery.demo.corpus import write_corpus
    from distillery.models.init_model import ArchSpec, init_model

    corpus = write_corpus(work / "corpus", n_train=n_rows, n_test=10, seed=0)
    teacher, student = work / "teacher", work / "student"
    padded = {"vocab_size": vocab}  # the trained tokenizer has ~2k tokens; the output layer has `vocab`
    init_model(teacher, ArchSpec(**TEACHER, extra=padded), corpus=[str(corpus["train"])], vocab_size=2048, seed=0)
    init_model(student, ArchSpec(**STUDENT, extra=padded), tokenizer_from=str(teacher), seed=1)
    return teacher, student, write_prepared(corpus["train"], teacher, work / "prepared")


def config(teacher: Path, student: Path, prepared: Path, out: Path, args, mode: str):
    from distillery.config import load_config

    return load_config(None, [
        f"model.path={student}", f"model.teacher={teacher}", f"data.prepared={prepared}", f"output_dir={out}",
        f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", f"train.lr={args.lr}",
        "train.num_workers=1", "train.strategy=none", "train.scheduler=constant", "train.cpus_per_worker=2",
        f"distill.teacher_mode={mode}", f"distill.cache_backend={args.cache_backend}", f"distill.cache={out.parent / 'cache'}",
        *LOSS,
    ])


def distillery_run(cfg, warmup: int) -> dict:
    from distillery.distill.method import run_distill

    t0 = time.perf_counter()
    rc = run_distill(cfg)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"distillery distill ({cfg.distill.teacher_mode}) failed (rc {rc})")
    recs = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "tokens_per_s" in r]
    return {"tokens_per_s": steady([r["time"] for r in steps], [r["tokens"] for r in steps], warmup), "wall_s": wall,
            "first_loss": steps[0]["loss"], "step_tokens": [r["tokens"] for r in steps]}


def trl_run(teacher: Path, student: Path, data: list[dict], out: Path, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distillery.models.load import load_causal_lm, load_tokenizer
    from distillery.train.collate import collate

    torch.manual_seed(0)
    tok = load_tokenizer(student)
    times: list[float] = []
    step_tokens: list[int] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            times.append(time.perf_counter())

    class Counted(GKDTrainer):
        """GKDTrainer, recording the non-padding tokens and the loss of every batch it trains on."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            step_tokens.append(int(inputs["attention_mask"].sum()))
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(float((loss[0] if return_outputs else loss).detach()))
            return loss

    def pad(batch: list[dict]) -> dict:
        return collate({k: [r[k] for r in batch] for k in ("input_ids", "labels")}, tok.pad_token_id)

    gkd = GKDConfig(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        lr_scheduler_type="constant", max_grad_norm=1.0, weight_decay=0.0, lmbda=0.0, beta=0.5, seq_kd=False,
        train_sampling_strategy="sequential", logging_strategy="no", save_strategy="no", report_to=[],
        dataloader_num_workers=0, use_cpu=True, bf16=False, seed=0,
    )
    trainer = Counted(
        model=load_causal_lm(student, dtype="float32"), teacher_model=load_causal_lm(teacher, dtype="float32"), args=gkd,
        train_dataset=Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in data]),
        data_collator=pad, processing_class=tok, callbacks=[Clock()],
    )
    trainer.train()
    return {"tokens_per_s": steady(times, step_tokens, args.warmup), "first_loss": losses[0], "step_tokens": step_tokens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--vocab", type=int, default=32768, help="output vocabulary of teacher and student")
    ap.add_argument("--rows", type=int, default=200, help="corpus rows (one in ten goes to val)")
    ap.add_argument("--cache-backend", default="hf", choices=["hf", "vllm", "auto"])
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import ray
    import torch

    from distillery.runtime import ensure_ray
    from distillery.distill.teacher_cache import load_cache_manifest, run_cache_teacher

    torch.set_num_threads(2)  # as the one Ray Train worker with train.cpus_per_worker=2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="distillery-bench-"))
    teacher, student, prepared = build(work, args.vocab, args.rows)
    data = rows(prepared)
    print(f"teacher {TEACHER}, student {STUDENT}, vocab {args.vocab}, {len(data)} train rows, "
          f"{args.steps} steps of batch {args.batch_size}, loss jsd beta 0.5 T 1", flush=True)

    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    ensure_ray(num_cpus=4, include_dashboard=False)  # 2 for the train worker, 2 for Ray Data / the cache actor
    ray_start = time.perf_counter() - t0
    results: dict[str, dict] = {}
    try:
        results["distillery distill, online teacher"] = distillery_run(config(teacher, student, prepared, work / "online", args, "online"), args.warmup)
        cfg = config(teacher, student, prepared, work / "cached", args, "cached")
        t0 = time.perf_counter()
        if run_cache_teacher(cfg) != 0:
            raise RuntimeError("distillery cache-teacher failed")
        cache_s = time.perf_counter() - t0
        manifest = load_cache_manifest(cfg.teacher_cache_dir)
        results["distillery distill, cached teacher"] = distillery_run(cfg, args.warmup)
    finally:
        ray.shutdown()
    results["TRL GKDTrainer (lmbda=0)"] = trl_run(teacher, student, data, work / "trl", args)

    trl = results["TRL GKDTrainer (lmbda=0)"]
    same_batches = all(r["step_tokens"] == trl["step_tokens"] for r in results.values())
    print(f"\n{'run (one process each)':<36} {'tokens/s':>9} {'vs TRL':>7} {'step-1 loss':>12}")
    for name, r in results.items():
        print(f"{name:<36} {r['tokens_per_s']:>9.0f} {r['tokens_per_s'] / trl['tokens_per_s']:>6.2f}x {r['first_loss']:>12.5f}")
    dense = 2 * args.vocab
    disk = manifest["disk_bytes_per_token"]
    ratio = results["distillery distill, cached teacher"]["tokens_per_s"] / trl["tokens_per_s"]
    print(f"\nidentical batches on every side (non-padding tokens per step): {same_batches}")
    print(f"cached / TRL = {ratio:.2f}x (target >= 1.5x); online / TRL = "
          f"{results['distillery distill, online teacher']['tokens_per_s'] / trl['tokens_per_s']:.2f}x")
    print(f"teacher cache: top-{manifest['top_k']} {manifest['dtype']}, {disk} B/token on disk ({manifest['raw_bytes_per_token']} raw) "
          f"vs {dense} B/token of dense fp16 logits = {100 * disk / dense:.2f}% (target <= 1%); "
          f"built in {cache_s:.1f} s ({manifest['positions']} positions, {args.cache_backend} backend)")
    print(f"load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores; Ray start-up {ray_start:.1f} s; distillery wall incl. data, final eval and export: "
          + ", ".join(f"{k.split(', ')[1]} {v['wall_s']:.1f} s" for k, v in results.items() if "wall_s" in v))
    write_result("distill_throughput", {
        "teacher": TEACHER, "student": STUDENT, "vocab": args.vocab, "steps": args.steps, "warmup": args.warmup,
        "batch_size": args.batch_size, "lr": args.lr, "loss": LOSS, "results": results, "identical_batches": same_batches,
        "ratio_cached_vs_trl": ratio, "ray_start_s": ray_start, "load_average_1min": [load_start, os.getloadavg()[0]],
        "cache": {"build_s": cache_s, "backend": args.cache_backend, "top_k": manifest["top_k"], "dtype": manifest["dtype"],
                  "disk_bytes_per_token": disk, "raw_bytes_per_token": manifest["raw_bytes_per_token"],
                  "dense_fp16_bytes_per_token": dense, "fraction_of_dense": disk / dense},
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
