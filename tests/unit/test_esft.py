"""ESFT and the MoE router loss without Ray: expert relevance, selection, trainable slices that stay
bitwise unchanged under AdamW with weight decay, and the load-balancing loss in the objective."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from distillery.config import ConfigError, MethodConfig, load_config
from distillery.models.experts import ExpertSlices, check_selection, expert_relevance, read_selection, select_experts
from distillery.models.structure import moe_blocks
from distillery.models.init_model import ArchSpec, init_model
from distillery.models.plan import apply_method, check_method
from distillery.train.esft import sample_batches
from distillery.train.loop import build_optimizer
from distillery.train.objective import CrossEntropyObjective

MOE = dict(layers=2, hidden=32, heads=2, kv_heads=1, intermediate=32, experts=4, experts_per_token=2)


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory, tiny_teacher) -> dict[str, str]:
    """One tiny model of each MoE architecture init-model builds."""
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for arch in ("mixtral", "qwen2_moe", "qwen3_moe"):
        init_model(root / arch, ArchSpec(arch=arch, **MOE), tokenizer_from=str(tiny_teacher), seed=3)
        out[arch] = str(root / arch)
    return out


def test_selection_takes_experts_until_the_threshold_and_at_least_one():
    relevance = {0: [0.1, 0.5, 0.3, 0.1], 1: [0.25, 0.25, 0.25, 0.25], 2: [0.9, 0.05, 0.05, 0.0]}
    assert select_experts(relevance, 0.2) == {0: [1], 1: [0], 2: [0]}
    assert select_experts(relevance, 0.8) == {0: [1, 2], 1: [0, 1, 2, 3], 2: [0]}
    assert select_experts(relevance, 1.0) == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3], 2: [0, 1, 2]}


@pytest.mark.parametrize("kind", ["gate", "token"])
def test_relevance_is_a_share_per_layer_over_the_sample(moe_models, prepared_tiny, kind):
    model = AutoModelForCausalLM.from_pretrained(moe_models["mixtral"])
    cfg = load_config(overrides=[f"data.prepared={prepared_tiny}", "method.esft.sample_tokens=300"])
    batches = list(sample_batches(cfg, 0, torch.device("cpu")))
    relevance, tokens = expert_relevance(model, iter(batches), kind, 300)
    assert set(relevance) == {0, 1}
    for scores in relevance.values():
        assert len(scores) == 4 and abs(sum(scores) - 1) < 1e-9 and min(scores) >= 0
    # Only non-padding tokens count, and the sample stops at the first batch past sample_tokens.
    assert 300 <= tokens <= 300 + sum(int(b["attention_mask"].sum()) for b in batches[-1:])
    if kind == "token":  # top-2 of 4: shares of the 2·tokens selections made
        for scores in relevance.values():
            assert all(abs(s * 2 * tokens - round(s * 2 * tokens)) < 1e-6 for s in scores)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_esft_plan_trains_chosen_slices_only(moe_models, arch):
    model = AutoModelForCausalLM.from_pretrained(moe_models[arch])
    selected = {0: [1], 1: [0, 3]}
    model, plan = apply_method(model, MethodConfig(kind="esft"), selected)
    assert len(moe_blocks(model)) == 2
    assert set(plan.expert_masks) == {f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")}
    assert plan.expert_masks["model.layers.1.mlp.experts.down_proj"].tolist() == [True, False, False, True]
    assert set(plan.trainable_names) == set(plan.expert_masks)  # routers, shared experts, attention: frozen
    per_expert = sum(p[0].numel() for n, p in model.named_parameters() if n in plan.expert_masks and ".layers.0." in n)
    assert plan.trainable == 3 * per_expert
    assert 0 < plan.fraction < 0.5


def test_esft_shared_and_non_expert_switches(moe_models):
    model = AutoModelForCausalLM.from_pretrained(moe_models["qwen2_moe"])
    _, plan = apply_method(model, MethodConfig.model_validate({"kind": "esft", "esft": {"train_shared": True}}), {0: [0], 1: [0]})
    shared = {n for n in plan.trainable_names if "shared_expert" in n}
    assert shared and {n for n in plan.trainable_names if n not in plan.expert_masks} == shared
    model = AutoModelForCausalLM.from_pretrained(moe_models["qwen2_moe"])
    _, plan = apply_method(model, MethodConfig.model_validate({"kind": "esft", "esft": {"train_non_expert": True}}), {0: [0], 1: [0]})
    names = set(plan.trainable_names)
    assert "model.layers.0.mlp.gate.weight" in names and "lm_head.weight" in names and "model.layers.0.self_attn.q_proj.weight" in names
    assert not any("shared_expert" in n for n in names)


def test_unselected_expert_slices_stay_bitwise_unchanged_under_adamw(moe_models):
    """Masked gradients plus slice-wise weight decay: after several AdamW steps with weight decay the
    unselected experts are bitwise equal to the start and the selected ones moved."""
    model = AutoModelForCausalLM.from_pretrained(moe_models["mixtral"])
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, plan = apply_method(model, MethodConfig(kind="esft"), {0: [2], 1: [1, 3]})
    slices = ExpertSlices(plan.expert_masks, weight_decay=0.1)
    slices.bind(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(slices.param_groups(params), load_config(overrides=["train.lr=1e-2", "train.weight_decay=0.1"]))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0]  # every trainable tensor is a masked expert tensor
    ids = torch.randint(6, 300, (4, 24))
    for _ in range(4):
        model(input_ids=ids, labels=ids).loss.backward()
        slices.mask_grads()
        slices.decay(opt.param_groups[0]["lr"])
        opt.step()
        opt.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        if name in plan.expert_masks:
            mask = plan.expert_masks[name]
            assert torch.equal(p.detach()[~mask], start[name][~mask]), name
            assert not torch.equal(p.detach()[mask], start[name][mask]), name
        else:
            assert torch.equal(p.detach(), start[name]), name


def test_dense_models_and_bad_selection_files_fail_before_training(tmp_path, moe_models, tiny_teacher):
    from distillery.models.load import model_config

    with pytest.raises(ConfigError, match="dense 'llama'"):
        check_method(MethodConfig(kind="esft"), model_config(tiny_teacher))
    moe = model_config(moe_models["mixtral"])
    check_method(MethodConfig(kind="esft"), moe)
    bad = tmp_path / "sel.json"
    bad.write_text(json.dumps({"layers": {"0": {"selected": [7]}}}))
    with pytest.raises(ConfigError, match=r"method.esft.experts_file: layer 0 names experts \[7\], the model has 4"):
        check_method(MethodConfig.model_validate({"kind": "esft", "esft": {"experts_file": str(bad)}}), moe)
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="is not an ESFT selection"):
        read_selection(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        read_selection(str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="layer 5 is not in 0..1"):
        check_selection({5: [0]}, moe, "x")


def test_router_loss_is_in_the_moe_objective_and_absent_for_dense(moe_models, tiny_teacher):
    from distillery.train.objective import router_aux_coef

    batch = {"input_ids": torch.randint(6, 300, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    cfg = load_config(overrides=["train.strategy=none"])
    moe = AutoModelForCausalLM.from_pretrained(moe_models["qwen3_moe"])
    assert router_aux_coef(cfg, moe) == moe.config.router_aux_loss_coef > 0  # the model's default
    assert router_aux_coef(load_config(overrides=["train.router_aux_loss_coef=0.5"]), moe) == 0.5
    with_aux = CrossEntropyObjective(cfg, None, aux_coef=0.5)
    loss, metrics = with_aux(moe, batch)
    plain_loss, plain = CrossEntropyObjective(cfg, None)(moe, batch)
    assert metrics["router_aux_loss"] > 0 and "router_aux_loss" not in plain
    assert loss.item() == pytest.approx(plain_loss.item() + 0.5 * metrics["router_aux_loss"], rel=1e-5)
    loss.backward()
    assert moe.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    dense = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    assert router_aux_coef(load_config(overrides=["train.router_aux_loss_coef=0.5"]), dense) == 0.0


def test_router_loss_keeps_routing_balanced_when_only_some_experts_learn(tiny_moe, prepared_tiny):
    """ESFT with the routers training: the chosen experts improve, so the router drifts toward them
    and the others starve. With the load-balancing loss every expert keeps a real share."""
    cfg = load_config(overrides=[f"data.prepared={prepared_tiny}", "train.strategy=none", "method.esft.sample_tokens=4000"])
    batches = list(sample_batches(cfg, 0, torch.device("cpu")))
    for b in batches:
        b["labels"] = torch.where(b["attention_mask"] > 0, b["input_ids"], -100)
    method = MethodConfig.model_validate({"kind": "esft", "esft": {"train_non_expert": True}})
    lowest = {}
    for coef in (0.0, 0.05):
        torch.manual_seed(0)
        model, plan = apply_method(AutoModelForCausalLM.from_pretrained(tiny_moe), method, {0: [0], 1: [1]})
        slices = ExpertSlices(plan.expert_masks, 0.0)
        slices.bind(model)
        objective = CrossEntropyObjective(cfg, None, aux_coef=coef)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        for step in range(20):
            loss, _ = objective(model, batches[step % len(batches)])
            loss.backward()
            slices.mask_grads()
            opt.step()
            opt.zero_grad()
        shares, _ = expert_relevance(model, iter(batches), "token", 4000)
        lowest[coef] = min(min(s) for s in shares.values())
    assert lowest[0.0] < 0.05 < lowest[0.05]


def test_choice_is_measured_once_then_reused(tmp_path, tiny_moe, prepared_tiny):
    """Without a process group: a fresh run measures (and rank 0 records), a resumed run reads its own
    file back, and `experts_file` reuses another run's choice."""
    from distillery.train.esft import choose_experts, record_choice

    cfg = load_config(overrides=[f"output_dir={tmp_path}", f"data.prepared={prepared_tiny}", "method.kind=esft",
                                 "method.esft.sample_tokens=200", "method.esft.threshold=0.6"])
    model = AutoModelForCausalLM.from_pretrained(tiny_moe)
    chosen, pending = choose_experts(cfg, model, 0, torch.device("cpu"), rank=0, resuming=False)
    assert pending["selected"] == chosen and all(2 <= len(v) <= 4 for v in chosen.values())
    record_choice(cfg, pending, 0.4)
    on_disk = json.loads((tmp_path / "esft_experts.json").read_text())
    assert on_disk["trainable_fraction"] == 0.4 and on_disk["relevance"] == "gate" and on_disk["threshold"] == 0.6
    assert read_selection(str(tmp_path / "esft_experts.json")) == chosen
    again, pending = choose_experts(cfg, model, 0, torch.device("cpu"), rank=0, resuming=True)
    assert again == chosen and pending is None
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"layers": {"0": {"selected": [3]}, "1": {"selected": [0, 2]}}}))
    cfg.method.esft.experts_file = str(other)
    reused, pending = choose_experts(cfg, model, 0, torch.device("cpu"), rank=0, resuming=False)
    assert reused == {0: [3], 1: [0, 2]} and pending is None


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("kind", ["gate", "token"])
def test_selector_finds_the_experts_a_biased_router_prefers(tmp_path, tiny_teacher, prepared_tiny, arch, kind):
    from moe_fixture import biased_moe

    chosen = {0: [1, 2], 1: [0, 3]}
    path = biased_moe(tmp_path / arch, arch, str(tiny_teacher), chosen)
    model = AutoModelForCausalLM.from_pretrained(path)
    cfg = load_config(overrides=[f"data.prepared={prepared_tiny}", "method.esft.sample_tokens=500"])
    relevance, _ = expert_relevance(model, sample_batches(cfg, 0, torch.device("cpu")), kind, 500)
    assert select_experts(relevance, 0.9) == chosen
    assert select_experts(relevance, 0.4) in ({0: [1], 1: [0]}, {0: [2], 1: [0]}, {0: [1], 1: [3]}, {0: [2], 1: [3]})
