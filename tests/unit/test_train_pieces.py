"""Training building blocks without Ray: parameter plans, collation, key-term weighting, schedules, EWC."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillery.config import ConfigError, MethodConfig, load_config
from distillery.models.plan import apply_method
from distillery.train.collate import collate
from distillery.train.ewc import EwcPenalty, estimate_fisher
from distillery.train.batches import shard_batches
from distillery.train.loop import build_optimizer, lr_lambda
from distillery.train.objective import CrossEntropyObjective, key_term_mask, key_term_sequences


def test_full_and_lora_plans(tiny_teacher):
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    _, plan = apply_method(model, MethodConfig(kind="full"))
    assert plan.trainable == plan.total and plan.fraction == 1.0
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    peft_model, plan = apply_method(model, MethodConfig.model_validate({"kind": "lora", "lora": {"r": 4}}))
    assert 0 < plan.fraction < 0.2
    assert plan.trainable_names and all("lora_" in n for n in plan.trainable_names)
    assert {n.split(".")[-3] for n in plan.trainable_names} == {"lora_A", "lora_B"}
    assert any("q_proj" in n for n in plan.trainable_names) and any("v_proj" in n for n in plan.trainable_names)


@pytest.mark.parametrize("n, layers", [(1, [1]), (-1, [0]), (2, [0, 1])])
def test_freeze_trains_exactly_what_it_reports(tiny_teacher, n, layers):
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)  # 2 decoder layers, untied lm_head
    model, plan = apply_method(model, MethodConfig.model_validate({"kind": "freeze", "freeze": {"trainable_layers": n}}))
    expected = {
        name for name, _ in model.named_parameters()
        if any(name.startswith(f"model.layers.{i}.") for i in layers) or name.startswith(("model.norm.", "lm_head."))
    }
    assert set(plan.trainable_names) == expected
    assert not any(name.startswith("model.embed_tokens") for name in plan.trainable_names)
    assert plan.trainable == sum(p.numel() for name, p in model.named_parameters() if name in expected)


def test_plan_errors(tiny_teacher):
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    with pytest.raises(ConfigError, match="trainable_layers: 5"):
        apply_method(model, MethodConfig.model_validate({"kind": "freeze", "freeze": {"trainable_layers": 5}}))
    with pytest.raises(ConfigError, match="target_modules"):
        apply_method(model, MethodConfig.model_validate({"kind": "lora", "lora": {"target_modules": ["qkv"]}}))
    with pytest.raises(ConfigError, match="esft"):
        apply_method(model, MethodConfig(kind="esft"))


def test_missing_frozen_layers_fail_before_ray(tmp_path, prepared_tiny, tiny_teacher):
    """`validate_training` (run before Ray starts, and by each tune trial before its workers) reads the
    layer count from config.json: a 2-layer model cannot train its last 99 or its first 3."""
    from distillery.train.finetune import FINETUNE
    from distillery.train.run import validate_training

    for n in (99, -3):
        cfg = load_config(overrides=[f"output_dir={tmp_path}", f"data.prepared={prepared_tiny}", f"model.path={tiny_teacher}",
                                     "method.kind=freeze", f"method.freeze.trainable_layers={n}"])
        with pytest.raises(ConfigError, match=rf"trainable_layers: {n} is not in ±1..±2 for a 2-layer model"):
            validate_training(cfg, FINETUNE)
    validate_training(load_config(overrides=[f"output_dir={tmp_path}", f"data.prepared={prepared_tiny}", f"model.path={tiny_teacher}",
                                             "method.kind=freeze", "method.freeze.trainable_layers=-2"]), FINETUNE)


def test_settings_that_cannot_work_fail_before_ray(tmp_path, prepared_tiny, tiny_teacher, tiny_student):
    """ESFT and a router loss on a dense model, EWC without the previous task's data, and
    fine-tuning-only keys under distill fail in `validate_training`, not inside the workers."""
    from distillery.distill.method import DISTILL
    from distillery.train.finetune import FINETUNE
    from distillery.train.run import validate_training

    base = [f"output_dir={tmp_path}", f"data.prepared={prepared_tiny}", f"model.path={tiny_teacher}"]
    with pytest.raises(ConfigError, match="method.kind: esft trains chosen experts of a mixture-of-experts model; this is a dense 'llama'"):
        validate_training(load_config(overrides=base + ["method.kind=esft"]), FINETUNE)
    with pytest.raises(ConfigError, match="train.router_aux_loss_coef: .* dense 'llama'"):
        validate_training(load_config(overrides=base + ["train.router_aux_loss_coef=0.01"]), FINETUNE)
    with pytest.raises(ConfigError, match="train.ewc.previous: set"):
        validate_training(load_config(overrides=base + ["train.ewc.lambda=1"]), FINETUNE)
    with pytest.raises(ConfigError, match="train.ewc.previous: no prepared train split"):
        validate_training(load_config(overrides=base + ["train.ewc.lambda=1", f"train.ewc.previous={tmp_path}/none"]), FINETUNE)
    validate_training(load_config(overrides=base + ["train.ewc.lambda=1", f"train.ewc.previous={prepared_tiny}"]), FINETUNE)
    teacher = [f"model.teacher={tiny_teacher}"]
    with pytest.raises(ConfigError, match="train.key_terms: applies to `distillery finetune` only"):
        validate_training(load_config(overrides=base + teacher + ["train.key_terms=[SKU]"]), DISTILL)
    with pytest.raises(ConfigError, match="train.ewc.lambda: applies to `distillery finetune` only"):
        validate_training(load_config(overrides=base + teacher + ["train.ewc.lambda=1"]), DISTILL)
    validate_training(load_config(overrides=base + teacher), DISTILL)
    one_head = [f"output_dir={tmp_path}", f"data.prepared={prepared_tiny}", f"model.path={tiny_student}"] + teacher
    with pytest.raises(ConfigError, match="distill.hidden.attention_weight: .* the student has 1 attention heads and the teacher 2"):
        validate_training(load_config(overrides=one_head + ["distill.hidden={attention_weight: 0.5}"]), DISTILL)
    validate_training(load_config(overrides=one_head + ["distill.hidden={weight: 1.0}"]), DISTILL)


def test_optimizer_is_fused_adamw_with_the_default_update(tiny_teacher):
    """The loop's AdamW runs PyTorch's fused kernel on CPU parameters and updates exactly as the default one."""
    cfg = load_config(overrides=["train.lr=1e-2", "train.weight_decay=0.1"])
    fused_model, plain_model = (AutoModelForCausalLM.from_pretrained(tiny_teacher) for _ in range(2))
    fused = build_optimizer([{"params": list(fused_model.parameters())}], cfg)
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2, weight_decay=0.1)
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    for _ in range(3):
        for model, opt in ((fused_model, fused), (plain_model, plain)):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(fused_model.named_parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_collate_pads_and_masks():
    batch = {"input_ids": np.array([np.array([5, 6, 7]), np.array([8])], dtype=object),
             "labels": np.array([np.array([-100, 6, 7]), np.array([8])], dtype=object),
             "row_id": np.array(["a", "b"])}
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert list(out["row_id"]) == ["a", "b"]
    assert collate(batch, pad_id=0, max_length=2)["input_ids"].shape == (2, 2)


class _Rows:
    """A shard stand-in over numpy columns: `iter_batches` cuts them like Ray Data (last batch short)."""

    def __init__(self, n: int):
        ids = np.empty(n, dtype=object)  # ragged rows, as Ray Data hands list columns over
        ids[:] = [np.arange(i % 5 + 1) for i in range(n)]
        self.cols = {"row_id": np.array([f"r{i}" for i in range(n)], dtype=object), "input_ids": ids}
        self.fetched: list[int] = []

    def iter_batches(self, batch_size: int, batch_format: str):
        n = len(self.cols["row_id"])
        for start in range(0, n, batch_size):
            self.fetched.append(min(batch_size, n - start))
            yield {k: v[start : start + batch_size] for k, v in self.cols.items()}


@pytest.mark.parametrize("n", [0, 7, 256, 1000])
def test_shard_batches_cut_like_iter_batches(n):
    for bs in (1, 3, 8, 300):
        shard = _Rows(n)
        got = [list(b["row_id"]) for b in shard_batches(shard, bs, ["row_id", "input_ids", "missing"])]
        want = [list(b["row_id"]) for b in _Rows(n).iter_batches(batch_size=bs, batch_format="numpy")]
        assert got == want
        assert all(f % bs == 0 for f in shard.fetched[:-1])  # whole micro-batches per fetch
        assert len(shard.fetched) <= max(1, -(-n // max(bs, 256)) + 1)


def test_validation_batches_replay_a_small_shard_and_stream_a_large_one(monkeypatch):
    import torch

    from distillery.train import batches as loop

    cpu = torch.device("cpu")
    small = _Rows(40)
    batches = loop.ValidationBatches(small, 8, ["row_id", "input_ids"])
    first = [list(b["row_id"]) for b in batches]
    batches.settle(cpu)
    assert [list(b["row_id"]) for b in batches] == first and len(first) == 5
    assert len(small.fetched) == 1  # read once, replayed after
    monkeypatch.setattr(loop, "VAL_KEEP_BYTES", 100)
    large = _Rows(40)
    batches = loop.ValidationBatches(large, 8, ["row_id", "input_ids"])
    for _ in range(2):
        assert [list(b["row_id"]) for b in batches] == first
        batches.settle(cpu)
    assert batches.kept is None and len(large.fetched) == 2  # over the limit: streamed each time


def test_key_term_mask_marks_each_occurrence():
    ids = torch.tensor([[1, 2, 3, 4, 2, 3], [9, 9, 9, 9, 9, 2]])
    mask = key_term_mask(ids, [[2, 3]])
    assert mask.tolist() == [[False, True, True, False, True, True], [False] * 6]


def test_key_terms_weight_the_loss(tiny_teacher):
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    text = tok("profit rises, profit falls", return_tensors="pt")["input_ids"]
    batch = {"input_ids": text, "labels": text.clone(), "attention_mask": torch.ones_like(text)}
    plain = CrossEntropyObjective(load_config(), tok)
    weighted = CrossEntropyObjective(load_config(overrides=["train.key_terms=[profit]", "train.key_term_weight=3"]), tok)
    assert key_term_sequences(tok, ["profit"])
    w = weighted.token_weights(batch)
    assert (w == 3).any() and (w == 1).any()
    # Reference: weighted mean of per-token NLL.
    with torch.no_grad():
        logits = model(input_ids=text).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), text[:, 1:], reduction="none")
        expected = (nll * w).sum() / w.sum()
        got, _ = weighted(model, batch)
        base, _ = plain(model, batch)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.item() != pytest.approx(base.item(), rel=1e-4)


@pytest.mark.parametrize("key_terms", [False, True])
def test_target_only_logits_equal_full_logits(tiny_teacher, key_terms):
    """The lm_head on target positions alone (strategy none/ddp) gives the loss, gradients and
    evaluation sums of projecting every position (strategy fsdp), with prompt and padding masked."""
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    rows = [tok(t)["input_ids"] for t in ("profit rises, profit falls and profit stays", "costs fall", "a b c d e f g")]
    labels = [[-100] * 3 + r[3:] for r in rows]
    labels[2] = [-100] * len(rows[2])  # a row without any target
    batch = collate({"input_ids": rows, "labels": labels}, tok.pad_token_id)
    extra = ["train.key_terms=[profit]", "train.key_term_weight=2"] if key_terms else []
    results = []
    for strategy in ("none", "fsdp"):
        model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
        obj = CrossEntropyObjective(load_config(overrides=[f"train.strategy={strategy}", *extra]), tok)
        loss, _ = obj(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, obj.evaluate(model, batch)))
    (l1, g1, e1), (l2, g2, e2) = results
    assert torch.allclose(l1, l2, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys() and any("lm_head" in n or "embed" in n for n in g1)
    for n in g1:
        assert torch.allclose(g1[n], g2[n], rtol=1e-4, atol=1e-6), n
    assert e1["tokens"] == e2["tokens"] == sum(1 for r in labels for x in r[1:] if x != -100)
    assert e1["nll"] == pytest.approx(e2["nll"], rel=1e-5)


def test_lr_schedules():
    cfg = load_config(overrides=["train.lr=1", "train.warmup_steps=2", "train.scheduler=cosine"])
    f = lr_lambda(cfg, total_steps=10)
    assert [round(f(s), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    lin = lr_lambda(load_config(overrides=["train.scheduler=linear"]), total_steps=4)
    assert [lin(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_lambda(load_config(overrides=["train.scheduler=constant"]), 4)(3) == 1.0


def test_ewc_penalty_is_zero_at_anchor_and_grows_away(tiny_student, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_student)
    rows = [{"input_ids": [1, 5, 6, 7, 2], "labels": [-100, -100, 6, 7, 2]}] * 3
    fisher, anchor = estimate_fisher(model, rows, pad_id=0)
    assert all((f >= 0).all() for f in fisher.values()) and any(f.sum() > 0 for f in fisher.values())
    ewc = EwcPenalty(2.0, fisher, anchor)
    assert ewc.penalty(model).item() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    expected = 0.5 * 2.0 * sum((fisher[n] * 0.1**2).sum() for n in fisher)
    assert ewc.penalty(model).item() == pytest.approx(expected.item(), rel=1e-4)
    # Its gradient is λ·F·(θ − θ*), added after backward.
    for p in model.parameters():
        p.grad = None
    ewc.add_grad(model)
    for n, p in model.named_parameters():
        if n in fisher:
            assert torch.allclose(p.grad, 2.0 * fisher[n] * 0.1, atol=1e-6)
    ewc.save(str(tmp_path / "ewc.safetensors"))
    again = EwcPenalty.load(2.0, str(tmp_path / "ewc.safetensors"))
    assert again.penalty(model).item() == pytest.approx(expected.item(), rel=1e-4)


def test_attention_kernel_follows_the_config_and_attention_distillation():
    """`model.attn_implementation` reaches the student's loader; attention-map distillation forces eager."""
    from distillery.distill.method import DISTILL
    from distillery.train.finetune import FINETUNE

    assert FINETUNE.attn_implementation(load_config()) is None
    assert FINETUNE.attn_implementation(load_config(overrides=["model.attn_implementation=sdpa"])) == "sdpa"
    assert DISTILL.attn_implementation(load_config(overrides=["model.attn_implementation=sdpa"])) == "sdpa"
    attn = load_config(overrides=["model.attn_implementation=sdpa", "distill.hidden={weight: 1.0, attention_weight: 0.5}"])
    assert DISTILL.attn_implementation(attn) == "eager"


