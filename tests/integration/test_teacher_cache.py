"""`cache-teacher` over a prepared directory on a real local Ray cluster (HF backend)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from kd_fixture import write_prepared
from transformers import AutoModelForCausalLM

from distillery.config import load_config
from distillery.distill.losses import SparseTeacher, distill_loss
from distillery.distill.teacher_cache import (
    CACHE_MANIFEST,
    IDS_COL,
    LOGPROBS_COL,
    TAIL_COL,
    TeacherCacheError,
    check_cache,
    run_cache_teacher,
    sparse_teacher_batch,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cached(tmp_path_factory, demo_corpus, tiny_teacher):
    """A prepared dir and its cache with top_k = the whole vocabulary (512) in float32, so the
    same cache checks both the top-k against a direct forward and sparse == dense."""
    prepared = write_prepared(tmp_path_factory.mktemp("kd") / "prepared", demo_corpus["train"], tiny_teacher, n_train=60, n_val=4)
    cfg = load_config(None, [
        f"data.prepared={prepared}", f"model.teacher={tiny_teacher}", "distill.top_k=512",
        "distill.cache_backend=hf", "distill.cache_dtype=float32", "distill.cache_batch_size=3", "distill.cache_actors=2",
    ])
    assert run_cache_teacher(cfg) == 0
    return cfg, prepared


def _rows(d):
    return pq.read_table(d).to_pylist()


def test_cache_matches_direct_teacher_forward(cached, tiny_teacher):
    cfg, prepared = cached
    manifest = json.loads(open(f"{cfg.teacher_cache_dir}/{CACHE_MANIFEST}").read())
    assert manifest["fingerprint"] == json.loads((prepared / "manifest.json").read_text())["fingerprint"]
    assert manifest["top_k"] == 512 and manifest["vocab_size"] == 512 and manifest["dtype"] == "float32"
    assert manifest["raw_bytes_per_token"] == 512 * 8 + 4 and manifest["disk_bytes_per_token"] > 0
    assert set(manifest["splits"]) == {"train", "val"} and manifest["rows"] == 64
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    for split, n in (("train", 60), ("val", 4)):
        rows = _rows(f"{cfg.teacher_cache_dir}/{split}")
        source = {r["row_id"]: r for r in _rows(prepared / split)}
        assert [r["row_id"] for r in rows] == [r["row_id"] for r in _rows(prepared / split)]  # the prepared order
        assert len(rows) == n
        for row in rows:
            for col, value in source[row["row_id"]].items():  # every prepared column carried unchanged
                assert row[col] == value
            ids = torch.tensor([row["input_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            labels = row["labels"]
            assert len(row[IDS_COL]) == len(labels) == len(row[LOGPROBS_COL]) == len(row[TAIL_COL])
            for t in range(len(labels)):
                has_target = t + 1 < len(labels) and labels[t + 1] != -100
                if not has_target:
                    assert row[IDS_COL][t] == [] and row[LOGPROBS_COL][t] == []
                    continue
                ref_vals, ref_ids = logp[t].topk(16)
                assert row[IDS_COL][t][:16] == ref_ids.tolist()
                assert np.allclose(row[LOGPROBS_COL][t][:16], ref_vals.numpy(), atol=1e-4)


def test_sparse_loss_from_cache_equals_dense_online_loss(cached, tiny_teacher):
    cfg, _ = cached
    rows = _rows(f"{cfg.teacher_cache_dir}/train")[:4]
    L = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    labels = torch.full((len(rows), L), -100)
    attn = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], attn[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    t_ids, t_lp, t_tail = sparse_teacher_batch([r[IDS_COL] for r in rows], [r[LOGPROBS_COL] for r in rows], [r[TAIL_COL] for r in rows], L, 512)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    with torch.no_grad():
        teacher_logits = model(input_ids=ids, attention_mask=attn).logits
    student = torch.randn(len(rows), L, 512, generator=torch.Generator().manual_seed(0))
    for kind in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        dense = distill_loss(student, teacher_logits, labels, kind=kind, temperature=2.0, alpha=0.5)
        sparse = distill_loss(student, SparseTeacher(t_ids, t_lp, t_tail), labels, kind=kind, temperature=2.0, alpha=0.5)
        assert torch.allclose(sparse.loss, dense.loss, rtol=1e-4, atol=1e-5), kind


def test_stale_cache_is_refused(cached, tmp_path):
    cfg, prepared = cached
    assert check_cache(cfg)["top_k"] == 512
    other = tmp_path / "prepared"
    shutil.copytree(prepared, other, ignore=shutil.ignore_patterns("teacher_cache*"))
    m = json.loads((other / "manifest.json").read_text())
    m["fingerprint"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(m))
    stale = cfg.model_copy(deep=True)
    stale.data.prepared = str(other)
    stale.distill.cache = cfg.teacher_cache_dir
    with pytest.raises(TeacherCacheError, match=r"stale teacher cache.*fingerprint 0000"):
        check_cache(stale)
    missing = cfg.model_copy(deep=True)
    missing.data.prepared = str(other)
    with pytest.raises(TeacherCacheError, match="run `distillery cache-teacher"):
        check_cache(missing)


def test_vllm_backend_agrees_with_the_hf_forward(cached, tmp_path):
    """The vLLM `prompt_logprobs` path stores the same distribution as the HF forward (top 16 of it)."""
    cfg, _ = cached
    vcfg = cfg.model_copy(deep=True)
    vcfg.distill.cache_backend, vcfg.distill.top_k, vcfg.distill.cache = "vllm", 16, str(tmp_path / "vllm-cache")
    assert run_cache_teacher(vcfg) == 0
    assert json.loads((tmp_path / "vllm-cache" / CACHE_MANIFEST).read_text())["backend"] == "vllm"
    for split in ("train", "val"):
        full = _rows(f"{cfg.teacher_cache_dir}/{split}")  # HF, whole vocabulary
        rows = _rows(tmp_path / "vllm-cache" / split)
        assert [r["row_id"] for r in rows] == [r["row_id"] for r in full]  # both in the prepared order
        for row, ref in zip(rows, full):
            checked = 0
            for ids, lps, tail, ref_ids, ref_lps in zip(row[IDS_COL], row[LOGPROBS_COL], row[TAIL_COL], ref[IDS_COL], ref[LOGPROBS_COL]):
                assert len(ids) == (16 if ref_ids else 0)
                if not ids:
                    continue
                ref_lp = dict(zip(ref_ids, ref_lps))
                assert all(abs(ref_lp[i] - lp) < 2e-3 for i, lp in zip(ids, lps))  # same token, same logprob
                assert abs(lps[0] - ref_lps[0]) < 2e-3  # vLLM's best is the HF best (up to ties)
                assert abs(np.exp(tail) - (1 - np.exp(np.array(lps, dtype=np.float64)).sum())) < 1e-4
                checked += 1
            assert checked > 0
