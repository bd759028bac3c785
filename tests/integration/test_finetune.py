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
import torch
from safetensors.torch import load_file

from distillery.train.finetune import run_finetune
from training_runs import local_ray, run_cfg, run_metrics, traced_batches  # noqa: F401  (local_ray: the module's Ray, autouse)

pytestmark = pytest.mark.slow




def _step_losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in run_metrics(run) if "loss" in m}


def _write_prepared(root: Path, table: pa.Table, like: Path) -> Path:
    (root / "train").mkdir(parents=True)
    pq.write_table(table, root / "train" / "part-0.parquet")
    shutil.copytree(like / "val", root / "val")
    shutil.copy(like / "manifest.json", root / "manifest.json")
    return root


@pytest.mark.timeout(900)
def test_fsdp_ddp_and_single_process_agree_and_loss_falls(tmp_path, prepared_tiny, tiny_teacher):
    """Two workers (ddp, fsdp) and one process with grad_accum=2 that sees, at step k, the same two
    micro-batches the two workers saw (read from their row traces): the losses must agree."""
    table = pq.read_table(prepared_tiny / "train" / "part-0.parquet")
    table = table.slice(0, (table.num_rows // 8) * 8)
    data = _write_prepared(tmp_path / "data", table, prepared_tiny)
    # fsdp also loads sharded from the meta device (each rank reads its rows only) and recomputes
    # every decoder layer in backward (activation checkpointing): neither may change a loss.
    runs = {name: run_cfg(tmp_path / name, data, tiny_teacher, f"train.strategy={name}", "train.num_workers=2", "train.trace_rows=true",
                          *(["train.activation_checkpointing=true"] if name == "fsdp" else []))
            for name in ("ddp", "fsdp")}
    for cfg in runs.values():
        assert run_finetune(cfg) == 0
    batches = traced_batches(tmp_path / "ddp", 2)
    assert len(batches) == 6 and traced_batches(tmp_path / "fsdp", 2) == batches  # the same shards for both strategies
    by_id = {str(r): i for i, r in enumerate(table.column("row_id").to_pylist())}
    order = [by_id[r] for step in batches for micro in step for r in micro]
    single = _write_prepared(tmp_path / "single_data", table.take(pa.array(order)), prepared_tiny)
    runs["none"] = run_cfg(tmp_path / "none", single, tiny_teacher, "train.strategy=none", "train.num_workers=1", "train.grad_accum=2")
    assert run_finetune(runs["none"]) == 0
    losses = {name: _step_losses(tmp_path / name) for name in runs}
    assert sorted(losses["none"]) == list(range(1, 7))
    for name in ("ddp", "fsdp"):
        for step, value in losses["none"].items():
            assert losses[name][step] == pytest.approx(value, rel=2e-4, abs=2e-4), (name, step)
    assert losses["fsdp"][1] == pytest.approx(losses["ddp"][1], abs=1e-5)  # sharded load = whole load
    assert losses["fsdp"][6] < losses["fsdp"][1]
    val = [m["val_loss"] for m in run_metrics(tmp_path / "fsdp") if "val_loss" in m]
    assert len(val) == 2 and val[-1] < val[0]
    # The exported model is a plain Hugging Face checkpoint with the trained weights.
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "model")
    initial = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    assert not torch.equal(exported.lm_head.weight, initial.lm_head.weight)
    run = json.loads((tmp_path / "fsdp" / "run.json").read_text())
    assert run["metrics"]["trainable_fraction"] == 1.0
    read, total = run["metrics"]["load_bytes_read_max"], run["metrics"]["checkpoint_bytes"]
    assert 0.45 * total <= read <= 0.55 * total  # each of 2 ranks read about half the checkpoint
    assert (tmp_path / "fsdp" / "config.yaml").exists()


@pytest.mark.timeout(600)
def test_lora_adapter_loads_with_peft_and_merges(tmp_path, prepared_tiny, tiny_teacher):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = run_cfg(tmp_path / "lora", prepared_tiny, tiny_teacher, "method.kind=lora", "method.lora.r=4",
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
    """Layer freezing with EWC, under quantisation-aware training on FSDP: QAT changes how the
    forward computes, never which parameters exist or train."""
    cfg = run_cfg(tmp_path / "freeze", prepared_tiny, tiny_teacher, "method.kind=freeze", "method.freeze.trainable_layers=1",
               "train.num_workers=2", "train.strategy=fsdp", "train.ewc.lambda=10", f"train.ewc.previous={prepared_tiny}",
               "train.ewc.samples=8", "train.qat=true")
    assert run_finetune(cfg) == 0
    before = load_file(str(Path(tiny_teacher) / "model.safetensors"))
    after = load_file(str(tmp_path / "freeze" / "model" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trainable = {k for k in before if k.startswith(("model.layers.1.", "model.norm.", "lm_head."))}
    assert changed and changed <= trainable
    assert not any(k.startswith(("model.layers.0.", "model.embed_tokens")) for k in changed)
    assert set(after) == set(before)  # QAT's fake-quant linears save as plain linears
    run = json.loads((tmp_path / "freeze" / "run.json").read_text())
    expected = sum(before[k].numel() for k in trainable)
    assert run["metrics"]["trainable_parameters"] == expected
    assert run["metrics"]["qat_layers"] == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    # EWC: the Fisher information is stored with the run and the penalty enters the loss.
    fisher = load_file(str(tmp_path / "freeze" / "ewc.safetensors"))
    assert {k.split(".", 1)[1] for k in fisher if k.startswith("fisher.")} == trainable
    penalties = [m["ewc_penalty"] for m in run_metrics(tmp_path / "freeze") if "ewc_penalty" in m]
    assert penalties[0] == 0.0 and penalties[-1] > 0.0


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
    cfg = run_cfg(run, prepared_tiny, tiny_teacher, "train.num_workers=2", "train.strategy=fsdp", "train.max_steps=14",
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
    cfg = run_cfg(run, prepared_tiny, tiny_student, "train.lr=1e30", "train.num_workers=1", "train.strategy=none",
               "train.max_steps=8", "train.eval_every=8", "train.max_nonfinite_steps=2", "train.max_grad_norm=null")
    with pytest.raises(Exception, match="non-finite loss") as e:
        run_finetune(cfg)
    assert "2 steps in a row (train.max_nonfinite_steps 2)" in str(e.value)
    assert not (run / "model").exists()
    steps = [m for m in run_metrics(run) if "loss" in m]
    skipped = [m["step"] for m in steps if m.get("skipped")]
    assert steps[0]["step"] == 1 and not steps[0].get("skipped")  # the finite first step was taken
    assert skipped == [2, 3] and len(steps) == 3
