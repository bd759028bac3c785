"""Cross-tokenizer distillation pieces: character spans, aligned positions, ULD and the shared-vocabulary divergence.

Teacher and student read the same text through different tokenizers, so neither their positions
nor their vocabularies correspond. Positions are matched through the text: student position s
(predicting student token s+1) and teacher position t (predicting teacher token t+1) are paired
when those next tokens start at the same character, i.e. both models have read exactly text[:c].
Their next-token distributions then live on different vocabularies; Universal Logit Distillation
(Boizard et al., 2024, arXiv 2402.12030) compares them without a token map, as the L1 distance
between the two probability vectors each sorted in descending order (the shorter zero-padded). It
is zero for identical distributions and unchanged by any permutation of either vocabulary, but it
does not say which token should be likely: alone, it rewards a student for being as confident as
the teacher about whatever token it already prefers. Where the vocabularies share token strings,
`hybrid` (as TRL's GOLD) compares those tokens exactly, with the divergence of distill.loss (both
sides renormalised on them), and keeps the sorted comparison for the tokens without a counterpart.

Shapes: n aligned positions, Vs / Vt the student's / teacher's vocabulary, m shared tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distillery.distill.losses import LossKind, divergence


def _spans_by_decoding(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """Exact but O(T²): the span of token i is [len(decode(ids[:i])), len(decode(ids[:i+1]))].
    (A token that completes a multi-byte character only with the next one gets the characters
    when they appear.)"""
    spans, prev = [], 0
    text = ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        end = max(prev, len(text))
        spans.append((prev, end))
        prev = end
    return text, spans


def char_spans(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text `ids` spell and each token's [start, end) character span in it.

    Fast path: decode once, re-encode with offsets (a fast tokenizer); used when the re-encoding
    gives back exactly `ids`. Otherwise the spans come from cumulative decoding (`_spans_by_decoding`).
    """
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError):  # a slow tokenizer has no offsets
        return _spans_by_decoding(tokenizer, ids)
    if list(enc["input_ids"]) == list(ids):
        return text, [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    return _spans_by_decoding(tokenizer, ids)


def align_positions(student_spans: list[tuple[int, int]], teacher_spans: list[tuple[int, int]],
                    student_targets: list[bool]) -> list[tuple[int, int]]:
    """Pairs (s, t) of predicting positions whose next tokens start at the same character.

    student_spans / teacher_spans: [start, end) per token. student_targets[j]: whether student
    token j is a target (its label is not -100). Position s predicts token s+1 (the loss
    convention of distill/losses.py), so a pair needs student token s+1 a non-empty target and
    teacher token t+1 non-empty, starting at the same character, each the first token to start
    there (byte-level pieces of one character share its span). Each student position pairs once;
    pairs come in increasing order.
    """
    teacher_at: dict[int, int] = {}
    for t in range(len(teacher_spans) - 1):
        start, end = teacher_spans[t + 1]
        if end > start and teacher_spans[t][1] <= start:
            teacher_at.setdefault(start, t)  # the first teacher token starting there (as below)
    pairs = []
    for s in range(len(student_spans) - 1):
        start, end = student_spans[s + 1]
        # Byte-level tokens of one multi-byte character share its span: only the first of them (the
        # previous token ends at or before its start) has read exactly text[:start].
        if student_spans[s][1] <= start and end > start and s + 1 < len(student_targets) and student_targets[s + 1] and start in teacher_at:
            pairs.append((s, teacher_at[start]))
    return pairs


def uld_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                 student_ids: torch.Tensor | None = None, teacher_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) Σ_i |sort↓(q)_i − sort↓(p)_i| with p = softmax(teacher / T) (n, Vt), q = softmax(student / T)
    (n, Vs); the shorter sorted vector is zero-padded. With `student_ids` / `teacher_ids` only those
    entries of q and p are sorted and compared (not renormalised): the hybrid loss uses it on the
    tokens without a counterpart. Gradients flow into the student logits (sorting is a
    permutation); the teacher is a constant. Computed in float32."""
    q = F.softmax(student_logits.float() / temperature, -1)
    if student_ids is not None:
        q = q.index_select(-1, student_ids)
    q = q.sort(-1, descending=True).values
    with torch.no_grad():
        p = F.softmax(teacher_logits.float() / temperature, -1)
        if teacher_ids is not None:
            p = p.index_select(-1, teacher_ids)
        p = p.sort(-1, descending=True).values
    width = max(q.shape[-1], p.shape[-1])
    q = F.pad(q, (0, width - q.shape[-1]))
    p = F.pad(p, (0, width - p.shape[-1]))
    return (q - p).abs().sum(-1)


def shared_vocabulary(student_tokenizer, teacher_tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(student_ids (m,), teacher_ids (m,)) of the token strings both vocabularies hold, by student id."""
    teacher = teacher_tokenizer.get_vocab()
    pairs = sorted((i, teacher[tok]) for tok, i in student_tokenizer.get_vocab().items() if tok in teacher)
    return (torch.tensor([s for s, _ in pairs], dtype=torch.long), torch.tensor([t for _, t in pairs], dtype=torch.long))


def shared_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, student_ids: torch.Tensor,
                      teacher_ids: torch.Tensor, kind: LossKind, beta: float, temperature: float) -> torch.Tensor:
    """(n,) `divergence(kind, beta)` between teacher and student restricted to the m shared tokens
    and renormalised there, at `temperature` (student (n, Vs), teacher (n, Vt))."""
    logq = F.log_softmax(student_logits.float().index_select(-1, student_ids) / temperature, -1)
    with torch.no_grad():
        logp = F.log_softmax(teacher_logits.float().index_select(-1, teacher_ids) / temperature, -1)
    return divergence(logp, logq, kind, beta)
