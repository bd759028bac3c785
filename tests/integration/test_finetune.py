"""`distillery finetune` on a real local Ray cluster with 2 workers and tiny models."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from safetensors.torch import load_file

from distillery.config import load_config
from distillery.train.curriculum import curriculum_ranks
from distillery.train.finetune import run_finetune

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # Logical CPUs: two 1-CPU train workers plus room for the Ray Data tasks feeding them.
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def _cfg(out, prepared, model, *overrides):
    return load_config(
        overrides=[
            f"output_dir={out}", f"data.prepared={prepared}", f"model.path={model}", "train.lr=3e-3",
            "train.batch_size=4", "train.max_steps=6", "train.eval_every=3", "train.scheduler=constant", *overrides,
        ]
    )


def _metrics(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]


def _step_losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in _metrics(run) if "loss" in m}


def _write_prepared(root: Path, table: pa.Table, like: Path) -> Path:
    (root / "train").mkdir(parents=True)
    pq.write_table(table, root / "train" / "part-0.parquet")
    shutil.copytree(like / "val", root / "val")
    shutil.copy(like / "manifest.json", root / "manifest.json")
    return root


def _traced_batches(run: Path, world: int) -> list[list[list[str]]]:
    """Per step, each rank's micro-batch row ids, from the run's row trace."""
    per_rank = [[json.loads(l)["row_ids"] for l in (run / "trace" / f"rows_rank{r}.jsonl").read_text().splitlines()] for r in range(world)]
    return [list(batches) for batches in zip(*per_rank)]


@pytest.mark.timeout(900)
def test_fsdp_ddp_and_single_process_agree_and_loss_falls(tmp_path, prepared_tiny, tiny_teacher):
    """Two workers (ddp, fsdp) and one process with grad_accum=2 that sees, at step k, the same two
    micro-batches the two workers saw (read from their row traces): the losses must agree."""
    table = pq.read_table(prepared_tiny / "train" / "part-0.parquet")
    table = table.slice(0, (table.num_rows // 8) * 8)
    data = _write_prepared(tmp_path / "data", table, prepared_tiny)
    runs = {name: _cfg(tmp_path / name, data, tiny_teacher, f"train.strategy={name}", "train.num_workers=2", "train.trace_rows=true")
            for name in ("ddp", "fsdp")}
    for cfg in runs.values():
        assert run_finetune(cfg) == 0
    batches = _traced_batches(tmp_path / "ddp", 2)
    assert len(batches) == 6 and _traced_batches(tmp_path / "fsdp", 2) == batches  # the same shards for both strategies
    by_id = {str(r): i for i, r in enumerate(table.column("row_id").to_pylist())}
    order = [by_id[r] for step in batches for micro in step for r in micro]
    single = _write_prepared(tmp_path / "single_data", table.take(pa.array(order)), prepared_tiny)
    runs["none"] = _cfg(tmp_path / "none", single, tiny_teacher, "train.strategy=none", "train.num_workers=1", "train.grad_accum=2")
    assert run_finetune(runs["none"]) == 0
    losses = {name: _step_losses(tmp_path / name) for name in runs}
    assert sorted(losses["none"]) == list(range(1, 7))
    for name in ("ddp", "fsdp"):
        for step, value in losses["none"].items():
            assert losses[name][step] == pytest.approx(value, rel=2e-4, abs=2e-4), (name, step)
    assert losses["fsdp"][6] < losses["fsdp"][1]
    val = [m["val_loss"] for m in _metrics(tmp_path / "fsdp") if "val_loss" in m]
    assert len(val) == 2 and val[-1] < val[0]
    # The exported model is a plain Hugging Face checkpoint with the trained weights.
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "model")
    initial = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    assert not torch.equal(exported.lm_head.weight, initial.lm_head.weight)
    run = json.loads((tmp_path / "fsdp" / "run.json").read_text())
    assert run["metrics"]["trainable_fraction"] == 1.0
    assert (tmp_path / "fsdp" / "config.yaml").exists()


@pytest.mark.timeout(600)
def test_lora_adapter_loads_with_peft_and_merges(tmp_path, prepared_tiny, tiny_teacher):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tmp_path / "lora", prepared_tiny, tiny_teacher, "method.kind=lora", "method.lora.r=4",
               "method.lora.merge=true", "train.num_workers=2", "train.strategy=fsdp", "train.lr=1e-2")
    assert run_finetune(cfg) == 0
    steps = _step_losses(tmp_path / "lora")
    assert steps[6] < steps[1]
    adapter_dir = tmp_path / "lora" / "model"
    adapter = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(Path(tiny_teacher).resolve()) and adapter["r"] == 4
    base = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_teacher), adapter_dir)
        tuned_logits = tuned(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "merged")(ids).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-4)
    assert torch.allclose(tuned_logits, merged_logits, atol=1e-4)
    run = json.loads((tmp_path / "lora" / "run.json").read_text())
    assert 0 < run["metrics"]["trainable_fraction"] < 0.2


@pytest.mark.timeout(600)
def test_freeze_changes_exactly_the_reported_parameters_with_ewc(tmp_path, prepared_tiny, tiny_teacher):
    cfg = _cfg(tmp_path / "freeze", prepared_tiny, tiny_teacher, "method.kind=freeze", "method.freeze.trainable_layers=1",
               "train.num_workers=2", "train.strategy=fsdp", "train.ewc.lambda=10", f"train.ewc.previous={prepared_tiny}",
               "train.ewc.samples=8")
    assert run_finetune(cfg) == 0
    before = load_file(str(Path(tiny_teacher) / "model.safetensors"))
    after = load_file(str(tmp_path / "freeze" / "model" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trainable = {k for k in before if k.startswith(("model.layers.1.", "model.norm.", "lm_head."))}
    assert changed and changed <= trainable
    assert not any(k.startswith(("model.layers.0.", "model.embed_tokens")) for k in changed)
    run = json.loads((tmp_path / "freeze" / "run.json").read_text())
    expected = sum(before[k].numel() for k in trainable)
    assert run["metrics"]["trainable_parameters"] == expected
    # EWC: the Fisher information is stored with the run and the penalty enters the loss.
    fisher = load_file(str(tmp_path / "freeze" / "ewc.safetensors"))
    assert {k.split(".", 1)[1] for k in fisher if k.startswith("fisher.")} == trainable
    penalties = [m["ewc_penalty"] for m in _metrics(tmp_path / "freeze") if "ewc_penalty" in m]
    assert penalties[0] == 0.0 and penalties[-1] > 0.0


@pytest.mark.timeout(600)
def test_esft_under_fsdp_trains_only_the_chosen_experts(tmp_path, prepared_tiny, tiny_moe):
    """ESFT on a Qwen2-MoE sharded by FSDP2 over 2 workers (2 of the 4 experts per rank), with weight
    decay and everything outside the experts also training: the experts it did not choose come out
    bitwise unchanged, the chosen ones change, and the router's load-balancing loss is logged."""
    run = tmp_path / "esft"
    cfg = _cfg(run, prepared_tiny, tiny_moe, "method.kind=esft", "method.esft.threshold=0.3", "method.esft.sample_tokens=400",
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
    metrics = _metrics(run)
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
    cfg = _cfg(run, prepared_tiny, tiny_student, f"train.curriculum={{by: {by}, stages: 3}}", f"model.teacher={tiny_teacher}",
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
    seen = [rid for batch in _traced_batches(run, 1) for rid in batch[0]]
    assert len(seen) >= 0.9 * len(difficulty) and len(set(seen)) == len(seen)
    ranks, _ = curriculum_ranks(difficulty, 3, cfg.seed)
    assert seen == sorted(ranks, key=ranks.get)[: len(seen)]  # exactly the planned order
    cut = [-(-k * len(ranks) // 3) for k in range(4)]  # stage k holds positions i with i*3//n == k
    thirds = [seen[cut[k] : cut[k + 1]] for k in range(3)]
    for easier, harder in zip(thirds, thirds[1:]):
        assert max(difficulty[r] for r in easier) <= min(difficulty[r] for r in harder)


def _wait_for_step(trace: Path, step: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        f = trace / "rows_rank0.jsonl"
        if f.exists() and any(json.loads(l)["step"] >= step for l in f.read_text().splitlines() if l.strip()):
            return
        time.sleep(0.5)
    raise TimeoutError(f"training did not reach step {step} in {timeout}s")


def _check_trace(run: Path, total_steps: int) -> None:
    """Every step ran; a step that ran twice (before and after a failure) saw the same rows."""
    for rank in (0, 1):
        seen: dict[int, list[str]] = {}
        for line in (run / "trace" / f"rows_rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec["step"] in seen:
                assert seen[rec["step"]] == rec["row_ids"], f"rank {rank} step {rec['step']} saw other rows on retry"
            seen[rec["step"]] = rec["row_ids"]
        assert sorted(seen) == list(range(1, total_steps + 1))
        rows = [r for s in sorted(seen) for r in seen[s]]
        assert len(rows) == len(set(rows)), "a row was trained on twice within the epoch"
    steps = [m["step"] for m in (json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert steps == list(range(1, total_steps + 1))


@pytest.mark.timeout(900)
def test_killed_worker_is_replaced_and_resumes_from_checkpoint(tmp_path, prepared_tiny, tiny_teacher):
    run = tmp_path / "killed"
    cfg = _cfg(run, prepared_tiny, tiny_teacher, "train.num_workers=2", "train.strategy=fsdp", "train.max_steps=14",
               "train.checkpoint_every=4", "train.eval_every=4", "train.max_failures=1", "train.trace_rows=true")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", run_finetune(cfg)))
    thread.start()
    _wait_for_step(run / "trace", 6, timeout=400)
    pid = int((run / "trace" / "pid_rank1").read_text())
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert result.get("rc") == 0
    assert int((run / "trace" / "pid_rank1").read_text()) != pid  # a new worker took over
    _check_trace(run, 14)


@pytest.mark.timeout(900)
def test_stopped_driver_resumes_on_rerun(tmp_path, prepared_tiny, tiny_teacher):
    run = tmp_path / "driver"
    overrides = [f"output_dir={run}", f"data.prepared={prepared_tiny}", f"model.path={tiny_teacher}", "train.lr=3e-3",
                 "train.batch_size=4", "train.num_workers=2", "train.max_steps=24", "train.checkpoint_every=4",
                 "train.eval_every=4", "train.trace_rows=true"]
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text("{}\n")
    cmd = [sys.executable, "-m", "distillery", "finetune", str(cfg_path), *overrides]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for_step(run / "trace", 6, timeout=600)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
        first.wait(timeout=60)
    assert not (run / "model").exists()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    # Steps take well under a second here, so the kill lands a few steps after step 6: the run
    # resumes from whichever checkpoint (every 4 steps) was the last one written before it.
    resumed = re.search(r"resumed from checkpoint at step (\d+)", second.stdout + second.stderr)
    assert resumed and int(resumed.group(1)) in (4, 8, 12, 16, 20), second.stdout[-2000:]
    _check_trace(run, 24)
    assert (run / "model" / "model.safetensors").exists()


def test_nonfinite_steps_are_skipped_then_the_run_stops_without_export(tmp_path, prepared_tiny, tiny_student):
    """An lr so large that the first update overflows the weights: every later loss is non-finite.
    Those steps are skipped (the weights keep their last finite values), and after
    train.max_nonfinite_steps in a row the run fails with a message saying so; no model is exported."""
    run = tmp_path / "nan"
    cfg = _cfg(run, prepared_tiny, tiny_student, "train.lr=1e30", "train.num_workers=1", "train.strategy=none",
               "train.max_steps=8", "train.eval_every=8", "train.max_nonfinite_steps=2", "train.max_grad_norm=null")
    with pytest.raises(Exception, match="non-finite loss") as e:
        run_finetune(cfg)
    assert "2 steps in a row (train.max_nonfinite_steps 2)" in str(e.value)
    assert not (run / "model").exists()
    steps = [m for m in _metrics(run) if "loss" in m]
    skipped = [m["step"] for m in steps if m.get("skipped")]
    assert steps[0]["step"] == 1 and not steps[0].get("skipped")  # the finite first step was taken
    assert skipped == [2, 3] and len(steps) == 3
