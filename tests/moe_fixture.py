"""Tiny MoE models whose routers are biased toward known experts, built with init-model.

A constant feature is written into one dimension d of every token embedding, and nothing may change
that dimension of the residual stream afterwards (the rows of attention's o_proj and of every expert's
and shared expert's down projection that write to d are zero). Every router input then has a positive
d-th entry (RMSNorm keeps the sign), and a router whose weight is +c at d for the chosen experts and
-c for the others ranks the chosen experts first for every token.
"""

from __future__ import annotations

from pathlib import Path

import torch

MOE_SPEC = dict(layers=2, hidden=64, heads=2, kv_heads=1, intermediate=32, experts=4, experts_per_token=2)  # head_dim 32: vLLM on CPU


def biased_moe(out: Path, arch: str, tokenizer_from: str, chosen: dict[int, list[int]], dim: int = 0, c: float = 5.0) -> Path:
    """init-model a tiny `arch` MoE at `out` whose layer l routes every token to `chosen[l]` first."""
    from transformers import AutoModelForCausalLM

    from distillery.models.init_model import ArchSpec, init_model
    from distillery.models.structure import decoder_layers, moe_blocks

    init_model(out, ArchSpec(arch=arch, **MOE_SPEC), tokenizer_from=tokenizer_from, seed=5, overwrite=True)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, dim] = 10.0
        for layer in decoder_layers(model):
            layer.self_attn.o_proj.weight[dim, :] = 0.0
        for b in moe_blocks(model):
            b.experts.down_proj[:, dim, :] = 0.0  # [E, H, I]: no expert writes to d
            shared = getattr(b.block, "shared_expert", None)
            if shared is not None:
                shared.down_proj.weight[dim, :] = 0.0
            w = b.router.weight
            w.zero_()
            w[:, dim] = -c
            w[chosen[b.layer], dim] = c
    model.save_pretrained(out)
    return out
