"""`ray job submit` against a real head with token auth, and autoscaling on Ray's fake multi-node provider."""

from __future__ import annotations

import json
import socket
import textwrap

import pytest
import yaml

from conftest import REPO
from ray_head import BIN, free_port, start_head

pytestmark = pytest.mark.slow


@pytest.fixture
def head():
    h = start_head(num_cpus=4)
    yield h
    h.stop()


@pytest.mark.timeout(1200)
def test_the_whole_chain_runs_as_ray_jobs(head, tmp_path, demo_corpus, tiny_teacher, tiny_student):
    """prepare -> finetune (the teacher) -> cache-teacher -> distill -> eval, each stage its own
    `ray job submit` to a token-protected head, exactly as a user runs them on a cluster: every
    stage joins the job's cluster (none starts its own Ray) and reads the previous one's output."""
    root = tmp_path / "chain"
    cfg = tmp_path / "chain.yaml"
    cfg.write_text(yaml.safe_dump({
        "output_dir": str(root), "seed": 0,
        "data": {"sources": [{"path": str(demo_corpus["train"]), "format": "instruction", "name": "domain"}],
                 "prepared": str(root / "data"), "max_length": 128},
        "train": {"num_workers": 1, "strategy": "none", "batch_size": 8, "max_steps": 4, "scheduler": "constant", "lr": 3e-3},
        "distill": {"cache_backend": "hf", "top_k": 8},
        "eval": {"backend": "hf", "max_examples": 8, "max_new_tokens": 8, "dataset": str(demo_corpus["test"]),
                 "models": [{"path": str(root / "teacher"), "name": "teacher"}, {"path": str(root / "student"), "name": "student"},
                            {"path": "registry:student@champion", "name": "student-int8"}],
                 "output": str(root / "eval")},
        "registry": {"dir": str(tmp_path / "registry")},
    }))
    submit = [str(BIN / "ray"), "job", "submit", "--address", head.dashboard, "--working-dir", ".",
              "--runtime-env", "jobs/runtime_env.yaml", "--", "python", "-m", "distillery"]

    denied = head.run(*submit, "prepare", str(cfg), f"model.path={tiny_teacher}", auth=False, cwd=REPO, timeout=120)
    assert denied.returncode != 0 and "token" in (denied.stdout + denied.stderr).lower()
    assert not root.exists()

    stages = [
        ("prepare", [f"model.path={tiny_teacher}"]),
        ("finetune", [f"model.path={tiny_teacher}", f"output_dir={root / 'teacher'}"]),
        ("cache-teacher", [f"model.teacher={root / 'teacher'}"]),
        ("distill", [f"model.path={tiny_student}", f"model.teacher={root / 'teacher'}", "distill.teacher_mode=cached",
                     f"output_dir={root / 'student'}"]),
        ("export", [f"export.model={root / 'student'}", "export.quantize=w8a8", "export.calibration_rows=16",
                    "export.name=student", "export.alias=champion"]),
        ("eval", [f"model.teacher={root / 'teacher'}"]),
    ]
    for stage, overrides in stages:
        done = head.run(*submit, stage, str(cfg), *overrides, cwd=REPO, timeout=600)
        out = done.stdout + done.stderr
        assert done.returncode == 0 and "succeeded" in out, f"{stage}:\n{out[-4000:]}"

    manifest = json.loads((root / "data" / "manifest.json").read_text())
    cache = json.loads((root / "data" / "teacher_cache" / "cache_manifest.json").read_text())
    assert cache["fingerprint"] == manifest["fingerprint"] and cache["teacher"]["path"] == str(root / "teacher")
    for run, stage in ((root / "teacher", "finetune"), (root / "student", "distill")):
        summary = json.loads((run / "run.json").read_text())
        assert summary["stage"] == stage and summary["metrics"]["step"] == 4
        assert (run / "model" / "config.json").exists()
    report = json.loads((root / "eval" / "metrics.json").read_text())
    assert [m["name"] for m in report["models"]] == ["teacher", "student", "student-int8"] and report["examples"] == 8
    assert "teacher_kl" in report["models"][1]
    # The INT8 export beside its source: a quarter of the linear weights' bytes, close in distribution.
    int8 = report["models"][2]
    assert int8["source"] == str((root / "student" / "model").resolve())
    assert 0 <= int8["source_kl"] < 0.05 and int8["size_bytes"] < report["models"][1]["size_bytes"]
    assert "Quantised against source" in (root / "eval" / "report.md").read_text()

    # Lineage: the served alias leads back to the exact corpus file and to the teacher's own run.
    from distillery.models.load import model_identity
    from distillery.registry.record import sha256_file
    from distillery.registry.store import Registry

    registry = Registry(tmp_path / "registry")
    champion = registry.resolve("student", "champion")
    assert champion["path"] == str((root / "student" / "export-w8a8").resolve())
    export_run = registry.get_run(champion["run_id"])
    assert export_run["stage"] == "export"
    assert {(f["path"], f["sha256"]) for f in registry.corpus_files(export_run["run_id"])} == {
        (str(demo_corpus["train"]), sha256_file(demo_corpus["train"]))}
    distill_run = registry.producer_of(export_run["inputs"]["model"])
    assert distill_run["stage"] == "distill" and distill_run["output_dir"] == str((root / "student").resolve())
    teacher_hash = model_identity(root / "teacher")["hash"]
    assert distill_run["inputs"]["teachers"] == [teacher_hash]
    assert registry.producer_of(teacher_hash)["stage"] == "finetune"
    listed = head.run(str(BIN / "ray"), "job", "list", "--address", head.dashboard, timeout=60)
    assert listed.stdout.count("SUCCEEDED") >= len(stages)


