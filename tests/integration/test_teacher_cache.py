"""`cache-teacher` over a prepared directory on a real local Ray cluster (HF backend): the full
cache against a direct forward, a sampled cache of two teachers (head = their mixture, unique
draws with counts, bytes, reproducible), the vLLM backend, and the cached objective's val metrics."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from kd_fixture import write_prepared
from transformers import AutoModelForCausalLM

from distillery.config import ConfigError, load_config
from distillery.distill.losses import distill_loss
from distillery.distill.teacher_cache import (
    CACHE_MANIFEST,
    COUNTS_COL,
    IDS_COL,
    LOGPROBS_COL,
    TAIL_COL,
    TeacherCacheError,
    check_cache,
    choose_backend,
    run_cache_teacher,
    sparse_teacher_batch,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One Ray instance for every build in this module (`ensure_ray` joins it instead of starting its own)."""
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


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
    assert manifest["cache_mode"] == "full" and manifest["cache_samples"] == 0 and manifest["id_dtype"] == "uint16"
    assert manifest["raw_bytes_per_token"] == 512 * (2 + 4) + 4 and manifest["disk_bytes_per_token"] > 0
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
                assert row[COUNTS_COL][t] == []  # the head is the whole vocabulary: nothing to sample
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
    sparse = sparse_teacher_batch([r[IDS_COL] for r in rows], [r[LOGPROBS_COL] for r in rows], [r[TAIL_COL] for r in rows], L, 512,
                                  [r[COUNTS_COL] for r in rows])
    assert sparse.counts is None
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    with torch.no_grad():
        teacher_logits = model(input_ids=ids, attention_mask=attn).logits
    student = torch.randn(len(rows), L, 512, generator=torch.Generator().manual_seed(0))
    for kind in ("forward_kl", "reverse_kl", "jsd", "tvd"):
        dense = distill_loss(student, teacher_logits, labels, kind=kind, temperature=2.0, alpha=0.5)
        out = distill_loss(student, sparse, labels, kind=kind, temperature=2.0, alpha=0.5)
        assert torch.allclose(out.loss, dense.loss, rtol=1e-4, atol=1e-5), kind


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
    vcfg.distill.cache_samples = 0  # vLLM reports only the top-k: no tail to sample (the config refuses samples with it)
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


# --------------------------------------------------------------------------- sampled cache, two teachers


def _teachers(a, b, wa=3, wb=1) -> str:
    return f"model.teachers=[{{path: {a}, weight: {wa}}}, {{path: {b}, weight: {wb}}}]"


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, cached, tiny_teacher, tiny_student):
    """A cache with the default head and tail (top_k 4, cache_samples 4 drawn at the default
    temperature 2, float16) of two teachers mixed 3:1 (the tiny student shares the teacher's
    vocabulary), built twice: with 2 actors over batches of 3 rows, and with 1 actor over batches of 8."""
    _, prepared = cached
    out = tmp_path_factory.mktemp("sampled")
    base = [f"data.prepared={prepared}", _teachers(tiny_teacher, tiny_student), "distill.cache_backend=hf"]
    a = load_config(None, base + [f"distill.cache={out / 'a'}", "distill.cache_batch_size=3", "distill.cache_actors=2"])
    b = load_config(None, base + [f"distill.cache={out / 'b'}", "distill.cache_batch_size=8", "distill.cache_actors=1"])
    assert run_cache_teacher(a) == 0 and run_cache_teacher(b) == 0
    return a, b, prepared


