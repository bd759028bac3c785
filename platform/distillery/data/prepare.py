"""`distillery prepare CONFIG`: corpus files -> training-ready Parquet splits, streaming on Ray Data.

    distillery prepare jobs/prepare.yaml
    RAY_AUTH_MODE=token ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml \\
        -- python -m distillery prepare jobs/prepare.yaml

Three Ray Data passes; the driver only ever holds file lists, counts and the uids of duplicates:

1. **ingest** (`ingest`, one task per file chunk): read with file and line, validate, normalise (NFC,
   whitespace), render through the chat template, tokenise, filter by length, compute the dedupe
   keys (exact hash + MinHash LSH bands). Bad rows go to `quarantine/` with reason, file and line.
   Output: the chunk's staged Parquet file, and its (key, uid, signature) rows bucketed by key
   into files.
2. **dedupe** (`duplicates`, one task per key bucket): rows sharing a key are compared; each task
   returns the rows that copy (exactly, or above the MinHash threshold) an earlier row.
3. **finalise** (`finalize`, one task per staged file): drop duplicates, mix sources to their weights,
   split by a hash of the row, augment training rows (synonyms, clause reordering, back-translation),
   cut to `max_length` (truncation, sliding windows, packing), write `<split>/*.parquet` and stream
   back per-batch counts and digests (rows, tokens, the fingerprint's order-independent sums).

Then the manifest is written and the temporary directory is renamed into place
(`data.prepared`), so readers never see half a result.
This module is that driver: one function per step, the counts between them, the fingerprint and
the manifest; the tasks get their settings as frozen dataclasses (`context`).
For a multi-node cluster `data.prepared` must be on shared storage, as tasks write beside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from distillery.config import AugmentConfig, BackTranslateConfig, Config, ConfigError, DataConfig
from distillery.data.augment import load_synonyms
from distillery.data.context import AugmentSettings, FinalizeContext, IngestContext, SynonymSettings
from distillery.data.duplicates import find_all_duplicates
from distillery.data.finalize import (
    SplitCounts, finalize_file, finalize_translated, select_for_back_translation,
)
from distillery.data.ingest import ingest_chunk, source_of_uid
from distillery.data.mix import keep_rates, ratios
from distillery.data.read import discover_files, file_kind, index_file
from distillery.data.shared import tokenizer_dir
from distillery.data.splits import MANIFEST, SPLITS, read_parquet
from distillery.files import install_dir, removed_on_failure
from distillery.registry.record import artifact_hashes, finish_stage, new_record


class Progress:
    """The default `log` of `prepare`: each line with the seconds since the start."""

    def __init__(self):
        self.t0 = time.time()

    def __call__(self, text: str) -> None:
        print(f"prepare: {text}  ({time.time() - self.t0:.1f}s)", flush=True)


@dataclass
class Corpus:
    """The corpus as the driver holds it: files and chunk descriptors, never rows."""

    chunks: list[dict]
    """One descriptor per ingest task: source, format, file, byte range, first line."""
    files: list[dict]
    """Every source file (source, file, bytes, sha256), for the manifest."""
    size: int
    """Bytes of all the files (as the filesystem lists them): sizes the chunks and key buckets."""
    cpus: int
    """Logical CPUs of the cluster."""


@dataclass
class IngestStats:
    """The ingest tasks' stats files, added up."""

    per_source: dict[str, Counter]
    """{source: counts}: read, valid, quarantine:<reason>, too_short, too_long, rows, tokens."""
    total: Counter
    """The counts of all sources together."""
    quarantine: dict[str, int]
    """{reason: rows quarantined}, sorted by reason."""
    identity: dict | None
    """The tokenizer identity the tasks report (`shared.tokenizer_identity`)."""


@dataclass
class Duplicates:
    """What dedupe found; the driver holds only the duplicates' uids."""

    uids: dict[int, str]
    """{uid: 'exact' | 'near'} of every row removed."""
    counts: Counter
    """Rows removed by kind."""
    by_source: dict[str, Counter]
    """Rows removed by source and kind."""


