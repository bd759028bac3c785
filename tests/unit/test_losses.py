"""KD losses against naive references written from the definitions (float64, full vocabulary)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distillery.distill.losses import (
    KINDS,
    SparseTeacher,
    TeacherHidden,
    VocabularyMismatchError,
    attention_kl,
    check_vocab,
    distill_loss,
    entropy_kd_weight,
    feature_projection,
    hidden_state_loss,
    layer_map,
    naive_distill_loss,
    schedule,
    teacher_entropy,
)

B, T, V, H = 3, 9, 37, 16


def _labels(seed: int = 0) -> torch.Tensor:
    """Row 0: prompt of 3 then targets; row 1: targets then padding; row 2: no target at all
    except one; -100 marks prompt and padding."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :3] = -100
    y[1, 6:] = -100
    y[2, :] = -100
    y[2, 4] = 7
    return y


def _logits(seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g) * scale


def reference(student, teacher, labels, kind, temperature, alpha=1.0, beta=0.5):
    """Textbook KD in float64: shift, mask, full-vocabulary softmaxes, mean over targets."""
    s = student[:, :-1].double()
    t = teacher[:, :-1].double()
    y = labels[:, 1:]
    keep = y != -100
    s, t, y = s[keep], t[keep], y[keep]
    p = torch.softmax(t / temperature, -1)
    q = torch.softmax(s / temperature, -1)
    if kind == "forward_kl":
        d = (p * (p.log() - q.log())).sum(-1)
    elif kind == "reverse_kl":
        d = (q * (q.log() - p.log())).sum(-1)
    elif kind == "jsd":
        m = beta * p + (1 - beta) * q
        d = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    else:
        d = 0.5 * (p - q).abs().sum(-1)
    kd = d.mean() * temperature**2
    ce = F.cross_entropy(s, y)
    return alpha * kd + (1 - alpha) * ce, kd, ce


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_values_match_reference(kind, temperature):
    s, t, y = _logits(1), _logits(2), _labels()
    for alpha in (1.0, 0.3):
        ref_loss, ref_kd, ref_ce = reference(s, t, y, kind, temperature, alpha)
        for fn in (distill_loss, naive_distill_loss):
            out = fn(s, t, y, kind=kind, temperature=temperature, alpha=alpha, chunk_size=4)
            assert out.num_tokens == int((y[:, 1:] != -100).sum())
            assert torch.allclose(out.loss.double(), ref_loss, rtol=1e-5, atol=1e-6), (fn.__name__, out.loss, ref_loss)
            assert torch.allclose(out.kd.double(), ref_kd, rtol=1e-5, atol=1e-6)
            assert torch.allclose(out.ce.double(), ref_ce, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.9, 1.0])
def test_jsd_endpoints_and_interior(beta):
    s, t, y = _logits(3), _logits(4), _labels()
    out = distill_loss(s, t, y, kind="jsd", beta=beta, temperature=1.5)
    if beta == 0:
        ref = reference(s, t, y, "forward_kl", 1.5)[1]
    elif beta == 1:
        ref = reference(s, t, y, "reverse_kl", 1.5)[1]
    else:
        ref = reference(s, t, y, "jsd", 1.5, beta=beta)[1]
    assert torch.allclose(out.kd.double(), ref, rtol=1e-5, atol=1e-6)


def test_jsd_matches_trl_generalized_jsd():
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    s, t, y = _logits(5), _logits(6), _labels()
    ours = distill_loss(s, t, y, kind="jsd", beta=0.3, temperature=1.0).kd
    theirs = gkd.GKDTrainer.generalized_jsd_loss(s[:, :-1], t[:, :-1], labels=y[:, 1:], beta=0.3, temperature=1.0)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def _grads(fn, s, w, b, teacher, y, **kw):
    s = s.clone().requires_grad_(True)
    w = None if w is None else w.clone().requires_grad_(True)
    b = None if b is None else b.clone().requires_grad_(True)
    out = fn(s, teacher, y, lm_head_weight=w, lm_head_bias=b, **kw)
    (out.loss * 1.7).backward()  # a non-unit upstream gradient must scale the stored gradients
    return out.loss.detach(), [x.grad for x in (s, w, b) if x is not None]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
