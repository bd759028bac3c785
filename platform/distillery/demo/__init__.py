"""`distillery demo` / `make demo`: the main job, from corpus to endpoint, on an embedded local Ray.

    make demo                                    # = distillery demo jobs/demo.yaml --workdir runs/demo
    RAY_AUTH_MODE=token ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python -m distillery demo jobs/demo.yaml --workdir /shared/demo

Steps: (1) write the bundled English/Chinese corpus with checkable answers, a synonym dictionary
and a held-out test set; (2) build a teacher and a student with about a quarter of its parameters
(init-model); (3) prepare the corpus with augmentation; (4) fine-tune the teacher; (5) cache its
top-k logprobs; (6) train the student twice, on hard labels (finetune) and distilled (distill);
(7) a small tune over temperature and LoRA rank; (8) evaluate teacher, SFT and KD students;
(9) serve the KD student and ask it questions over HTTP. Nothing is downloaded.
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
STEPS = 9
# Per-stage changes to the base config: the teacher trains longer; tune trials are short.
TEACHER_OVERRIDES = {"train.max_steps": 600, "train.lr": 2e-3}
TUNE_OVERRIDES = {"train.max_steps": 90, "train.eval_every": 30, "train.checkpoint_every": 90}


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
    paths = write_corpus(d.work / "corpus", n_train=3000, n_test=200, seed=0)
    d.artefacts["corpus"] = d.work / "corpus"
    d.done(t, f"-> {paths['train']}, held-out {paths['test']}, synonyms {paths['synonyms']}")

    t = d.step("Building a teacher and a ~4x smaller student with init-model (tokenizer trained on the corpus)")
    teacher_init, student_init = d.work / "models" / "teacher-init", d.work / "models" / "student"
    s_t = init_model(teacher_init, ArchSpec(**TEACHER_SPEC), corpus=[str(paths["train"])], vocab_size=VOCAB_SIZE, seed=0, overwrite=True)
    s_s = init_model(student_init, ArchSpec(**STUDENT_SPEC), tokenizer_from=str(teacher_init), seed=1, overwrite=True)
    print(f"      teacher {s_t['parameters']:,} parameters, student {s_s['parameters']:,} ({s_s['parameters'] / s_t['parameters']:.2f}x)")
    d.artefacts["models"] = d.work / "models"
    d.done(t)

    # One local Ray for every stage; logical CPUs above the 2 cores so Ray Data can feed the trainers.
    # The dashboard also lets Ray Train free the workers of trials that Tune stops early.
    started = ensure_ray(num_cpus=4, include_dashboard=True)
    try:
        from distillery.data.prepare import run_prepare
        from distillery.evaluation.run import run_eval
        from distillery.distill.teacher_cache import run_cache_teacher
        from distillery.distill.method import run_distill
        from distillery.train.finetune import run_finetune
        from distillery.tune.search import run_tune

        t = d.step("prepare: validate, dedupe, augment (synonyms, clause reordering), split and tokenise with Ray Data")
        _check(run_prepare(d.cfg(**{"model.path": str(teacher_init)})), "prepare")
        d.artefacts["prepared data"] = Path(d.path(d.base["data"]["prepared"]))
        d.done(t)

        t = d.step("finetune the teacher (full fine-tuning on Ray Train)")
        teacher_run = d.path("runs/teacher")
        _check(run_finetune(d.cfg(**{"model.path": str(teacher_init), "output_dir": teacher_run, **TEACHER_OVERRIDES})), "teacher finetune")
        d.artefacts["teacher run"] = Path(teacher_run)
        d.done(t)

        t = d.step("cache-teacher: the teacher runs once; its top-k logprobs are stored beside the data")
        _check(run_cache_teacher(d.cfg()), "cache-teacher")
        d.artefacts["teacher cache"] = Path(d.cfg().teacher_cache_dir)
        d.done(t)

        t = d.step("Training the student twice: hard labels only (finetune) and distilled from the cached teacher (distill)")
        _check(run_finetune(d.cfg(**{"output_dir": d.path("runs/sft")})), "student finetune")
        _check(run_distill(d.cfg(**{"output_dir": d.path("runs/kd")})), "student distill")
        d.artefacts["SFT student"], d.artefacts["KD student"] = Path(d.path("runs/sft")), Path(d.path("runs/kd"))
        d.done(t)

        t = d.step("tune: Optuna + ASHA over KD temperature and LoRA rank (LoRA distillation on top of the SFT student)")
        _check(run_tune(d.cfg(**{"output_dir": d.path("runs/tune"), "model.path": d.path("runs/sft"), "method.kind": "lora",
                                 **TUNE_OVERRIDES})), "tune")
        d.artefacts["tune leaderboard"] = Path(d.path("runs/tune/tune/leaderboard.csv"))
        d.done(t)

        t = d.step("eval: teacher, SFT student and KD student on the held-out test set (vLLM, greedy)")
        models = [{"path": d.path("runs/teacher"), "name": "teacher"}, {"path": d.path("runs/sft"), "name": "sft-student"},
                  {"path": d.path("runs/kd"), "name": "kd-student"}]
        eval_dir = d.path("runs/eval")
        _check(run_eval(d.cfg(**{"eval.models": models, "eval.output": eval_dir, "eval.teacher": d.path("runs/teacher")})), "eval")
        d.artefacts["eval report"] = Path(eval_dir) / "report.md"
        d.done(t)

        t = d.step("serve: the KD student behind an OpenAI-compatible API (Ray Serve + vLLM), asked over HTTP")
        _serve_and_ask(d.cfg(), paths["test"])
        d.done(t)
    finally:
        if started:
            ray.shutdown()

    report = (Path(eval_dir) / "report.md").read_text(encoding="utf-8")
    print(f"\n{'=' * 78}\nDemo finished in {(time.time() - d.t0) / 60:.1f} minutes.\n{'=' * 78}")
    print(report.split("\n![")[0])
    print("Where everything is:")
    for name, p in d.artefacts.items():
        print(f"  {name:<18} {p}")
    return 0


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
