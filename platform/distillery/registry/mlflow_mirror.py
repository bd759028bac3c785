"""A copy of the registry in MLflow: runs as MLflow runs, versions and aliases in MLflow's model
registry, for teams that browse experiments there. The local registry stays the source of truth:
the mirror is written after each local commit, and `Registry` turns a mirror failure into a warning.

    run record      -> MLflow run in experiment "distillery", named `<stage>-<run id[:8]>`:
                       params   record["settings"] flattened (`train.lr`), stage, config_sha256, seed
                       metrics  the numeric record["metrics"] (nested keys flattened)
                       tags     distillery.run_id / stage / output_dir, input.* and output.* content hashes
                       artifact run.json (the whole record)
    register        -> registered model version, source = the path, tags run_id, model_hash,
                       distillery.version (MLflow numbers versions itself)
    set_alias       -> registered model alias on the MLflow version with that distillery.version

A run recorded again (same run id) replaces its MLflow run: MLflow params cannot change once logged.
"""

from __future__ import annotations

import importlib.util
import json
import math
import posixpath
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

EXPERIMENT = "distillery"
RUN_ID_TAG = "distillery.run_id"
VERSION_TAG = "distillery.version"
INSTALL_HINT = "pip install 'distillery[mlflow]'"
# MLflow's limits (mlflow.utils.validation); fixed here so that this module imports without mlflow.
MAX_KEY = 250
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


class MlflowNotInstalled(ImportError):
    """A mirror was asked for but the mlflow package is missing."""


def require_mlflow(tracking_uri: str) -> None:
    """Raise MlflowNotInstalled, naming the URI and the install command, when mlflow is missing
    (checked without importing it: mlflow takes seconds to import)."""
    if importlib.util.find_spec("mlflow") is None:
        raise MlflowNotInstalled(f"registry.mlflow_uri is set ({tracking_uri}) but mlflow is not installed: {INSTALL_HINT}")


def default_artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a SQLite tracking database
    (`<db dir>/mlartifacts`) rather than MLflow's default `./mlruns` under whatever directory the
    process runs in; None (the server's default) for other stores."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri[len("sqlite:///"):]).resolve()
    return (db.parent / "mlartifacts").as_uri()


def mlflow_key(key: str) -> str:
    """`key` as a valid MLflow param/metric/tag key: allowed characters only, no path tricks
    ('a//b', './a'), at most 250 characters."""
    key = _BAD_KEY_CHARS.sub("_", key)
    if posixpath.normpath(key) != key:
        key = key.replace("/", "_")
    return key[:MAX_KEY] or "_"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {dotted.key: leaf}; lists and other values are leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))


def run_params(record: dict[str, Any]) -> dict[str, str]:
    """MLflow params for a record: the flattened settings, then stage, config_sha256 and seed;
    values truncated to MLflow's 6000 characters."""
    params: dict[str, str] = {}
    for key, value in [*flatten(record.get("settings") or {}).items(),
                       *((k, record.get(k)) for k in ("stage", "config_sha256", "seed"))]:
        if value is not None:
            params[mlflow_key(key)] = _text(value)[:MAX_PARAM_VALUE]
    return params


