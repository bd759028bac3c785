"""`distillery eval` on real models: vLLM and Hugging Face give the same greedy answers; the report is complete."""

from __future__ import annotations

import json

import pytest

from distillery.config import load_config
from distillery.evaluation.run import run_eval

pytestmark = pytest.mark.slow


def _cfg(tmp_path, models, dataset, backend, output):
    return load_config(
        overrides=[
            f"output_dir={tmp_path}",
            f"eval.models={json.dumps([{'path': str(p), 'name': n} for n, p in models])}",
            f"eval.dataset={dataset}",
            f"eval.backend={backend}",
            "eval.max_examples=12",
            "eval.max_new_tokens=6",
            f"eval.output={output}",
        ]
    )


@pytest.mark.timeout(900)
def test_eval_vllm_matches_hf_and_writes_report(tmp_path, demo_corpus, tiny_teacher, tiny_student):
    models = [("teacher", tiny_teacher), ("student", tiny_student)]
    assert run_eval(_cfg(tmp_path, models, demo_corpus["test"], "hf", tmp_path / "hf")) == 0
    assert run_eval(_cfg(tmp_path, models[:1], demo_corpus["test"], "vllm", tmp_path / "vllm")) == 0

    hf = [json.loads(l) for l in (tmp_path / "hf" / "examples.jsonl").read_text().splitlines()]
    vl = [json.loads(l) for l in (tmp_path / "vllm" / "examples.jsonl").read_text().splitlines()]
    assert len(hf) == 24 and len(vl) == 12
    # Same greedy tokens (text can differ only where vLLM's incremental detokenizer holds back
    # an incomplete UTF-8 sequence at the end of an untrained model's output).
    hf_teacher = [r["output_token_ids"] for r in hf if r["model"] == "teacher"]
    assert hf_teacher == [r["output_token_ids"] for r in vl]

    metrics = json.loads((tmp_path / "hf" / "metrics.json").read_text())
    by_name = {m["name"]: m for m in metrics["models"]}
    assert set(by_name) == {"teacher", "student"}
    assert by_name["student"]["parameters"] < by_name["teacher"]["parameters"]
    # Scores are the mean of the per-example scores.
    for name, m in by_name.items():
        for task, value in m["scores"].items():
            rows = [r["score"] for r in hf if r["model"] == name and r["task"] == task]
            assert value == pytest.approx(sum(rows) / len(rows))
    report = (tmp_path / "hf" / "report.md").read_text()
    assert "| teacher |" in report and "| student |" in report
    for png in ("scores.png", "speed_quality.png"):
        assert (tmp_path / "hf" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "vllm" / "metrics.json").read_text())["models"][0]["backend"] == "vllm"
