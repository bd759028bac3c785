"""Load tokenizers and causal LMs from a Hugging Face directory or a Distillery run directory."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def resolve_model_dir(path: str | os.PathLike[str]) -> Path:
    """The Hugging Face directory behind `path`.

    A run directory (has `model/`) resolves to its `model/`; a model directory resolves to itself.
    Raises FileNotFoundError naming the path when neither holds a `config.json` or adapter.
    """
    p = Path(path)
    if (p / "model").is_dir() and not (p / "config.json").exists():
        p = p / "model"
    if not ((p / "config.json").exists() or (p / "adapter_config.json").exists()):
        raise FileNotFoundError(f"'{path}' is neither a model directory (config.json) nor a run directory (model/)")
    return p


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts (8, 16, 32, 64, 128, 256, 320, 512) that holds `rank`."""
    return next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), 512)


def adapter_base(model_dir: str | os.PathLike[str]) -> str | None:
    """The base model path a PEFT adapter records, or None for full weights."""
    cfg = Path(model_dir) / "adapter_config.json"
    if not cfg.exists():
        return None
    return json.loads(cfg.read_text())["base_model_name_or_path"]


def model_config(path: str | os.PathLike[str]):
    """The Hugging Face config of the model at `path` (for an adapter, its base model's), without weights."""
    from transformers import AutoConfig

    d = resolve_model_dir(path)
    return AutoConfig.from_pretrained(adapter_base(d) or d)


def load_tokenizer(path: str | os.PathLike[str]):
    """A fast tokenizer with a pad token (eos when the checkpoint has none)."""
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(path)
    source = model_dir if (model_dir / "tokenizer_config.json").exists() else adapter_base(model_dir) or model_dir
    tok = AutoTokenizer.from_pretrained(source)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def torch_dtype(name: str, use_gpu: bool):
    """Map a config dtype name to torch; `auto` is bf16 on GPU and fp32 on CPU (faster on these CPUs)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if use_gpu else torch.float32
    return getattr(torch, name)


def is_w8a8(model_dir: str | os.PathLike[str]) -> bool:
    """Whether a model directory holds a W8A8 int8 export (compressed-tensors, `distillery export`)."""
    p = Path(model_dir) / "config.json"
    if not p.exists():
        return False
    q = json.loads(p.read_text()).get("quantization_config") or {}
    return q.get("quant_method") == "compressed-tensors"


def load_causal_lm(path: str | os.PathLike[str], dtype: str = "auto", use_gpu: bool = False, **kwargs):
    """Load full weights, or a PEFT adapter on top of the base model it records."""
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model_dir(path)
    base = adapter_base(model_dir)
    td = torch_dtype(dtype, use_gpu)
    if base is None and is_w8a8(model_dir):
        from distillery.models.w8a8 import load_w8a8_for_hf

        # The int8 grid dequantised, activations fake-quantised per token: vLLM's W8A8 numerics in torch.
        return load_w8a8_for_hf(model_dir, dtype=td)
    if base is None:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=td, **kwargs)
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base, dtype=td, **kwargs)
    return PeftModel.from_pretrained(model, model_dir)


def count_parameters(model) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def model_identity(path: str | os.PathLike[str]) -> dict[str, str]:
    """Path and a fast content hash of a model, run directory or PEFT adapter: config.json, adapter
    config and, for each weights file, its name, size and first and last MiB (hashing many GiB in
    full would cost minutes)."""
    d = resolve_model_dir(path)
    h = hashlib.sha256()
    for p in sorted(d.iterdir()):
        if p.name in ("config.json", "adapter_config.json"):
            h.update(p.name.encode() + p.read_bytes())
        elif p.suffix == ".safetensors":
            size = p.stat().st_size
            h.update(f"{p.name}:{size}".encode())
            with open(p, "rb") as f:
                h.update(f.read(1 << 20))
                f.seek(max(size - (1 << 20), 0))
                h.update(f.read(1 << 20))
    return {"path": str(path), "hash": h.hexdigest()}


def weighted_hash(members: list[tuple[str, float]]) -> str:
    """One hash over several models' (content hash, normalised weight) pairs, in order."""
    return hashlib.sha256("".join(f"{h}:{w:.6g};" for h, w in members).encode()).hexdigest()


def teachers_identity(specs: list[tuple[str, float]]) -> str:
    """The content hash of one teacher, or for several `weighted_hash` over their hashes and weights
    ((path, normalised weight) pairs, `ModelConfig.teacher_specs`)."""
    if len(specs) == 1:
        return model_identity(specs[0][0])["hash"]
    return weighted_hash([(model_identity(path)["hash"], weight) for path, weight in specs])
