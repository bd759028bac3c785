"""Sparse teacher caches against online distillation: how close does each student get to the full teacher?

    PYTHONPATH=platform python benchmarks/sparse_cache.py [--temperatures 2,1] [--steps 150] [--rows 1200]

A teacher (a 2-layer Llama, vocabulary 2,048, built locally and fine-tuned until clearly better than
chance) teaches one student (1 layer) several ways, everything else equal (rows, order, steps, lr,
forward KL with alpha 0.7, seed), at each temperature of `--temperatures` (PLAN says which ways):

    online        the teacher runs every step (the reference)
    top-9         plain cache, distill.top_k 9, cache_samples 0: 9·4 + 4 = 40 B per target position
    sampled       the default cache, top_k 4 + cache_samples 4 drawn at the run's temperature:
                  at most 4·4 + 4 + 4·5 = 40 B (same bytes as top-9: 1% of dense fp16)
    sampled m=32  top_k 4 + 32 draws (at most 180 B): what more draws buy
    top-32        plain cache with top_k 32 (132 B)

Each student's final KL(teacher ‖ student) and top-1 agreement at T = 1 over the val split's response
positions are measured afterwards against the FULL teacher (`val_and_teacher_metrics`), and next to
them the run's own val metrics: `val_teacher_kl` (the full teacher, loaded for evaluation in cached
mode) and `val_teacher_kl_cache` (what the cache alone says). Bytes per target position are the
cache manifest's (raw values and on disk) against dense fp16 logits (2·V = 4,096 B).
Target: the sampled cache within 2% of online's teacher KL at <= 1% of dense fp16 bytes.
Prints a table and writes benchmarks/results/sparse_cache.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # prepared-data writer shared with the tests

from report import write_result  # noqa: E402  (same directory)

TEACHER = dict(arch="llama", layers=2, hidden=128, heads=4, kv_heads=2, intermediate=344)
STUDENT = dict(arch="llama", layers=1, hidden=64, heads=2, kv_heads=1, intermediate=172)
VOCAB = 2048
KD = ["distill.loss=forward_kl", "distill.alpha=0.7"]  # + distill.temperature
VARIANTS = {  # name -> (teacher_mode, top_k, cache_samples); cached tails are drawn at the run's temperature
    "online": ("online", 4, 4),
    "top-9": ("cached", 9, 0),
    "sampled": ("cached", 4, 4),
    "sampled m=32": ("cached", 4, 32),
    "top-32": ("cached", 32, 0),
}
PLAN = {  # temperature -> the variants run at it
    2.0: ["online", "top-9", "sampled", "sampled m=32", "top-32"],
    1.0: ["online", "top-9", "sampled"],
}


def common(args, out: Path, prepared: Path) -> list[str]:
    return [
        f"output_dir={out}", f"data.prepared={prepared}", f"train.batch_size={args.batch_size}", "train.num_workers=1",
        "train.strategy=none", "train.scheduler=constant", "train.cpus_per_worker=2", "seed=0",
    ]


def build(work: Path, args) -> tuple[Path, Path, Path]:
    """Corpus, tokenizer, teacher and student (initialised), prepared splits."""
    from prepared_fixture import write_prepared

    from distillery.demo.corpus import write_corpus
    from distillery.models.init_model import ArchSpec, init_model

    corpus = write_corpus(work / "corpus", n_train=args.rows, n_test=10, seed=0)
    teacher, student = work / "teacher-init", work / "student"
    padded = {"vocab_size": VOCAB}  # the output layer has exactly VOCAB rows, whatever the trained tokenizer reached
    init_model(teacher, ArchSpec(**TEACHER, extra=padded), corpus=[str(corpus["train"])], vocab_size=VOCAB, seed=0)
    init_model(student, ArchSpec(**STUDENT, extra=padded), tokenizer_from=str(teacher), seed=1)
    return teacher, student, write_prepared(corpus["train"], teacher, work / "prepared")


def train_teacher(work: Path, init: Path, prepared: Path, args) -> Path:
    from distillery.config import load_config
    from distillery.train.finetune import run_finetune

    out = work / "teacher"
    cfg = load_config(None, common(args, out, prepared) + [f"model.path={init}", f"train.max_steps={args.teacher_steps}",
                                                          f"train.lr={args.teacher_lr}"])
    if run_finetune(cfg) != 0:
        raise RuntimeError("teacher fine-tuning failed")
    return out


def distil(name: str, work: Path, teacher: Path, student: Path, prepared: Path, args, temperature: float) -> dict:
    from distillery.config import load_config
    from distillery.distill.method import run_distill
    from distillery.distill.teacher_cache import load_cache_manifest, run_cache_teacher
    from distillery.evaluation.model_metrics import val_and_teacher_metrics

    mode, top_k, samples = VARIANTS[name]
    slug = f"{name.replace(' ', '').replace('=', '')}-T{temperature:g}"
    out = work / f"kd-{slug}"
    cfg = load_config(None, common(args, out, prepared) + KD + [f"distill.temperature={temperature}",
        f"model.path={student}", f"model.teacher={teacher}", f"train.max_steps={args.steps}", f"train.lr={args.lr}",
        f"distill.teacher_mode={mode}", f"distill.top_k={top_k}", f"distill.cache_samples={samples}",
        f"distill.cache={work / f'cache-{slug}'}", "distill.cache_backend=hf", "distill.cache_batch_size=16",
    ])
    result: dict = {"teacher_mode": mode}
    done = (out / "run.json").is_file()  # a student an earlier run of this script (same --workdir) finished: measured again only
    if mode == "cached":
        if not done and run_cache_teacher(cfg) != 0:
            raise RuntimeError(f"cache-teacher ({name}) failed")
        m = load_cache_manifest(cfg.teacher_cache_dir)
        result.update(cache_s=m["seconds"], cache_mode=m["cache_mode"], top_k=m["top_k"], cache_samples=m["cache_samples"],
                      sample_temperature=m["sample_temperature"], raw_bytes_per_token=m["raw_bytes_per_token"],
                      raw_bytes_per_token_max=m["raw_bytes_per_token_max"], disk_bytes_per_token=m["disk_bytes_per_token"],
                      sampled_entries_per_token=m["sampled_entries_per_token"])
    if not done and run_distill(cfg) != 0:
        raise RuntimeError(f"distill ({name}) failed")
    result["train_s"] = json.loads((out / "run.json").read_text()).get("seconds")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_loss" in r][-1]
    result["run_val"] = {k: val[k] for k in ("val_loss", "val_teacher_kl", "val_teacher_top1_agreement", "val_teacher_kl_cache") if k in val}
    full = val_and_teacher_metrics(out / "model", teacher / "model", str(prepared))
    result.update(teacher_kl=full["teacher_kl"], teacher_top1_agreement=full["teacher_top1_agreement"], val_loss=full["val_loss"])
    print(f"T={temperature:g} {name}: KL to the full teacher {full['teacher_kl']:.4f}, run's own {result['run_val']}", flush=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1200, help="corpus rows (one in ten goes to val)")
    ap.add_argument("--teacher-steps", type=int, default=400)
    ap.add_argument("--teacher-lr", type=float, default=2e-3)
    ap.add_argument("--steps", type=int, default=150, help="student steps")
    ap.add_argument("--lr", type=float, default=3e-3, help="student lr")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--temperatures", default="2,1", help="distill.temperature values to run PLAN at")
    ap.add_argument("--variants", default=None, help="comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--workdir", default=None, help="an earlier run's workdir: its data, trained teacher and finished students are reused")
    args = ap.parse_args()
    import math

    import ray

    from distillery.evaluation.model_metrics import val_and_teacher_metrics
    from distillery.runtime import ensure_ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="distillery-sparse-cache-"))
    t_start = time.perf_counter()
    reuse = (work / "teacher" / "model").is_dir()
    init, student, prepared = (work / "teacher-init", work / "student", work / "prepared") if reuse else build(work, args)
    wanted = set(args.variants.split(",")) if args.variants else set(VARIANTS)
    results: dict[str, dict[str, dict]] = {}
    ensure_ray(num_cpus=4, include_dashboard=False, log_to_driver=False)  # 2 for the train worker, 2 for Ray Data / the cache actor
    try:
        teacher = work / "teacher" if reuse else train_teacher(work, init, prepared, args)
        teacher_val = val_and_teacher_metrics(teacher / "model", None, str(prepared))["val_loss"]
        print(f"teacher val loss {teacher_val:.3f} nats/token (uniform: {math.log(VOCAB):.3f})", flush=True)
        for temperature in (float(t) for t in args.temperatures.split(",")):
            names = [n for n in PLAN.get(temperature, list(VARIANTS)) if n in wanted]
            results[f"T={temperature:g}"] = {n: distil(n, work, teacher, student, prepared, args, temperature) for n in names}
    finally:
        ray.shutdown()

    dense = 2 * VOCAB
    print(f"\n{'T':>3} {'student':<20} {'KL to teacher':>13} {'vs online':>9} {'top-1':>6} {'run val_teacher_kl':>18} "
          f"{'run ..._kl_cache':>16} {'raw B/tok':>9} {'disk B/tok':>10} {'% dense fp16':>12}")
    summary = {}
    for t_key, runs in results.items():
        ref = runs.get("online", {}).get("teacher_kl")
        for name, r in runs.items():
            rv = r["run_val"]
            raw = r.get("raw_bytes_per_token")
            vs = f"{r['teacher_kl'] / ref - 1:+.1%}" if ref else "-"
            share = f"{100 * raw / dense:.2f}%" if raw else "-"
            print(f"{t_key[2:]:>3} {name:<20} {r['teacher_kl']:>13.4f} {vs:>9} {r['teacher_top1_agreement']:>6.3f} "
                  f"{rv.get('val_teacher_kl', float('nan')):>18.4f} {rv.get('val_teacher_kl_cache', float('nan')):>16.4f} "
                  f"{str(raw if raw is not None else '-'):>9} {str(r.get('disk_bytes_per_token', '-')):>10} {share:>12}")
        if ref and "sampled" in runs:
            summary[t_key] = runs["sampled"]["teacher_kl"] / ref - 1
    for t_key, rel in summary.items():
        print(f"{t_key}: sampled cache KL {rel:+.1%} vs online (target within 2%) at "
              f"{100 * results[t_key]['sampled']['raw_bytes_per_token_max'] / dense:.2f}% of dense fp16 at most (target <= 1%)")
    payload = {
        "teacher": TEACHER, "student": STUDENT, "vocab": VOCAB, "kd": KD, "args": vars(args),
        "teacher_val_loss": teacher_val, "dense_fp16_bytes_per_token": dense, "results": results,
        "sampled_vs_online": summary, "wall_s": round(time.perf_counter() - t_start, 1),
    }
    write_result("sparse_cache", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
