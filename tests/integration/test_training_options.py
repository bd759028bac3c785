"""Training options on a real local Ray with tiny models: ESFT on a sharded MoE, curriculum order,
feature distillation in stages on 2 FSDP workers, and distillation schedules."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from distillery.config import load_config
from distillery.distill.method import run_distill
from distillery.models.init_model import ArchSpec, init_model
from distillery.train.curriculum import curriculum_ranks
from distillery.train.finetune import run_finetune
from training_runs import local_ray, run_cfg, run_metrics, traced_batches  # noqa: F401  (local_ray: the module's Ray, autouse)

pytestmark = pytest.mark.slow




def _overrides(out, prepared, *extra):
    return [f"output_dir={out}", f"data.prepared={prepared}", "train.batch_size=8", "train.lr=5e-3",
            "train.scheduler=constant", "train.num_workers=1", "train.strategy=none", *extra]


@pytest.mark.timeout(600)
def test_esft_under_fsdp_trains_only_the_chosen_experts(tmp_path, prepared_tiny, tiny_moe):
    """ESFT on a Qwen2-MoE sharded by FSDP2 over 2 workers (2 of the 4 experts per rank), with weight
    decay and everything outside the experts also training: the experts it did not choose come out
    bitwise unchanged, the chosen ones change, and the router's load-balancing loss is logged."""
    run = tmp_path / "esft"
    cfg = run_cfg(run, prepared_tiny, tiny_moe, "method.kind=esft", "method.esft.threshold=0.3", "method.esft.sample_tokens=400",
               "method.esft.train_non_expert=true", "train.num_workers=2", "train.strategy=fsdp", "train.weight_decay=0.1",
               "train.router_aux_loss_coef=0.05")
    assert run_finetune(cfg) == 0
    record = json.loads((run / "esft_experts.json").read_text())
    selected = {int(layer): entry["selected"] for layer, entry in record["layers"].items()}
    assert set(selected) == {0, 1} and all(1 <= len(ids) < 4 for ids in selected.values())
    assert record["sample_tokens"] >= 400 and all(abs(sum(e["scores"]) - 1) < 1e-6 for e in record["layers"].values())
    before = load_file(str(Path(tiny_moe) / "model.safetensors"))
    after = load_file(str(run / "model" / "model.safetensors"))
    experts = {k for k in before if ".mlp.experts." in k}
    chosen = {k for k in experts if int(k.split(".mlp.experts.")[1].split(".")[0]) in selected[int(k.split(".")[2])]}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed & experts == chosen  # every chosen expert moved, no other expert did (not even by weight decay)
    assert {k for k in changed if "shared_expert" in k} == set()  # shared experts: frozen by default
    assert any(k.endswith("mlp.gate.weight") for k in changed)  # train_non_expert: routers train too
    metrics = run_metrics(run)
    aux = [m["router_aux_loss"] for m in metrics if "router_aux_loss" in m]
    assert len(aux) == 6 and all(a > 0 for a in aux)
    report = json.loads((run / "run.json").read_text())["metrics"]
    assert report["trainable_fraction"] == pytest.approx(record["trainable_fraction"])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("by", ["length", "teacher_loss"])
