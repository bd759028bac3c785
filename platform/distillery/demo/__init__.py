"""`distillery demo` / `make demo`: the main job, from corpus to endpoint, on an embedded local Ray.

    make demo                                    # = distillery demo jobs/demo.yaml --workdir runs/demo
    RAY_AUTH_MODE=token ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python -m distillery demo jobs/demo.yaml --workdir /shared/demo

Steps: (1) write the bundled English/Chinese corpus with checkable answers: the teacher's corpus,
the student's small labelled set, a pool of unlabelled prompts, a synonym dictionary and a
held-out test set disjoint from all three; (2) build a teacher and a student with about a quarter
of its parameters (init-model); (3) prepare the teacher's corpus with augmentation and (4)
fine-tune the teacher; (5) the teacher answers the prompt pool (`generate`, vLLM); (6) prepare
the student's data twice: labelled rows alone, and labelled + teacher-generated rows; (7) cache
the teacher's logprobs over the latter; (8) train the student twice: fine-tuned on its labelled
rows (SFT) and distilled (teacher-generated data + logit KD); (9) a small tune over temperature and
LoRA rank; (10) evaluate teacher, SFT and KD students on the held-out set and state the KD
student's gain; (11) serve the KD student and ask it questions over HTTP. Nothing is downloaded.
Every path in the config is relative to the work directory.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from distillery.config import Config, validate_tree

TEACHER_SPEC = dict(arch="llama", layers=4, hidden=128, heads=4, kv_heads=2, intermediate=384)
STUDENT_SPEC = dict(arch="llama", layers=2, hidden=64, heads=2, kv_heads=1, intermediate=192)
VOCAB_SIZE = 2048
STEPS = 11
N_TEACHER_ROWS = 6000  # the teacher's own corpus: at 3,000 rows its val loss stopped improving by 1,200 steps
N_LABELLED = 400  # the student's labelled rows
N_PROMPTS = 2000  # unlabelled prompts the teacher answers
# Per-stage changes to the base config. The teacher trains longest (a student distilled from a weak
# teacher has little to gain: the KD win needs a teacher that solves what SFT cannot), on one worker
# with twice the students' rows per step; tune trials are short.
TEACHER_OVERRIDES = {"train.max_steps": 1800, "train.batch_size": 32, "train.num_workers": 1, "train.strategy": "none",
                     "train.eval_every": 600, "train.checkpoint_every": 1800}
TUNE_OVERRIDES = {"train.max_steps": 60, "train.eval_every": 20, "train.checkpoint_every": 60}


class Demo:
    def __init__(self, config_path: str, workdir: str):
        self.work = Path(workdir).resolve()
        self.base = yaml.safe_load(Path(config_path).read_text(encoding="utf-8"))
        self.n = 0
        self.t0 = time.time()
        self.artefacts: dict[str, Path] = {}

    def path(self, rel: str) -> str:
        return str(self.work / rel)

    def cfg(self, **dotted) -> Config:
        """The demo config with work-dir-relative paths made absolute and `dotted` overrides applied."""
        from distillery.tune.space import with_values

        tree = json.loads(json.dumps(self.base))
        tree["output_dir"] = self.path(tree.get("output_dir", "runs/demo"))
        for s in tree["data"]["sources"]:
            s["path"] = self.path(s["path"])
        aug = tree["data"].get("augment", {})
        if aug.get("synonyms"):
            aug["synonyms"]["path"] = self.path(aug["synonyms"]["path"])
        tree["data"]["prepared"] = self.path(tree["data"]["prepared"])
        gen = tree.get("generate", {})
        for s in gen.get("sources", []):
            s["path"] = self.path(s["path"])
        if gen.get("output"):
            gen["output"] = self.path(gen["output"])
        for key in ("path", "teacher"):
            tree["model"][key] = self.path(tree["model"][key])
        tree["eval"]["dataset"] = self.path(tree["eval"]["dataset"])
        for m in tree["serve"]["models"]:
            m["path"] = self.path(m["path"])
        cfg = validate_tree(tree, "demo config")
        return with_values(cfg, dotted) if dotted else cfg

    def step(self, text: str) -> float:
        self.n += 1
        elapsed = time.time() - self.t0
        print(f"\n{'=' * 78}\n[{self.n}/{STEPS}] {text}   (demo time {elapsed / 60:.1f} min)\n{'=' * 78}", flush=True)
        return time.time()

    def done(self, t: float, what: str = "") -> None:
        print(f"      ... done in {time.time() - t:.0f}s {what}", flush=True)


def _check(rc: int, stage: str) -> None:
    if rc != 0:
        raise SystemExit(f"demo: {stage} failed with exit code {rc}")


def run_demo(config_path: str = "jobs/demo.yaml", workdir: str = "runs/demo") -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # tiny models: a small KV cache is plenty
    import ray

    from distillery.demo.corpus import write_corpus
    from distillery.models.init_model import ArchSpec, init_model
    from distillery.runtime import ensure_ray

    d = Demo(config_path, workdir)
    d.work.mkdir(parents=True, exist_ok=True)
    print(f"Distillery demo in {d.work} (config {config_path})", flush=True)

    t = d.step("Writing the bundled corpus: arithmetic, unit conversion, sorting, JSON report extraction, headline topics (EN + 中文)")
    paths = write_corpus(d.work / "corpus", n_train=N_TEACHER_ROWS, n_test=200, seed=0, n_labelled=N_LABELLED, n_prompts=N_PROMPTS)
    d.artefacts["corpus"] = d.work / "corpus"
    d.done(t, f"-> teacher corpus {paths['train']}, {N_LABELLED} labelled rows, {N_PROMPTS} unlabelled prompts, "
              f"held-out {paths['test']} (no prompt shared with any of them)")

    t = d.step("Building a teacher and a ~4x smaller student with init-model (tokenizer trained on the corpus)")
    teacher_init, student_init = d.work / "models" / "teacher-init", d.work / "models" / "student"
    s_t = init_model(teacher_init, ArchSpec(**TEACHER_SPEC), corpus=[str(paths["train"]), str(paths["labelled"])],
                     vocab_size=VOCAB_SIZE, seed=0, overwrite=True)
    s_s = init_model(student_init, ArchSpec(**STUDENT_SPEC), tokenizer_from=str(teacher_init), seed=1, overwrite=True)
    print(f"      teacher {s_t['parameters']:,} parameters, student {s_s['parameters']:,} ({s_s['parameters'] / s_t['parameters']:.2f}x)")
    d.artefacts["models"] = d.work / "models"
    d.done(t)

    # One local Ray for every stage; logical CPUs above the 2 cores so Ray Data can feed the trainers.
    # The dashboard also lets Ray Train free the workers of trials that Tune stops early.
    started = ensure_ray(num_cpus=4, include_dashboard=True)
    try:
        _teacher_stages(d, paths, teacher_init)
        _student_stages(d)
        eval_dir = d.path("runs/eval")
        _evaluate(d, eval_dir)
        t = d.step("serve: the KD student behind an OpenAI-compatible API (Ray Serve + vLLM), asked over HTTP")
        _serve_and_ask(d.cfg(), paths["test"])
        d.done(t)
    finally:
        if started:
            ray.shutdown()

    report = (Path(eval_dir) / "report.md").read_text(encoding="utf-8")
    print(f"\n{'=' * 78}\nDemo finished in {(time.time() - d.t0) / 60:.1f} minutes.\n{'=' * 78}")
    print(report.split("\n![")[0])
    print(_gain_line(Path(eval_dir) / "metrics.json"))
    print("Where everything is:")
    for name, p in d.artefacts.items():
        print(f"  {name:<18} {p}")
    return 0


def _teacher_stages(d: Demo, paths: dict[str, Path], teacher_init: Path) -> None:
    """Prepare the teacher's corpus, fine-tune the teacher, and let it answer the prompt pool."""
    from distillery.data.prepare import run_prepare
    from distillery.distill.generate import run_generate
    from distillery.train.finetune import run_finetune

    teacher_data = {"data.sources": [{"path": str(paths["train"]), "format": "instruction", "name": "teacher-corpus"}],
                    "data.prepared": d.path("data-teacher"), "model.path": str(teacher_init)}
    t = d.step("prepare the teacher's corpus: validate, dedupe, augment (synonyms, clause reordering), split and tokenise with Ray Data")
    _check(run_prepare(d.cfg(**teacher_data)), "prepare (teacher corpus)")
    d.done(t)

    t = d.step("finetune the teacher (full fine-tuning on Ray Train)")
    teacher_run = d.path("runs/teacher")
    _check(run_finetune(d.cfg(**teacher_data, output_dir=teacher_run, **TEACHER_OVERRIDES)), "teacher finetune")
    d.artefacts["teacher run"] = Path(teacher_run)
    d.done(t)

    t = d.step(f"generate: the teacher answers the {N_PROMPTS} unlabelled prompts (Ray Data + vLLM, greedy)")
    _check(run_generate(d.cfg()), "generate")
    d.artefacts["teacher-generated data"] = Path(d.cfg().generated_dir)
    d.done(t)


