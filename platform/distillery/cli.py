"""`distillery <command> CONFIG [key=value ...]`: one entry point for every stage.

    distillery config CONFIG [key=value ...]        print the resolved config
    distillery config --explain                     every key with its type, default and meaning
    distillery prepare CONFIG [key=value ...]       corpus files -> prepared splits (Ray Data)
    distillery generate CONFIG ...                  the teacher answers prompts: training rows + its logprobs (vLLM)
    distillery cache-teacher CONFIG ...             teacher top-k logprobs, computed once
    distillery finetune CONFIG ...                  SFT on Ray Train (full / lora / freeze)
    distillery distill CONFIG ...                   teacher -> student distillation on Ray Train
    distillery tune CONFIG ...                      Ray Tune search (Optuna + ASHA)
    distillery eval CONFIG ...                      task metrics and comparison report
    distillery export CONFIG ...                    deployable model: merge, dtype, INT8 (W8A8), model card
    distillery registry list|show|lineage|register|alias ...   runs, lineage and model versions
    distillery deploy status|promote|rollback CONFIG NAME     a versioned model's traffic
    distillery serve CONFIG ...                     OpenAI-compatible endpoint (Ray Serve + vLLM)
    distillery init-model OUTPUT [--arch ...]       build a local tokenizer + model, no download
    distillery demo                                 the main job, end to end

Configs are validated before Ray starts: a bad key, type or path exits with status 2
and a message naming the key and the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from distillery.config import Config, ConfigError, check_paths, explain, load_config

EXIT_CONFIG = 2  # bad config, bad arguments or missing inputs: nothing ran

# Inputs each stage needs on disk before any Ray work starts.
STAGE_INPUTS: dict[str, list[str]] = {
    "prepare": ["data.sources", "data.augment"],
    "generate": ["generate.sources", "generate.teacher"],
    "cache-teacher": ["data.prepared", "model.teacher"],
    "finetune": ["data.prepared", "model.path"],
    "distill": ["data.prepared", "model.path"],
    "tune": ["data.prepared", "model.path"],
    "eval": [],
    "export": [],
    "serve": ["serve.models"],
}


def _stage_runner(stage: str) -> Callable[[Config], int]:
    """The function that runs `stage`, imported lazily so `distillery config` stays fast."""
    if stage == "prepare":
        from distillery.data.prepare import run_prepare

        return run_prepare
    if stage == "generate":
        from distillery.distill.generate import run_generate

        return run_generate
    if stage == "cache-teacher":
        from distillery.distill.teacher_cache import run_cache_teacher

        return run_cache_teacher
    if stage == "finetune":
        from distillery.train.finetune import run_finetune

        return run_finetune
    if stage == "distill":
        from distillery.distill.method import run_distill

        return run_distill
    if stage == "tune":
        from distillery.tune.search import run_tune

        return run_tune
    if stage == "eval":
        from distillery.evaluation.run import run_eval

        return run_eval
    if stage == "export":
        from distillery.export.run import run_export

        return run_export
    if stage == "serve":
        from distillery.serving.app import run_serve

        return run_serve
    raise ValueError(f"no runner for stage '{stage}'")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-5")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distillery", description="Fine-tune, distill, tune and serve language models on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="print the resolved config, or --explain every key")
    p.add_argument("config", nargs="?", help="YAML config file (omit with --explain for the defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--explain", action="store_true", help="list every key with type, default and description")
    p.add_argument("--json", action="store_true", help="print JSON instead of YAML")

    for stage, text in [
        ("prepare", "stream, validate, clean, augment, mix and split corpora (Ray Data)"),
        ("generate", "have the teacher answer prompts: training rows plus its top-k logprobs (Ray Data + vLLM)"),
        ("cache-teacher", "run the teacher once and store its top-k logprobs"),
        ("finetune", "fine-tune on Ray Train: full, LoRA or layer freezing"),
        ("distill", "distil a frozen teacher into a student on Ray Train"),
        ("tune", "search hyperparameters with Ray Tune, Optuna and ASHA"),
        ("eval", "score models on tasks and write a comparison report"),
        ("export", "merge, cast or INT8-quantise a run into a deployable model with a model card"),
        ("serve", "serve models behind an OpenAI-compatible API (Ray Serve + vLLM)"),
    ]:
        _add_config_args(sub.add_parser(stage, help=text))

    from distillery.registry.commands import add_registry_parser
    from distillery.serving.deploy import add_deploy_parser

    add_registry_parser(sub)
    add_deploy_parser(sub)

    p = sub.add_parser("init-model", help="build a tokenizer and a randomly initialised model locally")
    p.add_argument("output", help="directory to write the model into")
    p.add_argument("--spec", help="YAML file with the architecture spec (keys as the flags below, with underscores)")
    p.add_argument("--arch", choices=["llama", "qwen2", "mixtral", "qwen2_moe", "qwen3_moe"])
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--experts", type=int, help="MoE: experts per layer")
    p.add_argument("--experts-per-token", type=int, help="MoE: experts routed per token")
    p.add_argument("--max-position", type=int)
    p.add_argument("--tie-embeddings", action="store_true", default=None)
    p.add_argument("--corpus", nargs="+", help="files, globs or directories to train the tokenizer on")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--tokenizer-from", help="reuse this model directory's tokenizer instead of training one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")

    p = sub.add_parser("demo", help="the main job: corpus -> prepared data -> teacher/student -> endpoint")
    p.add_argument("config", nargs="?", default="jobs/demo.yaml", help="the demo's base config (paths relative to --workdir)")
    p.add_argument("--workdir", default="runs/demo", help="where the demo writes everything")
    return parser


def _cmd_config(args: argparse.Namespace) -> int:
    if args.explain and not args.config:
        rows = explain()
        width = max(len(r[0]) for r in rows)
        for key, typ, default, doc in rows:
            if typ.startswith("section"):
                print(f"\n{key}  [{typ}]  {doc}")
            else:
                print(f"  {key:<{width}}  {doc}\n  {'':<{width}}  type: {typ}; default: {default}")
        return 0
    if not args.config:
        print("error: config: give a config file (or --explain)", file=sys.stderr)
        return EXIT_CONFIG
    cfg = load_config(args.config, args.overrides)
    if args.explain:
        return _cmd_config(argparse.Namespace(explain=True, config=None, overrides=[], json=False))
    if args.json:
        print(json.dumps(cfg.model_dump(mode="json", by_alias=True), indent=2, ensure_ascii=False))
    else:
        print(cfg.to_yaml(), end="")
    return 0


def _cmd_init_model(args: argparse.Namespace) -> int:
    import yaml

    from distillery.models.init_model import ArchSpec, init_model

    spec_fields: dict = {}
    if args.spec:
        try:
            with open(args.spec, encoding="utf-8") as f:
                spec_fields = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"--spec: file not found: {args.spec}") from None
        unknown = set(spec_fields) - set(ArchSpec.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"--spec {args.spec}: unknown key(s) {sorted(unknown)}; known: {sorted(ArchSpec.__dataclass_fields__)}")
    for name in ArchSpec.__dataclass_fields__:
        value = getattr(args, name, None)
        if value is not None:
            spec_fields[name] = value
    spec = ArchSpec(**spec_fields)
    try:
        spec.validate()
    except ValueError as e:
        raise ConfigError(f"init-model: {e}") from None
    print(f"init-model: building {spec.arch} ({spec.layers} layers, hidden {spec.hidden}) in {args.output}", flush=True)
    try:
        summary = init_model(
            args.output,
            spec,
            corpus=args.corpus,
            vocab_size=args.vocab_size,
            tokenizer_from=args.tokenizer_from,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise ConfigError(f"init-model: {e}") from None
    print(
        f"init-model: wrote {summary['path']}: {summary['parameters']:,} parameters, "
        f"vocabulary {summary['vocab_size']}, tokenizer {summary['tokenizer']}"
    )
    return 0


def _cmd_stage(args: argparse.Namespace) -> int:
    stage = args.command
    cfg = load_config(args.config, args.overrides)
    check_paths(cfg, STAGE_INPUTS[stage])
    if cfg.registry.mlflow_uri and cfg.registry.record:
        from distillery.registry.mlflow_mirror import MlflowNotInstalled, require_mlflow

        try:
            require_mlflow(cfg.registry.mlflow_uri)
        except MlflowNotInstalled as e:
            raise ConfigError(str(e)) from None
    return _stage_runner(stage)(cfg)


def _cmd_demo(args: argparse.Namespace) -> int:
    from distillery.demo import run_demo

    import os

    if not os.path.isfile(args.config):
        raise ConfigError(f"demo: config file not found: {args.config} (run from the repository root, or pass its path)")
    load_config(args.config)  # validate before anything runs
    return run_demo(args.config, args.workdir)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "config":
            return _cmd_config(args)
        if args.command == "init-model":
            return _cmd_init_model(args)
        if args.command == "demo":
            return _cmd_demo(args)
        if args.command == "deploy":
            from distillery.serving.deploy import run_deploy

            return run_deploy(args)
        if args.command == "registry":
            from distillery.registry.commands import run_registry_command

            return run_registry_command(args)
        return _cmd_stage(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    raise SystemExit(main())
