"""Cross-tokenizer distillation pieces: character spans, aligned positions, ULD and the teacher projected onto the student vocabulary.

Teacher and student read the same text through different tokenizers, so neither their positions
nor their vocabularies correspond. Positions are matched through the text: student position s
(predicting student token s+1) and teacher position t (predicting teacher token t+1) are paired
when those next tokens start at the same character, i.e. both models have read exactly text[:c].
Their next-token distributions then live on different vocabularies; Universal Logit Distillation
(Boizard et al., 2024, arXiv 2402.12030) compares them without a token map, as the L1 distance
between the two probability vectors each sorted in descending order (the shorter zero-padded). It
is zero for identical distributions and unchanged by any permutation of either vocabulary, but it
does not say which token should be likely: alone, it rewards a student for being as confident as
the teacher about whatever token it already prefers. `hybrid` instead moves the teacher's
distribution onto the student's vocabulary: each teacher token's probability goes to the student
token its text begins with (both models have read the same text, so that is the teacher's
probability of the next text starting with that student token), and distill.loss compares it
with the student exactly. Tokens the vocabularies share map to themselves; a teacher token longer
than any student token gives its mass to its first piece.

Shapes: n aligned positions, Vs / Vt the student's / teacher's vocabulary.
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


def uld_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(n,) Σ_i |sort↓(q)_i − sort↓(p)_i| with p = softmax(teacher / T) (n, Vt), q = softmax(student / T)
    (n, Vs); the shorter sorted vector is zero-padded. Gradients flow into the student logits
    (sorting is a permutation); the teacher is a constant. Computed in float32."""
    q = F.softmax(student_logits.float() / temperature, -1).sort(-1, descending=True).values
    with torch.no_grad():
        p = F.softmax(teacher_logits.float() / temperature, -1).sort(-1, descending=True).values
    width = max(q.shape[-1], p.shape[-1])
    q = F.pad(q, (0, width - q.shape[-1]))
    p = F.pad(p, (0, width - p.shape[-1]))
    return (q - p).abs().sum(-1)


def projection_map(teacher_tokenizer, student_tokenizer, teacher_size: int) -> torch.Tensor:
    """(teacher_size,) long: for each teacher token, the student token its text begins with (the first
    id of the student's tokenisation of it), or −1 where it spells no whole character (a byte-level
    piece of one) or nothing. A special token maps to the student's token of the same string."""
    s_vocab = student_tokenizer.get_vocab()
    specials = set(teacher_tokenizer.all_special_ids)
    texts = [teacher_tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) if i < len(teacher_tokenizer) else ""
             for i in range(teacher_size)]
    firsts = student_tokenizer(texts, add_special_tokens=False)["input_ids"]
    out = torch.full((teacher_size,), -1, dtype=torch.long)
    for i, (text, ids) in enumerate(zip(texts, firsts)):
        if i in specials:
            tok = teacher_tokenizer.convert_ids_to_tokens(i)
            out[i] = s_vocab.get(tok, -1)
        elif text and "\ufffd" not in text and ids:
            out[i] = ids[0]
    return out


def project_teacher(teacher_logits: torch.Tensor, mapping: torch.Tensor, student_size: int, temperature: float) -> torch.Tensor:
    """(n, Vs) log-probabilities: the teacher's tempered distribution (n, Vt) moved onto the student's
    vocabulary through `mapping` (projection_map: the probability of the next text beginning with
    each student token), renormalised over the mass that maps (−1 entries are dropped)."""
    p = F.softmax(teacher_logits.float() / temperature, -1)
    keep = mapping >= 0
    projected = torch.zeros(p.shape[0], student_size, dtype=p.dtype, device=p.device)
    projected.index_add_(1, mapping[keep], p[:, keep])
    return (projected / projected.sum(-1, keepdim=True).clamp_min(1e-12)).log()


def projected_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mapping: torch.Tensor,
                         kind: LossKind, beta: float, temperature: float) -> torch.Tensor:
    """(n,) `divergence(kind, beta)` between the projected teacher (`project_teacher`) and the
    student (n, Vs), both at `temperature`."""
    with torch.no_grad():
        logp = project_teacher(teacher_logits, mapping, student_logits.shape[-1], temperature)
    logq = F.log_softmax(student_logits.float() / temperature, -1)
    # Student tokens no teacher token begins with get p = 0; reverse KL and JSD(β = 1) see −inf there.
    return divergence(logp, logq, kind, beta)
