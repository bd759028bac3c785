"""Sharded loading under FSDP2: build the model on the meta device, shard it, then read each rank's
rows only from the safetensors checkpoint.

The whole-model load has every worker hold the full weights in host memory before `fully_shard`
frees all but its shard; with a model near the host's size that is the step that runs out of memory.
Here each parameter is first a meta tensor (no storage), `fully_shard` turns it into a DTensor
sharded on dim 0 over the mesh, `to_empty` allocates only the local shard, and
`safe_open(...).get_slice(name)[a:b]` reads just rows [a, b) of the checkpoint tensor into it. Every
rank therefore reads about 1/world of the checkpoint's bytes (`LoadStats`).

Not in the checkpoint, so recomputed: the non-persistent buffers (RoPE `inv_freq`), taken from a CPU
instance of each module that holds them, built from the model config before sharding. Tied
embeddings stay tied: `fully_shard` keeps one sharded parameter for the pair and `to_empty` resets
it in place; `materialize` checks it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distillery.config import Config


@dataclass
class LoadStats:
    """Bytes of checkpoint tensor data this rank read, and the checkpoint's total."""

    bytes_read: int
    checkpoint_bytes: int

    @property
    def fraction(self) -> float:
        return self.bytes_read / self.checkpoint_bytes if self.checkpoint_bytes else 0.0


def fallback_reason(cfg: Config, model_dir: Path, world: int, role: str = "student") -> str | None:
    """Why `model_dir` is loaded whole on every worker instead (None: sharded loading applies).

    Applies to strategy fsdp with more than one worker and full-weight safetensors checkpoints; the
    student also needs method full or freeze (LoRA wraps the model with PEFT, ESFT measures experts
    on the loaded model) and no QAT (swaps linear classes)."""
    from distillery.models.load import adapter_base, is_w8a8

    if cfg.train.strategy != "fsdp":
        return f"strategy {cfg.train.strategy} keeps whole weights on every worker"
    if world < 2:
        return "one worker holds the whole model anyway"
    if adapter_base(model_dir) is not None:
        return "a PEFT adapter checkpoint"
    if is_w8a8(model_dir):
        return "a W8A8 (int8) checkpoint"
    if not _weight_files(model_dir):
        return "no safetensors weights"
    if role == "student":
        if cfg.method.kind not in ("full", "freeze"):
            return f"method {cfg.method.kind} needs the loaded model"
        if cfg.train.qat:
            return "QAT swaps the linear layers"
    return None


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it (sharded or single-file checkpoints)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.exists():
        return {}
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


@dataclass
class MetaModel:
    """A model on the meta device, waiting for `fully_shard` and then `materialize`."""

    model: torch.nn.Module
    model_dir: Path
    files: dict[str, Path]
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # non-persistent buffers, computed on CPU

    def materialize(self, device: torch.device) -> LoadStats:
        """Allocate the (sharded) parameters on `device` and fill each rank's shard from the checkpoint."""
        self.model.to_empty(device=device)
        stats = fill_from_checkpoint(self.model, self.files)
        with torch.no_grad():
            named = dict(self.model.named_buffers())
            for name, value in self.buffers.items():
                named[name].copy_(value)
        out = getattr(self.model, "get_output_embeddings", lambda: None)()
        inp = getattr(self.model, "get_input_embeddings", lambda: None)()
        if getattr(self.model.config, "tie_word_embeddings", False) and out is not None and inp is not None:
            if out.weight is not inp.weight:  # re-tie (also shares the shard just read)
                out.weight = inp.weight
        return stats


def build_on_meta(model_dir: Path, dtype: torch.dtype, **kwargs) -> MetaModel | str:
    """The model of `model_dir` on the meta device (no weights read), or a one-line reason why it
    cannot be loaded sharded (its parameter names do not match the checkpoint's, or a module with
    non-persistent buffers cannot be rebuilt from the config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    files = _weight_files(model_dir)
    params = dict(model.named_parameters(remove_duplicate=False))
    in_checkpoint = {id(p) for n, p in params.items() if n in files}
    tied = {n for n, p in params.items() if n not in files and id(p) in in_checkpoint}  # e.g. a tied lm_head
    missing = sorted(set(model.state_dict().keys()) - set(files) - tied)
    if missing:
        return f"parameters not found by name in the checkpoint (e.g. {missing[0]})"
    buffers: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        transient = getattr(module, "_non_persistent_buffers_set", set())
        if not transient:
            continue
        if not hasattr(module, "config"):
            return f"cannot recompute the buffers {sorted(transient)} of {type(module).__name__}"
        try:
            with torch.device("cpu"):
                fresh = type(module)(module.config)
        except Exception as e:  # noqa: BLE001 - a constructor that wants more than the config: load whole
            return f"cannot recompute the buffers {sorted(transient)} of {type(module).__name__} ({type(e).__name__})"
        for name in transient:
            buffers[f"{prefix}.{name}" if prefix else name] = getattr(fresh, name).detach().clone()
    return MetaModel(model, model_dir, files, buffers)


def local_slices(tensor: torch.Tensor) -> tuple[slice, ...]:
    """The index of this rank's local shard within the global tensor: one slice per dimension.

    For a DTensor, from its placements (`compute_local_shape_and_global_offset`; FSDP2 shards dim 0
    in `torch.chunk` pieces, so rank r of W holds rows [r·ceil(N/W), min(N, (r+1)·ceil(N/W))));
    for a plain tensor, the whole of it."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tuple(slice(0, n) for n in tensor.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def fill_from_checkpoint(model: torch.nn.Module, files: dict[str, Path]) -> LoadStats:
    """Copy into every parameter and persistent buffer of `model` (already on its device, sharded or
    not) its local rows from the safetensors `files` (tensor name -> file); returns the bytes read."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    by_file: dict[Path, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in files:
            by_file.setdefault(files[name], []).append((name, tensor))
    read, total, seen = 0, 0, set()
    with torch.no_grad():
        for path in sorted(set(files.values())):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    total += _numel(sl.get_shape()) * _itemsize(sl.get_dtype())
                for name, tensor in by_file.get(path, []):
                    if id(tensor) in seen:  # tied weights saved under both names: read once
                        continue
                    seen.add(id(tensor))
                    index = local_slices(tensor)
                    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
                    if local.numel() == 0:
                        continue
                    rows = f.get_slice(name)[index]  # reads only these bytes of the file
                    local.copy_(rows.to(local.dtype))
                    read += rows.numel() * rows.element_size()
    return LoadStats(read, total)


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1}


def _itemsize(dtype: str) -> int:
    return _ITEMSIZE.get(dtype, 4)


def frozen_model(model_dir: Path, cfg: Config, dtype: str, device: torch.device, **kwargs) -> tuple[torch.nn.Module, MetaModel | None]:
    """A frozen model (an online teacher) in eval mode: on the meta device when sharded loading
    applies (the caller `fully_shard`s it, then calls the returned `MetaModel.materialize`), else
    loaded whole onto `device` (second item None)."""
    import torch.distributed as dist

    from distillery.models.load import load_causal_lm, torch_dtype

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    built = None
    if fallback_reason(cfg, model_dir, world, role="teacher") is None:
        built = build_on_meta(model_dir, torch_dtype(dtype, cfg.train.use_gpu), **kwargs)
    if isinstance(built, MetaModel):
        return built.model.eval().requires_grad_(False), built
    return load_causal_lm(model_dir, dtype=dtype, **kwargs).eval().requires_grad_(False).to(device), None
