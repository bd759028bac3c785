"""cluster.yaml and the local fake-multinode config validate against Ray's own autoscaler schema."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from conftest import REPO


def _load(name):
    return yaml.safe_load((REPO / name).read_text())


def test_cloud_cluster_config_is_valid():
    cfg = _load("cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(cfg)))
    types = cfg["available_node_types"]
    assert {"cpu_worker", "gpu_worker"} <= set(types)
    assert types["gpu_worker"]["resources"]["GPU"] >= 1
    for t in ("cpu_worker", "gpu_worker"):
        assert types[t]["min_workers"] <= types[t]["max_workers"]
    assert any(".[gpu]" in c for c in cfg["setup_commands"])
    assert cfg["file_mounts"]


def test_local_fake_cluster_config_is_valid():
    cfg = _load("jobs/cluster-local.yaml")
    # Ray's fake provider ships no defaults file, so the config must be complete as written.
    validate_config(cfg)
    assert cfg["provider"]["type"] == "fake_multinode"


def test_schema_rejects_a_typo():
    cfg = _load("cluster.yaml")
    cfg["available_node_types"]["gpu_worker"]["max_wrkers"] = 1
    with pytest.raises(jsonschema.ValidationError, match="max_wrkers"):
        validate_config(prepare_config(cfg))