def test_top_k_above_the_vocabulary_fails_before_ray(tmp_path, prepared_tiny, tiny_teacher):
    """distill.top_k larger than the teacher's vocabulary would pad every cached position with
    made-up entries; cache-teacher refuses it before Ray starts."""
    import ray

    from distillery.distill.teacher_cache import TeacherCacheError, run_cache_teacher

    cfg = load_config(overrides=[f"data.prepared={prepared_tiny}", f"model.teacher={tiny_teacher}", "distill.top_k=513",
                                 f"distill.cache={tmp_path / 'cache'}"])
    with pytest.raises(TeacherCacheError, match=r"distill.top_k: 513 is above the vocabulary .* \(512\)"):
        run_cache_teacher(cfg)
    assert not ray.is_initialized() and not (tmp_path / "cache").exists()


def test_metrics_log_survives_a_truncated_last_line(tmp_path):
    """A kill or a full disk can cut metrics.jsonl mid-line; resuming keeps every whole record up to
    the restored step and drops the broken tail instead of crashing."""
    from distillery.train.checkpoint import MetricsLog, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n\n{"step": 3, "loss": 1.2}\n{"step": 4, "lo')
    cfg = load_config(overrides=[f"output_dir={tmp_path}"])
    log = MetricsLog(cfg, rank=0, resume_step=2)
    assert read_metrics(str(path)) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    log.write({"step": 3, "loss": 1.1})
    assert [r["step"] for r in read_metrics(str(path))] == [1, 2, 3]


def test_a_run_directory_resumes_only_its_own_run(tmp_path, prepared_tiny, tiny_teacher, tiny_student):
    """Checkpoints in output_dir are resumed only by the same run: another lr, stage or student is
    refused before Ray starts, naming what changed; resume-neutral keys do not count; `fresh`
    clears the old run, `force` resumes anyway."""
    from distillery.distill.method import DISTILL
    from distillery.train.finetune import FINETUNE
    from distillery.train.identity import check_resume

    run = tmp_path / "run"
    base = [f"output_dir={run}", f"data.prepared={prepared_tiny}", f"model.path={tiny_student}", "train.lr=1e-3"]
    assert check_resume(load_config(overrides=base), FINETUNE) == "new"
    (run / "ray" / "train" / "checkpoint_2026-01-01").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "model").mkdir()
    assert check_resume(load_config(overrides=base + ["train.eval_every=7", "train.max_failures=3"]), FINETUNE) == "resume"
    with pytest.raises(ConfigError, match=r"(?s)holds checkpoints of another run.*train.lr: 0.001 -> 0.002.*train.resume=fresh"):
        check_resume(load_config(overrides=base + ["train.lr=2e-3"]), FINETUNE)
    with pytest.raises(ConfigError, match=r"model: '[0-9a-f]{64}' -> '[0-9a-f]{64}'"):
        check_resume(load_config(overrides=[*base[:2], f"model.path={tiny_teacher}", base[3]]), FINETUNE)
    with pytest.raises(ConfigError, match="stage: 'finetune' -> 'distill'"):
        check_resume(load_config(overrides=base + [f"model.teacher={tiny_teacher}"]), DISTILL)
    # An identity written before a setting existed: the setting at its default resumes, set otherwise it is a change.
    ident = json.loads((run / "run_identity.json").read_text())
    del ident["settings"]["train.router_aux_loss_coef"]
    (run / "run_identity.json").write_text(json.dumps(ident))
    assert check_resume(load_config(overrides=base), FINETUNE) == "resume"
    # ... and one that recorded a key resume-neutral since (train.cpus_per_worker: 1.0, the old default) resumes.
    (run / "run_identity.json").write_text(json.dumps({**ident, "settings": {**ident["settings"], "train.cpus_per_worker": 1.0}}))
    assert check_resume(load_config(overrides=base + ["train.cpus_per_worker=2"]), FINETUNE) == "resume"
    (run / "run_identity.json").write_text(json.dumps(ident))
    with pytest.raises(ConfigError, match=r"train.router_aux_loss_coef: None -> 0.1"):
        check_resume(load_config(overrides=base + ["train.router_aux_loss_coef=0.1"]), FINETUNE)
    assert check_resume(load_config(overrides=base + ["train.lr=2e-3", "train.resume=force"]), FINETUNE) == "resume"
    assert check_resume(load_config(overrides=base + ["train.lr=3e-3", "train.resume=fresh"]), FINETUNE) == "fresh"
    assert not (run / "ray").exists() and not (run / "metrics.jsonl").exists() and not (run / "model").exists()
    assert (run / "run_identity.json").exists()


