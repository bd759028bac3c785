"""Knowledge-distillation losses, pure torch.

Conventions shared by every function here
------------------------------------------
* Shapes: B batch, T sequence length, V vocabulary, H hidden size, K teacher top-k, N = B·T.
* Position shift: like Hugging Face causal-LM logits, the distribution at position t (student
  logits, teacher logits, or the teacher's cached top-k) predicts token t+1. `labels` are the
  prepared-data labels, *not* shifted: `labels[:, t+1]` is the target of position t, and -100
  (prompt, padding) removes position t from every loss. The last position never has a target.
* Temperature: both distributions are softmax(logits / T); the KD term is multiplied by T² so its
  gradient scale does not shrink as T grows (Hinton et al., 2015). CE always uses T = 1.
* Reduction: the mean over target positions (those whose label is not -100).
* Mixing: total = alpha · KD + (1 − alpha) · CE.

Divergences (p teacher, q student, both tempered; sums over the vocabulary):
    forward_kl  KL(p‖q) = Σ p (log p − log q)             mass-covering
    reverse_kl  KL(q‖p) = Σ q (log q − log p)             mode-seeking
    jsd         β·KL(p‖m) + (1−β)·KL(q‖m), m = β·p + (1−β)·q; β = 0 is forward KL and β = 1
                reverse KL exactly (as TRL's `generalized_jsd_loss`, GKD, arXiv 2306.13649)
    tvd         ½ Σ |p − q|

Memory: `distill_loss` never materialises the B×T×V float32 softmax of teacher and student at
once. It walks the target positions in chunks of `chunk_size` and, inside the forward pass,
computes each chunk's loss *and* its gradient (w.r.t. the student logits, or the student hidden
states and lm_head when fused), so autograd keeps no per-chunk softmax for later. Against a dense
teacher that gradient is in closed form (`_dense_chunk`), computed mostly in place. Peak extra
memory is the returned gradient plus about five chunk_size × V float32 tensors. A dense teacher
may itself come as final hidden states and its lm_head (`TeacherHidden`), or several of them
mixed (`TeacherMixture`): each chunk's teacher logits are then formed (and mixed) inside the loop
too, so the teacher's (B, T, V) logits never exist either. `naive_distill_loss` is the textbook form with
the same signature; the two agree in value and gradient (tests/unit/test_losses.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from distillery.distill.mixture import mixture_logits

IGNORE_INDEX = -100  # same value as distillery.data.splits.IGNORE_INDEX (losses import no data code)

LossKind = Literal["forward_kl", "reverse_kl", "jsd", "tvd"]
KINDS: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "tvd")


class VocabularyMismatchError(ValueError):
    """Teacher and student do not share a vocabulary; the message names both sizes."""


def check_vocab(teacher_vocab: int, student_vocab: int, teacher: str = "teacher", student: str = "student") -> None:
    """Refuse a teacher/student pair whose output vocabularies differ, before any training starts.

    `teacher_vocab` / `student_vocab` are the sizes of the lm_head outputs (config.vocab_size);
    `teacher` / `student` name them in the message (e.g. the model paths).
    """
    if int(teacher_vocab) != int(student_vocab):
        raise VocabularyMismatchError(
            f"teacher and student must share a vocabulary: the teacher {teacher} has {teacher_vocab} tokens "
            f"and the student {student} has {student_vocab}. Distil into a student built with the teacher's "
            f"tokenizer (e.g. `distillery init-model ... --tokenizer-from TEACHER`), or set distill.cross_tokenizer "
            f"(e.g. distill.cross_tokenizer.kd=uld) to distil across tokenizers."
        )


# --------------------------------------------------------------------------- divergences


def divergence(teacher_logp: torch.Tensor, student_logq: torch.Tensor, kind: LossKind, beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence between two categorical distributions given as log-probabilities.

    teacher_logp: (n, C) log p; entries may be -inf (zero teacher mass, e.g. outside a top-k).
    student_logq: (n, C) log q; -inf only where teacher_logp is -inf too (a masked entry, e.g. the
                  padding of a sampled cache's rows).
    Returns (n,) float32. Terms with p = 0 contribute 0 (0·log 0 = 0); reverse KL with p = 0
    where q > 0 is +inf, which is why the sparse path never asks for it on such a support.
    An entry with p = q = 0 contributes 0 to every kind, with a zero (not NaN) gradient: its
    log-probabilities are replaced by 0 before any difference is formed (−inf − (−inf) is NaN, and
    autograd would carry that NaN into the gradient even through a `where`).
    """
    p = teacher_logp.exp()
    q = student_logq.exp()
    zero_p = p == 0
    both_zero = zero_p & (q == 0)
    teacher_logp = teacher_logp.masked_fill(both_zero, 0.0)
    student_logq = student_logq.masked_fill(both_zero, 0.0)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return torch.where(zero_p, 0.0, p * (teacher_logp - student_logq)).sum(-1)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return (q * (student_logq - teacher_logp)).sum(-1)
    if kind == "jsd":
        log_m = torch.logaddexp(student_logq + math.log1p(-beta), teacher_logp + math.log(beta))
        kl_pm = torch.where(zero_p, 0.0, p * (teacher_logp - log_m)).sum(-1)
        kl_qm = (q * (student_logq - log_m)).sum(-1)
        return beta * kl_pm + (1 - beta) * kl_qm
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(f"distill.loss must be one of {KINDS}, got '{kind}'")


# --------------------------------------------------------------------------- teacher forms


