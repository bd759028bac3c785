"""Distillation quality: does a distilled student beat the same student fine-tuned on labels alone?

    PYTHONPATH=platform python benchmarks/distill_quality.py --cache-rows --multi-teacher --on-policy --cross-tokenizer [--labelled 400] [--prompts 2400] [--steps 2000]

The realistic regime: a small labelled set and a larger pool of unlabelled prompts. Five tasks with
checkable answers, in English and Chinese (arithmetic, unit conversion, sorting, field extraction
from a JSON report, headline topic; `distillery.demo.corpus`). The teacher (a 4-layer Llama) is
fine-tuned on a large labelled corpus of its own; the students (a 2-layer Llama with about a quarter
of its parameters) see only the small labelled set and the prompt pool. The held-out set is drawn
from other seeds and every prompt in it is checked to be absent from every training prompt
(labelled set, prompt pool and the teacher's corpus) before anything trains.

Students, all trained for the same number of optimiser steps with the same batch size and lr:

    sft                     fine-tuning on the labelled set
    kd-labels               logit KD on the labelled set (cached teacher, the default sparse cache)
    gen-sft                 fine-tuning on labelled + teacher-generated data (`distillery generate`)
    gen-kd                  logit KD on labelled + teacher-generated data (cached; the generated
                            rows' logprobs come from the generation pass)
    gen-kd-online           the same with the online teacher (what the cache is compared against)
    gen-kd-topk             the same from a plain top-k cache at equal bytes (--cache-rows)
    multi-teacher           online KD from the teacher and a second teacher (--multi-teacher)
    on-policy               GKD (--on-policy): half the batches sampled by the student on a vLLM engine,
                            graded by the online teacher (JSD 0.5), on labelled + generated data
    on-policy-labels        the same on the labelled set alone (kd-labels' data)
    sft-xtok                a student with its own tokenizer (--cross-tokenizer), fine-tuned on labels
    xtok-uld, xtok-hybrid   that student distilled across tokenizers (ULD; ULD + shared-token KL)

Each is evaluated by `distillery eval` on the held-out set (greedy, exact match per task) and on
the prepared val split (KL to the teacher and top-1 agreement, at T = 1, over response tokens).
Prints a table, writes benchmarks/results/distill_quality.json and distill_quality.png.
Targets (issue "Distillation that wins"): best distilled student >= SFT + 5 points exact match and
>= 90% of the teacher's exact match.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from report import write_result  # noqa: E402  (same directory)

from distillery.demo.corpus import prompt_of  # noqa: E402

TEACHER = dict(arch="llama", layers=4, hidden=128, heads=4, kv_heads=2, intermediate=384)
TEACHER2 = dict(arch="llama", layers=3, hidden=128, heads=4, kv_heads=2, intermediate=384)
STUDENT = dict(arch="llama", layers=2, hidden=64, heads=2, kv_heads=1, intermediate=192)
VOCAB = 2048
XTOK_VOCAB = 448  # the cross-tokenizer student's own tokenizer: about half the teacher's (886 tokens), so words split differently


def write_data(work: Path, args) -> dict[str, Path]:
    """The teacher's corpus, the small labelled set, the prompt pool and the held-out set, with
    held-out prompts checked disjoint from every training prompt."""
    from distillery.data.normalize import normalize_text
    from distillery.demo.corpus import generate_rows, held_out_rows

    d = work / "corpus"
    d.mkdir(parents=True, exist_ok=True)
    teacher_rows = generate_rows(args.teacher_rows, seed=1)
    labelled = generate_rows(args.labelled, seed=2)
    pool = generate_rows(args.prompts, seed=3)
    train_prompts = {normalize_text(prompt_of(r)) for r in teacher_rows + labelled + pool}
    # Redraws an excluded prompt from the same task, so every task keeps its share of the held-out set.
    held_out = held_out_rows(args.eval_rows, seed=100, exclude=train_prompts)
    overlap = sum(normalize_text(prompt_of(r)) in train_prompts for r in held_out)
    assert overlap == 0, f"{overlap} held-out prompts occur in training data"

    def dump(name: str, rows: list[dict]) -> Path:
        p = d / name
        p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return p

    return {
        "teacher": dump("teacher.jsonl", teacher_rows),
        "labelled": dump("labelled.jsonl", labelled),
        "prompts": dump("prompts.jsonl", [{"prompt": prompt_of(r), "task": r["task"]} for r in pool]),
        "eval": dump("eval.jsonl", [{"prompt": prompt_of(r), "reference": r["output"], "task": r["task"], "metric": r["metric"]}
                                    for r in held_out]),
    }


class Bench:
    """Builds configs for every stage from one base, in one work directory."""

    def __init__(self, work: Path, data: dict[str, Path], args):
        self.work, self.data, self.args = work, data, args
        self.timings: dict[str, float] = {}

    def cfg(self, **dotted):
        from distillery.config import load_config

        a = self.args
        base = {
            "seed": 0, "data.max_length": 128, "data.val_fraction": 0.1, "data.test_fraction": 0.0,
            "train.num_workers": 1, "train.strategy": "none", "train.cpus_per_worker": 2, "train.batch_size": 16,
            "train.lr": a.lr, "train.scheduler": "cosine", "train.warmup_steps": 20, "train.max_steps": a.steps,
            "train.eval_every": a.steps, "train.checkpoint_every": a.steps,
            "distill.loss": "forward_kl", "distill.temperature": 1.0, "distill.alpha": 0.7,
            "model.path": str(self.work / "models" / "student"), "model.teacher": str(self.work / "runs" / "teacher"),
        }
        base.update(dotted)
        return load_config(None, [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) or v is None else v}" for k, v in base.items()])

    @staticmethod
    def finished(fn, cfg) -> Path | None:
        """The file a stage writes last (None for eval, which always runs)."""
        return {
            "run_prepare": Path(cfg.prepared_dir) / "manifest.json",
            "run_finetune": Path(cfg.output_dir) / "run.json",
            "run_distill": Path(cfg.output_dir) / "run.json",
            "run_cache_teacher": Path(cfg.teacher_cache_dir) / "cache_manifest.json",
            "run_generate": Path(cfg.generate.output or "") / "generate_manifest.json",
        }.get(fn.__name__)

    def timed(self, name: str, fn, cfg) -> None:
        """Run a stage; with --reuse, a stage whose output exists from an earlier run of the same
        work directory (the same settings) is not run again."""
        done = self.finished(fn, cfg)
        if self.args.reuse and done is not None and done.exists():
            print(f"\n== {name}: reused ({done})", flush=True)
            return
        t0 = time.perf_counter()
        print(f"\n== {name}", flush=True)
        rc = fn(cfg)
        if rc != 0:
            raise RuntimeError(f"{name} failed with exit code {rc}")
        self.timings[name] = round(time.perf_counter() - t0, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-rows", type=int, default=6000, help="labelled rows the teacher is fine-tuned on")
    ap.add_argument("--teacher-steps", type=int, default=3000)
    ap.add_argument("--teacher-batch", type=int, default=32)
    ap.add_argument("--labelled", type=int, default=400, help="labelled rows the students see")
    ap.add_argument("--prompts", type=int, default=2400, help="unlabelled prompts the teacher completes")
    ap.add_argument("--eval-rows", type=int, default=200)
    # 2,000 steps of 16 rows: about 18 passes over the labelled + generated set, so the students with
    # the larger data set get enough passes over it too (at 600, about 5 passes, they lost to SFT).
    ap.add_argument("--steps", type=int, default=2000, help="optimiser steps of every student")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--generated-weight", type=float, default=4.0, help="data weight of the generated rows against the labelled ones")
    ap.add_argument("--cache-rows", action="store_true", help="add online and plain top-k rows for the generated-data KD student")
    ap.add_argument("--multi-teacher", action="store_true", help="train a second teacher and add a two-teacher student")
    ap.add_argument("--on-policy", action="store_true", help="add an on-policy (GKD) student sampling on a vLLM engine")
    ap.add_argument("--cross-tokenizer", action="store_true",
                    help="add a student with its own tokenizer: SFT, and distilled across tokenizers (ULD and hybrid)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--reuse", action="store_true", help="skip stages whose output the work directory already holds")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    import ray

    from distillery.data.prepare import run_prepare
    from distillery.distill.generate import run_generate
    from distillery.distill.method import run_distill
    from distillery.distill.teacher_cache import load_cache_manifest, run_cache_teacher
    from distillery.evaluation.run import run_eval
    from distillery.models.init_model import ArchSpec, init_model
    from distillery.runtime import ensure_ray
    from distillery.train.finetune import run_finetune

    t_start = time.perf_counter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="distillery-quality-")).resolve()
    data = write_data(work, args)
    models = work / "models"
    s_t = init_model(models / "teacher-init", ArchSpec(**TEACHER), corpus=[str(data["teacher"]), str(data["labelled"])],
                     vocab_size=VOCAB, seed=0, overwrite=True)
    s_s = init_model(models / "student", ArchSpec(**STUDENT), tokenizer_from=str(models / "teacher-init"), seed=1, overwrite=True)
    print(f"teacher {s_t['parameters']:,} parameters, student {s_s['parameters']:,} ({s_s['parameters'] / s_t['parameters']:.2f}x); "
          f"{args.teacher_rows} teacher rows, {args.labelled} labelled rows, {args.prompts} prompts, {args.eval_rows} held-out", flush=True)
    b = Bench(work, data, args)
    runs, prep = work / "runs", work / "prepared"
    labelled_src = [{"path": str(data["labelled"]), "format": "instruction", "name": "labelled"}]
    mixed_src = labelled_src + [{"path": str(work / "generated" / "generated.jsonl"), "format": "chat", "name": "generated",
                                 "weight": args.generated_weight}]
    students: dict[str, Path] = {}
    ensure_ray(num_cpus=4)
    try:
        # The teacher: its own large corpus.
        b.timed("prepare (teacher corpus)", run_prepare, b.cfg(**{
            "data.sources": [{"path": str(data["teacher"]), "format": "instruction"}], "data.prepared": str(prep / "teacher"),
            "model.path": str(models / "teacher-init")}))
        b.timed("finetune teacher", run_finetune, b.cfg(**{
            "data.prepared": str(prep / "teacher"), "model.path": str(models / "teacher-init"), "output_dir": str(runs / "teacher"),
            "train.max_steps": args.teacher_steps, "train.eval_every": args.teacher_steps, "train.checkpoint_every": args.teacher_steps,
            "train.batch_size": args.teacher_batch}))
        teachers = [{"path": str(runs / "teacher"), "weight": 1.0}]
        if args.multi_teacher:
            init_model(models / "teacher2-init", ArchSpec(**TEACHER2), tokenizer_from=str(models / "teacher-init"), seed=2, overwrite=True)
            b.timed("finetune second teacher", run_finetune, b.cfg(**{
                "data.prepared": str(prep / "teacher"), "model.path": str(models / "teacher2-init"), "output_dir": str(runs / "teacher2"),
                "train.max_steps": args.teacher_steps, "train.eval_every": args.teacher_steps, "train.checkpoint_every": args.teacher_steps,
                "train.batch_size": args.teacher_batch, "seed": 1}))
            teachers.append({"path": str(runs / "teacher2"), "weight": 1.0})

        # Students on the labelled set alone.
        lab = {"data.sources": labelled_src, "data.prepared": str(prep / "labelled")}
        b.timed("prepare (labelled)", run_prepare, b.cfg(**lab))
        b.timed("sft", run_finetune, b.cfg(**lab, output_dir=str(runs / "sft")))
        students["sft"] = runs / "sft"
        b.timed("cache-teacher (labelled)", run_cache_teacher, b.cfg(**lab))
        b.timed("kd-labels", run_distill, b.cfg(**lab, output_dir=str(runs / "kd-labels"), **{"distill.teacher_mode": "cached"}))
        students["kd-labels"] = runs / "kd-labels"

        # The teacher completes the prompt pool; the students train on labelled + generated rows.
        b.timed("generate", run_generate, b.cfg(**{
            "generate.sources": [{"path": str(data["prompts"]), "format": "prompts", "name": "pool"}],
            "generate.output": str(work / "generated"), "generate.temperature": 0.0, "generate.n": 1,
            "generate.max_new_tokens": 32}))
        mix = {"data.sources": mixed_src, "data.prepared": str(prep / "mixed")}
        b.timed("prepare (labelled + generated)", run_prepare, b.cfg(**mix))
        b.timed("gen-sft", run_finetune, b.cfg(**mix, output_dir=str(runs / "gen-sft")))
        students["gen-sft"] = runs / "gen-sft"
        b.timed("cache-teacher (labelled + generated)", run_cache_teacher, b.cfg(**mix))
        cache = load_cache_manifest(b.cfg(**mix).teacher_cache_dir)
        b.timed("gen-kd", run_distill, b.cfg(**mix, output_dir=str(runs / "gen-kd"), **{"distill.teacher_mode": "cached"}))
        students["gen-kd"] = runs / "gen-kd"
        if args.cache_rows:
            b.timed("gen-kd-online", run_distill, b.cfg(**mix, output_dir=str(runs / "gen-kd-online"), **{"distill.teacher_mode": "online"}))
            students["gen-kd-online"] = runs / "gen-kd-online"
            # plain top-k at (about) the bytes per token of the default cache
            entry = np.dtype(cache["id_dtype"]).itemsize + np.dtype(cache["dtype"]).itemsize
            k = max(1, int(cache["raw_bytes_per_token"] - 4) // entry)  # - the float32 tail logprob
            topk = {**mix, "distill.cache": str(prep / "mixed-topk"), "distill.top_k": k, "distill.cache_samples": 0}
            b.timed("cache-teacher (plain top-k)", run_cache_teacher, b.cfg(**topk))
            b.timed("gen-kd-topk", run_distill, b.cfg(**topk, output_dir=str(runs / "gen-kd-topk"), **{"distill.teacher_mode": "cached"}))
            students["gen-kd-topk"] = runs / "gen-kd-topk"
        if args.multi_teacher:
            b.timed("multi-teacher", run_distill, b.cfg(**mix, output_dir=str(runs / "multi-teacher"), **{
                "distill.teacher_mode": "online", "model.teacher": None, "model.teachers": teachers}))
            students["multi-teacher"] = runs / "multi-teacher"

        if args.on_policy:
            # GKD: half the batches are the student's own samples (vLLM engine, synced every step),
            # graded token by token by the online teacher with the JSD(0.5); the rest are the data's.
            b.timed("on-policy", run_distill, b.cfg(**mix, output_dir=str(runs / "on-policy"), **{
                "distill.teacher_mode": "online", "distill.on_policy.lmbda": 0.5, "distill.on_policy.beta": 0.5,
                "distill.on_policy.temperature": 1.0, "distill.on_policy.max_new_tokens": 32, "distill.on_policy.sync_every": 1}))
            students["on-policy"] = runs / "on-policy"
            # The same on the labelled set alone: the data of kd-labels.
            b.timed("on-policy-labels", run_distill, b.cfg(**lab, output_dir=str(runs / "on-policy-labels"), **{
                "distill.teacher_mode": "online", "distill.on_policy.lmbda": 0.5, "distill.on_policy.beta": 0.5,
                "distill.on_policy.temperature": 1.0, "distill.on_policy.max_new_tokens": 32, "distill.on_policy.sync_every": 1}))
            students["on-policy-labels"] = runs / "on-policy-labels"
        if args.cross_tokenizer:
            # A student with its own tokenizer (another vocabulary, trained on other text): its SFT
            # baseline and two students distilled across tokenizers, all on the labelled set.
            init_model(models / "student-xtok", ArchSpec(**STUDENT), corpus=[str(data["labelled"]), str(data["prompts"])],
                       vocab_size=XTOK_VOCAB, seed=3, overwrite=True)
            xlab = {**lab, "data.prepared": str(prep / "labelled-xtok"), "model.path": str(models / "student-xtok")}
            b.timed("prepare (labelled, student tokenizer)", run_prepare, b.cfg(**xlab))
            b.timed("sft-xtok", run_finetune, b.cfg(**xlab, output_dir=str(runs / "sft-xtok")))
            students["sft-xtok"] = runs / "sft-xtok"
            for kd in ("uld", "hybrid"):
                b.timed(f"xtok-{kd}", run_distill, b.cfg(**xlab, output_dir=str(runs / f"xtok-{kd}"), **{
                    "distill.teacher_mode": "online", "distill.cross_tokenizer.kd": kd}))
                students[f"xtok-{kd}"] = runs / f"xtok-{kd}"

        eval_models = [{"path": str(runs / "teacher"), "name": "teacher"}] + [{"path": str(p), "name": n} for n, p in students.items()]
        b.timed("eval", run_eval, b.cfg(**mix, **{
            "eval.models": eval_models, "eval.dataset": str(data["eval"]), "eval.output": str(work / "eval"),
            "eval.teacher": str(runs / "teacher"), "eval.max_new_tokens": 32}))
    finally:
        ray.shutdown()

    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    return report(metrics, args, b, cache, time.perf_counter() - t_start, work)


def _model_rows(metrics) -> dict[str, dict]:
    """name -> {score per task, overall, teacher_kl, top1} from eval's metrics.json."""
    out = {}
    for m in metrics["models"]:
        out[m["name"]] = m
    return out


