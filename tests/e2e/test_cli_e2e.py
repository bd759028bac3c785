"""The installed console script as a user runs it: init-model, config, python -m, pending stages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from conftest import REPO

DISTILLERY = shutil.which("distillery", path=os.path.dirname(sys.executable)) or "distillery"


def run(*args, cwd=REPO):
    return subprocess.run([*args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_init_model_console_script(tmp_path, demo_corpus):
    out = tmp_path / "teacher"
    p = run(
        DISTILLERY, "init-model", str(out), "--arch", "qwen2", "--layers", "2", "--hidden", "64", "--heads", "2",
        "--intermediate", "128", "--corpus", str(demo_corpus["train"]), "--vocab-size", "400", "--seed", "7",
    )
    assert p.returncode == 0, p.stderr
    assert "parameters" in p.stdout and str(out) in p.stdout
    info = json.loads((out / "distillery_init.json").read_text())
    assert info["arch"] == "qwen2" and info["seed"] == 7 and info["vocab_size"] <= 400
    # Refuses to overwrite without being asked.
    p = run(DISTILLERY, "init-model", str(out), "--tokenizer-from", str(out))
    assert p.returncode == 2 and "--overwrite" in p.stderr


def test_python_dash_m_and_explain():
    p = run(sys.executable, "-m", "distillery", "config", "--explain")
    assert p.returncode == 0 and "method.lora.target_modules" in p.stdout


def test_shipped_config_through_cli_and_bad_override():
    p = run(DISTILLERY, "config", "jobs/finetune.yaml", "train.lr=3e-5", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["train"]["lr"] == 3e-5
    p = run(DISTILLERY, "config", "jobs/finetune.yaml", "train.batch_size=big")
    assert p.returncode == 2 and "train.batch_size" in p.stderr and "jobs/finetune.yaml" in p.stderr
