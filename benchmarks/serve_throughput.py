"""Serving throughput: `distillery serve` over HTTP vs a Hugging Face generate loop vs in-process vLLM.

    PYTHONPATH=platform python benchmarks/serve_throughput.py [--max-tokens 64] [--layers 8 --hidden 512]

Builds a small Llama locally (init-model, no download), then measures output tokens/s and
p50/p95 request latency
  - HF: `model.generate` serving one request at a time (a plain Python server loop);
  - vLLM: in-process `LLM.generate` on all prompts at once (no HTTP, no Serve);
  - Serve: the Distillery Serve app through its HTTP endpoint at concurrency 1, 8 and 32.
Every request generates exactly --max-tokens tokens (min_tokens = max_tokens), so tokens/s compare.
Each concurrency level sends --waves x concurrency requests (at least 8), so the pool stays full.
Serve's per-request cost (proxy, ingress, router, engine client) is fixed while the engine's work
grows with the model and the output length. On 2 cores, a 2.5M-parameter model (--layers 4
--hidden 256 --max-tokens 32) is all overhead: Serve then reaches about 3x the HF loop and a third
of in-process vLLM; the default student-sized model shows what a real student pays.
Prints a table and writes benchmarks/results/serve_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_POSITION = 512
MAX_LEN = 256  # the engines' context: prompt plus answer


def model_spec(layers: int, hidden: int) -> dict:
    """A Llama whose heads (64 wide, half as many KV heads) and MLP (3x) scale with `hidden`."""
    return dict(arch="llama", layers=layers, hidden=hidden, heads=hidden // 64, kv_heads=max(1, hidden // 128),
                intermediate=3 * hidden, max_position=MAX_POSITION)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def build_model(root: Path, spec: dict) -> tuple[Path, list[str]]:
    from distillery.demo.corpus import write_corpus
    from distillery.models.init_model import ArchSpec, init_model

    corpus = write_corpus(root / "corpus", n_train=300, n_test=64, seed=0)
    init_model(root / "model", ArchSpec(**spec), corpus=[str(corpus["train"])], vocab_size=1024, seed=0)
    prompts = [json.loads(line)["prompt"][:200] for line in corpus["test"].read_text().splitlines()]
    return root / "model", prompts


def bench_hf(model_dir: Path, prompts: list[str], max_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lat, tokens = [], 0
    start = time.perf_counter()
    for p in prompts:
        t0 = time.perf_counter()
        enc = tok(p, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        tokens += out.shape[1] - enc["input_ids"].shape[1]
        lat.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    return {"tokens_per_s": tokens / wall, "p50_s": pct(lat, 0.5), "p95_s": pct(lat, 0.95), "requests": len(prompts)}


VLLM_SCRIPT = """
import json, sys, time
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    model, prompts, max_tokens, max_len = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    llm = LLM(model=model, dtype="float32", max_model_len=max_len, max_num_seqs=64, enforce_eager=True, seed=0)
    sp = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0)
    llm.generate(prompts[:4], sp, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print("RESULT " + json.dumps({"tokens_per_s": tokens / wall, "p50_s": wall, "p95_s": wall, "requests": len(prompts)}))
"""


def bench_vllm(model_dir: Path, prompts: list[str], max_tokens: int, tmp: Path) -> dict:
    # A separate process: vLLM spawns workers, and its engine must be gone before Serve starts.
    script = tmp / "vllm_bench.py"
    script.write_text(VLLM_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(model_dir), json.dumps(prompts), str(max_tokens), str(MAX_LEN)],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")})
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"vLLM benchmark failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT "):])


def bench_serve(model_dir: Path, prompts: list[str], max_tokens: int, levels: list[int], waves: int) -> dict:
    import httpx
    import ray
    from ray import serve

    from distillery.config import Config
    from distillery.serving.app import APP_NAME, build_app

    port = 8765
    cfg = Config.model_validate({"serve": {
        "models": [{"path": str(model_dir), "name": "bench"}], "port": port, "max_model_len": MAX_LEN,
        "max_num_seqs": 64, "max_ongoing_requests": 64, "max_queued_requests": 256,
    }})
    ray.init(num_cpus=4, include_dashboard=False)
    results = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/completions"
        http = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64))

        def one(prompt: str) -> tuple[float, int]:
            t0 = time.perf_counter()
            r = http.post(url, json={"model": "bench", "prompt": prompt, "max_tokens": max_tokens,
                                     "min_tokens": max_tokens, "temperature": 0})
            r.raise_for_status()
            return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]

        one(prompts[0])  # warm-up
        for c in levels:
            batch = (prompts * waves)[: max(c * waves, 8)]
            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=c) as pool:
                out = list(pool.map(one, batch))
            wall = time.perf_counter() - start
            lat = [o[0] for o in out]
            results[c] = {"tokens_per_s": sum(o[1] for o in out) / wall, "p50_s": statistics.median(lat),
                          "p95_s": pct(lat, 0.95), "requests": len(batch)}
            print(f"  serve c={c}: {results[c]['tokens_per_s']:.0f} tok/s", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--hf-requests", type=int, default=8)
    ap.add_argument("--waves", type=int, default=4, help="requests per concurrency level = waves x concurrency")
    # The default is student-sized (~26M parameters): big enough that decoding, not Python, is the work.
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512, help="hidden size; heads and MLP width scale with it")
    args = ap.parse_args()
    spec = model_spec(args.layers, args.hidden)
    levels = [1, 8, 32]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("building the model ...", flush=True)
        model_dir, prompts = build_model(tmp, spec)
        prompts = (prompts * 2)[:64]
        print("HF generate loop ...", flush=True)
        hf = bench_hf(model_dir, prompts[: args.hf_requests], args.max_tokens)
        print("in-process vLLM ...", flush=True)
        vl = bench_vllm(model_dir, prompts[:32], args.max_tokens, tmp)
        print("Serve over HTTP ...", flush=True)
        sv = bench_serve(model_dir, prompts, args.max_tokens, levels, args.waves)

    rows = [("HF generate, one at a time", hf), ("vLLM LLM.generate, 32 prompts in-process", vl)]
    rows += [(f"distillery serve, HTTP, concurrency {c}", sv[c]) for c in levels]
    print(f"\n{'setup':<44} {'tok/s':>8} {'p50 s':>8} {'p95 s':>8} {'vs HF':>7}")
    for name, r in rows:
        print(f"{name:<44} {r['tokens_per_s']:>8.0f} {r['p50_s']:>8.2f} {r['p95_s']:>8.2f} "
              f"{r['tokens_per_s'] / hf['tokens_per_s']:>6.1f}x")
    speedup = sv[32]["tokens_per_s"] / hf["tokens_per_s"]
    overhead = 1 - sv[32]["tokens_per_s"] / vl["tokens_per_s"]
    print(f"\nServe at concurrency 32 vs HF loop: {speedup:.1f}x (target >= 20x)")
    print(f"Serve overhead vs in-process vLLM at 32: {overhead * 100:.0f}% (target <= 15%)")
    out = REPO / "benchmarks" / "results" / "serve_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps({"spec": spec, "max_tokens": args.max_tokens, "waves": args.waves, "hf": hf, "vllm": vl,
                                   "serve": {str(k): v for k, v in sv.items()},
                                   "serve32_vs_hf": speedup, "serve_overhead_vs_vllm": overhead}, indent=2))
    os.replace(tmp_out, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
