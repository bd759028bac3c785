"""What a stage's vLLM engine is built with and what its Ray worker asks for, from one `EngineConfig`.

Eval generation (`eval.engine`), the teacher cache (`distill.cache_engine`) and generation
(`generate.engine`) each run vLLM inside a Ray worker: an actor or task that holds the GPUs the
engine uses, because Ray hides every GPU from a worker that asks for none. Serving builds its
engines through Ray Serve LLM from the flat `serve.*` keys of the same meaning (serving/app.py).
"""

from __future__ import annotations

import os
from typing import Any

from distillery.config import ConfigError, EngineConfig

# Settings that only mean something to an engine on GPUs, with their defaults.
GPU_ONLY = {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.9, "accelerator_type": None}


def check_engine(engine: Any, key: str, use_gpu: bool, switch: str = "train.use_gpu") -> None:
    """ConfigError naming `key.<field>` when a GPU-only setting of `engine` (an EngineConfig, or
    `serve`, which has the same keys) is set on a run without GPUs: it would be accepted and do
    nothing. `switch` names what decided there are none."""
    if use_gpu:
        return
    for name, default in GPU_ONLY.items():
        if getattr(engine, name) != default:
            raise ConfigError(f"{key}.{name} is a GPU setting and this run has no GPUs ({switch}): "
                              f"enable GPUs, or leave {key}.{name} unset")


def engine_dtype(engine: EngineConfig, model_dtype: str, use_gpu: bool) -> str:
    """The engine's weights dtype: `engine.dtype`, else `model.dtype`; `auto` is bf16 on GPU, fp32
    on CPU (where bf16 GEMMs run slower)."""
    name = engine.dtype or model_dtype
    if name == "auto":
        return "bfloat16" if use_gpu else "float32"
    return name


def engine_kwargs(engine: EngineConfig, model_dtype: str, use_gpu: bool, max_model_len: int | None) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` for this engine; `max_model_len` is the stage's own need,
    which `engine.max_model_len` overrides.

    CPU engines run eagerly: CUDA-graph capture does not exist there and torch.compile dominates
    start-up on small hosts. With tensor parallelism the engine's workers are processes inside the
    Ray worker that already holds the GPUs (`mp`), not Ray actors that would ask for more.
    """
    kwargs: dict[str, Any] = {"dtype": engine_dtype(engine, model_dtype, use_gpu), "enforce_eager": not use_gpu}
    length = engine.max_model_len or max_model_len
    if length is not None:
        kwargs["max_model_len"] = int(length)
    if use_gpu:
        kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
        if engine.tensor_parallel_size > 1:
            kwargs.update(tensor_parallel_size=engine.tensor_parallel_size, distributed_executor_backend="mp")
    return kwargs


def engine_resources(engine: EngineConfig, use_gpu: bool) -> dict[str, Any]:
    """Ray resource arguments (for `ray.remote` / `map_batches`) of the worker holding one engine:
    `tensor_parallel_size` GPUs, of `accelerator_type` when set; nothing on CPU."""
    if not use_gpu:
        return {}
    out: dict[str, Any] = {"num_gpus": engine.tensor_parallel_size}
    if engine.accelerator_type:
        out["accelerator_type"] = engine.accelerator_type
    return out


def engine_log_env(level: str = "WARNING") -> dict[str, str]:
    """The env var that keeps a vLLM engine's INFO logging (its whole configuration, every start-up
    step) off the terminal of a Ray that echoes worker logs; VLLM_LOGGING_LEVEL set by the user wins."""
    return {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", level)}
