"""The seam between the training loop and a training method (docs/architecture.md, "Training methods").

`run_training`, `build_trainer`, every tune trial and the per-worker loop receive one
`TrainingMethod` object and ask it what differs between methods: what to check before Ray
starts, which Ray Datasets to stream, which objective computes a batch's loss, and what else the
run's result depends on (its identity).
Everything else (model loading, parameter plan, wrapping, optimiser, checkpoints, export) is the
same loop for every method. A new method (on-policy distillation, DPO, ...) is one more class
with these members, not a branch on a stage name in generic code.

Methods are module-level singletons (`FINETUNE` in train/finetune.py, `DISTILL` in
distill/method.py): they hold no state and reach the Ray Train workers pickled by reference.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from distillery.config import Config
from distillery.data.splits import read_split
from distillery.train.objective import Objective

TRAIN_COLUMNS = ["row_id", "input_ids", "labels"]


class TrainingMethod(Protocol):
    """One training method: finetune, distill, ..."""

    name: str
    """Its stage name: progress lines, `run.json` and the CLI command say it."""

    def validate(self, cfg: Config) -> None:
        """Method-specific checks that need no Ray (teacher present, cache matches, ...); raise ConfigError."""

    def datasets(self, cfg: Config) -> dict[str, Any]:
        """The Ray Datasets the workers stream: {"train": ..., "val": ...}, with the objective's columns."""

    def build_objective(self, cfg: Config, tokenizer, model, device: torch.device) -> Objective:
        """The objective, built on each worker after the parameter plan and before the model is wrapped."""

    def attn_implementation(self, cfg: Config) -> str | None:
        """The transformers attention kernel the student loads with (None: the library's default)."""

    def engine_cpus(self, cfg: Config) -> float:
        """Logical CPUs the method's own actors hold beside the training workers (the on-policy
        sampling engines); the local Ray a run starts, and tune's trial concurrency, count them."""

    def teachers(self, cfg: Config) -> list[str]:
        """Content hashes of the models the run learns from besides the student (each teacher's own),
        for the lineage record (registry/record.py)."""

    def identity(self, cfg: Config) -> dict[str, str]:
        """What the run learns from besides the student, the prepared data and the config (content
        hashes, e.g. the teacher's): part of the run identity a resume must match (train/identity.py)."""


def prepared_datasets(cfg: Config, columns: list[str] = TRAIN_COLUMNS) -> dict[str, Any]:
    """The prepared train and val splits (`data.prepared`), streamed with `columns`."""
    return {split: read_split(cfg.prepared_dir, split, columns) for split in ("train", "val")}