def prepare(cfg: Config, log=None) -> dict:
    """Run the three passes and write `cfg.prepared_dir` atomically; returns the manifest.

    Needs a connected Ray (`run_prepare` starts or joins one); `log` gets the progress lines.
    """
    import ray.data

    log = log or Progress()
    t0 = time.time()
    data = cfg.data
    names = _source_names(data)
    # The tokenizer is loaded by the tasks that use it, not here: the driver would spend seconds
    # importing torch for nothing but the manifest's tokenizer identity, which the tasks report.
    tok_path = _tokenizer_path(cfg)
    synonyms = _synonym_settings(data.augment)
    final = cfg.prepared_dir.rstrip("/")
    tmp = _fresh_tmp(final)

    with removed_on_failure(tmp):
        corpus = _discover(data, log)
        ingest_ctx = _ingest_context(cfg, tok_path, tmp, corpus)
        ray.data.DataContext.get_current().enable_progress_bars = False
        _run_ingest(ingest_ctx, corpus.chunks)
        stats = _read_stats(tmp, names)
        _log_ingest(stats, corpus, log)
        _check_sources(data, names, stats, tmp)

        dups = _dedupe(ingest_ctx, data, names, log)
        kept_rows, rates = _mix_rates(data, names, stats, dups)
        balance = _balance_rates(data, names, stats, kept_rows, rates)
        ctx = _finalize_context(ingest_ctx, cfg, dups, rates, balance, synonyms)
        totals = _run_finalize(ctx, data.augment)
        splits, fingerprint = _fingerprint(totals)
        shutil.rmtree(f"{tmp}/_stats", ignore_errors=True)

        mix = _mix_report(data, names, rates, totals)
        accounting = _accounting(names, stats, dups, totals)
        manifest = _manifest(cfg, tok_path, fingerprint, splits, stats, dups, kept_rows, mix, corpus, t0)
        manifest["accounting"] = accounting
        if data.balance is not None:
            manifest["balance"] = _balance_report(data, balance, tmp)
        shutil.rmtree(f"{tmp}/_balance", ignore_errors=True)
        with open(f"{tmp}/{MANIFEST}", "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, ensure_ascii=False)
        _install(tmp, final)
    return manifest


# --------------------------------------------------------------------------- checks before Ray work


def _source_names(data: DataConfig) -> list[str]:
    """The sources' display names; there must be some, and no two alike."""
    if not data.sources:
        raise ConfigError("data.sources: no sources given")
    names = [s.display_name for s in data.sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.sources: source names must be unique to be mixed and reported, got {names}; set `name`")
    return names


def _tokenizer_path(cfg: Config) -> str:
    """`model.tokenizer` or `model.path`, checked to hold a tokenizer (the tasks load it)."""
    path = cfg.model.tokenizer or cfg.model.path
    if path is None:
        raise ConfigError("prepare: set model.path (or model.tokenizer): its tokenizer and chat template render and tokenise the rows")
    try:
        tokenizer_dir(path)
    except FileNotFoundError as e:
        raise ConfigError(f"model.{'tokenizer' if cfg.model.tokenizer else 'path'}: {e}") from None
    return path


def _synonym_settings(aug: AugmentConfig) -> SynonymSettings | None:
    """The synonym groups, read here so that a missing file fails before any task runs."""
    if not aug.synonyms:
        return None
    try:
        return SynonymSettings(groups=load_synonyms(aug.synonyms.path), probability=aug.synonyms.probability)
    except OSError as e:
        raise ConfigError(f"data.augment.synonyms.path: cannot read '{aug.synonyms.path}': {e}") from None


def _fresh_tmp(final: str) -> str:
    """An empty temporary directory beside `final`, with the folders the ingest tasks write into."""
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(f"{tmp}/quarantine", exist_ok=True)
    os.makedirs(f"{tmp}/_stats", exist_ok=True)
    os.makedirs(f"{tmp}/_balance", exist_ok=True)
    return tmp


# --------------------------------------------------------------------------- pass 1: ingest


def _discover(data: DataConfig, log) -> Corpus:
    """The sources' files and their chunks (the driver holds only this list)."""
    import ray

    files = [(i, s, discover_files(s, i)) for i, s in enumerate(data.sources)]
    # Chunks small enough that every CPU gets several (one file must not mean one task), large
    # enough that per-task overhead stays small.
    size = sum(_file_size(f) for _, _, fs in files for f in fs)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    chunk_bytes = int(min(64 << 20, max(256 << 10, size / (8 * cpus))))
    index_remote = ray.remote(num_cpus=1)(index_file)
    refs = [[index_remote.remote(f, chunk_bytes) for f in fs] for _, _, fs in files]
    chunks, source_files = [], []
    for (si, s, fs), rs in zip(files, refs):
        for fi, (f, info) in enumerate(zip(fs, ray.get(rs))):
            source_files.append({"source": s.display_name, "file": f, "bytes": info.size, "sha256": info.sha256})
            for start, end, first_line in info.chunks:
                chunks.append({"source_idx": si, "file_idx": fi, "source": s.display_name, "format": s.format, "file": f,
                               "start": start, "end": end, "first_line": first_line})
    total_bytes = sum(f["bytes"] for f in source_files)
    log(f"found {len(source_files):,} files ({total_bytes / 1e6:,.1f} MB) in {len(data.sources)} sources; {len(chunks):,} chunks")
    if not chunks:
        raise ConfigError("data.sources: every source file is empty")
    return Corpus(chunks=chunks, files=source_files, size=size, cpus=cpus)


def _file_size(path: str) -> int:
    import fsspec.core

    fs, p = fsspec.core.url_to_fs(path)
    return int(fs.size(p) or 0)


def _ingest_context(cfg: Config, tok_path: str, tmp: str, corpus: Corpus) -> IngestContext:
    """The settings of the ingest tasks."""
    data, aug = cfg.data, cfg.data.augment
    return IngestContext(
        tokenizer=tok_path, chat_template=data.chat_template, seed=cfg.seed, tmp=tmp,
        min_length=data.min_length, max_length=data.max_length, window=data.window, packing=data.packing,
        dedupe=data.dedupe,
        # Key buckets of pass 2: at least one per CPU, and about 32 MB of corpus each.
        buckets=int(max(corpus.cpus, min(4096, corpus.size // (32 << 20) + 1))),
        # Augmented copies are made from the rows' messages; nothing else reads them after ingest.
        keep_messages=bool(aug.copies and (aug.synonyms or aug.reorder or aug.back_translate)),
        count_labels=data.balance is not None and data.balance.by == "label",
    )


def _run_ingest(ctx: IngestContext, chunks: list[dict]) -> None:
    """Pass 1: one task per chunk; what it writes stays under `ctx.tmp`."""
    import ray.data

    # Longest chunks first, so the last tasks to start are short ones and no core idles at the end.
    by_size = sorted(chunks, key=lambda c: c["end"] - c["start"] if file_kind(c["file"]) == "jsonl" else 0, reverse=True)
    ingest = ray.data.from_items(by_size, override_num_blocks=len(chunks)).map_batches(
        ingest_chunk, batch_size=1, batch_format="numpy", fn_kwargs={"ctx": ctx})
    with _config_errors_from_tasks():
        for _ in ingest.iter_batches(batch_size=None):
            pass


@contextlib.contextmanager
def _config_errors_from_tasks():
    """Re-raise a ConfigError that a Ray task raised as itself, so the CLI reports it as one.

    Ray Data wraps a task's exception (RayTaskError, UserCodeException); depending on the path
    the original survives as a `cause` or only in the wrapper's text, so both are searched.
    """
    import re

    marker = re.compile(re.escape(f"{ConfigError.__module__}.{ConfigError.__qualname__}: ") + r"(.+)")
    try:
        yield
    except Exception as e:
        seen, err = set(), e
        while err is not None and id(err) not in seen:
            seen.add(id(err))
            if type(err) is ConfigError:  # Ray's wrappers subclass it too, with the traceback as text
                raise ConfigError(str(err)) from None
            found = marker.search(str(err))
            if found:
                raise ConfigError(found.group(1).strip()) from None
            err = getattr(err, "cause", None) or err.__cause__
        raise


# --------------------------------------------------------------------------- ingest counts and checks


def _read_stats(tmp: str, names: list[str]) -> IngestStats:
    """Counts from the ingest tasks' stats files."""
    per_source: dict[str, Counter] = {n: Counter() for n in names}
    identity = None
    for name in os.listdir(f"{tmp}/_stats"):
        with open(f"{tmp}/_stats/{name}", encoding="utf-8") as f:
            st = json.load(f)
        identity = st.pop("tokenizer")
        per_source[st.pop("source")].update({k: v for k, v in st.items() if k != "file"})
    total = sum(per_source.values(), Counter())
    quarantine = {k.split(":", 1)[1]: v for k, v in sorted(total.items()) if k.startswith("quarantine:")}
    return IngestStats(per_source=per_source, total=total, quarantine=quarantine, identity=identity)


def _log_ingest(stats: IngestStats, corpus: Corpus, log) -> None:
    """The progress line of pass 1: rows read, valid, quarantined and dropped by length."""
    total, quarantine = stats.total, stats.quarantine
    log(f"read {total['read']:,} rows from {len(corpus.files):,} files: {total['valid']:,} valid, "
        f"{sum(quarantine.values()):,} quarantined {quarantine or ''}; length filter dropped "
        f"{total['too_short']:,} short and {total['too_long']:,} long rows")


def _check_sources(data: DataConfig, names: list[str], stats: IngestStats, tmp: str) -> None:
    """Every source must have valid rows; the error names the reasons and the first bad line."""
    for i, n in enumerate(names):
        counts = stats.per_source[n]
        if counts["valid"] == 0:
            reasons = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("quarantine:")}
            raise ConfigError(
                f"data.sources.{i} ('{n}', format {data.sources[i].format}): no valid rows in {counts['read']:,} "
                f"read; quarantined by reason: {reasons or 'none (the files are empty)'}; see {_first_quarantined(tmp, n)}"
            )


def _first_quarantined(tmp: str, source: str) -> str:
    """Where the source's first quarantined line is, and why, for the error message."""
    qdir = f"{tmp}/quarantine"
    for name in sorted(os.listdir(qdir)):
        with open(f"{qdir}/{name}", encoding="utf-8") as f:
            for line in f:
                q = json.loads(line)
                if q["source"] == source:
                    return f"{q['file']}:{q['line']} ({q['reason']}: {q['detail']})"
    return "the source's files"


# --------------------------------------------------------------------------- pass 2: dedupe, then the mix


def _dedupe(ctx: IngestContext, data: DataConfig, names: list[str], log) -> Duplicates:
    """Pass 2: duplicates (the driver receives only their uids)."""
    dups: dict[int, str] = {}
    if data.dedupe.exact or data.dedupe.near:
        dups = find_all_duplicates(ctx.tmp, ctx.buckets, data.dedupe)
    shutil.rmtree(f"{ctx.tmp}/_keys", ignore_errors=True)
    counts = Counter(dups.values())
    by_source: dict[str, Counter] = {n: Counter() for n in names}
    for u, k in dups.items():
        by_source[names[source_of_uid(u)]][k] += 1
    log(f"dedupe removed {counts['exact']:,} exact and {counts['near']:,} near copies")
    return Duplicates(uids=dups, counts=counts, by_source=by_source)


def _mix_rates(data: DataConfig, names: list[str], stats: IngestStats, dups: Duplicates) -> tuple[dict, dict]:
    """({source: rows kept after dedupe}, {source: keep rate}): keep rates from per-source amounts
    after dedupe (tokens are approximated by the mean row length)."""
    per_source = stats.per_source
    kept_rows = {n: per_source[n]["rows"] - sum(dups.by_source[n].values()) for n in names}
    for i, n in enumerate(names):
        if kept_rows[n] <= 0:
            raise ConfigError(f"data.sources.{i} ('{n}'): no rows left after dedupe: every row copies a row of an earlier source")
    amounts = kept_rows if data.mix_by == "rows" else {
        n: per_source[n]["tokens"] * kept_rows[n] / max(1, per_source[n]["rows"]) for n in names}
    weights = {s.display_name: s.weight for s in data.sources}
    return kept_rows, keep_rates(amounts, weights, upsample=data.mix_strategy == "upsample")


# --------------------------------------------------------------------------- pass 3: finalise


def _balance_rates(data: DataConfig, names: list[str], stats: IngestStats, kept_rows: dict[str, int],
                   rates: dict[str, float]) -> dict[str, float]:
    """{label or source: factor on its training rows' mix rate} that gives every group the same
    number of training rows after the mix ({} without `data.balance`). Label counts come from
    ingest (before dedupe, so the achieved ratios, measured on the written split, can differ a little)."""
    bal = data.balance
    if bal is None:
        return {}
    if bal.by == "source":
        amounts = {n: kept_rows[n] * rates[n] for n in names}
    else:
        amounts: dict[str, float] = {}
        for n in names:
            for key, count in stats.per_source[n].items():
                if key.startswith("label:"):
                    label = key[len("label:"):]
                    amounts[label] = amounts.get(label, 0.0) + count * rates[n]
        if len(amounts) > bal.max_groups:
            raise ConfigError(
                f"data.balance.by: label found {len(amounts):,} distinct labels (max_groups {bal.max_groups}): the rows' responses "
                f"are not class labels; give each row a `label` field, raise data.balance.max_groups, or drop data.balance"
            )
    if len(amounts) < 2:
        raise ConfigError(f"data.balance.by: {bal.by} found {len(amounts)} group(s) in the data; balancing needs at least 2")
    return keep_rates(amounts, {g: 1.0 for g in amounts}, upsample=bal.strategy == "upsample")


def _balance_report(data: DataConfig, balance: dict[str, float], tmp: str) -> dict:
    """The manifest's `balance`: the achieved share of each group among the selected training rows
    (repeats count; augmented copies do not), next to the factor applied to its mix rate."""
    counts: Counter = Counter()
    d = f"{tmp}/_balance"
    for name in os.listdir(d):
        with open(f"{d}/{name}", encoding="utf-8") as f:
            counts.update(json.load(f))
    bal = data.balance
    return {"by": bal.by, "strategy": bal.strategy, "target": {g: round(1 / len(balance), 4) for g in balance},
            "achieved": ratios({g: counts.get(g, 0) for g in balance}), "factor": {g: round(f, 6) for g, f in balance.items()}}


def _finalize_context(ingest: IngestContext, cfg: Config, dups: Duplicates, rates: dict[str, float],
                      balance: dict[str, float], synonyms: SynonymSettings | None) -> FinalizeContext:
    """The settings of the finalise tasks: the ingest ones plus duplicates, keep rates, balance, split and augmentation."""
    data, aug = cfg.data, cfg.data.augment
    return FinalizeContext.extending(
        ingest, dups=np.array(sorted(dups.uids), dtype=np.int64), rates=rates,
        balance_by=data.balance.by if data.balance else None, balance=balance,
        val_fraction=data.val_fraction, test_fraction=data.test_fraction,
        augment=AugmentSettings(copies=aug.copies, seed=cfg.seed if aug.seed is None else aug.seed, synonyms=synonyms,
                                reorder=aug.reorder.probability if aug.reorder else None),
        bt_probability=aug.back_translate.probability if aug.back_translate else 0.0,
    )


def _run_finalize(ctx: FinalizeContext, aug: AugmentConfig) -> dict[tuple[str, str], SplitCounts]:
    """Pass 3 (and the back-translation branch): writes the splits; returns the counts per (split, source)."""
    import ray.data

    stage = f"{ctx.tmp}/_stage"
    staged_files = sorted(f"{stage}/{n}" for n in os.listdir(stage)) if os.path.isdir(stage) else []
    out = ray.data.from_items([{"path": p} for p in staged_files], override_num_blocks=max(1, len(staged_files))).map_batches(
        finalize_file, batch_size=1, batch_format="numpy", fn_kwargs={"ctx": ctx})
    if aug.back_translate and aug.copies:
        out = out.union(_back_translated(ctx, aug.back_translate, staged_files))
    for split in SPLITS:
        os.makedirs(f"{ctx.tmp}/{split}", exist_ok=True)
    # Writing happens inside the map tasks; what streams back is one summary row per (batch, split, source).
    totals: dict[tuple[str, str], SplitCounts] = {}
    for b in out.iter_batches(batch_format="pyarrow", batch_size=None):
        for r in b.to_pylist():
            totals.setdefault((r["split"], r["source"]), SplitCounts()).add(SplitCounts.from_row(r))
    shutil.rmtree(stage, ignore_errors=True)
    return totals


def _back_translated(ctx: FinalizeContext, bt: BackTranslateConfig, staged_files: list[str]):
    """The branch that writes back-translated copies: select, translate (one actor), write."""
    import ray.data

    from distillery.data.back_translate import BackTranslator

    return (read_parquet(staged_files).map_batches(select_for_back_translation, batch_format="pyarrow", fn_kwargs={"ctx": ctx})
            .map_batches(BackTranslator, batch_size=16, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1, batch_format="numpy",
                         **({"num_gpus": bt.num_gpus} if bt.num_gpus else {}),
                         fn_constructor_kwargs={"model": bt.model, "pivot_prompt": bt.pivot_prompt,
                                                "return_prompt": bt.return_prompt, "max_new_tokens": bt.max_new_tokens,
                                                "engine": bt.engine})
            .map_batches(finalize_translated, batch_format="pyarrow", fn_kwargs={"ctx": ctx}))


# --------------------------------------------------------------------------- fingerprint, manifest, install


def _fingerprint(totals: dict[tuple[str, str], SplitCounts]) -> tuple[dict[str, dict], str]:
    """({split: rows, tokens, augmented}, fingerprint): the fingerprint hashes each split's counts
    and order-independent digest, so it names the written content whatever the task order."""
    splits: dict[str, dict] = {}
    fp = hashlib.sha256()
    for split in SPLITS:
        acc = SplitCounts()
        for (sp, _), counts in totals.items():
            if sp == split:
                acc.add(counts)
        splits[split] = {"rows": acc.rows, "tokens": acc.tokens, "augmented": acc.augmented}
        fp.update(f"{split}:{acc.rows}:{acc.tokens}:{acc.h1 % 2**63:016x}{acc.h2 % 2**63:016x};".encode())
    return splits, fp.hexdigest()


def _mix_report(data: DataConfig, names: list[str], rates: dict[str, float],
                totals: dict[tuple[str, str], SplitCounts]) -> dict:
    """The manifest's `mix`: the achieved mix over the training split's non-augmented rows (repeats
    of upsampled rows count), in the unit the weights are in: training is what the mix is for."""
    achieved_amounts = {n: 0 for n in names}
    for (split, source), counts in totals.items():
        if split != "train":
            continue
        for n in source.split("+"):  # packed rows count for their first member's source only
            achieved_amounts[n] += counts.rows - counts.augmented if data.mix_by == "rows" else counts.orig_tokens
            break
    target = ratios({s.display_name: s.weight for s in data.sources})
    achieved = ratios(achieved_amounts)
    return {"by": data.mix_by, "strategy": data.mix_strategy, "target": target, "achieved": achieved,
            "keep_rate": {n: round(r, 6) for n, r in rates.items()}, "amounts": achieved_amounts}


ACCOUNTING = "read = quarantined + too_short + too_long + exact_duplicates + near_duplicates + mixed_out + selected"


def _accounting(names: list[str], stats: IngestStats, dups: Duplicates,
                totals: dict[tuple[str, str], SplitCounts]) -> dict[str, Any]:
    """Every row read is accounted for, per source: quarantined, filtered by length, a duplicate,
    dropped by the mix, or selected (then written, maybe repeated, windowed or augmented). A gap
    means rows were lost without a count: that is an error, not a manifest."""
    selected, mixed_out = Counter(), Counter()
    for (_, source), counts in totals.items():
        selected[source] += counts.selected
        mixed_out[source] += counts.mixed_out
    per_source = {}
    for n in names:
        st, by_kind = stats.per_source[n], dups.by_source[n]
        row = {"read": st["read"], "quarantined": sum(v for k, v in st.items() if k.startswith("quarantine:")),
               "too_short": st["too_short"], "too_long": st["too_long"], "exact_duplicates": by_kind["exact"],
               "near_duplicates": by_kind["near"], "mixed_out": mixed_out[n], "selected": selected[n]}
        accounted = sum(v for k, v in row.items() if k != "read")
        if accounted != row["read"]:
            raise RuntimeError(f"prepare: the rows of source '{n}' do not add up ({ACCOUNTING}): {row}, "
                               f"{row['read'] - accounted:+,} unaccounted; nothing was installed")
        per_source[n] = row
    return {"identity": ACCOUNTING, "per_source": per_source}


def _manifest(cfg: Config, tok_path: str, fingerprint: str, splits: dict[str, dict], stats: IngestStats,
              dups: Duplicates, kept_rows: dict[str, int], mix: dict, corpus: Corpus, t0: float) -> dict:
    """`manifest.json`: what was written, every step's row count, and how it was made."""
    data, total, per_source, dup_counts = cfg.data, stats.total, stats.per_source, dups.counts
    originals = sum(s["rows"] - s["augmented"] for s in splits.values())
    return {
        "fingerprint": fingerprint,
        "tokenizer": str(tok_path),
        "tokenizer_identity": stats.identity,
        "vocab_size": stats.identity["vocab_size"],
        "counts": {s: splits[s]["rows"] for s in SPLITS},
        "splits": splits,
        "steps": {
            "read": total["read"], "valid": total["valid"], "length_filtered": total["rows"],
            "exact_dedupe": total["rows"] - dup_counts["exact"],
            "near_dedupe": total["rows"] - dup_counts["exact"] - dup_counts["near"],
            "mixed": originals if not data.window and not data.packing else None,
            "augmented": sum(s["augmented"] for s in splits.values()),
            "written": sum(s["rows"] for s in splits.values()),
        },
        "filtered": {"too_short": total["too_short"], "too_long": total["too_long"], "exact_duplicates": dup_counts["exact"],
                     "near_duplicates": dup_counts["near"]},
        "quarantine": stats.quarantine,
        "mix": mix,
        "sources": corpus.files,
        "per_source": {n: {"read": per_source[n]["read"], "valid": per_source[n]["valid"], "after_length": per_source[n]["rows"],
                           "after_dedupe": kept_rows[n]} for n in per_source},
        "config": cfg.model_dump(mode="json", by_alias=True),
        "seconds": round(time.time() - t0, 2),
    }


TEACHER_CACHE = "teacher_cache"  # the default teacher cache's place inside the prepared directory (Config.teacher_cache_dir)


def _install(tmp: str, final: str) -> None:
    """Put the new prepared directory in place atomically. A teacher cache in its default place
    inside the old directory moves into the new one: its fingerprint check (distill/teacher_cache.py)
    then decides whether it still fits the data, so re-running an unchanged prepare keeps it."""
    cache = os.path.join(final, TEACHER_CACHE)
    if os.path.isdir(cache):
        os.replace(cache, os.path.join(tmp, TEACHER_CACHE))
    install_dir(tmp, final)


# --------------------------------------------------------------------------- CLI stage


def run_prepare(cfg: Config) -> int:
    """The CLI stage: prepare, print a summary, return an exit code."""
    from distillery.runtime import ensure_ray

    t0 = time.time()
    # Ray Data's per-execution INFO lines would bury the stage's own progress lines.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Logical CPUs: one per core for the map tasks, plus one for the back-translation actor so
    # that it cannot starve the tasks feeding it (docs/architecture.md, "Ray on small machines").
    extra = 1 if cfg.data.augment.back_translate and cfg.data.augment.copies else 0
    started = ensure_ray(num_cpus=max(2, os.cpu_count() or 2) + extra)
    try:
        m = prepare(cfg)
    finally:
        if started:
            import ray

            ray.shutdown()
    s = m["splits"]
    print(f"prepare: splits train {s['train']['rows']:,} rows ({s['train']['augmented']:,} augmented, {s['train']['tokens']:,} tokens), "
          f"val {s['val']['rows']:,}, test {s['test']['rows']:,}")
    print(f"prepare: quarantine by reason {m['quarantine'] or 'none'} -> {cfg.prepared_dir}/quarantine/")
    print(f"prepare: mix ({m['mix']['by']}, {m['mix']['strategy']}) " + ", ".join(
        f"{n} target {m['mix']['target'][n]:.3f} achieved {m['mix']['achieved'][n]:.3f} (rate {m['mix']['keep_rate'][n]:.3g})"
        for n in m["mix"]["target"]))
    if "balance" in m:
        b = m["balance"]
        print(f"prepare: balance by {b['by']} ({b['strategy']}) " + ", ".join(
            f"{g!r} achieved {b['achieved'].get(g, 0):.3f} (x{b['factor'][g]:.3g})" for g in list(b["factor"])[:12])
            + (f", ... {len(b['factor']) - 12} more" if len(b["factor"]) > 12 else "") + f"; target {1 / len(b['factor']):.3f} each")
    print(f"prepare: wrote {cfg.prepared_dir} (fingerprint {m['fingerprint'][:16]}) in {time.time() - t0:.1f}s", flush=True)
    finish_stage(cfg, new_record(
        cfg, "prepare", cfg.prepared_dir,
        inputs={"corpus_files": [{"path": f["file"], "sha256": f["sha256"], "source": f["source"]} for f in m["sources"]]},
        outputs={"data_fingerprint": m["fingerprint"], "artifacts": artifact_hashes(cfg.prepared_dir, ["manifest.json"])},
        metrics={"rows_" + split: c for split, c in m["counts"].items()},
    ))
    return 0
