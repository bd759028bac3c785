"""Build the Ray Train `TorchTrainer` for a training method, and run it as a CLI stage.

Used by `distillery finetune`, `distillery distill` (through their `TrainingMethod`, train/method.py)
and by every `distillery tune` trial.
The run directory (`output_dir`) gets `config.yaml`, `metrics.jsonl`, `model/`, `run.json`,
`run_identity.json` and Ray Train's own storage (`ray/`, checkpoints). Re-running the same run
with the same `output_dir` resumes from the last checkpoint; another run there is refused
(train/identity.py). For multi-node runs `output_dir` must be shared storage.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

from distillery.config import Config, ConfigError, write_resolved
from distillery.data.splits import load_manifest, read_split
from distillery.files import write_text_atomic
from distillery.models.load import model_config, model_identity, teachers_identity
from distillery.registry.record import artifact_hashes, finish_stage, new_record
from distillery.models.structure import is_moe_config
from distillery.models.plan import check_method
from distillery.ray_compat import registered_checkpoints
from distillery.runtime import ensure_ray
from distillery.train.curriculum import order_by_curriculum, plan_curriculum
from distillery.train.identity import check_resume
from distillery.train.loop import EvaluationGate, train_loop_per_worker
from distillery.train.method import TrainingMethod


def validate_training(cfg: Config, method: TrainingMethod) -> None:
    """Checks that need no Ray: strategy vs workers, prepared data present, the parameter plan fits
    the model, then the method's own checks (teacher, cache, EWC data, ...)."""
    if cfg.train.strategy == "none" and cfg.train.num_workers > 1:
        raise ConfigError("train.strategy: 'none' trains one unwrapped model; use fsdp or ddp with train.num_workers > 1")
    if not cfg.train.use_gpu and cfg.train.precision == "fp16":
        raise ConfigError("train.precision: fp16 (loss-scaled mixed precision) is for GPUs without bf16 and needs "
                          "train.use_gpu; on CPU use fp32 (the default there) or bf16")
    if cfg.train.cpu_offload and (cfg.train.strategy != "fsdp" or not cfg.train.use_gpu):
        raise ConfigError(
            f"train.cpu_offload: FSDP2 CPU offload moves GPU-resident shards to host memory; it needs "
            f"train.strategy fsdp (got {cfg.train.strategy}) and train.use_gpu (got {cfg.train.use_gpu})"
        )
    load_manifest(cfg.prepared_dir)
    # Here rather than only in the workers: a trial or run whose plan cannot work (too many frozen
    # layers, ESFT on a dense model, a bad experts file) fails before any Ray Train worker starts.
    student = model_config(cfg.model.path)
    check_method(cfg.method, student)
    if cfg.train.router_aux_loss_coef and not is_moe_config(student):
        raise ConfigError(
            f"train.router_aux_loss_coef: the router load-balancing loss is for mixture-of-experts models; "
            f"{cfg.model.path} is a dense '{getattr(student, 'model_type', '?')}' model (unset it)"
        )
    if cfg.train.qat:
        if cfg.method.kind not in ("full", "freeze"):
            raise ConfigError(f"train.qat: quantisation-aware training needs method full or freeze (got {cfg.method.kind}): "
                              "a LoRA adapter is merged before export, so its fake-quantised base would not be the quantised model")
        if is_moe_config(student):
            raise ConfigError(f"train.qat: {cfg.model.path} is a mixture-of-experts model; QAT and W8A8 export cover dense models")
    cur = cfg.train.curriculum
    if cur is not None and cur.by == "teacher_loss":
        if not cfg.model.teacher_specs:
            raise ConfigError("train.curriculum.by: teacher_loss scores rows with the teacher; set model.teacher (or model.teachers)")
        for path, _ in cfg.model.teacher_specs:
            vocab = model_config(path).vocab_size
            if vocab != student.vocab_size:
                raise ConfigError(f"train.curriculum.by: teacher_loss needs the teacher's vocabulary; {path} has "
                                  f"{vocab} tokens, the student {student.vocab_size}")
    method.validate(cfg)


