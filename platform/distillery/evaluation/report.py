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


def render_contamination(results: list[dict], tasks: list[str], contamination: dict) -> list[str]:
    """The report's contamination section from `Contamination.summary()`: the count and per-task
    split, the scores on the clean examples when any are contaminated, or why the check did not run."""
    lines = ["## Contamination", ""]
    if not contamination["checked"]:
        return lines + [f"Not checked: {contamination['reason']}. The scores may include prompts the models trained on.", ""]
    n, k, where = contamination["examples"], contamination["contaminated"], contamination["prepared"]
    if not k:
        return lines + [f"None of the {n} eval prompts occur in the training split of `{where}` "
                        f"({contamination['train_prompts']:,} training rows; exact match after normalisation).", ""]
    per_task = ", ".join(f"{t} {c['contaminated']}/{c['examples']}" for t, c in contamination["per_task"].items() if c["contaminated"])
    lines += [f"**{k} of {n} eval prompts ({100 * contamination['fraction']:.1f}%) occur in the training split of `{where}`; "
              f"scores on them are not held-out.** Per task: {per_task}. `examples.jsonl` flags them (`contaminated`).", "",
              f"Scores on the {n - k} clean examples:", "",
              "| model | " + " | ".join(tasks) + " | mean |", "|" + "---|" * (len(tasks) + 2)]
    for r in results:
        clean = r.get("clean_scores", {})
        cells = [f"{clean[t]:.3f}" if t in clean else "–" for t in tasks]
        mean = r.get("clean_mean_score")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {'–' if mean is None else f'{mean:.3f}'} |")
    return lines + [""]


def render_quantised(results: list[dict]) -> list[str]:
    """Each quantised export beside the model it was made from: size, speed and score against the
    source (when the source is evaluated too) and the KL to it (always: the source is loaded for it)."""
    quantised = [r for r in results if r.get("source")]
    if not quantised:
        return []
    by_path = {str(Path(r["path"]).resolve()): r for r in results}
    lines = ["## Quantised against source", "",
             "| model | source | size | size vs source | tokens/s vs source | score vs source | KL to source | top-1 vs source |",
             "|---|---|---|---|---|---|---|---|"]
    for r in quantised:
        src = by_path.get(str(Path(r["source"]).resolve()))

        def ratio(key: str) -> str:
            return f"{r[key] / src[key]:.2f}x" if src and src.get(key) else "–"

        delta = f"{r['mean_score'] - src['mean_score']:+.3f}" if src else "–"
        kl = f"{r['source_kl']:.4f}" if r.get("source_kl") is not None else "–"
        top1 = f"{r['source_top1_agreement']:.3f}" if r.get("source_top1_agreement") is not None else "–"
        lines.append(f"| {r['name']} | {src['name'] if src else r['source']} | {_human_bytes(r['size_bytes'])} | {ratio('size_bytes')} | "
                     f"{ratio('tokens_per_s')} | {delta} | {kl} | {top1} |")
    return lines + ["", "KL to source: nats per response token of the prepared val split, full vocabulary.", ""]


def render_report(results: list[dict], tasks: list[str], n_examples: int, contamination: dict | None = None) -> str:
    """`report.md`; `contamination` (a `Contamination.summary()`) adds its section, left out when None."""
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
    lines.append("")
    lines += render_quantised(results)
    if contamination is not None:
        lines += render_contamination(results, tasks, contamination)
    lines += ["![scores](scores.png)", "", "![speed against quality](speed_quality.png)", ""]
    return "\n".join(lines)