def test_sampled_cache_of_two_teachers(sampled, tiny_teacher, tiny_student):
    """Head = the top-4 of the mixture log(0.75·softmax(z_a) + 0.25·softmax(z_b)) with its logprobs,
    then unique drawn ids outside it whose counts sum to cache_samples at every target position, and
    the tail column log Σ_{outside} p^(1/2); at most 40 B per position; the second build (other
    batching, other actors) is identical."""
    a, b, prepared = sampled
    manifest = json.loads(open(f"{a.teacher_cache_dir}/{CACHE_MANIFEST}").read())
    assert manifest["cache_mode"] == "top_k+samples" and manifest["top_k"] == 4 and manifest["cache_samples"] == 4
    assert manifest["sample_temperature"] == 2.0
    assert manifest["teacher"]["path"] == [str(tiny_teacher), str(tiny_student)]
    assert [m["weight"] for m in manifest["teacher"]["teachers"]] == [0.75, 0.25]
    # 1% of dense fp16 at a 2,048 vocabulary is 40.96 B: 4 head entries (uint16 id + fp16) + the
    # float32 tail + at most 4 sampled entries (id + fp16 + uint8 count)
    assert manifest["id_dtype"] == "uint16" and manifest["raw_bytes_per_token_max"] == 4 * 4 + 4 + 4 * 5 == 40
    assert manifest["raw_bytes_per_token"] <= 40 and manifest["disk_bytes_per_token"] > 0
    models = [AutoModelForCausalLM.from_pretrained(p).eval() for p in (tiny_teacher, tiny_student)]
    checked = 0
    for split in ("train", "val"):
        rows, again = _rows(f"{a.teacher_cache_dir}/{split}"), _rows(f"{b.teacher_cache_dir}/{split}")
        assert [r["row_id"] for r in rows] == [r["row_id"] for r in again] == [r["row_id"] for r in _rows(prepared / split)]
        for row, other in zip(rows, again):
            assert row[IDS_COL] == other[IDS_COL] and row[COUNTS_COL] == other[COUNTS_COL]  # reproducible
            ids = torch.tensor([row["input_ids"]])
            with torch.no_grad():
                p = [torch.softmax(m(input_ids=ids).logits[0].double(), -1) for m in models]
            mix = torch.log(0.75 * p[0] + 0.25 * p[1])
            labels = row["labels"]
            for t in range(len(labels)):
                ids_t, lps_t, counts_t = row[IDS_COL][t], row[LOGPROBS_COL][t], row[COUNTS_COL][t]
                if not (t + 1 < len(labels) and labels[t + 1] != -100):
                    assert ids_t == [] and counts_t == []
                    continue
                head = ids_t[: len(ids_t) - len(counts_t)]
                assert head == mix[t].topk(4).indices.tolist()
                assert len(set(ids_t)) == len(ids_t)  # unique draws, none in the head
                assert sum(counts_t) == 4 and min(counts_t) >= 1
                assert np.allclose(lps_t, mix[t, ids_t].numpy(), atol=1e-2)  # float16, head and drawn ids alike
                outside = torch.ones_like(mix[t], dtype=torch.bool)
                outside[head] = False
                assert abs(row[TAIL_COL][t] - torch.logsumexp(mix[t][outside] / 2, 0).item()) < 1e-4
                checked += 1
    assert checked == manifest["positions"]


def test_check_cache_names_what_does_not_match(sampled, tiny_teacher, tiny_student):
    a, _, _ = sampled
    assert check_cache(a)["cache_samples"] == 4
    other = a.model_copy(deep=True)
    other.distill.temperature = 3.0  # a run at another temperature trains on the cache as it is
    assert check_cache(other)["sample_temperature"] == 2.0
    for key, value, match in (
        ("cache_samples", 8, r"distill.cache_samples is 8 .* built with cache_samples=4 \(top_k=4\)"),
        ("cache_samples", 0, r"distill.cache_samples is 0 .* built with cache_samples=4"),
        ("top_k", 8, r"distill.top_k is 8 .* sampled cache .* built with top_k=4"),
        ("cache_sample_temperature", 1.0, r"distill.cache_sample_temperature is 1.0 .* drew its tail at 2.0"),
    ):
        other = a.model_copy(deep=True)
        setattr(other.distill, key, value)
        with pytest.raises(TeacherCacheError, match=match):
            check_cache(other)
    for teachers in ([], [(tiny_student, 3), (tiny_teacher, 1)]):  # one of the two, or the weights swapped
        other = a.model_copy(deep=True)
        other.model.teachers = []
        if teachers:
            other.model.teachers = [{"path": str(p), "weight": w} for p, w in teachers]
        else:
            other.model.teacher = str(tiny_teacher)
        with pytest.raises(TeacherCacheError, match="was built by the teacher at .* not by model.teacher"):
            check_cache(other)


