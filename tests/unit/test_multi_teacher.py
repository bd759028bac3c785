"""Multi-teacher distillation: the mixture target, its gradient identity, and config validation."""

from __future__ import annotations

import pytest
import torch

from distillery.config import ConfigError, validate_tree
from distillery.distill.losses import VocabularyMismatchError, distill_loss
from distillery.distill.mixture import mixture_logits


def _labels(B: int, T: int, V: int, g: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = -100  # a prompt
    return labels


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_forward_kl_gradient_is_the_weighted_sum_of_per_teacher_gradients(temperature):
    g = torch.Generator().manual_seed(0)
    B, T, V = 2, 7, 50
    teachers = [torch.randn(B, T, V, generator=g) * s for s in (1.0, 3.0, 0.5)]
    weights = [0.5, 0.3, 0.2]
    labels = _labels(B, T, V, g)
    student = torch.randn(B, T, V, generator=g)

    def grad(teacher: torch.Tensor) -> torch.Tensor:
        s = student.clone().requires_grad_(True)
        distill_loss(s, teacher, labels, kind="forward_kl", temperature=temperature, alpha=1.0).loss.backward()
        return s.grad

    mixed = grad(mixture_logits(teachers, weights, temperature))
    summed = sum(w * grad(t) for w, t in zip(weights, teachers))
    torch.testing.assert_close(mixed, summed, rtol=1e-5, atol=1e-7)
    # ... and it is not the gradient of averaging the logits (a product of experts)
    averaged = grad(sum(w * t for w, t in zip(weights, teachers)))
    assert not torch.allclose(mixed, averaged, atol=1e-4)


def test_mixture_is_the_weighted_average_of_tempered_probabilities():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(4, 30, generator=g), torch.randn(4, 30, generator=g) * 2
    T = 2.5
    mixed = mixture_logits([z1, z2], [0.25, 0.75], T)
    expected = 0.25 * torch.softmax(z1 / T, -1) + 0.75 * torch.softmax(z2 / T, -1)
    torch.testing.assert_close(torch.softmax(mixed / T, -1), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mixture_logits([z1], [1.0], T), z1)


def test_teachers_config_normalises_weights_and_refuses_both_forms():
    cfg = validate_tree({"model": {"teachers": [{"path": "a", "weight": 3}, {"path": "b"}]}}, "test")
    assert cfg.model.teacher_specs == [("a", 0.75), ("b", 0.25)]
    assert validate_tree({"model": {"teacher": "a"}}, "test").model.teacher_specs == [("a", 1.0)]
    with pytest.raises(ConfigError, match="teacher or teachers"):
        validate_tree({"model": {"teacher": "a", "teachers": [{"path": "b"}]}}, "test")
    with pytest.raises(ConfigError, match="weight"):
        validate_tree({"model": {"teachers": [{"path": "a", "weight": 0}]}}, "test")


def test_teachers_with_another_vocabulary_are_refused_before_training(tmp_path, demo_corpus, tiny_teacher, tiny_student):
    from distillery.distill.method import validate_distill
    from distillery.models.init_model import ArchSpec, init_model

    other = tmp_path / "other-vocab"
    init_model(other, ArchSpec(arch="llama", layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64),
               corpus=[str(demo_corpus["train"])], vocab_size=300, seed=0, overwrite=True)
    cfg = validate_tree({"model": {"path": str(tiny_student), "teachers": [{"path": str(tiny_teacher)}, {"path": str(other)}]},
                         "distill": {"teacher_mode": "online"}}, "test")
    with pytest.raises(VocabularyMismatchError, match="model.teachers.1"):
        validate_distill(cfg)
    cfg = validate_tree({"model": {"path": str(tiny_student), "teachers": [{"path": str(tiny_teacher)}, {"path": str(tiny_teacher)}]},
                         "distill": {"teacher_mode": "online", "hidden": {"weight": 1.0}}}, "test")
    with pytest.raises(ConfigError, match="distill.hidden"):
        validate_distill(cfg)