def test_training_stages_get_their_own_default_run_directory(tmp_path):
    """Left at its default, output_dir is per stage for finetune and distill (no run resumes
    another stage's checkpoints by default), while the prepared data and teacher cache stay where
    prepare and cache-teacher put them; an output_dir the config names is used as it is."""
    from distillery.distill.method import DISTILL
    from distillery.train.finetune import FINETUNE
    from distillery.train.run import with_run_dir

    cfg = load_config()
    ft, kd = with_run_dir(cfg, FINETUNE), with_run_dir(cfg, DISTILL)
    assert (ft.output_dir, kd.output_dir) == ("runs/default/finetune", "runs/default/distill")
    assert ft.prepared_dir == kd.prepared_dir == cfg.prepared_dir == "runs/default/data"
    assert kd.teacher_cache_dir == cfg.teacher_cache_dir
    named = load_config(overrides=[f"output_dir={tmp_path}"])
    assert with_run_dir(named, DISTILL).output_dir == str(tmp_path)
    yaml_named = tmp_path / "c.yaml"
    yaml_named.write_text("output_dir: runs/x\n")
    assert with_run_dir(load_config(str(yaml_named)), FINETUNE).output_dir == "runs/x"


def test_checkpoint_keeps_extra_modules_and_their_optimiser(tmp_path, tiny_student):
    """Feature projections train outside the model with their own AdamW (DCP's optimiser state is
    keyed by the model's parameter names); a checkpoint restores both, weights and moments."""
    from distillery.train.checkpoint import ExtraState, TrainState, load_checkpoint, save_checkpoint

    def build():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_student)
        proj = torch.nn.Linear(4, 8)
        opts = [torch.optim.AdamW(model.parameters(), lr=1e-2), torch.optim.AdamW(proj.parameters(), lr=1e-2)]
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (s + 1)) for o in opts]
        return model, proj, opts, scheds

    model, proj, opts, scheds = build()
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    for _ in range(2):
        (model(input_ids=ids, labels=ids).loss + proj(torch.ones(4)).pow(2).sum()).backward()
        for o, s in zip(opts, scheds):
            o.step()
            o.zero_grad()
            s.step()
    save_checkpoint(str(tmp_path), model, opts[0], scheds[0], TrainState(step=2), 0, ExtraState([proj], opts[1], scheds[1]))
    model2, proj2, opts2, scheds2 = build()
    state = load_checkpoint(str(tmp_path), model2, opts2[0], scheds2[0], 0, ExtraState([proj2], opts2[1], scheds2[1]))
    assert state.step == 2
    assert torch.equal(proj2.weight, proj.weight) and not torch.equal(proj2.weight, build()[1].weight)
    assert torch.equal(opts2[1].state[proj2.weight]["exp_avg"], opts[1].state[proj.weight]["exp_avg"])
    assert scheds2[1].last_epoch == 2
    assert all(torch.equal(a, b) for a, b in zip(model2.parameters(), model.parameters()))


