"""Training throughput: `distillery finetune` vs a plain PyTorch loop vs TRL's SFTTrainer.

    PYTHONPATH=platform python benchmarks/train_throughput.py [--steps 60] [--batch-size 8] [--repeats 5]

Same model (a small Llama built locally), same prepared rows, same batch size, optimiser (fused
AdamW, which distillery and TRL use; a plain loop with PyTorch's default AdamW is shown too) and
number of steps. Throughput is non-padding tokens per second over the steady-state steps (the
first `--warmup` steps are left out of every measurement); Ray's start-up is reported apart.
Prints a table and writes benchmarks/results/train_throughput.json.

Then the share of the hardware limit (`--gemm-steps`, 0 skips it): `distillery finetune` of a ~30M
student (8 layers, hidden 512) for that many steps, its model FLOPs per second (6 x N x tokens/s,
N the parameters that multiply: all but the input embedding; attention's score products, a few
percent at these lengths, are left out as in the usual MFU) against the rate of a large fp32
matmul measured on the same threads just before (CPU: target >= 60%). On a GPU the same against
a bf16 matmul, and against the device's nominal dense bf16 peak where it is known (MFU, target >= 40%).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The tests' prepared-data writer: the splits `prepare` would write, without a Ray start before the runs.
sys.path.insert(0, str(REPO / "tests"))

from report import paired_ratio, write_result  # noqa: E402  (same directory)

SPEC = dict(arch="llama", layers=4, hidden=256, heads=4, kv_heads=2, intermediate=688)


def build(work: Path) -> tuple[Path, Path]:
    from prepared_fixture import write_prepared

    from distillery.demo.corpus import write_corpus
    from distillery.models.init_model import ArchSpec, init_model

    corpus = write_corpus(work / "corpus", n_train=1200, n_test=10, seed=0)
    model = work / "model"
    init_model(model, ArchSpec(**SPEC), corpus=[str(corpus["train"])], vocab_size=2048, seed=0)
    prepared = write_prepared(corpus["train"], model, work / "prepared")
    return model, prepared


def rows(prepared: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(prepared / "train", columns=["input_ids", "labels"]).to_pylist()


def steady(times: list[float], tokens: list[int], warmup: int) -> float:
    """Tokens per second between the end of step `warmup` and the end of the last step."""
    return sum(tokens[warmup + 1 :]) / (times[-1] - times[warmup])


def plain_loop(model_dir: Path, data: list[dict], steps: int, bs: int, lr: float, warmup: int, fused: bool) -> float:
    """`fused`: AdamW's fused kernel, as distillery and TRL use it; else PyTorch's default AdamW."""
    import torch

    import torch.nn.functional as F

    from distillery.models.load import load_causal_lm, load_tokenizer
    from distillery.train.collate import collate

    torch.manual_seed(0)
    pad = load_tokenizer(model_dir).pad_token_id
    model = load_causal_lm(model_dir, dtype="float32")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=fused or None)
    times, tokens = [], []
    for s in range(steps):
        batch_rows = [data[(s * bs + i) % len(data)] for i in range(bs)]
        b = collate({k: [r[k] for r in batch_rows] for k in ("input_ids", "labels")}, pad)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        F.cross_entropy(logits[:, :-1].transpose(1, 2), b["labels"][:, 1:], ignore_index=-100).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter())
        tokens.append(int(b["attention_mask"].sum()))
    return steady(times, tokens, warmup)


def distillery_run(model_dir: Path, prepared: Path, out: Path, steps: int, bs: int, lr: float, warmup: int,
                   workers: int, strategy: str) -> tuple[float, float]:
    import ray

    from distillery.config import load_config
    from distillery.train.finetune import run_finetune

    cfg = load_config(None, [
        f"model.path={model_dir}", f"data.prepared={prepared}", f"output_dir={out}", f"train.max_steps={steps}",
        f"train.batch_size={bs}", f"train.lr={lr}", f"train.num_workers={workers}", f"train.strategy={strategy}",
        "train.scheduler=constant", f"train.cpus_per_worker={max(1, 2 // workers)}",
    ])
    t0 = time.perf_counter()
    rc = run_finetune(cfg)
    wall = time.perf_counter() - t0
    ray.shutdown()
    if rc != 0:
        raise RuntimeError(f"distillery finetune failed (rc {rc})")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_recs = [r for r in recs if "loss" in r]
    return steady([r["time"] for r in steps_recs], [r["tokens"] for r in steps_recs], warmup), wall


def trl_run(model_dir: Path, data: list[dict], out: Path, steps: int, bs: int, lr: float, warmup: int) -> float:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from distillery.models.load import load_causal_lm, load_tokenizer

    torch.manual_seed(0)
    ds = Dataset.from_list([
        {"input_ids": r["input_ids"], "completion_mask": [0 if x == -100 else 1 for x in r["labels"]]} for r in data
    ])
    mean_tokens = sum(len(r["input_ids"]) for r in data) / len(data)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    args = SFTConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=bs, learning_rate=lr, lr_scheduler_type="constant",
        logging_strategy="no", save_strategy="no", report_to=[], completion_only_loss=True, packing=False,
        max_length=None, dataloader_num_workers=0, use_cpu=True, bf16=False, seed=0, max_grad_norm=1.0,
    )
    trainer = SFTTrainer(model=load_causal_lm(model_dir, dtype="float32"), args=args, train_dataset=ds,
                         processing_class=load_tokenizer(model_dir), callbacks=[Clock()])
    trainer.train()
    return steady(times, [int(mean_tokens * bs)] * len(times), warmup)


GEMM_SPEC = dict(arch="llama", layers=8, hidden=512, heads=8, kv_heads=4, intermediate=1536)
NOMINAL_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core FLOP/s


def matmul_rate(device: str, dtype, n: int = 2048, seconds: float = 3.0) -> float:
    """FLOP/s of repeated (n x n) @ (n x n) products: what this device sustains on large GEMMs."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    sync()
    return 2 * n**3 * count / (time.perf_counter() - t0)


