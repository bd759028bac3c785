"""`distillery tune`: search any config keys with Ray Tune, Optuna (TPE) and ASHA.

    distillery tune jobs/distill.yaml tune.num_samples=12     # search space in tune.search_space
    distillery tune jobs/distill.yaml --                      # or merge tuning/kd_search.yaml into the config

Each trial is a full Ray Train run (finetune, or distill when the config names a teacher) built
from the base config with the trial's values applied; it reports through `TuneReportCallback`,
so ASHA sees every evaluation and stops weak trials early. Trials share the prepared data and
the teacher cache: the teacher never runs per trial. Re-running the same command resumes the
search. A trial that fails is recorded with its error and the search goes on.

Writes `<output_dir>/tune/`: `leaderboard.csv`, `best.yaml` (reproduces the best trial),
`best/` (the best trial's run directory), `trials/<id>/` (every trial's run directory),
`metric_vs_<key>.png` for each searched key and `asha_curves.png`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from distillery.config import Config, ConfigError, validate_tree
from distillery.distill.method import DISTILL
from distillery.data.splits import load_manifest
from distillery.files import install_dir, removed_on_failure, write_text_atomic
from distillery.models.load import model_identity
from distillery.registry.record import artifact_hashes, finish_stage, new_record
from distillery.runtime import ensure_ray
from distillery.train.finetune import FINETUNE
from distillery.train.identity import check_resume
from distillery.train.method import TrainingMethod
from distillery.train.run import build_trainer, remove_unregistered_checkpoints, validate_training, with_worker_cpus, worker_cpus
from distillery.tune.leaderboard import leaderboard_rows, tune_dir, write_csv, write_plots
from distillery.tune.janitor import placement_group_janitor, remove_orphaned_placement_groups
from distillery.tune.rung_gate import RungGate, decision_callback, rung_evaluations
from distillery.tune.space import to_tune_space, validate_search_space, with_values

SEARCH_NAME = "search"
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"  # Ray Train V2: seconds between controller polls of its workers


def trial_method(cfg: Config) -> TrainingMethod:
    """The training method every trial runs: `tune.stage`, or distill when the config names a teacher."""
    stage = cfg.tune.stage if cfg.tune.stage != "auto" else ("distill" if cfg.model.teacher_specs else "finetune")
    return DISTILL if stage == "distill" else FINETUNE


def trial_cpus(cfg: Config) -> float:
    """Logical CPUs one trial holds: its training workers and its method's sampling engines."""
    method = trial_method(cfg)
    return cfg.train.num_workers * worker_cpus(cfg, method, cfg.tune.max_concurrent_trials) + method.engine_cpus(cfg)


def reports_per_trial(cfg: Config) -> int:
    """How many evaluations (ASHA's time unit) a trial that runs to the end reports."""
    if not cfg.train.max_steps or not cfg.train.eval_every:
        raise ConfigError("tune: set train.max_steps and train.eval_every; ASHA compares trials at each evaluation")
    return math.ceil(cfg.train.max_steps / cfg.train.eval_every)


def asha_grace_period(cfg: Config) -> int:
    """ASHA's first rung, in evaluations: the configured grace period, at most a whole trial."""
    return min(cfg.tune.grace_period, reports_per_trial(cfg))


def asha_rungs(cfg: Config) -> list[int]:
    """The evaluation counts at which ASHA may stop a trial of this search."""
    return rung_evaluations(asha_grace_period(cfg), cfg.tune.reduction_factor, reports_per_trial(cfg))


def trial_base(cfg: Config) -> Config:
    """The config every trial starts from. Paths that default from `output_dir` (the prepared data,
    the teacher cache) are fixed to the ones the user's config names: each trial has its own
    `output_dir`, and would otherwise look for the data under it. Local relative paths become
    absolute, since Tune runs each trial in its own working directory."""
    def absolute(path: str | None, only_existing: bool = False) -> str | None:
        # A model path that does not exist locally may be a hub id: left as it is.
        if not path or "://" in path or (only_existing and not os.path.exists(path)):
            return path
        return os.path.abspath(path)

    return with_values(cfg, {
        "data.prepared": absolute(cfg.prepared_dir), "distill.cache": absolute(cfg.teacher_cache_dir),
        "model.path": absolute(cfg.model.path, True), "model.teacher": absolute(cfg.model.teacher, True),
        "model.teachers": [{"path": absolute(t.path, True), "weight": t.weight} for t in cfg.model.teachers],
    })