def test_what_a_backend_cannot_build_fails_before_ray(cached, tmp_path, tiny_teacher, tiny_student):
    _, prepared = cached
    base = [f"data.prepared={prepared}", f"distill.cache={tmp_path / 'c'}"]
    with pytest.raises(ConfigError, match="cache_backend vllm cannot sample"):
        load_config(None, base + [f"model.teacher={tiny_teacher}", "distill.cache_backend=vllm"])
    with pytest.raises(ConfigError, match="keep_tail and cache_samples"):
        load_config(None, base + [f"model.teacher={tiny_teacher}", "distill.keep_tail=true"])
    two = load_config(None, base + [_teachers(tiny_teacher, tiny_student), "distill.cache_backend=vllm", "distill.cache_samples=0"])
    with pytest.raises(TeacherCacheError, match="vllm scores one model, but model.teachers names 2"):
        choose_backend(two)
    assert choose_backend(load_config(None, base + [_teachers(tiny_teacher, tiny_student)])) == "hf"
    # teachers over different vocabularies: refused from their configs, before Ray starts
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((tiny_student / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": 640}))
    with pytest.raises(TeacherCacheError, match=r"share one vocabulary.*640"):
        run_cache_teacher(load_config(None, base + [_teachers(tiny_teacher, other), "distill.cache_backend=hf"]))
    assert not (tmp_path / "c").exists()


def test_cached_objective_validates_against_the_full_teacher(sampled, tiny_teacher, tiny_student):
    """In cached mode with the teachers on disk, val teacher_kl / top-1 agreement are the online
    objective's (the full mixture); the cache's own estimate is reported as teacher_kl_cache, and
    without a teacher that is all there is."""
    from distillery.distill.objective import DistillObjective
    from distillery.train.collate import collate

    a, _, prepared = sampled
    rows = pq.read_table(f"{a.teacher_cache_dir}/train").slice(0, 6).to_pydict()
    batch = collate({k: rows[k] for k in ("input_ids", "labels", "row_id", IDS_COL, LOGPROBS_COL, TAIL_COL, COUNTS_COL)}, pad_id=0)
    student = AutoModelForCausalLM.from_pretrained(tiny_student)
    base = [f"model.path={tiny_student}", f"data.prepared={prepared}", f"distill.cache={a.teacher_cache_dir}", "train.strategy=none"]
    cpu = torch.device("cpu")
    online = DistillObjective(load_config(None, base + [_teachers(tiny_teacher, tiny_student)]), None, student, cpu).evaluate(student, batch)
    cached = DistillObjective(load_config(None, base + [_teachers(tiny_teacher, tiny_student), "distill.teacher_mode=cached"]), None, student, cpu)
    ev = cached.evaluate(student, batch)
    assert ev["teacher_kl"] == pytest.approx(online["teacher_kl"], rel=1e-5)
    assert ev["teacher_top1_agreement"] == online["teacher_top1_agreement"]
    assert ev["tokens"] == online["tokens"] and np.isfinite(ev["teacher_kl_cache"]) and "teacher_top1_agreement_cache" in ev
    loss, metrics = cached(student, batch)
    assert torch.isfinite(loss) and np.isfinite(metrics["kd_loss"])
    blind = DistillObjective(load_config(None, base + ["distill.teacher_mode=cached"]), None, student, cpu).evaluate(student, batch)
    assert "teacher_kl" not in blind and "teacher_top1_agreement" not in blind
    assert blind["teacher_kl_cache"] == pytest.approx(ev["teacher_kl_cache"], rel=1e-6)


@pytest.mark.parametrize("key, value", [("tensor_parallel_size", 2), ("gpu_memory_utilization", 0.5), ("max_model_len", 128)])
def test_vllm_engine_settings_are_refused_for_the_hf_backend(cached, tmp_path, tiny_teacher, key, value):
    """distill.cache_engine keys that only shape a vLLM engine fail before Ray when the cache is
    built by the HF forward (GPU keys on CPU fail for that first)."""
    _, prepared = cached
    cfg = load_config(None, [f"data.prepared={prepared}", f"distill.cache={tmp_path / 'c'}", f"model.teacher={tiny_teacher}",
                             "distill.cache_backend=hf", f"distill.cache_engine.{key}={value}"])
    with pytest.raises(ConfigError, match=rf"distill.cache_engine.{key} (sets up a vLLM engine|is a GPU setting)"):
        run_cache_teacher(cfg)
    assert not (tmp_path / "c").exists()
