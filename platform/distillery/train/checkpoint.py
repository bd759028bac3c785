"""What a training run keeps on disk: its position (`TrainState`), sharded checkpoints, the
metrics log, and the exported model (docs/architecture.md, "Run directory").

Checkpoints go through torch.distributed.checkpoint (model + optimiser, sharded like the model),
with the scheduler and data position (rank 0) and every rank's RNG beside them, so a replaced
worker group or a re-run continues exactly where it stopped. Every file a reader may see is
written to a temporary name first and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

from distillery.config import Config
from distillery.files import write_text_atomic
from distillery.models.load import load_causal_lm, resolve_model_dir
from distillery.models.plan import ParamPlan
from distillery.train.parallel import unwrap


@dataclass
class TrainState:
    """Where training is; saved with every checkpoint."""

    step: int = 0  # optimiser steps done
    epoch: int = 0  # passes over the training shard started
    micro_in_epoch: int = 0  # micro-batches consumed in the current epoch (the data position)
    best_val: float = math.inf
    bad_evals: int = 0  # evaluations since val loss last improved
    evaluations: int = 0  # evaluations done (ASHA's time unit in tune trials)
    nonfinite_in_row: int = 0  # latest consecutive steps skipped for a non-finite loss or gradient norm
    last_val: dict | None = None


@dataclass
class ExtraState:
    """Trainable modules outside the model (e.g. feature projections), with their own optimiser and
    schedule: DCP maps optimiser state to the model's parameter names, so these cannot share the
    model's optimiser. They are replicated on every rank (their gradients are all-reduced) and
    saved whole by rank 0."""

    modules: list[torch.nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: Any

    FILE = "extra_modules.pt"

    def state_dict(self) -> dict[str, Any]:
        return {"modules": [m.state_dict() for m in self.modules], "optim": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        for module, sd in zip(self.modules, saved["modules"], strict=True):
            module.load_state_dict(sd)
        self.optimizer.load_state_dict(saved["optim"])
        self.scheduler.load_state_dict(saved["scheduler"])


def save_checkpoint(directory: str, model, optimizer, scheduler, state: TrainState, rank: int, extra: ExtraState | None = None) -> None:
    """Sharded model + optimiser through DCP; scheduler, data position and extra modules (rank 0)
    and RNG (every rank) beside it."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(directory, "dcp"))
    save_file({"cpu": torch.get_rng_state()}, os.path.join(directory, f"rng_rank{rank}.safetensors"))
    if rank == 0:
        with open(os.path.join(directory, "trainer_state.json"), "w") as f:
            json.dump({**asdict(state), "scheduler": scheduler.state_dict()}, f, default=str)
        if extra is not None:
            torch.save(extra.state_dict(), os.path.join(directory, ExtraState.FILE))


def load_checkpoint(directory: str, model, optimizer, scheduler, rank: int, extra: ExtraState | None = None) -> TrainState:
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state_dict = {"model": msd, "optim": osd}
    dcp.load(state_dict, checkpoint_id=os.path.join(directory, "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"])
    if extra is not None:
        extra.load_state_dict(torch.load(os.path.join(directory, ExtraState.FILE), weights_only=False))
    rng = os.path.join(directory, f"rng_rank{rank}.safetensors")
    if os.path.exists(rng):
        torch.set_rng_state(load_file(rng)["cpu"])
    with open(os.path.join(directory, "trainer_state.json")) as f:
        saved = json.load(f)
    scheduler.load_state_dict(saved.pop("scheduler"))
    saved["best_val"] = float(saved["best_val"])
    return TrainState(**saved)


def save_weights(model, out: str, rank: int, tokenizer=None, extra: dict[str, Any] | None = None) -> bool:
    """Gather full weights (a collective: every rank calls it; FSDP shards come to rank 0 on CPU) and
    let rank 0 write `out` in Hugging Face format (a PEFT adapter for LoRA), atomically, with the
    tokenizer and `extra` as distillery_run.json when given. True on the rank that wrote."""
    import shutil

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return False
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    unwrap(model).save_pretrained(tmp, state_dict=full, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if extra is not None:
        with open(os.path.join(tmp, "distillery_run.json"), "w") as f:
            json.dump(extra, f, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return True


def export_model(model, tokenizer, cfg: Config, rank: int, plan: ParamPlan) -> None:
    """Gather full weights (a collective) and let rank 0 write `<output_dir>/model` in HF format, atomically."""
    import shutil

    run = {"method": plan.kind, "parameters": plan.total, "trainable_parameters": plan.trainable}
    out = os.path.join(cfg.output_dir, "model")
    if not save_weights(model, out, rank, tokenizer, run):
        return
    if plan.kind == "lora" and cfg.method.lora.merge:
        from peft import PeftModel

        base = load_causal_lm(resolve_model_dir(cfg.model.path), dtype="float32")
        merged = PeftModel.from_pretrained(base, out).merge_and_unload()
        mtmp, mout = os.path.join(cfg.output_dir, "merged.tmp"), os.path.join(cfg.output_dir, "merged")
        shutil.rmtree(mtmp, ignore_errors=True)
        merged.save_pretrained(mtmp, safe_serialization=True)
        tokenizer.save_pretrained(mtmp)
        shutil.rmtree(mout, ignore_errors=True)
        os.replace(mtmp, mout)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A line that does not parse (the last one cut short by a full
    disk or a kill) is skipped, not fatal: every earlier record is still good."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class MetricsLog:
    """`<output_dir>/metrics.jsonl` (rank 0): one JSON line per step and per evaluation."""

    def __init__(self, cfg: Config, rank: int, resume_step: int):
        self.path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.enabled = rank == 0
        if self.enabled and os.path.exists(self.path):
            # Records past the restored step came from an attempt that did not reach its next checkpoint.
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
