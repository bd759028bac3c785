"""Training objectives: what one batch's loss is. The loop is the same for every objective.

An objective is called on the (possibly FSDP/DDP-wrapped) model and a collated batch and returns
`(loss, metrics)`. `evaluate` returns *sums* (negative log-likelihood, token count, and any
extras) that the loop all-reduces across workers before dividing. Distillation objectives add
a teacher (online or cached) and extra trainable modules (`extra_modules`) without touching the loop.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from distillery.config import Config
from distillery.data.splits import IGNORE_INDEX


class Objective(Protocol):
    """What the loop needs of a training method's loss (cross-entropy here, distillation in distill/)."""

    def columns(self) -> list[str]:
        """Dataset columns a batch needs."""

    def extra_modules(self) -> list[torch.nn.Module]:
        """Trainable modules outside the model (e.g. feature projections); trained, never exported."""

    def after_wrap(self, model) -> None:
        """Called once the model is wrapped (FSDP/DDP): lay out any per-parameter state like the parameters."""

    def set_step(self, step: int, total: int) -> None:
        """Called before every optimiser step (schedules read it)."""

    def __call__(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss to back-propagate, metrics) for one collated micro-batch."""

    def after_backward(self, model) -> dict[str, float]:
        """Once per optimiser step, after the last backward: add gradient terms, return their metrics."""

    def evaluate(self, model, batch: dict[str, Any]) -> dict[str, float]:
        """Sums over a validation batch: `nll`, `tokens` and any extras (the loop all-reduces, then divides)."""

    def close(self) -> None:
        """The run is over (finished or stopped): release what the objective holds (engines, scratch files)."""


def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align next-token predictions: logits [B, T, V] -> [B, T-1, V]; labels [B, T] -> targets [B, T-1]."""
    return logits[:, :-1], labels[:, 1:]


def lm_head_of(model) -> torch.nn.Module:
    """The output projection of a causal LM, through DDP (`.module`) and PEFT wrappers."""
    inner = model.module if hasattr(model, "module") else model
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner.lm_head


def router_aux_coef(cfg: Config, model) -> float:
    """Weight of the MoE router load-balancing loss: `train.router_aux_loss_coef`, else the model
    config's own `router_aux_loss_coef`; 0 for a dense model (run.py refuses a coefficient there)."""
    from distillery.models.structure import is_moe_config

    config = getattr(model, "config", None)
    if config is None or not is_moe_config(config):
        return 0.0
    if cfg.train.router_aux_loss_coef is not None:
        return cfg.train.router_aux_loss_coef
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)


