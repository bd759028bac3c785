"""The registry mirrored into a real local MLflow store (SQLite tracking + model registry, artifacts
under tmp): a run's params, metrics, hash tags and run.json, a registered version and its aliases,
read back through MlflowClient."""

from __future__ import annotations

import json
import logging
import os

import pytest

# The test store is local; MLflow's usage telemetry would try the network from a background thread.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'distillery[mlflow]')")

from mlflow.tracking import MlflowClient  # noqa: E402

from distillery.registry.mlflow_mirror import RUN_ID_TAG  # noqa: E402
from distillery.registry.store import Registry  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow database for the module: creating it runs MLflow's schema migrations (seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return root, uri, MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_runs_versions_and_aliases_reach_mlflow(store, tmp_path):
    root, uri, client = store
    reg = Registry(tmp_path / "registry", mlflow_uri=uri)
    record = {
        "run_id": "ab" * 16, "stage": "distill", "created": "2026-03-01T12:00:00Z", "output_dir": str(tmp_path / "run"),
        "config_sha256": "c" * 64, "seed": 7, "seconds": 12.5,
        "settings": {"train": {"lr": 3e-5, "epochs": 2}, "model": {"path": "/m", "teachers": ["/t1", "/t2"]},
                     "data": {"note": "x" * 7000}},
        "inputs": {"data_fingerprint": "d" * 64, "model": "e" * 64, "teachers": ["f" * 64, "1" * 64]},
        "outputs": {"model": "2" * 64, "artifacts": {"metrics.jsonl": "3" * 64}},
        "metrics": {"val_loss": 1.25, "step": 4, "ok": True, "eval": {"accuracy": 0.5}, "name": "text"},
    }
    reg.record_run(record)
    reg.record_run(record)  # recorded again: replaces the MLflow run instead of adding a second

    exp = client.get_experiment_by_name("distillery")
    assert exp.artifact_location == (root / "mlartifacts").as_uri()  # beside the database, not ./mlruns
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{record['run_id']}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == "distill-abababab" and run.info.status == "FINISHED"
    assert run.info.end_time - run.info.start_time == 12500
    params = run.data.params
    assert params["train.lr"] == "3e-05" and params["train.epochs"] == "2" and params["model.teachers"] == '["/t1","/t2"]'
    assert params["stage"] == "distill" and params["seed"] == "7" and params["config_sha256"] == "c" * 64
    assert len(params["data.note"]) == 6000
    assert run.data.metrics == {"val_loss": 1.25, "step": 4.0, "eval.accuracy": 0.5}
    tags = run.data.tags
    assert tags["input.data_fingerprint"] == "d" * 64 and tags["input.model"] == "e" * 64
    assert tags["input.teachers"] == f"{'f' * 64},{'1' * 64}" and tags["output.model"] == "2" * 64
    assert tags["distillery.stage"] == "distill" and tags["distillery.output_dir"] == str(tmp_path / "run")
    local = client.download_artifacts(run.info.run_id, "run.json", str(tmp_path))
    assert json.loads(open(local).read()) == record

    model_dir = tmp_path / "run" / "model"
    assert reg.register("support-bot", model_dir, run_id=record["run_id"], model_hash="2" * 64, alias="champion", note="first") == 1
    reg.register("support-bot", tmp_path / "other")
    reg.set_alias("support-bot", "canary", 2)
    mv = client.get_model_version_by_alias("support-bot", "champion")
    assert mv.source == str(model_dir) and mv.run_id == run.info.run_id and mv.description == "first"
    assert mv.tags == {"distillery.version": "1", "run_id": record["run_id"], "model_hash": "2" * 64}
    assert client.get_model_version_by_alias("support-bot", "canary").tags["distillery.version"] == "2"
    assert client.get_registered_model("support-bot").aliases == {"champion": 1, "canary": 2}


def test_a_failing_mirror_keeps_the_local_write(store, tmp_path, caplog):
    _, uri, client = store
    plain = Registry(tmp_path / "registry")
    plain.register("unmirrored", tmp_path)  # before the mirror was configured: MLflow never saw it
    mirrored = Registry(tmp_path / "registry", mlflow_uri=uri)
    with caplog.at_level(logging.WARNING, logger="distillery.registry.store"):
        mirrored.set_alias("unmirrored", "champion", 1)
    assert mirrored.resolve("unmirrored", "champion")["version"] == 1
    assert "could not mirror alias unmirrored@champion" in caplog.text and "not in MLflow" in caplog.text