@dataclass
class SparseTeacher:
    """A teacher known only by a few entries per position (the offline cache's form).

    ids:      (B, T, K) int64 token ids: the top-k head sorted by descending teacher logprob, then
              (with counts) the sampled tail ids, then padding.
    logprobs: (B, T, K) float teacher log-probabilities at temperature 1 (log_softmax over the
              full vocabulary, as stored in the cache), of head and sampled ids alike.
    tail:     (B, T) float log Σ_{x outside the head} p(x)^(1/S): with S = 1 (a plain cache) the
              teacher's mass outside the top-k (keep_tail); with counts, the normaliser of the
              distribution the tail was drawn from.
    counts:   (B, T, K) int or None. None: every entry is a head entry (the plain top-k cache).
              Else, per entry: 0 = a head entry (its probability is exact), c ≥ 1 = a tail id the
              cache drew c times, −1 = padding (no teacher mass, ignored on both sides; its id
              repeats the position's first id so it never lands in the student's rest bucket).
              The draws at a position, m = Σ of its positive counts, came with replacement from
              the teacher's distribution at temperature S restricted to outside the head,
              r(x) = p(x)^(1/S) / exp(tail).
    sample_temperature: S, the temperature the tail was drawn at (distill.cache_sample_temperature).
    Position t predicts token t+1, as dense logits do. Values at positions whose target label is
    -100 are ignored (the cache stores nothing there; collation pads them with zeros).

    With counts (a sampled cache, distill.cache_samples > 0) the target at temperature T is an
    estimate p̂_T of p_T ∝ p^(1/T): head entries p(x)^(1/T) exactly, a drawn id the importance
    weight (c / m) · p(x)^(1/T) / r(x) = (c / m) · exp(tail) · p(x)^(1/T − 1/S), then normalised.
      * T = S: every drawn id gets exp(tail) · c / m, so the estimate already sums to the true
        normaliser (the head's Σ p^(1/T) plus exp(tail)): p̂_T(x) = p_T(x) on the head, the exact
        tempered tail mass times c / m on a drawn id. E[p̂_T] = p_T and Σ p̂_T = 1: unbiased, so the
        forward-KL gradient w.r.t. the student's logits, q_T − p̂_T (the student keeps its full
        softmax), is unbiased too. With S = 1 this is p on the head and tail_mass · c / m.
      * T ≠ S: self-normalised importance weights: consistent as m grows, not unbiased. For T < S
        the weights p^(1/T − 1/S) are bounded; for T > S they grow without bound on rare ids (drawn
        at T = 1, a T = 2 target is very noisy: benchmarks/README.md, "Sparse teacher caches").
      The student side is its full distribution: the support ids plus a rest bucket (its mass on
      every other id, where the teacher estimate is 0). Reverse KL (and jsd with β = 1) would be
      infinite there, so for those the student is restricted to the support and renormalised,
      as for the plain top-k below.

    How a plain top-k teacher (counts None) becomes a distribution (the renormalisation bias):
      * keep_tail=False: p̂ = softmax(logprobs / T) over the K ids, zero elsewhere. At T = 1 this is
        p restricted to the top-k and renormalised, i.e. every kept probability is inflated by
        1 / (top-k mass): the loss over-weights the head by exactly the missing tail mass, and
        gives no signal about how the tail is shaped. The student keeps its full distribution,
        so forward KL / JSD / TVD still push its mass off non-top-k tokens. Reverse KL against a
        zero-tail teacher is infinite; for `reverse_kl` (and jsd with β = 1) the student is
        restricted to the same K ids and renormalised too.
      * keep_tail=True: K + 1 buckets, the K ids plus "everything else"; the teacher's last bucket
        is its true tail mass, the student's is its exact mass outside the K ids. At T = 1 this is
        unbiased on the bucket partition (the teacher's tail is merely coarsened). At T ≠ 1 the
        teacher tail's tempered mass is unknown (it depends on how the tail is spread); it is taken
        as one pseudo-token of logprob `tail`, which under-states the tail for T > 1 and
        over-states it for T < 1.
      With K = V both modes equal the dense loss exactly.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    sample_temperature: float = 1.0


def sampled_target_logprobs(logprobs: torch.Tensor, tail: torch.Tensor, counts: torch.Tensor, temperature: float = 1.0,
                             sample_temperature: float = 1.0) -> torch.Tensor:
    """log p̂_T over a sampled cache's entries (see `SparseTeacher`: head p^(1/T) exactly, a drawn
    tail id the importance weight (c / m) · exp(tail) · p^(1/T − 1/S), then normalised).

    logprobs: (n, K) stored log p at T = 1; tail: (n,) log Σ_tail p^(1/S); counts: (n, K) int
    (−1 padding, 0 head, c ≥ 1 draws); S = sample_temperature. Returns (n, K) float32, −inf on
    padding; each row's probabilities sum to 1 (at T = S they already do up to storage rounding:
    normalising is then a no-op).
    """
    counts = counts.long()
    draws = counts.clamp_min(0).sum(-1, keepdim=True)
    drawn = counts > 0
    log_w = torch.where(
        drawn,
        tail.float().unsqueeze(-1) + counts.clamp_min(1).float().log() - draws.clamp_min(1).float().log(),
        logprobs.float(),
    )
    # head: p^(1/T); drawn: (c / m) · exp(tail) · p^(1/T − 1/S)
    exponent = torch.where(drawn, 1.0 / temperature - 1.0 / sample_temperature, 1.0 / temperature - 1.0)
    log_w = log_w + exponent * logprobs.float()
    return torch.log_softmax(log_w.masked_fill(counts < 0, float("-inf")), dim=-1)


@dataclass
class TeacherHidden:
    """A dense teacher given as final hidden states plus its lm_head, so its logits are only ever
    formed chunk by chunk: hidden (B, T, H_t), weight (V, H_t), bias (V,) or None.
    Only valid for models whose logits are exactly `hidden @ weight.T + bias` (no soft-capping or
    logit scaling). Each chunk's logits are formed in the weight's dtype, as the model's own
    lm_head would form them, then used in float32."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass
