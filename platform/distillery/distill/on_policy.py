"""On-policy distillation (GKD, arXiv 2306.13649): the student samples, the teacher grades every sampled token.

Per micro-batch, with probability `distill.on_policy.lmbda` (one draw from the seed, the step and
the micro-batch index, so every worker takes the same branch and FSDP's collectives stay in step):

* on-policy: the batch's prompts (each row's tokens before its first target) go to the student's
  vLLM engine (distill/sampler.py); the sampled responses become the targets; the online teacher
  scores them; the loss is alpha · GJSD_β(teacher, student) over the sampled positions at
  distill.temperature (× T²) + (1 − alpha) · CE on the batch's own (labelled) responses;
* otherwise: the plain distillation objective (distill/objective.py) on the batch's responses,
  or with `seq_kd` on responses the teacher samples on its own engine.

Sampling is batched across workers: every worker's prompts of the micro-batch are gathered to rank
0, which makes one engine call (vLLM batches continuously) and broadcasts the responses. Before
sampling, when the engine's weights are `sync_every` or more optimiser steps old, every rank takes
part in gathering the student's full weights (FSDP shards to rank 0) and rank 0 writes them under
`<output_dir>/on_policy/v<step>` (a PEFT adapter for LoRA) and loads them into the engine. The
engine is started by rank 0 (it dies with that worker; a restarted worker group starts a new one,
which gets the restored weights before its first sample).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import time
import uuid
from typing import Any

import torch
import torch.nn.functional as F

from distillery.config import Config
from distillery.data.splits import IGNORE_INDEX
from distillery.distill.losses import distill_loss, entropy_kd_weight, teacher_entropy
from distillery.distill.objective import DistillObjective
from distillery.distill.sampler import engine_dtype, start_engine
from distillery.models.load import resolve_model_dir
from distillery.train.collate import collate
from distillery.train.objective import shift


def on_policy_draw(seed: int, step: int, micro: int, lmbda: float) -> bool:
    """Whether micro-batch `micro` of optimiser step `step` is sampled by the student: the same answer on every rank."""
    if lmbda <= 0:
        return False
    if lmbda >= 1:
        return True
    return random.Random(f"on-policy-{seed}-{step}-{micro}").random() < lmbda


def sample_seed(seed: int, step: int, micro: int, index: int) -> int:
    """The seed of one sampled response (index over the whole gathered batch): reproducible, batching-independent."""
    digest = hashlib.sha256(f"{seed}-{step}-{micro}-{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def prompts_of(batch: dict[str, Any]) -> list[list[int]]:
    """Each row's prompt: its tokens before the first target (labels != -100), padding dropped.
    A row without targets gives its whole (unpadded) sequence."""
    ids, labels, mask = batch["input_ids"].cpu(), batch["labels"].cpu(), batch["attention_mask"].cpu()
    out = []
    for row_ids, row_labels, row_mask in zip(ids, labels, mask):
        n = int(row_mask.sum())
        targets = (row_labels[:n] != IGNORE_INDEX).nonzero()
        end = int(targets[0]) if len(targets) else n
        out.append(row_ids[:end].tolist())
    return out


def sampled_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """Collated prompt + response rows whose targets are the responses (cut at max_length); the shapes of `collate`."""
    rows_ids, rows_labels = [], []
    for p, r in zip(prompts, responses):
        r = r[: max(0, max_length - len(p))]
        rows_ids.append(p + r)
        rows_labels.append([IGNORE_INDEX] * len(p) + r)
    return collate({"input_ids": rows_ids, "labels": rows_labels}, pad_id, max_length)


def response_budgets(prompts: list[list[int]], max_new_tokens: int, max_length: int) -> list[int]:
    """New tokens each prompt may get: max_new_tokens, cut so the sequence fits max_length (0: no room)."""
    return [max(0, min(max_new_tokens, max_length - len(p))) for p in prompts]


class OnPolicyObjective(DistillObjective):
    """`DistillObjective` whose micro-batches are, with probability lmbda, sampled by the student (GKD)."""

    def __init__(self, cfg: Config, tokenizer, student, device: torch.device):
        super().__init__(cfg, tokenizer, student, device)
        self.op = cfg.distill.on_policy
        self.pad_id = tokenizer.pad_token_id
        self.adapter = cfg.method.kind == "lora"
        self.weights_root = os.path.join(cfg.output_dir, "on_policy")
        self.engine = None  # the student's engine (rank 0 only)
        self.teacher_engine = None  # with seq_kd (rank 0 only)
        self.version: int | None = None  # the optimiser step whose weights the engine serves; None: not known
        self.micro = 0
        self.rank, self.world = 0, 1

    # -- loop hooks -------------------------------------------------------------------------

    def after_wrap(self, model) -> None:
        """Start the engines: every rank is here once, after wrapping (torch.distributed is up)."""
        super().after_wrap(model)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.rank != 0:
            return
        cfg, op = self.cfg, self.op
        common = dict(dtype=engine_dtype(cfg.model.dtype, cfg.train.use_gpu), max_model_len=cfg.data.max_length,
                      seed=cfg.seed, use_gpu=cfg.train.use_gpu, cpu_kv_cache_gib=op.cpu_kv_cache_gib,
                      gpu_memory_utilization=op.gpu_memory_utilization)
        t0 = time.perf_counter()
        tag = uuid.uuid4().hex[:8]
        self.engine = start_engine(str(resolve_model_dir(cfg.model.path)), lora_rank=cfg.method.lora.r if self.adapter else None,
                                   name=f"distillery-student-engine-{tag}", **common)
        engines = [self.engine]
        if op.seq_kd:
            teacher_path = str(resolve_model_dir(cfg.model.teacher_specs[0][0]))
            self.teacher_engine = start_engine(teacher_path, name=f"distillery-teacher-engine-{tag}", **common)
            engines.append(self.teacher_engine)
        import ray

        ray.get([e.served_version.remote() for e in engines])  # wait for the engines to start; errors surface here
        from distillery.train.loop import say

        say(f"[distill] on-policy: {len(engines)} sampling engine(s) ready in {time.perf_counter() - t0:.0f}s")

    def set_step(self, step: int, total: int) -> None:
        super().set_step(step, total)
        self.micro = 0
        if self.version is None and step == 0:
            self.version = 0  # a fresh run: the engine started from model.path, the student's own weights

    def close(self) -> None:
        """Stop the engines and remove the weight copies written for them."""
        if self.rank == 0:
            import ray

            for engine in (self.engine, self.teacher_engine):
                if engine is not None:
                    ray.kill(engine)
            self.engine = self.teacher_engine = None
            shutil.rmtree(self.weights_root, ignore_errors=True)

    # -- engine -----------------------------------------------------------------------------

    def _sync(self, model) -> float:
        """Give the engine the student's current weights if they are sync_every or more steps old;
        every rank calls this (the gather is a collective). Returns the seconds it took (0: no sync)."""
        if self.version is not None and self.step - self.version < self.op.sync_every:
            return 0.0
        from distillery.train.checkpoint import save_weights

        t0 = time.perf_counter()
        path = os.path.join(self.weights_root, f"v{self.step}")
        if save_weights(model, path, self.rank):
            import ray

            ray.get(self.engine.load.remote(path, self.step, self.adapter))
            for name in os.listdir(self.weights_root):  # older versions: the engine no longer reads them
                if name != f"v{self.step}":
                    shutil.rmtree(os.path.join(self.weights_root, name), ignore_errors=True)
        self.version = self.step
        return time.perf_counter() - t0

    def _sample(self, engine_attr: str, prompts: list[list[int]]) -> list[list[int]]:
        """Responses to this rank's prompts from one engine call over every rank's prompts."""
        import torch.distributed as dist

        op, max_length = self.op, self.cfg.data.max_length
        gathered = [prompts]
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, prompts)
        flat = [p for part in gathered for p in part]
        result = [None]
        if self.rank == 0:
            budgets = response_budgets(flat, op.max_new_tokens, max_length)
            todo = [i for i, b in enumerate(budgets) if b > 0]
            seeds = [sample_seed(self.cfg.seed, self.step, self.micro, i) for i in todo]
            import ray

            engine = getattr(self, engine_attr)
            outs = ray.get(engine.sample.remote([flat[i] for i in todo], [budgets[i] for i in todo], op.temperature, op.top_p, seeds))
            responses: list[list[int]] = [[] for _ in flat]
            for i, r in zip(todo, outs):
                responses[i] = r
            result = [responses]
        if self.world > 1:
            dist.broadcast_object_list(result, src=0)
        start = sum(len(part) for part in gathered[: self.rank])
        return result[0][start : start + len(prompts)]

    # -- loss -------------------------------------------------------------------------------

    def __call__(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        micro, self.micro = self.micro, self.micro + 1
        on_policy = on_policy_draw(self.cfg.seed, self.step, micro, self.op.lmbda)
        if not on_policy and not self.op.seq_kd:
            loss, metrics = super().__call__(model, batch)
            return loss, {**metrics, "on_policy": 0.0}
        sync_s = self._sync(model) if on_policy else 0.0
        t0 = time.perf_counter()
        prompts = prompts_of(batch)
        responses = self._sample("engine" if on_policy else "teacher_engine", prompts)
        sampled = sampled_batch(prompts, responses, self.pad_id, self.cfg.data.max_length)
        sampled = {k: v.to(self.device) for k, v in sampled.items()}
        timing = {"sample_s": time.perf_counter() - t0, "sync_s": sync_s,
                  "sampled_tokens": float(sum(len(r) for r in responses))}
        if not on_policy:  # seq_kd: plain distillation on the teacher's own responses
            loss, metrics = super().__call__(model, sampled)
            return loss, {**metrics, **timing, "on_policy": 0.0}
        return self._on_policy_loss(model, batch, sampled, timing)

    def _on_policy_loss(self, model, batch, sampled, timing) -> tuple[torch.Tensor, dict[str, float]]:
        """alpha · GJSD_β over the student's sampled tokens + (1 − alpha) · CE on the batch's responses,
        from one student forward over both (stacked): one forward per micro-batch, as FSDP expects."""
        now = self.current()
        teacher, _, _ = self._online_teacher(sampled, False, False, now["temperature"])
        alpha = now["alpha"]
        if self.d.entropy_weighting:
            alpha = entropy_kd_weight(teacher_entropy(teacher, sampled["labels"], self.d.chunk_size), self.vocab, alpha)
        # Whether the data rows join the forward depends on the config alone, never on this rank's
        # batch (the entropy weight differs by rank): every rank runs the same forwards.
        with_data = now["alpha"] < 1 or self.d.entropy_weighting
        rows = stack_padded([sampled, batch] if with_data else [sampled], self.pad_id)
        n = sampled["input_ids"].shape[0]
        aux_kw = {"output_router_logits": True} if self.aux_coef > 0 else {}
        out = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"], use_cache=False, **aux_kw)
        width = sampled["input_ids"].shape[1]  # the teacher's logits are as wide as the sampled rows, not the stack
        res = distill_loss(out.logits[:n, :width], teacher, sampled["labels"], kind="jsd", beta=self.op.beta,
                           temperature=now["temperature"], alpha=1.0, chunk_size=self.d.chunk_size)
        loss = alpha * res.loss
        metrics = {"kd_loss": float(res.kd), "temperature": now["temperature"], "alpha": alpha, "on_policy": 1.0, **timing}
        if with_data:
            logits, targets = shift(out.logits[n:], rows["labels"][n:])
            keep = targets != IGNORE_INDEX
            ce = F.cross_entropy(logits[keep].float(), targets[keep]) if bool(keep.any()) else logits.sum() * 0.0
            loss = loss + (1 - alpha) * ce
            metrics["ce_loss"] = ce.item()
        return self.with_router_loss(loss, out, metrics)


def stack_padded(batches: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Collated batches (input_ids, labels, attention_mask [B_i, T_i]) as one: rows stacked, right-padded to the widest."""
    width = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    return {key: torch.cat([F.pad(b[key], (0, width - b[key].shape[1]), value=value) for b in batches])
            for key, value in fill.items()}


