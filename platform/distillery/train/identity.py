"""Run identity: what a run directory's checkpoints were trained from, so a re-run resumes only its own run.

Re-running a training stage with the same `output_dir` resumes from the last checkpoint. That is
right for the same run (a killed job, Ctrl-C) and wrong for anything else: another stage, other
data, another student or teacher, or settings that change what is learned (lr, method, loss...)
would continue someone else's optimiser state and LR schedule. Each run writes
`<output_dir>/run_identity.json`; before a resume the new identity is compared with it and a
difference is refused, naming what changed (`train.resume: fresh` starts over, `force` resumes anyway).

Keys that do not change what a step computes (where checkpoints go, how often to evaluate, how to
serve or evaluate afterwards) are resume-neutral and left out.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from distillery.config import Config, ConfigError
from distillery.data.splits import load_manifest
from distillery.models.load import model_identity, teachers_identity
from distillery.train.method import TrainingMethod

IDENTITY_FILE = "run_identity.json"

# Dotted keys (or whole sections) that do not change what the run learns.
RESUME_NEUTRAL = (
    "output_dir", "serve", "eval", "tune", "export", "registry",
    "data.sources", "data.augment", "data.dedupe", "data.mix_by", "data.mix_strategy", "data.chat_template",
    "data.packing", "data.window", "data.balance", "data.min_length", "data.val_fraction", "data.test_fraction", "data.prepared",
    "model.path", "model.teacher", "model.teachers", "model.tokenizer",  # by content below, not by path
    "distill.cache", "distill.cache_backend", "distill.cache_batch_size", "distill.cache_actors",
    "train.max_failures", "train.trace_rows", "train.keep_checkpoints", "train.checkpoint_every", "train.eval_every",
    "train.early_stopping_patience", "train.max_nonfinite_steps", "train.resume", "train.worker_resources",
    "train.cpus_per_worker",  # where and on how many threads, not what: auto resolves per machine
)

# What a fresh start removes from a run directory (everything a training run writes there).
RUN_OUTPUTS = ("ray", "metrics.jsonl", "model", "merged", "merges", "run.json", "trace", "ewc.safetensors", "esft_experts.json", "curriculum.json", IDENTITY_FILE)


def _neutral(dotted: str) -> bool:
    return any(dotted == n or dotted.startswith(n + ".") for n in RESUME_NEUTRAL)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if _neutral(dotted):
            continue
        if isinstance(value, dict) and value:
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def run_identity(cfg: Config, method: TrainingMethod) -> dict[str, Any]:
    """The identity of the run `cfg` describes: stage, the settings that change what it learns (and
    their hash), the prepared data's fingerprint, the student's content hash and the method's own
    inputs (e.g. the teacher's)."""
    settings = _flatten(cfg.model_dump(mode="json", by_alias=True))
    return {
        "stage": method.name,
        "config_sha256": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(),
        "data_fingerprint": load_manifest(cfg.prepared_dir).get("fingerprint"),
        "model": model_identity(cfg.model.path)["hash"],
        **method.identity(cfg),
        # The curriculum's order follows the teacher's losses: another teacher, another order.
        **({"curriculum_teacher": teachers_identity(cfg.model.teacher_specs)}
           if cfg.train.curriculum and cfg.train.curriculum.by == "teacher_loss" else {}),
        "settings": settings,
    }


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changes = []
    for key in sorted(set(old) | set(new)):
        if key in ("settings", "config_sha256"):
            continue
        if old.get(key) != new.get(key):
            changes.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    before, after = old.get("settings", {}), new.get("settings", {})
    # A setting newer than the old run's identity, left at its default, changes nothing it learned:
    # upgrading Distillery must not make every earlier run unresumable.
    defaults = _flatten(Config().model_dump(mode="json", by_alias=True))
    for key in sorted(set(before) | set(after)):
        if key not in before and key in defaults and after[key] == defaults[key]:
            continue
        if _neutral(key):  # recorded by an older version, before the key became resume-neutral
            continue
        if before.get(key) != after.get(key):
            changes.append(f"{key}: {before.get(key)!r} -> {after.get(key)!r}")
    return changes


def has_checkpoints(out: Path) -> bool:
    """Whether Ray Train would resume in this run directory."""
    storage = out / "ray" / "train"
    return storage.is_dir() and any(p.is_dir() and p.name.startswith("checkpoint_") for p in storage.iterdir())


def check_resume(cfg: Config, method: TrainingMethod) -> str:
    """Decide, before Ray starts, what a run in `cfg.output_dir` does: "new", "resume" (same identity)
    or "fresh" (previous outputs removed); raise ConfigError when checkpoints of another run are
    there. Writes the run's identity."""
    out = Path(cfg.output_dir).resolve()
    new = run_identity(cfg, method)
    path = out / IDENTITY_FILE
    old = json.loads(path.read_text()) if path.exists() else None
    decision = "new"
    if has_checkpoints(out):
        if cfg.train.resume == "fresh":
            for name in RUN_OUTPUTS:
                target = out / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            decision = "fresh"
        elif cfg.train.resume == "force":
            decision = "resume"
        elif old is None:
            raise ConfigError(
                f"output_dir: '{out}' holds checkpoints of a run with no {IDENTITY_FILE}, so what it trained is unknown; "
                f"use another output_dir, or set train.resume=fresh to start over there or train.resume=force to resume it"
            )
        else:
            changes = _differences(old, new)
            if changes:
                raise ConfigError(
                    f"output_dir: '{out}' holds checkpoints of another run; resuming would continue its weights, optimiser and "
                    "LR schedule. What changed:\n    " + "\n    ".join(changes) + "\n  Use another output_dir, or set "
                    "train.resume=fresh to start over there (its checkpoints, metrics and model are deleted), or "
                    "train.resume=force to resume anyway."
                )
            decision = "resume"
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(new, indent=2, default=str))
    os.replace(tmp, path)
    return decision
