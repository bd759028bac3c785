"""`distillery finetune`: supervised fine-tuning on Ray Train (full, LoRA or layer freezing).

    distillery finetune jobs/finetune.yaml train.num_workers=2 method.kind=lora

Reads the prepared splits (`data.prepared`), trains `model.path` with `method.kind`, and writes the
run directory `output_dir`: config.yaml, metrics.jsonl, checkpoints under ray/, and the model in
Hugging Face format under model/ (full weights, or a PEFT adapter recording its base model).
"""

from __future__ import annotations

from distillery.config import Config
from distillery.train.trainer import run_training


def run_finetune(cfg: Config) -> int:
    return run_training(cfg, "finetune")
