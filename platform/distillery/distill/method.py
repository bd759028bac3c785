"""`distillery distill`: a frozen teacher teaches a smaller student on Ray Train.

    distillery cache-teacher jobs/distill.yaml     # optional: run the teacher once (teacher_mode: cached)
    distillery distill jobs/distill.yaml distill.loss=jsd distill.temperature=3

The student trains with any `method.kind` (full, LoRA, freeze) in the same loop as finetune
(train/loop.py); only the objective differs (distill/objective.py). In online mode the workers
stream the prepared splits and run the teacher; in cached mode they stream the teacher cache
(prepared columns plus the teacher's top-k) and never load the teacher.
"""

from __future__ import annotations

from typing import Any

import torch

from distillery.config import Config, ConfigError
from distillery.distill.losses import VocabularyMismatchError, check_vocab
from distillery.distill.cross_objective import CrossTokenizerObjective
from distillery.distill.objective import DistillObjective, attn_implementation
from distillery.distill.on_policy import OnPolicyObjective
from distillery.distill.teacher_cache import CACHE_COLUMNS, check_cache, check_top_k, load_cache_manifest, read_cache
from distillery.models.load import adapter_base, load_tokenizer, model_config, model_identity, resolve_model_dir, teachers_identity
from distillery.registry.record import teacher_hashes
from distillery.train.method import TRAIN_COLUMNS, prepared_datasets
from distillery.train.run import run_training


class Distill:
    """Teacher -> student distillation: the `TrainingMethod` of `distillery distill`."""

    name = "distill"

    def validate(self, cfg: Config) -> None:
        validate_distill(cfg)

    def datasets(self, cfg: Config) -> dict[str, Any]:
        """Cached mode streams the teacher cache (prepared columns + top-k); online mode the prepared splits."""
        if cfg.distill.teacher_mode == "cached":
            return {split: read_cache(cfg, split).select_columns(TRAIN_COLUMNS + CACHE_COLUMNS) for split in ("train", "val")}
        return prepared_datasets(cfg)

    def build_objective(self, cfg: Config, tokenizer, model, device: torch.device) -> DistillObjective:
        if cfg.distill.on_policy is not None:
            return OnPolicyObjective(cfg, tokenizer, model, device)
        if cfg.distill.cross_tokenizer is not None:
            return CrossTokenizerObjective(cfg, tokenizer, model, device)
        return DistillObjective(cfg, tokenizer, model, device)

    def engine_cpus(self, cfg: Config) -> float:
        """One CPU per sampling engine: the student's with on_policy, the teacher's too with seq_kd."""
        op = cfg.distill.on_policy
        return 0.0 if op is None else 1.0 + float(op.seq_kd)

    def attn_implementation(self, cfg: Config) -> str | None:
        return attn_implementation(cfg)

    def teachers(self, cfg: Config) -> list[str]:
        if cfg.distill.teacher_mode == "cached":
            return teacher_hashes(load_cache_manifest(cfg.teacher_cache_dir).get("teacher"))
        return [model_identity(path)["hash"] for path, _ in cfg.model.teacher_specs]

    def identity(self, cfg: Config) -> dict[str, str]:
        if cfg.distill.teacher_mode == "cached":
            built_by = load_cache_manifest(cfg.teacher_cache_dir).get("teacher", {})
            return {"teacher": built_by.get("hash"), "teacher_source": "cache"}
        return {"teacher": teachers_identity(cfg.model.teacher_specs), "teacher_source": "online"}


DISTILL = Distill()