@pytest.mark.timeout(600)
def test_autoscaler_adds_a_node_for_a_job_the_head_cannot_fit(tmp_path):
    cfg = yaml.safe_load((REPO / "jobs" / "cluster-local.yaml").read_text())
    # The fake provider must know where the head's GCS listens (it assumes 6379 otherwise).
    gcs = free_port()
    cfg["provider"]["gcs_address"] = f"{socket.gethostbyname(socket.gethostname())}:{gcs}"
    config_path = tmp_path / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    script = tmp_path / "needs_two_cpus.py"
    script.write_text(
        textwrap.dedent(
            """
            import ray
            ray.init()
            head = ray.get_runtime_context().get_node_id()

            @ray.remote(num_cpus=2)
            def where():
                return ray.get_runtime_context().get_node_id()

            node = ray.get(where.remote(), timeout=240)
            print("NODES", len([n for n in ray.nodes() if n["Alive"]]), "SAME", node == head)
            """
        )
    )
    h = start_head(
        num_cpus=1, autoscaling_config=str(config_path), gcs_port=gcs,
        extra_env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
    )
    try:
        done = h.run(
            str(BIN / "ray"), "job", "submit", "--address", h.dashboard, "--working-dir", str(tmp_path), "--",
            "python", script.name, timeout=420,
        )
    finally:
        h.stop()
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    line = next(l for l in out.splitlines() if l.startswith("NODES"))
    nodes, same = int(line.split()[1]), line.split()[3]
    assert nodes >= 2 and same == "False"


@pytest.mark.timeout(900)
def test_serve_deploy_and_serve_run_onto_a_running_cluster(head, tmp_path, tiny_student):
    """The two Ray Serve CLI ways of running the app (serve/student.ray.yaml's shape) against a real head."""
    import time

    import httpx

    port = free_port()
    app_cfg = tmp_path / "serve.yaml"
    app_cfg.write_text(yaml.safe_dump({"serve": {"models": [{"path": str(tiny_student), "name": "student"}], "max_model_len": 128}}))
    ray_cfg = yaml.safe_load((REPO / "serve" / "student.ray.yaml").read_text())
    ray_cfg["http_options"]["port"] = port
    ray_cfg["applications"][0]["args"]["config"] = str(app_cfg)
    ray_yaml = tmp_path / "student.ray.yaml"
    ray_yaml.write_text(yaml.safe_dump(ray_cfg))
    url = f"http://127.0.0.1:{port}/v1"

    def answers() -> str:
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            try:
                r = httpx.post(f"{url}/completions", json={"model": "student", "prompt": "Add 1 and 2.", "max_tokens": 4, "temperature": 0}, timeout=60)
                if r.status_code == 200:
                    return r.json()["choices"][0]["text"]
            except httpx.HTTPError:
                pass
            time.sleep(3)
        raise AssertionError(f"no answer from {url} within 420 s")

    try:
        denied = head.run(str(BIN / "serve"), "deploy", str(ray_yaml), "--address", head.dashboard, auth=False, timeout=120)
        assert denied.returncode != 0
        deployed = head.run(str(BIN / "serve"), "deploy", str(ray_yaml), "--address", head.dashboard, timeout=300)
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
        first = answers()
        # `serve run` of the same config onto the same cluster: the app is already up, so it only
        # confirms it and returns (non-blocking); the endpoint keeps answering the same way.
        ran = head.run(str(BIN / "serve"), "run", "--non-blocking", "--address", f"127.0.0.1:{head.gcs_port}", str(ray_yaml),
                       timeout=420)
        assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
        assert answers() == first
    finally:
        head.run(str(BIN / "serve"), "shutdown", "-y", "--address", head.dashboard, timeout=180)
