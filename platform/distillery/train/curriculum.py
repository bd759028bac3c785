"""Curriculum ordering (`train.curriculum`): training rows from easy to hard, the same order on every attempt.

Each training row gets a difficulty: its length in tokens (`by: length`), or the teacher's mean
negative log-likelihood of its response tokens (`by: teacher_loss`: what the teacher itself finds
hard). The rows are cut into `stages` equal-count groups of increasing difficulty; within a group
they keep an order hashed from the row id and seed, so a group is not sorted by length (which
would fill batches with same-length rows). Every epoch runs the groups in order. The order is a
pure function of the data, the teacher and the seed, so a resumed run skips exactly the
micro-batches it already trained on (train/batches.py).

Teacher losses are scored once (Ray Data, the teacher on each batch) and kept beside the prepared
data, keyed by the teacher's content hash and the data fingerprint:
`<prepared>/curriculum/<teacher hash>-<fingerprint>.parquet`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from distillery.config import Config
from distillery.data.mix import unit_hash
from distillery.data.splits import IGNORE_INDEX, load_manifest, split_dir

RANK = "_curriculum_rank"


def row_lengths(prepared: str) -> dict[str, float]:
    """{row_id: tokens} of the training split (read directly: two small columns)."""
    import pyarrow.parquet as pq

    out: dict[str, float] = {}
    d = split_dir(prepared, "train")
    for name in sorted(os.listdir(d)):
        if name.endswith(".parquet"):
            t = pq.read_table(os.path.join(d, name), columns=["row_id", "num_tokens"])
            out.update(zip(t["row_id"].to_pylist(), map(float, t["num_tokens"].to_pylist())))
    return out


class TeacherLoss:
    """Ray Data actor: each row's mean negative log-likelihood of its response tokens under the
    teacher (several teachers: under their weighted mixture, -log Σ w_i p_i)."""

    def __init__(self, teachers: list[tuple[str, float]], use_gpu: bool):
        import torch

        from distillery.models.load import load_causal_lm, resolve_model_dir

        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.models = [load_causal_lm(resolve_model_dir(p), dtype="bfloat16" if use_gpu else "float32").eval().to(self.device)
                       for p, _ in teachers]
        self.log_w = torch.log(torch.tensor([w for _, w in teachers], device=self.device))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        from distillery.train.collate import collate

        b = collate(batch, pad_id=0)
        ids, mask, labels = (b[k].to(self.device) for k in ("input_ids", "attention_mask", "labels"))
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        safe = targets.clamp_min(0).unsqueeze(-1)
        with torch.no_grad():
            per_teacher = [torch.log_softmax(m(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float(), -1)
                           .gather(-1, safe).squeeze(-1) for m in self.models]  # [B, T-1] each
            logp = torch.logsumexp(torch.stack(per_teacher) + self.log_w.view(-1, 1, 1), 0)
            nll = -(logp * keep).sum(1) / keep.sum(1).clamp_min(1)
        return {"row_id": batch["row_id"], "difficulty": nll.cpu().numpy().astype(np.float64)}


def teacher_losses(cfg: Config, teacher_hash: str, log=print) -> dict[str, float]:
    """{row_id: teacher loss} of the training split: from the stored scores when the data and
    teacher match, else scored now and stored (`<prepared>/curriculum/<hash>.parquet`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distillery.data.splits import read_split

    fingerprint = load_manifest(cfg.prepared_dir).get("fingerprint", "")
    path = os.path.join(cfg.prepared_dir, "curriculum", f"{teacher_hash[:16]}-{fingerprint[:16]}.parquet")
    if os.path.isfile(path):
        t = pq.read_table(path)
        return dict(zip(t["row_id"].to_pylist(), t["difficulty"].to_pylist()))
    log(f"curriculum: scoring the training rows with the teacher (mean loss per response, once; kept in {os.path.dirname(path)})")
    ds = read_split(cfg.prepared_dir, "train", ["row_id", "input_ids", "labels"]).map_batches(
        TeacherLoss, fn_constructor_kwargs={"teachers": cfg.model.teacher_specs, "use_gpu": cfg.train.use_gpu},
        batch_size=cfg.distill.cache_batch_size, batch_format="numpy", concurrency=1,
        **({"num_gpus": 1} if cfg.train.use_gpu else {}))
    rows = ds.take_all()
    table = pa.table({"row_id": [r["row_id"] for r in rows], "difficulty": [float(r["difficulty"]) for r in rows]})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path + ".tmp")
    os.replace(path + ".tmp", path)
    return dict(zip(table["row_id"].to_pylist(), table["difficulty"].to_pylist()))


def curriculum_ranks(difficulty: dict[str, float], stages: int, seed: int) -> tuple[dict[str, int], list[float]]:
    """({row_id: position in the training order}, the upper difficulty bound of each stage).

    Rows sorted by difficulty (ties by row id) are cut into `stages` equal-count groups; within a
    group the order is a hash of seed and row id."""
    by_difficulty = sorted(difficulty, key=lambda r: (difficulty[r], r))
    n = len(by_difficulty)
    stage_of = {r: i * stages // n for i, r in enumerate(by_difficulty)}
    order = sorted(by_difficulty, key=lambda r: (stage_of[r], unit_hash("curriculum", seed, r)))
    bounds = [float("-inf")] * stages
    for r in by_difficulty:
        bounds[stage_of[r]] = difficulty[r]  # ascending: the last row of a stage is its bound
    return {r: i for i, r in enumerate(order)}, bounds


def _with_rank(batch: dict[str, Any], ranks: dict[str, int]) -> dict[str, Any]:
    batch[RANK] = np.array([ranks[r] for r in batch["row_id"]], dtype=np.int64)
    return batch


def order_by_curriculum(ds, ranks: dict[str, int]):
    """The training dataset sorted into curriculum order (the rank column dropped again)."""
    import ray

    ref = ray.put(ranks)  # one copy in the object store, not one per task

    def add(batch, ranks_ref=ref):
        return _with_rank(batch, ray.get(ranks_ref))

    return ds.map_batches(add, batch_format="numpy").sort(RANK).drop_columns([RANK])


def plan_curriculum(cfg: Config, teacher_hash: str | None, log=print) -> tuple[dict[str, int], dict[str, Any]] | None:
    """The curriculum order of this run and its summary (written to `<output_dir>/curriculum.json`),
    or None without `train.curriculum`."""
    cur = cfg.train.curriculum
    if cur is None:
        return None
    difficulty = row_lengths(cfg.prepared_dir) if cur.by == "length" else teacher_losses(cfg, teacher_hash or "", log)
    ranks, bounds = curriculum_ranks(difficulty, cur.stages, cfg.seed)
    unit = "tokens" if cur.by == "length" else "nats"
    summary = {"by": cur.by, "stages": cur.stages, "rows": len(ranks), "stage_upper_bounds": bounds}
    log(f"curriculum: {len(ranks):,} training rows in {cur.stages} stage(s) by {cur.by}, easy to hard "
        f"(upper bounds {', '.join(f'{b:.3g}' for b in bounds)} {unit})")
    return ranks, summary
