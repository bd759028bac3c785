"""What a search leaves for the user: one leaderboard row per trial (status, best metric, steps),
`leaderboard.csv`, and plots of the metric against each searched key and of every trial's curve."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from distillery.config import Config


def tune_dir(cfg: Config) -> Path:
    """Where a search writes: `<output_dir>/tune`."""
    return Path(cfg.output_dir).resolve() / "tune"


def trial_statuses(results) -> dict[str, str]:
    """Trial id -> Tune's status as saved in the search state: TERMINATED, ERROR, or PENDING /
    PAUSED for a trial an interrupted search left unfinished (what a re-run resumes). Read from disk:
    on Ctrl-C Tune saves the state, then stops the running trials in memory as if they had ended."""
    from ray.tune import ExperimentAnalysis

    return {t.trial_id: t.status for t in ExperimentAnalysis(results.experiment_path).trials}


def leaderboard_rows(cfg: Config, results) -> list[dict[str, Any]]:
    """One row per trial: params, best metric, evaluations and steps run, status, error."""
    tc = cfg.tune
    keys = list(tc.search_space)
    statuses = trial_statuses(results)
    rows = []
    for r in results:
        hist = r.metrics_dataframe
        scored = hist.dropna(subset=[tc.metric]) if hist is not None and tc.metric in hist else None
        metric_values = scored[tc.metric].tolist() if scored is not None else []
        best = (min if tc.mode == "min" else max)(metric_values) if metric_values else None
        iters = int(hist["evaluation"].max()) if hist is not None and "evaluation" in hist and len(hist) else 0
        steps = int(hist["step"].max()) if hist is not None and "step" in hist and len(hist) else 0
        if r.error:
            status = "failed"
        elif statuses.get(_trial_id(r), "TERMINATED") not in ("TERMINATED", "ERROR"):
            status = "unfinished"
        elif (r.metrics or {}).get("finished"):  # the training loop's last report: it ran to its end
            status = "completed"
        else:
            status = "stopped early"
        params = {k: (r.config or {}).get(k) for k in keys}
        rows.append(
            {
                "trial_id": _trial_id(r),
                **params,
                tc.metric: best,
                "evaluations": iters,
                "steps": steps,
                "status": status,
                "error": (str(r.error).strip().splitlines() or [""])[-1][:300] if r.error else "",
                "run_dir": str(tune_dir(cfg) / "trials" / _trial_id(r)),
            }
        )
    rows.sort(key=lambda x: (x[tc.metric] is None, (x[tc.metric] or 0) * (1 if tc.mode == "min" else -1)))
    return rows


def _trial_id(result) -> str:
    # Tune adds trial_id to every reported result; a trial that failed before reporting has none.
    return (result.metrics or {}).get("trial_id") or ""


def write_plots(cfg: Config, results, rows: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, paths = cfg.tune.metric, []
    done = [r for r in rows if r[metric] is not None]
    for key in cfg.tune.search_space:
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        xs = [r[key] for r in done]
        if any(isinstance(x, str) for x in xs):
            xs = [str(x) for x in xs]
        ax.scatter(xs, [r[metric] for r in done], c=["tab:red" if r["status"] == "stopped early" else "tab:blue" for r in done])
        if cfg.tune.search_space[key].get("loguniform"):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} against {key} (red: stopped early)", fontsize=9)
        fig.tight_layout()
        paths.append(out / f"metric_vs_{key.replace('.', '_')}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for r in results:
        hist = r.metrics_dataframe
        if hist is not None and metric in hist and "evaluation" in hist:
            h = hist.dropna(subset=[metric]).drop_duplicates(subset="evaluation")  # checkpoint-only reports repeat one
            ax.plot(h["evaluation"], h[metric], marker="o", ms=3, lw=1)
    ax.set_xlabel("evaluation (ASHA rung time)")
    ax.set_ylabel(metric)
    ax.set_title("Learning curves of every trial")
    fig.tight_layout()
    paths.append(out / "asha_curves.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write `rows` to `path` atomically (header from the first row)."""
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial_id"])
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