def test_cpus_per_worker_auto_shares_the_machine(monkeypatch):
    """`train.cpus_per_worker: null` (the default): a run that starts its own Ray gives its workers an
    equal share of the machine's cores, less the sampling engines, shared among concurrent tune trials,
    at least 1 each; a run that joins a cluster reserves 1; an explicit value is kept. Trials and the
    workers get the resolved number."""
    import os

    from distillery.distill.method import DISTILL
    from distillery.train.finetune import FINETUNE
    from distillery.train.run import with_worker_cpus, worker_cpus
    from distillery.tune.search import trial_cpus

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)

    def cfg(*overrides):
        return load_config(overrides=list(overrides))

    assert cfg().train.cpus_per_worker is None
    assert worker_cpus(cfg(), FINETUNE) == 8.0
    assert worker_cpus(cfg("train.num_workers=2"), FINETUNE) == 4.0
    assert worker_cpus(cfg("train.num_workers=3"), FINETUNE) == 2.0
    assert worker_cpus(cfg("train.num_workers=16"), FINETUNE) == 1.0
    on_policy = ["model.teacher=t", "distill.on_policy={}"]
    assert worker_cpus(cfg(*on_policy), DISTILL) == 7.0  # one CPU for the student's sampling engine
    assert worker_cpus(cfg(*on_policy, "distill.on_policy={seq_kd: true}", "train.num_workers=2"), DISTILL) == 3.0
    assert worker_cpus(cfg("train.num_workers=2"), FINETUNE, concurrent_runs=2) == 2.0
    tune = cfg("train.num_workers=2", "tune.max_concurrent_trials=2")
    assert trial_cpus(tune) == 4.0  # two trials of 2 workers x 2 CPUs fill 8 cores
    assert worker_cpus(cfg("train.cpus_per_worker=0.5"), FINETUNE) == 0.5
    assert with_worker_cpus(cfg("train.num_workers=2"), FINETUNE).train.cpus_per_worker == 4.0
    assert with_worker_cpus(cfg("train.cpus_per_worker=3"), FINETUNE).train.cpus_per_worker == 3.0
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert worker_cpus(cfg(), FINETUNE) == 2.0 and worker_cpus(cfg(*on_policy), DISTILL) == 1.0
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert worker_cpus(cfg(), FINETUNE) == 1.0 and worker_cpus(cfg("train.cpus_per_worker=2"), FINETUNE) == 2.0
    with pytest.raises(ConfigError, match="train.cpus_per_worker"):
        cfg("train.cpus_per_worker=0")
