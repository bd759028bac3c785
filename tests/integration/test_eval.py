"""`distillery eval` on real models: vLLM and Hugging Face give the same greedy answers; the report is complete."""

from __future__ import annotations

import collections
import json

import pytest

from distillery.config import load_config
from distillery.evaluation.run import run_eval

pytestmark = pytest.mark.slow


def _cfg(tmp_path, models, dataset, backend, output, prepared=None):
    return load_config(
        overrides=[
            f"output_dir={tmp_path}",
            *([f"data.prepared={prepared}"] if prepared else []),
            f"eval.models={json.dumps([{'path': str(p), 'name': n} for n, p in models])}",
            f"eval.dataset={dataset}",
            f"eval.backend={backend}",
            "eval.max_examples=12",
            "eval.max_new_tokens=6",
            f"eval.output={output}",
        ]
    )


@pytest.mark.timeout(900)
def test_eval_vllm_matches_hf_and_writes_report(tmp_path, demo_corpus, tiny_teacher, tiny_student, prepared_tiny):
    from distillery.demo.corpus import prompt_of

    # 8 held-out rows, then the first 4 training rows (each in prepared_tiny's train split: the
    # fixture sends every 10th row to val) as eval rows: a known overlap of 4 of 12.
    test_rows = [json.loads(l) for l in demo_corpus["test"].read_text(encoding="utf-8").splitlines()[:8]]
    train_rows = [json.loads(l) for l in demo_corpus["train"].read_text(encoding="utf-8").splitlines()[:4]]
    dataset = tmp_path / "mixed.jsonl"
    dataset.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in test_rows + [
        {"prompt": prompt_of(r), "reference": r["output"], "task": r["task"], "metric": r["metric"]} for r in train_rows]), encoding="utf-8")
    models = [("teacher", tiny_teacher), ("student", tiny_student)]
    assert run_eval(_cfg(tmp_path, models, dataset, "hf", tmp_path / "hf", prepared=prepared_tiny)) == 0
    assert run_eval(_cfg(tmp_path, models[:1], dataset, "vllm", tmp_path / "vllm")) == 0

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

    # Contamination: the 4 training rows are counted per task and flagged; scores on the rest are reported.
    c = metrics["contamination"]
    assert (c["checked"], c["examples"], c["contaminated"], c["fraction"]) == (True, 12, 4, pytest.approx(4 / 12))
    expected = collections.Counter(r["task"] for r in train_rows)
    assert {t: v["contaminated"] for t, v in c["per_task"].items()} == {t: expected[t] for t in c["per_task"]}
    assert sum(v["examples"] for v in c["per_task"].values()) == 12
    for name, m in by_name.items():
        rows = [r for r in hf if r["model"] == name]
        assert [r["contaminated"] for r in rows] == [False] * 8 + [True] * 4
        for task, value in m["clean_scores"].items():
            clean = [r["score"] for r in rows if r["task"] == task and not r["contaminated"]]
            assert value == pytest.approx(sum(clean) / len(clean))
    assert "4 of 12 eval prompts (33.3%) occur in the training split" in report and "Scores on the 8 clean examples" in report
    # Without prepared data the check is reported as not run, never as passed.
    vl_metrics = json.loads((tmp_path / "vllm" / "metrics.json").read_text())
    assert vl_metrics["contamination"]["checked"] is False and "clean_scores" not in vl_metrics["models"][0]
    assert all(r["contaminated"] is None for r in vl)
    assert "Not checked: no prepared training split" in (tmp_path / "vllm" / "report.md").read_text()
