"""`distillery eval`: score models on checkable tasks and write a side-by-side report.

    distillery eval CONFIG eval.models='[{path: runs/teacher}, {path: runs/kd}]' eval.dataset=corpus/test.jsonl

Every model gets the same prompts and greedy decoding (vLLM, batched; Hugging Face `generate`
where vLLM cannot load the model). Per model the report has: score per task, val loss and
perplexity on the prepared val split, top-1 agreement and KL to the teacher, generation
tokens/s and latency, parameter counts and size on disk. A quantised export (`distillery export`)
is also compared with the model it was made from: size, speed and score ratios and the KL to it. Eval prompts that occur in the training
split of `data.prepared` are counted and flagged (`evaluation/contamination.py`), and when there
are any, every model is also scored on the rest. Outputs, in `eval.output`
(default `<output_dir>/eval`): `report.md`, `metrics.json`, `examples.jsonl`, `scores.png`,
`speed_quality.png`.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Any

from distillery.config import Config, ConfigError
from distillery.evaluation.contamination import check_contamination
from distillery.evaluation.generation import render_prompt
from distillery.engine_settings import check_engine
from distillery.evaluation.worker import eval_max_model_len, evaluate_on_worker
from distillery.data.answers import score
from distillery.evaluation.metrics import load_jsonl_examples, load_prepared_examples
from distillery.evaluation.model_metrics import parameter_counts, quantised_source, size_on_disk
from distillery.evaluation.report import model_name, render_report, write_plots
from distillery.files import write_text_atomic
from distillery.data.splits import load_manifest
from distillery.models.load import model_identity, resolve_model_dir
from distillery.registry.record import artifact_hashes, finish_stage, new_record, resolve_model_ref
from distillery.runtime import ensure_ray


def _evaluate_one(cfg: Config, m, model_dir: Path, examples: list, labels_by_task: dict[str, list[str]], contamination,
                  teacher_dir: Path | None, local_ray: bool, example_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One model's row of the report: generations and metrics from its Ray task, scored here;
    its examples are appended to `example_rows`."""
    from distillery.models.load import load_tokenizer, model_config

    ec = cfg.eval
    name = model_name(m)
    tok = load_tokenizer(model_dir)
    prompts = [render_prompt(tok, e, ec.chat) for e in examples]
    is_teacher = teacher_dir is not None and model_dir.resolve() == teacher_dir.resolve()
    source = quantised_source(model_dir)
    max_len = eval_max_model_len(
        max((len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts), default=1), ec.max_new_tokens,
        getattr(model_config(model_dir).get_text_config(), "max_position_embeddings", None))
    print(f"eval: generating with {name} ({model_dir})", flush=True)
    gens, metrics = evaluate_on_worker(cfg, local_ray, model_dir, prompts, max_len, None if is_teacher else teacher_dir,
                                       source[1] if source else None)
    if gens.note:
        print(f"eval: {gens.note}", flush=True)
    per_task: dict[str, list[float]] = collections.defaultdict(list)
    clean_per_task: dict[str, list[float]] = collections.defaultdict(list)
    for i, (e, text, ids) in enumerate(zip(examples, gens.texts, gens.token_ids)):
        s = score(e.metric, text.strip(), e.reference, ec.labels or labels_by_task[e.task])
        per_task[e.task].append(s)
        if contamination.flag(i) is False:
            clean_per_task[e.task].append(s)
        example_rows.append({"model": name, "task": e.task, "metric": e.metric, "prompt": e.prompt, "reference": e.reference,
                             "prediction": text, "output_token_ids": ids, "score": s, "contaminated": contamination.flag(i)})
    scores = {t: sum(v) / len(v) for t, v in per_task.items()}
    total, trainable = parameter_counts(model_dir)
    r: dict[str, Any] = {
        "name": name,
        "path": str(model_dir),
        "scores": scores,
        "mean_score": sum(scores.values()) / len(scores),
        "parameters": total,
        "trainable_parameters": trainable,
        "size_bytes": size_on_disk(model_dir),
        "tokens_per_s": gens.output_tokens / gens.seconds if gens.seconds else 0.0,
        "latency_p50_s": sorted(gens.latencies)[len(gens.latencies) // 2] if gens.latencies else None,
        "backend": gens.backend,
    }
    if contamination.count:
        # The same scores on the examples the training split does not hold: the held-out figure.
        r["clean_scores"] = {t: sum(v) / len(v) for t, v in clean_per_task.items()}
        r["clean_mean_score"] = sum(r["clean_scores"].values()) / len(r["clean_scores"]) if r["clean_scores"] else None
    if source is not None:
        r["source"] = str(source[0])
    r.update(metrics)
    clean = f" ({r['clean_mean_score']:.3f} on clean examples)" if r.get("clean_mean_score") is not None else ""
    print(f"eval: {name}: mean score {r['mean_score']:.3f}{clean}, {r['tokens_per_s']:.1f} tokens/s", flush=True)
    return r


def run_eval(cfg: Config) -> int:
    """Evaluate every `eval.models` entry and write the report; returns a process exit code."""
    from distillery.models.load import load_tokenizer

    ec = cfg.eval
    if not ec.models:
        raise ConfigError("eval.models: no models to evaluate")
    check_engine(ec.engine, "eval.engine", cfg.train.use_gpu)
    model_dirs = []
    for i, m in enumerate(ec.models):
        try:
            model_dirs.append(resolve_model_dir(resolve_model_ref(m.path, cfg, f"eval.models.{i}.path")))
        except FileNotFoundError as e:
            raise ConfigError(f"eval.models.{i}.path: {e}") from None
    teacher_path = ec.teacher or cfg.model.teacher
    teacher_dir = resolve_model_dir(teacher_path) if teacher_path and os.path.exists(teacher_path) else None
    tokenizer = load_tokenizer(model_dirs[0])
    if ec.dataset:
        if not os.path.isfile(ec.dataset):
            raise ConfigError(f"eval.dataset: '{ec.dataset}' does not exist")
        examples = load_jsonl_examples(ec.dataset)
    else:
        examples = load_prepared_examples(cfg.prepared_dir, ec.split, tokenizer)
    if ec.max_examples:
        examples = examples[: ec.max_examples]
    tasks = sorted({e.task for e in examples})
    labels_by_task: dict[str, list[str]] = collections.defaultdict(list)
    for e in examples:
        if e.reference not in labels_by_task[e.task]:
            labels_by_task[e.task].append(e.reference)
    out = Path(ec.output or os.path.join(cfg.output_dir, "eval"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"eval: {len(examples)} examples in {len(tasks)} task(s), {len(model_dirs)} model(s) -> {out}", flush=True)
    contamination = check_contamination(examples, cfg.prepared_dir, tokenizer)
    print(contamination.message(), flush=True)

    results, example_rows = [], []
    # Each model runs in a Ray task holding the engine's resources (evaluation/worker.py); inside
    # `ray job submit` this joins the job's cluster.
    started_ray = ensure_ray(num_cpus=os.cpu_count() or 1, log_to_driver=False)
    try:
        for m, model_dir in zip(ec.models, model_dirs):
            results.append(_evaluate_one(cfg, m, model_dir, examples, labels_by_task, contamination, teacher_dir, started_ray, example_rows))
    finally:
        if started_ray:
            import ray

            ray.shutdown()

    write_text_atomic(out / "examples.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in example_rows))
    write_text_atomic(out / "metrics.json", json.dumps({"tasks": tasks, "examples": len(examples), "contamination": contamination.summary(),
                                                        "models": results}, indent=2, ensure_ascii=False))
    write_plots(out, results, tasks)
    report = render_report(results, tasks, len(examples), contamination.summary())
    write_text_atomic(out / "report.md", report)
    print("\n" + report.split("\n![")[0])
    print(f"eval: report {out / 'report.md'}")
    finish_stage(cfg, new_record(
        cfg, "eval", out,
        inputs={"models": [model_identity(d)["hash"] for d in model_dirs],
                "data_fingerprint": None if ec.dataset else load_manifest(cfg.prepared_dir).get("fingerprint")},
        outputs={"artifacts": artifact_hashes(out, ["metrics.json", "report.md"])},
        metrics={r["name"]: r["mean_score"] for r in results},
    ))
    return 0