def _trial(params: dict[str, Any], base_yaml: str, trials_root: str) -> None:
    """One Tune trial: the base config with `params` applied, trained by Ray Train, reported to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    base = validate_tree(yaml.safe_load(base_yaml), "tune base config")
    trial_id = tune.get_context().get_trial_id()
    cfg = with_values(base, {**params, "output_dir": os.path.join(trials_root, trial_id)})
    gate = RungGate(trial_id, tuple(asha_rungs(cfg))) if cfg.tune.scheduler == "asha" else None
    method = trial_method(cfg)
    validate_training(cfg, method)  # this trial's values (e.g. trainable_layers) fail here, before its workers
    check_resume(cfg, method)  # a restored search resumes each trial only into its own run
    trainer = build_trainer(cfg, method, callbacks=[TuneReportCallback()], gate=gate)
    trainer.fit()
    remove_unregistered_checkpoints(Path(cfg.output_dir).resolve() / "ray" / "train")


def _concurrency(cfg: Config) -> int:
    import ray

    per_trial = trial_cpus(cfg)
    available = ray.cluster_resources().get("CPU", 1)
    return max(1, min(cfg.tune.max_concurrent_trials, int(available // per_trial)))


def build_tuner(cfg: Config):
    """A Tuner for `cfg`, restored from `<output_dir>/tune/search` when a previous run left one."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    checked = validate_search_space(cfg, cfg.tune.search_space)
    out = tune_dir(cfg)
    trainable = tune.with_parameters(_trial, base_yaml=trial_base(cfg).to_yaml(), trials_root=str(out / "trials"))
    # The trial function only drives a TorchTrainer; the training workers hold the CPUs. Tune refuses
    # an empty request, so the driver asks for a sliver of one CPU rather than a whole one.
    trainable = tune.with_resources(trainable, {"cpu": 0.01})
    path = out / SEARCH_NAME
    if tune.Tuner.can_restore(str(path)):
        print(f"tune: resuming the search in {path}", flush=True)
        return tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=False)

    tc = cfg.tune
    if tc.searcher == "optuna":
        searcher = OptunaSearch(metric=tc.metric, mode=tc.mode, seed=cfg.seed)
    else:  # random search, seeded like everything else: a re-run draws the same trials
        searcher = BasicVariantGenerator(random_state=cfg.seed, max_concurrent=_concurrency(cfg))  # an instance takes no TuneConfig limit
    if tc.scheduler == "asha":
        # Time is the trial's evaluation count (reported with every result and restored with its
        # checkpoints), not Tune's training_iteration: checkpoint-only reports would advance that,
        # and a resumed trial restarts it.
        scheduler = ASHAScheduler(
            time_attr="evaluation", metric=tc.metric, mode=tc.mode, max_t=reports_per_trial(cfg),
            grace_period=asha_grace_period(cfg), reduction_factor=tc.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=to_tune_space(checked),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=tc.num_samples,
            max_concurrent_trials=_concurrency(cfg),
            # the metric is named once: by Optuna or ASHA where they are used, else here
            metric=None if tc.searcher == "optuna" or tc.scheduler == "asha" else tc.metric,
            mode=None if tc.searcher == "optuna" or tc.scheduler == "asha" else tc.mode,
        ),
        run_config=tune.RunConfig(storage_path=str(out), name=SEARCH_NAME, verbose=1, callbacks=[placement_group_janitor(), decision_callback(asha_rungs(cfg) if tc.scheduler == "asha" else [])]),
    )


