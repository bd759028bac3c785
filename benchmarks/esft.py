"""ESFT against full fine-tuning and LoRA on a tiny mixture-of-experts model.

    PYTHONPATH=platform python benchmarks/esft.py [--general-steps 800] [--domain-steps 300] [--threshold 0.5]

A Qwen2-MoE (8 routed experts, top-2, a shared expert) is first trained on general tasks (headline
topic and field extraction from `distillery.demo.corpus`), then adapted to a domain task (unit
conversion) three ways for the same number of steps with the same lr and batch: `full`, `lora`
(q/k/v/o projections) and `esft` (gate relevance, `--threshold`). ESFT's claim is that training only
the task's experts comes close to full fine-tuning on the domain while forgetting less of the
general tasks. For each method the table gives trainable parameters, the AdamW state it allocates,
the median step time (and its ratio to full fine-tuning, measured in this run), exact match and
loss on held-out domain prompts, and exact match and loss on held-out general prompts (the base
model's figures are the reference for forgetting). Writes benchmarks/results/esft.json.
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
sys.path.insert(0, str(REPO / "benchmarks"))

from report import write_result  # noqa: E402  (same directory)

MOE = dict(arch="qwen2_moe", layers=2, hidden=64, heads=2, kv_heads=1, intermediate=64, experts=8, experts_per_token=2)
DOMAIN, GENERAL = {"units"}, {"classify", "extract"}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def corpus(work: Path, n: int) -> dict[str, Path]:
    """Training rows of the general and domain tasks, and held-out rows of each, disjoint from them."""
    from distillery.data.normalize import normalize_text
    from distillery.demo.corpus import generate_rows, held_out_rows, prompt_of

    rows = generate_rows(n, seed=11)
    train_prompts = {normalize_text(prompt_of(r)) for r in rows}
    held = held_out_rows(400, seed=12, exclude=train_prompts)
    overlap = sum(normalize_text(prompt_of(r)) in train_prompts for r in held)
    assert overlap == 0, f"{overlap} held-out prompts occur in training data"
    pick = lambda rs, tasks: [r for r in rs if r["task"] in tasks]  # noqa: E731
    examples = lambda rs: [{"prompt": prompt_of(r), "reference": r["output"], "task": r["task"], "metric": r["metric"]} for r in rs]  # noqa: E731
    return {
        "general": write_rows(work / "general.jsonl", pick(rows, GENERAL)),
        "domain": write_rows(work / "domain.jsonl", pick(rows, DOMAIN)),
        "general_eval": write_rows(work / "general_eval.jsonl", examples(pick(held, GENERAL)[:100])),
        "domain_eval": write_rows(work / "domain_eval.jsonl", examples(pick(held, DOMAIN)[:100])),
    }


def exact_match(model_dir: Path, eval_file: Path) -> float:
    """Greedy exact match on held-out prompts (Hugging Face generate)."""
    from transformers import AutoTokenizer

    from distillery.data.answers import score
    from distillery.evaluation.generation import generate_hf, render_prompt
    from distillery.evaluation.metrics import load_jsonl_examples

    examples = load_jsonl_examples(str(eval_file))
    tok = AutoTokenizer.from_pretrained(model_dir)
    gens = generate_hf(model_dir, [render_prompt(tok, ex, True) for ex in examples], max_new_tokens=16)
    return statistics.mean(score("exact_match", p, ex.reference) for p, ex in zip(gens.texts, examples))


def step_seconds(run: Path) -> float:
    """Median seconds between consecutive training steps (evaluation steps left out)."""
    times = [(m["step"], m["time"]) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m and "time" in m]
    gaps = [b[1] - a[1] for a, b in zip(times, times[1:]) if b[0] == a[0] + 1]
    return statistics.median(gaps[len(gaps) // 10:]) if gaps else float("nan")  # the first steps warm up


def optimizer_bytes(model_dir: Path, cfg, experts: dict[int, list[int]] | None) -> int:
    """Bytes of AdamW state (exp_avg + exp_avg_sq, fp32) over the tensors the method trains. ESFT
    trains slices of fused expert tensors, so the state covers whole tensors."""
    from distillery.models.load import load_causal_lm
    from distillery.models.plan import apply_method

    model, _ = apply_method(load_causal_lm(model_dir, dtype="float32"), cfg.method, experts)
    return sum(2 * 4 * p.numel() for p in model.parameters() if p.requires_grad)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=6000, help="generated rows before splitting into general and domain tasks")
    ap.add_argument("--general-steps", type=int, default=800)
    ap.add_argument("--domain-steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threshold", type=float, default=0.5, help="ESFT cumulative relevance per layer")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    import ray

    from distillery.config import apply_override, validate_tree
    from distillery.data.prepare import run_prepare
    from distillery.evaluation.model_metrics import val_and_teacher_metrics
    from distillery.models.experts import read_selection
    from distillery.models.init_model import ArchSpec, init_model
    from distillery.runtime import ensure_ray
    from distillery.train.finetune import run_finetune

    t0 = time.perf_counter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="distillery-esft-")).resolve()
    files = corpus(work / "corpus", args.rows)
    base_init = work / "models" / "moe"
    init_model(base_init, ArchSpec(**MOE), corpus=[str(files["general"]), str(files["domain"])], vocab_size=1024, seed=0, overwrite=True)

    def cfg(**keys):
        tree = {"seed": 0, "data": {"max_length": 128, "val_fraction": 0.05, "test_fraction": 0.0},
                "train": {"num_workers": 1, "strategy": "none", "batch_size": args.batch, "lr": args.lr, "scheduler": "constant",
                          "eval_every": None}}
        for dotted, value in keys.items():
            apply_override(tree, dotted.split("."), value)
        return validate_tree(tree, "benchmark")

    general_data, domain_data = str(work / "prepared" / "general"), str(work / "prepared" / "domain")
    ensure_ray(num_cpus=3)
    runs: dict[str, Path] = {}
    try:
        for name, src, out in (("general", files["general"], general_data), ("domain", files["domain"], domain_data)):
            print(f"== prepare ({name})", flush=True)
            run_prepare(cfg(**{"data.sources": [{"path": str(src), "format": "instruction"}], "data.prepared": out,
                               "model.path": str(base_init), "output_dir": str(work)}))
        print("== base: general tasks", flush=True)
        base = work / "runs" / "base"
        run_finetune(cfg(**{"data.prepared": general_data, "model.path": str(base_init), "output_dir": str(base),
                            "train.max_steps": args.general_steps}))
        methods = {
            "full": {"method.kind": "full"},
            "lora": {"method.kind": "lora", "method.lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "method.lora.merge": True},
            "esft": {"method.kind": "esft", "method.esft.threshold": args.threshold, "method.esft.relevance": "gate"},
        }
        for name, keys in methods.items():
            print(f"== domain: {name}", flush=True)
            runs[name] = work / "runs" / name
            run_finetune(cfg(**{"data.prepared": domain_data, "model.path": str(base / "model"), "output_dir": str(runs[name]),
                                "train.max_steps": args.domain_steps, **keys}))
    finally:
        ray.shutdown()

    rows = {}
    base_model = base / "model"
    for name in ["base", *methods]:
        model_dir = base_model if name == "base" else (runs[name] / "merged" if name == "lora" else runs[name] / "model")
        row = {
            "domain_exact_match": exact_match(model_dir, files["domain_eval"]),
            "domain_loss": val_and_teacher_metrics(model_dir, None, domain_data)["val_loss"],
            "general_exact_match": exact_match(model_dir, files["general_eval"]),
            "general_loss": val_and_teacher_metrics(model_dir, None, general_data)["val_loss"],
        }
        if name != "base":
            run_cfg = cfg(**{"model.path": str(base_model), **methods[name]})
            experts = read_selection(str(runs[name] / "esft_experts.json")) if name == "esft" else None
            summary = json.loads((runs[name] / "run.json").read_text())["metrics"]
            row.update(trainable=int(summary["trainable_parameters"]), total=int(summary["total_parameters"]),
                       optimizer_bytes=optimizer_bytes(base_model, run_cfg, experts), step_s=step_seconds(runs[name]))
        rows[name] = row
    for name in methods:
        rows[name]["step_ratio_vs_full"] = rows[name]["step_s"] / rows["full"]["step_s"]

    print(f"\n{'method':<6} {'trainable':>10} {'share':>6} {'AdamW state':>11} {'step (x full)':>13} "
          f"{'domain EM':>9} {'domain loss':>11} {'general EM':>10} {'general loss':>12}")
    for name, r in rows.items():
        train = f"{r['trainable']:>10,} {r['trainable'] / r['total']:>6.1%} {r['optimizer_bytes'] / 2**20:>9.2f}MB {r['step_ratio_vs_full']:>13.2f}" \
            if name != "base" else f"{'-':>10} {'-':>6} {'-':>11} {'-':>13}"
        print(f"{name:<6} {train} {r['domain_exact_match']:>9.3f} {r['domain_loss']:>11.4f} {r['general_exact_match']:>10.3f} "
              f"{r['general_loss']:>12.4f}")
    esft, full = rows["esft"], rows["full"]
    print(f"\nESFT vs full: domain exact match {esft['domain_exact_match']:.3f} vs {full['domain_exact_match']:.3f}; "
          f"general loss after domain training {esft['general_loss']:.4f} vs {full['general_loss']:.4f} "
          f"(base {rows['base']['general_loss']:.4f}: {'ESFT forgot less' if esft['general_loss'] < full['general_loss'] else 'ESFT did not forget less'}); "
          f"total {(time.perf_counter() - t0) / 60:.1f} min")
    write_result("esft", {"args": vars(args), "model": MOE, "rows": rows,
                          "selection": json.loads((runs["esft"] / "esft_experts.json").read_text())})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
