"""Eval metrics against hand-computed values."""

from __future__ import annotations

import collections
import json

import pytest

from distillery.config import ConfigError
from distillery.data.answers import normalize_answer, predicted_label, score, token_f1
from distillery.evaluation.metrics import load_jsonl_examples
from distillery.evaluation.report import render_report


def test_normalisation_handles_punctuation_articles_and_cjk():
    assert normalize_answer("  The Answer, is: 42! ") == "answer is 42"
    assert normalize_answer("一千克。") == "一千克"


@pytest.mark.parametrize(
    "metric, pred, ref, expected",
    [
        ("exact_match", "42", "42", 1.0),
        ("exact_match", "42.", "42", 1.0),
        ("exact_match", "4 2", "42", 0.0),
        ("contains", "the sum is 42 units", "42", 1.0),
        ("contains", "41", "42", 0.0),
        ("regex", "3000 m", r"^\d+ m$", 1.0),
        ("regex", "3000 km", r"^\d+ m$", 0.0),
    ],
)
def test_simple_metrics(metric, pred, ref, expected):
    assert score(metric, pred, ref) == expected


def test_token_f1_matches_squad_definition():
    # pred tokens: [cat, sat, on, mat], ref: [cat, sat]: precision 2/4, recall 1 -> F1 2/3.
    assert token_f1("the cat sat on the mat", "a cat sat") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0
    # CJK characters count as tokens: pred 你好世界 vs ref 你好 -> P 2/4, R 1 -> 2/3.
    assert token_f1("你好世界", "你好") == pytest.approx(2 / 3)


def test_accuracy_over_label_set():
    labels = ["sports", "finance", "health", "tech"]
    assert predicted_label("Finance.", labels) == "finance"
    assert predicted_label("I think this is about health, not tech", labels) == "health"
    assert predicted_label("unknown", labels) is None
    assert score("accuracy", "tech", "tech", labels) == 1.0
    assert score("accuracy", "sports news", "tech", labels) == 0.0
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        score("bleu", "a", "b")