def test_curriculum_trains_stages_from_easy_to_hard(tmp_path, prepared_tiny, tiny_teacher, tiny_student, by):
    """One epoch in curriculum order, read back from the row trace: every row of a stage is at most
    as hard as every row of the next, by length or by the teacher's stored loss per row."""
    run = tmp_path / by
    cfg = run_cfg(run, prepared_tiny, tiny_student, f"train.curriculum={{by: {by}, stages: 3}}", f"model.teacher={tiny_teacher}",
               "train.strategy=none", "train.batch_size=16", "train.max_steps=null", "train.epochs=1", "train.trace_rows=true",
               "train.eval_every=null")
    assert run_finetune(cfg) == 0
    summary = json.loads((run / "curriculum.json").read_text())
    assert summary["by"] == by and summary["stages"] == 3 and summary["stage_upper_bounds"] == sorted(summary["stage_upper_bounds"])
    if by == "length":
        table = pq.read_table(prepared_tiny / "train", columns=["row_id", "num_tokens"])
        difficulty = dict(zip(table["row_id"].to_pylist(), table["num_tokens"].to_pylist()))
    else:
        (scores,) = (prepared_tiny / "curriculum").glob("*.parquet")
        table = pq.read_table(scores)
        difficulty = dict(zip(table["row_id"].to_pylist(), table["difficulty"].to_pylist()))
        assert json.loads((run / "run_identity.json").read_text())["curriculum_teacher"]
    seen = [rid for batch in traced_batches(run, 1) for rid in batch[0]]
    assert len(seen) >= 0.9 * len(difficulty) and len(set(seen)) == len(seen)
    ranks, _ = curriculum_ranks(difficulty, 3, cfg.seed)
    assert seen == sorted(ranks, key=ranks.get)[: len(seen)]  # exactly the planned order
    cut = [-(-k * len(ranks) // 3) for k in range(4)]  # stage k holds positions i with i*3//n == k
    thirds = [seen[cut[k] : cut[k + 1]] for k in range(3)]
    for easier, harder in zip(thirds, thirds[1:]):
        assert max(difficulty[r] for r in easier) <= min(difficulty[r] for r in harder)


@pytest.mark.timeout(900)
def test_hidden_and_attention_distillation_with_stages_and_entropy_weighting_on_two_fsdp_workers(
        tmp_path, prepared_tiny, tiny_teacher):
    """Feature distillation end to end through the training loop: a student half the teacher's width
    with as many heads, 2 FSDP workers, hidden states matched through learned projections, attention
    maps through eager attention, two progressive stages (logits first, then features at a lower
    temperature) and entropy-weighted KD. Every step's metrics show the stage it was in; the
    projections train but never reach the exported student."""
    from safetensors.torch import load_file

    student = tmp_path / "student"
    init_model(student, ArchSpec(layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64), tokenizer_from=str(tiny_teacher), seed=4)
    out = tmp_path / "features"
    cfg = load_config(overrides=_overrides(out, prepared_tiny, f"model.path={student}", f"model.teacher={tiny_teacher}",
        "train.num_workers=2", "train.strategy=fsdp", "train.max_steps=8", "train.batch_size=4", "distill.temperature=3",
        "distill.alpha=0.8", "distill.entropy_weighting=true", "distill.hidden={weight: 1.0, loss: mse, attention_weight: 0.5}",
        "distill.stages=[{steps: 4, hidden_weight: 0}, {steps: 4, hidden_weight: 2.0, temperature: 1.0, alpha: 0.4}]"))
    assert run_distill(cfg) == 0
    steps = [m for m in (json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()) if "kd_loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 9))
    first, second = steps[:4], steps[4:]
    assert all("hidden_loss" not in m and m["temperature"] == 3.0 for m in first)
    assert all(m["hidden_loss"] > 0 and m["temperature"] == 1.0 for m in second)
    # Entropy weighting scales each stage's alpha by the teacher's confidence, in (0, stage alpha].
    assert all(0 < m["alpha"] <= 0.8 for m in first) and all(0 < m["alpha"] <= 0.4 for m in second)
    assert any(m["alpha"] < 0.8 for m in first)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in steps)
    exported = load_file(str(out / "model" / "model.safetensors"))
    assert not any("proj" in k and not k.startswith("model.layers.") for k in exported)  # projections stay behind
    assert exported["model.embed_tokens.weight"].shape[1] == 32


@pytest.mark.timeout(600)
def test_temperature_and_alpha_schedules_move_over_the_run(tmp_path, prepared_tiny, tiny_teacher, tiny_student):
    """Schedules through the loop: the metrics of each step carry the scheduled temperature and alpha."""
    out = tmp_path / "sched"
    cfg = load_config(overrides=_overrides(out, prepared_tiny, f"model.path={tiny_student}", f"model.teacher={tiny_teacher}",
        "train.max_steps=6", "distill.temperature=4", "distill.temperature_schedule={kind: linear, end: 1.0}",
        "distill.alpha=0.9", "distill.alpha_schedule={kind: cosine, end: 0.1}"))
    assert run_distill(cfg) == 0
    steps = [m for m in (json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()) if "kd_loss" in m]
    temps, alphas = [m["temperature"] for m in steps], [m["alpha"] for m in steps]
    assert temps[0] == pytest.approx(4.0) and temps == sorted(temps, reverse=True) and temps[-1] < 2.0
    assert alphas[0] == pytest.approx(0.9) and alphas == sorted(alphas, reverse=True) and alphas[-1] < 0.3
