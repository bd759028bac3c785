"""How the model is laid out over the workers, and the collectives the loop needs.

FSDP2 (`fully_shard` per decoder layer, then the root), DDP, or one unwrapped model; sums
all-reduced across workers; gradients of modules outside the wrapper averaged by hand; the global
gradient norm clipped over sharded (DTensor) gradients too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from distillery.config import Config
from distillery.models.structure import decoder_layers


def wrap_model(model, cfg: Config, device: torch.device, world: int):
    """FSDP2 (per decoder layer, then root), DDP, or the bare model."""
    strategy = cfg.train.strategy
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = None
        if device.type == "cuda" and cfg.train.precision != "fp32":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=mp) if mp else fully_shard(layer)
        fully_shard(model, mp_policy=mp) if mp else fully_shard(model)
        return model
    if strategy == "ddp" and world > 1:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def unwrap(model):
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce_sums(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def sync_extra_grads(extra: list[torch.nn.Parameter], world: int) -> None:
    """Average the gradients of modules that live outside FSDP/DDP (e.g. distillation projections)."""
    if world == 1 or not extra:
        return
    for p in extra:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


def clip_grads(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """Clip the global gradient norm (sharded DTensor grads included); returns the norm before clipping."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