def run_tune(cfg: Config) -> int:
    """Run (or resume) the search and write the leaderboard, best config, best run and plots."""
    # Before Ray starts (auto counts this machine's cores only then); every trial gets the number.
    cfg = with_worker_cpus(cfg, trial_method(cfg), cfg.tune.max_concurrent_trials)
    checked = validate_search_space(cfg, cfg.tune.search_space)  # fail before Ray starts
    reports_per_trial(cfg)
    out = tune_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    stage = trial_method(cfg).name
    # Each trial's Train controller collects its workers' reports when it polls them, every 2 s by
    # default; a trial ASHA stops trains on until its report arrives, so trials poll every 0.25 s
    # (unless the environment sets the interval).
    env = {} if TRAIN_POLL_ENV in os.environ else {"runtime_env": {"env_vars": {TRAIN_POLL_ENV: "0.25"}}}
    started = ensure_ray(num_cpus=max(4, trial_cpus(cfg) * cfg.tune.max_concurrent_trials + 2), **env)
    try:
        print(
            f"tune: {cfg.tune.num_samples} trials of `{stage}` over {', '.join(checked)}; "
            f"{cfg.tune.searcher} search, {cfg.tune.scheduler} scheduling on {cfg.tune.metric} ({cfg.tune.mode})",
            flush=True,
        )
        results = build_tuner(cfg).fit()
        # The last trials' actors end after fit() returns: free what their controllers held.
        for _ in range(10):
            time.sleep(0.5)
            remove_orphaned_placement_groups()
    finally:
        if started:
            import ray

            ray.shutdown()
    rows = leaderboard_rows(cfg, results)
    write_csv(out / "leaderboard.csv", rows)
    write_plots(cfg, results, rows, out)
    unfinished = sum(r["status"] == "unfinished" for r in rows) + max(0, cfg.tune.num_samples - len(rows))
    if unfinished:
        # Ctrl-C (SIGINT) ends `fit()` early with the search state saved; no best config yet.
        print(
            f"tune: interrupted with {unfinished} of {cfg.tune.num_samples} trials unfinished; "
            f"leaderboard so far in {out / 'leaderboard.csv'}. Re-run the same command to resume.",
            flush=True,
        )
        return 130
    ok = [r for r in rows if r[cfg.tune.metric] is not None and r["status"] != "failed"]
    if not ok:
        print(f"tune: no trial reported {cfg.tune.metric}; see {out / 'leaderboard.csv'}", flush=True)
        return 1
    best = ok[0]
    best_dir = out / "best"
    if Path(best["run_dir"]).is_dir():
        tmp = out / f"best.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with removed_on_failure(tmp):
            shutil.copytree(best["run_dir"], tmp)
            install_dir(tmp, best_dir)
    best_cfg = with_values(cfg, {**{k: best[k] for k in cfg.tune.search_space}, "output_dir": str(best_dir)})
    write_text_atomic(out / "best.yaml", best_cfg.to_yaml())
    stopped = sum(r["status"] == "stopped early" for r in rows)
    failed = sum(r["status"] == "failed" for r in rows)
    print(
        f"tune: best {cfg.tune.metric} {best[cfg.tune.metric]:.4f} with "
        + json.dumps({k: best[k] for k in cfg.tune.search_space})
        + f"; {len(rows)} trials, {stopped} stopped early by ASHA, {failed} failed; "
        f"{sum(r['steps'] for r in rows)} trial-steps.\n"
        f"tune: leaderboard {out / 'leaderboard.csv'}, best config {out / 'best.yaml'} "
        f"(re-run: distillery {stage} {out / 'best.yaml'})",
        flush=True,
    )
    method = trial_method(cfg)
    best_model = best_dir / "model"
    finish_stage(cfg, new_record(
        cfg, "tune", out,
        inputs={"data_fingerprint": load_manifest(cfg.prepared_dir).get("fingerprint"),
                "model": model_identity(cfg.model.path)["hash"], "teachers": method.teachers(cfg)},
        outputs={"model": model_identity(best_model)["hash"] if best_model.is_dir() else None,
                 "artifacts": artifact_hashes(out, ["best.yaml", "leaderboard.csv"])},
        metrics={cfg.tune.metric: best[cfg.tune.metric], "trials": len(rows)},
        best={k: best[k] for k in cfg.tune.search_space},
    ), out / "run.json")
    return 0
