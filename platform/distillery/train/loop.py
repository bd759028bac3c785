"""The Ray Train per-worker loop shared by finetune and distill.

Each worker: loads the model, applies the method (full / LoRA / freeze), wraps it (FSDP2
`fully_shard` per decoder layer then the root, DDP, or nothing), streams its shard of the
prepared split with `get_dataset_shard`, and steps AdamW with warmup + decay, gradient
accumulation and clipping. Every `eval_every` steps it evaluates on its val shard (sums
all-reduced across workers) and reports to Ray; every `checkpoint_every` steps it saves model,
optimiser, scheduler, data position and RNG (sharded through torch.distributed.checkpoint), so a
replaced worker group or a re-run continues where it stopped. At the end rank 0 exports the model
in Hugging Face format. What the loss is comes from an objective (train/objective.py, distill).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import yaml

from distillery.config import Config, validate_tree
from distillery.models.load import load_causal_lm, load_tokenizer, resolve_model_dir, torch_dtype
from distillery.models.plan import ParamPlan, apply_method, decoder_layers
from distillery.rung_gate import wait_for_decision
from distillery.train.collate import collate
from distillery.train.objective import finish_eval

TRAIN_COLUMNS = ["row_id", "input_ids", "labels"]


@dataclass
class TrainState:
    """Where training is; saved with every checkpoint."""

    step: int = 0  # optimiser steps done
    epoch: int = 0  # passes over the training shard started
    micro_in_epoch: int = 0  # micro-batches consumed in the current epoch (the data position)
    best_val: float = math.inf
    bad_evals: int = 0  # evaluations since val loss last improved
    evaluations: int = 0  # evaluations done (ASHA's time unit in tune trials)
    last_val: dict | None = None


def say(message: str) -> None:
    """Print a progress line once. Ray Train patches `print` on workers to log *and* echo it, which
    shows every line twice on the driver; writing to the process's own stdout bypasses the patch."""
    print(message, file=sys.__stdout__ or sys.stdout, flush=True)


# --------------------------------------------------------------------------- setup


def lr_lambda(cfg: Config, total_steps: int):
    """Multiplier of the peak lr at each step: linear warmup, then constant, linear or cosine decay to 0."""
    warm, kind = cfg.train.warmup_steps, cfg.train.scheduler

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_optimizer(groups: list[dict[str, Any]], cfg: Config) -> torch.optim.AdamW:
    """AdamW over `groups` (param groups), with PyTorch's fused kernel wherever every parameter allows it.

    The fused kernel updates all parameters in one pass per step; on CPU PyTorch's default is a
    per-tensor loop that took 3x as long (a 3.6M-parameter Llama: 18 ms vs 6 ms per step, ~6% of a
    step). Hugging Face's Trainer defaults to it as well. Same update, same state dict.
    """
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused or None)


def wrap_model(model, cfg: Config, device: torch.device, world: int):
    """FSDP2 (per decoder layer, then root), DDP, or the bare model."""
    strategy = cfg.train.strategy
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = None
        if device.type == "cuda" and cfg.train.precision != "fp32":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=mp) if mp else fully_shard(layer)
        fully_shard(model, mp_policy=mp) if mp else fully_shard(model)
        return model
    if strategy == "ddp" and world > 1:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def unwrap(model):
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


# --------------------------------------------------------------------------- distributed helpers


