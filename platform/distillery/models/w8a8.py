"""INT8 W8A8 post-training quantisation, written as a compressed-tensors checkpoint vLLM serves.

The directory holds, for every quantizable linear (`quant.quantizable_linears`), `<name>.weight`
int8 [out, in] and `<name>.weight_scale` float32 [out, 1]; every other tensor (embeddings, norms,
biases, `lm_head`) stays floating point. `config.json` carries a compressed-tensors
`quantization_config` ("int-quantized", channel-wise static weights, dynamic per-token symmetric
inputs) that vLLM maps to its `CompressedTensorsW8A8Int8` scheme on CPU and GPU.

Weight clipping may be calibrated: per output channel, the clip ratio that minimises the output
error on captured inputs, the inputs themselves int8-quantised per token as at inference.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from distillery.models.quant import (
    QuantizedWeightLinear,
    dequantize,
    fake_quant_activation,
    quantize_per_channel,
    quantizable_linears,
)
from distillery.files import install_dir, removed_on_failure
from distillery.models.structure import num_experts

WEIGHTS_FILE = "model.safetensors"
SCALE_SUFFIX = ".weight_scale"
DEFAULT_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)

Batch = torch.Tensor | dict[str, torch.Tensor]


# --------------------------------------------------------------------------- the config vLLM reads


def quantization_config(ignore: Sequence[str]) -> dict[str, Any]:
    """The `quantization_config` of config.json for the W8A8 int8 scheme.

    Only long-standing QuantizationArgs fields are written: compressed-tensors validates them with
    extra fields forbidden, and a serving host may run an older release than the one exporting.
    """
    common = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "block_structure": None, "actorder": None, "observer_kwargs": {}}
    weights = {**common, "strategy": "channel", "dynamic": False, "observer": "minmax"}
    inputs = {**common, "strategy": "token", "dynamic": True, "observer": None}
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        # "Linear" matches vLLM's fused QKV / gate-up and row-parallel layers by class name.
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": inputs, "output_activations": None}},
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


# --------------------------------------------------------------------------- calibration


def _as_batch(batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict) and "input_ids" in batch:
        return batch["input_ids"], batch.get("attention_mask")
    raise ValueError(f"calibration batches: expected LongTensor input_ids [B, T] or a dict with input_ids, got {type(batch).__name__}")


def _even_rows(n: int, k: int) -> torch.Tensor:
    """k row indices spread evenly over [0, n) (all of them when k ≥ n): deterministic, and
    covering early and late positions alike."""
    if k >= n:
        return torch.arange(n)
    return torch.linspace(0, n - 1, k).round().long()


def _capture_inputs(model: nn.Module, linears: list[tuple[str, nn.Linear]], batches: Sequence[Batch], max_tokens: int) -> dict[str, torch.Tensor]:
    """Per linear, up to `max_tokens` rows [N, in] of its inputs over the batches (padding excluded)."""
    per_batch = max(1, math.ceil(max_tokens / len(batches)))
    rows: dict[str, list[torch.Tensor]] = {name: [] for name, _ in linears}
    state: dict[str, Any] = {"mask": None, "last": None}

    def hook(name: str):
        def record(_module, inputs):
            x = inputs[0]
            last = state["last"]
            # q/k/v (and gate/up) read the same tensor: keep one copy for all of them. Holding the
            # last input alive keeps the identity test sound.
            if last is not None and last[0] is x:
                rows[name].append(last[1])
                return
            flat = x.detach().reshape(-1, x.shape[-1])
            mask = state["mask"]
            if mask is not None and mask.numel() == flat.shape[0]:
                flat = flat[mask.to(flat.device)]
            kept = flat[_even_rows(flat.shape[0], per_batch).to(flat.device)].clone()
            state["last"] = (x, kept)
            rows[name].append(kept)
        return record

    device = next(model.parameters()).device
    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                ids, mask = _as_batch(batch)
                state["mask"] = mask.reshape(-1).bool() if mask is not None else None
                kwargs = {"attention_mask": mask.to(device)} if mask is not None else {}
                model(input_ids=ids.to(device), use_cache=False, **kwargs)
                state["last"] = None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: torch.cat(r)[:max_tokens] for name, r in rows.items() if r}


def _output_errors(x: torch.Tensor, weight: torch.Tensor, clips: Sequence[float]) -> torch.Tensor:
    """[C, out]: ||x · (w − deq(q(w, clip)))ᵀ||² per output channel for each clip ratio.

    x: float32 [N, in]; weight: [out, in]. With more rows than inputs, the Gram matrix xᵀx [in, in]
    makes each candidate cost out·in² instead of N·in·out.
    """
    w = weight.detach().float()
    gram = x.T @ x if x.shape[0] > x.shape[1] else None
    errs = []
    for c in clips:
        q, scale = quantize_per_channel(w, torch.full((w.shape[0],), c, device=w.device))
        e = w - dequantize(q, scale)  # [out, in]
        errs.append(((e @ gram) * e).sum(1) if gram is not None else (x @ e.T).pow(2).sum(0))
    return torch.stack(errs)


def calibrate_clips(
    model: nn.Module,
    linears: list[tuple[str, nn.Linear]],
    batches: Sequence[Batch],
    grid: Sequence[float] = DEFAULT_GRID,
    max_tokens: int = 4096,
) -> dict[str, torch.Tensor]:
    """Per-output-channel weight clip ratios {linear name: float32 [out]} chosen from `grid`.

    Runs the model over `batches` (LongTensor input_ids [B, T], or dicts with input_ids and
    attention_mask [B, T]; padded positions are skipped), captures each linear's inputs (at most
    `max_tokens` rows, spread evenly over the batches), fake-quantises them per token as vLLM
    will, and keeps, per output channel, the ratio with the smallest squared output error.
    Ratio 1.0 (plain round-to-nearest) is always a candidate and wins ties, so the result is never
    worse than no clipping on this objective. Deterministic.
    """
    if not batches:
        raise ValueError("batches: calibration needs at least one batch of input_ids")
    if max_tokens < 1:
        raise ValueError(f"max_tokens: must be ≥ 1, got {max_tokens}")
    if not grid or any(not 0.0 < float(c) <= 1.0 for c in grid):
        raise ValueError(f"grid: clip ratios must lie in (0, 1], got {list(grid)}")
    candidates = sorted({float(c) for c in grid} | {1.0}, reverse=True)  # argmin keeps the first: the larger ratio
    inputs = _capture_inputs(model, linears, batches, max_tokens)
    clips: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in linears:
            x = inputs.get(name)
            if x is None:  # never ran (e.g. a layer the forward skips): no evidence against clip 1
                clips[name] = torch.ones(module.out_features)
                continue
            x = fake_quant_activation(x.to(module.weight.device).float())
            best = _output_errors(x, module.weight, candidates).argmin(0).cpu()
            clips[name] = torch.tensor(candidates, dtype=torch.float32)[best]
    return clips


# --------------------------------------------------------------------------- export


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _float_tensors(model: nn.Module, quantized: set[str], tied: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every state_dict tensor that is not a quantised weight, on CPU, floating point ones in `dtype`,
    none sharing storage (safetensors refuses shared tensors); a tied lm_head is left out, as
    save_pretrained does."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in model.state_dict().items():
        if key in quantized or (tied and key.endswith("lm_head.weight")):
            continue
        t = t.detach().cpu()
        t = (t.to(dtype) if t.is_floating_point() else t).contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[key] = t
    return out


def export_w8a8(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    calibration_batches: Sequence[Batch] | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Write `model` (a dense transformers causal LM) to `out_dir` as a compressed-tensors W8A8
    int8 checkpoint with `tokenizer`'s files.

    Every quantizable linear gets int8 per-channel weights: clips from `calibrate_clips` when
    `calibration_batches` are given (input_ids [B, T] or dicts with input_ids/attention_mask), else
    round to nearest. Tensors that stay floating point are written in `dtype` (default: the model's
    own), so a model can be calibrated in float32 and stored in bfloat16. The directory appears whole
    or not at all (written beside it, then renamed); an existing one is replaced.
    Returns {layers, parameters_int8, bytes_on_disk, calibrated}.
    """
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"model: expected a transformers model with a config, got {type(model).__name__}")
    experts = num_experts(config)
    if experts > 0:
        raise ValueError(f"model: W8A8 export supports dense models; this one routes tokens to {experts} experts (num_experts / num_local_experts)")
    linears = quantizable_linears(model)
    if not linears:
        raise ValueError(f"model: {type(model).__name__} has no linear layers to quantise")
    clips = calibrate_clips(model, linears, calibration_batches) if calibration_batches else {}

    tensors: dict[str, torch.Tensor] = {}
    for name, module in linears:
        q, scale = quantize_per_channel(module.weight, clips.get(name))
        tensors[f"{name}.weight"] = q.cpu().contiguous()
        tensors[f"{name}{SCALE_SUFFIX}"] = scale.cpu().contiguous()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    float_dtype = dtype or _model_dtype(model)
    tensors.update(_float_tensors(model, set(tensors), tied, float_dtype))

    quantized = {name for name, _ in linears}
    # lm_head is always named (vLLM builds it as ParallelLMHead, not matched by "Linear", but an
    # explicit entry keeps other loaders from quantising it); so is any other linear left in float.
    ignore = ["lm_head"] + sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized and n != "lm_head")
    out_config = copy.deepcopy(config)
    out_config.quantization_config = quantization_config(ignore)
    out_config.dtype = float_dtype  # what the float tensors are stored in; vLLM's dtype "auto" reads it

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with removed_on_failure(tmp):
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        out_config.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        install_dir(tmp, out)
    return {
        "layers": len(linears),
        "parameters_int8": sum(m.weight.numel() for _, m in linears),
        "bytes_on_disk": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        "calibrated": bool(clips),
    }