@torch.no_grad()
def sampled_reverse_kl(student, teacher, prompts: list[list[int]], max_new_tokens: int, pad_id: int, eos_id: int | None,
                       seed: int = 0, batch_size: int = 16) -> float:
    """Mean per-token KL(student ‖ teacher) at T = 1 over responses the student samples for `prompts`
    (Hugging Face `generate`, temperature 1): the quantity on-policy distillation with β = 1 lowers,
    measured where the student will actually generate. Both models share a vocabulary."""
    torch.manual_seed(seed)
    total, tokens = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        # Left padding: generation continues every row from its last prompt token.
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        seq = student.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                               max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id)
        new = seq[:, width:]
        valid = torch.ones_like(new, dtype=torch.bool)
        if eos_id is not None:  # tokens after the first stop token are padding
            stop = (new == eos_id).int().cumsum(1)
            valid = (stop == 0) | ((stop == 1) & (new == eos_id))
        full_mask = torch.cat([mask, valid.long()], 1)
        s = F.log_softmax(student(input_ids=seq, attention_mask=full_mask).logits.float(), -1)[:, width - 1 : -1]
        t = F.log_softmax(teacher(input_ids=seq, attention_mask=full_mask).logits.float(), -1)[:, width - 1 : -1]
        kl = (s.exp() * (s - t)).sum(-1)  # (B, new tokens)
        total += float(kl[valid].sum())
        tokens += int(valid.sum())
    return total / max(tokens, 1)
