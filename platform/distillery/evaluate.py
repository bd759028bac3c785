"""`distillery eval`: score models on checkable tasks and write a side-by-side report.

    distillery eval CONFIG eval.models='[{path: runs/teacher}, {path: runs/kd}]' eval.dataset=corpus/test.jsonl

Every model gets the same prompts and greedy decoding (vLLM, batched; Hugging Face `generate`
where vLLM cannot load the model). Per model the report has: score per task, val loss and
perplexity on the prepared val split, top-1 agreement and KL to the teacher, generation
tokens/s and latency, parameter counts and size on disk. Outputs, in `eval.output`
(default `<output_dir>/eval`): `report.md`, `metrics.json`, `examples.jsonl`, `scores.png`,
`speed_quality.png`.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import string
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillery.config import Config, ConfigError, EvalModelConfig
from distillery.models.load import adapter_base, resolve_model_dir

METRICS = ("exact_match", "f1", "accuracy", "contains", "regex")


# --------------------------------------------------------------------------- metrics


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: NFKC, lower case, no punctuation (ASCII and CJK), no articles, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(ch for ch in text if ch not in string.punctuation and not unicodedata.category(ch).startswith("P"))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _tokens(text: str) -> list[str]:
    # CJK has no spaces: each CJK character counts as a token, as in multilingual SQuAD variants.
    out: list[str] = []
    for word in normalize_answer(text).split():
        buf = ""
        for ch in word:
            if "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf":
                if buf:
                    out.append(buf)
                    buf = ""
                out.append(ch)
            else:
                buf += ch
        if buf:
            out.append(buf)
    return out


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 between a prediction and a reference."""
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = collections.Counter(pred) & collections.Counter(ref)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def predicted_label(prediction: str, labels: list[str]) -> str | None:
    """The label a free-text prediction names: the exact label, else the first label mentioned."""
    norm = normalize_answer(prediction)
    by_norm = {normalize_answer(l): l for l in labels}
    if norm in by_norm:
        return by_norm[norm]
    hits = [(norm.find(k), l) for k, l in by_norm.items() if k and k in norm]
    return min(hits)[1] if hits else None


def score(metric: str, prediction: str, reference: str, labels: list[str] | None = None) -> float:
    """Score one prediction in [0, 1] with the named metric."""
    if metric == "exact_match":
        return float(normalize_answer(prediction) == normalize_answer(reference))
    if metric == "f1":
        return token_f1(prediction, reference)
    if metric == "accuracy":
        return float(predicted_label(prediction, labels or [reference]) == reference)
    if metric == "contains":
        return float(normalize_answer(reference) in normalize_answer(prediction))
    if metric == "regex":
        return float(re.search(reference, prediction) is not None)
    raise ValueError(f"metric: unknown metric '{metric}' (one of {', '.join(METRICS)})")


# --------------------------------------------------------------------------- eval set


@dataclass
class Example:
    prompt: str
    reference: str
    task: str
    metric: str
    rendered: bool = False  # True when the prompt already went through the chat template


