"""`distillery serve` with serve.device: gpu: the vLLM engine replica on the GPU, one completion over
HTTP, a clean stop on Ctrl-C (the CPU version: tests/e2e/test_serve_cli.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml

from conftest import stop_cli

from .stages import stage_env

pytestmark = pytest.mark.timeout(480)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_on_gpu_answers_a_completion(tmp_path, tiny_student):
    port = free_port()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"serve": {
        "models": [{"path": str(tiny_student), "name": "student"}], "port": port, "device": "gpu", "max_model_len": 128,
    }, "registry": {"dir": str(tmp_path / "registry")}}))
    proc = subprocess.Popen([sys.executable, "-m", "distillery", "serve", str(cfg)], env=stage_env(), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 360
        while not any(f"ready at {url}" in l for l in lines):
            assert proc.poll() is None, "serve exited before it was ready:\n" + "".join(lines[-80:])
            assert time.monotonic() < deadline, "no 'ready' line within 360 s:\n" + "".join(lines[-80:])
            time.sleep(2)
        models = httpx.get(f"{url}/models", timeout=60)
        assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == ["student"], models.text
        r = httpx.post(f"{url}/completions", timeout=120,
                       json={"model": "student", "prompt": "Add 1 and 2.", "max_tokens": 8, "min_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["text"] and body["usage"]["completion_tokens"] == 8
    finally:
        rc = stop_cli(proc, reader, 120)
    out = "".join(lines)
    assert rc == 0, out[-3000:]
    assert "serve: stopped" in out