class TeacherMixture:
    """Several dense teachers as one (distill/mixture.py): at temperature T the target is
    Σ_i w_i · softmax(z_i / T), mixed chunk by chunk, so no (B, T, V) mixture is ever held.

    teachers: M dense teachers, each (B, T, V) logits or a `TeacherHidden`, same B, T and V.
    weights:  M floats summing to 1.
    """

    teachers: list[torch.Tensor | TeacherHidden]
    weights: list[float]


DenseTeacher = torch.Tensor | TeacherHidden | TeacherMixture
Teacher = DenseTeacher | SparseTeacher


def _sparse_buckets(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    tail: torch.Tensor | None,
    temperature: float,
    kind: LossKind,
    beta: float,
    keep_tail: bool,
    counts: torch.Tensor | None = None,
    sample_temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probabilities over the sparse teacher's support.

    student_logits: (n, V); ids, logprobs: (n, K); tail: (n,) or None; counts: (n, K) or None
    (a sampled cache drawn at `sample_temperature`, see `SparseTeacher`).
    Returns (teacher_logp, student_logq), each (n, K) or (n, K + 1) with a last "rest" bucket.
    """
    V = student_logits.shape[-1]
    K = ids.shape[-1]
    s = student_logits / temperature
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    s_top = s.gather(-1, ids)
    if counts is not None:
        if keep_tail:
            raise ValueError("distill.keep_tail does not apply to a sampled cache (distill.cache_samples > 0): its tail is sampled")
        if tail is None:
            raise ValueError("a sampled teacher cache needs the teacher's tail logprob (teacher_tail_logprob)")
        pad = counts < 0
        teacher_logp = sampled_target_logprobs(logprobs, tail, counts, temperature, sample_temperature)
        s_sup = s_top.masked_fill(pad, float("-inf"))
        if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
            return teacher_logp, torch.log_softmax(s_sup, dim=-1)
        # Padding repeats a support id, so scattering -inf at every id leaves exactly the rest.
        rest = s.scatter(-1, ids, float("-inf"))
        empty = rest.isneginf().all(-1, keepdim=True)  # the support covers the vocabulary
        # logsumexp over an all -inf row has a NaN gradient: give it finite input, then -inf.
        rest_lse = torch.where(empty, float("-inf"), torch.logsumexp(rest.masked_fill(empty, 0.0), dim=-1, keepdim=True))
        student_logq = torch.cat([s_sup, rest_lse], dim=-1) - lse
        teacher_logp = torch.cat([teacher_logp, torch.full_like(teacher_logp[:, :1], float("-inf"))], dim=-1)
        return teacher_logp, student_logq
    has_rest = K < V  # with K = V nothing is outside the top-k: no rest bucket on either side
    if not has_rest or ((kind == "reverse_kl" or (kind == "jsd" and beta == 1)) and not keep_tail):
        return torch.log_softmax(logprobs / temperature, dim=-1), torch.log_softmax(s_top, dim=-1)
    rest_lse = torch.logsumexp(s.scatter(-1, ids, float("-inf")), dim=-1, keepdim=True)
    student_logq = torch.cat([s_top, rest_lse], dim=-1) - lse
    if keep_tail:
        if tail is None:
            raise ValueError("distill.keep_tail needs the teacher's tail logprob (teacher_tail_logprob in the cache)")
        teacher_logp = torch.log_softmax(torch.cat([logprobs, tail.unsqueeze(-1)], dim=-1) / temperature, dim=-1)
    else:
        top = torch.log_softmax(logprobs / temperature, dim=-1)
        teacher_logp = torch.cat([top, torch.full_like(top[:, :1], float("-inf"))], dim=-1)
    return teacher_logp, student_logq


# --------------------------------------------------------------------------- the loss


@dataclass
class DistillLossOutput:
    """loss = alpha·kd + (1 − alpha)·ce (differentiable); kd (already × T²) and ce are detached
    scalars for logging; num_tokens is the number of target positions averaged over."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    num_tokens: int


def target_positions(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (n,) into B·T of positions with a target, and those targets (n,).

    labels: (B, T) unshifted. Position t of row b is kept when labels[b, t+1] != ignore_index.
    """
    B, T = labels.shape
    nxt = torch.full_like(labels, ignore_index)
    nxt[:, :-1] = labels[:, 1:]
    flat = nxt.reshape(-1)
    idx = (flat != ignore_index).nonzero().squeeze(1)
    return idx, flat.index_select(0, idx)


def _dense_vocab(teacher: DenseTeacher) -> int:
    """V of a dense teacher: its logits' last dimension, or its lm_head's rows."""
    if isinstance(teacher, TeacherMixture):
        return _dense_vocab(teacher.teachers[0])
    return teacher.weight.shape[0] if isinstance(teacher, TeacherHidden) else teacher.shape[-1]


def _check_shapes(student_vocab: int, teacher: Teacher) -> None:
    if isinstance(teacher, SparseTeacher):
        if teacher.ids.shape != teacher.logprobs.shape:
            raise ValueError(f"sparse teacher ids {tuple(teacher.ids.shape)} and logprobs {tuple(teacher.logprobs.shape)} differ in shape")
        if teacher.counts is not None and teacher.counts.shape != teacher.ids.shape:
            raise ValueError(f"sparse teacher ids {tuple(teacher.ids.shape)} and counts {tuple(teacher.counts.shape)} differ in shape")
        return
    if isinstance(teacher, TeacherMixture):
        if len(teacher.teachers) != len(teacher.weights) or not teacher.teachers:
            raise ValueError(f"a teacher mixture needs one weight per teacher: {len(teacher.teachers)} teachers, {len(teacher.weights)} weights")
        for member in teacher.teachers:
            _check_shapes(student_vocab, member)
        return
    check_vocab(_dense_vocab(teacher), student_vocab)


def _dense_teacher_chunk(teacher: DenseTeacher, rows: torch.Tensor, temperature: float) -> torch.Tensor:
    """(c, V) float32 teacher logits of the flat positions `rows` (c,), without grad, such that
    softmax(logits / temperature) is the target: a single teacher's own logits, or for a mixture
    T · log Σ_i w_i softmax(z_i / T) (`mixture_logits`) of the members' chunks."""
    with torch.no_grad():
        if isinstance(teacher, TeacherMixture):
            chunks = [_dense_teacher_chunk(t, rows, temperature) for t in teacher.teachers]
            return mixture_logits(chunks, teacher.weights, temperature)
        if isinstance(teacher, TeacherHidden):
            h = teacher.hidden.reshape(-1, teacher.hidden.shape[-1]).index_select(0, rows)
            return F.linear(h.to(teacher.weight.dtype), teacher.weight, teacher.bias).float()
        return teacher.reshape(-1, teacher.shape[-1]).index_select(0, rows).float()


def teacher_top1(teacher: DenseTeacher, labels: torch.Tensor, chunk_size: int | None = None,
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(n,) int64 argmax at T = 1 of a dense teacher at the n target positions (`target_positions`
    order, i.e. row-major over the batch), computed in chunks. labels: (B, T) unshifted."""
    idx, _ = target_positions(labels, ignore_index)
    step = chunk_size or default_chunk_size(_dense_vocab(teacher), idx.numel())
    parts = [_dense_teacher_chunk(teacher, idx[i : i + step], 1.0).argmax(-1) for i in range(0, idx.numel(), step)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=idx.device)


def _sparse_chunk_loss(
    s_logits: torch.Tensor,
    teacher: SparseTeacher,
    rows: torch.Tensor,
    targets: torch.Tensor,
    *,
    kind: LossKind,
    temperature: float,
    beta: float,
    keep_tail: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed KD (× T²) and summed CE of one chunk against a sparse teacher, differentiable.
    s_logits: (c, V) student logits of the flat positions `rows` (c,), with CE targets `targets` (c,)."""
    s_logits = s_logits.float()
    K = teacher.ids.shape[-1]
    ids = teacher.ids.reshape(-1, K).index_select(0, rows).long()
    lp = teacher.logprobs.reshape(-1, K).index_select(0, rows).float()
    tail = None if teacher.tail is None else teacher.tail.reshape(-1).index_select(0, rows).float()
    counts = None if teacher.counts is None else teacher.counts.reshape(-1, K).index_select(0, rows)
    t_logp, s_logq = _sparse_buckets(s_logits, ids, lp, tail, temperature, kind, beta, keep_tail, counts, teacher.sample_temperature)
    kd = divergence(t_logp, s_logq, kind, beta).sum() * temperature**2
    ce = F.cross_entropy(s_logits, targets, reduction="sum")
    return kd, ce

def _dense_chunk(
    s_logits: torch.Tensor,
    t_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    kind: LossKind,
    temperature: float,
    beta: float,
    alpha: float,
    n: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk against a dense teacher, with its gradient in closed form.

    s_logits: (c, V) student logits (any float dtype; not modified); t_logits: (c, V) teacher
    logits; targets: (c,) CE targets; n: positions the loss is averaged over.
    Returns (kd_sum × T², ce_sum, grad) with grad (c, V) float32 = d[(alpha·kd·T² + (1 − alpha)·ce)/n]
    / d s_logits. Autograd through `divergence` would keep about ten (c, V) tensors alive for
    backward; here at most five exist at once, most ops run in place, and the value is the same.

    With s = logits/T, q = softmax(s), p the teacher, every divergence J has dJ/ds = q ⊙ (g − Σ q·g)
    for g = dJ/dq: forward KL gives q − p directly; reverse KL g = log q − log p; generalised JSD
    g = (1 − β)(log q − log m) (the p and q terms of m cancel); TVD g = ½ sign(q − p).
    """
    T = temperature
    z = s_logits.float()
    # CE first, while nothing else is allocated: Σ logsumexp(z) − z[target]
    ce = (torch.logsumexp(z, dim=-1) - z.gather(1, targets.unsqueeze(1)).squeeze(1)).sum()
    logq = torch.log_softmax(z / T, dim=-1)
    logp = torch.log_softmax(t_logits.float() / T, dim=-1)
    del t_logits  # the caller's chunk copy of the teacher logits: freed here
    forward = kind == "forward_kl" or (kind == "jsd" and beta == 0)
    reverse = kind == "reverse_kl" or (kind == "jsd" and beta == 1)
    if forward:
        p = logp.exp()
        d = logp.sub_(logq).mul_(p).masked_fill_(p == 0, 0.0)  # p·(log p − log q), 0·log 0 = 0
        kd = d.sum()
        del d
        grad = logq.exp_().sub_(p)  # q − p
    elif reverse:
        q = logq.exp()
        g = logq.sub_(logp)
        del logp
        kd_rows = g.mul_(q).sum(-1, keepdim=True)  # q·(log q − log p), summed per position
        kd = kd_rows.sum()
        grad = g.addcmul_(q, kd_rows, value=-1.0)
    elif kind == "jsd":
        log_m = logq + math.log1p(-beta)
        log_m = torch.logaddexp(log_m, logp + math.log(beta), out=log_m)
        p = logp.exp()
        kl_pm = logp.sub_(log_m).mul_(p).masked_fill_(p == 0, 0.0).sum()
        del logp
        g = log_m.neg_().add_(logq)  # log q − log m
        q = logq.exp_()
        kl_qm_rows = g.mul_(q).sum(-1, keepdim=True)
        kd = beta * kl_pm + (1 - beta) * kl_qm_rows.sum()
        grad = g.addcmul_(q, kl_qm_rows, value=-1.0).mul_(1 - beta)
    elif kind == "tvd":
        q = logq.exp_()
        d = logp.exp_().neg_().add_(q)  # q − p
        kd = 0.5 * d.abs().sum()
        g = d.sign_().mul_(0.5).mul_(q)
        grad = g.addcmul_(q, g.sum(-1, keepdim=True), value=-1.0)
    else:
        raise ValueError(f"distill.loss must be one of {KINDS}, got '{kind}'")
    # d(kd·T²)/dz = T · dkd/ds; CE adds (1 − alpha)·(softmax(z) − onehot(target))
    grad.mul_(alpha * T)
    if alpha != 1:
        grad.add_(torch.softmax(z, dim=-1), alpha=1 - alpha)
        grad.scatter_add_(1, targets.unsqueeze(1), torch.full_like(z[:, :1], alpha - 1))
    return kd * T**2, ce, grad.div_(n)


class _ChunkedDistill(torch.autograd.Function):
    """Loss and gradient per chunk inside forward; backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx, student, weight, bias, opts):  # type: ignore[override]
        teacher, idx, targets, alpha, kw, chunk = opts
        n = idx.numel()
        flat = student.reshape(-1, student.shape[-1])
        need = [t is not None and t.requires_grad for t in (student, weight, bias)]
        g_flat = torch.zeros_like(flat) if need[0] else None
        g_w = torch.zeros_like(weight, dtype=torch.float32) if need[1] else None
        g_b = torch.zeros_like(bias, dtype=torch.float32) if need[2] else None
        w = weight.detach().requires_grad_(need[1]) if weight is not None else None
        b = bias.detach().requires_grad_(need[2]) if bias is not None else None
        kd_sum = torch.zeros((), dtype=torch.float32, device=flat.device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=flat.device)
        dense = not isinstance(teacher, SparseTeacher)
        for i in range(0, n, chunk):
            rows = idx[i : i + chunk]
            if dense:
                x = flat.index_select(0, rows).detach()
                s_logits = F.linear(x, w, b) if w is not None else x
                kd, ce, g = _dense_chunk(s_logits, _dense_teacher_chunk(teacher, rows, kw["temperature"]), targets[i : i + chunk],
                                         kind=kw["kind"], temperature=kw["temperature"], beta=kw["beta"], alpha=alpha, n=n)
                del s_logits
                g = g.to(w.dtype) if w is not None else g
                if need[0]:
                    g_flat.index_copy_(0, rows, (g @ w if w is not None else g).to(g_flat.dtype))
                if need[1]:
                    g_w.add_(g.t() @ x)
                if need[2]:
                    g_b.add_(g.sum(0))
                kd_sum += kd
                ce_sum += ce
                continue
            # sparse (cached) teacher: the support is the top-k plus a rest bucket; autograd per chunk
            x = flat.index_select(0, rows).detach().requires_grad_(need[0])
            with torch.enable_grad():
                s_logits = F.linear(x, w, b) if w is not None else x
                kd, ce = _sparse_chunk_loss(s_logits, teacher, rows, targets[i : i + chunk], **kw)
                total = (alpha * kd + (1 - alpha) * ce) / n
            wrt = [t for t, nd in zip((x, w, b), need) if nd]
            if wrt:
                grads = iter(torch.autograd.grad(total, wrt))
                if need[0]:
                    g_flat.index_copy_(0, rows, next(grads).to(g_flat.dtype))
                if need[1]:
                    g_w += next(grads)
                if need[2]:
                    g_b += next(grads)
            kd_sum += kd.detach()
            ce_sum += ce.detach()
        ctx.grads = (
            None if g_flat is None else g_flat.view_as(student),
            None if g_w is None else g_w.to(weight.dtype),
            None if g_b is None else g_b.to(bias.dtype),
        )
        denom = max(n, 1)
        kd_mean, ce_mean = kd_sum / denom, ce_sum / denom
        ctx.mark_non_differentiable(kd_mean, ce_mean)
        return (alpha * kd_sum + (1 - alpha) * ce_sum) / denom, kd_mean, ce_mean

    @staticmethod
    def backward(ctx, g_loss, _g_kd, _g_ce):  # type: ignore[override]
        # Scaled in place: the stored gradients belong to this call alone, and a copy of the (B, T, V)
        # student gradient would be the largest tensor of the whole loss.
        out = tuple(None if g is None else g.mul_(g_loss.to(g.dtype)) for g in ctx.grads)
        ctx.grads = None
        return (*out, None)


CHUNK_VALUES = 2**22  # at most this many logits per chunk by default (16 MiB in float32)
CHUNKS_PER_CALL = 32  # ... and at least this many chunks, so the ~5 chunk tensors stay ~1/6 of the (N, V) gradient,
MIN_CHUNK_VALUES = 2**21  # ... unless that makes chunks under 8 MiB, where memory no longer matters but per-chunk overhead does
FUSED_MIN_CHUNK = 256  # fused chunks re-read the whole (V, H) lm_head: fewer rows leave the matmuls memory-bound


def default_chunk_size(vocab: int, positions: int | None = None, fused: bool = False) -> int:
    """Positions per chunk when distill.chunk_size is unset: CHUNK_VALUES / V (128 at a 32k
    vocabulary, 32 at 128k); fewer when `positions` (target positions per call) would otherwise
    give under CHUNKS_PER_CALL chunks, but not below MIN_CHUNK_VALUES / V; at least 16, and at least
    FUSED_MIN_CHUNK when fused with the lm_head, where every chunk's matmuls read all V·H weights."""
    v = max(vocab, 1)
    rows = CHUNK_VALUES // v
    if positions:
        rows = min(rows, max(positions // CHUNKS_PER_CALL, MIN_CHUNK_VALUES // v))
    rows = max(16, rows)
    return max(rows, FUSED_MIN_CHUNK) if fused else rows


def distill_loss(
    student: torch.Tensor,
    teacher: Teacher,
    labels: torch.Tensor,
    *,
    kind: LossKind = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 0.5,
    keep_tail: bool = False,
    chunk_size: int | None = None,
    lm_head_weight: torch.Tensor | None = None,
    lm_head_bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> DistillLossOutput:
    """alpha·KD + (1 − alpha)·CE over the target positions, computed `chunk_size` positions at a time.

    student: (B, T, V) student logits; or, fused, (B, T, H) final hidden states with
             lm_head_weight (V, H) [and lm_head_bias (V,)], so student logits exist per chunk only.
    teacher: (B, T, V) teacher logits, a `TeacherHidden` (fused teacher lm_head: each chunk's
             teacher logits formed here from its hidden states), a `TeacherMixture` of those
             (mixed per chunk at `temperature`), or a `SparseTeacher` (top-k ids/logprobs from the
             cache, (B, T, K)).
    labels:  (B, T) unshifted labels, -100 where there is no target (see module docstring).
    kind, temperature, beta: the divergence (distill.loss / temperature / beta); KD is × T².
    alpha:   weight of KD (distill.alpha); CE at T = 1 takes 1 − alpha.
    keep_tail: sparse teachers only, see `SparseTeacher`.
    chunk_size: positions per chunk; None: `default_chunk_size(V, target positions, fused)`.
    Returns DistillLossOutput; `.loss` backpropagates into `student`, `lm_head_weight` and
    `lm_head_bias`, with the same value and gradient as `naive_distill_loss` up to float rounding.
    Raises VocabularyMismatchError when teacher and student vocabularies differ.
    """
    if kind not in KINDS:
        raise ValueError(f"distill.loss must be one of {KINDS}, got '{kind}'")
    V = lm_head_weight.shape[0] if lm_head_weight is not None else student.shape[-1]
    _check_shapes(V, teacher)
    idx, targets = target_positions(labels, ignore_index)
    if chunk_size is None:
        chunk_size = default_chunk_size(V, idx.numel(), fused=lm_head_weight is not None)
    if chunk_size < 1:
        raise ValueError(f"distill.chunk_size must be at least 1, got {chunk_size}")
    kw = dict(kind=kind, temperature=float(temperature), beta=float(beta), keep_tail=keep_tail)
    loss, kd, ce = _ChunkedDistill.apply(
        student, lm_head_weight, lm_head_bias, (teacher, idx, targets, float(alpha), kw, int(chunk_size))
    )
    return DistillLossOutput(loss=loss, kd=kd, ce=ce, num_tokens=int(idx.numel()))


def naive_distill_loss(
    student: torch.Tensor,
    teacher: Teacher,
    labels: torch.Tensor,
    *,
    kind: LossKind = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 0.5,
    keep_tail: bool = False,
    lm_head_weight: torch.Tensor | None = None,
    lm_head_bias: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,  # accepted and ignored so both forms take the same arguments
) -> DistillLossOutput:
    """The full-vocabulary form of `distill_loss` (same arguments and result): every B×T×V
    logit and softmax is held at once and autograd keeps them all. The reference and baseline."""
    V = lm_head_weight.shape[0] if lm_head_weight is not None else student.shape[-1]
    _check_shapes(V, teacher)
    s_logits = F.linear(student, lm_head_weight, lm_head_bias) if lm_head_weight is not None else student
    s_logits = s_logits.float()
    B, T, _ = s_logits.shape
    nxt = torch.full_like(labels, ignore_index)
    nxt[:, :-1] = labels[:, 1:]
    mask = nxt != ignore_index
    n = int(mask.sum())
    if isinstance(teacher, SparseTeacher):
        t_logp, s_logq = _sparse_buckets(
            s_logits.reshape(B * T, V),
            teacher.ids.reshape(B * T, -1).long(),
            teacher.logprobs.reshape(B * T, -1).float(),
            None if teacher.tail is None else teacher.tail.reshape(-1).float(),
            temperature, kind, beta, keep_tail,
            None if teacher.counts is None else teacher.counts.reshape(B * T, -1), teacher.sample_temperature,
        )
    else:
        t_logits = _dense_teacher_chunk(teacher, torch.arange(B * T, device=s_logits.device), temperature)
        t_logp = torch.log_softmax(t_logits / temperature, dim=-1)
        s_logq = torch.log_softmax(s_logits.reshape(B * T, V) / temperature, dim=-1)
    per_pos = divergence(t_logp, s_logq, kind, beta) * temperature**2
    m = mask.reshape(-1)
    kd = (per_pos * m).sum() / max(n, 1)
    ce = F.cross_entropy(s_logits.reshape(B * T, V), nxt.reshape(-1), ignore_index=ignore_index, reduction="sum") / max(n, 1)
    loss = alpha * kd + (1 - alpha) * ce
    return DistillLossOutput(loss=loss, kd=kd.detach(), ce=ce.detach(), num_tokens=n)


def cached_teacher_kl(student_logits: torch.Tensor, teacher: SparseTeacher, labels: torch.Tensor, keep_tail: bool = False,
                      chunk_size: int | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """KL(teacher ‖ student) at T = 1 summed over the target positions, as far as a cache tells it;
    a detached scalar.

    student_logits: (B, T, V); teacher: (B, T, K); labels: (B, T) unshifted.
    Sampled cache (counts): the importance-sampling estimate Σ p̂ · (log p − log q) over head and
    drawn ids (the stored log p, not log p̂, so the entropy term is estimated too), unbiased for the
    full KL when the tail was drawn at T = 1, consistent otherwise. Plain top-k: the KL to the renormalised top-k (or its k + 1 buckets with
    keep_tail), another distance: a student trained on that cache looks closer than it is.
    """
    if teacher.counts is None:
        out = distill_loss(student_logits.float(), teacher, labels, kind="forward_kl", temperature=1.0, alpha=1.0,
                           keep_tail=keep_tail, chunk_size=chunk_size, ignore_index=ignore_index)
        return out.kd * out.num_tokens
    idx, _ = target_positions(labels, ignore_index)
    V, K = student_logits.shape[-1], teacher.ids.shape[-1]
    step = chunk_size or default_chunk_size(V, idx.numel())
    total = torch.zeros((), dtype=torch.float32)
    with torch.no_grad():
        for i in range(0, idx.numel(), step):
            rows = idx[i : i + step]
            logq = torch.log_softmax(student_logits.reshape(-1, V).index_select(0, rows).float(), dim=-1)
            ids = teacher.ids.reshape(-1, K).index_select(0, rows).long()
            lp = teacher.logprobs.reshape(-1, K).index_select(0, rows).float()
            counts = teacher.counts.reshape(-1, K).index_select(0, rows)
            w = sampled_target_logprobs(lp, teacher.tail.reshape(-1).index_select(0, rows), counts, 1.0, teacher.sample_temperature).exp()  # 0 on padding
            total += (w * (lp - logq.gather(-1, ids))).sum().cpu()
    return total


# --------------------------------------------------------------------------- dynamic weight


def teacher_entropy(teacher: Teacher, labels: torch.Tensor, chunk_size: int | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean entropy (nats, T = 1) of the teacher over the target positions; a detached scalar.

    teacher: (B, T, V) logits, TeacherHidden, TeacherMixture (the entropy of Σ w_i softmax(z_i), the
             mixture at T = 1) or SparseTeacher (entropy of the renormalised top-k; with counts,
             the sampled estimate −Σ p̂ · log p of the full entropy).
    labels:  (B, T) unshifted. Computed in chunks like `distill_loss`.
    """
    idx, _ = target_positions(labels, ignore_index)
    if chunk_size is None:
        chunk_size = default_chunk_size(teacher.logprobs.shape[-1] if isinstance(teacher, SparseTeacher) else _dense_vocab(teacher))
    total = torch.zeros((), dtype=torch.float32)
    with torch.no_grad():
        for i in range(0, idx.numel(), chunk_size):
            rows = idx[i : i + chunk_size]
            if isinstance(teacher, SparseTeacher) and teacher.counts is not None:
                # sampled cache: the importance-sampling estimate −Σ p̂ · log p (unbiased for H(p))
                K = teacher.logprobs.shape[-1]
                lp = teacher.logprobs.reshape(-1, K).index_select(0, rows).float()
                w = sampled_target_logprobs(lp, teacher.tail.reshape(-1).index_select(0, rows),
                                            teacher.counts.reshape(-1, K).index_select(0, rows), 1.0, teacher.sample_temperature).exp()
                total += -(w * lp).sum().cpu()
                continue
            if isinstance(teacher, SparseTeacher):
                K = teacher.logprobs.shape[-1]
                logp = torch.log_softmax(teacher.logprobs.reshape(-1, K).index_select(0, rows).float(), dim=-1)
            else:
                logp = torch.log_softmax(_dense_teacher_chunk(teacher, rows, 1.0), dim=-1)
            total += torch.where(logp.isneginf(), 0.0, -logp.exp() * logp).sum().cpu()
    return total / max(idx.numel(), 1)


def entropy_kd_weight(entropy: float | torch.Tensor, vocab_size: int, alpha: float, floor: float = 0.0) -> float:
    """Per-batch KD weight that trusts a confident teacher more: alpha · (1 − H / log V), at least `floor`.

    entropy: the batch's mean teacher entropy in nats (`teacher_entropy`); log V is the largest
    possible entropy, so a uniform teacher gets weight `floor` and a one-hot teacher gets alpha.
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    h = float(entropy)
    frac = min(max(h / math.log(vocab_size), 0.0), 1.0)
    return max(alpha * (1.0 - frac), floor)


# --------------------------------------------------------------------------- schedules


ScheduleKind = Literal["constant", "linear", "cosine", "step"]


def schedule(kind: ScheduleKind, start: float, end: float, step: int, total_steps: int, num_stages: int = 4) -> float:
    """A value (temperature, alpha, a feature-loss weight) moved from `start` to `end` over training.

    constant: start throughout.  linear: straight line.  cosine: half-cosine ease.
    step: `num_stages` equal plateaus, the first at start and the last at end.
    `step` is clamped to [0, total_steps]; with total_steps <= 0 every non-constant kind gives `end`.
    """
    if kind == "constant":
        return float(start)
    if total_steps <= 0:
        return float(end)
    frac = min(max(step / total_steps, 0.0), 1.0)
    if kind == "linear":
        return start + (end - start) * frac
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))
    if kind == "step":
        if num_stages < 2:
            raise ValueError(f"a step schedule needs num_stages >= 2, got {num_stages}")
        stage = min(int(frac * num_stages), num_stages - 1)
        return start + (end - start) * stage / (num_stages - 1)
    raise ValueError(f"schedule kind must be one of constant, linear, cosine, step; got '{kind}'")


# --------------------------------------------------------------------------- feature distillation


def layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Evenly spaced (student_layer, teacher_layer) pairs: student layer i ↔ teacher layer
    round((i + 1) · L_t / L_s) − 1, so the last layers always pair up."""
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"layer counts must be positive, got student {student_layers}, teacher {teacher_layers}")
    return [(i, max(round((i + 1) * teacher_layers / student_layers) - 1, 0)) for i in range(student_layers)]


def feature_projection(student_hidden: int, teacher_hidden: int) -> torch.nn.Linear | None:
    """The learned map from student to teacher hidden size (Linear without bias), or None when equal.
    It trains with the student and is discarded after distillation."""
    if student_hidden == teacher_hidden:
        return None
    return torch.nn.Linear(student_hidden, teacher_hidden, bias=False)


def hidden_state_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    kind: Literal["mse", "cosine"] = "mse",
    projection: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Feature distillation between one mapped pair of layers.

    student_hidden: (B, T, H_s); teacher_hidden: (B, T, H_t) (detached inside);
    mask: (B, T) bool/0-1, positions that count (e.g. attention_mask), None for all;
    projection: maps H_s → H_t when they differ (`feature_projection`).
    mse: mean over kept positions of the mean squared error over H_t.
    cosine: mean over kept positions of 1 − cos(student, teacher).
    Returns a scalar.
    """
    s = student_hidden
    if projection is not None:
        # In the projection's dtype: under FSDP2 mixed precision the student's hidden states are bf16,
        # the projection (outside the wrapper) keeps fp32 weights.
        w = next(projection.parameters(), None)
        s = projection(s if w is None else s.to(w.dtype))
    t = teacher_hidden.detach().to(s.dtype)
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(
            f"hidden sizes differ (student {s.shape[-1]}, teacher {t.shape[-1]}): pass feature_projection({student_hidden.shape[-1]}, {t.shape[-1]})"
        )
    if kind == "mse":
        per_pos = (s - t).pow(2).mean(-1)
    elif kind == "cosine":
        per_pos = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    else:
        raise ValueError(f"hidden-state loss must be 'mse' or 'cosine', got '{kind}'")
    if mask is None:
        return per_pos.mean()
    m = mask.to(per_pos.dtype)
    return (per_pos * m).sum() / m.sum().clamp_min(1)


def attention_kl(student_attn: torch.Tensor, teacher_attn: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-12) -> torch.Tensor:
    """KL(teacher ‖ student) between attention probabilities of one mapped layer.

    student_attn, teacher_attn: (B, heads, T, T) attention probabilities (rows sum to 1 over the
    last, key, dimension; e.g. `output_attentions=True` with eager attention). Head counts must
    match. mask: (B, T) query positions that count. Returns the mean over batch, heads and kept
    queries of Σ_k p log(p / q). `eps` guards log 0 of masked keys.
    """
    if student_attn.shape[1] != teacher_attn.shape[1]:
        raise ValueError(
            f"attention distillation needs equal head counts: student has {student_attn.shape[1]}, teacher {teacher_attn.shape[1]}"
        )
    if student_attn.shape != teacher_attn.shape:
        raise ValueError(f"attention shapes differ: student {tuple(student_attn.shape)}, teacher {tuple(teacher_attn.shape)}")
    p = teacher_attn.detach().float()
    q = student_attn.float()
    per_q = (p * (torch.log(p + eps) - torch.log(q + eps))).sum(-1)  # (B, heads, T)
    if mask is None:
        return per_q.mean()
    m = mask.to(per_q.dtype).unsqueeze(1).expand_as(per_q)
    return (per_q * m).sum() / m.sum().clamp_min(1)
