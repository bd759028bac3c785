"""Cross-tokenizer pieces: character spans, position alignment by offsets, ULD and the shared-token divergence."""

from __future__ import annotations

import pytest
import torch

from distillery.distill.cross_tokenizer import (
    _spans_by_decoding, align_positions, char_spans, project_teacher, projected_divergence, projection_map, uld_distance,
)
from distillery.distill.losses import divergence
from distillery.models.init_model import train_tokenizer

TEXTS = ["The cat sat on the mat. 猫坐在垫子上。 12 + 30 = 42"] * 20 + ["A dog ran to the park and sat down."] * 20


@pytest.fixture(scope="module")
def tokenizers():
    """Two byte-level BPE tokenizers trained on the same text to different sizes: other tokens, other ids."""
    return train_tokenizer(iter(TEXTS), 300), train_tokenizer(iter(TEXTS[::-1] + ["the the the cat cat"] * 30), 280)


def test_alignment_on_hand_made_offsets():
    # text "The cat sat": student "The| cat| sat", teacher "Th|e| c|at| sat"
    student = [(0, 3), (3, 7), (7, 11)]
    teacher = [(0, 2), (2, 3), (3, 5), (5, 7), (7, 11)]
    # student position 0 predicts " cat" (starts at 3, teacher token 2 " c" starts there: position 1);
    # position 1 predicts " sat" (7; teacher token 4: position 3)
    assert align_positions(student, teacher, [False, True, True]) == [(0, 1), (1, 3)]
    assert align_positions(student, teacher, [False, False, True]) == [(1, 3)]  # only target tokens
    # a start no teacher token shares gives no pair; empty spans never pair
    assert align_positions([(0, 2), (2, 4)], [(0, 1), (1, 4)], [True, True]) == []
    assert align_positions([(0, 2), (2, 2), (2, 4)], [(0, 2), (2, 2), (2, 4)], [True] * 3) == [(1, 1)]
    # byte pieces of one character (same span): only the first piece's position pairs
    assert align_positions([(0, 1), (1, 2), (1, 2), (2, 3)], [(0, 1), (1, 2), (2, 3)], [True] * 4) == [(0, 0), (2, 1)]


def test_char_spans_reproduce_the_text_and_align_two_real_tokenizers(tokenizers):
    s_tok, t_tok = tokenizers
    text = "The cat sat on the mat. 猫坐在垫子上。 12 + 30 = 42"
    s_ids = s_tok(text, add_special_tokens=False)["input_ids"]
    t_ids = t_tok(text, add_special_tokens=False)["input_ids"]
    assert s_ids != t_ids or s_tok.get_vocab() != t_tok.get_vocab()
    s_text, s_spans = char_spans(s_tok, s_ids)
    t_text, t_spans = char_spans(t_tok, t_ids)
    assert s_text == t_text == text
    # Spans cover the text in order; byte-level pieces of a multi-byte character overlap on it.
    assert s_spans[0][0] == 0 and s_spans[-1][1] == len(text)
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(s_spans, s_spans[1:]))
    assert all(a1 <= b0 for (_, b0), (a1, _) in zip(s_spans, s_spans[1:]))  # no gap between tokens
    slow_text, slow_spans = _spans_by_decoding(s_tok, s_ids)  # the fallback agrees on ASCII-only prefixes too
    assert slow_text == text and slow_spans[0] == s_spans[0]
    pairs = align_positions(s_spans, t_spans, [True] * len(s_ids))
    assert pairs and all(s_spans[s + 1][0] == t_spans[t + 1][0] for s, t in pairs)
    # both sides have read the same text: each pair's prefix is text[:start] on both
    assert all(s_spans[s][1] <= s_spans[s + 1][0] and t_spans[t][1] <= t_spans[t + 1][0] for s, t in pairs)
    assert [s for s, _ in pairs] == sorted({s for s, _ in pairs})


def test_fallback_spans_tile_the_decoded_text(tokenizers):
    s_tok, _ = tokenizers
    ids = s_tok("A dog ran to the park.", add_special_tokens=False)["input_ids"]
    text, spans = _spans_by_decoding(s_tok, ids)
    assert text == "A dog ran to the park." and spans[-1][1] == len(text)
    assert all(a <= b for a, b in spans) and all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))


