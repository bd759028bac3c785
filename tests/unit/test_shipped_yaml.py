"""Every YAML shipped under jobs/, tuning/ and serve/ validates, so examples cannot go stale."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from distillery.config import load_config

# runtime_env.yaml and cluster-*.yaml are Ray formats, validated in their own tests; `*.ray.yaml`
# files are Ray Serve configs (for `serve run` / `serve deploy`), checked separately below.
SHIPPED = sorted(
    p for d in ("jobs", "tuning", "serve") for p in (REPO / d).glob("*.yaml")
    if p.name != "runtime_env.yaml" and not p.name.startswith("cluster-") and not p.name.endswith(".ray.yaml")
)
RAY_SERVE_CONFIGS = sorted((REPO / "serve").glob("*.ray.yaml"))


def test_there_are_shipped_configs():
    assert {p.parent.name for p in SHIPPED} == {"jobs", "tuning", "serve"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_yaml_validates(path):
    load_config(path)


def test_there_are_ray_serve_configs():
    assert RAY_SERVE_CONFIGS


@pytest.mark.parametrize("path", RAY_SERVE_CONFIGS, ids=lambda p: p.name)
def test_ray_serve_config_validates_and_names_a_valid_distillery_config(path, monkeypatch):
    import importlib

    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert schema.applications
    monkeypatch.chdir(REPO)  # `args.config` is relative to where the cluster runs: the repo root
    for app in schema.applications:
        module, _, attr = app.import_path.partition(":")
        assert callable(getattr(importlib.import_module(module), attr))
        assert set(app.args) <= {"config", "overrides"}, app.args
        cfg = load_config(app.args["config"], app.args.get("overrides") or [])
        assert cfg.serve.models


def test_runtime_env_ships_the_package():
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    assert env["py_modules"] == ["platform/distillery"]
    assert (REPO / env["py_modules"][0] / "__init__.py").exists()


def test_platform_is_a_source_root_not_a_package():
    assert not (REPO / "platform" / "__init__.py").exists()
    out = subprocess.run(
        [sys.executable, "-c", "import platform; print(platform.system(), platform.__file__)"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )
    system, where = out.stdout.split()
    assert system == "Linux"
    assert where.endswith("platform.py") and not where.startswith(str(REPO))
