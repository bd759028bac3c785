"""The typed schema for every Distillery stage, YAML loading and dotted overrides.

One `Config` describes a whole run, from corpus to endpoint. It is loaded from YAML,
overridden from the command line (`train.lr=3e-5 data.sources.0.weight=0.7`) and validated
before Ray starts, so that a typo fails in a second, naming the key and the file, rather
than an hour into a cluster job.

Nothing in here imports another part of the package but files.py, its layer-0 neighbour (docs/architecture.md, "Layers").
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distillery.files import write_text_atomic


class ConfigError(ValueError):
    """A config that cannot be used: the message names the key (and the file, when there is one)."""


class Section(BaseModel):
    """Base for every section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- data


class SourceConfig(Section):
    path: str = Field(description="A file, glob or directory of JSONL / Parquet / CSV files, local or any fsspec URI.")
    format: Literal["instruction", "text", "chat", "prompts"] = Field(
        "instruction", description="Row shape: instruction/input/output triples, plain `text`, chat `messages`, or `prompts` ({prompt, reference?, task?, metric?}: unanswered prompts, for `generate.sources` only)."
    )
    weight: float = Field(1.0, gt=0, description="Relative share of this source in the mixed training set.")
    name: str | None = Field(None, description="Short name used in the manifest and mix report; defaults to the file stem.")

    @property
    def display_name(self) -> str:
        return self.name or Path(self.path.rstrip("/")).stem.split("*")[0] or "source"


class DedupeConfig(Section):
    exact: bool = Field(True, description="Drop rows whose normalised prompt+response text is identical to an earlier row.")
    near: bool = Field(True, description="Drop near-copies found by MinHash over character shingles.")
    threshold: float = Field(0.85, gt=0, le=1, description="Estimated Jaccard similarity at or above which two rows are near-copies.")
    num_perm: int = Field(64, ge=8, le=1024, description="MinHash permutations (more: sharper estimate, slower).")
    shingle: int = Field(5, ge=1, le=32, description="Character n-gram size of the shingles MinHash is computed over.")
    near_by: Literal["row", "prompt"] = Field(
        "row", description="`row`: a near copy's whole row and its response must both be near copies of an earlier row's (templated prompts with different answers are kept); `prompt`: near-identical prompts are copies whatever their responses."
    )


class SynonymAugmentConfig(Section):
    path: str = Field(description="TSV of synonyms, one group per line (e.g. `心电图<TAB>ECG`); any term may replace another.")
    probability: float = Field(0.5, ge=0, le=1, description="Chance that each matched term in a row is replaced.")


class ReorderAugmentConfig(Section):
    probability: float = Field(0.5, ge=0, le=1, description="Chance that a row's clauses are reordered.")


class BackTranslateConfig(Section):
    model: str = Field(description="Path of a translation model (causal LM) used as pivot there and back.")
    pivot_prompt: str = Field(
        "Translate to English:\n{text}\n", description="Prompt that translates a text into the pivot language; `{text}` is replaced."
    )
    return_prompt: str = Field(
        "Translate back:\n{text}\n", description="Prompt that translates the pivot text back; `{text}` is replaced."
    )
    max_new_tokens: int = Field(128, ge=1, description="Generation budget for each translation step.")
    probability: float = Field(1.0, ge=0, le=1, description="Share of rows sent through back-translation.")
    engine: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="Generation engine: vLLM (continuous batching), Hugging Face `generate`, or `auto` (vLLM when importable and a GPU is visible, else HF)."
    )
    num_gpus: float = Field(
        0, ge=0, le=1, description="GPU share the back-translation actor holds (Ray hides GPUs from an actor that asks for none): 1 on a GPU node, where `auto` then picks vLLM; 0 runs on CPU."
    )


class AugmentConfig(Section):
    copies: int = Field(0, ge=0, le=64, description="Augmented copies made per training row (0 turns augmentation off).")
    seed: int | None = Field(None, description="Seed for augmentation; defaults to the top-level seed.")
    synonyms: SynonymAugmentConfig | None = Field(None, description="Term/entity replacement from a synonym dictionary.")
    reorder: ReorderAugmentConfig | None = Field(None, description="Meaning-preserving clause reordering (Chinese and English punctuation).")
    back_translate: BackTranslateConfig | None = Field(None, description="Back-translation through a local model (batch inference).")


class WindowConfig(Section):
    size: int = Field(512, ge=8, description="Tokens per window when a long text document is cut into windows.")
    stride: int = Field(384, ge=1, description="Tokens between window starts (size - stride tokens overlap).")

    @model_validator(mode="after")
    def _windows_cover_the_text(self) -> "WindowConfig":
        if self.stride > self.size:
            raise ValueError(f"stride ({self.stride}) must be at most size ({self.size}), or tokens between windows are skipped")
        return self


class BalanceConfig(Section):
    by: Literal["label", "source"] = Field(description="Balance training rows over classes (a row's `label` field, else its response text) or over sources.")
    strategy: Literal["upsample", "downsample"] = Field(
        "upsample", description="`upsample` repeats training rows of the rarer groups up to the largest; `downsample` keeps a share of the larger groups' rows down to the smallest."
    )
    max_groups: int = Field(64, ge=2, description="Most distinct labels `by: label` accepts (more means the responses are not class labels).")


class DataConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=list, description="Corpora to prepare and mix.")
    max_length: int = Field(512, ge=8, description="Maximum tokens per training example (longer rows are truncated or windowed).")
    min_length: int = Field(2, ge=0, description="Rows with fewer tokens than this are filtered out.")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="Share of rows hashed into the validation split.")
    test_fraction: float = Field(0.05, ge=0, lt=1, description="Share of rows hashed into the test split.")
    dedupe: DedupeConfig = Field(default_factory=DedupeConfig, description="Exact and near-duplicate removal.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Training-set augmentation (never applied to val/test).")
    mix_by: Literal["rows", "tokens"] = Field("rows", description="Whether source weights are ratios of rows or of tokens.")
    mix_strategy: Literal["downsample", "upsample"] = Field(
        "downsample",
        description="How the weights are met: `downsample` keeps the scarcest source whole and samples the others down (nothing repeats); `upsample` keeps the most plentiful source whole and repeats training rows of the others (nothing is dropped; val and test rows are never repeated).",
    )
    chat_template: str | None = Field(None, description="Jinja chat template to use instead of the tokenizer's own.")
    packing: bool = Field(False, description="Pack several short examples into one `max_length` sequence.")
    window: WindowConfig | None = Field(None, description="Sliding windows for long `text` documents instead of truncation.")
    balance: BalanceConfig | None = Field(None, description="Balance the training split by label or by source after the mix (val and test keep the data as it is).")
    prepared: str | None = Field(None, description="Where prepared splits live; default `<output_dir>/data`.")

    @model_validator(mode="after")
    def _fractions_leave_training_rows(self) -> "DataConfig":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1, or nothing is left to train on")
        if self.balance is not None and self.balance.by == "source" and any(s.weight != 1.0 for s in self.sources):
            raise ValueError("balance.by source gives every source the same share of training rows; source weights say otherwise: "
                             "drop the weights, or drop balance and let the weights set the mix")
        if self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) is above max_length ({self.max_length}): every row would be filtered out")
        return self

    @field_validator("sources")
    @classmethod
    def _no_prompt_files(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        for i, s in enumerate(sources):
            if s.format == "prompts":
                raise ValueError(
                    f"entry {i} ('{s.display_name}') has format `prompts`: prompts have no answers to train on; list it under "
                    f"generate.sources, run `distillery generate CONFIG` first, then add its generated.jsonl here with format `chat`"
                )
        return sources


# --------------------------------------------------------------------------- model / method


class TeacherConfig(Section):
    path: str = Field(description="A teacher: a Hugging Face directory or a run directory.")
    weight: float = Field(1.0, gt=0, description="Relative weight of this teacher's probabilities in the mixture target.")


class ModelConfig(Section):
    path: str | None = Field(None, description="The model being trained (the student in distillation): a Hugging Face directory.")
    teacher: str | None = Field(None, description="The frozen teacher for distillation: a Hugging Face directory or a run directory.")
    teachers: list[TeacherConfig] = Field(
        default_factory=list, description="Several frozen teachers instead of `teacher` (same tokenizer and vocabulary): the target is the weighted mixture of their probabilities."
    )
    tokenizer: str | None = Field(None, description="Tokenizer directory when it differs from `path`.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the frozen and inference copies (teacher cache, sampling engines): `auto` is bf16 on GPU and fp32 on CPU (faster there). Trained weights follow train.precision (fp32 masters except bf16-pure)."
    )
    attn_implementation: str | None = Field(None, description="transformers attention kernel the student (and an online teacher) load with, e.g. `sdpa`, `eager`; default is the library's. Attention-map distillation always uses `eager`.")

    @model_validator(mode="after")
    def _one_way_to_name_teachers(self) -> "ModelConfig":
        if self.teacher and self.teachers:
            raise ValueError("set teacher or teachers, not both: which one would teach?")
        return self

    @property
    def teacher_specs(self) -> list[tuple[str, float]]:
        """Every teacher as (path, weight), weights summing to 1: `teachers`, else `teacher` at weight 1, else []."""
        if self.teachers:
            total = sum(t.weight for t in self.teachers)
            return [(t.path, t.weight / total) for t in self.teachers]
        return [(self.teacher, 1.0)] if self.teacher else []


class LoraConfig(Section):
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], description="Module names that get adapters.")
    merge: bool = Field(False, description="Also write merged full weights beside the adapter.")


class FreezeConfig(Section):
    trainable_layers: int = Field(2, description="Train the last N decoder layers (negative: the first N) plus final norm and lm_head.")


class EsftConfig(Section):
    relevance: Literal["gate", "token"] = Field("gate", description="How experts are scored on the task data: mean gate score (router softmax) or share of top-k selections.")
    threshold: float = Field(0.2, gt=0, le=1, description="Per layer, experts train in descending relevance until their cumulative share reaches this (at least one).")
    sample_tokens: int = Field(4096, ge=1, description="Non-padding tokens of the training split the relevance is measured on.")
    train_shared: bool = Field(False, description="Also train shared experts (Qwen2-MoE's shared_expert and its gate).")
    train_non_expert: bool = Field(False, description="Also train everything outside the experts: attention, routers, norms, embeddings, lm_head.")
    experts_file: str | None = Field(None, description="An `esft_experts.json` from an earlier run: reuse its selection instead of measuring relevance.")


class MethodConfig(Section):
    kind: Literal["full", "lora", "freeze", "esft"] = Field("full", description="Which parameters train: all, LoRA adapters, the last layers, or task-relevant experts.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings (kind: lora).")
    freeze: FreezeConfig = Field(default_factory=FreezeConfig, description="Layer-freezing settings (kind: freeze).")
    esft: EsftConfig = Field(default_factory=EsftConfig, description="Expert-specialised fine-tuning settings for MoE models (kind: esft).")


# --------------------------------------------------------------------------- distill


class ScheduleConfig(Section):
    kind: Literal["constant", "linear", "cosine", "step"] = Field("constant", description="Shape of the change from the start value to `end` over training.")
    end: float | None = Field(None, description="Value at the last step (null: stay at the start value).")


class HiddenDistillConfig(Section):
    weight: float = Field(1.0, ge=0, description="Weight of the hidden-state loss added to the total.")
    loss: Literal["mse", "cosine"] = Field("mse", description="Distance between mapped student and teacher hidden states.")
    layer_map: list[tuple[int, int]] | None = Field(None, description="(student layer, teacher layer) pairs; default spread evenly, last to last.")
    attention_weight: float = Field(0.0, ge=0, description="Weight of the KL between attention maps of mapped layers (needs equal head counts).")


class StageConfig(Section):
    steps: int = Field(ge=1, description="Optimiser steps in this stage.")
    alpha: float | None = Field(None, ge=0, le=1, description="KD weight during the stage (null: distill.alpha).")
    temperature: float | None = Field(None, gt=0, description="Temperature during the stage (null: distill.temperature).")
    hidden_weight: float | None = Field(None, ge=0, description="Hidden-state loss weight during the stage (0 turns it off; null: distill.hidden.weight).")


class OnPolicyConfig(Section):
    lmbda: float = Field(
        0.5, ge=0, le=1, description="Share of micro-batches whose responses the current student samples from the batch's prompts (the rest train on the data's responses, or the teacher's with seq_kd)."
    )
    beta: float = Field(
        0.5, ge=0, le=1, description="Generalised JSD weight of the on-policy term (GKD): 0 forward KL, 1 reverse KL (MiniLLM), between them the JSD with mixture m = β·p + (1−β)·q."
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the student's (and with seq_kd the teacher's) responses; the loss uses distill.temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of those responses (1: the whole distribution).")
    max_new_tokens: int = Field(64, ge=1, description="Longest sampled response in tokens (the sequence is also capped at data.max_length).")
    sync_every: int = Field(1, ge=1, description="The sampling engine gets the student's current weights before sampling once they are this many optimiser steps old.")
    seq_kd: bool = Field(False, description="The other micro-batches train on responses the teacher samples (sequence-level KD) instead of the data's.")
    cpu_kv_cache_gib: float = Field(1.0, gt=0, description="KV cache of each sampling engine on CPU in GiB (VLLM_CPU_KVCACHE_SPACE).")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="Share of its GPU a sampling engine may take with train.use_gpu (one GPU per engine).")


