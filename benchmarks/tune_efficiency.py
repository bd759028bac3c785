"""ASHA + Optuna against random search with the same number of trials: trial-steps spent, best metric.

    .venv/bin/python benchmarks/tune_efficiency.py [--trials 32] [--steps 60] [--evals 20] [--concurrent 2]

Both searches tune a small distillation (tiny teacher and student built here, cached teacher)
over temperature, alpha and learning rate, with identical trials budgets. Prints a table and
writes benchmarks/results/tune_efficiency.json. Target: ASHA+Optuna spends at most 35% of random
search's trial-steps for a best metric within 2% of it.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def build_workspace(root: Path, steps: int, evals: int) -> Path:
    """Corpus, prepared data, a trained teacher and its cache; returns the base config path."""
    from distillery.cli import main as cli
    from distillery.demo.corpus import write_corpus

    corpus = write_corpus(root / "corpus", n_train=600, n_test=20, seed=0)
    base = {
        "output_dir": str(root / "runs" / "base"),
        "seed": 0,
        "data": {"sources": [{"path": str(corpus["train"]), "format": "instruction"}], "max_length": 96,
                 "prepared": str(root / "data")},
        "model": {"path": str(root / "models" / "student"), "teacher": str(root / "runs" / "teacher")},
        "distill": {"teacher_mode": "cached", "top_k": 16},
        "train": {"num_workers": 1, "strategy": "none", "batch_size": 16, "max_steps": steps,
                  "eval_every": max(1, steps // evals), "lr": 3e-3},
        # ASHA with Ray Tune's own defaults (grace period 1, reduction factor 4): rungs at 1, 4 and
        # 16 of 20 evaluations, so a trial ASHA stops at the first rung costs 1/20 of a full one.
        "tune": {"num_samples": 32, "max_concurrent_trials": 2, "grace_period": 1, "reduction_factor": 4,
                 "search_space": {"distill.temperature": {"uniform": [1.0, 6.0]},
                                  "distill.alpha": {"uniform": [0.2, 0.9]},
                                  "train.lr": {"loguniform": [1e-4, 3e-2]}}},
    }
    import yaml

    path = root / "base.yaml"
    path.write_text(yaml.safe_dump(base))
    cli(["init-model", str(root / "models" / "teacher-init"), "--arch", "llama", "--layers", "2", "--hidden", "64",
         "--heads", "2", "--intermediate", "128", "--corpus", str(corpus["train"]), "--vocab-size", "512"])
    cli(["init-model", str(root / "models" / "student"), "--arch", "llama", "--layers", "1", "--hidden", "32",
         "--heads", "1", "--intermediate", "64", "--tokenizer-from", str(root / "models" / "teacher-init")])
    assert cli(["prepare", str(path), f"model.path={root / 'models' / 'teacher-init'}"]) == 0
    assert cli(["finetune", str(path), f"model.path={root / 'models' / 'teacher-init'}",
                f"output_dir={root / 'runs' / 'teacher'}", f"train.max_steps={steps * 2}"]) == 0
    assert cli(["cache-teacher", str(path)]) == 0
    return path


def trained_steps(run_dir: Path) -> int:
    """Optimiser steps a trial's workers actually took (its metrics.jsonl), not only those Tune saw."""
    log = run_dir / "metrics.jsonl"
    steps = [json.loads(l).get("step", 0) for l in log.read_text().splitlines() if l.strip()] if log.exists() else []
    return max(steps, default=0)


def run_search(base: Path, name: str, searcher: str, scheduler: str, trials: int, concurrent: int, root: Path) -> dict:
    from distillery.cli import main as cli

    out = root / "runs" / name
    start = time.time()
    rc = cli(["tune", str(base), f"output_dir={out}", f"tune.searcher={searcher}", f"tune.scheduler={scheduler}",
              f"tune.num_samples={trials}", f"tune.max_concurrent_trials={concurrent}"])
    seconds = time.time() - start
    rows = list(csv.DictReader(open(out / "tune" / "leaderboard.csv")))
    metrics = [float(r["val_loss"]) for r in rows if r["val_loss"] not in ("", "None")]
    return {"search": name, "rc": rc, "trials": len(rows), "trial_steps": sum(trained_steps(Path(r["run_dir"])) for r in rows),
            "evaluations": sum(int(r["evaluations"]) for r in rows),
            "stopped_early": sum(r["status"] == "stopped early" for r in rows), "best_val_loss": min(metrics),
            "seconds": seconds}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--evals", type=int, default=20, help="evaluations per full trial (ASHA's time unit)")
    ap.add_argument("--concurrent", type=int, default=2, help="trials running at once, in both searches")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tune-bench-"))
    base = build_workspace(root, args.steps, args.evals)
    random = run_search(base, "random", "random", "fifo", args.trials, args.concurrent, root)
    asha = run_search(base, "asha_optuna", "optuna", "asha", args.trials, args.concurrent, root)
    step_ratio = asha["trial_steps"] / random["trial_steps"]
    metric_gap = (asha["best_val_loss"] - random["best_val_loss"]) / random["best_val_loss"]
    print(f"\n{'search':<14}{'trials':>8}{'stopped':>9}{'trial-steps':>13}{'evaluations':>13}{'best val_loss':>15}{'seconds':>10}")
    for r in (random, asha):
        print(f"{r['search']:<14}{r['trials']:>8}{r['stopped_early']:>9}{r['trial_steps']:>13}{r['evaluations']:>13}"
              f"{r['best_val_loss']:>15.4f}{r['seconds']:>10.1f}")
    print(f"\nASHA+Optuna trial-steps / random: {step_ratio:.2f} (target <= 0.35); "
          f"best-metric gap: {metric_gap * 100:+.2f}% (target <= +2%)")
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune_efficiency.json").write_text(json.dumps(
        {"random": random, "asha_optuna": asha, "trial_step_ratio": step_ratio, "best_metric_gap": metric_gap,
         "targets": {"trial_step_ratio": 0.35, "best_metric_gap": 0.02}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