def test_uld_is_zero_for_identical_distributions_and_permutation_invariant():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 7, generator=g)
    assert torch.allclose(uld_distance(s, s.clone(), 1.3), torch.zeros(5), atol=1e-6)
    perm_s, perm_t = torch.randperm(7, generator=g), torch.randperm(11, generator=g)
    t = torch.randn(5, 11, generator=g)
    base = uld_distance(s, t, 2.0)
    assert torch.allclose(uld_distance(s[:, perm_s], t[:, perm_t], 2.0), base, atol=1e-6)
    assert (base > 0).all()


def test_uld_hand_value_and_naive_twin():
    # p = (0.5, 0.3, 0.2) (teacher, 3 tokens), q = (0.1, 0.9) (student, 2 tokens):
    # sorted q (0.9, 0.1, 0), sorted p (0.5, 0.3, 0.2): |0.4| + |−0.2| + |−0.2| = 0.8
    s = torch.tensor([[0.1, 0.9]]).log()
    t = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert float(uld_distance(s, t, 1.0)) == pytest.approx(0.8, abs=1e-6)
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    naive = []
    for i in range(4):
        q = sorted(torch.softmax(s[i] / 1.5, -1).tolist(), reverse=True)
        p = sorted(torch.softmax(t[i] / 1.5, -1).tolist(), reverse=True)
        naive.append(sum(abs(a - b) for a, b in zip(q, p)))
    assert torch.allclose(uld_distance(s, t, 1.5), torch.tensor(naive), atol=1e-6)


def test_uld_gradient():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(3, 6, dtype=torch.float64, generator=g)
    s = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)

    def f(x):  # the float64 form of the same expression (uld_distance computes in float32)
        q = torch.softmax(x / 1.2, -1).sort(-1, descending=True).values
        p = torch.softmax(t / 1.2, -1).sort(-1, descending=True).values
        return (torch.nn.functional.pad(q, (0, 2)) - p).abs().sum(-1)

    assert torch.autograd.gradcheck(f, (s,))
    (grad_ours,) = torch.autograd.grad(uld_distance(s.float(), t.float(), 1.2).sum(), s)
    (grad_ref,) = torch.autograd.grad(f(s).sum(), s)
    assert torch.allclose(grad_ours, grad_ref, atol=1e-5)


def test_projection_maps_each_teacher_token_to_the_student_token_its_text_begins_with(tokenizers):
    s_tok, t_tok = tokenizers
    mapping = projection_map(t_tok, s_tok, len(t_tok) + 3)  # an output layer padded beyond the tokenizer
    assert mapping.shape == (len(t_tok) + 3,) and (mapping[len(t_tok):] == -1).all()
    s_vocab, t_vocab = s_tok.get_vocab(), t_tok.get_vocab()
    for tok in ("Ġcat", "Ġthe", "<|im_end|>"):
        if tok in s_vocab and tok in t_vocab:
            assert int(mapping[t_vocab[tok]]) == s_vocab[tok]  # shared tokens map to themselves
    for i in range(len(t_tok)):
        text = t_tok.decode([i])
        if int(mapping[i]) >= 0 and i not in t_tok.all_special_ids:
            assert text.startswith(s_tok.decode([int(mapping[i])]))
    assert (mapping[: len(t_tok)] >= 0).float().mean() > 0.5


def test_projected_teacher_sums_the_mass_of_tokens_with_one_first_piece():
    # teacher tokens 0..3 map to student tokens 1, 1, 0, -1 (the last spells no whole character)
    mapping = torch.tensor([1, 1, 0, -1])
    teacher = torch.tensor([[0.2, 0.3, 0.1, 0.4]]).log()
    logp = project_teacher(teacher, mapping, 3, 1.0)
    assert torch.allclose(logp.exp(), torch.tensor([[1 / 6, 5 / 6, 0.0]]), atol=1e-6)
    # identical vocabularies (identity map): the plain divergence
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    for kind, beta in (("forward_kl", 0.5), ("jsd", 0.3), ("tvd", 0.5)):
        want = divergence(torch.log_softmax(t / 2, -1), torch.log_softmax(s / 2, -1), kind, beta)
        assert torch.allclose(projected_divergence(s, t, torch.arange(9), kind, beta, 2.0), want, atol=1e-5)
    assert torch.allclose(projected_divergence(s, s, torch.arange(9), "forward_kl", 0.5, 1.0), torch.zeros(4), atol=1e-6)
