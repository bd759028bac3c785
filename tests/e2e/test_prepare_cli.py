"""`distillery prepare` as a user runs it: the shipped jobs/prepare.yaml through the console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

DISTILLERY = shutil.which("distillery", path=os.path.dirname(sys.executable)) or "distillery"

pytestmark = pytest.mark.slow


def test_prepare_cli_end_to_end(tmp_path, tiny_teacher):
    out = tmp_path / "prepared"
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run(
        [DISTILLERY, "prepare", "jobs/prepare.yaml", f"model.path={tiny_teacher}", f"output_dir={tmp_path}", f"data.prepared={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    for text in ("prepare: read 105 rows from 3 files", "prepare: splits train", "quarantine by reason", "achieved", f"wrote {out}"):
        assert text in p.stdout, p.stdout
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["mix"]["achieved"]) == {"general", "domain", "task"} and m["splits"]["train"]["rows"] > 0
    assert not list(tmp_path.glob("*.tmp-*"))
