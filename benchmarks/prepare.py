"""Corpus preparation throughput: `distillery prepare` (Ray Data) vs a plain single-process loop.

    PYTHONPATH=platform python benchmarks/prepare.py [--rows 200000] [--cpus 2] [--repeats 3]

Both sides do the same transforms on the same generated corpus (plain-text and instruction JSONL
with bad rows, exact and near copies): read, validate, normalise, render through the chat template,
tokenise (batches of 1024 on both sides), length filter, exact + MinHash near dedupe, mix, split,
truncate and write Parquet splits. The loop holds its dedupe index in memory and computes each
row's MinHash signature on its own, as such a script would; the pipeline computes signatures for
a whole batch in one set of numpy operations (`dedupe.minhash_batch`, the same signatures). Each side runs in its own subprocess so peak driver RSS (sampled) is its own; Ray's
start-up is reported apart from the pipeline time. Prints a table and writes
benchmarks/results/prepare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from report import paired_ratio, write_result  # same directory

REPO = Path(__file__).resolve().parent.parent
SPEC = dict(arch="llama", layers=1, hidden=32, heads=1, kv_heads=1, intermediate=64)


def generate(work: Path, rows: int) -> dict[str, Path]:
    """70% plain text, 30% instruction rows; ~1% exact copies, ~1% near copies, ~0.5% bad lines."""
    from distillery.demo.corpus import generate_rows

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    paths = {"general": work / "general.jsonl", "domain": work / "domain.jsonl"}
    n_text = int(rows * 0.7)
    recent: list[str] = []
    with open(paths["general"], "w", encoding="utf-8") as f:
        for i in range(n_text):
            r = rng.random()
            if r < 0.005:
                f.write('{"text": "broken\n')
                continue
            if r < 0.015 and recent:
                text = rng.choice(recent)
            elif r < 0.025 and recent:
                text = rng.choice(recent).replace(" ", " also ", 1)
            else:
                text = " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(rng.randint(8, 40)))
                recent = (recent + [text])[-100:]
            f.write(json.dumps({"text": text}) + "\n")
    with open(paths["domain"], "w", encoding="utf-8") as f:
        for i, row in enumerate(generate_rows(rows - n_text, seed=1)):
            row["input"] = (row.get("input", "") + f" #{i}").strip()  # the demo's tasks repeat; keep most rows distinct
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return paths


def config(work: Path, model: Path, paths: dict[str, Path], out: str):
    from distillery.config import validate_tree

    return validate_tree({
        "output_dir": str(work / out), "model": {"path": str(model)},
        "data": {"sources": [{"path": str(paths["general"]), "format": "text", "weight": 7, "name": "general"},
                             {"path": str(paths["domain"]), "format": "instruction", "weight": 3, "name": "domain"}],
                 "max_length": 128, "dedupe": {"exact": True, "near": True, "threshold": 0.85}},
    }, "benchmark")


def plain_loop(cfg) -> dict:
    """The same transforms, one row at a time in one process, with in-memory dedupe."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distillery.data import dedupe as dd
    from distillery.data.mix import keep_rates, unit_hash
    from distillery.data.normalize import content_text, normalize_fields, render, to_messages
    from distillery.data.shared import row_id, row_schema
    from distillery.data.tokenize import encode_batch, load_tokenizer_cached, truncate
    from distillery.data.validate import Invalid, validate

    data = cfg.data
    tok = load_tokenizer_cached(cfg.model.path)
    bands, r_per_band = dd.lsh_params(data.dedupe.threshold, data.dedupe.num_perm)
    kept: list[dict] = []
    quarantine: Counter = Counter()
    seen_exact: set[str] = set()
    buckets: dict[int, list[np.ndarray]] = {}
    read = 0
    for s in data.sources:
        pending: list[dict] = []

        def flush():
            for r, (ids, labels) in zip(pending, encode_batch(tok, [p["prompt"] for p in pending], [p["response"] for p in pending])):
                if len(ids) < data.min_length or truncate(ids, labels, data.max_length) is None:
                    continue
                if r["row_id"] in seen_exact:
                    continue
                seen_exact.add(r["row_id"])
                sig = dd.minhash(r.pop("content"), data.dedupe.num_perm, data.dedupe.shingle, cfg.seed)
                keys = dd.band_keys(sig, bands, r_per_band)
                if any(((np.stack(buckets[k]) == sig).mean(axis=1) >= data.dedupe.threshold).any() for k in keys if k in buckets):
                    continue
                for k in keys:
                    buckets.setdefault(k, []).append(sig)
                kept.append({**r, "input_ids": ids, "labels": labels, "num_tokens": len(ids)})
            pending.clear()

        with open(s.path, "rb") as f:
            for line in f:
                read += 1
                try:
                    obj = json.loads(line.decode("utf-8"))
                    fields = normalize_fields(validate(obj, s.format), s.format)
                except (UnicodeDecodeError, json.JSONDecodeError):
                    quarantine["bad_json"] += 1
                    continue
                except Invalid as e:
                    quarantine[e.reason] += 1
                    continue
                messages = to_messages(fields, s.format)
                prompt, response = render(messages, fields.get("text"), tok, data.chat_template)
                pending.append({"row_id": row_id(prompt, response), "source": s.display_name, "prompt": prompt,
                                "response": response, "content": content_text(messages, fields.get("text")),
                                "augment": "", "label": None, "metadata": None})
                if len(pending) >= 1024:
                    flush()
        flush()
    amounts = Counter(r["source"] for r in kept)
    rates = keep_rates(dict(amounts), {s.display_name: s.weight for s in data.sources})
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for r in kept:
        if unit_hash("mix", cfg.seed, r["row_id"]) >= rates[r["source"]]:
            continue
        u = unit_hash("split", cfg.seed, r["row_id"])
        split = "val" if u < data.val_fraction else "test" if u < data.val_fraction + data.test_fraction else "train"
        r["input_ids"], r["labels"] = truncate(r["input_ids"], r["labels"], data.max_length)
        r["num_tokens"], r["split"] = len(r["input_ids"]), split
        splits[split].append(r)
    out = Path(cfg.prepared_dir)
    for name, rows in splits.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=row_schema(False)), out / name / "part-0.parquet")
    return {"read": read, "written": sum(len(v) for v in splits.values()), "quarantine": dict(quarantine)}


