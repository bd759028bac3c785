"""Greedy generation for evaluation: vLLM (batched) or Hugging Face `generate`, with throughput and latency."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillery.evaluation.metrics import Example
from distillery.models.load import adapter_base

@dataclass
class Generations:
    texts: list[str]
    token_ids: list[list[int]]
    output_tokens: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    backend: str = ""
    note: str = ""  # why the backend is not the one asked for (shown by the driver: the task's own output stays in its log)


def render_prompt(tokenizer, ex: Example, chat: bool) -> str:
    if ex.rendered or not chat or not getattr(tokenizer, "chat_template", None):
        return ex.prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": ex.prompt}], tokenize=False, add_generation_prompt=True)


def generate_vllm(model_dir: Path, prompts: list[str], max_new_tokens: int, engine: dict[str, Any], latency_probes: int = 4) -> Generations:
    """Greedy generations from a vLLM engine built with `engine` (engine_settings.engine_kwargs of
    eval.engine); LoRA adapters are applied on their base model."""
    from vllm import LLM, SamplingParams

    base = adapter_base(model_dir)
    kwargs: dict[str, Any] = dict(seed=0, **engine)
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


def generate_hf(model_dir: Path, prompts: list[str], max_new_tokens: int, batch_size: int = 16, dtype: str = "float32",
                device: str = "cpu") -> Generations:
    """Greedy generations with transformers, left-padded batches, the model in `dtype` on `device`."""
    import torch

    from distillery.models.load import load_causal_lm, load_tokenizer

    tok = load_tokenizer(model_dir)
    tok.padding_side = "left"
    model = load_causal_lm(model_dir, dtype=dtype).eval().to(device)
    texts, all_ids, n_out, latencies = [], [], 0, []
    stop_ids = _stop_ids(model, tok)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            t = time.perf_counter()
            enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
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


def generate(model_dir: Path, prompts: list[str], max_new_tokens: int, backend: str, engine: dict[str, Any],
             device: str = "cpu") -> Generations:
    """Greedy generations with `backend` (auto: vLLM, falling back to transformers when the engine
    cannot run the model); `engine` holds the vLLM arguments, whose dtype the fallback uses too."""
    if backend in ("auto", "vllm"):
        try:
            return generate_vllm(model_dir, prompts, max_new_tokens, engine)
        except Exception as e:  # noqa: BLE001 - any engine failure falls back when allowed
            if backend == "vllm":
                raise
            gens = generate_hf(model_dir, prompts, max_new_tokens, dtype=engine["dtype"], device=device)
            gens.note = f"vLLM could not run {model_dir} ({type(e).__name__}: {e}); used Hugging Face generate"
            return gens
    return generate_hf(model_dir, prompts, max_new_tokens, dtype=engine["dtype"], device=device)
