"""An online teacher given as hidden states + lm_head (one, or a mixture of several) against the same
teacher given as its dense (B, T, V) logits: same loss, same student gradients, same evaluation metrics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distillery.distill.losses import (
    KINDS,
    TeacherHidden,
    TeacherMixture,
    distill_loss,
    naive_distill_loss,
    teacher_entropy,
    teacher_top1,
)
from distillery.distill.mixture import mixture_logits
from distillery.distill.objective import logits_are_linear, mixed_teacher, run_teacher

B, T, V = 2, 11, 37
TEMPERATURE = 1.7
WEIGHTS = {1: [1.0], 2: [0.7, 0.3]}


def _labels() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :4] = -100  # prompt
    y[1, 8:] = -100  # padding
    return y


def _llama(seed: int, hidden: int, layers: int = 2):
    """A tiny random Llama (untied lm_head, so teacher and student heads are distinct tensors)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def models():
    return [_llama(1, 24), _llama(2, 32, 3)], _llama(3, 16)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(5)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 8:] = 0
    return {"input_ids": torch.randint(0, V, (B, T), generator=g), "attention_mask": mask, "labels": _labels()}


def _dense(teachers, batch, n: int, temperature: float) -> torch.Tensor:
    """The reference: every teacher's full (B, T, V) logits, mixed with `mixture_logits`."""
    with torch.no_grad():
        logits = [t(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits for t in teachers[:n]]
    return mixture_logits(logits, WEIGHTS[n], temperature)


def _student_grads(student, teacher, batch, fused: bool, **kw):
    """(loss, kd, [grad of every student parameter]) of one distill_loss backward."""
    student.zero_grad()
    kw = dict(kind="forward_kl", temperature=TEMPERATURE, alpha=0.7, chunk_size=5) | kw
    if fused:
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True, logits_to_keep=1)
        res = distill_loss(out.hidden_states[-1], teacher, batch["labels"], lm_head_weight=student.lm_head.weight, **kw)
    else:
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        res = distill_loss(out.logits, teacher, batch["labels"], **kw)
    (res.loss * 1.3).backward()
    return res.loss.detach(), res.kd, [p.grad.clone() for p in student.parameters()]


def test_final_hidden_state_is_the_lm_head_input(models, batch):
    """transformers returns hidden_states[-1] after the final norm: lm_head of it is the model's logits."""
    teacher = models[0][0]
    t, hidden, attn = run_teacher(teacher, batch)
    assert isinstance(t, TeacherHidden) and hidden is None and attn is None
    full = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(F.linear(t.hidden, t.weight), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("n_teachers", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_teacher_equals_dense_teacher(models, batch, kind, n_teachers, fused):
    teachers, student = models
    chunked, _, _ = mixed_teacher(list(zip(teachers[:n_teachers], WEIGHTS[n_teachers])), batch)
    assert isinstance(chunked, TeacherMixture if n_teachers == 2 else TeacherHidden)
    dense = _dense(teachers, batch, n_teachers, TEMPERATURE)
    kw = dict(kind=kind, beta=0.3)
    v1, kd1, g1 = _student_grads(student, chunked, batch, fused, **kw)
    v2, kd2, g2 = _student_grads(student, dense, batch, fused, **kw)
    torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd1, kd2, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and the textbook form agrees on the chunked teacher too
    ref = naive_distill_loss(student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, chunked,
                             batch["labels"], kind=kind, beta=0.3, temperature=TEMPERATURE, alpha=0.7)
    torch.testing.assert_close(v1, ref.loss.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_teachers", [1, 2])
def test_entropy_top1_and_teacher_kl_without_dense_logits(models, batch, n_teachers):
    """entropy_weighting and evaluate's metrics (T = 1) from the chunked teacher equal the dense ones."""
    teachers, student = models
    chunked, _, _ = mixed_teacher(list(zip(teachers[:n_teachers], WEIGHTS[n_teachers])), batch)
    dense = _dense(teachers, batch, n_teachers, 1.0)  # the mixture at T = 1: the teachers' own distribution
    y = batch["labels"]
    torch.testing.assert_close(teacher_entropy(chunked, y, chunk_size=3), teacher_entropy(dense, y), rtol=1e-5, atol=1e-6)
    sel = y[:, 1:] != -100
    assert torch.equal(teacher_top1(chunked, y, chunk_size=4), dense[:, :-1].argmax(-1)[sel])
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        a = distill_loss(s, chunked, y, temperature=1.0, alpha=1.0, chunk_size=4)
        b = distill_loss(s, dense, y, temperature=1.0, alpha=1.0)
    torch.testing.assert_close(a.kd, b.kd, rtol=1e-5, atol=1e-6)


def test_a_model_with_transformed_logits_stays_dense(models, batch):
    """Soft-capped (or scaled) logits are not lm_head(hidden): such a teacher is handed over dense."""
    teacher = _llama(1, 24)
    teacher.config.final_logit_softcapping = 30.0
    assert not logits_are_linear(teacher) and logits_are_linear(models[0][0])
    t, _, _ = run_teacher(teacher, batch)
    assert isinstance(t, torch.Tensor) and t.shape == (B, T, V) and t.dtype == torch.float32