def _student_stages(d: Demo) -> None:
    """The student's data (labelled alone; labelled + generated), the teacher cache, SFT and KD students, a tune."""
    from distillery.data.prepare import run_prepare
    from distillery.distill.method import run_distill
    from distillery.distill.teacher_cache import run_cache_teacher
    from distillery.train.finetune import run_finetune
    from distillery.tune.search import run_tune

    labelled = {"data.sources": [d.base["data"]["sources"][0] | {"path": d.path(d.base["data"]["sources"][0]["path"])}],
                "data.prepared": d.path("data-labelled")}
    t = d.step("prepare the student's data twice: its labelled rows alone (for SFT), and labelled + teacher-generated rows (for KD)")
    _check(run_prepare(d.cfg(**labelled)), "prepare (labelled)")
    _check(run_prepare(d.cfg()), "prepare (labelled + generated)")
    d.artefacts["prepared data"] = Path(d.cfg().prepared_dir)
    d.done(t)

    t = d.step("cache-teacher: the teacher's logprobs over the KD student's data, computed once")
    _check(run_cache_teacher(d.cfg()), "cache-teacher")
    d.artefacts["teacher cache"] = Path(d.cfg().teacher_cache_dir)
    d.done(t)

    t = d.step("Training the student twice, same steps: SFT on its labelled rows, and KD on labelled + teacher-generated rows")
    _check(run_finetune(d.cfg(**labelled, output_dir=d.path("runs/sft"))), "student finetune")
    _check(run_distill(d.cfg(**{"output_dir": d.path("runs/kd")})), "student distill")
    d.artefacts["SFT student"], d.artefacts["KD student"] = Path(d.path("runs/sft")), Path(d.path("runs/kd"))
    d.done(t)

    t = d.step("tune: Optuna + ASHA over KD temperature and LoRA rank (LoRA distillation on top of the SFT student)")
    _check(run_tune(d.cfg(**{"output_dir": d.path("runs/tune"), "model.path": d.path("runs/sft"), "method.kind": "lora",
                             **TUNE_OVERRIDES})), "tune")
    d.artefacts["tune leaderboard"] = Path(d.path("runs/tune/tune/leaderboard.csv"))
    d.done(t)


