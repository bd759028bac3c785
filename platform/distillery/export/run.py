"""`distillery export`: a finished run (full weights or a LoRA adapter) to a deployable Hugging Face
directory, optionally INT8 (W8A8, compressed-tensors), with a model card and a lineage record.

    distillery export CONFIG [export.quantize=w8a8] [export.name=support-bot export.alias=canary]

Writes `<run>/export` (or `export-w8a8`) atomically: the weights, the tokenizer, `README.md` (the
model card), `distillery_export.json` (source, content hash, settings, sizes) and `run.json`
(the lineage record, also kept by the registry).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from distillery.config import Config, ConfigError
from distillery.data.splits import load_manifest
from distillery.evaluation.model_metrics import size_on_disk
from distillery.export.card import render_card
from distillery.files import install_dir, removed_on_failure, write_text_atomic
from distillery.models.load import adapter_base, model_config, model_identity, resolve_model_dir
from distillery.models.structure import is_moe_config
from distillery.registry.record import artifact_hashes, finish_stage, new_record, resolve_model_ref

EXPORT_MANIFEST = "distillery_export.json"


def say(line: str) -> None:
    print(f"export: {line}", flush=True)


def _source_bytes(model_dir: Path) -> int:
    """Bytes of the full model the export replaces (an adapter's base counts: it is what gets served)."""
    base = adapter_base(model_dir)
    weights = lambda d: sum(p.stat().st_size for p in Path(d).glob("*.safetensors"))  # noqa: E731
    return weights(model_dir) + (weights(resolve_model_dir(base)) if base else 0)


def calibration_batches(prepared: str, rows: int, pad_id: int, batch_size: int = 8) -> list[dict[str, Any]]:
    """The first `rows` rows of the prepared train split as padded batches {input_ids, attention_mask}
    ([B, T] each), the inputs the weight clipping is calibrated on."""
    import pyarrow.parquet as pq
    import torch

    from distillery.data.splits import split_dir

    d = split_dir(prepared, "train")
    files = sorted(f for f in os.listdir(d) if f.endswith(".parquet")) if os.path.isdir(d) else []
    if not files:
        raise ConfigError(f"export.calibration_rows: no prepared train split at '{d}' to calibrate on (set data.prepared, or 0 for no calibration)")
    ids: list[list[int]] = []
    for f in files:
        ids.extend(r["input_ids"] for r in pq.read_table(os.path.join(d, f), columns=["input_ids"]).to_pylist())
        if len(ids) >= rows:
            break
    ids = ids[:rows]
    batches = []
    for i in range(0, len(ids), batch_size):
        chunk = ids[i : i + batch_size]
        width = max(len(r) for r in chunk)
        x = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, r in enumerate(chunk):
            x[j, : len(r)] = torch.tensor(r)
            mask[j, : len(r)] = 1
        batches.append({"input_ids": x, "attention_mask": mask})
    return batches


def _torch_dtype(name: str, model_dir: Path):
    import torch

    if name != "auto":
        return getattr(torch, name)
    config = model_config(model_dir)
    own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(own, str):
        own = getattr(torch, own, None)
    return own if isinstance(own, torch.dtype) else torch.float32


def validate_export(cfg: Config) -> tuple[Path, Path, Path | None]:
    """(model dir, output dir, run dir or None); every check that needs no weights."""
    ec = cfg.export
    source = resolve_model_ref(ec.model or cfg.output_dir, cfg, "export.model")
    try:
        model_dir = resolve_model_dir(source).resolve()
    except FileNotFoundError as e:
        raise ConfigError(f"export.model: {e}") from None
    run_dir = model_dir.parent if (model_dir.parent / "run.json").exists() else (model_dir if (model_dir / "run.json").exists() else None)
    home = run_dir or model_dir.parent
    out = Path(ec.output or home / ("export-w8a8" if ec.quantize == "w8a8" else "export")).resolve()
    if out == model_dir or model_dir.is_relative_to(out):
        raise ConfigError(f"export.output: '{out}' would replace the model being exported ({model_dir})")
    if ec.quantize == "w8a8" and is_moe_config(model_config(model_dir)):
        raise ConfigError(f"export.quantize: w8a8 covers dense models; {model_dir} is a mixture-of-experts model (export it with quantize: none)")
    if ec.quantize == "w8a8" and ec.calibration_rows and not os.path.isdir(os.path.join(cfg.prepared_dir, "train")):
        raise ConfigError(f"export.calibration_rows: no prepared train split in '{cfg.prepared_dir}' to calibrate on "
                          f"(set data.prepared, or export.calibration_rows=0 for round-to-nearest)")
    return model_dir, out, run_dir


def run_export(cfg: Config) -> int:
    """The CLI stage: merge, cast or quantise, write the card, record the lineage, register."""
    from distillery.export.merge import merge_adapter
    from distillery.models.load import load_causal_lm, load_tokenizer

    ec = cfg.export
    t0 = time.time()
    model_dir, out, run_dir = validate_export(cfg)
    source_hash = model_identity(model_dir)["hash"]
    full_dir = merge_adapter(model_dir, say=say) if adapter_base(model_dir) else model_dir
    dtype = _torch_dtype(ec.dtype, full_dir)
    say(f"{model_dir} (content {source_hash[:12]}) -> {out}: dtype {str(dtype).removeprefix('torch.')}, quantize {ec.quantize}")
    tokenizer = load_tokenizer(model_dir)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"source": str(model_dir), "source_hash": source_hash, "dtype": str(dtype).removeprefix("torch."),
                                "quantize": ec.quantize, "calibration_rows": 0, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    with removed_on_failure(tmp):
        if ec.quantize == "w8a8":
            from distillery.models.w8a8 import export_w8a8

            model = load_causal_lm(full_dir, dtype="float32").eval()  # calibrated in fp32; the float tensors cast on write
            batches = calibration_batches(cfg.prepared_dir, ec.calibration_rows, tokenizer.pad_token_id) if ec.calibration_rows else None
            manifest["calibration_rows"] = sum(len(b["input_ids"]) for b in batches) if batches else 0
            say("quantising to W8A8 int8" + (f", clipping calibrated on {manifest['calibration_rows']} prepared train rows" if batches else ", round to nearest"))
            manifest["quantization"] = export_w8a8(model, tokenizer, tmp, calibration_batches=batches, dtype=dtype)
        else:
            model = load_causal_lm(full_dir, dtype=manifest["dtype"]).eval()
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        manifest["bytes"] = size_on_disk(Path(tmp))
        manifest["source_bytes"] = _source_bytes(model_dir)
        write_text_atomic(Path(tmp) / EXPORT_MANIFEST, json.dumps(manifest, indent=2))
        write_text_atomic(Path(tmp) / "README.md", render_card(ec.name or out.name, manifest, run_dir))
        install_dir(tmp, out)
    say(f"wrote {out}: {manifest['bytes']:,} bytes ({manifest['bytes'] / max(manifest['source_bytes'], 1):.2f}x the source weights) "
        f"in {time.time() - t0:.1f}s")
    record = new_record(
        cfg, "export", out,
        inputs={"model": source_hash,
                "data_fingerprint": load_manifest(cfg.prepared_dir).get("fingerprint") if manifest["calibration_rows"] else None},
        outputs={"model": model_identity(out)["hash"], "artifacts": artifact_hashes(out, [EXPORT_MANIFEST, "config.json"])},
        metrics={"bytes": manifest["bytes"], "size_ratio": manifest["bytes"] / max(manifest["source_bytes"], 1)},
        export=manifest,
    )
    finish_stage(cfg, record)
    if ec.name:
        from distillery.registry.store import Registry

        version = Registry(cfg.registry.path, mlflow_uri=cfg.registry.mlflow_uri).register(
            ec.name, str(out), run_id=record["run_id"], model_hash=record["outputs"]["model"], alias=ec.alias)
        say(f"registered {ec.name} version {version}" + (f", alias {ec.alias}" if ec.alias else "") + f" in {cfg.registry.path}")
    return 0
