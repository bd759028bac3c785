"""On-policy distillation pieces that need no Ray: the GJSD values, branch draws, batches built
from samples, and the settings refused before Ray starts."""

from __future__ import annotations

import math

import pytest
import torch

from distillery.config import ConfigError, validate_tree
from distillery.data.splits import IGNORE_INDEX
from distillery.distill.losses import distill_loss, divergence
from distillery.distill.on_policy import (
    on_policy_draw, prompts_of, response_budgets, sample_seed, sampled_batch, stack_padded,
)

P, Q = [0.5, 0.5], [0.9, 0.1]  # teacher, student
# By hand: KL(p‖q) = ½ln(.5/.9) + ½ln(.5/.1); KL(q‖p) = .9 ln(.9/.5) + .1 ln(.1/.5);
# β = ½: m = (.7, .3), ½[½ln(.5/.7) + ½ln(.5/.3)] + ½[.9 ln(.9/.7) + .1 ln(.1/.3)].
HAND = {0.0: 0.510826, 0.5: 0.101749, 1.0: 0.368064}


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_generalised_jsd_matches_hand_computed_values(beta):
    logp, logq = torch.tensor([P]).log(), torch.tensor([Q]).log()
    assert float(divergence(logp, logq, "jsd", beta)) == pytest.approx(HAND[beta], abs=1e-5)
    # Through the chunked loss on logits at T = 1: position 0 predicts token 1 (the target).
    student, teacher = torch.tensor([[Q, Q]]).log(), torch.tensor([[P, P]]).log()
    labels = torch.tensor([[IGNORE_INDEX, 1]])
    out = distill_loss(student, teacher, labels, kind="jsd", beta=beta, temperature=1.0, alpha=1.0)
    assert float(out.kd) == pytest.approx(HAND[beta], abs=1e-5)
    assert float(divergence(logq, logq, "jsd", beta)) == pytest.approx(0.0, abs=1e-7)  # identical: zero


def test_hand_values_are_the_textbook_formulas():
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b))  # noqa: E731
    m = [0.5 * p + 0.5 * q for p, q in zip(P, Q)]
    assert kl(P, Q) == pytest.approx(HAND[0.0], abs=1e-6)
    assert kl(Q, P) == pytest.approx(HAND[1.0], abs=1e-6)
    assert 0.5 * kl(P, m) + 0.5 * kl(Q, m) == pytest.approx(HAND[0.5], abs=1e-6)


def test_branch_draws_agree_across_ranks_and_follow_lmbda():
    draws = [on_policy_draw(7, step, micro, 0.3) for step in range(400) for micro in range(2)]
    assert draws == [on_policy_draw(7, step, micro, 0.3) for step in range(400) for micro in range(2)]  # every rank alike
    assert 0.25 < sum(draws) / len(draws) < 0.35
    assert not any(on_policy_draw(7, s, 0, 0.0) for s in range(50)) and all(on_policy_draw(7, s, 0, 1.0) for s in range(50))
    assert sample_seed(0, 3, 1, 5) == sample_seed(0, 3, 1, 5) != sample_seed(0, 3, 1, 6)
    assert 0 <= sample_seed(1, 2, 3, 4) < 2**31


