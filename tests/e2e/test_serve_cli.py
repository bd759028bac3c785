"""`distillery serve CONFIG` as a user runs it: prints the URL, serves without a key when none is
configured, rejects overload fast with Retry-After, and shuts down cleanly on Ctrl-C."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import yaml

from conftest import REPO, stop_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_without_key_rejects_overload_and_stops_on_ctrl_c(tmp_path, tiny_student):
    """Served as a user ships a student: `distillery export` writes it in INT8 (W8A8) and registers
    it with an alias, and `serve` names it by that alias."""
    port = free_port()
    cfg = tmp_path / "serve.yaml"
    # One request in flight and one queued per replica: the rest of a burst must be refused fast.
    cfg.write_text(yaml.safe_dump({"serve": {
        "models": [{"path": "registry:student@champion"}], "port": port, "max_model_len": 128,
        "max_ongoing_requests": 1, "max_queued_requests": 1, "retry_after_s": 2,
    }, "registry": {"dir": str(tmp_path / "registry")}}))
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform"), "VLLM_CPU_KVCACHE_SPACE": "1"}
    exported = subprocess.run(
        [sys.executable, "-m", "distillery", "export", str(cfg), f"export.model={tiny_student}", f"export.output={tmp_path / 'int8'}",
         "export.quantize=w8a8", "export.calibration_rows=0", "export.name=student", "export.alias=champion"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert "registered student version 1, alias champion" in exported.stdout
    proc = subprocess.Popen([sys.executable, "-m", "distillery", "serve", str(cfg)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 600
        while not any(f"ready at {url}" in l for l in lines):
            assert proc.poll() is None, "".join(lines[-50:])
            assert time.monotonic() < deadline, "no 'ready' line within 600 s:\n" + "".join(lines[-50:])
            time.sleep(2)

        client = openai.OpenAI(base_url=url, api_key="unused", timeout=300, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["student"]
        r = httpx.post(f"{url}/completions", json={"model": "student", "prompt": "Add 1 and 2.", "max_tokens": 4},
                       timeout=120)  # no Authorization header at all
        assert r.status_code == 200, r.text

        def one(i: int) -> httpx.Response:
            return httpx.post(f"{url}/completions", timeout=300, json={
                "model": "student", "prompt": f"Count {i}", "max_tokens": 100, "min_tokens": 100, "temperature": 0})

        with ThreadPoolExecutor(max_workers=16) as pool:
            responses = list(pool.map(one, range(16)))
        codes = [r.status_code for r in responses]
        assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
        for r in responses:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "2"
                # Serve's proxy answers queue-full rejections itself, in plain text.
                assert "backpressure" in r.text or r.json()["error"]["code"] == 503
        assert client.completions.create(model="student", prompt="Add 1 and 2.", max_tokens=4).choices
    finally:
        rc = stop_cli(proc, reader, 180)
    out = "".join(lines)
    assert rc == 0, out[-3000:]
    assert "compressed-tensors" in (tmp_path / "int8" / "config.json").read_text()
    assert "serve: shutting down" in out and "serve: stopped" in out
