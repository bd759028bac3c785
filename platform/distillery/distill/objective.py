"""The distillation objective: what one batch's loss is when a frozen teacher teaches the student.

alpha·KD + (1 − alpha)·CE over response tokens (distill/losses.py), with the
teacher either run online on every worker (frozen, eval mode, no grad, FSDP2-sharded like the
student) or read from the offline top-k cache streamed with the data. Optional: hidden-state
(and attention-map) distillation through learned projections, temperature/alpha schedules,
progressive stages, and a per-batch KD weight from the teacher's confidence.
Metrics add kd_loss, ce_loss, hidden_loss, and on val the teacher–student top-1 agreement and KL.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from distillery.config import Config, ConfigError
from distillery.data.splits import IGNORE_INDEX
from distillery.distill.losses import (
    SparseTeacher,
    check_vocab,
    distill_loss,
    entropy_kd_weight,
    feature_projection,
    hidden_state_loss,
    attention_kl,
    layer_map,
    schedule,
    teacher_entropy,
)
from distillery.distill.teacher_cache import CACHE_COLUMNS, sparse_teacher_batch
from distillery.models.load import load_causal_lm, resolve_model_dir
from distillery.models.plan import decoder_layers
from distillery.train.method import TRAIN_COLUMNS
from distillery.train.objective import lm_head_of, shift


def wants_attention(cfg: Config) -> bool:
    """Whether the objective distils attention maps (then teacher and student need eager attention)."""
    return cfg.distill.hidden is not None and cfg.distill.hidden.attention_weight > 0


def attn_implementation(cfg: Config) -> str | None:
    """The attention kernel teacher and student load with: eager when attention maps are distilled
    (SDPA and flash kernels return none), else `model.attn_implementation`."""
    return "eager" if wants_attention(cfg) else cfg.model.attn_implementation


class DistillObjective:
    """alpha·KD + (1 − alpha)·CE (+ weighted hidden-state / attention losses) against a frozen teacher."""

    def __init__(self, cfg: Config, tokenizer, student, device: torch.device):
        self.cfg = cfg
        self.d = cfg.distill
        self.device = device
        self.vocab = student.config.vocab_size
        self.step, self.total = 0, 1
        self.teacher = None
        if self.d.teacher_mode == "online":
            self.teacher = load_causal_lm(
                resolve_model_dir(cfg.model.teacher), dtype="bfloat16" if cfg.train.use_gpu else "float32",
                attn_implementation=attn_implementation(cfg),
            )
            check_vocab(self.teacher.config.vocab_size, self.vocab, teacher=str(cfg.model.teacher), student=str(cfg.model.path))
            self.teacher.eval().requires_grad_(False).to(device)
        self.pairs: list[tuple[int, int]] = []
        self.projections = torch.nn.ModuleList()
        if self.d.hidden is not None:
            s_layers, t_layers = len(decoder_layers(student)), len(decoder_layers(self.teacher))
            self.pairs = [tuple(p) for p in self.d.hidden.layer_map] if self.d.hidden.layer_map else layer_map(s_layers, t_layers)
            for s, t in self.pairs:
                if not (0 <= s < s_layers and 0 <= t < t_layers):
                    raise ConfigError(f"distill.hidden.layer_map: pair ({s}, {t}) is outside student {s_layers} / teacher {t_layers} layers")
            s_h, t_h = student.config.hidden_size, self.teacher.config.hidden_size
            # One learned projection per mapped pair, trained with the student and dropped at export.
            for _ in self.pairs:
                proj = feature_projection(s_h, t_h)
                self.projections.append(proj if proj is not None else torch.nn.Identity())
            self.projections.to(device)

    # -- loop hooks -------------------------------------------------------------------------

    def columns(self) -> list[str]:
        return TRAIN_COLUMNS + CACHE_COLUMNS if self.d.teacher_mode == "cached" else TRAIN_COLUMNS

    def extra_modules(self) -> list[torch.nn.Module]:
        return [self.projections] if any(True for _ in self.projections.parameters()) else []

    def after_wrap(self, model) -> None:
        """Shard the online teacher like the student, so a teacher larger than one device fits."""
        if self.teacher is not None and self.cfg.train.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in decoder_layers(self.teacher):
                fully_shard(layer)
            fully_shard(self.teacher)

    def set_step(self, step: int, total: int) -> None:
        self.step, self.total = step, total

    def after_backward(self, model) -> dict[str, float]:
        return {}

    # -- weights over training --------------------------------------------------------------

    def _wants_attention(self) -> bool:
        return wants_attention(self.cfg)

    def current(self) -> dict[str, float]:
        """Temperature, alpha and hidden weight at the current step (stages, else schedules)."""
        d = self.d
        hidden_w = d.hidden.weight if d.hidden else 0.0
        if d.stages:
            start = 0
            for stage in d.stages:
                if self.step < start + stage.steps or stage is d.stages[-1]:
                    return {
                        "temperature": stage.temperature or d.temperature,
                        "alpha": d.alpha if stage.alpha is None else stage.alpha,
                        "hidden_weight": hidden_w if stage.hidden_weight is None else stage.hidden_weight,
                    }
                start += stage.steps
        t_end = d.temperature_schedule.end if d.temperature_schedule.end is not None else d.temperature
        a_end = d.alpha_schedule.end if d.alpha_schedule.end is not None else d.alpha
        return {
            "temperature": schedule(d.temperature_schedule.kind, d.temperature, t_end, self.step, self.total),
            "alpha": schedule(d.alpha_schedule.kind, d.alpha, a_end, self.step, self.total),
            "hidden_weight": hidden_w,
        }

    # -- teacher ----------------------------------------------------------------------------

    def _teacher(self, batch: dict[str, Any], need_hidden: bool, need_attn: bool):
        """(teacher for the KD loss, teacher hidden states or None, teacher attentions or None)."""
        if self.teacher is None:
            T = batch["input_ids"].shape[1]
            ids, lps, tail = sparse_teacher_batch(
                batch["teacher_topk_ids"], batch["teacher_topk_logprobs"], batch["teacher_tail_logprob"], T, self.d.top_k
            )
            return SparseTeacher(ids.to(self.device), lps.to(self.device), tail.to(self.device)), None, None
        with torch.no_grad():
            out = self.teacher(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                output_hidden_states=need_hidden, output_attentions=need_attn, use_cache=False,
            )
        return out.logits.float(), out.hidden_states, out.attentions

    # -- loss ---------------------------------------------------------------------------------

    def __call__(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        now = self.current()
        need_hidden = self.d.hidden is not None and now["hidden_weight"] > 0
        need_attn = need_hidden and self._wants_attention()
        teacher, t_hidden, t_attn = self._teacher(batch, need_hidden, need_attn)
        alpha = now["alpha"]
        if self.d.entropy_weighting:
            alpha = entropy_kd_weight(teacher_entropy(teacher, batch["labels"], self.d.chunk_size), self.vocab, alpha)
        fused = self.d.fused_lm_head and self.cfg.train.strategy != "fsdp"
        # Fused, the loss forms logits chunk by chunk from the hidden states; `logits_to_keep=1` stops
        # the model from also forming the full (B, T, V) logits it would otherwise return.
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            output_hidden_states=need_hidden or fused, output_attentions=need_attn, use_cache=False,
            **({"logits_to_keep": 1} if fused else {}),
        )
        if fused:
            head = lm_head_of(model)
            res = distill_loss(
                out.hidden_states[-1], teacher, batch["labels"], kind=self.d.loss, temperature=now["temperature"],
                alpha=alpha, beta=self.d.beta, keep_tail=self.d.keep_tail, chunk_size=self.d.chunk_size,
                lm_head_weight=head.weight, lm_head_bias=head.bias,
            )
        else:
            res = distill_loss(
                out.logits, teacher, batch["labels"], kind=self.d.loss, temperature=now["temperature"], alpha=alpha,
                beta=self.d.beta, keep_tail=self.d.keep_tail, chunk_size=self.d.chunk_size,
            )
        loss = res.loss
        metrics = {"kd_loss": float(res.kd), "ce_loss": float(res.ce), "temperature": now["temperature"], "alpha": alpha}
        if need_hidden:
            mask = batch["attention_mask"]
            h = sum(
                hidden_state_loss(out.hidden_states[s + 1], t_hidden[t + 1], mask, self.d.hidden.loss, proj)
                for (s, t), proj in zip(self.pairs, self.projections)
            ) / len(self.pairs)
            if need_attn:
                h = h + self.d.hidden.attention_weight * sum(
                    attention_kl(out.attentions[s], t_attn[t], mask) for s, t in self.pairs
                ) / len(self.pairs)
            loss = loss + now["hidden_weight"] * h
            metrics["hidden_loss"] = float(h)
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, model, batch: dict[str, Any]) -> dict[str, float]:
        """Sums over target positions: student NLL, and top-1 agreement and KL(teacher‖student) at T = 1."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logits, targets = shift(out.logits.float(), batch["labels"])
        sel = targets != IGNORE_INDEX
        n = int(sel.sum())
        nll = F.cross_entropy(logits[sel], targets[sel], reduction="sum").item() if n else 0.0
        teacher, _, _ = self._teacher(batch, False, False)
        if isinstance(teacher, SparseTeacher):
            top1 = teacher.ids[:, :-1, 0][sel]
        else:
            top1 = teacher[:, :-1].argmax(-1)[sel]
        agree = float((logits[sel].argmax(-1) == top1).sum()) if n else 0.0
        kl = distill_loss(out.logits.float(), teacher, batch["labels"], kind="forward_kl", temperature=1.0, alpha=1.0,
                          keep_tail=self.d.keep_tail, chunk_size=self.d.chunk_size)
        return {"nll": nll, "tokens": float(n), "teacher_top1_agreement": agree, "teacher_kl": float(kl.kd) * kl.num_tokens}