def worker_cpus(cfg: Config, method: TrainingMethod, concurrent_runs: int = 1) -> float:
    """Logical CPUs each training worker reserves (and runs torch threads on): `train.cpus_per_worker`,
    or when it is null (auto) an equal share of this machine's cores among the workers of
    `concurrent_runs` runs (concurrent tune trials), less each run's sampling engines, at least 1.
    Auto counts this machine's cores only when the run starts its own Ray: one that joins a cluster
    (`RAY_ADDRESS`, or Ray already connected) cannot know its nodes' sizes and reserves 1."""
    if cfg.train.cpus_per_worker is not None:
        return cfg.train.cpus_per_worker
    import ray

    if os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        return 1.0
    per_run = (os.cpu_count() or 1) / concurrent_runs - method.engine_cpus(cfg)
    return float(max(1, int(per_run // cfg.train.num_workers)))


def with_worker_cpus(cfg: Config, method: TrainingMethod, concurrent_runs: int = 1) -> Config:
    """`cfg` with `train.cpus_per_worker` resolved (`worker_cpus`), as the workers and config.yaml get it."""
    if cfg.train.cpus_per_worker is not None:
        return cfg
    cpus = worker_cpus(cfg, method, concurrent_runs)
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"cpus_per_worker": cpus})})


def worker_resources(cfg: Config) -> dict[str, float]:
    """Ray resources of one training worker: its CPU share, one GPU with train.use_gpu, and
    train.worker_resources (e.g. `{"accelerator_type:H100": 0.001}` to pin workers to H100 nodes)."""
    return {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {}), **cfg.train.worker_resources}


def total_steps(cfg: Config, train_rows: int) -> int:
    """Optimiser steps the run will take (max_steps, or whole epochs of each worker's equal shard)."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_worker = train_rows // cfg.train.num_workers
    micro = math.ceil(per_worker / cfg.train.batch_size)
    steps = cfg.train.epochs * (micro // cfg.train.grad_accum)
    if steps < 1:
        raise ConfigError(
            f"train: {train_rows} training rows over {cfg.train.num_workers} worker(s) give no full step of "
            f"batch_size {cfg.train.batch_size} x grad_accum {cfg.train.grad_accum}"
        )
    return steps


def build_trainer(cfg: Config, method: TrainingMethod, callbacks: list | None = None, gate: EvaluationGate | None = None):
    """A TorchTrainer running `train_loop_per_worker` for `method`; the caller has run
    `validate_training` on `cfg` (before starting Ray, where it starts one).

    `gate` (tune trials under ASHA): asked after every evaluation whether the trial stops
    (tune/rung_gate.py)."""
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # The loop prints its own progress per step; Ray Data's per-operator bars would drown it.
    ray.data.DataContext.get_current().enable_progress_bars = False
    manifest = load_manifest(cfg.prepared_dir)
    train_rows = int(manifest.get("splits", {}).get("train", {}).get("rows", 0)) or _count_rows(cfg)
    steps = total_steps(cfg, train_rows)
    out = Path(cfg.output_dir).resolve()
    cfg = with_worker_cpus(cfg, method).model_copy(update={"output_dir": str(out)})
    write_resolved(cfg, out)
    # preserve_order: each worker sees the same rows in the same order on every attempt, so a
    # resumed run can skip exactly the micro-batches it already trained on.
    data_config = DataConfig(execution_options=ray.data.ExecutionOptions(preserve_order=True))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_yaml(), "method": method, "total_steps": steps, "gate": gate},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=worker_resources(cfg)),
        run_config=RunConfig(
            storage_path=str(out / "ray"),
            name="train",
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=callbacks or [],
        ),
        datasets=_datasets(cfg, method, out),
        dataset_config=data_config,
    )


def _datasets(cfg: Config, method: TrainingMethod, out: Path) -> dict:
    """The method's datasets, the training split in curriculum order when `train.curriculum` asks."""
    datasets = method.datasets(cfg)
    teacher = teachers_identity(cfg.model.teacher_specs) if cfg.train.curriculum and cfg.train.curriculum.by == "teacher_loss" else None
    planned = plan_curriculum(cfg, teacher)
    if planned is not None:
        ranks, summary = planned
        datasets["train"] = order_by_curriculum(datasets["train"], ranks)
        write_text_atomic(out / "curriculum.json", json.dumps(summary, indent=2))
    return datasets