# --------------------------------------------------------------------------- measurement in transformers


def load_w8a8_for_hf(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> nn.Module:
    """A transformers model computing what vLLM computes for a W8A8 export at `path`, on CPU.

    Built from config.json (its quantization_config ignored); each quantised linear holds
    dequantize(q, scale) in `dtype` and fake-quantises its input per token (QuantizedWeightLinear),
    every other tensor is loaded as stored, cast to `dtype`. Returned in eval mode.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"path: no .safetensors files in '{path}'")
    config = AutoConfig.from_pretrained(path)
    if not hasattr(config, "quantization_config"):
        raise ValueError(f"path: '{path}' has no quantization_config in config.json; load it with from_pretrained")
    del config.quantization_config  # the weights are dequantised here; no quantizer must touch the model
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    stored: dict[str, torch.Tensor] = {}
    for f in files:
        stored.update(load_file(str(f)))

    modules = dict(model.named_modules())
    state: dict[str, torch.Tensor] = {}
    swapped: list[nn.Linear] = []
    for key, t in stored.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        name = key[: -len(".weight")] if key.endswith(".weight") else None
        if name is not None and f"{name}{SCALE_SUFFIX}" in stored:
            module = modules.get(name)
            if not isinstance(module, nn.Linear):
                raise ValueError(f"path: quantised tensor '{key}' has no matching nn.Linear in {type(model).__name__}")
            state[key] = dequantize(t, stored[f"{name}{SCALE_SUFFIX}"]).to(dtype)
            swapped.append(module)
        else:
            state[key] = t.to(dtype) if t.is_floating_point() else t
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ValueError(f"path: '{path}' does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for module in swapped:
        module.__class__ = QuantizedWeightLinear
    return model.eval()