def validate_distill(cfg: Config) -> None:
    """Fail before Ray starts: teacher present, vocabularies equal, cache matches the data, and no
    fine-tuning-only setting that distillation would ignore."""
    ignored = [key for key, on in (("train.key_terms", bool(cfg.train.key_terms)), ("train.ewc.lambda", cfg.train.ewc.lam > 0)) if on]
    if ignored:
        raise ConfigError(f"{ignored[0]}: applies to `distillery finetune` only; distillation does not use it (unset it)")
    student = model_config(cfg.model.path)
    student_vocab = student.vocab_size
    if cfg.distill.teacher_mode == "cached":
        manifest = check_cache(cfg)
        check_top_k(cfg.distill.top_k, int(manifest["vocab_size"]), str(manifest.get("teacher", {}).get("path", cfg.teacher_cache_dir)))
        check_vocab(int(manifest["vocab_size"]), student_vocab, teacher=f"teacher cache {cfg.teacher_cache_dir}", student=str(cfg.model.path))
        return
    specs = cfg.model.teacher_specs
    if not specs:
        raise ConfigError("model.teacher: distillation needs a teacher (a model or run directory), or model.teachers")
    if len(specs) > 1 and cfg.distill.hidden is not None:
        raise ConfigError("distill.hidden: hidden-state distillation follows one teacher's layers; with several model.teachers it is not available (use model.teacher)")
    if cfg.distill.cross_tokenizer is not None:
        validate_cross_tokenizer(cfg)
        return
    for i, (path, _) in enumerate(specs):
        key = f"model.teachers.{i}" if cfg.model.teachers else "model.teacher"
        check_vocab(model_config(path).vocab_size, student_vocab, teacher=f"{key} {path}", student=str(cfg.model.path))
        check_same_tokens(path, cfg.model.tokenizer or cfg.model.path, key)
    if cfg.distill.on_policy is not None:
        validate_on_policy(cfg)
    if cfg.distill.hidden is not None and cfg.distill.hidden.attention_weight > 0:
        s_heads, t_heads = student.num_attention_heads, model_config(specs[0][0]).num_attention_heads
        if s_heads != t_heads:
            raise ConfigError(
                f"distill.hidden.attention_weight: attention maps are matched head by head; the student has {s_heads} "
                f"attention heads and the teacher {t_heads} (set attention_weight 0, or use a student with {t_heads} heads)"
            )


def check_same_tokens(teacher: str, student: str, key: str) -> None:
    """Refuse two tokenizers with equal vocabulary sizes but different tokens: logit KD would
    compare unrelated ids. The error points at cross-tokenizer distillation."""
    t_vocab, s_vocab = load_tokenizer(teacher).get_vocab(), load_tokenizer(student).get_vocab()
    if t_vocab != s_vocab:
        differ = sum(1 for tok, i in s_vocab.items() if t_vocab.get(tok) != i) + len(set(t_vocab) - set(s_vocab))
        raise VocabularyMismatchError(
            f"{key} {teacher}: the teacher's tokenizer is not the student's ({differ} tokens differ between their "
            f"{len(t_vocab)} and {len(s_vocab)}); logit distillation needs the same token ids. Set distill.cross_tokenizer "
            f"(e.g. distill.cross_tokenizer.kd=uld) to distil across tokenizers."
        )


def validate_cross_tokenizer(cfg: Config) -> None:
    """Cross-tokenizer distillation: one online teacher, fast tokenizers on both sides (character offsets)."""
    specs = cfg.model.teacher_specs
    d = cfg.distill
    if d.cross_tokenizer.kd == "hybrid" and (d.loss == "reverse_kl" or d.loss == "jsd" and d.beta == 1):
        raise ConfigError(f"distill.loss: {d.loss} is infinite against the projected teacher, which gives no mass to student tokens "
                          f"no teacher token begins with; use forward_kl, jsd with beta < 1, or tvd with cross_tokenizer.kd hybrid")
    if len(specs) > 1:
        raise ConfigError("distill.cross_tokenizer: positions are aligned with one teacher's tokens; use model.teacher, not several model.teachers")
    for key, path in (("model.teacher", specs[0][0]), ("model.path", cfg.model.tokenizer or cfg.model.path)):
        if not load_tokenizer(path).is_fast:
            raise ConfigError(f"distill.cross_tokenizer: {key} {path} has no fast tokenizer; character offsets need one (tokenizer.json)")


def validate_on_policy(cfg: Config) -> None:
    """On-policy distillation needs vLLM, rows whose prompt is known, and models an engine can load."""
    import importlib.util

    op = cfg.distill.on_policy
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("distill.on_policy: the student samples on a vLLM engine; install vllm (`pip install -e .[cpu]` or `.[gpu]`)")
    if cfg.data.packing:
        raise ConfigError("distill.on_policy: packed rows hold several prompts; on-policy sampling needs one prompt per row (set data.packing=false)")
    if adapter_base(resolve_model_dir(cfg.model.path)) is not None:
        raise ConfigError(f"distill.on_policy: model.path {cfg.model.path} is a LoRA adapter; merge it first (the engine loads full weights)")
    if op.seq_kd:
        specs = cfg.model.teacher_specs
        if len(specs) > 1:
            raise ConfigError("distill.on_policy.seq_kd: the teacher's responses come from one teacher; use model.teacher, not several model.teachers")
        if adapter_base(resolve_model_dir(specs[0][0])) is not None:
            raise ConfigError(f"distill.on_policy.seq_kd: the teacher {specs[0][0]} is a LoRA adapter; merge it first (its engine loads full weights)")


def run_distill(cfg: Config) -> int:
    return run_training(cfg, DISTILL)
