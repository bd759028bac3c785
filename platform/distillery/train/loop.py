"""The Ray Train per-worker loop shared by every training method (finetune, distill, ...).

Each worker: loads the model, applies the parameter plan (full / LoRA / freeze / ESFT), wraps it (FSDP2
`fully_shard` per decoder layer then the root, DDP, or nothing; train/parallel.py), streams its
shard of the method's datasets (train/batches.py), and steps AdamW with warmup + decay, gradient
accumulation and clipping, in the numerics of `train.precision` (fp32 weights, bf16/fp16 compute in
the mixed modes; parallel.Precision). Every `eval_every` steps it evaluates on its val shard (sums
all-reduced across workers) and reports to Ray; every `checkpoint_every` steps it saves a
checkpoint (train/checkpoint.py), so a replaced worker group or a re-run continues where it
stopped. At the end rank 0 exports the model in Hugging Face format. What the loss is comes from
the method's objective (train/method.py): the loop never asks which method it runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Iterator, Protocol

import torch
import yaml

from distillery.config import Config, validate_tree
from distillery.models.load import load_causal_lm, load_tokenizer, resolve_model_dir
from distillery.models.experts import ExpertSlices
from distillery.models.plan import apply_method
from distillery.train.batches import ValidationBatches, micro_batches, to_device
from distillery.train.checkpoint import ExtraState, MetricsLog, TrainState, export_model, load_checkpoint, save_checkpoint
from distillery.train.collate import collate
from distillery.train.esft import choose_experts, record_choice
from distillery.train.method import TrainingMethod
from distillery.train.objective import finish_eval
from distillery.train.parallel import (
    Precision, all_reduce_sums, clip_grads, enable_activation_checkpointing, shard_device, sync_extra_grads, unwrap,
    weights_dtype, wrap_model,
)


class EvaluationGate(Protocol):
    """Asked after every evaluation whether the run stops there (tune trials under ASHA: tune/rung_gate.py)."""

    def should_stop(self, evaluations: int, step: int) -> bool:
        """True to end the run now (no export); may block until the decision is known."""


def say(message: str) -> None:
    """Print a progress line once. Ray Train patches `print` on workers to log *and* echo it, which
    shows every line twice on the driver; writing to the process's own stdout bypasses the patch."""
    print(message, file=sys.__stdout__ or sys.stdout, flush=True)


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

    The fused kernel updates all parameters in one pass per step instead of PyTorch's default
    per-tensor loop (benchmarks/train_throughput.py compares them); Hugging Face's Trainer defaults
    to it as well. Same update, same state dict.
    """
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused or None)


def evaluate(model, objective, batches: ValidationBatches, cfg: Config, pad_id: int, device: torch.device,
             precision: Precision | None = None) -> dict[str, float]:
    """One pass over the validation batches: the objective's sums, all-reduced, as val_* metrics;
    in the training's compute dtype (`precision`)."""
    model.eval()
    sums: dict[str, float] = {}
    with torch.no_grad(), (precision.autocast() if precision else contextlib.nullcontext()):
        for batch in batches:
            b = to_device(collate(batch, pad_id, cfg.data.max_length), device)
            for k, v in objective.evaluate(model, b).items():
                sums[k] = sums.get(k, 0.0) + v
    batches.settle(device)
    model.train()
    return finish_eval(all_reduce_sums(sums, device))


