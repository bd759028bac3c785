"""Serving under a load ramp: static concurrency limits against the latency-target controller.

    PYTHONPATH=platform python benchmarks/serve_latency.py [--phase-s 15] [--target-x 3]

Builds the ~26M student (as serve_throughput.py), serves it with `distillery serve`'s app (one
engine replica) and drives a closed-loop load ramp through HTTP: concurrency 1 -> 8 -> 32 -> 64 ->
32 -> 8, `--phase-s` seconds each, streamed completions of `--max-tokens` tokens. Each client
request's per-token latency (tpot: time between its first and last token over the tokens in
between) is measured on the client side.

The target is `--target-x` times the unloaded p95 tpot (measured first, at concurrency 1): a
service-level objective stated relative to what the model can do, not a constant fitted to this
machine. The same running replica is then switched (`reconfigure`, Serve's live user_config) between
  - static limits: the engine admits at most N requests at once (N = 16, 32, 64; 64 is
    `max_num_seqs`, the setting without any controller);
  - the controller: `serve.latency_target_ms` = the target (AIMD on the admitted count).
For each: output tokens/s over the whole ramp, and over 5-second windows the share in which the
p95 tpot is within +-20% of the target and the share in which it is at most 1.2x the target (at
concurrency 1 no setting can slow a request up to the target, so the +-20% share is bounded by the
load). The best static setting is the one with the highest throughput.
Prints a table and writes benchmarks/results/serve_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import MAX_LEN, build_model, model_spec, pct  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RAMP = [1, 8, 32, 64, 32, 8]
WINDOW_S = 5.0


def run_load(url: str, prompts: list[str], ramp: list[int], phase_s: float, max_tokens: int) -> list[dict]:
    """Closed-loop clients following `ramp`; one record per finished request."""
    import httpx

    records: list[dict] = []
    lock = threading.Lock()
    active = [0]  # clients allowed to send now
    stop = threading.Event()

    def client(i: int) -> None:
        http = httpx.Client(timeout=300)
        n = 0
        while not stop.is_set():
            if i >= active[0]:
                time.sleep(0.05)
                continue
            body = {"model": "bench", "prompt": prompts[(i * 7 + n) % len(prompts)], "max_tokens": max_tokens,
                    "min_tokens": max_tokens, "temperature": 0, "stream": True}
            t0 = time.monotonic()
            stamps = []
            ok = True
            try:
                with http.stream("POST", url, json=body) as r:
                    ok = r.status_code == 200
                    for line in r.iter_lines():
                        if line.startswith("data: ") and "[DONE]" not in line:
                            stamps.append(time.monotonic())
            except httpx.HTTPError:
                ok = False
            n += 1
            end = time.monotonic()
            tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if ok and len(stamps) > 2 else None
            with lock:
                records.append({"start": t0, "end": end, "ok": ok, "tokens": len(stamps), "tpot": tpot,
                                "ttft": stamps[0] - t0 if stamps else None, "concurrency": active[0]})
        http.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(max(ramp))]
    for t in threads:
        t.start()
    for c in ramp:
        active[0] = c
        time.sleep(phase_s)
    stop.set()
    for t in threads:
        t.join(timeout=300)
    return records


def summarise(records: list[dict], target_s: float) -> dict:
    """Throughput and, over WINDOW_S windows by request end, the p95 tpot against the target."""
    done = [r for r in records if r["ok"] and r["tpot"] is not None]
    t0, t1 = min(r["start"] for r in records), max(r["end"] for r in records)
    windows = []
    t = t0
    while t < t1:
        inside = [r["tpot"] for r in done if t <= r["end"] < t + WINDOW_S]
        if len(inside) >= 3:
            windows.append(pct(inside, 0.95))
        t += WINDOW_S
    band = sum(1 for w in windows if 0.8 * target_s <= w <= 1.2 * target_s)
    under = sum(1 for w in windows if w <= 1.2 * target_s)
    tpots = [r["tpot"] for r in done]
    return {
        "tokens_per_s": sum(r["tokens"] for r in records if r["ok"]) / (t1 - t0),
        "requests": len(records), "errors": sum(1 for r in records if not r["ok"]),
        "p50_tpot_ms": pct(tpots, 0.5) * 1000, "p95_tpot_ms": pct(tpots, 0.95) * 1000,
        "windows": len(windows), "share_within_20pct": band / max(len(windows), 1),
        "share_at_most_1_2x": under / max(len(windows), 1),
        "window_p95_ms": [round(w * 1000, 1) for w in windows],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase-s", type=float, default=15.0, help="seconds at each concurrency of the ramp")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--target-x", type=float, default=3.0, help="latency target as a multiple of the unloaded p95 tpot")
    ap.add_argument("--static", default="16,32,64", help="static admission limits to compare")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    args = ap.parse_args()
    statics = [int(x) for x in args.static.split(",")]

    import ray
    from ray import serve

    from distillery.config import Config
    from distillery.serving.app import APP_NAME, build_app

    with tempfile.TemporaryDirectory() as tmp:
        print("building the model ...", flush=True)
        model_dir, prompts = build_model(Path(tmp), model_spec(args.layers, args.hidden))
        port = 8766
        cfg = Config.model_validate({"serve": {
            "models": [{"path": str(model_dir), "name": "bench"}], "port": port, "max_model_len": MAX_LEN,
            "max_num_seqs": 64, "max_ongoing_requests": 128, "max_queued_requests": 256,
            "latency_target_ms": 1000.0,  # replaced once the unloaded latency is measured
        }})
        ray.init(num_cpus=4, include_dashboard=False)
        results: dict[str, dict] = {}
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
            engine = serve.get_deployment_handle("DistilleryLLMServer:bench", app_name=APP_NAME)
            url = f"http://127.0.0.1:{port}/v1/completions"
            print("unloaded latency (concurrency 1) ...", flush=True)
            engine.reconfigure.remote({"max_admitted": 64}).result()
            calib = run_load(url, prompts, [1], max(args.phase_s, 10), args.max_tokens)
            unloaded = pct([r["tpot"] for r in calib if r["tpot"] is not None], 0.95)
            target = args.target_x * unloaded
            print(f"  p95 tpot {unloaded * 1000:.1f} ms; target {target * 1000:.1f} ms", flush=True)
            settings = [(f"static {n}", {"max_admitted": n}) for n in statics]
            settings.append(("controller", {"max_admitted": 64, "latency_target_ms": target * 1000, "latency_metric": "tpot"}))
            for name, user_config in settings:
                print(f"ramp {RAMP} x {args.phase_s:g} s, {name} ...", flush=True)
                engine.reconfigure.remote(user_config).result()
                records = run_load(url, prompts, RAMP, args.phase_s, args.max_tokens)
                results[name] = summarise(records, target)
                if name == "controller":
                    results[name]["admission"] = engine.engine_load.remote().result()["admission"]
                r = results[name]
                print(f"  {r['tokens_per_s']:.0f} tok/s, p95 tpot {r['p95_tpot_ms']:.1f} ms, "
                      f"windows at most 1.2x target {r['share_at_most_1_2x']:.0%}", flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()

    best = max((n for n in results if n.startswith("static")), key=lambda n: results[n]["tokens_per_s"])
    print(f"\ntarget p95 tpot {target * 1000:.1f} ms ({args.target_x:g}x unloaded {unloaded * 1000:.1f} ms); "
          f"ramp {RAMP} x {args.phase_s:g} s")
    print(f"{'setting':<14} {'tok/s':>7} {'vs best static':>15} {'p50 tpot ms':>12} {'p95 tpot ms':>12} "
          f"{'p95 within 20%':>15} {'p95 <= 1.2x':>12} {'errors':>7}")
    for name, r in results.items():
        print(f"{name:<14} {r['tokens_per_s']:>7.0f} {r['tokens_per_s'] / results[best]['tokens_per_s']:>14.2f}x "
              f"{r['p50_tpot_ms']:>12.1f} {r['p95_tpot_ms']:>12.1f} {r['share_within_20pct']:>15.0%} "
              f"{r['share_at_most_1_2x']:>12.0%} {r['errors']:>7}")
    ratio = results["controller"]["tokens_per_s"] / results[best]["tokens_per_s"]
    print(f"\ncontroller throughput vs best static ({best}): {ratio:.2f}x (target >= 0.90)")
    print(f"windows with p95 at most 1.2x target: controller {results['controller']['share_at_most_1_2x']:.0%}, "
          f"{best} {results[best]['share_at_most_1_2x']:.0%}")
    out = REPO / "benchmarks" / "results" / "serve_latency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps({"ramp": RAMP, "phase_s": args.phase_s, "max_tokens": args.max_tokens,
                                   "unloaded_p95_tpot_s": unloaded, "target_s": target, "best_static": best,
                                   "controller_vs_best_static": ratio, "results": results}, indent=2))
    os.replace(tmp_out, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
