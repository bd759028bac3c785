"""`distillery init-model`: build a model directory every later stage can use, with no download.

A byte-level BPE tokenizer is trained on a local corpus (or copied from another model with
`tokenizer_from`), saved as a Hugging Face fast tokenizer with bos/eos/pad and a ChatML chat
template, and a causal LM is initialised from an architecture spec and saved in safetensors.
The same seed gives byte-identical files.

    distillery init-model runs/models/teacher --arch llama --layers 4 --hidden 128 \
        --heads 4 --kv-heads 2 --intermediate 256 --corpus 'corpus/*.jsonl' --vocab-size 2048
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, IM_START, IM_END]

# ChatML: the same shape Qwen2 uses, so prompts rendered here look like real ones.
# The assistant turn ends with <|im_end|> followed by eos, so generation stops on eos.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

Arch = Literal["llama", "qwen2", "mixtral", "qwen2_moe", "qwen3_moe"]
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")


@dataclass
class ArchSpec:
    """Shape of a decoder-only LM. MoE fields apply to `mixtral`, `qwen2_moe` and `qwen3_moe` only."""

    arch: Arch = "llama"
    layers: int = 2
    hidden: int = 64
    heads: int = 2
    kv_heads: int | None = None  # None: same as heads (no grouped-query attention)
    intermediate: int = 128
    experts: int = 4
    experts_per_token: int = 2
    max_position: int = 1024
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    extra: dict = field(default_factory=dict)  # passed through to the transformers config

    def validate(self) -> None:
        if self.arch not in ("llama", "qwen2") + MOE_ARCHS:
            raise ValueError(f"arch: unknown architecture '{self.arch}' (llama, qwen2, mixtral, qwen2_moe, qwen3_moe)")
        for name in ("layers", "hidden", "heads", "intermediate", "max_position"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        kv = self.kv_heads or self.heads
        if self.heads % kv:
            raise ValueError(f"heads ({self.heads}) must be divisible by kv_heads ({kv})")
        if self.arch in MOE_ARCHS and not 1 <= self.experts_per_token <= self.experts:
            raise ValueError(f"experts_per_token ({self.experts_per_token}) must be between 1 and experts ({self.experts})")


def build_hf_config(spec: ArchSpec, vocab_size: int, bos_id: int, eos_id: int, pad_id: int):
    """The transformers config object for `spec` (no weights yet)."""
    import transformers

    spec.validate()
    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads or spec.heads,
        max_position_embeddings=spec.max_position,
        tie_word_embeddings=spec.tie_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        rope_theta=spec.rope_theta,
    )
    if spec.arch == "llama":
        cfg = transformers.LlamaConfig(**common)
    elif spec.arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
    elif spec.arch == "mixtral":
        cfg = transformers.MixtralConfig(
            **common, num_local_experts=spec.experts, num_experts_per_tok=spec.experts_per_token
        )
    elif spec.arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            **common,
            num_experts=spec.experts,
            num_experts_per_tok=spec.experts_per_token,
            moe_intermediate_size=spec.intermediate,
            decoder_sparse_step=1,
            head_dim=spec.hidden // spec.heads,
        )
    else:
        cfg = transformers.Qwen2MoeConfig(
            **common,
            num_experts=spec.experts,
            num_experts_per_tok=spec.experts_per_token,
            moe_intermediate_size=spec.intermediate,
            shared_expert_intermediate_size=spec.intermediate,
            decoder_sparse_step=1,
        )
    for k, v in spec.extra.items():
        setattr(cfg, k, v)
    return cfg


def iter_corpus_texts(patterns: list[str]) -> Iterator[str]:
    """Every string found in the corpus files: JSONL rows (all string values, nested too) or plain text lines."""

    def strings(obj) -> Iterator[str]:
        if isinstance(obj, str):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from strings(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from strings(v)

    files: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            files.extend(sorted(str(p) for p in Path(pattern).rglob("*") if p.is_file()))
        else:
            matched = sorted(glob.glob(pattern))
            if not matched:
                raise FileNotFoundError(f"corpus: no file matches '{pattern}'")
            files.extend(matched)
    for path in files:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(path).iter_batches():
                for row in batch.to_pylist():
                    yield from strings(row)
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.rstrip("\n")
                if not line:
                    continue
                if path.endswith((".jsonl", ".json")):
                    try:
                        yield from strings(json.loads(line))
                        continue
                    except json.JSONDecodeError:
                        pass  # a bad line still contributes its characters to the vocabulary
                yield line


def train_tokenizer(texts: Iterator[str], vocab_size: int):
    """Train a byte-level BPE tokenizer; returns a `PreTrainedTokenizerFast` with specials and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    # Digits split one per token, as in the Llama, Qwen and DeepSeek tokenizers: merged digit runs
    # ("395000" -> "39" + "5000") make arithmetic and copying numbers unlearnable for a small model.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=1_000_000,
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def init_model(
    output: str | os.PathLike[str],
    spec: ArchSpec,
    corpus: list[str] | None = None,
    vocab_size: int = 2048,
    tokenizer_from: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Build tokenizer + randomly initialised causal LM in `output`; returns a summary dict.

    Exactly one of `corpus` (files/globs/directories to train the tokenizer on) and
    `tokenizer_from` (a model directory whose tokenizer is reused) must be given.
    The directory is written under a temporary name and renamed, so a crash never leaves half a model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec.validate()
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"output: '{output}' exists and is not empty (pass --overwrite to replace it)")
    if bool(corpus) == bool(tokenizer_from):
        raise ValueError("give exactly one of --corpus (train a tokenizer) and --tokenizer-from (reuse one)")

    if tokenizer_from:
        if not os.path.isdir(tokenizer_from):
            raise FileNotFoundError(f"tokenizer_from: '{tokenizer_from}' is not a directory")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer = train_tokenizer(iter_corpus_texts(corpus or []), vocab_size)

    hf_config = build_hf_config(
        spec, len(tokenizer), tokenizer.bos_token_id or 0, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model.generation_config.bos_token_id = hf_config.bos_token_id
    # Chat turns end with <|im_end|>: stop there as well as at eos (vLLM and transformers both read this list).
    im_end = tokenizer.convert_tokens_to_ids(IM_END) if IM_END in tokenizer.get_vocab() else None
    stops = [hf_config.eos_token_id] + ([im_end] if im_end is not None and im_end != hf_config.eos_token_id else [])
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    model.generation_config.pad_token_id = hf_config.pad_token_id

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        summary = {
            "arch": spec.arch,
            "spec": asdict(spec),
            "parameters": n_params,
            "vocab_size": len(tokenizer),
            "seed": seed,
            "tokenizer": "reused from " + str(tokenizer_from) if tokenizer_from else "trained byte-level BPE",
        }
        # The output path stays out of the file so that the same seed gives identical bytes anywhere.
        (tmp / "distillery_init.json").write_text(json.dumps(summary, indent=2) + "\n")
        summary["path"] = str(output)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model directory is shared like any other
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def directory_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 over every file's name and bytes in a directory (used to show init-model is deterministic)."""
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            h.update(p.relative_to(path).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()