class PeakRss:
    """Samples this process's RSS every 50 ms (ru_maxrss would carry the parent's peak across exec)."""

    def __init__(self):
        import threading

        import psutil

        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.start_rss = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def done(self) -> float:
        self.stop.set()
        self.thread.join()
        return max(self.peak, self.proc.memory_info().rss) / 2**20


def child(mode: str, work: Path, model: Path, paths: dict[str, Path], cpus: int) -> dict:
    rss = PeakRss()
    if mode == "loop":
        t0 = time.perf_counter()
        res = plain_loop(config(work, model, paths, "loop"))
        seconds, startup = time.perf_counter() - t0, 0.0
    else:
        from distillery.data.prepare import prepare
        from distillery.runtime import ensure_ray

        t0 = time.perf_counter()
        ensure_ray(num_cpus=cpus, include_dashboard=False)
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        def log(text: str) -> None:
            print(f"prepare: {text}  ({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)

        m = prepare(config(work, model, paths, "ray"), log=log)
        seconds = time.perf_counter() - t0
        res = {"read": m["steps"]["read"], "written": m["steps"]["written"], "quarantine": m["quarantine"]}
    return {**res, "seconds": round(seconds, 2), "startup_s": round(startup, 2), "rows_per_s": round(res["read"] / seconds),
            "peak_rss_mib": round(rss.done(), 1), "start_rss_mib": round(rss.start_rss / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--cpus", type=int, default=2, help="logical CPUs of the local Ray")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the two runs; the ratio is the median of per-round ratios")
    ap.add_argument("--child", choices=["loop", "ray"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        work = Path(args.work)
        paths = {"general": work / "general.jsonl", "domain": work / "domain.jsonl"}
        print("RESULT " + json.dumps(child(args.child, work, work / "model", paths, args.cpus)), flush=True)
        return

    from distillery.models.init_model import ArchSpec, init_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = generate(work, args.rows)
        init_model(work / "model", ArchSpec(**SPEC), corpus=[str(p) for p in paths.values()], vocab_size=1024, seed=0)
        env = {**os.environ, "PYTHONPATH": str(REPO / "platform") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        # The two runs take turns `--repeats` times: a shared machine drifts by tens of percent over
        # minutes, so the ratio is taken within each round and the median over rounds is reported.
        rounds: list[dict] = []
        for rep in range(args.repeats):
            results = {}
            for mode in ("loop", "ray"):
                p = subprocess.run([sys.executable, __file__, "--child", mode, "--work", str(work), "--cpus", str(args.cpus)],
                                   capture_output=True, text=True, env=env)
                if p.returncode != 0:
                    raise SystemExit(f"{mode} run failed:\n{p.stderr[-4000:]}")
                results[mode] = json.loads(next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))[7:])
                if mode == "ray" and rep == 0:  # the stage's own progress lines: where the time went
                    print("\n".join(line for line in p.stderr.splitlines() if line.startswith("prepare:")))
            rounds.append(results)
            print(f"round {rep + 1}/{args.repeats}: loop {results['loop']['rows_per_s']:,} rows/s, "
                  f"Ray {results['ray']['rows_per_s']:,} rows/s", flush=True)
    ratio = paired_ratio([r["ray"]["rows_per_s"] for r in rounds], [r["loop"]["rows_per_s"] for r in rounds])
    print(f"\nprepare benchmark: {args.rows:,} generated rows, {args.cpus} logical CPUs ({os.cpu_count()} cores), "
          f"median of {args.repeats} rounds\n")
    print(f"{'pipeline':<28}{'rows/s':>10}{'seconds':>10}{'written':>10}{'peak RSS MiB':>14}")
    for name, key in (("plain Python loop", "loop"), ("distillery prepare (Ray)", "ray")):
        runs = [r[key] for r in rounds]
        print(f"{name:<28}{statistics.median(r['rows_per_s'] for r in runs):>10,.0f}{statistics.median(r['seconds'] for r in runs):>10.2f}"
              f"{runs[-1]['written']:>10,}{max(r['peak_rss_mib'] for r in runs):>14}")
    startup = statistics.median(r["ray"]["startup_s"] for r in rounds)
    print(f"\nRay / loop throughput: {ratio:.2f}x (target >= 1.5x); Ray start-up {startup:.2f}s not counted")
    write_result("prepare", {"rows": args.rows, "cpus": args.cpus, "cores": os.cpu_count(), "rounds": rounds,
                             "throughput_ratio": round(ratio, 3)})


if __name__ == "__main__":
    main()
