"""Cross-tokenizer distillation on real local Ray: a student with its own tokenizer learns from the
tiny teacher through positions aligned by character offsets (ULD, and hybrid)."""

from __future__ import annotations

import pytest

from distillery.config import ConfigError, load_config
from distillery.distill.losses import VocabularyMismatchError
from distillery.distill.method import run_distill, validate_distill
from distillery.models.init_model import ArchSpec, init_model
from training_runs import local_ray, run_metrics, trained_teacher  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def own_tokenizer_student(tmp_path_factory, demo_corpus):
    """The tiny student with a tokenizer of its own (300 tokens, the teacher has 512)."""
    out = tmp_path_factory.mktemp("models") / "student-xtok"
    init_model(out, ArchSpec(arch="llama", layers=1, hidden=32, heads=1, kv_heads=1, intermediate=64),
               corpus=[str(demo_corpus["train"])], vocab_size=300, seed=4)
    return out


@pytest.fixture(scope="module")
def prepared_xtok(tmp_path_factory, demo_corpus, own_tokenizer_student):
    from prepared_fixture import write_prepared

    return write_prepared(demo_corpus["train"], own_tokenizer_student, tmp_path_factory.mktemp("prepared-xtok"))


def _cfg(out, prepared, student, teacher, *extra):
    return load_config(overrides=[
        f"output_dir={out}", f"data.prepared={prepared}", f"model.path={student}", f"model.teacher={teacher}",
        "train.batch_size=8", "train.lr=5e-3", "train.scheduler=constant", "train.max_steps=16", "train.eval_every=8",
        "train.num_workers=2", "distill.alpha=0.7", *extra,
    ])


def test_another_tokenizer_is_refused_with_a_hint_then_distils_across(tmp_path, prepared_xtok, own_tokenizer_student, trained_teacher):
    """Without distill.cross_tokenizer the pair fails before Ray and the error names the setting;
    with it, 2 FSDP workers train on aligned positions and the student's ULD distance to the
    teacher on val falls."""
    plain = _cfg(tmp_path / "plain", prepared_xtok, own_tokenizer_student, trained_teacher)
    with pytest.raises(VocabularyMismatchError, match="distill.cross_tokenizer"):
        validate_distill(plain)
    with pytest.raises(ConfigError, match="cross_tokenizer needs the teacher online"):
        _cfg(tmp_path / "x", prepared_xtok, own_tokenizer_student, trained_teacher, "distill.cross_tokenizer.kd=uld",
             "distill.teacher_mode=cached")

    for kd in ("uld", "hybrid"):
        run = tmp_path / kd
        assert run_distill(_cfg(run, prepared_xtok, own_tokenizer_student, trained_teacher, f"distill.cross_tokenizer.kd={kd}")) == 0
        records = run_metrics(run)
        steps = [m for m in records if "kd_loss" in m]
        evals = [m for m in records if "val_teacher_uld" in m]
        assert len(steps) == 16 and all(m["aligned"] > 0.3 for m in steps), [m["aligned"] for m in steps]
        assert len(evals) == 2 and evals[-1]["val_aligned"] > 0.3
        first = steps[0]["kd_loss"]
        assert min(m["kd_loss"] for m in steps[-4:]) < first, (kd, first, [m["kd_loss"] for m in steps])
        assert (run / "model" / "config.json").exists()


def test_equal_sized_but_different_tokenizers_are_refused(tmp_path, demo_corpus, tiny_teacher, prepared_tiny):
    """Same vocabulary size, other tokens: logit KD would compare unrelated ids."""
    from transformers import AutoConfig

    size = AutoConfig.from_pretrained(tiny_teacher).vocab_size
    other = tmp_path / "other"
    # A tokenizer trained on other text, its output layer padded to the teacher's size.
    init_model(other, ArchSpec(arch="llama", layers=1, hidden=32, heads=1, kv_heads=1, intermediate=64, extra={"vocab_size": size}),
               corpus=[str(demo_corpus["test"])], vocab_size=300, seed=5)
    cfg = _cfg(tmp_path / "run", prepared_tiny, other, tiny_teacher)
    assert AutoConfig.from_pretrained(other).vocab_size == size
    with pytest.raises(VocabularyMismatchError, match="tokens differ"):
        validate_distill(cfg)
