"""The INT8 W8A8 scheme, defined once for post-training export and quantisation-aware training.

Weights: int8, symmetric, one scale per output channel (row of the [out, in] weight):
scale = clip · max|w_row| / 127, q = round(w / scale) clamped to [-127, 127].
Activations: int8, symmetric, dynamic, one scale per token (row of the flattened [N, in] input):
scale = max|x_row| / 127, q = round(x · (1 / scale)) clamped to [-128, 127], rounding half to even.

That is what vLLM's compressed-tensors `CompressedTensorsW8A8Int8` scheme (channel-wise weights,
dynamic per-token symmetric inputs) computes: its int8 kernels multiply by the reciprocal scale
and round to nearest even, then accumulate q_x · q_w in int32 and rescale by scale_x · scale_w. A
float matmul of the dequantised operands therefore reproduces an engine's output up to the float
rounding of the accumulation, which is what lets QAT train against the deployed numerics and lets
the export be measured in transformers.

`quantizable_linears` is the one list of layers both the export and QAT quantise.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

INT8_MAX = 127
# Activations may use -128 (vLLM clamps to the full int8 range); weights stay symmetric in [-127, 127].
INT8_MIN = -128


def _channel_scale(weight: torch.Tensor, clip: torch.Tensor | None) -> torch.Tensor:
    """[out, 1] float32 scales of a float32 [out, in] weight; an all-zero row gets scale 1 (its q is 0)."""
    amax = weight.abs().amax(dim=1)
    if clip is not None:
        if clip.shape != amax.shape:
            raise ValueError(f"clip: expected shape {tuple(amax.shape)} (one ratio per output channel), got {tuple(clip.shape)}")
        amax = amax * clip.to(device=amax.device, dtype=torch.float32)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    return scale.unsqueeze(1)


def quantize_per_channel(weight: torch.Tensor, clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per-output-channel quantisation of a linear weight.

    weight: [out, in] (any float dtype). clip: optional [out] ratios in (0, 1] scaling each row's
    max|w| down (values beyond the clipped range saturate at ±127).
    Returns (q int8 [out, in], scale float32 [out, 1]) with weight ≈ q · scale.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D [out, in] tensor, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    scale = _channel_scale(w, clip)
    q = torch.round(w / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 [out, in] = q (int8 [out, in]) · scale (float32 [out, 1])."""
    return q.float() * scale.float()


def _quant_dequant_weight(w: torch.Tensor) -> torch.Tensor:
    q, scale = quantize_per_channel(w)
    return dequantize(q, scale).to(w.dtype)


def _quant_dequant_tokens(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / INT8_MAX  # [..., 1]
    # vLLM multiplies by the reciprocal (not divides): the two disagree on some bf16 inputs.
    # An all-zero token has scale 0; its output is 0 there too.
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.round(xf * inv).clamp_(INT8_MIN, INT8_MAX)
    return (q * scale).to(x.dtype)


class _StraightThrough(torch.autograd.Function):
    """Forward: fn(x); backward: the incoming gradient unchanged (straight-through estimator).

    A custom function rather than `x + (fn(x) - x).detach()`, whose forward is not exactly fn(x)
    in floating point: QAT must see the very values the int8 engine will compute.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return fn(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-channel int8 quantise-dequantise of a [out, in] weight (clip 1), same dtype as `w`;
    the gradient passes through as the identity."""
    return _StraightThrough.apply(w, _quant_dequant_weight)


def fake_quant_activation(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token int8 quantise-dequantise of [..., in] (one scale per row over the last
    dim), same dtype as `x`; the gradient passes through as the identity."""
    return _StraightThrough.apply(x, _quant_dequant_tokens)


class QATLinear(nn.Linear):
    """nn.Linear that computes as the W8A8 engine will: int8 per-channel weight, int8 per-token input.

    Same parameters and state_dict keys as nn.Linear (only the class changes), so checkpoints,
    `save_pretrained` and sharding wrappers applied afterwards see an ordinary linear layer.
    x: [..., in] -> [..., out].
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quant_activation(x), fake_quant_weight(self.weight), self.bias)


class QuantizedWeightLinear(QATLinear):
    """A linear whose weight already holds dequantised int8 values (an exported checkpoint):
    only the input is fake-quantised per token, since requantising the weight would change nothing
    but its float rounding. x: [..., in] -> [..., out]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quant_activation(x), self.weight, self.bias)


def _is_excluded(name: str) -> bool:
    parts = name.split(".")
    last = parts[-1]
    if name.endswith("lm_head"):
        # The output projection sets every logit; vLLM keeps it (and tied embeddings) in float.
        return True
    if last == "gate" or last.endswith("_gate") or any("router" in p for p in parts):
        # MoE routers (and Qwen's shared-expert gate) make discrete top-k choices that small
        # weight errors flip; they are tiny, so quantising them saves nothing.
        return True
    # PEFT's adapter matrices are not deployed weights: an export merges them first.
    return any(p.startswith("lora_") for p in parts)


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every nn.Linear the W8A8 scheme quantises, in module order:
    all of the decoder's linears except `lm_head` and MoE routers / gates. Possibly empty."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and not _is_excluded(name)]


def apply_qat(model: nn.Module) -> int:
    """Turn every quantizable linear into a QATLinear in place (class swap; parameters, their
    identity and the module tree unchanged). Returns how many were swapped (already-QAT ones are
    not counted). ValueError when the model has none, or one is a subclass of nn.Linear whose own
    forward would be lost."""
    linears = quantizable_linears(model)
    if not linears:
        raise ValueError(f"model: {type(model).__name__} has no nn.Linear layers to fake-quantise (lm_head and MoE routers are excluded)")
    swapped = 0
    for name, module in linears:
        if isinstance(module, QATLinear):
            continue
        if type(module) is not nn.Linear:
            raise ValueError(f"model: cannot fake-quantise '{name}': {type(module).__name__} is not a plain torch.nn.Linear")
        module.__class__ = QATLinear
        swapped += 1
    return swapped


def remove_qat(model: nn.Module) -> int:
    """Turn every QATLinear (and QuantizedWeightLinear) back into nn.Linear in place; returns how many."""
    restored = 0
    for module in model.modules():
        if isinstance(module, QATLinear):
            module.__class__ = nn.Linear
            restored += 1
    return restored
