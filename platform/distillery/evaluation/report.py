"""The eval report: `report.md` (markdown tables) and plots (scores per task, speed against quality)."""

from __future__ import annotations

from pathlib import Path

from distillery.config import EvalModelConfig

def model_name(m: EvalModelConfig) -> str:
    return m.name or Path(m.path.rstrip("/")).name


def write_plots(out: Path, results: list[dict], tasks: list[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(tasks) * max(1, len(results)) / 2), 3.6))
    width = 0.8 / max(1, len(results))
    for i, r in enumerate(results):
        xs = [t + i * width for t in range(len(tasks))]
        ax.bar(xs, [r["scores"].get(t, 0.0) for t in tasks], width, label=r["name"])
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title("Score per task")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "scores.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for r in results:
        ax.scatter(r["tokens_per_s"], r["mean_score"], s=60)
        ax.annotate(r["name"], (r["tokens_per_s"], r["mean_score"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("generation tokens/s")
    ax.set_ylabel("mean task score")
    ax.set_title("Speed against quality")
    fig.tight_layout()
    paths.append(out / "speed_quality.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_report(results: list[dict], tasks: list[str], n_examples: int) -> str:
    head = "| model | params | size | " + " | ".join(tasks) + " | mean | tokens/s |"
    sep = "|" + "---|" * (len(tasks) + 5)
    lines = ["# Evaluation report", "", f"{n_examples} examples, greedy decoding, same prompts for every model.", "", head, sep]
    for r in results:
        cells = [r["name"], f"{r['parameters']:,}", _human_bytes(r["size_bytes"])]
        cells += [f"{r['scores'].get(t, 0.0):.3f}" for t in tasks]
        cells += [f"{r['mean_score']:.3f}", f"{r['tokens_per_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| model | trainable | val loss | perplexity | teacher top-1 | teacher KL | p50 latency (s) | backend |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        def f(key, fmt="{:.3f}"):
            return fmt.format(r[key]) if r.get(key) is not None else "–"

        lines.append(
            f"| {r['name']} | {r['trainable_parameters']:,} | {f('val_loss')} | {f('val_perplexity', '{:.2f}')} | "
            f"{f('teacher_top1_agreement')} | {f('teacher_kl')} | {f('latency_p50_s')} | {r['backend']} |"
        )
    lines += ["", "![scores](scores.png)", "", "![speed against quality](speed_quality.png)", ""]
    return "\n".join(lines)
