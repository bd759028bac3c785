"""The model card (`README.md`) of an exported model: what it was trained from, how, and how it scores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _number(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def render_card(name: str, export: dict[str, Any], run_dir: Path | None) -> str:
    """Markdown for the export's README. `export` is the export manifest; `run_dir` is the training
    run the model came from (its run.json, config.yaml and eval/metrics.json are read when present)."""
    run = _read_json(run_dir / "run.json") if run_dir else {}
    settings = run.get("settings") or {}
    lines = [f"# {name}", "", "Exported by Distillery (`distillery export`).", "", "## Provenance", ""]
    lines.append(f"- Source model: `{export['source']}` (content hash `{export['source_hash'][:16]}`)")
    if run:
        lines.append(f"- Stage: {run.get('stage')} (run `{str(run.get('run_id', ''))[:12]}`, config sha256 `{str(run.get('config_sha256', ''))[:16]}`, seed {run.get('seed')})")
        inputs = run.get("inputs") or {}
        if inputs.get("model"):
            lines.append(f"- Initial student: `{(settings.get('model') or {}).get('path', '?')}` (content `{inputs['model'][:16]}`)")
        for h in inputs.get("teachers") or []:
            lines.append(f"- Teacher: content `{h[:16]}`")
        if inputs.get("data_fingerprint"):
            lines.append(f"- Prepared data fingerprint: `{inputs['data_fingerprint'][:16]}`")
        method = settings.get("method") or {}
        distill = settings.get("distill") or {}
        train = settings.get("train") or {}
        how = [f"method {method.get('kind', '?')}"]
        if run.get("stage") == "distill":
            how.append(f"loss {distill.get('loss')} at T={distill.get('temperature')}, alpha {distill.get('alpha')}")
        how.append(f"lr {train.get('lr')}, {train.get('max_steps') or str(train.get('epochs')) + ' epoch(s)'} steps, qat {train.get('qat', False)}")
        lines.append("- Training: " + "; ".join(str(h) for h in how))
    lines += ["", "## Export", "", f"- dtype: {export['dtype']}", f"- quantisation: {export['quantize']}"]
    q = export.get("quantization")
    if q:
        lines.append(f"- {q['layers']} linear layers in int8 (per-channel weights, dynamic per-token activations, "
                     f"compressed-tensors W8A8); weight clipping {'calibrated on ' + str(export['calibration_rows']) + ' rows' if q.get('calibrated') else 'round to nearest'}")
    lines.append(f"- Size on disk: {export['bytes']:,} bytes ({export['bytes'] / max(export['source_bytes'], 1):.2f}x the source)")
    metrics = run.get("metrics") or {}
    shown = {k: v for k, v in metrics.items() if k.startswith("val_") and isinstance(v, (int, float))}
    scores = _read_json(run_dir / "eval" / "metrics.json") if run_dir else {}
    if shown or scores:
        lines += ["", "## Scores", ""]
        for k, v in shown.items():
            lines.append(f"- {k}: {_number(v)} (the training run's final evaluation)")
        for m in scores.get("models", []):
            lines.append(f"- eval `{m.get('name')}`: mean task score {_number(m.get('mean_score'))} "
                         + ", ".join(f"{t} {_number(s)}" for t, s in (m.get("scores") or {}).items()))
    lines += ["", "## Use", "", "```", "vllm serve <this directory>", "distillery serve CONFIG serve.models='[{path: <this directory>}]'", "```", ""]
    return "\n".join(lines)
