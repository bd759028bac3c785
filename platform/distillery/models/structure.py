"""Where things are in a loaded Hugging Face causal LM: its decoder layers and its sparse MoE blocks.

Transformers 5.x keeps a layer's routed experts in fused 3-D tensors (`mlp.experts.gate_up_proj`
[E, 2I, H], `mlp.experts.down_proj` [E, H, I]) beside a router (`mlp.gate`, weight [E, H]) whose
forward returns (router_logits [N, E], top-k weights [N, k], top-k indices [N, k]). Mixtral,
Qwen2-MoE (plus `mlp.shared_expert`) and Qwen3-MoE share that layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillery.config import ConfigError


def decoder_layers(model):
    """The list of decoder layers of a Hugging Face causal LM (Llama, Qwen2, Mixtral, ... and PEFT-wrapped)."""
    inner = model
    for attr in ("base_model", "model"):  # PeftModel -> LoraModel -> CausalLM
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
    backbone = getattr(inner, "model", None)
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise ConfigError(f"method: cannot find decoder layers (model.layers) in {type(inner).__name__}")
    return layers


@dataclass
class MoeBlock:
    """One decoder layer's sparse MoE block."""

    layer: int
    block: torch.nn.Module
    router: torch.nn.Module  # block.gate
    experts: torch.nn.Module  # block.experts: the routed experts' fused tensors
    num_experts: int


def num_experts(model_config) -> int:
    """Routed experts per MoE layer of a transformers config (Mixtral: num_local_experts, Qwen: num_experts); 0 for a dense model."""
    return int(getattr(model_config, "num_local_experts", 0) or getattr(model_config, "num_experts", 0) or 0)


def is_moe_config(model_config) -> bool:
    """Whether a transformers config describes a mixture-of-experts model with routed experts."""
    return num_experts(model_config) > 0


def moe_blocks(model, required: bool = False) -> list[MoeBlock]:
    """The sparse MoE blocks of an unwrapped (or PEFT-wrapped) `model`, in layer order (dense layers,
    e.g. Qwen's `mlp_only_layers`, skipped). `required`: ConfigError when there are none."""
    blocks = []
    for i, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        router, experts = getattr(mlp, "gate", None), getattr(mlp, "experts", None)
        weight = getattr(router, "weight", None)
        if weight is None or experts is None or weight.dim() != 2:
            continue
        n = weight.shape[0]
        if any(p.dim() == 3 and p.shape[0] == n for p in experts.parameters(recurse=False)):
            blocks.append(MoeBlock(i, mlp, router, experts, n))
    if required and not blocks:
        raise ConfigError("method.kind: esft needs a mixture-of-experts model; this model has no sparse MoE blocks")
    return blocks
