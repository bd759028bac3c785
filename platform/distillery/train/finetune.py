"""`distillery finetune`: supervised fine-tuning on Ray Train (full, LoRA or layer freezing).

    distillery finetune jobs/finetune.yaml train.num_workers=2 method.kind=lora

Reads the prepared splits (`data.prepared`), trains `model.path` with `method.kind`, and writes the
run directory `output_dir`: config.yaml, metrics.jsonl, checkpoints under ray/, and the model in
Hugging Face format under model/ (full weights, or a PEFT adapter recording its base model).
The loss is token cross-entropy on response tokens, optionally up-weighting `train.key_terms`,
plus an EWC penalty when `train.ewc.lam` > 0 and, for MoE models, the router load-balancing loss.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from distillery.config import Config, ConfigError
from distillery.data.splits import load_manifest, split_dir
from distillery.train.ewc import EwcPenalty, estimate_fisher, previous_rows
from distillery.train.method import prepared_datasets
from distillery.train.objective import CrossEntropyObjective, router_aux_coef
from distillery.train.run import run_training


class Finetune:
    """Supervised fine-tuning: the `TrainingMethod` of `distillery finetune`."""

    name = "finetune"

    def validate(self, cfg: Config) -> None:
        validate_ewc(cfg)

    def datasets(self, cfg: Config) -> dict[str, Any]:
        return prepared_datasets(cfg)

    def build_objective(self, cfg: Config, tokenizer, model, device: torch.device) -> CrossEntropyObjective:
        return CrossEntropyObjective(cfg, tokenizer, build_ewc(cfg, model, tokenizer), router_aux_coef(cfg, model))

    def attn_implementation(self, cfg: Config) -> str | None:
        return cfg.model.attn_implementation

    def engine_cpus(self, cfg: Config) -> float:
        return 0.0

    def teachers(self, cfg: Config) -> list[str]:
        return []

    def identity(self, cfg: Config) -> dict[str, str]:
        # EWC's Fisher comes from the previous task's data.
        return {"ewc_previous": load_manifest(cfg.train.ewc.previous).get("fingerprint")} if cfg.train.ewc.lam > 0 else {}


FINETUNE = Finetune()


def validate_ewc(cfg: Config) -> None:
    """EWC needs the previous task's prepared train split (its Fisher is estimated there)."""
    if cfg.train.ewc.lam <= 0:
        return
    if not cfg.train.ewc.previous:
        raise ConfigError("train.ewc.previous: set the prepared data directory of the previous task (EWC with lambda > 0 needs it)")
    if not os.path.isdir(split_dir(cfg.train.ewc.previous, "train")):
        raise ConfigError(f"train.ewc.previous: no prepared train split at '{split_dir(cfg.train.ewc.previous, 'train')}'")


def build_ewc(cfg: Config, model, tokenizer) -> EwcPenalty | None:
    """The EWC penalty of this run: stored with the run on first use, so a resumed run reuses the same Fisher."""
    if cfg.train.ewc.lam <= 0:
        return None
    path = os.path.join(cfg.output_dir, "ewc.safetensors")
    if os.path.exists(path):
        return EwcPenalty.load(cfg.train.ewc.lam, path)
    ewc = EwcPenalty(cfg.train.ewc.lam, *estimate_fisher(model, previous_rows(cfg), tokenizer.pad_token_id))
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        ewc.save(path)
    return ewc


def run_finetune(cfg: Config) -> int:
    return run_training(cfg, FINETUNE)
