"""Expert-specialised fine-tuning (ESFT) of mixture-of-experts models (layout: models/structure.py).

ESFT (Wang et al. 2024) trains only the experts a task uses. Their relevance is measured on a
sample of the task's own data, per layer: the mean router probability of each expert (`gate`) or
its share of the top-k selections (`token`), normalised to sum to 1 within the layer. Per layer the
experts are taken in descending relevance until their cumulative share reaches the threshold.
Because experts are slices of one tensor, "only the selected experts train" is enforced on slices
(`ExpertSlices`): the gradient of every other slice is zeroed, and weight decay, which AdamW would
apply to the whole tensor, is applied to the selected slices only, so the rest stay bitwise
unchanged (Adam's moments of a slice whose gradient is always zero stay zero, and so does its update).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

import torch

from distillery.config import ConfigError, EsftConfig
from distillery.files import write_text_atomic
from distillery.models.structure import moe_blocks, num_experts

ESFT_FILE = "esft_experts.json"


# --------------------------------------------------------------------------- relevance and selection


@torch.no_grad()
def expert_relevance(model, batches: Iterable[dict[str, torch.Tensor]], relevance: str, sample_tokens: int) -> tuple[dict[int, list[float]], int]:
    """Per MoE layer, each expert's relevance on the batches (normalised to sum 1), and the tokens seen.

    `batches` yield `input_ids` / `attention_mask` [B, T]; padding positions are not counted.
    `gate`: mean router softmax probability of each expert; `token`: share of the top-k selections.
    Stops once `sample_tokens` tokens were seen.
    """
    blocks = moe_blocks(model, required=True)
    sums = {b.layer: torch.zeros(b.num_experts, dtype=torch.float64) for b in blocks}
    current: dict[str, torch.Tensor] = {}

    def hook(layer: int, num_experts: int):
        def record(_module, _inputs, out):
            logits, _, indices = out  # [N, E], [N, k], [N, k] over the batch's flattened tokens
            keep = current["mask"].to(logits.device)
            if relevance == "gate":
                sums[layer] += torch.softmax(logits.float(), -1)[keep].sum(0).double().cpu()
            else:
                sums[layer] += torch.bincount(indices[keep].reshape(-1).cpu(), minlength=num_experts).double()
        return record

    handles = [b.router.register_forward_hook(hook(b.layer, b.num_experts)) for b in blocks]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in batches:
            current["mask"] = batch["attention_mask"].reshape(-1).bool()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            seen += int(current["mask"].sum())
            if seen >= sample_tokens:
                break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not seen:
        raise ConfigError("method.esft.sample_tokens: the training split gave no tokens to measure expert relevance on")
    return {layer: (s / s.sum().clamp_min(1e-12)).tolist() for layer, s in sums.items()}, seen


def select_experts(relevance: dict[int, list[float]], threshold: float) -> dict[int, list[int]]:
    """Per layer, experts in descending relevance until their cumulative share reaches `threshold` (at least one)."""
    chosen = {}
    for layer, scores in relevance.items():
        order = sorted(range(len(scores)), key=lambda e: (-scores[e], e))
        picked, total = [], 0.0
        for e in order:
            picked.append(e)
            total += scores[e]
            if total >= threshold - 1e-9:
                break
        chosen[layer] = sorted(picked)
    return chosen


def write_selection(path: str, esft: EsftConfig, relevance: dict[int, list[float]], selected: dict[int, list[int]],
                    tokens: int, trainable_fraction: float) -> None:
    """`esft_experts.json`: settings, relevance scores and chosen experts per layer, trainable fraction."""
    record = {
        "relevance": esft.relevance, "threshold": esft.threshold, "sample_tokens": tokens,
        "trainable_fraction": trainable_fraction,
        "layers": {str(layer): {"scores": relevance.get(layer), "selected": selected[layer]} for layer in sorted(selected)},
    }
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def read_selection(path: str) -> dict[int, list[int]]:
    """The chosen experts per layer of an `esft_experts.json`; ConfigError naming what is wrong."""
    key = "method.esft.experts_file"
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: '{path}' does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            layers = json.load(f)["layers"]
        return {int(layer): [int(e) for e in entry["selected"]] for layer, entry in layers.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{key}: '{path}' is not an ESFT selection ({type(e).__name__}: {e})") from None


def check_selection(selected: dict[int, list[int]], model_config, where: str) -> None:
    """Layers and expert ids of a selection fit the model; ConfigError otherwise."""
    layers, experts = int(getattr(model_config, "num_hidden_layers", 0)), num_experts(model_config)
    for layer, ids in selected.items():
        if not 0 <= layer < layers:
            raise ConfigError(f"{where}: layer {layer} is not in 0..{layers - 1}")
        if not ids:
            raise ConfigError(f"{where}: layer {layer} selects no expert")
        bad = [e for e in ids if not 0 <= e < experts]
        if bad:
            raise ConfigError(f"{where}: layer {layer} names experts {bad}, the model has {experts}")


# --------------------------------------------------------------------------- trainable slices


def apply_esft(model, esft: EsftConfig, selected: dict[int, list[int]]) -> tuple[dict[str, torch.Tensor], int]:
    """Set `requires_grad` for ESFT and return ({parameter name: bool mask over experts [E]}, trainable count).

    The fused expert tensors of every MoE layer train, with a mask naming the selected slices;
    shared experts and everything outside the experts train only when `esft` says so.
    """
    blocks = moe_blocks(model, required=True)
    names = {id(p): n for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(esft.train_non_expert)
    masks: dict[str, torch.Tensor] = {}
    trainable = 0
    for b in blocks:
        for p in b.experts.parameters():
            p.requires_grad_(False)
        for attr in ("shared_expert", "shared_expert_gate"):
            shared = getattr(b.block, attr, None)
            if shared is not None:
                for p in shared.parameters():
                    p.requires_grad_(esft.train_shared)
        mask = torch.zeros(b.num_experts, dtype=torch.bool)
        mask[selected.get(b.layer, [])] = True
        for p in b.experts.parameters(recurse=False):
            if p.dim() >= 2 and p.shape[0] == b.num_experts and mask.any():
                p.requires_grad_(True)
                masks[names[id(p)]] = mask
                trainable += int(mask.sum()) * (p.numel() // b.num_experts)
    masked = {id(p) for n, p in model.named_parameters() if n in masks}
    trainable += sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in masked)
    return masks, trainable


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds: a DTensor's local shard, else the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def _local_rows(p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The part of `mask` [E] over the expert rows this process holds of `p` (FSDP2 shards dim 0)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return mask
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return mask[offset[0] : offset[0] + shape[0]]


class ExpertSlices:
    """Keeps the unselected expert slices of ESFT bitwise unchanged through training.

    Built from `apply_esft`'s masks on the unwrapped model, bound to the wrapped one (`bind`). Each
    step: `mask_grads` after backward zeroes the unselected slices' gradients (before clipping, so
    the norm is the trained slices'); `decay` before `optimizer.step()` applies AdamW's decoupled
    weight decay p ← p·(1 − lr·wd) to the selected slices only, the masked tensors being in a
    param group with weight_decay 0 (`param_groups`).
    """

    def __init__(self, masks: dict[str, torch.Tensor], weight_decay: float):
        self.masks = masks
        self.weight_decay = weight_decay
        self.bound: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, local row mask [E_local, 1, ...])

    def bind(self, model) -> None:
        """Resolve the masked parameters on the wrapped model (FSDP2 keeps names; DDP adds `module.`)."""
        self.bound = []
        for name, p in model.named_parameters():
            key = name[len("module."):] if name.startswith("module.") and name not in self.masks else name
            if key in self.masks:
                rows = _local_rows(p, self.masks[key]).to(_local(p).device)
                self.bound.append((p, rows.view(-1, *([1] * (p.dim() - 1)))))
        if len(self.bound) != len(self.masks):
            raise RuntimeError(f"ESFT: {len(self.masks) - len(self.bound)} masked expert tensors not found in the wrapped model")

    def param_groups(self, params: list[torch.Tensor]) -> list[dict[str, Any]]:
        """AdamW param groups: the masked expert tensors without weight decay (see `decay`), the rest as usual."""
        masked = {id(p) for p, _ in self.bound}
        rest = [p for p in params if id(p) not in masked]
        groups = [{"params": rest}] if rest else []
        return groups + [{"params": [p for p in params if id(p) in masked], "weight_decay": 0.0}]

    @torch.no_grad()
    def mask_grads(self) -> None:
        for p, rows in self.bound:
            if p.grad is not None:
                _local(p.grad).mul_(rows.to(_local(p.grad).dtype))

    @torch.no_grad()
    def decay(self, lr: float) -> None:
        if not self.weight_decay:
            return
        for p, rows in self.bound:
            local = _local(p)
            local.mul_(torch.where(rows, 1.0 - lr * self.weight_decay, 1.0).to(local.dtype))