def report(metrics: dict, args, b: Bench, cache: dict, wall: float, work: Path) -> int:
    rows = _model_rows(metrics)
    tasks = metrics["tasks"]
    print(f"\n{'model':<16} " + " ".join(f"{t:>10}" for t in tasks) + f" {'overall':>8} {'teacher KL':>10} {'top-1 agr':>9}")
    for name, m in rows.items():
        print(f"{name:<16} " + " ".join(f"{m['scores'][t]:>10.3f}" for t in tasks)
              + f" {m['mean_score']:>8.3f} {m.get('teacher_kl', float('nan')):>10.3f} {m.get('teacher_top1_agreement', float('nan')):>9.3f}")
    teacher, sft = rows["teacher"]["mean_score"], rows["sft"]["mean_score"]
    distilled = {n: m["mean_score"] for n, m in rows.items() if n not in ("teacher", "sft")}
    best = max(distilled, key=distilled.get)
    gain = 100 * (distilled[best] - sft)
    share = distilled[best] / teacher if teacher else float("nan")
    print(f"\nbest distilled student: {best} at {distilled[best]:.3f} exact match: {gain:+.1f} points over SFT ({sft:.3f}) "
          f"(target >= +5), {100 * share:.0f}% of the teacher's {teacher:.3f} (target >= 90%)")
    print(f"teacher cache: top_k {cache['top_k']} + {cache.get('cache_samples', 0)} samples, {cache['disk_bytes_per_token']} B/token on disk; "
          f"stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in b.timings.items()) + f"; total {wall / 60:.1f} min")
    plot(work, rows, tasks)
    write_result("distill_quality", {
        "args": vars(args), "tasks": tasks, "models": rows, "best": best, "gain_over_sft_points": gain,
        "share_of_teacher": share, "targets": {"gain_over_sft_points": 5, "share_of_teacher": 0.9},
        "cache": cache, "timings_s": b.timings, "wall_s": wall,
    })
    return 0


def plot(work: Path, rows: dict[str, dict], tasks: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names) * len(tasks) / 3), 4))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar([t + i * width for t in range(len(tasks) + 1)], [rows[n]["scores"][t] for t in tasks] + [rows[n]["mean_score"]],
               width, label=n)
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks) + 1)], tasks + ["mean_score"])
    ax.set_ylabel("exact match (held-out)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = REPO / "benchmarks" / "results" / "distill_quality.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())