def test_prompts_and_sampled_batches():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 0], [9, 10, 11, 0, 0]]),
        "labels": torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX], [IGNORE_INDEX] * 5]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]),
    }
    prompts = prompts_of(batch)
    assert prompts == [[5, 6], [9, 10, 11]]  # a row without targets gives its whole sequence
    assert response_budgets(prompts, 4, 5) == [3, 2]
    assert response_budgets([[1] * 5], 4, 5) == [0]
    s = sampled_batch(prompts, [[40, 41, 42, 43], [50]], pad_id=0, max_length=5)
    assert s["input_ids"].tolist() == [[5, 6, 40, 41, 42], [9, 10, 11, 50, 0]]  # cut at max_length
    assert s["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 40, 41, 42], [IGNORE_INDEX] * 3 + [50, IGNORE_INDEX]]
    assert s["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    both = stack_padded([s, {k: v[:, :3] for k, v in batch.items()}], pad_id=0)
    assert both["input_ids"].shape == (4, 5)
    assert both["input_ids"][2:].tolist() == [[5, 6, 7, 0, 0], [9, 10, 11, 0, 0]]
    assert both["labels"][2:, 3:].eq(IGNORE_INDEX).all() and both["attention_mask"][2:, 3:].eq(0).all()


def _cfg(tiny_student, tiny_teacher, **distill):
    return validate_tree({"model": {"path": str(tiny_student), "teacher": str(tiny_teacher)}, "distill": distill}, "test")


def test_settings_on_policy_cannot_honour_are_refused(tiny_student, tiny_teacher):
    from distillery.distill.method import validate_distill

    with pytest.raises(ConfigError, match="on_policy needs the teacher online"):
        _cfg(tiny_student, tiny_teacher, on_policy={}, teacher_mode="cached")
    with pytest.raises(ConfigError, match="on_policy and hidden"):
        _cfg(tiny_student, tiny_teacher, on_policy={}, hidden={"weight": 1.0})
    with pytest.raises(ConfigError, match="on_policy and cross_tokenizer"):
        _cfg(tiny_student, tiny_teacher, on_policy={}, cross_tokenizer={})
    with pytest.raises(ConfigError, match="lmbda"):
        _cfg(tiny_student, tiny_teacher, on_policy={"lmbda": 1.5})
    cfg = _cfg(tiny_student, tiny_teacher, on_policy={"seq_kd": True})
    validate_distill(cfg)
    packed = cfg.model_copy(update={"data": cfg.data.model_copy(update={"packing": True})})
    with pytest.raises(ConfigError, match="data.packing"):
        validate_distill(packed)
    two = validate_tree({"model": {"path": str(tiny_student), "teachers": [{"path": str(tiny_teacher)}, {"path": str(tiny_teacher)}]},
                         "distill": {"on_policy": {"seq_kd": True}}}, "test")
    with pytest.raises(ConfigError, match="seq_kd"):
        validate_distill(two)


def test_engine_cpus_count_the_sampling_engines(tiny_student, tiny_teacher):
    from distillery.distill.method import DISTILL
    from distillery.train.finetune import FINETUNE

    assert DISTILL.engine_cpus(_cfg(tiny_student, tiny_teacher)) == 0
    assert DISTILL.engine_cpus(_cfg(tiny_student, tiny_teacher, on_policy={})) == 1
    assert DISTILL.engine_cpus(_cfg(tiny_student, tiny_teacher, on_policy={"seq_kd": True})) == 2
    assert FINETUNE.engine_cpus(_cfg(tiny_student, tiny_teacher)) == 0


def test_tune_space_over_on_policy_keys_needs_the_section(tiny_student, tiny_teacher):
    from distillery.tune.space import validate_search_space

    base = _cfg(tiny_student, tiny_teacher)
    with pytest.raises(ConfigError, match="set distill.on_policy"):
        validate_search_space(base, {"distill.on_policy.lmbda": {"uniform": [0.0, 1.0]}})
    on = _cfg(tiny_student, tiny_teacher, on_policy={})
    checked = validate_search_space(on, {"distill.on_policy.lmbda": {"uniform": [0.0, 1.0]},
                                         "distill.on_policy.beta": {"choice": [0.0, 0.5, 1.0]},
                                         "distill.on_policy.temperature": {"uniform": [0.5, 1.5]}})
    assert set(checked) == {"distill.on_policy.lmbda", "distill.on_policy.beta", "distill.on_policy.temperature"}
    with pytest.raises(ConfigError, match="lmbda"):
        validate_search_space(on, {"distill.on_policy.lmbda": {"uniform": [0.0, 2.0]}})


@pytest.mark.parametrize("sampled_width", [3, 9])
def test_on_policy_loss_is_alpha_jsd_on_samples_plus_ce_on_the_batch(tiny_student, tiny_teacher, sampled_width):
    """One stacked forward gives the same loss as the two terms computed apart, whichever of the
    sampled rows and the batch's rows is wider."""
    import torch.nn.functional as F

    from distillery.distill.on_policy import OnPolicyObjective
    from distillery.models.load import load_causal_lm, load_tokenizer

    cfg = validate_tree({"model": {"path": str(tiny_student), "teacher": str(tiny_teacher)}, "train": {"strategy": "none"},
                         "distill": {"alpha": 0.6, "temperature": 1.5, "on_policy": {"beta": 0.3}}}, "test")
    student = load_causal_lm(tiny_student, dtype="float32")
    objective = OnPolicyObjective(cfg, load_tokenizer(tiny_student), student, torch.device("cpu"))
    objective.set_step(0, 10)
    g = torch.Generator().manual_seed(0)
    batch = sampled_batch([[5, 6, 7]], [[8, 9, 10]], 0, 64)  # width 6
    batch["labels"][0, 3:] = batch["input_ids"][0, 3:]
    sampled = sampled_batch([[5, 6]], [torch.randint(3, 200, (sampled_width - 2,), generator=g).tolist()], 0, 64)
    loss, metrics = objective._on_policy_loss(student, batch, sampled, {})

    with torch.no_grad():
        teacher = objective.teacher(input_ids=sampled["input_ids"], attention_mask=sampled["attention_mask"]).logits
    s_logits = student(input_ids=sampled["input_ids"], attention_mask=sampled["attention_mask"]).logits
    jsd = distill_loss(s_logits, teacher.float(), sampled["labels"], kind="jsd", beta=0.3, temperature=1.5, alpha=1.0).loss
    b_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    ce = F.cross_entropy(b_logits[targets != IGNORE_INDEX], targets[targets != IGNORE_INDEX])
    assert float(loss) == pytest.approx(float(0.6 * jsd + 0.4 * ce), rel=1e-5)
    assert metrics["on_policy"] == 1.0 and metrics["ce_loss"] == pytest.approx(float(ce), rel=1e-5)