def target_logits(model, batch: dict[str, Any], full: bool, router_aux: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Logits (n, V) and targets (n,) of the n positions that have a target, where they are (a bool
    mask [B, T-1] over the shifted positions), and with `router_aux` the MoE router's
    load-balancing loss (a scalar; None without).

    Unless `full`, the model stops at its final hidden states (`logits_to_keep=1` keeps it from
    projecting every position) and the lm_head runs on the target positions alone: prompt and
    padding positions, most of an instruction batch, then cost no logits at all. Same values and
    gradients as projecting everything. `full` is for FSDP, which gathers the root's lm_head only
    inside the wrapped forward: there the model's own (B, T, V) logits are selected from.
    """
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    if router_aux:
        kw["output_router_logits"] = True
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    if full:
        out = model(**kw)
        logits = out.logits[:, :-1][mask]
    else:
        out = model(**kw, logits_to_keep=1, output_hidden_states=True)
        logits = lm_head_of(model)(out.hidden_states[-1][:, :-1][mask])
    return logits, targets[mask], mask, (out.aux_loss if router_aux else None)


def key_term_sequences(tokenizer, terms: list[str]) -> list[list[int]]:
    """Token-id sequences of each key term, with and without a leading space (BPE tokenises them differently)."""
    seqs = set()
    for term in terms:
        for text in (term, " " + term):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids:
                seqs.add(tuple(ids))
    return [list(s) for s in sorted(seqs, key=len, reverse=True)]


def key_term_mask(input_ids: torch.Tensor, sequences: list[list[int]]) -> torch.Tensor:
    """Bool [B, T]: True where a token belongs to an occurrence of any key-term sequence."""
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    T = input_ids.shape[1]
    for seq in sequences:
        n = len(seq)
        if n > T:
            continue
        target = torch.tensor(seq, dtype=input_ids.dtype)
        windows = input_ids.unfold(1, n, 1)  # [B, T-n+1, n]
        hits = (windows == target).all(-1)  # [B, T-n+1]
        for k in range(n):
            mask[:, k : k + hits.shape[1]] |= hits
    return mask


class CrossEntropyObjective:
    """Token cross-entropy on response tokens, optionally up-weighting key terms, plus an optional EWC
    penalty and, for MoE models, the router's load-balancing loss (`router_aux_coef`)."""

    def __init__(self, cfg: Config, tokenizer, ewc=None, aux_coef: float = 0.0):
        self.full_logits = cfg.train.strategy == "fsdp"  # see target_logits
        self.key_sequences = key_term_sequences(tokenizer, cfg.train.key_terms) if cfg.train.key_terms else []
        self.key_weight = cfg.train.key_term_weight
        self.ewc = ewc  # distillery.train.ewc.EwcPenalty or None
        self.aux_coef = aux_coef

    def extra_modules(self) -> list[torch.nn.Module]:
        return []

    def set_step(self, step: int, total: int) -> None:
        """Called before every optimiser step (distillation schedules use it; cross-entropy has none)."""

    def columns(self) -> list[str]:
        """Dataset columns a batch needs."""
        return ["row_id", "input_ids", "labels"]

    def after_wrap(self, model) -> None:
        """Called once the model is wrapped (FSDP/DDP): lay out any per-parameter state like the parameters."""
        if self.ewc is not None:
            self.ewc.shard_like(model)

    def token_weights(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """[B, T-1] loss weight per target token (None: all 1)."""
        if not self.key_sequences:
            return None
        hit = key_term_mask(batch["input_ids"], self.key_sequences)[:, 1:]
        return torch.where(hit, self.key_weight, 1.0)

    def __call__(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        logits, targets, mask, aux = target_logits(model, batch, self.full_logits, router_aux=self.aux_coef > 0)
        nll = F.cross_entropy(logits.float(), targets, reduction="none")  # (n,)
        weights = self.token_weights(batch)
        w = torch.ones_like(nll) if weights is None else weights[mask].to(nll.dtype)
        ce = (nll * w).sum() / w.sum().clamp_min(1.0)
        if aux is None:
            return ce, {"ce_loss": ce.item()}
        return ce + self.aux_coef * aux, {"ce_loss": ce.item(), "router_aux_loss": aux.item()}

    def close(self) -> None:
        """Nothing to release."""

    def after_backward(self, model) -> dict[str, float]:
        """Once per optimiser step, after the last backward: EWC adds its gradient (and reports its value)."""
        if self.ewc is None:
            return {}
        value = float(self.ewc.penalty(model))
        self.ewc.add_grad(model)
        return {"ewc_penalty": value}

    @torch.no_grad()
    def evaluate(self, model, batch: dict[str, Any]) -> dict[str, float]:
        logits, targets, _, _ = target_logits(model, batch, self.full_logits)
        nll = F.cross_entropy(logits.float(), targets, reduction="sum")
        return {"nll": nll.item(), "tokens": float(targets.numel())}


def finish_eval(sums: dict[str, float]) -> dict[str, float]:
    """Turn all-reduced sums into metrics: val_loss, val_perplexity, and per-token means of extras."""
    tokens = max(sums.get("tokens", 0.0), 1.0)
    loss = sums.get("nll", 0.0) / tokens
    out = {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}
    for key, value in sums.items():
        if key not in ("nll", "tokens"):
            out[f"val_{key}"] = value / tokens
    return out
