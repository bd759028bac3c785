"""A 2-worker FSDP distillation across two (simulated) Ray nodes, one worker per node."""

from __future__ import annotations

import json

import pytest
import ray
from ray.cluster_utils import Cluster

from distillery.config import load_config
from distillery.distill.method import run_distill

pytestmark = pytest.mark.slow


@pytest.fixture
def two_nodes():
    # Each node: 2 CPUs (one for its training worker, one for Ray Data) and one `trainer` slot,
    # so the two workers cannot share a node.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"trainer": 1}})
    cluster.add_node(num_cpus=2, resources={"trainer": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.timeout(900)
def test_fsdp_distill_with_one_worker_per_node(two_nodes, tmp_path, prepared_tiny, tiny_teacher, tiny_student):
    run = tmp_path / "multinode"

    def cfg(out, *extra):
        return load_config(overrides=[
            f"output_dir={out}", f"data.prepared={prepared_tiny}", f"model.path={tiny_student}", f"model.teacher={tiny_teacher}",
            "train.num_workers=2", "train.strategy=fsdp", "train.worker_resources={trainer: 1}", "train.max_steps=6",
            "train.eval_every=3", "train.batch_size=4", "train.trace_rows=true", "distill.teacher_mode=online", *extra,
        ])

    assert run_distill(cfg(run)) == 0
    nodes = {(run / "trace" / f"node_rank{r}").read_text() for r in (0, 1)}
    assert len(nodes) == 2 and nodes <= {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    steps = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "kd_loss" in l]
    assert [m["step"] for m in steps] == list(range(1, 7))
    assert (run / "model" / "model.safetensors").exists()

    # distill.fused_lm_head under FSDP2: student logits per chunk from the hidden states, with the
    # root's unsharded lm_head; its gradient is reduce-scattered like any other, so the same steps
    # train the same way (every step's losses equal the unfused run's, which they would not after
    # a step with a wrong or unreduced lm_head gradient).
    fused = tmp_path / "fused"
    assert run_distill(cfg(fused, "distill.fused_lm_head=true", "train.trace_rows=false")) == 0
    fused_steps = [json.loads(l) for l in (fused / "metrics.jsonl").read_text().splitlines() if "kd_loss" in l]
    assert [m["step"] for m in fused_steps] == list(range(1, 7))
    for a, b in zip(steps, fused_steps):
        for key in ("kd_loss", "ce_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
