"""vLLM on one GPU: the teacher cache (`cache-teacher`, prompt logprobs) and `generate` (sampling
the teacher), as tests/integration/test_teacher_cache.py and test_generate.py run them on CPU,
with train.use_gpu: true, the setting that says "the GPU build of vLLM, one GPU per engine"."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from kd_fixture import write_prepared
from transformers import AutoModelForCausalLM

from distillery.config import load_config
from distillery.distill.generate import GENERATED, LOGPROBS_DIR, MANIFEST, run_generate
from distillery.distill.teacher_cache import CACHE_MANIFEST, IDS_COL, LOGPROBS_COL, TAIL_COL, choose_backend, run_cache_teacher

pytestmark = pytest.mark.timeout(420)

TOP_K = 16
# The engine may run the teacher in bf16 (model.dtype auto is bf16 on GPU); the reference is an fp32
# forward on CPU. bf16 keeps about 3 significant digits of a logit.
LOGPROB_TOL = 0.1


def test_cache_teacher_with_vllm_on_gpu_matches_the_hf_forward(tmp_path, demo_corpus, tiny_teacher):
    prepared = write_prepared(tmp_path / "prepared", demo_corpus["train"], tiny_teacher, n_train=24, n_val=4)
    base = [f"data.prepared={prepared}", f"model.teacher={tiny_teacher}", "train.use_gpu=true", f"distill.top_k={TOP_K}",
            "distill.cache_samples=0", "distill.cache_dtype=float32", "distill.cache_batch_size=8", f"distill.cache={tmp_path / 'cache'}"]
    # On a GPU with vLLM installed, `auto` picks vLLM for a plain top-k cache of one teacher.
    assert choose_backend(load_config(None, base + ["distill.cache_backend=auto"])) == "vllm"
    cfg = load_config(None, base + ["distill.cache_backend=vllm"])
    assert run_cache_teacher(cfg) == 0
    manifest = json.loads((tmp_path / "cache" / CACHE_MANIFEST).read_text())
    assert manifest["backend"] == "vllm" and manifest["top_k"] == TOP_K and manifest["rows"] == 28
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    checked = 0
    for split in ("train", "val"):
        rows = pq.read_table(tmp_path / "cache" / split).to_pylist()
        prepared_ids = [r["row_id"] for r in pq.read_table(prepared / split).to_pylist()]
        assert [r["row_id"] for r in rows] == prepared_ids  # the prepared order
        for row in rows[:6]:
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([row["input_ids"]])).logits[0].float(), -1)
            for t, (ids, lps, tail) in enumerate(zip(row[IDS_COL], row[LOGPROBS_COL], row[TAIL_COL])):
                if not ids:
                    continue
                assert len(ids) == TOP_K and lps == sorted(lps, reverse=True)
                best2 = logp[t].topk(2)
                assert abs(lps[0] - best2.values[0].item()) < LOGPROB_TOL, (split, t)
                if best2.values[0] - best2.values[1] > 2 * LOGPROB_TOL:  # a clear winner: the same token
                    assert ids[0] == best2.indices[0].item(), (split, t)
                assert abs(np.exp(tail) - (1 - np.exp(np.array(lps, dtype=np.float64)).sum())) < 1e-3
                checked += 1
    assert checked > 20


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_generate_with_vllm_on_gpu(tmp_path, tiny_teacher):
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in (
        "Add 12 and 30.", "Name a colour.", "Convert 3 km to metres.", "Spell 42 in words.", "Sort 3, 1, 2.", "Name a city.")])
    # The tiny teacher is randomly initialised: it seldom ends an answer or avoids repeating itself,
    # so every sample is kept (the filters are the CPU tests' subject; here it is the GPU engine).
    cfg = load_config(None, [
        f"output_dir={tmp_path / 'run'}", "seed=3", f"model.path={tiny_teacher}", f"model.teacher={tiny_teacher}",
        "train.use_gpu=true", "data.max_length=64", "distill.top_k=8", "distill.cache_dtype=float32",
        f"generate.sources=[{{path: {prompts}, format: prompts, name: prompts}}]", "generate.n=2", "generate.temperature=1.0",
        "generate.max_new_tokens=12", "generate.batch_size=4", "generate.accept=all", "generate.drop_truncated=false",
        "generate.drop_empty=false", "generate.max_repeat_fraction=null",
    ])
    assert run_generate(cfg) == 0
    out = Path(cfg.generated_dir)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["settings"]["engine_dtype"] == "bfloat16"  # model.dtype auto on GPU
    c = manifest["counts"]
    assert c["prompts"]["answered"] == 6 and c["samples"]["generated"] == 12
    rows = [json.loads(l) for l in (out / GENERATED).read_text().splitlines() if l.strip()]
    assert len(rows) == c["samples"]["kept"] > 0
    assert all(r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"] for r in rows)
    table = pq.read_table(out / LOGPROBS_DIR).to_pylist()
    assert [r["metadata"]["seq_key"] for r in rows] == [t["seq_key"] for t in table]
    assert any(ids for t in table for ids in t[IDS_COL])
    assert all(len(ids) in (0, 8) for t in table for ids in t[IDS_COL])


def test_eval_runs_its_engine_on_a_gpu_worker(tmp_path, tiny_teacher):
    """`eval` with train.use_gpu: each model's vLLM engine runs in a Ray task holding a GPU, in bf16,
    with a capped GPU share, and the report says which backend answered."""
    from distillery.evaluation.run import run_eval

    dataset = _jsonl(tmp_path / "eval.jsonl", [{"prompt": f"Add {i} and {i}.", "reference": str(2 * i), "task": "add",
                                                "metric": "exact_match"} for i in range(8)])
    cfg = load_config(None, [
        f"output_dir={tmp_path / 'run'}", "train.use_gpu=true", f"eval.models=[{{path: {tiny_teacher}, name: teacher}}]",
        f"eval.dataset={dataset}", "eval.backend=vllm", "eval.max_new_tokens=8", "eval.engine.gpu_memory_utilization=0.3",
        "eval.chat=false",
    ])
    assert run_eval(cfg) == 0
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    (model,) = metrics["models"]
    assert model["backend"] == "vllm" and model["tokens_per_s"] > 0