def test_bad_eval_rows_name_line_and_field(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text('{"prompt": "a", "reference": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ConfigError, match=r"e.jsonl:2: field 'reference'"):
        load_jsonl_examples(str(p))
    p.write_text('{"prompt": "a", "reference": "b", "metric": "bleu"}\n')
    with pytest.raises(ConfigError, match=r"e.jsonl:1: field 'metric'"):
        load_jsonl_examples(str(p))
    p.write_text('{"prompt": "a",\n')
    with pytest.raises(ConfigError, match=r"e.jsonl:1: not valid JSON"):
        load_jsonl_examples(str(p))


def test_report_table_has_one_row_per_model():
    results = [
        {"name": "teacher", "parameters": 1000, "size_bytes": 4096, "scores": {"a": 1.0, "b": 0.5}, "mean_score": 0.75,
         "tokens_per_s": 100.0, "trainable_parameters": 1000, "backend": "vllm", "latency_p50_s": 0.1},
        {"name": "student", "parameters": 250, "size_bytes": 1024, "scores": {"a": 0.0}, "mean_score": 0.0,
         "tokens_per_s": 300.0, "trainable_parameters": 25, "backend": "hf", "val_loss": 1.5, "val_perplexity": 4.48},
    ]
    text = render_report(results, ["a", "b"], 10)
    assert "| model | params | size | a | b | mean | tokens/s |" in text
    assert "| teacher | 1,000 | 4.0 KiB | 1.000 | 0.500 | 0.750 | 100.0 |" in text
    assert "| student | 250 | 1.0 KiB | 0.000 | 0.000 | 0.000 | 300.0 |" in text
    assert "| student | 25 | 1.500 | 4.48 |" in text


# --------------------------------------------------------------------------- contamination


@pytest.fixture(scope="module")
def overlap(tmp_path_factory, tiny_teacher):
    """A prepared dir of 12 demo rows (rows 3, 7 and 11 go to val) and the corpus rows it came from."""
    from prepared_fixture import write_prepared

    from distillery.demo.corpus import generate_rows

    d = tmp_path_factory.mktemp("contamination")
    rows = generate_rows(12, seed=5)
    (d / "corpus.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return write_prepared(d / "corpus.jsonl", tiny_teacher, d / "prepared", val_every=4), rows


def test_contamination_counts_eval_prompts_in_the_training_split(overlap, tiny_teacher):
    import pyarrow.parquet as pq

    from distillery.demo.corpus import prompt_of
    from distillery.evaluation.contamination import check_contamination
    from distillery.evaluation.metrics import Example
    from distillery.models.load import load_tokenizer

    prepared, rows = overlap
    tok = load_tokenizer(tiny_teacher)
    rendered = {r["prompt"] for r in pq.read_table(prepared / "train", columns=["prompt"]).to_pylist()}
    rendered_8 = next(p for p in rendered if prompt_of(rows[8]) in p)  # rows[8] as prepare stores it, template and all
    assert [r["task"] for r in rows[:9]] == (["arithmetic", "units", "sorting", "extract", "classify"] * 2)[:9]
    examples = [
        Example(prompt_of(rows[0]), "", "arithmetic", "exact_match"),  # in train
        Example(prompt_of(rows[5]), "", "arithmetic", "exact_match"),  # in train
        Example("Add 1000 and 2000.", "", "arithmetic", "exact_match"),  # nowhere
        # in train once normalised: full-width space, doubled spaces, padding
        Example("  " + prompt_of(rows[1]).replace(" ", "\u3000 ", 1).replace(" ", "  ", 1) + " \n", "", "units", "exact_match"),
        Example(prompt_of(rows[3]), "", "extract", "exact_match"),  # in val only: not training data
        Example(rendered_8, "", "extract", "exact_match", rendered=True),  # a prepared-split prompt, markup stripped
        Example(prompt_of(rows[4]), "", "classify", "accuracy"),  # in train
    ]
    c = check_contamination(examples, str(prepared), tok)
    assert c.flags == [True, True, False, True, False, True, True]
    s = c.summary()
    assert (s["checked"], s["examples"], s["contaminated"], s["train_prompts"]) == (True, 7, 5, 9)
    assert s["fraction"] == pytest.approx(5 / 7)
    assert s["per_task"] == {"arithmetic": {"examples": 3, "contaminated": 2}, "classify": {"examples": 1, "contaminated": 1},
                             "extract": {"examples": 2, "contaminated": 1}, "units": {"examples": 1, "contaminated": 1}}
    assert c.message() == (f"eval: WARNING: 5 of 7 eval prompts (71.4%) occur in the training split of {prepared}; "
                           "scores on them are not held-out")

    clean = check_contamination([examples[2], examples[4]], str(prepared), tok)
    assert clean.checked and clean.count == 0 and clean.summary()["contaminated"] == 0
    assert "none of 2 eval prompts" in clean.message()

    missing = check_contamination(examples, str(prepared.parent / "absent"), tok)
    assert not missing.checked and missing.flag(0) is None
    assert missing.summary() == {"checked": False, "prepared": str(prepared.parent / "absent"),
                                 "reason": f"no prepared training split at {prepared.parent / 'absent' / 'train'} (data.prepared)"}
    assert missing.message().startswith("eval: contamination check not run: no prepared training split")


def test_report_contamination_section():
    results = [{"name": "kd", "parameters": 10, "size_bytes": 10, "scores": {"a": 0.5, "b": 1.0}, "mean_score": 0.75,
                "tokens_per_s": 1.0, "trainable_parameters": 10, "backend": "hf", "clean_scores": {"a": 0.25}, "clean_mean_score": 0.25}]
    summary = {"checked": True, "prepared": "/p", "train_prompts": 9, "examples": 6, "contaminated": 3, "fraction": 0.5,
               "per_task": {"a": {"examples": 4, "contaminated": 1}, "b": {"examples": 2, "contaminated": 2}}}
    text = render_report(results, ["a", "b"], 6, summary)
    assert "**3 of 6 eval prompts (50.0%) occur in the training split of `/p`; scores on them are not held-out.** Per task: a 1/4, b 2/2." in text
    assert "| kd | 0.250 | – | 0.250 |" in text
    text = render_report(results, ["a", "b"], 6, {"checked": False, "prepared": "/p", "reason": "no prepared training split at /p/train (data.prepared)"})
    assert "Not checked: no prepared training split at /p/train (data.prepared)." in text
    assert "## Contamination" not in render_report(results, ["a", "b"], 6)


def test_demo_test_prompts_are_disjoint_from_training_prompts(tmp_path):
    from distillery.data.normalize import normalize_text
    from distillery.demo import N_LABELLED, N_PROMPTS, N_TEACHER_ROWS
    from distillery.demo.corpus import held_out_rows, prompt_of, write_corpus

    paths = write_corpus(tmp_path, n_train=N_TEACHER_ROWS, n_test=200, seed=0, n_labelled=N_LABELLED, n_prompts=N_PROMPTS)
    train = [json.loads(l) for l in paths["train"].read_text(encoding="utf-8").splitlines()]
    labelled = [json.loads(l) for l in paths["labelled"].read_text(encoding="utf-8").splitlines()]
    pool = [json.loads(l)["prompt"] for l in paths["prompts"].read_text(encoding="utf-8").splitlines()]
    test = [json.loads(l) for l in paths["test"].read_text(encoding="utf-8").splitlines()]
    seen = {normalize_text(prompt_of(r)) for r in train + labelled} | {normalize_text(p) for p in pool}
    assert seen.isdisjoint(normalize_text(r["prompt"]) for r in test)
    # Formats unchanged, task mix that of the generators.
    assert all({"instruction", "output", "task", "metric"} <= set(r) <= {"instruction", "input", "output", "task", "metric"} for r in train)
    assert all(set(r) == {"prompt", "reference", "task", "metric"} for r in test)
    assert collections.Counter(r["task"] for r in test) == {t: 40 for t in ("arithmetic", "units", "sorting", "extract", "classify")}

    class Everything(set):  # every prompt already in training
        def __contains__(self, item):
            return True

    with pytest.raises(ValueError, match="no 'arithmetic' prompt outside the 0 training prompts in 5 draws"):
        held_out_rows(1, seed=0, exclude=Everything(), max_draws=5)