class Worker:
    """One Ray Train worker's run: `setup` in the constructor, then `train_step`, `run_eval` and
    `report` driven by `run`."""

    def __init__(self, loop_config: dict[str, Any]):
        import ray.train

        from transformers.utils import logging as hf_logging

        # A "Writing model shards" bar per export (and per on-policy weight sync) says nothing the
        # progress lines do not.
        hf_logging.disable_progress_bar()
        self.cfg: Config = validate_tree(yaml.safe_load(loop_config["config"]), "run config")
        self.method: TrainingMethod = loop_config["method"]
        self.total_steps: int = loop_config["total_steps"]
        self.gate: EvaluationGate | None = loop_config.get("gate")
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device() if self.cfg.train.use_gpu else torch.device("cpu")
        if self.cfg.train.cpus_per_worker:
            # torch's intra-op threads = this worker's CPU share (train/run.py resolves `auto`), whatever
            # OMP_NUM_THREADS the process started with.
            torch.set_num_threads(max(1, int(self.cfg.train.cpus_per_worker)))
        self._setup_model()
        self._setup_optimizer()
        self._restore()
        cfg = self.cfg
        self.columns = self.objective.columns()
        self.val_batches = ValidationBatches(ray.train.get_dataset_shard("val"), cfg.train.batch_size, self.columns)
        self.stream: Iterator[dict[str, Any]] = micro_batches(
            ray.train.get_dataset_shard("train"), cfg, self.tokenizer.pad_token_id, self.state, self.columns)
        self.plan_metrics = {"trainable_parameters": self.plan.trainable, "total_parameters": self.plan.total,
                             "trainable_fraction": self.plan.fraction, **({"qat_layers": self.qat_layers} if self.qat_layers else {}),
                             **self.plan_extra}
        self.t_last, self.tokens_since = time.perf_counter(), 0.0
        if cfg.train.trace_rows:
            self._trace_identity()

    # -- setup ------------------------------------------------------------------------------

    def _setup_model(self) -> None:
        cfg = self.cfg
        self.plan_extra: dict[str, int] = {}  # sharded loading: bytes read (max over ranks) and the checkpoint's
        # Same seed on every rank: identical initial weights (LoRA init included) before sharding.
        torch.manual_seed(cfg.seed)
        model_dir = resolve_model_dir(cfg.model.path).resolve()
        self.tokenizer = load_tokenizer(model_dir)
        # fp32 master weights in every mode but bf16-pure; the mixed modes cast for compute only.
        pending = self._meta_model(model_dir)
        model = pending.model if pending else load_causal_lm(
            model_dir, dtype=weights_dtype(cfg), use_gpu=cfg.train.use_gpu,
            attn_implementation=self.method.attn_implementation(cfg))
        experts, choice = None, None
        if cfg.method.kind == "esft":
            import ray.train

            experts, choice = choose_experts(cfg, model, self.tokenizer.pad_token_id, self.device, self.rank,
                                              resuming=ray.train.get_checkpoint() is not None)
        model, self.plan = apply_method(model, cfg.method, experts)
        self.qat_layers = 0
        if cfg.train.qat:
            from distillery.models.quant import apply_qat

            # Before wrapping: the swap changes classes, not parameters, so FSDP sees the same tensors.
            self.qat_layers = apply_qat(model)
            self.say(f"qat: {self.qat_layers} linear layers fake-quantise weights (int8 per channel) and inputs (int8 per token)")
        if self.rank == 0:
            record_choice(cfg, choice, self.plan.fraction)
        if cfg.train.activation_checkpointing:
            enable_activation_checkpointing(model)  # before wrapping: it patches the decoder layers
        self.objective = self.method.build_objective(cfg, self.tokenizer, model, self.device)
        if pending is None:
            model.to(self.device)
        self.precision = Precision(cfg, self.device)
        self._say_memory_plan(model)
        self.model = wrap_model(model, cfg, self.device, self.world)
        if pending is not None:
            self._report_load(pending.materialize(shard_device(cfg, self.device)))
        self.objective.after_wrap(self.model)
        self.model.train()
        # ESFT trains slices of the fused expert tensors: the rest must not move (models/experts.py).
        self.slices = ExpertSlices(self.plan.expert_masks, cfg.train.weight_decay) if self.plan.expert_masks else None
        if self.slices:
            self.slices.bind(self.model)

    def _meta_model(self, model_dir):
        """The student on the meta device for sharded loading (train/sharded_load.py), or None (with
        a line saying why when FSDP runs on several workers) for the whole-model load."""
        from distillery.models.load import torch_dtype
        from distillery.train.sharded_load import build_on_meta, fallback_reason

        reason = fallback_reason(self.cfg, model_dir, self.world)
        if reason is None:
            built = build_on_meta(model_dir, torch_dtype(weights_dtype(self.cfg), self.cfg.train.use_gpu),
                                  attn_implementation=self.method.attn_implementation(self.cfg))
            if not isinstance(built, str):
                return built
            reason = built
        if self.cfg.train.strategy == "fsdp" and self.world > 1:
            self.say(f"whole-model load on every worker (no sharded loading): {reason}")
        return None

    def _report_load(self, stats) -> None:
        """Say what each rank read of the checkpoint (all ranks' bytes gathered to rank 0's line)."""
        per_rank = torch.zeros(self.world, dtype=torch.float64, device=self.device)
        per_rank[self.rank] = stats.bytes_read
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(per_rank)
        read = [int(b) for b in per_rank.tolist()]
        self.say(f"sharded load: {self.world} workers read {', '.join(f'{b / 2**20:.2f}' for b in read)} MiB "
                 f"of a {stats.checkpoint_bytes / 2**20:.2f} MiB checkpoint")
        self.plan_extra = {"load_bytes_read_max": max(read), "checkpoint_bytes": stats.checkpoint_bytes}

    def _say_memory_plan(self, model) -> None:
        """Two lines (rank 0) with the memory plan per worker (train/memory_plan.py)."""
        from distillery.train.memory_plan import plan_memory

        if self.rank != 0:
            return
        cfg = self.cfg
        weight_bytes = 2 if weights_dtype(cfg) == "bfloat16" else 4
        compute_bytes = self.precision.compute_dtype.itemsize if self.precision.compute_dtype else weight_bytes
        shards = self.world if cfg.train.strategy == "fsdp" else 1
        mem = plan_memory(unwrap(model).config, self.plan.total, self.plan.trainable, weight_bytes, compute_bytes,
                          cfg.train.batch_size, cfg.data.max_length, shards)
        for line in mem.describe(f"{cfg.train.batch_size}x{cfg.data.max_length}", cfg.train.activation_checkpointing,
                                 cfg.train.cpu_offload):
            self.say(line)

    def _setup_optimizer(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        groups = self.slices.param_groups(self.params) if self.slices else [{"params": self.params}]
        self.optimizer = build_optimizer(groups, self.cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.cfg, self.total_steps))
        modules = self.objective.extra_modules()
        self.extra = [p for m in modules for p in m.parameters()]
        self.extra_state = None
        if self.extra:  # same AdamW settings and schedule, a separate optimiser (train/checkpoint.py, ExtraState)
            opt = build_optimizer([{"params": self.extra}], self.cfg)
            self.extra_state = ExtraState(modules, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.cfg, self.total_steps)))
        self.optimizers = [self.optimizer] + ([self.extra_state.optimizer] if self.extra_state else [])
        self.schedulers = [self.scheduler] + ([self.extra_state.scheduler] if self.extra_state else [])

    def _zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def _restore(self) -> None:
        import ray.train

        self.state = TrainState()
        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as d:
                self.state = load_checkpoint(d, self.model, self.optimizer, self.scheduler, self.rank, self.extra_state)
            self.say(f"resumed from checkpoint at step {self.state.step} (epoch {self.state.epoch}, "
                     f"micro-batch {self.state.micro_in_epoch})")
        self.log = MetricsLog(self.cfg, self.rank, self.state.step)
        if self.state.step == 0:
            self.say(f"{self.plan.describe()}; {self.world} worker(s) of {torch.get_num_threads()} thread(s), strategy "
                     f"{self.cfg.train.strategy}, precision {self.precision.mode}, {self.total_steps} steps")

    def _trace_identity(self) -> None:
        import ray

        d = os.path.join(self.cfg.output_dir, "trace")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"pid_rank{self.rank}"), "w") as f:
            f.write(str(os.getpid()))
        with open(os.path.join(d, f"node_rank{self.rank}"), "w") as f:
            f.write(ray.get_runtime_context().get_node_id())

    def _trace_rows(self, batch: dict[str, Any]) -> None:
        if self.cfg.train.trace_rows:
            record = {"step": self.state.step + 1, "epoch": self.state.epoch,
                      "row_ids": list(map(str, batch.get("row_id", [])))}
            with open(os.path.join(self.cfg.output_dir, "trace", f"rows_rank{self.rank}.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def say(self, message: str) -> None:
        """A progress line from rank 0, prefixed with the method's name."""
        if self.rank == 0:
            say(f"[{self.method.name}] {message}")

    # -- one optimiser step -------------------------------------------------------------------

    def train_step(self) -> dict[str, Any] | None:
        """Accumulate `grad_accum` micro-batches and step the optimiser; the step's metrics record,
        or None when the data ran out first (the partial step is dropped)."""
        cfg, state, model, accum = self.cfg, self.state, self.model, self.cfg.train.grad_accum
        step_metrics: dict[str, float] = {}
        loss_sum, tokens = 0.0, 0.0
        self.objective.set_step(state.step, self.total_steps)
        for micro in range(accum):
            try:
                batch = to_device(next(self.stream), self.device)
            except StopIteration:
                self._zero_grad()
                return None
            state.micro_in_epoch += 1
            self._trace_rows(batch)
            sync = micro == accum - 1
            if cfg.train.strategy == "fsdp":
                model.set_requires_gradient_sync(sync)
            with model.no_sync() if (not sync and hasattr(model, "no_sync")) else contextlib.nullcontext():
                with self.precision.autocast():
                    loss, m = self.objective(model, batch)
                self.precision.backward(loss / accum)
            loss_sum += loss.item()
            tokens += float(batch["attention_mask"].sum().item())
            for k, v in m.items():
                step_metrics[k] = step_metrics.get(k, 0.0) + v / accum
        # fp16: true gradient values before anything reads or adds to them (EWC, clipping).
        self.precision.unscale(self.optimizers)
        step_metrics.update(self.objective.after_backward(model))
        if self.slices:
            self.slices.mask_grads()
        sync_extra_grads(self.extra, self.world)
        grad_norm = clip_grads(self.params, cfg.train.max_grad_norm)
        clip_grads(self.extra, cfg.train.max_grad_norm)
        loss = loss_sum / accum
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        # fp16: gradients that overflowed the loss scale with a finite loss are the scaler's to handle
        # (skip the step, lower the scale), not a divergence.
        overflow = self.precision.scaler is not None and math.isfinite(loss) and not finite
        # One all-reduce per step carries the metrics and whether any worker saw a non-finite value,
        # so every worker skips (or takes) the same steps.
        sums = all_reduce_sums({"loss": loss, "tokens": tokens, "nonfinite": float(not finite and not overflow),
                                "overflow": float(overflow), **step_metrics}, self.device)
        skipped, overflowed = sums.pop("nonfinite") > 0, sums.pop("overflow") > 0
        if skipped or overflowed:
            self._zero_grad()  # no update from this step: the weights stay finite
            state.nonfinite_in_row += int(skipped)
        else:
            if self.slices:
                self.slices.decay(self.scheduler.get_last_lr()[0])
            self.precision.step(self.optimizers)
            self._zero_grad()
            state.nonfinite_in_row = 0
        self.precision.update()
        for sched in self.schedulers:
            sched.step()
        state.step += 1
        record = self._record(sums, grad_norm, skipped or overflowed)
        if skipped:
            self._check_nonfinite(sums["loss"] / self.world, grad_norm)
        return record

    def _check_nonfinite(self, loss: float, grad_norm: float) -> None:
        """Say that a step was skipped; stop the run (nothing exported) after `max_nonfinite_steps` in a row."""
        n, limit = self.state.nonfinite_in_row, self.cfg.train.max_nonfinite_steps
        message = f"step {self.state.step}: non-finite loss ({loss}) or gradient norm ({grad_norm})"
        if n >= limit:
            raise FloatingPointError(
                f"{message}, {n} steps in a row (train.max_nonfinite_steps {limit}): the run stops and exports nothing. "
                f"Lower train.lr, check the data and loss settings, or resume from the last checkpoint."
            )
        self.say(f"{message}: step skipped, no update ({n} of {limit} in a row)")

    def _record(self, sums: dict[str, float], grad_norm: float, skipped: bool) -> dict[str, Any]:
        """The step's all-reduced metrics, averaged over workers, written to metrics.jsonl and printed now and then."""
        self.tokens_since += sums["tokens"]
        now = time.perf_counter()
        record = {
            "step": self.state.step,
            "time": time.time(),
            "tokens": int(sums["tokens"]),
            "loss": sums["loss"] / self.world,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_s": self.tokens_since / max(now - self.t_last, 1e-9),
            **{k: v / self.world for k, v in sums.items() if k not in ("loss", "tokens")},
            **({"skipped": 1} if skipped else {}),
            **({"grad_scale": self.precision.scale()} if self.precision.scaler else {}),
        }
        self.t_last, self.tokens_since = now, 0.0
        self.log.write(record)
        step = self.state.step
        if step == 1 or step % 10 == 0 or step == self.total_steps:
            self.say(f"step {step}/{self.total_steps} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                     f"grad_norm {grad_norm:.3f} tokens/s {record['tokens_per_s']:.0f}")
        return record

    # -- evaluation, checkpoints and reports ------------------------------------------------------

    def run_eval(self) -> None:
        """Evaluate, log, and track the best val loss (early stopping's patience counts from it)."""
        state = self.state
        val = evaluate(self.model, self.objective, self.val_batches, self.cfg, self.tokenizer.pad_token_id, self.device, self.precision)
        state.last_val, state.evaluations = val, state.evaluations + 1
        self.log.write({"step": state.step, **val})
        self.say(f"step {state.step} " + " ".join(f"{k} {v:.4f}" for k, v in val.items()))
        if val["val_loss"] < state.best_val - 1e-6:
            state.best_val, state.bad_evals = val["val_loss"], 0
        else:
            state.bad_evals += 1

    def report(self, metrics: dict[str, Any], with_checkpoint: bool) -> None:
        """Report to Ray Train (Tune sees it in trials), with a checkpoint when asked."""
        import ray.train
        from ray.train import Checkpoint

        state = self.state
        metrics = {**metrics, **(state.last_val or {}), **self.plan_metrics, "step": state.step, "epoch": state.epoch,
                   "evaluation": state.evaluations}
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(d, self.model, self.optimizer, self.scheduler, state, self.rank, self.extra_state)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))

    def _early_stop(self) -> bool:
        patience = self.cfg.train.early_stopping_patience
        if patience and self.state.bad_evals >= patience:
            self.say(f"early stop at step {self.state.step}: val loss did not improve in {patience} evaluations")
            return True
        return False

    # -- the run ----------------------------------------------------------------------------------

    def run(self) -> None:
        """Train to `total_steps` (or early stop), evaluate once more if needed, export, report; the
        objective is closed however the run ends."""
        try:
            self._run()
        finally:
            self.objective.close()

    def _run(self) -> None:
        cfg, state = self.cfg, self.state
        evaluated_at = -1
        while state.step < self.total_steps:
            record = self.train_step()
            if record is None or state.step >= self.total_steps:
                break  # the final evaluation and checkpoint follow the loop
            do_eval = bool(cfg.train.eval_every) and state.step % cfg.train.eval_every == 0
            do_ckpt = bool(cfg.train.checkpoint_every) and state.step % cfg.train.checkpoint_every == 0
            if do_eval:
                self.run_eval()
                evaluated_at = state.step
                if self._early_stop():
                    break
            if do_eval or do_ckpt:
                self.report(record, with_checkpoint=do_ckpt)
                if self.gate and do_eval and self.gate.should_stop(state.evaluations, state.step):
                    self.say(f"stopped by the scheduler at step {state.step}")
                    return
        if evaluated_at != state.step:
            self.run_eval()
        export_model(self.model, self.tokenizer, cfg, self.rank, self.plan)
        self.report({"finished": 1}, with_checkpoint=True)  # not "done": Tune sets that on trials it stops too
        self.say(f"done at step {state.step}: model in {os.path.join(cfg.output_dir, 'model')}")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point Ray Train runs on every worker. `loop_config`: config (YAML), method
    (a TrainingMethod), total_steps, gate (an EvaluationGate or None)."""
    Worker(loop_config).run()
