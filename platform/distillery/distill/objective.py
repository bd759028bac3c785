"""The distillation objective: what one batch's loss is when a frozen teacher teaches the student.

alpha·KD + (1 − alpha)·CE over response tokens (distill/losses.py), with the
teacher either run online on every worker (frozen, eval mode, no grad, FSDP2-sharded like the
student) or read from the offline cache streamed with the data (top-k head + sampled tail).
Optional: hidden-state (and attention-map) distillation through learned projections,
temperature/alpha schedules, progressive stages, and a per-batch KD weight from the teacher's confidence.
Metrics add kd_loss, ce_loss, hidden_loss, and on val the teacher–student top-1 agreement and KL,
against the full teacher (in cached mode loaded for validation when on disk) and, in cached mode,
against the cache too (`_cache` names).
The online teacher reaches the losses as its final hidden states and lm_head (`run_teacher`): its
(B, T, V) logits are formed chunk by chunk inside the loss, never whole. With distill.fused_lm_head
the student's are too, under FSDP2 as well (`fused_lm_head_params`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from distillery.config import Config, ConfigError
from distillery.data.splits import IGNORE_INDEX
from distillery.distill.losses import (
    SparseTeacher,
    TeacherHidden,
    TeacherMixture,
    cached_teacher_kl,
    check_vocab,
    distill_loss,
    entropy_kd_weight,
    feature_projection,
    hidden_state_loss,
    attention_kl,
    layer_map,
    schedule,
    teacher_entropy,
    teacher_top1,
)
from distillery.distill.teacher_cache import (
    CACHE_COLUMNS, COUNTS_COL, IDS_COL, LOGPROBS_COL, TAIL_COL, load_cache_manifest, sparse_teacher_batch,
)
from distillery.models.load import load_causal_lm, resolve_model_dir
from distillery.models.structure import decoder_layers
from distillery.train.method import TRAIN_COLUMNS
from distillery.train.objective import lm_head_of, router_aux_coef, shift
from distillery.train.sharded_load import MetaModel, frozen_model


def wants_attention(cfg: Config) -> bool:
    """Whether the objective distils attention maps (then teacher and student need eager attention)."""
    return cfg.distill.hidden is not None and cfg.distill.hidden.attention_weight > 0


def _on_disk(path: str) -> bool:
    """Whether `path` is a model or run directory here (resolve_model_dir finds a config in it)."""
    try:
        resolve_model_dir(path)
    except FileNotFoundError:
        return False
    return True


# Model-config fields that put something between lm_head(hidden) and the returned logits.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def logits_are_linear(model) -> bool:
    """Whether the model's logits are exactly `lm_head(last hidden state)`, so a teacher can be
    handed to the losses as hidden states (`TeacherHidden`); False with soft-capping or scaling."""
    config = model.config
    return all(getattr(config, key, None) in (None, 1, 1.0) for key in _LOGIT_TRANSFORMS)


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t` as a plain tensor: an FSDP2-sharded parameter (a DTensor outside its module's
    forward) is all-gathered, as FSDP itself does before the forward."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _check_last_position(teacher: TeacherHidden, logits: torch.Tensor, name: str) -> None:
    """Refuse a teacher whose lm_head does not reproduce its own logits. `logits`: (B, 1, V), what
    the model returned for the last position (`logits_to_keep=1`); free to compare, and it catches
    a logit transform `logits_are_linear` does not know."""
    mine = F.linear(teacher.hidden[:, -1:].to(teacher.weight.dtype), teacher.weight, teacher.bias).float()
    theirs = logits.float()
    tol = 1e-4 if teacher.weight.dtype == torch.float32 else 2e-2  # one bf16/fp16 rounding of a logit
    if (mine - theirs).abs().max() > tol * (1.0 + theirs.abs().max()):
        raise RuntimeError(
            f"the teacher {name}'s logits are not lm_head(final hidden state): its KD target cannot be formed "
            f"chunk by chunk from its hidden states (add the transform's config field to _LOGIT_TRANSFORMS)"
        )


@torch.no_grad()
def run_teacher(teacher, batch: dict[str, Any], need_hidden: bool = False, need_attn: bool = False):
    """One frozen teacher's forward for the losses: (teacher, hidden states or None, attentions or None).

    The teacher is a `TeacherHidden`: its final hidden states (B, T, H) — `hidden_states[-1]`,
    which Hugging Face causal LMs return after the final norm, i.e. the lm_head's input — and its
    lm_head weight (V, H) and bias, so the losses form its logits chunk by chunk; `logits_to_keep=1`
    stops the model from forming the (B, T, V) logits itself. A model whose logits are not linear in
    the hidden state (`logits_are_linear`) gives its dense (B, T, V) float32 logits instead.
    `need_hidden` / `need_attn` ask for every layer's hidden states / attentions (feature distillation);
    otherwise none are returned, so only the last layer's outlives this call.
    """
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, output_attentions=need_attn)
    if not logits_are_linear(teacher):
        out = teacher(**kw, output_hidden_states=need_hidden)
        return out.logits.float(), out.hidden_states, out.attentions
    out = teacher(**kw, output_hidden_states=True, logits_to_keep=1)
    head = lm_head_of(teacher)
    hidden = TeacherHidden(out.hidden_states[-1], _local(head.weight).detach(), _local(head.bias))
    _check_last_position(hidden, out.logits, type(teacher).__name__)
    return hidden, (out.hidden_states if need_hidden else None), out.attentions


def mixed_teacher(teachers: list[tuple[torch.nn.Module, float]], batch: dict[str, Any], need_hidden: bool = False,
                  need_attn: bool = False):
    """(teacher for the losses, hidden states or None, attentions or None) of one or several
    weighted teachers: one `run_teacher` teacher, or a `TeacherMixture` the losses mix chunk by
    chunk at their temperature. Hidden states / attentions, when asked for, are the first teacher's."""
    members, hidden, attn = [], None, None
    for i, (model, _) in enumerate(teachers):
        member, h, a = run_teacher(model, batch, need_hidden and i == 0, need_attn and i == 0)
        members.append(member)
        hidden, attn = (h, a) if i == 0 else (hidden, attn)
    if len(members) == 1:
        return members[0], hidden, attn
    return TeacherMixture(members, [w for _, w in teachers]), hidden, attn