def all_reduce_sums(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def sync_extra_grads(extra: list[torch.nn.Parameter], world: int) -> None:
    """Average the gradients of modules that live outside FSDP/DDP (e.g. distillation projections)."""
    if world == 1 or not extra:
        return
    for p in extra:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


def clip_grads(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """Clip the global gradient norm (sharded DTensor grads included); returns the norm before clipping."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(directory: str, model, optimizer, scheduler, state: TrainState, rank: int) -> None:
    """Sharded model + optimiser through DCP; scheduler, data position (rank 0) and RNG (every rank) beside it."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(directory, "dcp"))
    save_file({"cpu": torch.get_rng_state()}, os.path.join(directory, f"rng_rank{rank}.safetensors"))
    if rank == 0:
        with open(os.path.join(directory, "trainer_state.json"), "w") as f:
            json.dump({**asdict(state), "scheduler": scheduler.state_dict()}, f, default=str)


def load_checkpoint(directory: str, model, optimizer, scheduler, rank: int) -> TrainState:
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state_dict = {"model": msd, "optim": osd}
    dcp.load(state_dict, checkpoint_id=os.path.join(directory, "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"])
    rng = os.path.join(directory, f"rng_rank{rank}.safetensors")
    if os.path.exists(rng):
        torch.set_rng_state(load_file(rng)["cpu"])
    with open(os.path.join(directory, "trainer_state.json")) as f:
        saved = json.load(f)
    scheduler.load_state_dict(saved.pop("scheduler"))
    saved["best_val"] = float(saved["best_val"])
    return TrainState(**saved)


def export_model(model, tokenizer, cfg: Config, rank: int, plan: ParamPlan) -> None:
    """Gather full weights (a collective) and let rank 0 write `<output_dir>/model` in HF format, atomically."""
    import shutil

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    out = os.path.join(cfg.output_dir, "model")
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    inner = unwrap(model)
    inner.save_pretrained(tmp, state_dict=full, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "distillery_run.json"), "w") as f:
        json.dump({"method": plan.kind, "parameters": plan.total, "trainable_parameters": plan.trainable}, f, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    if plan.kind == "lora" and cfg.method.lora.merge:
        from peft import PeftModel

        base = load_causal_lm(resolve_model_dir(cfg.model.path), dtype="float32")
        merged = PeftModel.from_pretrained(base, out).merge_and_unload()
        mtmp, mout = os.path.join(cfg.output_dir, "merged.tmp"), os.path.join(cfg.output_dir, "merged")
        shutil.rmtree(mtmp, ignore_errors=True)
        merged.save_pretrained(mtmp, safe_serialization=True)
        tokenizer.save_pretrained(mtmp)
        shutil.rmtree(mout, ignore_errors=True)
        os.replace(mtmp, mout)


# --------------------------------------------------------------------------- the loop


class MetricsLog:
    """`<output_dir>/metrics.jsonl` (rank 0): one JSON line per step and per evaluation."""

    def __init__(self, cfg: Config, rank: int, resume_step: int):
        self.path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.enabled = rank == 0
        if self.enabled and os.path.exists(self.path):
            # Lines past the restored step came from an attempt that did not reach its next checkpoint.
            with open(self.path) as f:
                kept = [l for l in f if l.strip() and json.loads(l).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


FETCH_ROWS = 256  # rows pulled from the data shard at a time, then cut into micro-batches


def shard_batches(shard, batch_size: int, columns: list[str]) -> Iterator[dict[str, Any]]:
    """The shard's rows in order, as numpy batches of `batch_size` (the last one may be shorter).

    Pulls about FETCH_ROWS rows per `iter_batches` batch and slices them here: each Ray Data batch
    has a fixed cost (block fetch, Arrow -> numpy) that, at micro-batches of 8 rows, took 15-20% of
    a small model's training time. The micro-batches are the same as `iter_batches(batch_size)`'s.
    """
    fetch = batch_size * max(1, FETCH_ROWS // batch_size)
    for big in shard.iter_batches(batch_size=fetch, batch_format="numpy"):
        cols = {k: big[k] for k in columns if k in big}
        n = len(next(iter(cols.values())))
        for start in range(0, n, batch_size):
            yield {k: v[start : start + batch_size] for k, v in cols.items()}


def micro_batches(shard, cfg: Config, pad_id: int, state: TrainState, columns: list[str]):
    """Yield (epoch, collated micro-batch) forever, skipping what the restored state already consumed."""
    while True:
        skip = state.micro_in_epoch
        for i, batch in enumerate(shard_batches(shard, cfg.train.batch_size, columns)):
            if i < skip:
                continue
            yield collate(batch, pad_id, cfg.data.max_length)
        state.epoch += 1
        state.micro_in_epoch = 0
        if cfg.train.max_steps is None and state.epoch >= cfg.train.epochs:
            return


VAL_KEEP_BYTES = 256 * 2**20  # a validation shard up to this size (per worker) is read once and kept


def _nbytes(value: Any) -> int:
    """Bytes held by a numpy column value, nested object arrays (list columns) included."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes) if value.dtype != object else sum(_nbytes(v) for v in value)
    return 8


class ValidationBatches:
    """The validation shard's micro-batches. The first pass streams them from Ray Data and keeps them
    when every worker's shard is under VAL_KEEP_BYTES; later evaluations replay them from memory.
    Each pass over a streaming shard starts a Dataset execution (seconds): with frequent evaluations
    (ASHA rungs, small `eval_every`) that cost more than evaluating. Every worker decides the same
    (an all-reduce), since the shards of one split must be iterated together."""

    def __init__(self, shard, batch_size: int, columns: list[str]):
        self.shard, self.batch_size, self.columns = shard, batch_size, columns
        self.kept: list[dict[str, Any]] | None = None
        self._pending: list[dict[str, Any]] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.kept is not None:
            yield from self.kept
            return
        pending: list[dict[str, Any]] | None = []
        size = 0
        for batch in shard_batches(self.shard, self.batch_size, self.columns):
            if pending is not None:
                size += sum(_nbytes(v) for v in batch.values())
                if size <= VAL_KEEP_BYTES:
                    pending.append(batch)
                else:
                    pending = None
            yield batch
        self._pending = pending

    def settle(self, device: torch.device) -> None:
        """After a full pass: keep the batches if no worker's shard went over the limit."""
        if self.kept is None:
            over = all_reduce_sums({"over": float(self._pending is None)}, device)["over"]
            self.kept = self._pending if over == 0 else None
            self._pending = None


def evaluate(model, objective, batches: ValidationBatches, cfg: Config, pad_id: int, device: torch.device) -> dict[str, float]:
    model.eval()
    sums: dict[str, float] = {}
    with torch.no_grad():
        for batch in batches:
            b = _to(collate(batch, pad_id, cfg.data.max_length), device)
            for k, v in objective.evaluate(model, b).items():
                sums[k] = sums.get(k, 0.0) + v
    batches.settle(device)
    model.train()
    return finish_eval(all_reduce_sums(sums, device))


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _trace(cfg: Config, rank: int, record: dict[str, Any]) -> None:
    if cfg.train.trace_rows:
        d = os.path.join(cfg.output_dir, "trace")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"rows_rank{rank}.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point Ray Train runs on every worker. `loop_config`: config (YAML), stage, total_steps."""
    import ray
    import ray.train
    from ray.train import Checkpoint

    from distillery.train.objective import build_objective

    cfg: Config = validate_tree(yaml.safe_load(loop_config["config"]), "run config")
    stage, total_steps = loop_config["stage"], loop_config["total_steps"]
    gate = loop_config.get("gate")  # tune trials under ASHA: wait for Tune's decision at each rung
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    if cfg.train.trace_rows:
        os.makedirs(os.path.join(cfg.output_dir, "trace"), exist_ok=True)
        with open(os.path.join(cfg.output_dir, "trace", f"pid_rank{rank}"), "w") as f:
            f.write(str(os.getpid()))
        with open(os.path.join(cfg.output_dir, "trace", f"node_rank{rank}"), "w") as f:
            f.write(ray.get_runtime_context().get_node_id())

    # Same seed on every rank: identical initial weights (LoRA init included) before sharding.
    torch.manual_seed(cfg.seed)
    model_dir = resolve_model_dir(cfg.model.path).resolve()
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, dtype=cfg.model.dtype if cfg.train.precision == "auto" else "float32", use_gpu=cfg.train.use_gpu)
    model, plan = apply_method(model, cfg.method)
    objective = build_objective(cfg, stage, tokenizer, model, device)
    model.to(device)
    model = wrap_model(model, cfg, device, world)
    objective.after_wrap(model)
    model.train()

    params = [p for p in model.parameters() if p.requires_grad]
    extra = [p for m in objective.extra_modules() for p in m.parameters()]
    optimizer = build_optimizer([{"params": params}] + ([{"params": extra}] if extra else []), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))

    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d, model, optimizer, scheduler, rank)
        if rank == 0:
            say(f"[{stage}] resumed from checkpoint at step {state.step} (epoch {state.epoch}, micro-batch {state.micro_in_epoch})")
    log = MetricsLog(cfg, rank, state.step)
    if rank == 0 and state.step == 0:
        say(f"[{stage}] {plan.describe()}; {world} worker(s), strategy {cfg.train.strategy}, {total_steps} steps")

    columns = objective.columns()
    train_shard = ray.train.get_dataset_shard("train")
    val_batches = ValidationBatches(ray.train.get_dataset_shard("val"), cfg.train.batch_size, columns)
    accum = cfg.train.grad_accum
    stream = micro_batches(train_shard, cfg, tokenizer.pad_token_id, state, columns)
    plan_metrics = {"trainable_parameters": plan.trainable, "total_parameters": plan.total, "trainable_fraction": plan.fraction}

    def run_eval() -> None:
        val = evaluate(model, objective, val_batches, cfg, tokenizer.pad_token_id, device)
        state.last_val, state.evaluations = val, state.evaluations + 1
        log.write({"step": state.step, **val})
        if rank == 0:
            say(f"[{stage}] step {state.step} " + " ".join(f"{k} {v:.4f}" for k, v in val.items()))
        if val["val_loss"] < state.best_val - 1e-6:
            state.best_val, state.bad_evals = val["val_loss"], 0
        else:
            state.bad_evals += 1

    def report(metrics: dict[str, Any], with_checkpoint: bool) -> None:
        metrics = {**metrics, **(state.last_val or {}), **plan_metrics, "step": state.step, "epoch": state.epoch,
                   "evaluation": state.evaluations}
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(d, model, optimizer, scheduler, state, rank)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))

    evaluated_at = -1
    t_last, tokens_since = time.perf_counter(), 0.0
    while state.step < total_steps:
        step_metrics: dict[str, float] = {}
        loss_sum, tokens = 0.0, 0.0
        exhausted = False
        objective.set_step(state.step, total_steps)
        for micro in range(accum):
            try:
                batch = _to(next(stream), device)
            except StopIteration:
                exhausted = True
                break
            state.micro_in_epoch += 1
            _trace(cfg, rank, {"step": state.step + 1, "epoch": state.epoch, "row_ids": list(map(str, batch.get("row_id", [])))})
            sync = micro == accum - 1
            if cfg.train.strategy == "fsdp":
                model.set_requires_gradient_sync(sync)
            with model.no_sync() if (not sync and hasattr(model, "no_sync")) else contextlib.nullcontext():
                loss, m = objective(model, batch)
                (loss / accum).backward()
            loss_sum += loss.item()
            tokens += float(batch["attention_mask"].sum().item())
            for k, v in m.items():
                step_metrics[k] = step_metrics.get(k, 0.0) + v / accum
        if exhausted:
            optimizer.zero_grad(set_to_none=True)  # a partial step at the very end of the data is dropped
            break
        step_metrics.update(objective.after_backward(model))
        sync_extra_grads(extra, world)
        grad_norm = clip_grads(params, cfg.train.max_grad_norm)
        clip_grads(extra, cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1

        sums = all_reduce_sums({"loss": loss_sum / accum, "tokens": tokens, **step_metrics}, device)
        tokens_since += sums["tokens"]
        now = time.perf_counter()
        record = {
            "step": state.step,
            "time": time.time(),
            "tokens": int(sums["tokens"]),
            "loss": sums["loss"] / world,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_since / max(now - t_last, 1e-9),
            **{k: v / world for k, v in sums.items() if k not in ("loss", "tokens")},
        }
        t_last, tokens_since = now, 0.0
        log.write(record)
        if rank == 0 and (state.step == 1 or state.step % 10 == 0 or state.step == total_steps):
            say(
                f"[{stage}] step {state.step}/{total_steps} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                f"grad_norm {grad_norm:.3f} tokens/s {record['tokens_per_s']:.0f}"
            )
        if state.step >= total_steps:
            break  # the final evaluation and checkpoint follow the loop
        do_eval = bool(cfg.train.eval_every) and state.step % cfg.train.eval_every == 0
        do_ckpt = bool(cfg.train.checkpoint_every) and state.step % cfg.train.checkpoint_every == 0
        early_stop = False
        if do_eval:
            run_eval()
            evaluated_at = state.step
            patience = cfg.train.early_stopping_patience
            if patience and state.bad_evals >= patience:
                if rank == 0:
                    say(f"[{stage}] early stop at step {state.step}: val loss did not improve in {patience} evaluations")
                early_stop = True
        if early_stop:
            break
        if do_eval or do_ckpt:
            report(record, with_checkpoint=do_ckpt)
            if gate and do_eval and state.evaluations in gate["rungs"]:
                if wait_for_decision(gate["trial_id"], state.step) == "stop":
                    if rank == 0:
                        say(f"[{stage}] stopped by the scheduler at step {state.step}")
                    return

    if evaluated_at != state.step:
        run_eval()
    export_model(model, tokenizer, cfg, rank, plan)
    report({"finished": 1}, with_checkpoint=True)  # not "done": Tune sets that on trials it stops too
    if rank == 0:
        say(f"[{stage}] done at step {state.step}: model in {os.path.join(cfg.output_dir, 'model')}")