def load_jsonl_examples(path: str) -> list[Example]:
    """Read {prompt, reference, task, metric} rows; a bad row fails naming its line and field."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"eval.dataset {path}:{lineno}: not valid JSON ({e.msg})") from None
            for key in ("prompt", "reference"):
                if not isinstance(row.get(key), str):
                    raise ConfigError(f"eval.dataset {path}:{lineno}: field '{key}' must be a string")
            metric = row.get("metric", "exact_match")
            if metric not in METRICS:
                raise ConfigError(f"eval.dataset {path}:{lineno}: field 'metric' is '{metric}', not one of {METRICS}")
            examples.append(Example(row["prompt"], row["reference"], str(row.get("task", "default")), metric))
    if not examples:
        raise ConfigError(f"eval.dataset {path}: no examples")
    return examples


def load_prepared_examples(prepared: str, split: str, tokenizer) -> list[Example]:
    """Examples from a prepared split: the rendered prompt, and the response without template tokens."""
    import pyarrow.parquet as pq

    from distillery.data.splits import split_dir

    d = split_dir(prepared, split)
    if not os.path.isdir(d):
        raise ConfigError(f"eval: no dataset given and no prepared split at '{d}' (run `distillery prepare` or set eval.dataset)")
    examples = []
    for name in sorted(os.listdir(d)):
        if not name.endswith(".parquet"):
            continue
        table = pq.read_table(os.path.join(d, name))
        cols = table.column_names
        for row in table.to_pylist():
            if row.get("augment"):
                continue
            ref_ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
            reference = tokenizer.decode(ref_ids, skip_special_tokens=True).strip()
            task = row.get("task") or row.get("source") or "default"
            metric = row.get("metric") if "metric" in cols and row.get("metric") in METRICS else "exact_match"
            examples.append(Example(row["prompt"], reference, str(task), metric, rendered=True))
    return examples


# --------------------------------------------------------------------------- generation


@dataclass
class Generations:
    texts: list[str]
    token_ids: list[list[int]]
    output_tokens: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    backend: str = ""


def _render(tokenizer, ex: Example, chat: bool) -> str:
    if ex.rendered or not chat or not getattr(tokenizer, "chat_template", None):
        return ex.prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": ex.prompt}], tokenize=False, add_generation_prompt=True)


def generate_vllm(model_dir: Path, prompts: list[str], max_new_tokens: int, latency_probes: int = 4) -> Generations:
    """Greedy generations from a vLLM engine; LoRA adapters are applied on their base model."""
    from vllm import LLM, SamplingParams

    base = adapter_base(model_dir)
    kwargs: dict[str, Any] = dict(dtype="float32", seed=0, enforce_eager=True, max_model_len=1024)
    lora = None
    if base is not None:
        from vllm.lora.request import LoRARequest

        cfg = json.loads((model_dir / "adapter_config.json").read_text())
        kwargs.update(enable_lora=True, max_lora_rank=max(8, int(cfg.get("r", 8))))
        lora = LoRARequest("adapter", 1, str(model_dir))
    llm = LLM(model=str(base or model_dir), **kwargs)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    try:
        start = time.perf_counter()
        outs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        seconds = time.perf_counter() - start
        latencies = []
        for p in prompts[:latency_probes]:  # single-request latency, the way one user sees it
            t = time.perf_counter()
            llm.generate([p], params, lora_request=lora, use_tqdm=False)
            latencies.append(time.perf_counter() - t)
    finally:
        del llm
    ids = [list(o.outputs[0].token_ids) for o in outs]
    return Generations([o.outputs[0].text for o in outs], ids, sum(map(len, ids)), seconds, latencies, "vllm")


def generate_hf(model_dir: Path, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> Generations:
    """Greedy generations with transformers, left-padded batches."""
    import torch

    from distillery.models.load import load_causal_lm, load_tokenizer

    tok = load_tokenizer(model_dir)
    tok.padding_side = "left"
    model = load_causal_lm(model_dir).eval()
    texts, all_ids, n_out, latencies = [], [], 0, []
    stop_ids = _stop_ids(model, tok)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            t = time.perf_counter()
            enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            new = out[:, enc["input_ids"].shape[1] :]
            for row in new:
                row = row.tolist()
                # vLLM keeps the stop token in its ids; do the same so both backends report alike.
                stop = next((j for j, t_id in enumerate(row) if t_id in stop_ids), None)
                row = row[: stop + 1] if stop is not None else row
                n_out += len(row)
                all_ids.append(row)
                texts.append(tok.decode(row, skip_special_tokens=True))
            latencies.append(time.perf_counter() - t)
    return Generations(texts, all_ids, n_out, time.perf_counter() - start, latencies, "hf")


def _stop_ids(model, tok) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id, tok.pad_token_id}
    return {i for i in ids if i is not None}


def generate(model_dir: Path, prompts: list[str], max_new_tokens: int, backend: str) -> Generations:
    if backend in ("auto", "vllm"):
        try:
            return generate_vllm(model_dir, prompts, max_new_tokens)
        except Exception as e:  # noqa: BLE001 - any engine failure falls back when allowed
            if backend == "vllm":
                raise
            print(f"eval: vLLM could not run {model_dir} ({type(e).__name__}: {e}); using Hugging Face generate", flush=True)
    return generate_hf(model_dir, prompts, max_new_tokens)


# --------------------------------------------------------------------------- model-level numbers


def size_on_disk(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).rglob("*") if p.is_file())


def parameter_counts(model_dir: Path) -> tuple[int, int]:
    """(total parameters of the model as served, trainable parameters of the run)."""
    from safetensors import safe_open

    def count(d: Path, pattern: str) -> int:
        n = 0
        for f in d.glob(pattern):
            with safe_open(str(f), "pt") as st:
                for k in st.keys():
                    n += math.prod(st.get_slice(k).get_shape())
        return n

    base = adapter_base(model_dir)
    if base is None:
        total = count(model_dir, "*.safetensors")
        return total, total
    adapter = count(model_dir, "adapter_model.safetensors")
    return count(resolve_model_dir(base), "*.safetensors") + adapter, adapter


def val_and_teacher_metrics(model_dir: Path, teacher_dir: Path | None, prepared: str, max_rows: int = 256) -> dict[str, float]:
    """Val loss / perplexity on response tokens, and top-1 agreement and KL(teacher‖model) when a teacher is given."""
    import pyarrow.parquet as pq
    import torch
    import torch.nn.functional as F

    from distillery.data.splits import IGNORE_INDEX, split_dir
    from distillery.models.load import load_causal_lm, load_tokenizer

    d = split_dir(prepared, "val")
    files = sorted(f for f in os.listdir(d) if f.endswith(".parquet")) if os.path.isdir(d) else []
    if not files:
        return {}
    rows = []
    for f in files:
        rows.extend(pq.read_table(os.path.join(d, f), columns=["input_ids", "labels"]).to_pylist())
        if len(rows) >= max_rows:
            break
    rows = rows[:max_rows]
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir).eval()
    teacher = load_causal_lm(teacher_dir).eval() if teacher_dir else None
    nll = n_tok = agree = kl_sum = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), 8):
            batch = rows[i : i + 8]
            width = max(len(r["input_ids"]) for r in batch)
            ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, r in enumerate(batch):
                n = len(r["input_ids"])
                ids[j, :n] = torch.tensor(r["input_ids"])
                labels[j, :n] = torch.tensor(r["labels"])
                mask[j, :n] = 1
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            target = labels[:, 1:]
            sel = target != IGNORE_INDEX
            nll += F.cross_entropy(logits[sel], target[sel], reduction="sum").item()
            n_tok += sel.sum().item()
            if teacher is not None:
                t_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1].float()[sel]
                s_logits = logits[sel]
                agree += (t_logits.argmax(-1) == s_logits.argmax(-1)).sum().item()
                t_logp, s_logp = F.log_softmax(t_logits, -1), F.log_softmax(s_logits, -1)
                kl_sum += (t_logp.exp() * (t_logp - s_logp)).sum().item()
    if n_tok == 0:
        return {}
    out = {"val_loss": nll / n_tok, "val_perplexity": math.exp(min(nll / n_tok, 50))}
    if teacher is not None:
        out.update(teacher_top1_agreement=agree / n_tok, teacher_kl=kl_sum / n_tok)
    return out


# --------------------------------------------------------------------------- report


def _name(m: EvalModelConfig) -> str:
    return m.name or Path(m.path.rstrip("/")).name


def write_plots(out: Path, results: list[dict], tasks: list[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(tasks) * max(1, len(results)) / 2), 3.6))
    width = 0.8 / max(1, len(results))
    for i, r in enumerate(results):
        xs = [t + i * width for t in range(len(tasks))]
        ax.bar(xs, [r["scores"].get(t, 0.0) for t in tasks], width, label=r["name"])
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title("Score per task")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "scores.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for r in results:
        ax.scatter(r["tokens_per_s"], r["mean_score"], s=60)
        ax.annotate(r["name"], (r["tokens_per_s"], r["mean_score"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("generation tokens/s")
    ax.set_ylabel("mean task score")
    ax.set_title("Speed against quality")
    fig.tight_layout()
    paths.append(out / "speed_quality.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_report(results: list[dict], tasks: list[str], n_examples: int) -> str:
    head = "| model | params | size | " + " | ".join(tasks) + " | mean | tokens/s |"
    sep = "|" + "---|" * (len(tasks) + 5)
    lines = ["# Evaluation report", "", f"{n_examples} examples, greedy decoding, same prompts for every model.", "", head, sep]
    for r in results:
        cells = [r["name"], f"{r['parameters']:,}", _human_bytes(r["size_bytes"])]
        cells += [f"{r['scores'].get(t, 0.0):.3f}" for t in tasks]
        cells += [f"{r['mean_score']:.3f}", f"{r['tokens_per_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| model | trainable | val loss | perplexity | teacher top-1 | teacher KL | p50 latency (s) | backend |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        def f(key, fmt="{:.3f}"):
            return fmt.format(r[key]) if r.get(key) is not None else "–"

        lines.append(
            f"| {r['name']} | {r['trainable_parameters']:,} | {f('val_loss')} | {f('val_perplexity', '{:.2f}')} | "
            f"{f('teacher_top1_agreement')} | {f('teacher_kl')} | {f('latency_p50_s')} | {r['backend']} |"
        )
    lines += ["", "![scores](scores.png)", "", "![speed against quality](speed_quality.png)", ""]
    return "\n".join(lines)


def run_eval(cfg: Config) -> int:
    """Evaluate every `eval.models` entry and write the report; returns a process exit code."""
    from distillery.models.load import load_tokenizer

    ec = cfg.eval
    if not ec.models:
        raise ConfigError("eval.models: no models to evaluate")
    model_dirs = []
    for i, m in enumerate(ec.models):
        try:
            model_dirs.append(resolve_model_dir(m.path))
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

    results, example_rows = [], []
    for m, model_dir in zip(ec.models, model_dirs):
        name = _name(m)
        tok = load_tokenizer(model_dir)
        prompts = [_render(tok, e, ec.chat) for e in examples]
        print(f"eval: generating with {name} ({model_dir})", flush=True)
        gens = generate(model_dir, prompts, ec.max_new_tokens, ec.backend)
        per_task: dict[str, list[float]] = collections.defaultdict(list)
        for e, text, ids in zip(examples, gens.texts, gens.token_ids):
            s = score(e.metric, text.strip(), e.reference, ec.labels or labels_by_task[e.task])
            per_task[e.task].append(s)
            example_rows.append({"model": name, "task": e.task, "metric": e.metric, "prompt": e.prompt, "reference": e.reference, "prediction": text, "output_token_ids": ids, "score": s})
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
        is_teacher = teacher_dir is not None and model_dir.resolve() == teacher_dir.resolve()
        r.update(val_and_teacher_metrics(model_dir, None if is_teacher else teacher_dir, cfg.prepared_dir))
        results.append(r)
        print(f"eval: {name}: mean score {r['mean_score']:.3f}, {r['tokens_per_s']:.1f} tokens/s", flush=True)

    with open(out / "examples.jsonl", "w", encoding="utf-8") as f:
        for row in example_rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps({"tasks": tasks, "examples": len(examples), "models": results}, indent=2, ensure_ascii=False))
    write_plots(out, results, tasks)
    report = render_report(results, tasks, len(examples))
    (out / "report.md").write_text(report, encoding="utf-8")
    print("\n" + report.split("\n![")[0])
    print(f"eval: report {out / 'report.md'}")
    return 0
