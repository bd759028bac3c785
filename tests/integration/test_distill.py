"""`distillery distill` on real local Ray: a trained tiny teacher, its cache, and students."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import ray
import torch

from distillery.config import ConfigError, load_config
from distillery.evaluation.model_metrics import val_and_teacher_metrics
from distillery.distill.losses import VocabularyMismatchError
from distillery.models.init_model import ArchSpec, init_model
from distillery.distill.teacher_cache import run_cache_teacher
from distillery.distill.method import run_distill, validate_distill
from distillery.distill.objective import DistillObjective
from distillery.train.finetune import run_finetune

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def _overrides(out, prepared, *extra):
    # One worker keeps this module fast; the sharded (FSDP, 2 workers) online teacher is exercised
    # in test_multinode.py and FSDP + LoRA in test_finetune.py.
    return [f"output_dir={out}", f"data.prepared={prepared}", "train.batch_size=8", "train.lr=5e-3",
            "train.scheduler=constant", "train.num_workers=1", "train.strategy=none", *extra]


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory, prepared_tiny, tiny_teacher):
    out = tmp_path_factory.mktemp("teacher") / "run"
    cfg = load_config(overrides=_overrides(out, prepared_tiny, f"model.path={tiny_teacher}", "train.max_steps=40", "train.eval_every=40"))
    assert run_finetune(cfg) == 0
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, prepared_tiny, trained_teacher, tiny_teacher):
    """A float32 cache with k = the whole vocabulary, so sparse and dense teachers must agree."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(tiny_teacher).vocab_size
    cache = tmp_path_factory.mktemp("cache") / "cache"
    cfg = load_config(overrides=[f"output_dir={cache.parent}", f"data.prepared={prepared_tiny}", f"model.teacher={trained_teacher}",
                                 f"distill.cache={cache}", f"distill.top_k={vocab}", "distill.cache_dtype=float32", "distill.cache_backend=hf"])
    assert run_cache_teacher(cfg) == 0
    return cache


def test_cached_with_full_vocabulary_equals_online(prepared_tiny, trained_teacher, tiny_student, cache_dir):
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    from distillery.train.collate import collate

    vocab = AutoModelForCausalLM.from_pretrained(tiny_student).config.vocab_size
    rows = pq.read_table(next((cache_dir / "train").glob("*.parquet"))).slice(0, 4).to_pydict()
    batch = collate({k: rows[k] for k in ("input_ids", "labels", "row_id", "teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logprob")}, pad_id=0)
    student = AutoModelForCausalLM.from_pretrained(tiny_student)
    base = [f"model.path={tiny_student}", f"model.teacher={trained_teacher}", f"data.prepared={prepared_tiny}", f"distill.cache={cache_dir}",
            f"distill.top_k={vocab}", "distill.temperature=2.0", "distill.alpha=0.7", "train.strategy=none"]
    for loss in ("forward_kl", "jsd", "tvd"):
        online = DistillObjective(load_config(overrides=base + [f"distill.loss={loss}"]), None, student, torch.device("cpu"))
        cached = DistillObjective(load_config(overrides=base + [f"distill.loss={loss}", "distill.teacher_mode=cached"]), None, student, torch.device("cpu"))
        a, am = online(student, batch)
        b, bm = cached(student, batch)
        assert a.item() == pytest.approx(b.item(), rel=1e-5, abs=1e-6), loss
        assert am["kd_loss"] == pytest.approx(bm["kd_loss"], rel=1e-5, abs=1e-6)
        ea, eb = online.evaluate(student, batch), cached.evaluate(student, batch)
        assert ea["teacher_top1_agreement"] == eb["teacher_top1_agreement"]
        assert ea["teacher_kl"] == pytest.approx(eb["teacher_kl"], rel=1e-4)
    # distill.fused_lm_head: logits per chunk from the hidden states, same loss and gradient.
    grads = []
    for fused in ("false", "true"):
        objective = DistillObjective(load_config(overrides=base + ["distill.loss=jsd", f"distill.fused_lm_head={fused}"]), None, student, torch.device("cpu"))
        student.zero_grad()
        loss, _ = objective(student, batch)
        loss.backward()
        grads.append((loss.item(), student.lm_head.weight.grad.clone(), student.model.embed_tokens.weight.grad.clone()))
    assert grads[1][0] == pytest.approx(grads[0][0], rel=1e-5)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(grads[0][1:], grads[1][1:]))


