"""The training options of the MoE / curriculum / feature-distillation work, as a user runs them:
through the console script, each with its own Ray, on tiny models."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest

DISTILLERY = shutil.which("distillery", path=os.path.dirname(sys.executable)) or "distillery"

pytestmark = pytest.mark.slow


def cli(*args, timeout=600):
    return subprocess.run([DISTILLERY, *args], capture_output=True, text=True, timeout=timeout)


def metrics(run) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]


def test_prepare_balances_labels(tmp_path, tiny_teacher):
    rng = random.Random(3)
    rows = [{"instruction": f"Classify: {rng.random():.9f} {c} item", "output": c} for c, n in (("pos", 200), ("neg", 50)) for _ in range(n)]
    src = tmp_path / "cls.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path}\nmodel: {{path: {tiny_teacher}}}\ndata: {{sources: [{{path: {src}, format: instruction}}]}}\n")
    p = cli("prepare", str(cfg), "data.balance={by: label, strategy: upsample}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "prepare: balance by label (upsample)" in p.stdout
    achieved = json.loads((tmp_path / "data" / "manifest.json").read_text())["balance"]["achieved"]
    assert set(achieved) == {"pos", "neg"} and abs(achieved["neg"] - 0.5) < 0.07


def test_finetune_moe_with_curriculum_and_router_loss(tmp_path, tiny_moe, prepared_tiny):
    run = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {run}\ndata: {{prepared: {prepared_tiny}}}\nmodel: {{path: {tiny_moe}}}\n"
                   "train: {num_workers: 1, strategy: none, max_steps: 6, batch_size: 8, router_aux_loss_coef: 0.02, "
                   "curriculum: {by: length, stages: 2}}\n")
    p = cli("finetune", str(cfg))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "curriculum: " in p.stdout and "stage(s) by length" in p.stdout
    assert json.loads((run / "curriculum.json").read_text())["stages"] == 2
    aux = [m["router_aux_loss"] for m in metrics(run) if "router_aux_loss" in m]
    assert len(aux) == 6 and all(a > 0 for a in aux)


def test_distill_features_in_stages_and_refused_settings(tmp_path, tiny_teacher, prepared_tiny):
    from distillery.models.init_model import ArchSpec, init_model

    student = tmp_path / "student"
    init_model(student, ArchSpec(layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64), tokenizer_from=str(tiny_teacher), seed=4)
    run = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {run}\ndata: {{prepared: {prepared_tiny}}}\nmodel: {{path: {student}, teacher: {tiny_teacher}}}\n"
                   "train: {num_workers: 1, strategy: none, max_steps: 6, batch_size: 8}\n"
                   "distill: {entropy_weighting: true, hidden: {weight: 1.0, attention_weight: 0.5}, "
                   "stages: [{steps: 3, hidden_weight: 0}, {steps: 3, hidden_weight: 1.0, temperature: 1.0}]}\n")
    p = cli("distill", str(cfg))
    assert p.returncode == 0, p.stderr[-3000:]
    steps = [m for m in metrics(run) if "kd_loss" in m]
    assert ["hidden_loss" in m for m in steps] == [False] * 3 + [True] * 3
    # Settings distill cannot honour fail before Ray starts, naming the key.
    p = cli("distill", str(cfg), "train.key_terms=[SKU]", f"output_dir={tmp_path}/other")
    assert p.returncode == 2 and "train.key_terms: applies to `distillery finetune` only" in p.stderr
    p = cli("distill", str(cfg), "distill.stages=[{steps: 3}]", "distill.alpha_schedule={kind: linear, end: 0.1}", f"output_dir={tmp_path}/other")
    assert p.returncode == 2 and "stages and alpha_schedule do not combine" in p.stderr
    assert not (tmp_path / "other").exists()