def _evaluate(d: Demo, eval_dir: str) -> None:
    from distillery.evaluation.run import run_eval

    t = d.step("eval: teacher, SFT student and KD student on the held-out test set (vLLM, greedy)")
    models = [{"path": d.path("runs/teacher"), "name": "teacher"}, {"path": d.path("runs/sft"), "name": "sft-student"},
              {"path": d.path("runs/kd"), "name": "kd-student"}]
    _check(run_eval(d.cfg(**{"eval.models": models, "eval.output": eval_dir, "eval.teacher": d.path("runs/teacher")})), "eval")
    d.artefacts["eval report"] = Path(eval_dir) / "report.md"
    d.done(t)


def _gain_line(metrics_json: Path) -> str:
    """The KD student's gain over the SFT student on the held-out set, stated whichever way it fell."""
    models = {m["name"]: m for m in json.loads(metrics_json.read_text(encoding="utf-8"))["models"]}
    kd, sft, teacher = (models[n]["mean_score"] for n in ("kd-student", "sft-student", "teacher"))
    verdict = "better than" if kd > sft else ("no better than" if kd == sft else "worse than")
    return (f"KD student vs SFT student on the held-out set: {kd:.3f} vs {sft:.3f} mean task score, "
            f"{100 * (kd - sft):+.1f} points: distillation did {verdict} fine-tuning alone "
            f"(teacher {teacher:.3f}; the KD student reaches {100 * kd / teacher if teacher else float('nan'):.0f}% of it).\n")


def _serve_and_ask(cfg: Config, test_jsonl: Path, n_questions: int = 6) -> None:
    """Start the Serve app for `cfg.serve`, send real HTTP requests with the openai client, shut it down."""
    from openai import OpenAI
    from ray import serve

    from distillery.serving.app import APP_NAME, build_app

    s = cfg.serve
    serve.start(http_options={"host": s.host, "port": s.port})
    try:
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
        base = f"http://{s.host}:{s.port}/v1"
        print(f"      endpoint {base}", flush=True)
        client = OpenAI(base_url=base, api_key=os.environ.get(s.api_key_env or "", "none") or "none", timeout=120)
        model = client.models.list().data[0].id
        rows = [json.loads(l) for l in test_jsonl.read_text(encoding="utf-8").splitlines()[:n_questions]]
        for row in rows:
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": row["prompt"]}], max_tokens=24, temperature=0
            )
            answer = (reply.choices[0].message.content or "").strip()
            mark = "✓" if answer == row["reference"] else "✗"
            print(f"      Q: {row['prompt']!r}\n      A: {answer!r}   (expected {row['reference']!r}) {mark}", flush=True)
    finally:
        serve.shutdown()