def remove_unregistered_checkpoints(storage: Path) -> int:
    """Delete checkpoint directories Ray Train never registered (a killed worker's last one), which
    `train.keep_checkpoints` cannot prune; returns how many. Call after the run has ended."""
    registered = registered_checkpoints(storage)
    if registered is None or not storage.is_dir():
        return 0
    orphans = [p for p in storage.iterdir() if p.is_dir() and p.name.startswith("checkpoint_") and p.name not in registered]
    for p in orphans:
        shutil.rmtree(p, ignore_errors=True)
    return len(orphans)


def _count_rows(cfg: Config) -> int:
    return read_split(cfg.prepared_dir, "train", ["row_id"]).count()


def with_run_dir(cfg: Config, method: TrainingMethod) -> Config:
    """The run directory of a training stage: `output_dir` as the config gives it, or, when the
    config leaves it at its default, `<output_dir>/<stage>`, so that a finetune and a distill run with
    default settings never share (and resume) one directory. The prepared data and the teacher cache
    keep their default places under the default `output_dir`."""
    if "output_dir" in cfg.model_fields_set:
        return cfg
    return cfg.model_copy(update={
        "output_dir": os.path.join(cfg.output_dir, method.name),
        "data": cfg.data.model_copy(update={"prepared": cfg.prepared_dir}),
        "distill": cfg.distill.model_copy(update={"cache": cfg.teacher_cache_dir}),
    })


def run_training(cfg: Config, method: TrainingMethod) -> int:
    """Run `method` to completion (or resume it) and write `run.json`; returns an exit code."""
    # cpus_per_worker is resolved before Ray starts: auto counts this machine's cores only then.
    cfg = with_worker_cpus(with_run_dir(cfg, method), method)
    validate_training(cfg, method)
    if check_resume(cfg, method) == "fresh":
        print(f"{method.name}: train.resume=fresh: removed the previous run's checkpoints, metrics and model in {cfg.output_dir}", flush=True)
    # Logical CPUs: the workers' and the sampling engines', plus room for the Ray Data tasks that
    # feed them (docs/architecture.md, "Ray on small machines").
    started = ensure_ray(num_cpus=cfg.train.num_workers * cfg.train.cpus_per_worker + method.engine_cpus(cfg) + 2)
    t0 = time.time()
    try:
        result = build_trainer(cfg, method).fit()
        remove_unregistered_checkpoints(Path(cfg.output_dir).resolve() / "ray" / "train")
    finally:
        if started:
            import ray

            ray.shutdown()
    out = Path(cfg.output_dir).resolve()
    metrics = dict(result.metrics or {})
    summary = new_record(
        cfg, method.name, out,
        inputs={"data_fingerprint": load_manifest(cfg.prepared_dir).get("fingerprint"),
                "model": model_identity(cfg.model.path)["hash"], "teachers": method.teachers(cfg)},
        outputs={"model": model_identity(out / "model")["hash"] if (out / "model").is_dir() else None,
                 "artifacts": artifact_hashes(out, ["config.yaml", "metrics.jsonl"])},
        metrics=metrics,
        model=str(out / "model"),
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        seconds=round(time.time() - t0, 1),
        settings=cfg.model_dump(mode="json", by_alias=True),
    )
    finish_stage(cfg, summary, out / "run.json")
    print(
        f"{method.name}: finished in {summary['seconds']:.0f}s; val_loss {metrics.get('val_loss', float('nan')):.4f}; "
        f"model {summary['model']}; metrics {out / 'metrics.jsonl'}",
        flush=True,
    )
    return 0
