"""Every use of Ray's private APIs, in one place (pinned: ray 2.60.0, see pyproject.toml).

Each item says why Distillery needs it and which public API would replace it. When Ray changes
one of these, this module is the only place to mend; a Ray upgrade starts by re-running the tests
that cover each item (named below).

The `ray.llm._internal` names are imported on first use (module `__getattr__`): importing this
module for the key-value store or the placement-group table must not pull in Ray Serve LLM.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

# --------------------------------------------------------------------------- internal key-value store
# Why: tune trials under ASHA wait at each rung for Tune's decision (tune/rung_gate.py). The Tune
# driver writes the decision, the trial's Train workers read it: two processes of one job that
# share no actor. GCS's key-value store is the one place both reach without starting an actor.
# Public replacement: none in Ray 2.60 (a detached named actor holding a dict would do the same at
# the cost of one more process per search). Covered by tests/integration/test_tune.py.


def kv_put(key: bytes, value: bytes, namespace: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key, value, namespace=namespace)


def kv_get(key: bytes, namespace: str) -> bytes | None:
    from ray.experimental.internal_kv import _internal_kv_get

    return _internal_kv_get(key, namespace=namespace)


def kv_delete_prefix(prefix: bytes, namespace: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(prefix, del_by_prefix=True, namespace=namespace)


# --------------------------------------------------------------------------- placement-group table
# Why: when ASHA stops a trial, GCS keeps its Train workers' placement group until the trial's job
# ends, and Ray Train's own cleaner asks the dashboard's state API, which a local Ray without a
# dashboard cannot answer (tune/janitor.py). We need each group's creator actor and whether it is
# dead, which only the raw GCS table has.
# Public replacement: `ray.util.state.list_placement_groups` (needs the dashboard, and reports no
# creator) or `ray.util.placement_group_table()` (no creator either). Covered by
# tests/integration/test_tune.py (test_placement_group_of_a_killed_owner_is_removed).


def orphaned_placement_groups() -> list[Any]:
    """Placement groups not yet removed whose creating actor has died (detached groups excluded)."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup

    found = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        created_by_actor = pg.creator_actor_id and not ray.ActorID(pg.creator_actor_id).is_nil()
        if pg.state != gcs_pb2.PlacementGroupTableData.REMOVED and created_by_actor and pg.creator_actor_dead and not pg.is_detached:
            found.append(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
    return found


# --------------------------------------------------------------------------- worker log lines on the driver
# Why: Ray forwards every worker's stdout/stderr to the driver. Ray Train's detached
# placement-group cleaner logs "State API may be temporarily unavailable" about once a second on
# a small machine (it polls the dashboard's state API, which a local Ray without a dashboard does
# not serve), dozens of times per run. The lines stay in the worker's log file under the Ray
# session directory; only the driver's echo of those exact lines is dropped. Ray 2.60 has no
# public hook on the forwarded lines; its "ray_print_logs" handler is wrapped instead.
# Public replacement: a log filter in `ray.LoggingConfig`, or the cleaner logging at debug level.
# Covered by tests/integration/test_prepare.py (test_driver_drops_only_known_noise).

NOISE = (
    # Ray Train's placement-group cleaner, about once a second (above).
    "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable",
    # Ray Train's echo of every `ray.train.report` as one long dict: the loop's own progress line
    # says the same, and metrics.jsonl has every value.
    "Reporting training result ",
    # Ray Data's lines for every pass of every streaming split a training run reads (three per epoch
    # per split, from its SplitCoordinator actors): the run's own step lines already show its progress.
    "Starting execution of Dataset ",
    "Execution plan of Dataset ",
    " execution finished in ",
    "Progress bars disabled. To enable, set ",
)


def drop_noise_from_worker_logs(noise: tuple[str, ...] = NOISE) -> bool:
    """Stop this driver from echoing worker log lines that contain any of `noise`; True if installed."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    with dispatcher._lock:
        handlers = list(dispatcher.handlers)
    for name, handle in handlers:
        if name != "ray_print_logs" or getattr(handle, "drops_noise", False):
            continue

        def filtered(data: dict, handle=handle) -> None:
            lines = [line for line in data.get("lines", []) if not any(n in line for n in noise)]
            if lines:
                handle({**data, "lines": lines})

        filtered.drops_noise = True  # type: ignore[attr-defined]
        with dispatcher._lock:
            dispatcher.handlers = [(n, filtered if h is handle else h) for n, h in dispatcher.handlers]
        return True
    return False


# --------------------------------------------------------------------------- Ray Train's checkpoint registry
# Why: a worker killed between writing a checkpoint and the controller registering it leaves a
# checkpoint directory Ray Train never learns of, so `CheckpointConfig(num_to_keep)` never deletes
# it (three kills left five directories where two were to be kept). Which directories are registered
# is only in the controller's snapshot file beside them.
# Public replacement: Ray Train deleting unregistered checkpoint directories itself, or a public
# listing of a run's checkpoints. Covered by tests/integration/test_distill.py
# (test_three_worker_kills_at_random_steps_change_nothing).

CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"


def registered_checkpoints(storage: str | os.PathLike[str]) -> set[str] | None:
    """Names of the checkpoint directories Ray Train has registered in a run's storage
    (`<storage_path>/<name>`), or None when its snapshot is missing or unreadable."""
    path = os.path.join(storage, CHECKPOINT_SNAPSHOT)
    try:
        with open(path, encoding="utf-8") as f:
            snapshot = json.load(f)
        return {r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------- Ray Serve LLM internals
# `ray.serve.llm` publishes LLMConfig, build_openai_app and LLMServer's configuration, but not the
# classes `distillery serve` extends. Name -> (module, attribute, why, public replacement):
_LLM_INTERNALS: dict[str, tuple[str, str]] = {
    # The OpenAI ingress class: DistilleryIngress subclasses it (API keys, adapters in /v1/models,
    # OpenAI-format 4xx/503). `build_openai_app` accepts a subclass through `ingress_cls_config`,
    # but the base class itself is not exported. Replacement: an exported ingress base class.
    "OpenAiIngress": ("ray.llm._internal.serve.core.ingress.ingress", "OpenAiIngress"),
    # Response and error models of the OpenAI routes the ingress returns or raises.
    # Replacement: exported OpenAI protocol models (ray.serve.llm.openai_api_models in later Rays).
    "ModelCard": ("ray.llm._internal.serve.core.configs.openai_api_models", "ModelCard"),
    "ModelList": ("ray.llm._internal.serve.core.configs.openai_api_models", "ModelList"),
    "OpenAIHTTPException": ("ray.llm._internal.serve.core.configs.openai_api_models", "OpenAIHTTPException"),
    "ErrorInfo": ("ray.llm._internal.serve.core.configs.openai_api_models", "ErrorInfo"),
    "ErrorResponse": ("ray.llm._internal.serve.core.configs.openai_api_models", "ErrorResponse"),
    # The engine replica: DistilleryLLMServer subclasses it (local LoRA adapters, context-length
    # 400s) and passes it as `LLMConfig.server_cls`, which is public. Replacement: exported server class.
    "LLMServer": ("ray.llm._internal.serve.core.server.llm_server", "LLMServer"),
    # LoRA loading: Ray's loader only downloads adapters from cloud storage; LocalAdapterLoader
    # resolves local PEFT directories. Replacement: a `local://` dynamic LoRA path in LLMConfig.
    "LoraModelLoader": ("ray.llm._internal.serve.utils.lora_serve_utils", "LoraModelLoader"),
    "DiskMultiplexConfig": ("ray.llm._internal.serve.core.configs.llm_config", "DiskMultiplexConfig"),
    # Unique integer ids vLLM needs per loaded adapter, shared with Ray's own loader so ids never clash.
    "global_id_manager": ("ray.llm._internal.common.models", "global_id_manager"),
    # The request model of /v1/completions: the canary's quality probe builds its requests with it.
    # Replacement: a public request model in ray.serve.llm.
    "CompletionRequest": ("ray.llm._internal.serve.core.configs.openai_api_models", "CompletionRequest"),
}


def __getattr__(name: str) -> Any:
    if name in _LLM_INTERNALS:
        module, attr = _LLM_INTERNALS[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- private hooks of the ingress
# DistilleryIngress (serving/ingress.py) overrides three private methods; they are the only hooks
# where its behaviour can be changed. Each is listed with the Ray class that defines it, so a Ray
# upgrade that renames one fails tests/unit/test_serving_plan.py, not production:
#   _set_asgi_app(app)           Serve's ASGI wrapper (added by `serve.ingress` inside
#                                `build_openai_app`) hands the replica its FastAPI app: wrapped there
#                                with the API-key guard and the 400 handler. Replacement: ASGI
#                                middleware in `ingress_deployment_config`.
#   _get_model_id(model)         model-name resolution: 404 for unknown models and adapters before
#                                any engine replica. Replacement: a model-resolution hook.
#   _process_llm_request(...)    every LLM route: back-pressure and HTTP errors become OpenAI-format
#                                answers. Replacement: exception handlers on the ingress app.
# DistilleryLLMServer reads `self._llm_config` (the replica's LLMConfig, no public accessor).
INGRESS_PRIVATE_HOOKS: dict[str, tuple[str, str]] = {
    "_set_asgi_app": ("ray.serve._private.http_util", "ASGIAppReplicaWrapper"),
    "_get_model_id": _LLM_INTERNALS["OpenAiIngress"],
    "_process_llm_request": _LLM_INTERNALS["OpenAiIngress"],
}


def engine_unfinished_requests(engine: Any) -> int:
    """Requests a replica's vLLM engine still holds (running or waiting).

    Ray's `VLLMEngine` keeps vLLM's `AsyncLLM` in the private `_engine_client`; its
    `get_num_unfinished_requests()` is public vLLM API. Used to check that a client which goes
    away mid-stream frees its engine slot. Replacement: the engine's `vllm:num_requests_running`
    metric once Serve LLM exposes it per replica.
    """
    return int(engine._engine_client.get_num_unfinished_requests())