def run_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The numeric leaves of record["metrics"] (booleans are not metrics)."""
    out = {}
    for key, value in flatten(record.get("metrics") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[mlflow_key(key)] = float(value)
    return out


def run_tags(record: dict[str, Any]) -> dict[str, str]:
    """Tags naming the run and the content hashes it consumed and produced, so that MLflow
    searches (`tags."input.model" = '...'`) find the runs that share a model or data."""
    tags = {RUN_ID_TAG: record["run_id"], "distillery.stage": record.get("stage"), "distillery.output_dir": record.get("output_dir")}
    for side in ("inputs", "outputs"):
        part = record.get(side) or {}
        for key in ("data_fingerprint", "model", "teachers", "models"):
            value = part.get(key)
            if isinstance(value, list):
                value = ",".join(str(v) for v in value if v)
            if value:
                tags[f"{side[:-1]}.{key}"] = value
    return {mlflow_key(k): _text(v)[:MAX_TAG_VALUE] for k, v in tags.items() if v is not None}


def _millis(created: Any) -> int | None:
    try:
        t = datetime.fromisoformat(str(created))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return int(t.timestamp() * 1000)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


class MlflowMirror:
    """Writes registry runs, versions and aliases to the MLflow tracking server or store at
    `tracking_uri` (which is also the model registry URI). mlflow is imported on first use."""

    def __init__(self, tracking_uri: str, experiment: str = EXPERIMENT, artifact_location: str | None = None) -> None:
        require_mlflow(tracking_uri)
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.artifact_location = artifact_location or default_artifact_location(tracking_uri)
        self._client = None
        self._experiment_id: str | None = None

    @property
    def client(self):
        """The MlflowClient (created, and mlflow imported, on first use)."""
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    def experiment_id(self) -> str:
        """The id of the mirror's experiment, created (or restored) when needed."""
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                try:
                    self._experiment_id = self.client.create_experiment(self.experiment, artifact_location=self.artifact_location)
                except Exception:
                    # Another process created it between our lookup and create.
                    exp = self.client.get_experiment_by_name(self.experiment)
                    if exp is None:
                        raise
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    self.client.restore_experiment(exp.experiment_id)
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def mlflow_run_id(self, run_id: str) -> str | None:
        """The MLflow run that mirrors registry run `run_id`, or None."""
        runs = self.client.search_runs([self.experiment_id()], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'", max_results=1)
        return runs[0].info.run_id if runs else None

    def record_run(self, record: dict[str, Any]) -> str:
        """Mirror one run record; returns the MLflow run id."""
        from mlflow.entities import Metric, Param

        client, exp = self.client, self.experiment_id()
        old = client.search_runs([exp], filter_string=f"tags.`{RUN_ID_TAG}` = '{record['run_id']}'")
        for run in old:
            client.delete_run(run.info.run_id)
        end = _millis(record.get("created"))
        seconds = record.get("seconds")
        start = end - int(seconds * 1000) if end is not None and isinstance(seconds, (int, float)) and math.isfinite(seconds) else end
        run = client.create_run(exp, start_time=start, tags=run_tags(record),
                                run_name=f"{record.get('stage')}-{record['run_id'][:8]}")
        mlflow_id = run.info.run_id
        try:
            params = [Param(k, v) for k, v in run_params(record).items()]
            stamp = end if end is not None else int(time.time() * 1000)
            metrics = [Metric(k, v, stamp, 0) for k, v in run_metrics(record).items()]
            for chunk in _chunks(params, MAX_PARAMS_TAGS_PER_BATCH):
                client.log_batch(mlflow_id, params=chunk, synchronous=True)
            for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
                client.log_batch(mlflow_id, metrics=chunk, synchronous=True)
            client.log_text(mlflow_id, json.dumps(record, indent=2, default=str, ensure_ascii=False), "run.json")
        except Exception:
            client.set_terminated(mlflow_id, "FAILED")
            raise
        client.set_terminated(mlflow_id, "FINISHED", end_time=end)
        return mlflow_id

    def register(self, name: str, version: int, path: str, run_id: str | None = None,
                 model_hash: str | None = None, note: str | None = None) -> str:
        """Mirror registry version `version` of `name` as an MLflow model version; returns MLflow's
        version number (its own count, tagged with ours)."""
        from mlflow.exceptions import MlflowException

        client = self.client
        try:
            client.get_registered_model(name)
        except MlflowException:
            try:
                client.create_registered_model(name)
            except MlflowException:
                client.get_registered_model(name)  # created meanwhile by another process; else raise
        tags = {VERSION_TAG: str(version)}
        if run_id:
            tags["run_id"] = run_id
        if model_hash:
            tags["model_hash"] = model_hash
        mv = client.create_model_version(name, source=path, run_id=self.mlflow_run_id(run_id) if run_id else None,
                                         tags=tags, description=note)
        return str(mv.version)

    def mlflow_version(self, name: str, version: int) -> str:
        """MLflow's version number for registry version `version` of `name`. KeyError when the
        version was never mirrored (say, registered before the mirror was configured)."""
        for mv in self.client.search_model_versions(f"name = '{name}'"):
            if mv.tags.get(VERSION_TAG) == str(version):
                return str(mv.version)
        raise KeyError(f"{name} version {version} is not in MLflow at {self.tracking_uri} (registered before the mirror was set?)")

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point MLflow's alias `alias` of `name` at the MLflow version mirroring ours."""
        self.client.set_registered_model_alias(name, alias, self.mlflow_version(name, version))
