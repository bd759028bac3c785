"""How the model is laid out over the workers, and the collectives the loop needs.

FSDP2 (`fully_shard` per decoder layer, then the root), DDP, or one unwrapped model; the
numerics of `train.precision` (`Precision`); sums all-reduced across workers; gradients of modules
outside the wrapper averaged by hand; the global gradient norm clipped over sharded (DTensor)
gradients too.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from distillery.config import Config
from distillery.models.structure import decoder_layers

# Compute dtype of the mixed modes; their weights (the optimiser's master copy) stay float32.
MIXED = {"bf16": torch.bfloat16, "fp16": torch.float16}


def precision_mode(cfg: Config) -> str:
    """`train.precision` with `auto` resolved: bf16 mixed precision on GPU, fp32 on CPU (where a
    bf16 GEMM runs slower than an fp32 one; docs/architecture.md)."""
    if cfg.train.precision == "auto":
        return "bf16" if cfg.train.use_gpu else "fp32"
    return cfg.train.precision


def weights_dtype(cfg: Config) -> str:
    """The dtype the trained model is loaded and kept in, i.e. the parameters the optimiser updates:
    float32 in every mode but `bf16-pure`. Mixed modes compute in bf16/fp16 from these fp32 weights,
    so an update smaller than a bf16 step is kept instead of rounded away. `model.dtype` does not
    apply here: it is the dtype of the frozen and inference copies (teacher cache, engines)."""
    return "bfloat16" if precision_mode(cfg) == "bf16-pure" else "float32"


def mixed_precision_policy(cfg: Config):
    """FSDP2's policy for the mixed modes: parameters all-gathered and computed in bf16 (fp16),
    gradients reduce-scattered in fp32 into the fp32 shards. It works on CPU with gloo too (checked
    with torch 2.13: bf16 and fp16 all-gathers, fp32 reduce-scatter). None in fp32 and bf16-pure."""
    compute = MIXED.get(precision_mode(cfg))
    if compute is None:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)


class Precision:
    """How one worker computes under `train.precision`, as the loop uses it.

    fsdp: the mixed dtypes come from the FSDP2 policy (`wrap_model`); ddp and none run the forward
    under `torch.autocast` (DDP then all-reduces the fp32 gradients of the fp32 weights). fp16 scales
    the loss (`GradScaler`; FSDP's sharded one, which agrees on overflow across ranks) and unscales
    before clipping; a step whose scaled gradients overflowed is skipped and the scale lowered.
    """

    def __init__(self, cfg: Config, device: torch.device):
        self.mode = precision_mode(cfg)
        self.compute_dtype = MIXED.get(self.mode)
        self.device_type = device.type
        self.use_autocast = self.compute_dtype is not None and cfg.train.strategy != "fsdp"
        self.scaler = None
        if self.mode == "fp16":
            if cfg.train.strategy == "fsdp":
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

                self.scaler = ShardedGradScaler(device=device.type)
            else:
                self.scaler = torch.amp.GradScaler(device.type)

    def autocast(self):
        """The context a forward (training or evaluation) runs in."""
        if not self.use_autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """Bring scaled gradients back to their true values (before clipping or adding to them)."""
        if self.scaler:
            for opt in optimizers:
                self.scaler.unscale_(opt)

    def step(self, optimizers: list[torch.optim.Optimizer]) -> None:
        for opt in optimizers:
            self.scaler.step(opt) if self.scaler else opt.step()

    def update(self) -> None:
        """Once per optimiser step, taken or skipped: the scaler lowers its scale after an overflow
        and raises it after a run of clean steps."""
        if self.scaler:
            self.scaler.update()

    def scale(self) -> float | None:
        return float(self.scaler.get_scale()) if self.scaler else None


def fsdp_kwargs(cfg: Config) -> dict:
    """Keyword arguments of every `fully_shard` call: the mixed-precision policy of `train.precision`
    and, with `train.cpu_offload`, FSDP2's `CPUOffloadPolicy` (shards, gradients and the optimiser
    step in host memory; each layer's parameters copied to the GPU for its forward and backward)."""
    kwargs = {}
    mp = mixed_precision_policy(cfg)
    if mp is not None:
        kwargs["mp_policy"] = mp
    if cfg.train.cpu_offload:
        from torch.distributed.fsdp import CPUOffloadPolicy

        kwargs["offload_policy"] = CPUOffloadPolicy()
    return kwargs


def shard_device(cfg: Config, device: torch.device) -> torch.device:
    """Where FSDP keeps the parameter shards: host memory under `train.cpu_offload`, else `device`."""
    return torch.device("cpu") if cfg.train.cpu_offload else device


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward pass (Hugging Face gradient checkpointing,
    non-reentrant), on the unwrapped model before FSDP/DDP wraps it.

    Non-reentrant checkpointing works under FSDP2 (the recomputation re-runs the layer's all-gather
    hooks) and DDP, and needs no input that requires grad; the input-embedding hook is still set
    for a PEFT model, whose frozen embeddings would otherwise hand the first layer an input
    without grad (harmless when unneeded)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "get_base_model"):
        model.enable_input_require_grads()


def wrap_model(model, cfg: Config, device: torch.device, world: int):
    """FSDP2 (per decoder layer, then root; `fsdp_kwargs`: precision policy, CPU offload), DDP, or
    the bare model."""
    strategy = cfg.train.strategy
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        kwargs = fsdp_kwargs(cfg)
        for layer in decoder_layers(model):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
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
