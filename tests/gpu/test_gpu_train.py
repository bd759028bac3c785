"""Training on one GPU, as a user runs it: FSDP2 over NCCL in bf16 mixed precision, for a fine-tune
and for a distillation from an online teacher (the CPU versions: tests/integration/test_finetune.py
and test_distill.py)."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from safetensors.torch import load_file

from .stages import falls, metrics, run_stage, steps

pytestmark = pytest.mark.timeout(480)

# One worker on one GPU, FSDP2 (NCCL, a world of one) with fp32 master weights and bf16 compute.
GPU_TRAIN = ["train.use_gpu=true", "train.precision=bf16", "train.strategy=fsdp", "train.num_workers=1",
             "train.batch_size=8", "train.lr=3e-3", "train.scheduler=constant", "train.max_steps=30", "train.eval_every=10"]


def _check_gpu_run(run, out: str, method: str) -> None:
    """What every GPU training run must show: it asked for the GPU, trained in bf16, and exported fp32 weights."""
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["use_gpu"] is True and resolved["train"]["precision"] == "bf16"
    assert re.search(rf"\[{method}\].*strategy fsdp, precision bf16", out), out[-3000:]
    weights = load_file(str(run / "model" / "model.safetensors"))
    dtypes = {str(t.dtype) for t in weights.values()}
    assert dtypes == {"torch.float32"}, f"bf16 mixed precision keeps fp32 masters and exports them: {dtypes}"
    assert all(t.isfinite().all() for t in weights.values())


def test_fsdp_finetune_bf16_on_one_gpu(tmp_path, prepared_tiny, tiny_teacher):
    run = tmp_path / "ft"
    out = run_stage("finetune", tmp_path, f"output_dir={run}", f"data.prepared={prepared_tiny}", f"model.path={tiny_teacher}", *GPU_TRAIN)
    _check_gpu_run(run, out, "finetune")
    losses = steps(run, "loss")
    assert len(losses) == 30 and all(l == l for l in losses)  # every step logged, none NaN
    assert falls(losses), losses
    assert all(m.get("grad_norm", 0) == m.get("grad_norm", 0) for m in metrics(run))
    assert not any(m.get("skipped") for m in metrics(run)), "a step was skipped for a non-finite loss or gradient"
    val = [m["val_loss"] for m in metrics(run) if "val_loss" in m]
    assert len(val) == 3 and val[-1] < val[0], val
    assert all(m["tokens_per_s"] > 0 for m in metrics(run) if "tokens_per_s" in m)
    report = json.loads((run / "run.json").read_text())
    assert report["metrics"]["trainable_fraction"] == 1.0
    # The trained weights moved away from the initial ones.
    before = load_file(str(tiny_teacher / "model.safetensors"))
    after = load_file(str(run / "model" / "model.safetensors"))
    assert set(after) == set(before) and any(not before[k].equal(after[k]) for k in before)


def test_distill_online_teacher_bf16_on_one_gpu(tmp_path, prepared_tiny, tiny_teacher, tiny_student):
    run = tmp_path / "kd"
    out = run_stage("distill", tmp_path, f"output_dir={run}", f"data.prepared={prepared_tiny}", f"model.path={tiny_student}",
                    f"model.teacher={tiny_teacher}", "distill.teacher_mode=online", "distill.loss=forward_kl",
                    "distill.alpha=0.7", "distill.temperature=1.0", *GPU_TRAIN)
    _check_gpu_run(run, out, "distill")
    assert falls(steps(run, "loss")) and falls(steps(run, "kd_loss")), steps(run, "kd_loss")
    assert len(steps(run, "ce_loss")) == 30
    evals = [m for m in metrics(run) if "val_teacher_kl" in m]
    assert len(evals) == 3 and all("val_teacher_top1_agreement" in m for m in evals)
    assert evals[-1]["val_teacher_kl"] < evals[0]["val_teacher_kl"], evals
    identity = json.loads((run / "run_identity.json").read_text())
    assert identity["teacher_source"] == "online"