@pytest.mark.parametrize("temperature,alpha,beta", [(2.0, 0.6, 0.4), (1.0, 0.3, 0.0), (1.0, 1.0, 1.0), (0.5, 0.0, 0.7)])
def test_chunked_equals_naive_value_and_gradient_from_logits(kind, chunk_size, temperature, alpha, beta):
    s, t, y = _logits(7), _logits(8), _labels()
    kw = dict(kind=kind, temperature=temperature, alpha=alpha, beta=beta, chunk_size=chunk_size)
    v1, g1 = _grads(distill_loss, s, None, None, t, y, **kw)
    v2, g2 = _grads(naive_distill_loss, s, None, None, t, y, **kw)
    assert torch.allclose(v1, v2, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    # positions without a target get no gradient
    assert g1[0][2, :3].abs().sum() == 0 and g1[0][2, 4:].abs().sum() == 0 and g1[0][:, -1].abs().sum() == 0


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.0), ("tvd", 0.5)])
def test_chunked_handles_zero_teacher_mass(kind, beta):
    """Teacher logits of -inf (zero probability) give 0·log 0 = 0 terms, as in the naive form."""
    s, t, y = _logits(3), _logits(4), _labels()
    t[..., :5] = float("-inf")
    kw = dict(kind=kind, temperature=1.5, alpha=0.8, beta=beta, chunk_size=4)
    v1, g1 = _grads(distill_loss, s, None, None, t, y, **kw)
    v2, g2 = _grads(naive_distill_loss, s, None, None, t, y, **kw)
    assert torch.isfinite(v1) and torch.allclose(v1, v2, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(g1[0]).all() and torch.allclose(g1[0], g2[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_lm_head_equals_naive_value_and_gradient(kind):
    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.3
    b = torch.randn(V, generator=g) * 0.1
    t_hidden = torch.randn(B, T, 24, generator=g)
    teacher = TeacherHidden(t_hidden, torch.randn(V, 24, generator=g) * 0.3, torch.randn(V, generator=g))
    y = _labels(1)
    kw = dict(kind=kind, temperature=1.5, alpha=0.5, chunk_size=3)
    v1, g1 = _grads(distill_loss, hidden, w, b, teacher, y, **kw)
    v2, g2 = _grads(naive_distill_loss, hidden, w, b, teacher, y, **kw)
    assert torch.allclose(v1, v2, rtol=1e-5, atol=1e-6)
    assert len(g1) == 3
    for a, c in zip(g1, g2):
        assert torch.allclose(a, c, rtol=1e-5, atol=1e-5)
    # the same teacher given as logits gives the same loss
    dense_t = F.linear(t_hidden, teacher.weight, teacher.bias)
    v3, _ = _grads(distill_loss, hidden, w, b, dense_t, y, **kw)
    assert torch.allclose(v1, v3, rtol=1e-5, atol=1e-6)


def test_no_target_positions_give_zero_loss_and_finite_gradient():
    s = _logits(1).requires_grad_(True)
    y = torch.full((B, T), -100)
    out = distill_loss(s, _logits(2), y)
    out.loss.backward()
    assert out.num_tokens == 0 and out.loss.item() == 0.0 and torch.isfinite(s.grad).all()


def _topk_teacher(t_logits: torch.Tensor, k: int) -> SparseTeacher:
    logp = torch.log_softmax(t_logits.double(), -1)
    vals, ids = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return SparseTeacher(ids=ids, logprobs=vals.float(), tail=rest.float())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("keep_tail", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_sparse_with_k_equal_vocab_equals_dense(kind, keep_tail, temperature):
    s, t, y = _logits(11), _logits(12), _labels()
    sparse = _topk_teacher(t, V)
    kw = dict(kind=kind, temperature=temperature, alpha=0.7, chunk_size=4)
    v1, g1 = _grads(distill_loss, s, None, None, sparse, y, keep_tail=keep_tail, **kw)
    v2, g2 = _grads(distill_loss, s, None, None, t, y, **kw)
    v3, g3 = _grads(naive_distill_loss, s, None, None, sparse, y, keep_tail=keep_tail, **kw)
    assert torch.allclose(v1, v2, rtol=1e-5, atol=1e-6) and torch.allclose(v3, v2, rtol=1e-5, atol=1e-6)
    assert torch.allclose(g1[0], g2[0], rtol=1e-5, atol=1e-6) and torch.allclose(g3[0], g2[0], rtol=1e-5, atol=1e-6)


def sparse_reference(student, t_logits, labels, k, kind, keep_tail):
    """Top-k teacher at T = 1 from the definitions: renormalised p̂ on the full vocabulary
    (zero outside the top-k), or the (k + 1)-bucket partition when keeping the tail."""
    s = student[:, :-1].double()
    t = t_logits[:, :-1].double()
    keep = labels[:, 1:] != -100
    s, t = s[keep], t[keep]
    p = torch.softmax(t, -1)
    q = torch.softmax(s, -1)
    ids = p.topk(k, -1).indices
    in_top = torch.zeros_like(p, dtype=torch.bool).scatter(-1, ids, True)
    if keep_tail:
        pb = torch.cat([p.gather(-1, ids), (p * ~in_top).sum(-1, keepdim=True)], -1)
        qb = torch.cat([q.gather(-1, ids), (q * ~in_top).sum(-1, keepdim=True)], -1)
    elif kind == "reverse_kl":
        pb = p.gather(-1, ids) / p.gather(-1, ids).sum(-1, keepdim=True)
        qb = q.gather(-1, ids) / q.gather(-1, ids).sum(-1, keepdim=True)
    else:
        pb = torch.where(in_top, p, 0.0) / (p * in_top).sum(-1, keepdim=True)
        qb = q

    def xlogy(a, b):
        return torch.where(a > 0, a * (a / b).log(), 0.0)

    if kind == "forward_kl":
        d = xlogy(pb, qb).sum(-1)
    elif kind == "reverse_kl":
        d = xlogy(qb, pb).sum(-1)
    elif kind == "jsd":
        m = 0.5 * pb + 0.5 * qb
        d = 0.5 * xlogy(pb, m).sum(-1) + 0.5 * xlogy(qb, m).sum(-1)
    else:
        d = 0.5 * (pb - qb).abs().sum(-1)
    return d.mean()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("keep_tail", [False, True])
def test_sparse_top_k_matches_definition(kind, keep_tail):
    s, t, y = _logits(13, 1.0), _logits(14), _labels()
    k = 5
    out = distill_loss(s, _topk_teacher(t, k), y, kind=kind, temperature=1.0, keep_tail=keep_tail, chunk_size=3)
    ref = sparse_reference(s, t, y, k, kind, keep_tail)
    assert torch.allclose(out.kd.double(), ref, rtol=1e-5, atol=1e-6)


def test_sparse_keep_tail_needs_tail():
    sparse = _topk_teacher(_logits(2), 4)
    sparse.tail = None
    with pytest.raises(ValueError, match="keep_tail"):
        distill_loss(_logits(1), sparse, _labels(), keep_tail=True)


def test_vocabulary_mismatch_is_a_clear_error():
    with pytest.raises(VocabularyMismatchError, match=r"teacher models/t has 512 tokens.*student models/s has 256"):
        check_vocab(512, 256, teacher="models/t", student="models/s")
    check_vocab(512, 512)
    with pytest.raises(VocabularyMismatchError, match="40 tokens.*37"):
        distill_loss(_logits(1), torch.randn(B, T, 40), _labels())


def test_unknown_kind_names_the_field():
    with pytest.raises(ValueError, match="distill.loss"):
        distill_loss(_logits(1), _logits(2), _labels(), kind="kl")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- dynamic weight, schedules


def test_teacher_entropy_and_dynamic_weight():
    t, y = _logits(2), _labels()
    ref_p = torch.softmax(t[:, :-1].double(), -1)[y[:, 1:] != -100]
    ref = -(ref_p * ref_p.log()).sum(-1).mean()
    assert math.isclose(teacher_entropy(t, y, chunk_size=4).item(), ref.item(), rel_tol=1e-5)
    sparse = _topk_teacher(t, V)
    assert math.isclose(teacher_entropy(sparse, y).item(), ref.item(), rel_tol=1e-5)
    assert entropy_kd_weight(0.0, V, 0.8) == pytest.approx(0.8)
    assert entropy_kd_weight(math.log(V), V, 0.8, floor=0.1) == pytest.approx(0.1)
    assert entropy_kd_weight(0.5 * math.log(V), V, 0.8) == pytest.approx(0.4)


def test_schedules():
    assert schedule("constant", 2.0, 1.0, 50, 100) == 2.0
    assert schedule("linear", 2.0, 1.0, 25, 100) == pytest.approx(1.75)
    assert schedule("cosine", 2.0, 1.0, 0, 100) == pytest.approx(2.0)
    assert schedule("cosine", 2.0, 1.0, 50, 100) == pytest.approx(1.5)
    assert schedule("cosine", 2.0, 1.0, 100, 100) == pytest.approx(1.0)
    assert schedule("linear", 2.0, 1.0, 500, 100) == pytest.approx(1.0)
    assert [schedule("step", 0.0, 3.0, s, 100, num_stages=4) for s in (0, 24, 25, 60, 99, 100)] == [0, 0, 1, 2, 3, 3]
    with pytest.raises(ValueError, match="schedule kind"):
        schedule("exp", 1, 2, 0, 10)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- feature distillation


def test_hidden_state_losses_match_naive():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    t = torch.randn(2, 5, 12, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    proj = feature_projection(8, 12)
    assert proj is not None and proj.weight.shape == (12, 8) and feature_projection(8, 8) is None
    ps = proj(s)
    keep = mask.bool()
    mse_ref = ((ps - t) ** 2)[keep].mean()
    assert torch.allclose(hidden_state_loss(s, t, mask, "mse", proj), mse_ref, atol=1e-6)
    cos_ref = (1 - (ps * t).sum(-1) / (ps.norm(dim=-1) * t.norm(dim=-1)))[keep].mean()
    loss = hidden_state_loss(s, t, mask, "cosine", proj)
    assert torch.allclose(loss, cos_ref, atol=1e-6)
    loss.backward()
    assert proj.weight.grad is not None and s.grad is not None
    with pytest.raises(ValueError, match="feature_projection"):
        hidden_state_loss(s, t, mask, "mse")


def test_attention_kl_matches_naive():
    g = torch.Generator().manual_seed(1)
    causal = torch.ones(5, 5).tril().bool()
    sa = torch.randn(2, 3, 5, 5, generator=g).masked_fill(~causal, float("-inf")).softmax(-1)
    ta = torch.randn(2, 3, 5, 5, generator=g).masked_fill(~causal, float("-inf")).softmax(-1)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    per = torch.zeros(2, 3, 5, dtype=torch.float64)
    for b in range(2):
        for h in range(3):
            for i in range(5):
                for j in range(i + 1):
                    p, q = ta[b, h, i, j].double(), sa[b, h, i, j].double()
                    per[b, h, i] += p * (p / q).log()
    m = mask.bool().unsqueeze(1).expand(2, 3, 5)
    assert torch.allclose(attention_kl(sa, ta, mask).double(), per[m].mean(), atol=1e-6)
    with pytest.raises(ValueError, match="equal head counts"):
        attention_kl(sa[:, :2], ta, mask)


def test_layer_map_pairs_last_layers():
    assert layer_map(2, 4) == [(0, 1), (1, 3)]
    assert layer_map(3, 12) == [(0, 3), (1, 7), (2, 11)]
    assert layer_map(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]


def test_default_chunk_keeps_a_chunk_at_a_fixed_size():
    from distillery.distill.losses import default_chunk_size

    assert default_chunk_size(32768) == 128 and default_chunk_size(131072) == 32 and default_chunk_size(10**7) == 16
    assert default_chunk_size(32768, positions=4096) == 128 and default_chunk_size(32768, positions=1920) == 64
    assert default_chunk_size(2048, positions=1000) == 1024  # small vocabularies: few, large chunks
    assert default_chunk_size(131072, fused=True) == 256 and default_chunk_size(512, fused=True) == 8192
    s, t, y = torch.randn(2, 6, 50, requires_grad=True), torch.randn(2, 6, 50), torch.randint(0, 50, (2, 6))
    auto = distill_loss(s, t, y, kind="jsd", chunk_size=None).loss
    assert torch.allclose(auto, distill_loss(s, t, y, kind="jsd", chunk_size=3).loss, atol=1e-6)
    assert math.isclose(teacher_entropy(t, y).item(), teacher_entropy(t, y, chunk_size=4).item(), rel_tol=1e-6)


# --------------------------------------------------------------------------- sampled teacher cache


def _sampled_teacher(t_logits: torch.Tensor, k: int, m: int, seed: int, pad: int = 0, S: float = 1.0) -> SparseTeacher:
    """A sampled cache of t_logits (..., V) as collation gives it: the top-k head, then m draws with
    replacement from p^(1/S) outside it; a repeated draw becomes a padding slot (count −1, the
    position's first id, logprob 0) and its first occurrence carries the run length; `pad` extra
    padding slots."""
    shape, V = t_logits.shape[:-1], t_logits.shape[-1]
    logp = torch.log_softmax(t_logits.double(), -1).reshape(-1, V)
    vals, ids = logp.topk(k, -1)
    outside = logp.scatter(-1, ids, float("-inf")) / S
    tail = outside.logsumexp(-1)
    g = torch.Generator().manual_seed(seed)
    draws = torch.multinomial((outside - tail[:, None]).exp(), m, replacement=True, generator=g).sort(-1).values
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    runs = (draws[:, :, None] == draws[:, None, :]).sum(-1)
    s_ids = torch.where(first, draws, ids[:, :1])
    s_lps = torch.where(first, logp.gather(-1, draws), 0.0)
    s_counts = torch.where(first, runs, -1)
    n = ids.shape[0]
    all_ids = torch.cat([ids, s_ids, ids[:, :1].expand(n, pad)], -1)
    all_lps = torch.cat([vals, s_lps, torch.zeros(n, pad, dtype=vals.dtype)], -1)
    counts = torch.cat([torch.zeros_like(ids), s_counts, torch.full((n, pad), -1)], -1)
    K = all_ids.shape[-1]
    return SparseTeacher(all_ids.reshape(*shape, K), all_lps.float().reshape(*shape, K), tail.float().reshape(shape),
                         counts.to(torch.int16).reshape(*shape, K), S)


def _student_grad(student, teacher, labels, temperature: float = 1.0, **kw):
    s = student.clone().requires_grad_(True)
    distill_loss(s, teacher, labels, kind="forward_kl", temperature=temperature, alpha=1.0, **kw).loss.backward()
    return s.grad


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_cache_gradient_is_unbiased_and_top_k_is_not(temperature):
    """Drawn at the training temperature, averaged over many sampled caches, the forward-KL gradient
    w.r.t. the student's logits is the dense one (q_T − p_T); the plain renormalised top-k's stays
    off by its bias, and so does its KL."""
    from distillery.distill.losses import cached_teacher_kl

    R, k, m = 2000, 3, 4
    s, t, y = _logits(21, 1.0), _logits(22, 2.0), _labels()
    n = int((y[:, 1:] != -100).sum())
    dense = _student_grad(s, t, y, temperature)
    # R replicas of the batch in one call: the loss averages over R·n positions, so summing the
    # replicas' gradients gives the mean over caches of (q − p̂) / n, comparable with `dense`.
    sampled = _sampled_teacher(t.repeat(R, 1, 1), k, m, seed=0, S=temperature)
    mean_sampled = _student_grad(s.repeat(R, 1, 1), sampled, y.repeat(R, 1), temperature).reshape(R, B, T, V).sum(0)
    top_k = _student_grad(s, _topk_teacher(t, k), y, temperature)
    err_sampled = (mean_sampled - dense).abs().max().item()
    err_top_k = (top_k - dense).abs().max().item()
    assert err_top_k > 0.02, err_top_k
    assert err_sampled < err_top_k / 10, (err_sampled, err_top_k)
    # one cache is noisy, many are not: the error shrinks with the number of caches
    one = _student_grad(s, _sampled_teacher(t, k, m, seed=1, S=temperature), y, temperature)
    assert (one - dense).abs().max().item() > 3 * err_sampled
    if temperature != 1.0:
        return
    # the cache-side KL (importance-sampled) is unbiased for the full KL; top-k's measures another distance
    full_kl = distill_loss(s, t, y, kind="forward_kl", temperature=1.0).kd.item()
    mean_kl = cached_teacher_kl(s.repeat(R, 1, 1), sampled, y.repeat(R, 1)).item() / (R * n)
    assert mean_kl == pytest.approx(full_kl, rel=0.02)
    assert cached_teacher_kl(s, _topk_teacher(t, k), y).item() / n != pytest.approx(full_kl, rel=0.1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_sampled_cache_padding_changes_nothing_and_gives_no_nan(kind, temperature):
    """Padding slots (repeats of the first id, count −1) carry no teacher mass and leave the student's
    rest bucket alone: extra padding gives the same loss and gradient, finite, chunked and naive."""
    s, t, y = _logits(23, 1.0), _logits(24), _labels()
    kw = dict(kind=kind, temperature=temperature, alpha=0.7, beta=0.4, chunk_size=4)
    tight = _sampled_teacher(t, 4, 6, seed=2)
    padded = _sampled_teacher(t, 4, 6, seed=2, pad=5)
    assert (padded.counts < 0).any() and (tight.counts < 0).any()  # repeated draws already pad
    v1, g1 = _grads(distill_loss, s, None, None, tight, y, **kw)
    v2, g2 = _grads(distill_loss, s, None, None, padded, y, **kw)
    v3, g3 = _grads(naive_distill_loss, s, None, None, padded, y, **kw)
    for v, g in ((v1, g1), (v2, g2), (v3, g3)):
        assert torch.isfinite(v) and torch.isfinite(g[0]).all()
    assert torch.allclose(v1, v2, rtol=1e-6, atol=1e-7) and torch.allclose(g1[0], g2[0], rtol=1e-6, atol=1e-7)
    assert torch.allclose(v2, v3, rtol=1e-5, atol=1e-6) and torch.allclose(g2[0], g3[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_sampled_cache_whose_support_covers_the_vocabulary_gives_no_nan(kind):
    """Head V − 2 plus draws from the last two ids: the student's rest bucket is empty (-inf on both sides)."""
    s, t, y = _logits(25, 1.0), _logits(26), _labels()
    v, g = _grads(distill_loss, s, None, None, _sampled_teacher(t, V - 2, 8, seed=3, pad=2), y, kind=kind, temperature=1.5, chunk_size=5)
    assert torch.isfinite(v) and torch.isfinite(g[0]).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_sampled_cache_with_the_whole_vocabulary_as_head_equals_dense(kind, temperature):
    """K = V head entries (count 0) plus padding: the exact distribution, so the dense loss exactly."""
    s, t, y = _logits(27), _logits(28), _labels()
    full = _topk_teacher(t, V)
    pad = 3
    ids = torch.cat([full.ids, full.ids[..., :1].expand(B, T, pad)], -1)
    lps = torch.cat([full.logprobs, torch.zeros(B, T, pad)], -1)
    counts = torch.cat([torch.zeros(B, T, V, dtype=torch.int16), torch.full((B, T, pad), -1, dtype=torch.int16)], -1)
    sparse = SparseTeacher(ids, lps, torch.full((B, T), float("-inf")), counts)
    kw = dict(kind=kind, temperature=temperature, alpha=0.7, chunk_size=4)
    v1, g1 = _grads(distill_loss, s, None, None, sparse, y, **kw)
    v2, g2 = _grads(distill_loss, s, None, None, t, y, **kw)
    assert torch.allclose(v1, v2, rtol=1e-5, atol=1e-6) and torch.allclose(g1[0], g2[0], rtol=1e-5, atol=1e-6)
    assert math.isclose(teacher_entropy(sparse, y).item(), teacher_entropy(t, y).item(), rel_tol=1e-5)


def test_sampled_cache_rejects_keep_tail():
    with pytest.raises(ValueError, match="keep_tail"):
        distill_loss(_logits(1), _sampled_teacher(_logits(2), 3, 2, seed=0), _labels(), keep_tail=True)


def test_sampled_cache_drawn_at_one_temperature_is_consistent_at_another():
    """Drawn at S = 2, trained at T = 1 (bounded importance weights p^(1/2)): with many draws per
    position the self-normalised target approaches the dense one."""
    s, t, y = _logits(29, 1.0), _logits(30, 2.0), _labels()
    dense = _student_grad(s, t, y, 1.0)
    many = _student_grad(s, _sampled_teacher(t, 3, 1000, seed=4, S=2.0), y, 1.0)
    assert (many - dense).abs().max().item() < 0.005  # the plain top-3 is about 0.025 off