def fused_lm_head_params(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The student's lm_head weight (V, H) and bias for `distill_loss(..., lm_head_weight=...)`,
    taken after the student's forward and before its backward.

    Under FSDP2 the lm_head belongs to the root module, whose parameters are sharded DTensors
    outside its forward. The root keeps them unsharded from its forward to its backward (FSDP2
    does not reshard the root after forward); `unshard()` states that (a no-op then) so the
    parameters read here are the unsharded ones. The loss's gradient accumulates into them as the
    lm_head's own forward would, and the root's post-backward reduce-scatters it into the sharded
    gradient and reshards. DDP / unwrapped: the parameters themselves.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if isinstance(model, FSDPModule):
        model.unshard()
    head = lm_head_of(model)
    if isinstance(head.weight, DTensor):
        raise RuntimeError("distill.fused_lm_head: the student's lm_head is still sharded after unshard() "
                           "(is it an FSDP unit of its own?); it must belong to the FSDP root module")
    return head.weight, head.bias


def attn_implementation(cfg: Config) -> str | None:
    """The attention kernel teacher and student load with: eager when attention maps are distilled
    (SDPA and flash kernels return none), else `model.attn_implementation`."""
    return "eager" if wants_attention(cfg) else cfg.model.attn_implementation


class DistillObjective:
    """alpha·KD + (1 − alpha)·CE (+ weighted hidden-state / attention losses) against a frozen teacher."""

    _eval_teachers: list[tuple[torch.nn.Module, float]] | None = None  # cached mode, validation only: see _evaluation_teachers
    _sample_temperature: float | None = None  # cached mode: read from the cache manifest on first use

    def __init__(self, cfg: Config, tokenizer, student, device: torch.device):
        self.cfg = cfg
        self.d = cfg.distill
        self.device = device
        self.vocab = student.config.vocab_size
        self.aux_coef = router_aux_coef(cfg, student)  # MoE students: the router's load-balancing loss
        self.step, self.total = 0, 1
        self.teacher = None
        # Online: every teacher of model.teacher / model.teachers, frozen; the KD target mixes them
        # by weight (distill/mixture.py). `self.teacher` is the first, the one hidden states come from.
        self.teachers: list[torch.nn.Module] = []
        self.teacher_weights: list[float] = []
        self._meta_teachers: list[MetaModel] = []
        if self.d.teacher_mode == "online":
            for path, weight in cfg.model.teacher_specs:
                # Under FSDP on several workers: on the meta device, each rank's shard read in after_wrap.
                t, meta = frozen_model(resolve_model_dir(path), cfg, "bfloat16" if cfg.train.use_gpu else "float32", device,
                                       attn_implementation=attn_implementation(cfg))
                if meta is not None:
                    self._meta_teachers.append(meta)
                if self.d.cross_tokenizer is None:  # across tokenizers the vocabularies differ by design
                    check_vocab(t.config.vocab_size, self.vocab, teacher=str(path), student=str(cfg.model.path))
                self.teachers.append(t)
                self.teacher_weights.append(weight)
            self.teacher = self.teachers[0]
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
        if self.cfg.train.strategy == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for teacher in self.teachers:
                for layer in decoder_layers(teacher):
                    fully_shard(layer)
                fully_shard(teacher)
        for meta in self._meta_teachers:  # sharded loading: allocate and read this rank's shard
            meta.materialize(self.device)
        # Cached mode: the evaluation-only teacher is loaded here (once per worker) and sharded the same way.
        for teacher, _ in self._evaluation_teachers():
            if self.cfg.train.strategy == "fsdp":
                from torch.distributed.fsdp import fully_shard

                for layer in decoder_layers(teacher):
                    fully_shard(layer)
                fully_shard(teacher)

    def set_step(self, step: int, total: int) -> None:
        self.step, self.total = step, total

    def after_backward(self, model) -> dict[str, float]:
        return {}

    def close(self) -> None:
        """Nothing to release (the on-policy objective stops its engines)."""

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

    def _teacher(self, batch: dict[str, Any], need_hidden: bool, need_attn: bool, temperature: float):
        """(teacher for the KD loss, teacher hidden states or None, teacher attentions or None);
        `temperature` is the one the loss will use (several online teachers are mixed at it)."""
        if self.d.teacher_mode == "cached":
            return self._cached_teacher(batch), None, None
        return self._online_teacher(batch, need_hidden, need_attn, temperature)

    def _cached_teacher(self, batch: dict[str, Any]) -> SparseTeacher:
        """The batch's teacher as the cache holds it (the columns streamed with the rows): the top-k
        head, and with a sampled cache the drawn tail ids with their counts (`SparseTeacher`)."""
        T = batch["input_ids"].shape[1]
        if self._sample_temperature is None:  # the temperature the cache's tail was drawn at (its manifest's)
            self._sample_temperature = float(load_cache_manifest(self.cfg.teacher_cache_dir).get("sample_temperature", 1.0))
        t = sparse_teacher_batch(
            batch[IDS_COL], batch[LOGPROBS_COL], batch[TAIL_COL], T, self.d.top_k, batch.get(COUNTS_COL), self._sample_temperature
        )
        return SparseTeacher(t.ids.to(self.device), t.logprobs.to(self.device), t.tail.to(self.device),
                             None if t.counts is None else t.counts.to(self.device), t.sample_temperature)

    def _evaluation_teachers(self) -> list[tuple[torch.nn.Module, float]]:
        """Cached mode: the teacher(s) of `model.teacher(s)`, loaded once for validation only, so
        val_teacher_kl / val_teacher_top1_agreement measure the student against the full teacher
        rather than against the cache's estimate of it. Empty when no teacher is named or a path
        is not on disk (the metrics then come from the cache, under `_cache` names)."""
        if self._eval_teachers is None:
            self._eval_teachers = []
            specs = self.cfg.model.teacher_specs
            if self.d.teacher_mode == "cached" and specs and all(_on_disk(path) for path, _ in specs):
                for path, weight in specs:
                    t = load_causal_lm(resolve_model_dir(path), dtype="bfloat16" if self.cfg.train.use_gpu else "float32")
                    check_vocab(t.config.vocab_size, self.vocab, teacher=str(path), student=str(self.cfg.model.path))
                    self._eval_teachers.append((t.eval().requires_grad_(False).to(self.device), weight))
        return self._eval_teachers

    def _evaluation_teacher(self, batch: dict[str, Any]):
        """The full teacher (their mixture with several, `mixed_teacher`) as the losses take it, or None."""
        teachers = self._evaluation_teachers()
        return mixed_teacher(teachers, batch)[0] if teachers else None

    def _online_teacher(self, batch: dict[str, Any], need_hidden: bool, need_attn: bool, temperature: float):
        """(teacher for the losses, hidden states or None, attentions or None) from the online teacher(s).

        The teacher is never its (B, T, V) logits: a `TeacherHidden` (hidden states + lm_head), or
        with several teachers a `TeacherMixture` (`mixed_teacher`); the losses form each chunk's
        logits, and mix them at their own temperature, so `temperature` (kept for the callers) no
        longer shapes the result. Hidden states / attentions come from the first teacher.
        """
        return mixed_teacher(list(zip(self.teachers, self.teacher_weights)), batch, need_hidden, need_attn)

    # -- loss ---------------------------------------------------------------------------------

    def __call__(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        now = self.current()
        need_hidden = self.d.hidden is not None and now["hidden_weight"] > 0
        need_attn = need_hidden and self._wants_attention()
        teacher, t_hidden, t_attn = self._teacher(batch, need_hidden, need_attn, now["temperature"])
        alpha = now["alpha"]
        if self.d.entropy_weighting:
            alpha = entropy_kd_weight(teacher_entropy(teacher, batch["labels"], self.d.chunk_size), self.vocab, alpha)
        fused = self.d.fused_lm_head
        # Fused, the loss forms logits chunk by chunk from the hidden states; `logits_to_keep=1` stops
        # the model from also forming the full (B, T, V) logits it would otherwise return.
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            output_hidden_states=need_hidden or fused, output_attentions=need_attn, use_cache=False,
            **({"logits_to_keep": 1} if fused else {}), **({"output_router_logits": True} if self.aux_coef > 0 else {}),
        )
        if fused:
            weight, bias = fused_lm_head_params(model)
            res = distill_loss(
                out.hidden_states[-1], teacher, batch["labels"], kind=self.d.loss, temperature=now["temperature"],
                alpha=alpha, beta=self.d.beta, keep_tail=self.d.keep_tail, chunk_size=self.d.chunk_size,
                lm_head_weight=weight, lm_head_bias=bias,
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
        return self.with_router_loss(loss, out, metrics)

    def with_router_loss(self, loss: torch.Tensor, out, metrics: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, metrics) plus the MoE router's load-balancing loss of the student forward `out`, when it has one."""
        if self.aux_coef > 0:
            loss = loss + self.aux_coef * out.aux_loss
            metrics["router_aux_loss"] = float(out.aux_loss)
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, model, batch: dict[str, Any]) -> dict[str, float]:
        """Sums over target positions: student NLL, and top-1 agreement and KL(teacher‖student) at T = 1.

        `teacher_kl` / `teacher_top1_agreement` are always against the full teacher: the online one,
        or in cached mode the evaluation-only teacher (`_evaluation_teachers`). Cached mode also
        reports `teacher_kl_cache` / `teacher_top1_agreement_cache`, against what the cache holds
        (`cached_teacher_kl`: unbiased for a sampled cache, another distance for a plain top-k
        one); without a teacher on disk those are the only teacher metrics.
        """
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logits, targets = shift(out.logits.float(), batch["labels"])
        sel = targets != IGNORE_INDEX
        n = int(sel.sum())
        nll = F.cross_entropy(logits[sel], targets[sel], reduction="sum").item() if n else 0.0
        metrics = {"nll": nll, "tokens": float(n)}
        student_top1 = logits[sel].argmax(-1)
        if self.d.teacher_mode == "cached":
            cached = self._cached_teacher(batch)
            metrics["teacher_top1_agreement_cache"] = float((student_top1 == cached.ids[:, :-1, 0][sel]).sum()) if n else 0.0
            metrics["teacher_kl_cache"] = float(cached_teacher_kl(out.logits, cached, batch["labels"], self.d.keep_tail, self.d.chunk_size))
            teacher = self._evaluation_teacher(batch)
            if teacher is None:
                return metrics
        else:
            teacher, _, _ = self._teacher(batch, False, False, 1.0)
        agree = float((student_top1 == teacher_top1(teacher, batch["labels"], self.d.chunk_size)).sum()) if n else 0.0
        kl = distill_loss(out.logits.float(), teacher, batch["labels"], kind="forward_kl", temperature=1.0, alpha=1.0,
                          chunk_size=self.d.chunk_size)
        return {**metrics, "teacher_top1_agreement": agree, "teacher_kl": float(kl.kd) * kl.num_tokens}
