"""A real `ray start --head` for e2e tests, isolated from every other Ray on the machine.

`RAY_TMPDIR` gives the head its own temp dir, so `ray.init()` elsewhere never attaches to it, and
it is stopped by killing only its own processes: `ray stop` would kill every Ray on the machine.
Token authentication is on, with the token in a file of the test's own.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    tmpdir: Path
    env: dict[str, str]
    gcs_port: int
    dashboard: str

    def run(self, *args: str, timeout: float = 600, auth: bool = True, cwd=None) -> subprocess.CompletedProcess:
        env = dict(self.env)
        if not auth:
            env.pop("RAY_AUTH_TOKEN_PATH")
            env.pop("RAY_AUTH_MODE")
        return subprocess.run([*args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        marker = str(self.tmpdir)
        roots = []
        for p in psutil.process_iter(["cmdline"]):
            if p.pid == os.getpid():
                continue
            try:
                if any(marker in part for part in (p.info["cmdline"] or [])):
                    roots.append(p)
            except psutil.Error:
                continue
        procs = set(roots)
        for p in roots:
            try:
                procs.update(p.children(recursive=True))
            except psutil.Error:
                pass
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(list(procs), timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def start_head(
    num_cpus: int, autoscaling_config: str | None = None, extra_env: dict | None = None, gcs_port: int | None = None
) -> RayHead:
    # Short path: Ray's unix sockets live under it and must stay within the 107-byte limit.
    tmpdir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    token = tmpdir / "token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_TMPDIR": str(tmpdir),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
        **(extra_env or {}),
    }
    env.pop("RAY_ADDRESS", None)
    gcs, dash = gcs_port or free_port(), free_port()
    cmd = [
        str(BIN / "ray"), "start", "--head", f"--num-cpus={num_cpus}", f"--port={gcs}",
        f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats",
    ]
    if autoscaling_config:
        cmd.append(f"--autoscaling-config={autoscaling_config}")
    head = RayHead(tmpdir, env, gcs, f"http://127.0.0.1:{dash}")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        head.stop()
        raise RuntimeError(f"ray start failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    env["RAY_ADDRESS"] = head.dashboard
    deadline = time.time() + 60
    while time.time() < deadline:  # the job server answers a moment after `ray start` returns
        if head.run(str(BIN / "ray"), "job", "list", "--address", head.dashboard, timeout=30).returncode == 0:
            break
        time.sleep(1)
    return head
