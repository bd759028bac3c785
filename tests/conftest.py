"""Session fixtures: a bundled corpus and a tiny teacher + smaller student, built once with init-model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Under pytest-xdist each test process gets its own Ray temp dir. Ray's "latest cluster" lookup
# (`<temp dir>/ray/ray_current_cluster`, written by `ray start` and `ray.cluster_utils.Cluster`)
# is what the state API inside Ray Train's placement-group cleaner uses; shared, it can find the
# other process's cluster, miss its own controller there and remove a live run's placement group.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["RAY_TMPDIR"] = os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), f"ray-{os.environ['PYTEST_XDIST_WORKER']}")
    os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)

# Every stage records its run in the lineage registry: the suite's records go to a directory of
# its own (per test process), never to the user's ~/.distillery/registry.
if "DISTILLERY_REGISTRY" not in os.environ:
    import tempfile

    os.environ["DISTILLERY_REGISTRY"] = tempfile.mkdtemp(prefix="distillery-registry-")

# vLLM on CPU reserves this many GiB of KV cache per engine; the tiny test models need little.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

TEACHER_SPEC = dict(arch="llama", layers=2, hidden=64, heads=2, kv_heads=1, intermediate=128)
STUDENT_SPEC = dict(arch="llama", layers=1, hidden=32, heads=1, kv_heads=1, intermediate=64)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> dict[str, Path]:
    from distillery.demo.corpus import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus"), n_train=400, n_test=50, seed=0)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, demo_corpus) -> Path:
    from distillery.models.init_model import ArchSpec, init_model

    out = tmp_path_factory.mktemp("models") / "teacher"
    init_model(out, ArchSpec(**TEACHER_SPEC), corpus=[str(demo_corpus["train"])], vocab_size=512, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory, tiny_teacher) -> Path:
    from distillery.models.init_model import ArchSpec, init_model

    out = tmp_path_factory.mktemp("models") / "student"
    init_model(out, ArchSpec(**STUDENT_SPEC), tokenizer_from=str(tiny_teacher), seed=1)
    return out


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory, tiny_teacher) -> Path:
    """A 2-layer Qwen2-MoE (4 routed experts, top-2, plus a shared expert) with the tiny models' tokenizer."""
    from distillery.models.init_model import ArchSpec, init_model

    out = tmp_path_factory.mktemp("models") / "moe"
    spec = ArchSpec(arch="qwen2_moe", layers=2, hidden=32, heads=2, kv_heads=1, intermediate=32, experts=4, experts_per_token=2)
    init_model(out, spec, tokenizer_from=str(tiny_teacher), seed=2)
    return out


@pytest.fixture(scope="session")
def prepared_tiny(tmp_path_factory, demo_corpus, tiny_teacher) -> Path:
    """A prepared directory (splits contract) of the demo corpus, tokenised with the tiny models' tokenizer."""
    from prepared_fixture import write_prepared

    return write_prepared(demo_corpus["train"], tiny_teacher, tmp_path_factory.mktemp("prepared"))


def stop_cli(proc, reader, timeout_s: float) -> int:
    """Ctrl-C a CLI subprocess that is still running (as a user would), wait for it and for the thread
    `reader` collecting its output; its exit status. Killed, and the timeout raised, if it hangs."""
    import signal
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)
        raise
    reader.join(timeout=10)
    return rc
