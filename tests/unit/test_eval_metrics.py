"""Eval metrics against hand-computed values."""

from __future__ import annotations

import pytest

from distillery.config import ConfigError
from distillery.evaluation.metrics import load_jsonl_examples, normalize_answer, predicted_label, score, token_f1
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
