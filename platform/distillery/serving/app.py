"""`distillery serve`: finished runs behind an OpenAI-compatible API (Ray Serve LLM + vLLM).

Three ways to run the same application:

    distillery serve serve/student.yaml                          # blocking; Ctrl-C shuts down
    serve run serve/student.ray.yaml                             # Ray Serve's own runner
    serve deploy serve/student.ray.yaml                          # onto a running cluster

`serve run` / `serve deploy` import `distillery.serving.app:app_builder`, whose args name the
Distillery config (and optional overrides).

Each `serve.models` entry is a run directory (`config.yaml` + `model/`) or a Hugging Face model
directory. Full weights get one vLLM engine deployment each. A LoRA run is served as an adapter
on its base model's engine (several adapters share one base; clients ask for `base:adapter`),
or, with `merge_lora: true`, merged into full weights (cached by the adapter's content,
`export/merge.py`) and served as its own model. A `registry:NAME@ALIAS` path serves the version
the alias points at.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillery.config import Config, ConfigError, check_paths, load_config
from distillery.engine_settings import check_engine, engine_log_env
from distillery.export.merge import merge_adapter
from distillery.models.load import adapter_base, resolve_model_dir, vllm_max_lora_rank
from distillery.registry.record import REGISTRY_PREFIX, resolve_model_ref
from distillery.registry.store import parse_ref
from distillery.runtime import ensure_ray
from distillery.serving.ingress import DistilleryIngress, key_digest
from distillery.serving.probe import load_probe
from distillery.serving.server import ADAPTERS_KEY, MAX_LEN_KEY, MAX_PROMPT_KEY, DistilleryLLMServer
from distillery.serving.versions import Version

APP_NAME = "distillery"


@dataclass
class EngineSpec:
    """One vLLM engine deployment: a full-weight model plus the adapters served on top of it."""

    model_id: str
    path: str
    adapters: dict[str, str] = field(default_factory=dict)  # adapter name -> adapter dir
    max_lora_rank: int = 0


def _check_name(name: str, key: str) -> str:
    if not name or ":" in name or "/" in name:
        raise ConfigError(f"{key}: model name '{name}' must be non-empty and contain neither ':' nor '/'")
    return name


def plan_engines(cfg: Config) -> list[EngineSpec]:
    """Group `serve.models` into engines: full weights directly, adapters onto their base model."""
    return plan_serving(cfg)[0]


def plan_serving(cfg: Config) -> tuple[list[EngineSpec], dict[str, list[Version]]]:
    """(engines, routes): every model and version of `serve.models` grouped into engines (full
    weights directly, adapters onto their base model), and for each name served with `versions`,
    its versions with the engine-side model id each one is asked for."""
    engines: dict[str, EngineSpec] = {}  # resolved full-weight dir -> engine
    pending: list[tuple[str, str, Path, str]] = []  # (key, adapter name, adapter dir, base path)
    routes: dict[str, list[Version]] = {}
    adapter_versions: list[tuple[Version, str]] = []  # versions served as adapters: their base path, resolved below

    def engine_for(path: Path, name: str, key: str) -> EngineSpec:
        real = str(path.resolve())
        if real not in engines:
            if any(e.model_id == name for e in engines.values()):
                raise ConfigError(f"{key}: model name '{name}' is used twice; set `name` to tell them apart")
            engines[real] = EngineSpec(model_id=_check_name(name, key), path=real)
        return engines[real]

    def add(path_text: str, name: str, merge: bool, key: str) -> str | None:
        """Plan one model directory under `name`; the model id of a full-weight engine, or None
        for an adapter (its id is known once its base engine is)."""
        path = resolve_model_ref(path_text, cfg, key)
        try:
            model_dir = resolve_model_dir(path)
        except FileNotFoundError as e:
            raise ConfigError(f"{key}: {e}") from None
        base = adapter_base(model_dir)
        if base is None:
            return engine_for(model_dir, name, key).model_id
        if merge:
            return engine_for(merge_adapter(model_dir, say=lambda line: print(f"serve: {line}", flush=True)), name, key).model_id
        pending.append((key, _check_name(name, key), model_dir, base))
        return None

    for i, m in enumerate(cfg.serve.models):
        key = f"serve.models.{i}"
        if not m.versions:
            try:
                default_name = parse_ref(m.path)[0] if m.path.startswith(REGISTRY_PREFIX) else Path(m.path.rstrip("/")).name
            except ValueError as e:
                raise ConfigError(f"{key}.path: {e}") from None
            add(m.path, m.name or default_name, m.merge_lora, f"{key}.path")
            continue
        name = _check_name(m.name, f"{key}.name")
        if name in routes:
            raise ConfigError(f"{key}.name: model name '{name}' is used twice")
        if m.probe is not None:
            try:
                load_probe(m.probe.file)
            except ValueError as e:
                raise ConfigError(f"{key}.probe.file: {e}") from None
        routes[name] = []
        for j, v in enumerate(m.versions):
            label = f"v{j + 1}"
            vkey = f"{key}.versions.{j}.path"
            model_id = add(v.path, f"{name}@{label}", m.merge_lora, vkey)
            version = Version(label=label, model_id=model_id or "", weight=v.weight, role=v.role)
            routes[name].append(version)
            if model_id is None:
                adapter_versions.append((version, pending[-1][1]))

    for key, name, adapter_dir, base in pending:
        try:
            base_dir = resolve_model_dir(base)
        except FileNotFoundError as e:
            raise ConfigError(f"{key}: the adapter's base model cannot be found: {e}") from None
        engine = engine_for(base_dir, Path(base.rstrip("/")).name, key)
        if name in engine.adapters:
            raise ConfigError(f"{key}: adapter name '{name}' is used twice on base '{engine.model_id}'")
        engine.adapters[name] = str(adapter_dir.resolve())
        rank = json.loads((adapter_dir / "adapter_config.json").read_text()).get("r", 8)
        engine.max_lora_rank = max(engine.max_lora_rank, rank)
        for version, adapter_name in adapter_versions:
            if adapter_name == name and not version.model_id:
                version.model_id = f"{engine.model_id}:{name}"
    clash = set(routes) & {e.model_id for e in engines.values()}
    if clash:
        raise ConfigError(f"serve.models: '{sorted(clash)[0]}' names both a versioned model and an engine; rename one")
    return list(engines.values()), routes


def _use_gpu(cfg: Config) -> bool:
    if cfg.serve.device != "auto":
        return cfg.serve.device == "gpu"
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def check_serve_engine(cfg: Config, use_gpu: bool) -> None:
    """The GPU-only engine keys (tensor_parallel_size, gpu_memory_utilization, accelerator_type) are
    refused on engines that run on CPU."""
    why = "serve.device: cpu" if cfg.serve.device == "cpu" else "serve.device: auto found no CUDA device"
    check_engine(cfg.serve, "serve", use_gpu, why)


def llm_config(cfg: Config, engine: EngineSpec, use_gpu: bool):
    """The ray.serve.llm `LLMConfig` of one engine deployment."""
    from ray.serve.llm import LLMConfig

    s = cfg.serve
    engine_kwargs: dict[str, Any] = {"max_num_seqs": s.max_num_seqs}
    if s.max_model_len is not None:
        engine_kwargs["max_model_len"] = s.max_model_len
    if s.max_num_batched_tokens is not None:
        engine_kwargs["max_num_batched_tokens"] = s.max_num_batched_tokens
    if s.dtype != "auto":
        engine_kwargs["dtype"] = s.dtype
    elif not use_gpu:
        engine_kwargs["dtype"] = "float32"  # fp32 GEMMs run faster than bf16 on these CPUs
    if use_gpu:
        engine_kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
        if s.tensor_parallel_size > 1:
            # Serve LLM reserves the GPUs as one placement group bundle per shard of the replica.
            engine_kwargs["tensor_parallel_size"] = s.tensor_parallel_size
    env_vars = engine_log_env()
    if not use_gpu:
        # CUDA-graph capture does not exist on CPU and torch.compile dominates start-up on small
        # hosts; eager mode starts an engine in about a third of the time.
        engine_kwargs["enforce_eager"] = True
        env_vars["VLLM_CPU_KVCACHE_SPACE"] = f"{s.cpu_kv_cache_gib:g}"
    lora_config = None
    if engine.adapters:
        engine_kwargs["enable_lora"] = True
        engine_kwargs["max_lora_rank"] = vllm_max_lora_rank(engine.max_lora_rank)
        engine_kwargs["max_loras"] = min(len(engine.adapters), 8)
        lora_config = {"max_num_adapters_per_replica": max(len(engine.adapters), 1)}
    a = s.autoscaling
    deployment_config = {
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "backpressure_config": {"status_code": s.overload_status, "retry_after_s": s.retry_after_s},
        "autoscaling_config": {
            "min_replicas": a.min_replicas,
            "initial_replicas": max(a.min_replicas, 1),
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests or 16,
        },
    }
    if s.latency_target_ms is not None:
        # The replica's admission controller reads these (DistilleryLLMServer.reconfigure); a
        # `serve deploy` that changes only them retargets running replicas without a restart.
        deployment_config["user_config"] = {"latency_target_ms": s.latency_target_ms, "latency_metric": s.latency_metric or "tpot",
                                            "max_admitted": s.max_num_seqs}
        # Replicas report their admission state every 2 s; the policy averages the last 10 s.
        deployment_config["autoscaling_config"].update(
            policy={"policy_function": "distillery.serving.autoscale:latency_policy"}, metrics_interval_s=2.0, look_back_period_s=10.0)
    return LLMConfig(
        model_loading_config={"model_id": engine.model_id, "model_source": engine.path},
        engine_kwargs=engine_kwargs,
        accelerator_config={"kind": "gpu" if use_gpu else "cpu"},
        **({"accelerator_type": s.accelerator_type} if use_gpu and s.accelerator_type else {}),
        runtime_env={"env_vars": env_vars},
        deployment_config=deployment_config,
        lora_config=lora_config,
        server_cls=DistilleryLLMServer,
        experimental_configs={ADAPTERS_KEY: engine.adapters, MAX_LEN_KEY: _context_length(cfg, engine),
                              MAX_PROMPT_KEY: cfg.serve.max_prompt_tokens},
    )


def _context_length(cfg: Config, engine: EngineSpec) -> int | None:
    """The engine's context: `serve.max_model_len`, else the model config's (as vLLM derives it)."""
    if cfg.serve.max_model_len is not None:
        return cfg.serve.max_model_len
    model_cfg = json.loads((Path(engine.path) / "config.json").read_text())
    return model_cfg.get("max_position_embeddings") or model_cfg.get("n_positions")


def read_api_key(cfg: Config) -> str | None:
    """The API key from `serve.api_key_env` or `serve.api_key_file`; None when neither is set."""
    s = cfg.serve
    if s.api_key_env:
        key = os.environ.get(s.api_key_env, "").strip()
        if not key:
            raise ConfigError(f"serve.api_key_env: environment variable {s.api_key_env} is not set or empty")
        return key
    if s.api_key_file:
        try:
            key = Path(s.api_key_file).read_text(encoding="utf-8").splitlines()[0].strip()
        except (FileNotFoundError, IndexError):
            raise ConfigError(f"serve.api_key_file: '{s.api_key_file}' is missing or empty") from None
        if not key:
            raise ConfigError(f"serve.api_key_file: the first line of '{s.api_key_file}' is empty")
        return key
    return None


def build_app(cfg: Config):
    """The Ray Serve application (`ray.serve.llm.build_openai_app`) for `cfg.serve`."""
    from ray.serve.llm import build_openai_app

    if not cfg.serve.models:
        raise ConfigError("serve.models: nothing to serve")
    key = read_api_key(cfg)
    engines, routes = plan_serving(cfg)
    use_gpu = _use_gpu(cfg)
    s = cfg.serve
    check_serve_engine(cfg, use_gpu)
    return build_openai_app({
        "llm_configs": [llm_config(cfg, e, use_gpu) for e in engines],
        "ingress_cls_config": {
            "ingress_cls": DistilleryIngress,
            "ingress_extra_kwargs": {
                "adapters": {e.model_id: e.adapters for e in engines if e.adapters},
                "api_key_digest": key_digest(key) if key else None,
                "overload_status": s.overload_status,
                "retry_after_s": s.retry_after_s,
                "max_request_bytes": s.max_request_bytes,
                "max_n": s.max_n,
                "max_prompts": s.max_prompts,
                "routes": {name: [dataclasses.asdict(v) for v in versions] for name, versions in routes.items()},
                "canary": s.canary.model_dump(),
                "probes": {m.name: {**m.probe.model_dump(), "file": str(Path(m.probe.file).resolve())}
                           for m in s.models if m.probe is not None},
                "deploy_log": str(Path(cfg.deploy_log).resolve()) if routes else None,
                "registry": cfg.registry.path if cfg.registry.record else None,
            },
        },
        # On a 2-core host a CPU held by the ingress would leave none for the engine replica.
        "ingress_deployment_config": {
            "ray_actor_options": {"num_cpus": s.ingress_cpus},
            "max_queued_requests": s.max_queued_requests,
            "backpressure_config": {"status_code": s.overload_status, "retry_after_s": s.retry_after_s},
        },
    })


def app_builder(args: dict[str, Any]):
    """Application builder for Ray Serve's CLI.

        serve run distillery.serving.app:app_builder config=serve/student.yaml
        serve run serve/student.ray.yaml        # same, with args from a Serve config file

    args: `config` (a Distillery config path) and optional `overrides` (list of `key=value`).
    """
    unknown = set(args) - {"config", "overrides"}
    if "config" not in args or unknown:
        raise ConfigError(f"app_builder args: need `config` (and optional `overrides`); got {sorted(args)}")
    overrides = args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    cfg = load_config(args["config"], list(overrides))
    check_paths(cfg, ["serve.models"])
    return build_app(cfg)


def _ray_num_cpus(cfg: Config) -> int:
    # Each engine replica's placement group holds two logical CPUs (its actor and the vLLM worker);
    # logical CPUs may exceed cores (vLLM's own threads share the real cores).
    engines = max(len(cfg.serve.models), 1) * max(cfg.serve.autoscaling.max_replicas, 1)
    return cfg.serve.ray_num_cpus or max(4, os.cpu_count() or 1, 2 * engines)


def run_serve(cfg: Config) -> int:
    """`distillery serve CONFIG`: start Ray Serve, print the URL, serve until Ctrl-C or SIGTERM."""
    import ray
    from ray import serve

    # Config errors (missing key, bad run dir, clashing names) surface before Ray starts;
    # building the app itself needs a Ray session (deployment options read its runtime env).
    read_api_key(cfg)
    plan_engines(cfg)
    check_serve_engine(cfg, _use_gpu(cfg))
    s = cfg.serve
    started = ensure_ray(num_cpus=_ray_num_cpus(cfg))
    app = build_app(cfg)
    # Ctrl-C (even when started from a shell that ignores SIGINT for background jobs) and
    # SIGTERM both shut Serve and Ray down cleanly.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        print(f"serve: starting {len(cfg.serve.models)} model(s); engines take a minute to load", flush=True)
        serve.start(http_options={"host": s.host, "port": s.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        url = f"http://{s.host}:{s.port}/v1"
        auth = "API key required" if (s.api_key_env or s.api_key_file) else "no API key"
        print(f"serve: ready at {url} ({auth}); Ctrl-C to stop", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("serve: shutting down", flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            if started:
                ray.shutdown()
    print("serve: stopped", flush=True)
    return 0


if __name__ == "__main__":  # vLLM spawns engine processes: keep module-level work behind this guard
    sys.exit(run_serve(load_config(sys.argv[1], sys.argv[2:])))