class EngineConfig(Section):
    """A vLLM engine a stage runs (eval generation, teacher cache, generation). The GPU settings act
    with `train.use_gpu` only; set on a CPU run they are refused, not ignored."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None, description="Engine weights dtype (null: model.dtype; `auto`: bf16 on GPU, fp32 on CPU, where bf16 GEMMs run slower)."
    )
    max_model_len: int | None = Field(None, ge=8, description="Context length of the engine (null: what the stage needs: prompt budget plus new tokens, capped at the model's).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one engine shards the model over (a teacher too big for one GPU); each engine's Ray worker requests that many. GPU only.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of each of its GPUs the engine may take for weights and KV cache. GPU only.")
    accelerator_type: str | None = Field(None, description="Ray accelerator type the engine's GPUs must be, e.g. `H100` or `A10G` (nodes advertise it). GPU only.")


class CrossTokenizerConfig(Section):
    kd: Literal["uld", "hybrid"] = Field(
        "uld", description="`uld`: Universal Logit Distillation (L1 between the sorted probability vectors) on positions aligned by character offsets; `hybrid`: distill.loss against the teacher's distribution moved onto the student's vocabulary (each teacher token's probability to the student token its text begins with; shared tokens map to themselves)."
    )
    shared_weight: float = Field(1.0, ge=0, description="Weight of the projected-teacher term in `hybrid` mode (against the student's cross-entropy, which alpha weighs).")


class DistillConfig(Section):
    loss: Literal["forward_kl", "reverse_kl", "jsd", "tvd"] = Field("forward_kl", description="Divergence between teacher and student distributions.")
    temperature: float = Field(2.0, gt=0, description="Softmax temperature for both distributions; the KD term is scaled by T².")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the KD term: total = alpha·KD + (1 − alpha)·CE.")
    beta: float = Field(0.5, ge=0, le=1, description="Mixture weight of the generalised JSD (0 → forward KL, 1 → reverse KL).")
    teacher_mode: Literal["online", "cached"] = Field("online", description="Run the teacher each step, or read its top-k logprobs from a cache.")
    top_k: int = Field(4, ge=1, description="Teacher logprobs kept exactly per position in the cache (the head); with cache_samples > 0 the tail beyond them is sampled.")
    cache_samples: int = Field(
        4, ge=0, le=255, description="Draws per position from the teacher's distribution outside the top-k head (stored as unique ids with counts), so the cached target is unbiased at cache_sample_temperature; 0 keeps the plain, renormalised top-k. The defaults store at most 40 B per target position (1% of dense fp16 at a 2,048 vocabulary)."
    )
    cache_sample_temperature: float | None = Field(
        None, gt=0, description="Temperature of the teacher distribution the cache's tail is drawn from; default `temperature`. The cached target is exact in expectation at this temperature and consistent (self-normalised importance weights) at others, with bounded weights below it: set it to the highest temperature the cache will train at (e.g. the top of a tuned range)."
    )
    cache: str | None = Field(None, description="Teacher cache directory; default `<prepared>/teacher_cache`.")
    keep_tail: bool = Field(False, description="Keep the teacher's mass outside the top-k as one extra bucket instead of renormalising (plain top-k caches only: needs cache_samples 0).")
    chunk_size: int | None = Field(
        None, ge=1, description="Positions per chunk of the KD loss (bounds the B×T×V softmax memory); default 2^22 / vocabulary (128 at 32k, 32 at 128k), fewer, down to 2^21 / vocabulary, for batches under 32 chunks; at least 256 when fused with the lm_head."
    )
    # Offline teacher cache (`distillery cache-teacher`).
    cache_backend: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="Teacher cache engine: vLLM `prompt_logprobs`, a Hugging Face forward, or `auto` (vLLM with `train.use_gpu` when installed and the teacher is not a PEFT adapter; else HF)."
    )
    cache_dtype: Literal["float16", "float32"] = Field("float16", description="Stored dtype of the cached top-k logprobs (float16 halves their size; error below 0.01 nats above -16).")
    cache_batch_size: int = Field(8, ge=1, description="Rows per teacher forward when building the cache (bounds the rows×length×vocabulary logits).")
    cache_actors: int = Field(1, ge=1, description="Teacher replicas (Ray Data actors) building the cache in parallel.")
    cache_reuse: list[str] = Field(
        default_factory=list, description="`distillery generate` output directories of the same teacher: prepared rows that are their samples take the top-k logprobs generate stored in the same pass, so the teacher scores only the other rows (plain top-k caches: cache_samples 0)."
    )
    cache_engine: EngineConfig = Field(default_factory=EngineConfig, description="The cache's vLLM engine (cache_backend vllm; `dtype` also sets the HF backend's teacher dtype).")
    hidden: HiddenDistillConfig | None = Field(None, description="Feature distillation between mapped hidden layers (online teacher only).")
    temperature_schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="How the temperature moves from `temperature` over training.")
    alpha_schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="How alpha moves from `alpha` over training.")
    stages: list[StageConfig] = Field(default_factory=list, description="Progressive distillation: consecutive stages with their own weights (e.g. logits first, then hidden states).")
    entropy_weighting: bool = Field(False, description="Scale the KD weight per batch by the teacher's confidence (1 − normalised entropy).")
    fused_lm_head: bool = Field(False, description="Compute student logits per chunk from hidden states inside the KD loss (every strategy, FSDP2 included), so the student's B×T×V logits never exist.")
    on_policy: OnPolicyConfig | None = Field(
        None, description="On-policy distillation (GKD): the student samples responses on a vLLM engine beside the workers and the online teacher grades every sampled token."
    )
    cross_tokenizer: CrossTokenizerConfig | None = Field(
        None, description="Teacher and student with different tokenizers: logits compared on positions aligned by character offsets (online teacher only)."
    )

    @model_validator(mode="after")
    def _hidden_needs_online_teacher(self) -> "DistillConfig":
        if self.hidden is not None and self.teacher_mode == "cached":
            raise ValueError("hidden-state distillation needs the teacher's hidden states: use teacher_mode online")
        for key in ("on_policy", "cross_tokenizer"):
            if getattr(self, key) is not None and self.teacher_mode == "cached":
                raise ValueError(f"{key} needs the teacher online (it scores sequences no cache holds): use teacher_mode online")
        if self.on_policy is not None and self.cross_tokenizer is not None:
            raise ValueError("on_policy and cross_tokenizer do not combine yet: the on-policy teacher grades the student's own tokens")
        for key in ("on_policy", "cross_tokenizer"):
            if getattr(self, key) is None:
                continue
            for other, on in (("hidden", self.hidden is not None), ("fused_lm_head", self.fused_lm_head),
                              ("entropy_weighting", self.entropy_weighting and key == "cross_tokenizer")):
                if on:
                    raise ValueError(f"{key} and {other} do not combine: unset distill.{other}")
        if self.keep_tail and self.cache_samples > 0:
            raise ValueError(
                f"keep_tail and cache_samples ({self.cache_samples}) do not combine: the sampled tail already stands for the "
                f"teacher's mass outside the top-k; set distill.cache_samples=0 to keep the tail as one bucket instead"
            )
        if self.cache_backend == "vllm" and self.cache_samples > 0:
            raise ValueError(
                f"cache_backend vllm cannot sample the teacher's tail (cache_samples {self.cache_samples}): vLLM reports only "
                f"the top-k prompt logprobs; use distill.cache_backend=hf (or auto), or distill.cache_samples=0 for a plain top-k cache"
            )
        if self.stages:
            moving = [k for k in ("temperature_schedule", "alpha_schedule")
                      if getattr(self, k).kind != "constant" or getattr(self, k).end is not None]
            if moving:
                raise ValueError(
                    f"stages and {moving[0]} do not combine: during stages each stage sets its own temperature and alpha; "
                    f"put the values in the stages, or drop the stages to use the schedule"
                )
            if self.hidden is None and any(st.hidden_weight for st in self.stages):
                raise ValueError("stages set hidden_weight but distill.hidden is not set: add distill.hidden (the layers to match)")
        end = self.temperature_schedule.end
        if end is not None and end <= 0:
            raise ValueError(f"temperature_schedule.end must be above 0 (the logits are divided by it), got {end}")
        end = self.alpha_schedule.end
        if end is not None and not 0 <= end <= 1:
            raise ValueError(f"alpha_schedule.end must be in [0, 1] (the KD weight), got {end}")
        return self


# --------------------------------------------------------------------------- train


class EwcConfig(Section):
    lam: float = Field(0.0, ge=0, alias="lambda", description="Strength of the EWC penalty (0 turns it off).")
    previous: str | None = Field(None, description="Prepared data directory of the previous task the Fisher information is estimated on.")
    samples: int = Field(64, ge=1, description="Examples used to estimate the Fisher information.")

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class CurriculumConfig(Section):
    by: Literal["length", "teacher_loss"] = Field(description="Difficulty of a training row: its length in tokens, or the teacher's mean loss on its response (needs model.teacher).")
    stages: int = Field(3, ge=1, description="Equal-count groups of increasing difficulty, trained in order every epoch (rows keep a hashed order within a group).")


class TrainConfig(Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one process each; one GPU each when use_gpu).")
    use_gpu: bool = Field(False, description="Train on GPUs (NCCL) instead of CPUs (gloo).")
    strategy: Literal["fsdp", "ddp", "none"] = Field("fsdp", description="FSDP2 sharding, DDP replication, or a single unwrapped model.")
    cpus_per_worker: float | None = Field(
        None, gt=0, description="Logical CPUs reserved per training worker, also its torch thread count. null (auto): a run that starts its own Ray shares this machine's cores among its workers (and concurrent tune trials), less one per sampling engine, at least 1 each; a run that joins a cluster reserves 1."
    )
    worker_resources: dict[str, float] = Field(
        default_factory=dict, description="Extra Ray resources per worker, e.g. {trainer: 1} with one `trainer` per node to place one worker per node."
    )
    epochs: int = Field(1, ge=1, description="Passes over the training split (ignored once max_steps is reached).")
    max_steps: int | None = Field(None, ge=1, description="Optimiser steps to run; when set it wins over epochs (the data repeats as needed).")
    batch_size: int = Field(8, ge=1, description="Examples per worker per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimiser step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    scheduler: Literal["constant", "linear", "cosine"] = Field("cosine", description="Learning-rate decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm (null: no clipping).")
    eval_every: int | None = Field(None, ge=1, description="Evaluate on val every N steps (null: at the end only).")
    checkpoint_every: int | None = Field(None, ge=1, description="Checkpoint every N steps (null: at the end only).")
    keep_checkpoints: int | None = Field(2, ge=1, description="Most recent checkpoints kept on disk; older ones are deleted (null: keep all).")
    resume: Literal["auto", "fresh", "force"] = Field(
        "auto", description="With checkpoints in output_dir: `auto` resumes only the same run (stage, data, models, settings; else an error says what changed), `fresh` deletes that run's checkpoints, metrics and model and starts over, `force` resumes whatever changed."
    )
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts Ray Train may make (-1: unlimited).")
    early_stopping_patience: int | None = Field(None, ge=1, description="Stop after this many evaluations without val-loss improvement.")
    max_nonfinite_steps: int = Field(
        3, ge=1, description="Consecutive steps with a non-finite loss or gradient norm (each skipped: no update) before the run stops with an error; nothing is exported then."
    )
    key_terms: list[str] = Field(default_factory=list, description="Terms whose tokens get `key_term_weight` in the cross-entropy.")
    key_term_weight: float = Field(1.5, gt=0, description="Loss weight of key-term tokens.")
    router_aux_loss_coef: float | None = Field(
        None, ge=0, description="Weight of the MoE router load-balancing loss added to the training loss (null: the model config's `router_aux_loss_coef`; MoE models only)."
    )
    ewc: EwcConfig = Field(default_factory=EwcConfig, description="Elastic weight consolidation against forgetting a previous task.")
    precision: Literal["auto", "fp32", "bf16", "fp16", "bf16-pure"] = Field(
        "auto", description="Training numerics. `fp32`: fp32 throughout. `bf16`: mixed precision, fp32 master weights (what the optimiser updates) and fp32 gradient reduction, bf16 compute (FSDP2 policy, or autocast with ddp/none); GPU or CPU. `fp16`: the same in fp16 with loss scaling, for GPUs without bf16 (GPU only). `bf16-pure`: weights and optimiser state stored in bf16, no fp32 copy: half the weight memory, but an update smaller than bf16's resolution (about 2^-8 of the weight) is rounded away. `auto`: bf16 on GPU, fp32 on CPU. The trained weights load in fp32 (bf16 for bf16-pure) whatever `model.dtype` says; that sets the teacher cache's and the sampling engines' dtype."
    )
    curriculum: CurriculumConfig | None = Field(None, description="Order training rows from easy to hard (null: the prepared order).")
    trace_rows: bool = Field(False, description="Record which row_ids each worker trained on at each step (`<output_dir>/trace/`), to audit data order.")
    qat: bool = Field(
        False, description="Quantisation-aware training: every linear of the decoder fake-quantises its weights (int8 per channel) and inputs (int8 per token) as `export.quantize: w8a8` will, so the quantised export loses less. Full and freeze methods, dense models."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each decoder layer's activations in the backward pass instead of keeping them (non-reentrant gradient checkpointing): activation memory falls to about one layer's input per layer, for about a third more compute. Any method and strategy."
    )
    cpu_offload: bool = Field(
        False, description="FSDP2 CPU offload: parameter shards, gradients and the optimiser step live in host memory and are copied to the GPU per layer. Needs strategy fsdp and use_gpu."
    )


# --------------------------------------------------------------------------- tune


class TuneConfig(Section):
    num_samples: int = Field(8, ge=1, description="Trials to run.")
    metric: str = Field("val_loss", description="Metric the search optimises (reported by every trial).")
    mode: Literal["min", "max"] = Field("min", description="Minimise or maximise the metric.")
    search_space: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Dotted config key → domain, e.g. `train.lr: {loguniform: [1e-5, 1e-3]}`."
    )
    max_concurrent_trials: int = Field(1, ge=1, description="Trials running at once (fit to the cluster's resources).")
    grace_period: int = Field(2, ge=1, description="ASHA: evaluations a trial gets before it can be stopped.")
    reduction_factor: int = Field(2, ge=2, description="ASHA: 1/reduction_factor of trials survive each rung.")
    searcher: Literal["optuna", "random"] = Field("optuna", description="Optuna TPE or plain random search.")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="ASHA early stopping or run every trial to the end.")
    stage: Literal["auto", "finetune", "distill"] = Field("auto", description="What each trial trains; `auto`: distill when model.teacher is set.")


# --------------------------------------------------------------------------- serve


class ServeVersionConfig(Section):
    path: str = Field(description="This version's run directory, model directory or `registry:NAME@ALIAS`.")
    weight: float = Field(1.0, ge=0, description="Its share of the name's traffic (normalised over the versions that answer).")
    role: Literal["stable", "canary", "shadow"] = Field(
        "stable", description="`stable` (exactly one), `canary` (judged against stable and rolled back automatically), or `shadow` (gets a copy of the traffic; its answers are logged, never returned)."
    )


class ProbeConfig(Section):
    file: str = Field(
        description="JSONL of {prompt, answer} rows, read at every round (edits apply without a restart): stable and canary each answer every prompt greedily through /v1/completions; an output passes when it contains the answer (case and spacing ignored)."
    )
    every_s: float = Field(60.0, gt=0, description="Seconds between probe rounds while a canary takes traffic.")
    max_score_drop: float = Field(0.1, ge=0, le=1, description="Roll back when the canary's pass rate is more than this below stable's.")
    max_tokens: int = Field(32, ge=1, description="Tokens each probe answer may have.")


class ServeModelConfig(Section):
    path: str | None = Field(None, description="A finished run directory, a Hugging Face model directory, or a registered model: `registry:NAME@ALIAS` / `registry:NAME@VERSION` / `registry:NAME` (latest). Or give `versions`.")
    name: str | None = Field(None, description="Model id clients ask for; defaults to the directory name (required with `versions`).")
    merge_lora: bool = Field(False, description="Serve a LoRA run as merged full weights instead of an adapter.")
    versions: list[ServeVersionConfig] = Field(
        default_factory=list, description="Several versions behind `name` with traffic weights and roles (instead of `path`); every response names its version in `X-Distillery-Version`."
    )
    probe: ProbeConfig | None = Field(
        None, description="A quality probe run against stable and canary while the canary takes traffic; a canary that scores worse is rolled back (needs `versions` with a canary)."
    )

    @model_validator(mode="after")
    def _path_or_versions(self) -> "ServeModelConfig":
        if (self.path is None) == (not self.versions):
            raise ValueError("give `path` or `versions`, not both" if self.path else "give `path` or `versions`")
        if self.versions:
            if not self.name:
                raise ValueError("`name` is required with `versions` (the id clients ask for)")
            roles = [v.role for v in self.versions]
            if roles.count("stable") != 1:
                raise ValueError(f"`versions` needs exactly one `role: stable` (got {roles.count('stable')})")
            if roles.count("canary") + roles.count("shadow") > 1:
                raise ValueError("`versions`: at most one canary or shadow beside the stable version")
            if not any(v.weight > 0 for v in self.versions if v.role != "shadow"):
                raise ValueError("`versions`: every answering version has weight 0")
        if self.probe is not None and not any(v.role == "canary" for v in self.versions):
            raise ValueError("`probe` compares a canary with the stable version: give `versions` with a `role: canary`")
        return self


class CanaryConfig(Section):
    window_s: float = Field(60.0, gt=0, description="Sliding window over which canary and stable outcomes are compared.")
    min_requests: int = Field(20, ge=1, description="Outcomes each version needs in the window before the canary is judged.")
    max_error_rate_delta: float = Field(0.05, ge=0, le=1, description="Roll back when the canary's error rate exceeds stable's by more than this.")
    max_p95_ratio: float = Field(1.5, gt=1, description="Roll back when the canary's p95 latency exceeds this multiple of stable's.")
    auto_promote_after_s: float | None = Field(
        None, gt=0, description="Promote the canary to all traffic after this many seconds without a rollback (null: promotion is `distillery deploy promote`)."
    )
    deploy_log: str | None = Field(None, description="Append-only JSONL of traffic changes (rollbacks, promotions), shared by every ingress replica; default `<output_dir>/deploy.jsonl`.")
    sticky_header: str = Field("x-session-id", description="Request header whose value keeps a session on one version (else the request's `user` field).")


class AutoscalingConfig(Section):
    min_replicas: int = Field(1, ge=0, description="Replicas kept even when idle.")
    max_replicas: int = Field(1, ge=1, description="Upper bound on replicas.")
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="Ongoing requests per replica the autoscaler aims at (null: 16; with serve.latency_target_ms replicas follow the latency instead)."
    )

    @model_validator(mode="after")
    def _bounds_in_order(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


class ServeConfig(Section):
    models: list[ServeModelConfig] = Field(default_factory=list, description="What to serve.")
    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the HTTP proxy.")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key (null with no key file: no auth).")
    api_key_file: str | None = Field(None, description="File holding the API key (first line).")
    max_model_len: int | None = Field(None, ge=8, description="Context length of the engine; default: the model's.")
    max_num_seqs: int = Field(64, ge=1, description="vLLM continuous batching: sequences in one engine step.")
    max_num_batched_tokens: int | None = Field(None, ge=8, description="vLLM: tokens in one engine step.")
    max_ongoing_requests: int = Field(64, ge=1, description="Serve: requests a replica works on at once.")
    max_queued_requests: int = Field(128, ge=-1, description="Serve: requests waiting beyond that before a fast 503 (-1: unbounded).")
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig, description="Replica autoscaling.")
    overload_status: Literal[503, 429] = Field(503, description="HTTP status of requests rejected beyond max_queued_requests.")
    retry_after_s: int = Field(1, ge=0, description="`Retry-After` seconds sent with overload rejections.")
    device: Literal["auto", "cpu", "gpu"] = Field("auto", description="Engine hardware: `auto` picks gpu when CUDA is visible, else cpu (vllm-cpu).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Engine weights dtype: `auto` is fp32 on CPU, the model's own on GPU.")
    cpu_kv_cache_gib: float = Field(1.0, gt=0, description="vllm-cpu KV-cache size per engine in GiB (VLLM_CPU_KVCACHE_SPACE).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs each engine replica shards its model over (Serve reserves them as one placement group). GPU only.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of each of its GPUs an engine may take for weights and KV cache. GPU only.")
    accelerator_type: str | None = Field(None, description="Ray accelerator type the engine replicas' GPUs must be, e.g. `H100` or `L4`. GPU only.")
    ingress_cpus: float = Field(0.0, ge=0, description="Logical CPUs reserved by the HTTP ingress replica (0 lets it share a small node with the engine).")
    allow_unauthenticated: bool = Field(
        False, description="Serve on a non-loopback `host` without an API key (anyone who reaches the port can use the models); refused otherwise."
    )
    max_request_bytes: int = Field(1_048_576, ge=1024, description="Largest request body accepted; a larger one gets 413 before it is parsed.")
    max_n: int = Field(8, ge=1, description="Most completions (`n`) one request may ask for.")
    max_prompts: int = Field(32, ge=1, description="Most prompts in one /v1/completions request (a list `prompt`).")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Most tokens in one prompt (or chat, rendered); default: the context length less max_tokens."
    )
    canary: CanaryConfig = Field(default_factory=CanaryConfig, description="How a canary version is judged, rolled back and promoted.")
    latency_target_ms: float | None = Field(
        None, gt=0, description="p95 latency each engine replica holds by admitting fewer or more requests at once (AIMD, at most max_num_seqs), and that autoscaling between autoscaling.min_replicas and max_replicas follows (null: a static max_num_seqs and queue-length autoscaling)."
    )
    latency_metric: Literal["tpot", "ttft"] | None = Field(
        None, description="What latency_target_ms measures: `tpot` (the default), a request's mean time per output token after its first, or `ttft`, its time from admission to the first token."
    )
    ray_num_cpus: int | None = Field(None, ge=1, description="Logical CPUs of the local Ray started by `distillery serve`; default max(4, cores).")

    @model_validator(mode="after")
    def _one_api_key_source(self) -> "ServeConfig":
        if self.api_key_env and self.api_key_file:
            raise ValueError("set api_key_env or api_key_file, not both: which key would the server require?")
        loopback = self.host in ("localhost", "::1") or self.host.startswith("127.")
        if not loopback and not (self.api_key_env or self.api_key_file) and not self.allow_unauthenticated:
            raise ValueError(f"host {self.host} is reachable from other machines and no API key is set: set api_key_env or "
                             f"api_key_file, or allow_unauthenticated: true to serve anyone who reaches the port")
        if self.latency_target_ms is None and self.latency_metric is not None:
            raise ValueError("latency_metric is set but latency_target_ms is not: set the target it measures")
        if self.latency_target_ms is not None and self.autoscaling.target_ongoing_requests is not None:
            raise ValueError("autoscaling.target_ongoing_requests and latency_target_ms both steer the replica count; "
                             "with a latency target, replicas follow the requests each one admits at that target")
        return self


# --------------------------------------------------------------------------- eval


class EvalModelConfig(Section):
    path: str = Field(description="A run directory, a Hugging Face model directory or `registry:NAME@ALIAS` to evaluate.")
    name: str | None = Field(None, description="Name in the report; defaults to the directory name.")


class EvalConfig(Section):
    models: list[EvalModelConfig] = Field(default_factory=list, description="Models compared side by side.")
    dataset: str | None = Field(
        None, description="JSONL of {prompt, reference, task, metric}; default: the prepared `split` of data.prepared."
    )
    split: Literal["val", "test"] = Field("test", description="Prepared split used when `dataset` is not given.")
    teacher: str | None = Field(None, description="Teacher for top-1 agreement and KL; default `model.teacher`.")
    max_examples: int | None = Field(None, ge=1, description="Evaluate at most this many examples (the first ones).")
    max_new_tokens: int = Field(32, ge=1, description="Greedy generation budget per example.")
    backend: Literal["auto", "vllm", "hf"] = Field("auto", description="Generation engine: vLLM, or Hugging Face generate where vLLM cannot load the model.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="The evaluation engine and the Ray worker each model is evaluated on (with train.use_gpu it holds tensor_parallel_size GPUs).")
    chat: bool = Field(True, description="Render prompts through the tokenizer's chat template.")
    labels: list[str] = Field(default_factory=list, description="Label set for `accuracy` (default: the references seen per task).")
    output: str | None = Field(None, description="Report directory; default `<output_dir>/eval`.")


# --------------------------------------------------------------------------- generate


class GenerateConfig(Section):
    sources: list[SourceConfig] = Field(
        default_factory=list,
        description="Prompt files the teacher completes: format `prompts` ({prompt, reference?, task?, metric?}), `instruction` (an `output`, when present, is the reference) or `chat` (ending with a user turn; a final assistant turn is the reference).",
    )
    output: str | None = Field(None, description="Output directory (generated.jsonl, teacher_logprobs/, generate_manifest.json); default `<output_dir>/generated`.")
    teacher: str | None = Field(None, description="The model that answers: a Hugging Face directory or a run directory; default: model.teacher, or the one entry of model.teachers.")
    n: int = Field(1, ge=1, description="Samples per prompt.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature; 0 is greedy decoding (then n must be 1).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: sample from the smallest set of tokens holding this much probability.")
    max_new_tokens: int = Field(256, ge=1, description="Generation budget per sample; an answer cut off here has finish reason `length`.")
    seed: int | None = Field(None, description="Seed of the sampling; default: the top-level seed. Each sample's seed is derived from it, the prompt and the sample index, so a re-run reproduces it whatever the batching.")
    top_k: int | None = Field(None, ge=1, description="Teacher logprobs stored per position of each kept sample (for cached KD); default: distill.top_k; at most the teacher's vocabulary.")
    actors: int = Field(1, ge=1, description="Teacher replicas (Ray Data actors), one vLLM engine each (generate.engine.tensor_parallel_size GPUs each with train.use_gpu).")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Each actor's vLLM engine (max_model_len null: data.max_length plus max_new_tokens).")
    batch_size: int = Field(64, ge=1, description="Prompts per actor batch: the batch's n samples per prompt go to the engine in one call (continuous batching).")
    drop_empty: bool = Field(True, description="Drop samples whose answer has no letter or digit (an answer with no text at all is always dropped: prepare would quarantine it).")
    drop_truncated: bool = Field(
        True, description="Drop samples cut off by max_new_tokens (finish reason `length`) or longer than data.max_length once rendered (prepare would truncate them); when false they are kept, truncated as prepare truncates."
    )
    max_repeat_fraction: float | None = Field(
        0.5, gt=0, le=1, description="Drop samples whose share of repeated `repeat_ngram`-grams (of words; CJK characters count as words) is above this: degenerate repetition (null: no repetition filter)."
    )
    repeat_ngram: int = Field(4, ge=1, description="n-gram size of the repetition filter.")
    accept: Literal["all", "reference"] = Field(
        "all", description="`reference`: rejection sampling, keep only samples whose answer agrees with the row's reference (rows without one are quarantined); `all`: keep every sample the filters pass."
    )
    metric: Literal["exact_match", "f1", "accuracy", "contains", "regex"] = Field(
        "exact_match", description="With accept: reference, the task metric (distillery.data.answers) for rows that name no `metric` of their own."
    )
    min_score: float = Field(1.0, gt=0, le=1, description="With accept: reference, the score at or above which an answer agrees with its reference (f1 gives partial scores).")

    @model_validator(mode="after")
    def _settings_that_act(self) -> "GenerateConfig":
        for i, s in enumerate(self.sources):
            if s.format == "text":
                raise ValueError(f"sources.{i} ('{s.display_name}') has format `text`: plain text has no prompt to answer; use `prompts`, `instruction` or `chat`")
            if s.weight != 1.0:
                raise ValueError(
                    f"sources.{i}.weight: every prompt is completed; weights mix sources in `prepare`: set it on the data.sources entry that reads generated.jsonl"
                )
        names = [s.display_name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"sources: names must be unique, as each sample's provenance records its source; got {names}; set `name`")
        if self.temperature == 0:
            if self.n > 1:
                raise ValueError(f"n is {self.n} with temperature 0: greedy decoding gives the same answer every time; set n: 1 or a temperature above 0")
            if self.top_p < 1:
                raise ValueError("top_p is set with temperature 0: greedy decoding samples nothing; set a temperature above 0 or leave top_p at 1")
            if self.seed is not None:
                raise ValueError("seed is set with temperature 0: greedy decoding samples nothing; set a temperature above 0 or leave seed unset")
        # Compared with the defaults rather than with the keys given: a resolved config (config.yaml)
        # spells out every default and must load again.
        defaults = GenerateConfig.model_fields
        if self.accept == "all":
            for key in ("metric", "min_score"):
                if getattr(self, key) != defaults[key].default:
                    raise ValueError(f"{key} is set with accept: all, which checks no reference; set accept: reference")
        if self.max_repeat_fraction is None and self.repeat_ngram != defaults["repeat_ngram"].default:
            raise ValueError("repeat_ngram is set with max_repeat_fraction: null, which turns the repetition filter off")
        return self


# --------------------------------------------------------------------------- root


# --------------------------------------------------------------------------- export


class ExportConfig(Section):
    model: str | None = Field(None, description="Run directory or model directory to export (full weights or a LoRA adapter); default: output_dir, the run this config trained.")
    output: str | None = Field(None, description="Directory written; default `<run>/export` (`<run>/export-w8a8` when quantised).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype of the tensors that stay floating point (all of them without quantisation); `auto` keeps the model's own."
    )
    quantize: Literal["none", "w8a8"] = Field(
        "none", description="`w8a8`: int8 per-channel weights and dynamic per-token int8 activations in every decoder linear (compressed-tensors; vLLM loads it on CPU and GPU). Dense models."
    )
    calibration_rows: int = Field(
        64, ge=0, description="Rows of the prepared train split the weight clipping is calibrated on (0: round to nearest, no data needed)."
    )
    name: str | None = Field(None, description="Register the export in the lineage registry as a new version of this model name.")
    alias: str | None = Field(None, description="Alias moved to that version (e.g. `champion`, `canary`); needs `name`.")

    @model_validator(mode="after")
    def _alias_needs_name(self) -> "ExportConfig":
        if self.alias and not self.name:
            raise ValueError("alias needs `name` (the registered model the alias belongs to)")
        for key, value in (("name", self.name), ("alias", self.alias)):
            if value is not None and (not value.strip() or any(c in value for c in "/:@")):
                raise ValueError(f"{key} '{value}' must be non-empty and contain none of '/', ':', '@'")
        return self


# --------------------------------------------------------------------------- registry


class RegistryConfig(Section):
    dir: str | None = Field(None, description="Lineage registry directory (SQLite, safe for concurrent writers); default: $DISTILLERY_REGISTRY, else `~/.distillery/registry`.")
    record: bool = Field(True, description="Every stage records its run (inputs, outputs, hashes, metrics) in the registry when it finishes.")
    mlflow_uri: str | None = Field(None, description="Also mirror runs and model versions to this MLflow tracking URI (e.g. `sqlite:///mlflow.db`); needs the `mlflow` extra.")

    @property
    def path(self) -> str:
        return os.path.expanduser(self.dir or os.environ.get("DISTILLERY_REGISTRY") or "~/.distillery/registry")


class Config(Section):
    output_dir: str = Field(
        "runs/default", description="Run directory: resolved config, metrics, checkpoints, model. Left at its default, finetune and distill each write to `<output_dir>/<stage>` (prepared data stays in `<output_dir>/data`)."
    )
    seed: int = Field(0, description="Seed for data splits, augmentation, initialisation and sampling.")
    data: DataConfig = Field(default_factory=DataConfig, description="Corpora and how they are prepared.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model paths.")
    method: MethodConfig = Field(default_factory=MethodConfig, description="Which parameters train.")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="Teacher → student distillation.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Ray Train loop.")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="Ray Tune search.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Ray Serve + vLLM endpoint.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Task metrics and comparison report.")
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="Teacher-generated training data (sequence-level KD): `distillery generate`.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="Deployable model: merge, dtype, INT8 quantisation, model card: `distillery export`.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="Lineage registry: runs, model versions and aliases.")

    @field_validator("output_dir")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    # Derived locations: one place decides where each stage reads and writes.
    @property
    def prepared_dir(self) -> str:
        return self.data.prepared or os.path.join(self.output_dir, "data")

    @property
    def teacher_cache_dir(self) -> str:
        return self.distill.cache or os.path.join(self.prepared_dir, "teacher_cache")

    @property
    def deploy_log(self) -> str:
        return self.serve.canary.deploy_log or os.path.join(self.output_dir, "deploy.jsonl")

    @property
    def generated_dir(self) -> str:
        return self.generate.output or os.path.join(self.output_dir, "generated")

    def generation_teacher(self) -> tuple[str, str]:
        """(path, key naming it) of the model `distillery generate` samples from: generate.teacher,
        else the one teacher of the model section; a ConfigError when none or several are named."""
        if self.generate.teacher:
            return self.generate.teacher, "generate.teacher"
        specs = self.model.teacher_specs
        if not specs:
            raise ConfigError("generate.teacher: not set, and model has no teacher to default to; name the model that answers the prompts")
        if len(specs) > 1:
            raise ConfigError(
                f"generate.teacher: model.teachers names {len(specs)} teachers; set generate.teacher to the one that answers the prompts "
                f"(a mixture has no single sample to generate)"
            )
        return specs[0][0], "model.teachers.0.path" if self.model.teachers else "model.teacher"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------- loading


def _format_location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def _validation_message(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        key = _format_location(e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'")
        elif e["type"] == "missing":
            lines.append(f"missing required key '{key}'")
        else:
            lines.append(f"key '{key}': {e['msg']} (got {e.get('input')!r})")
    return f"invalid config {origin}:\n  " + "\n  ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.0.c=value` into its key path and a YAML-parsed value (`3e-5` → float, `[a, b]` → list)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{key}': value {raw!r} is not valid YAML ({e.problem})") from None
    return key.split("."), value


def apply_override(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set `value` at `parts` inside a plain dict/list tree, creating dicts on the way; list items are indexed by number."""
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit():
                raise ConfigError(f"override '{'.'.join(parts)}': '{where}' indexes a list, use a number")
            idx = int(part)
            if idx >= len(node):
                raise ConfigError(f"override '{'.'.join(parts)}': index {idx} is past the end of a list of {len(node)}")
            if last:
                node[idx] = value
            else:
                if node[idx] is None:
                    node[idx] = {}
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"override '{'.'.join(parts)}': '{'.'.join(parts[:i])}' is a value, not a section")


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or defaults when `path` is None), apply dotted overrides, validate.

    Raises ConfigError naming the file and key for a missing file, bad YAML, unknown keys and wrong types.
    """
    origin = "(defaults)"
    tree: dict[str, Any] = {}
    if path is not None:
        origin = str(path)
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level, not {type(loaded).__name__}")
        tree = loaded
    for text in overrides or []:
        parts, value = parse_override(text)
        apply_override(tree, parts, value)
    if overrides:
        origin += " with overrides " + " ".join(overrides)
    return validate_tree(tree, origin)


def validate_tree(tree: dict[str, Any], origin: str) -> Config:
    """Validate a plain dict as a Config; errors name each bad key and `origin` (a file, overrides...)."""
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_validation_message(e, origin)) from None


def _is_uri(path: str) -> bool:
    return "://" in path


def check_paths(cfg: Config, keys: list[str]) -> None:
    """Fail before any Ray work when a local input named by `keys` does not exist.

    `keys` are dotted names: `data.sources`, `model.path`, `model.teacher`, `serve.models`,
    `data.augment`, `generate.sources`, `generate.teacher` (the model `generate` samples from). URIs (s3://, gs://, ...) are left to the reader that opens them.
    """
    missing: list[str] = []

    def need(key: str, p: str | None, kind: str = "path") -> None:
        if p is None or _is_uri(p):
            return
        if kind == "glob" and any(c in p for c in "*?["):
            if not glob.glob(p):
                missing.append(f"{key}: no file matches '{p}'")
        elif not os.path.exists(p):
            missing.append(f"{key}: '{p}' does not exist")

    for key in keys:
        if key == "data.sources":
            if not cfg.data.sources:
                missing.append("data.sources: no sources given")
            for i, s in enumerate(cfg.data.sources):
                need(f"data.sources.{i}.path", s.path, "glob")
        elif key == "data.augment":
            aug = cfg.data.augment
            if aug.synonyms:
                need("data.augment.synonyms.path", aug.synonyms.path)
            if aug.back_translate:
                need("data.augment.back_translate.model", aug.back_translate.model)
        elif key == "serve.models":
            if not cfg.serve.models:
                missing.append("serve.models: nothing to serve")
            for i, m in enumerate(cfg.serve.models):
                paths = [(f"serve.models.{i}.path", m.path)] if m.path else [(f"serve.models.{i}.versions.{j}.path", v.path) for j, v in enumerate(m.versions)]
                for key_, p in paths:
                    if not p.startswith("registry:"):  # resolved against the registry when the engines are planned
                        need(key_, p)
        elif key == "model.teacher" and cfg.model.teachers:
            for i, t in enumerate(cfg.model.teachers):
                need(f"model.teachers.{i}.path", t.path)
        elif key.startswith("model."):
            field = key.split(".", 1)[1]
            value = getattr(cfg.model, field)
            if value is None:
                missing.append(f"{key}: not set")
            need(key, value)
        elif key == "data.prepared":
            need("data.prepared", cfg.prepared_dir)
        elif key == "generate.sources":
            if not cfg.generate.sources:
                missing.append("generate.sources: no prompt files given")
            for i, s in enumerate(cfg.generate.sources):
                need(f"generate.sources.{i}.path", s.path, "glob")
        elif key == "generate.teacher":
            path, named_by = cfg.generation_teacher()
            need(named_by, path)
        else:
            raise KeyError(f"check_paths does not know '{key}'")
    if missing:
        raise ConfigError("config names inputs that cannot be found:\n  " + "\n  ".join(missing))


def explain(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Every field as (dotted key, type, default, description), sections first-to-last in schema order."""
    rows: list[tuple[str, str, str, str]] = []
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        ann = field.annotation
        sub = _section_type(ann)
        if sub is not None and not _is_optional(ann):
            rows.append((key, "section", "", field.description or ""))
            rows.extend(explain(sub, key + "."))
            continue
        if sub is not None:  # optional sub-section: show its fields with the section as prefix
            rows.append((key, "section (optional)", "null", field.description or ""))
            rows.extend(explain(sub, key + "."))
            continue
        if field.is_required():
            default = "(required)"
        elif field.default_factory is not None:
            default = repr(field.default_factory())
        else:
            default = repr(field.default)
        rows.append((key, _type_name(ann), default, field.description or ""))
    return rows


def _section_type(ann: Any) -> type[BaseModel] | None:
    import typing

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    if typing.get_origin(ann) is list:
        (arg,) = typing.get_args(ann)
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    for arg in typing.get_args(ann):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _is_optional(ann: Any) -> bool:
    import typing

    return type(None) in typing.get_args(ann)


def _type_name(ann: Any) -> str:
    text = repr(ann) if not isinstance(ann, type) else ann.__name__
    return text.replace("typing.", "").replace("NoneType", "None")


def write_resolved(cfg: Config, run_dir: str | os.PathLike[str]) -> Path:
    """Write the resolved config into a run directory atomically; returns the file's path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "config.yaml"
    write_text_atomic(target, cfg.to_yaml())
    return target