@pytest.mark.timeout(1200)
def test_distilled_student_is_closer_to_the_teacher_than_sft(tmp_path, prepared_tiny, trained_teacher, tiny_student):
    common = [f"model.path={tiny_student}", f"model.teacher={trained_teacher}", "train.max_steps=40", "train.eval_every=20"]
    assert run_finetune(load_config(overrides=_overrides(tmp_path / "sft", prepared_tiny, *common))) == 0
    # T = 1: the comparison is at T = 1 and 40 steps are few; a softened target (T = 2) matches the
    # teacher's T = 1 distribution more slowly on this tiny student (measured: KL 0.59 vs SFT 0.35).
    assert run_distill(load_config(overrides=_overrides(tmp_path / "kd", prepared_tiny, *common, "distill.alpha=0.9",
                                                        "distill.temperature=1.0", "distill.teacher_mode=online"))) == 0
    metrics = [json.loads(l) for l in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert any("kd_loss" in m and "ce_loss" in m for m in metrics)
    assert any("val_teacher_top1_agreement" in m and "val_teacher_kl" in m for m in metrics)
    teacher_dir = Path(trained_teacher) / "model"
    sft = val_and_teacher_metrics(tmp_path / "sft" / "model", teacher_dir, str(prepared_tiny))
    kd = val_and_teacher_metrics(tmp_path / "kd" / "model", teacher_dir, str(prepared_tiny))
    assert kd["teacher_kl"] < sft["teacher_kl"]
    assert kd["teacher_top1_agreement"] > sft["teacher_top1_agreement"]


@pytest.mark.timeout(1200)
def test_lora_student_from_cache_resumes_after_killed_worker(tmp_path, prepared_tiny, tiny_student, cache_dir):
    run = tmp_path / "lora-kd"
    cfg = load_config(overrides=_overrides(
        run, prepared_tiny, f"model.path={tiny_student}", f"distill.cache={cache_dir}", "distill.teacher_mode=cached",
        "distill.top_k=16", "method.kind=lora", "method.lora.r=4", "train.max_steps=12", "train.checkpoint_every=4",
        "train.eval_every=4", "train.max_failures=1", "train.trace_rows=true", "train.batch_size=4",
    ))
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", run_distill(cfg)))
    thread.start()
    deadline_steps = run / "trace" / "rows_rank0.jsonl"
    import time

    end = time.time() + 600
    while time.time() < end:
        if deadline_steps.exists() and any(json.loads(l)["step"] >= 6 for l in deadline_steps.read_text().splitlines() if l.strip()):
            break
        time.sleep(0.5)
    pid = int((run / "trace" / "pid_rank0").read_text())
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=900)
    assert result.get("rc") == 0
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines() if "kd_loss" in l]
    assert steps == list(range(1, 13))
    assert (run / "model" / "adapter_config.json").exists()


def test_vocabulary_mismatch_and_stale_cache_fail_before_training(tmp_path, prepared_tiny, tiny_student, cache_dir, demo_corpus):
    other = tmp_path / "other-vocab"
    init_model(other, ArchSpec(layers=1, hidden=32, heads=1, intermediate=64), corpus=[str(demo_corpus["train"])], vocab_size=300)
    cfg = load_config(overrides=[f"model.path={other}", f"model.teacher={tiny_student}", f"data.prepared={prepared_tiny}"])
    from transformers import AutoConfig

    with pytest.raises(VocabularyMismatchError) as e:
        validate_distill(cfg)
    sizes = AutoConfig.from_pretrained(other).vocab_size, AutoConfig.from_pretrained(tiny_student).vocab_size
    assert sizes[0] != sizes[1] and all(str(n) in str(e.value) for n in sizes)
    # A cache built for other data is refused, naming both fingerprints.
    stale = tmp_path / "stale"
    import shutil

    shutil.copytree(cache_dir, stale)
    manifest = json.loads((stale / "cache_manifest.json").read_text())
    manifest["fingerprint"] = "0" * 16
    (stale / "cache_manifest.json").write_text(json.dumps(manifest))
    cfg = load_config(overrides=[f"model.path={tiny_student}", f"data.prepared={prepared_tiny}", f"distill.cache={stale}",
                                 "distill.teacher_mode=cached"])
    with pytest.raises(ConfigError, match="stale teacher cache"):
        validate_distill(cfg)