def gemm_share(work: Path, steps: int, bs: int, lr: float, warmup: int) -> dict:
    """`distillery finetune` of the ~30M student: model FLOP/s against the measured matmul rate."""
    import ray
    import torch

    from prepared_fixture import write_prepared

    from distillery.config import load_config
    from distillery.demo.corpus import write_corpus
    from distillery.models.init_model import ArchSpec, init_model
    from distillery.models.load import load_causal_lm
    from distillery.train.finetune import run_finetune

    gpu = torch.cuda.is_available()
    corpus = write_corpus(work / "gemm-corpus", n_train=1200, n_test=10, seed=0)
    model_dir = work / "gemm-model"
    init_model(model_dir, ArchSpec(**GEMM_SPEC), corpus=[str(corpus["train"])], vocab_size=2048, seed=0)
    prepared = write_prepared(corpus["train"], model_dir, work / "gemm-prepared")
    model = load_causal_lm(model_dir, dtype="float32")
    n_params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    del model
    threads = torch.get_num_threads()
    peak = matmul_rate("cuda" if gpu else "cpu", torch.bfloat16 if gpu else torch.float32)
    cfg = load_config(None, [
        f"model.path={model_dir}", f"data.prepared={prepared}", f"output_dir={work / 'gemm-run'}", f"train.max_steps={steps}",
        f"train.batch_size={bs}", f"train.lr={lr}", "train.num_workers=1", "train.strategy=none", "train.scheduler=constant",
        f"train.use_gpu={str(gpu).lower()}", *([] if gpu else [f"train.cpus_per_worker={threads}"]),
    ])
    if run_finetune(cfg) != 0:
        raise RuntimeError("distillery finetune of the GEMM-share model failed")
    ray.shutdown()
    recs = [json.loads(line) for line in (work / "gemm-run" / "metrics.jsonl").read_text().splitlines()]
    steps_recs = [r for r in recs if "loss" in r]
    tps = steady([r["time"] for r in steps_recs], [r["tokens"] for r in steps_recs], warmup)
    achieved = 6 * n_params * tps
    out = {"spec": GEMM_SPEC, "params_counted": n_params, "threads": threads, "tokens_per_s": tps,
           "model_flops_per_s": achieved, "matmul_flops_per_s": peak, "share_of_matmul": achieved / peak}
    if gpu:
        name = torch.cuda.get_device_name()
        nominal = next((v for k, v in NOMINAL_BF16_PEAK.items() if k in name), None)
        out.update(device=name, mfu=achieved / nominal if nominal else None)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--repeats", type=int, default=5, help="rounds of the three runs; the table shows medians, ratios are medians of per-round ratios")
    ap.add_argument("--gemm-steps", type=int, default=30, help="steps of the ~30M student for the share of the matmul limit (0: skip)")
    ap.add_argument("--gemm-only", action="store_true", help="only the share of the matmul limit")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="distillery-bench-"))
    gemm = None
    if args.gemm_steps or args.gemm_only:
        gemm = gemm_share(work, max(args.gemm_steps, args.warmup + 5), args.batch_size, args.lr, args.warmup)
        line = (f"~30M student ({gemm['params_counted'] / 1e6:.1f}M multiplying parameters, {gemm['threads']} threads): "
                f"{gemm['tokens_per_s']:.0f} tokens/s = {gemm['model_flops_per_s'] / 1e9:.1f} GFLOP/s, "
                f"{gemm['share_of_matmul']:.0%} of the measured matmul rate ({gemm['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s)")
        if gemm.get("mfu") is not None:
            line += f"; MFU {gemm['mfu']:.0%} of {gemm['device']}'s nominal bf16 peak (target >= 40%)"
        print(line + ("" if "mfu" in gemm else " (target >= 60% on CPU)"), flush=True)
        if args.gemm_only:
            write_result("train_gemm_share", gemm)
            return 0
    model_dir, prepared = build(work)
    data = rows(prepared)
    print(f"model {SPEC}, {len(data)} rows, {args.steps} steps of batch {args.batch_size}", flush=True)

    # Shared machines drift by tens of percent over minutes: the three runs take turns, `--repeats`
    # times; each is summarised by its median tokens/s.
    # The headline "plain" loop uses the same optimiser kernel as distillery (fused AdamW), so its
    # ratio is the cost of Ray alone; the loop with PyTorch's default AdamW is shown beside it.
    plain_name, default_name = "plain PyTorch loop (1 process)", "plain loop, default AdamW"
    ours_name, trl_name = "distillery finetune (1 worker, none)", "TRL SFTTrainer (1 process)"
    samples: dict[str, list[float]] = {plain_name: [], default_name: [], ours_name: [], trl_name: []}
    walls: list[float] = []
    for rep in range(args.repeats):
        samples[plain_name].append(plain_loop(model_dir, data, args.steps, args.batch_size, args.lr, args.warmup, fused=True))
        samples[default_name].append(plain_loop(model_dir, data, args.steps, args.batch_size, args.lr, args.warmup, fused=False))
        tps, wall = distillery_run(model_dir, prepared, work / f"run{rep}", args.steps, args.batch_size, args.lr, args.warmup, 1, "none")
        samples[ours_name].append(tps)
        walls.append(wall)
        samples[trl_name].append(trl_run(model_dir, data, work / f"trl{rep}", args.steps, args.batch_size, args.lr, args.warmup))
        print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.0f} tokens/s" for k, v in samples.items()), flush=True)
    results = {k: {"tokens_per_s": statistics.median(v), "samples": v} for k, v in samples.items()}
    results[ours_name]["wall_s"] = statistics.median(walls)

    vs_plain = {name: paired_ratio(samples[name], samples[plain_name]) for name in samples}
    vs_trl = {name: paired_ratio(samples[name], samples[trl_name]) for name in samples}
    print(f"\n{'run (median of ' + str(args.repeats) + ' rounds)':<40} {'tokens/s':>10} {'vs plain':>9} {'vs TRL':>8}")
    for name, r in results.items():
        print(f"{name:<40} {r['tokens_per_s']:>10.0f} {vs_plain[name]:>8.2f}x {vs_trl[name]:>7.2f}x")
    ours_plain, ours_trl = vs_plain[ours_name], vs_trl[ours_name]
    print(f"\ndistillery / plain = {ours_plain:.2f}x (target >= 0.87x); distillery / TRL = {ours_trl:.2f}x (target >= 1.2x)")
    print(f"distillery wall time including Ray start-up, data and export: {results[ours_name]['wall_s']:.1f} s")
    write_result("train_throughput", {"spec": SPEC, "steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size, "repeats": args.repeats,
                                      "results": results, "ratio_vs_plain": ours_plain, "ratio_vs_trl": ours_trl,
                                      "ratio_of_medians_vs_plain": results[ours_name]["tokens_per_s"] / results[plain_name]["tokens_per_s"],
                                      "ratio_of_medians_vs_trl": results[ours_name]["tokens_per_s"] / results[trl_name]["tokens_per_s"],
                                      "gemm_share": gemm})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
