"""Elastic weight consolidation: learn new data without forgetting a previous task.

The diagonal (empirical) Fisher information F of the starting weights θ* is estimated on
examples of the previous task; training then adds  λ/2 · Σ_i F_i (θ_i − θ*_i)²  to the loss,
which holds the weights that mattered for the old task near their old values. F and θ* are
stored with the run (`ewc.safetensors`) so a resumed run uses the same ones.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from distillery.data.splits import IGNORE_INDEX


def _unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def previous_rows(cfg) -> list[dict]:
    """The first `ewc.samples` training rows of the previous task's prepared data."""
    from distillery.config import ConfigError
    from distillery.data.splits import head_rows, split_dir

    if not cfg.train.ewc.previous:
        raise ConfigError("train.ewc.previous: set the prepared data directory of the previous task (EWC needs it)")
    d = split_dir(cfg.train.ewc.previous, "train")
    if not os.path.isdir(d):
        raise ConfigError(f"train.ewc.previous: no prepared train split at '{d}'")
    return head_rows(cfg.train.ewc.previous, "train", ["input_ids", "labels"], max_rows=cfg.train.ewc.samples)


def estimate_fisher(model, rows: list[dict], pad_id: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-parameter mean squared gradient of the response NLL over `rows` (one example at a time).

    Returns (fisher, anchor), each name -> tensor shaped like the trainable parameter.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = model.training
    model.eval()
    for row in rows:
        ids = torch.tensor([row["input_ids"]], dtype=torch.long)
        labels = torch.tensor([row["labels"]], dtype=torch.long)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        loss = F.cross_entropy(logits.float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX)
        loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach().float() ** 2 / len(rows)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    anchor = {n: p.detach().float().clone() for n, p in params.items()}
    return fisher, anchor


class EwcPenalty:
    def __init__(self, lam: float, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor]):
        self.lam = lam
        self.fisher = fisher
        self.anchor = anchor

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        tensors = {f"fisher.{n}": t.contiguous() for n, t in self.fisher.items()}
        tensors.update({f"anchor.{n}": t.contiguous() for n, t in self.anchor.items()})
        tmp = path + ".tmp"
        save_file(tensors, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, lam: float, path: str) -> "EwcPenalty":
        from safetensors.torch import load_file

        t = load_file(path)
        fisher = {k[len("fisher.") :]: v for k, v in t.items() if k.startswith("fisher.")}
        anchor = {k[len("anchor.") :]: v for k, v in t.items() if k.startswith("anchor.")}
        return cls(lam, fisher, anchor)

    def shard_like(self, model) -> None:
        """After FSDP2 sharding, lay F and θ* out like their (DTensor) parameters."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        for n, p in _unwrap(model).named_parameters():
            if n in self.fisher and isinstance(p, DTensor):
                self.fisher[n] = distribute_tensor(self.fisher[n].to(p.dtype), p.device_mesh, p.placements)
                self.anchor[n] = distribute_tensor(self.anchor[n].to(p.dtype), p.device_mesh, p.placements)

    @torch.no_grad()
    def add_grad(self, model) -> None:
        """Add the penalty's gradient λ·F·(θ − θ*) to each parameter's gradient, after backward.

        Applied outside autograd because FSDP2 swaps parameters between sharded DTensors and
        unsharded tensors during forward/backward; after backward every parameter is back in its
        sharded form, laid out like F and θ* (`shard_like`), so this is local arithmetic only.
        """
        for n, p in _unwrap(model).named_parameters():
            if n not in self.fisher:
                continue
            g = self.lam * self.fisher[n] * (p.detach() - self.anchor[n])
            p.grad = g.to(p.dtype) if p.grad is None else p.grad + g.to(p.grad.dtype)

    @torch.no_grad()
    def penalty(self, model) -> torch.Tensor:
        """λ/2 · Σ F (θ − θ*)², summed over every rank's shards (a collective under FSDP2)."""
        total = torch.zeros((), dtype=torch.float64)
        for n, p in _unwrap(model).named_parameters():
            if n not in self.fisher:
                continue
            term = (self.fisher[n] * (p.detach() - self.anchor[n]) ** 2).sum()
            if hasattr(term, "full_tensor"):  # a sharded sum: reduce across ranks
                term = term.full_tensor()
            total += term.double().cpu()
        return 0.5 * self.lam * total
