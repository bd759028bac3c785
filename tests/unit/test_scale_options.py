"""Options for large models: activation checkpointing, FSDP CPU offload, sharded loading from the
meta device (train/sharded_load.py). No Ray: sharded loading runs on two gloo processes."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

from distillery.config import ConfigError, MethodConfig, load_config
from distillery.train.parallel import enable_activation_checkpointing, fsdp_kwargs, wrap_model


def _tiny(tie: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # 3 layers and odd row counts (vocab 67, kv width 16 of 2 ranks...) so shards are uneven.
    config = LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie)
    return LlamaForCausalLM(config)


def _cfg(tmp_path, *overrides):
    return load_config(overrides=[f"output_dir={tmp_path}", f"data.prepared={tmp_path}/none", f"model.path={tmp_path}/none",
                                  *overrides])


# -- activation checkpointing --------------------------------------------------------------------


def _losses(model, steps: int = 3) -> list[float]:
    torch.manual_seed(1)
    batches = [torch.randint(0, 67, (2, 12)) for _ in range(steps)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    out = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_activation_checkpointing_gives_the_same_losses(kind):
    from distillery.models.plan import apply_method

    runs = []
    for checkpointing in (False, True):
        model, _ = apply_method(_tiny(), MethodConfig(kind=kind))
        if checkpointing:
            enable_activation_checkpointing(model)
        runs.append(_losses(model))
    assert runs[1] == pytest.approx(runs[0], abs=1e-5)
    layer = (model.get_base_model() if kind == "lora" else model).model.layers[0]
    assert layer.gradient_checkpointing  # the layers do recompute


# -- CPU offload ---------------------------------------------------------------------------------------


def test_cpu_offload_is_refused_without_fsdp_on_gpu(tmp_path):
    from distillery.train.finetune import FINETUNE
    from distillery.train.run import validate_training

    with pytest.raises(ConfigError, match="train.cpu_offload.*use_gpu"):
        validate_training(_cfg(tmp_path, "train.cpu_offload=true"), FINETUNE)
    with pytest.raises(ConfigError, match="train.cpu_offload.*got ddp"):
        validate_training(_cfg(tmp_path, "train.cpu_offload=true", "train.use_gpu=true", "train.strategy=ddp"), FINETUNE)


def test_wrap_model_passes_the_offload_policy_to_every_fully_shard(tmp_path, monkeypatch):
    import torch.distributed.fsdp as fsdp

    cfg = _cfg(tmp_path, "train.cpu_offload=true", "train.use_gpu=true", "train.strategy=fsdp")
    assert isinstance(fsdp_kwargs(cfg)["offload_policy"], fsdp.CPUOffloadPolicy)
    assert "mp_policy" in fsdp_kwargs(cfg)  # bf16 on GPU: both policies
    assert "offload_policy" not in fsdp_kwargs(_cfg(tmp_path, "train.use_gpu=true"))
    calls = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: calls.append((module, kw)))
    model = _tiny()
    wrap_model(model, cfg, torch.device("cpu"), 2)
    assert [m for m, _ in calls] == list(model.model.layers) + [model]
    assert all(isinstance(kw.get("offload_policy"), fsdp.CPUOffloadPolicy) for _, kw in calls)


# -- sharded loading -----------------------------------------------------------------------------------


def test_fallback_reasons(tmp_path):
    from distillery.train.sharded_load import fallback_reason

    d = tmp_path / "m"
    _tiny().save_pretrained(d)
    assert fallback_reason(_cfg(tmp_path), d, 2) is None
    assert "one worker" in fallback_reason(_cfg(tmp_path), d, 1)
    assert "ddp" in fallback_reason(_cfg(tmp_path, "train.strategy=ddp"), d, 2)
    assert "lora" in fallback_reason(_cfg(tmp_path, "method.kind=lora"), d, 2)
    assert fallback_reason(_cfg(tmp_path, "method.kind=lora"), d, 2, role="teacher") is None
    assert "QAT" in fallback_reason(_cfg(tmp_path, "train.qat=true"), d, 2)


def _rank(rank: int, world: int, port: int, student: str, teacher: str, out: str) -> None:
    """One gloo rank: load student (training path) and teacher (frozen_model) sharded, compare with
    whole loads, save the bytes read."""
    import os

    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    from distillery.train.sharded_load import build_on_meta, frozen_model

    torch.set_num_threads(1)  # two processes on a shared machine
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cpu = torch.device("cpu")
        meta = build_on_meta(Path(student), torch.float32)
        teacher_model, teacher_meta = frozen_model(Path(teacher), _cfg(Path(out)), "float32", cpu)
        assert teacher_meta is not None and next(teacher_model.parameters()).is_meta
        report = {}
        for name, m, pending, path in (("student", meta.model, meta, student), ("teacher", teacher_model, teacher_meta, teacher)):
            for layer in m.model.layers:
                fully_shard(layer)
            fully_shard(m)
            stats = pending.materialize(cpu)
            whole = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            full = get_model_state_dict(m, options=StateDictOptions(full_state_dict=True))
            for key, value in whole.state_dict().items():
                assert torch.equal(full[key], value), (name, key)
            for key, value in whole.named_buffers():  # RoPE inv_freq: recomputed, not read
                assert torch.equal(dict(m.named_buffers())[key], value), (name, key)
            ids = torch.arange(20).reshape(2, 10) % 67
            with torch.no_grad():
                assert torch.allclose(m(input_ids=ids).logits, whole(input_ids=ids).logits, atol=1e-6)
            tied = m.lm_head.weight is m.model.embed_tokens.weight
            report[name] = (stats.bytes_read, stats.checkpoint_bytes, tied)
        torch.save(report, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sharded_load_reads_each_ranks_rows_only(tmp_path):
    """Two gloo processes: the sharded student (untied) and teacher (tied embeddings) equal the whole
    loads (weights, RoPE buffers, logits), and each rank reads about half the checkpoint's bytes."""
    import torch.multiprocessing as mp

    _tiny(seed=0).save_pretrained(tmp_path / "student")
    _tiny(tie=True, seed=1).save_pretrained(tmp_path / "teacher")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(2, port, str(tmp_path / "student"), str(tmp_path / "teacher"), str(tmp_path)), nprocs=2)
    reports = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, tied in (("student", False), ("teacher", True)):
        read = [r[name][0] for r in reports]
        total = reports[0][name][1]
        assert sum(read) == total  # every byte read exactly once over the ranks
        assert all(abs(b / total - 0.5) < 0.05 for b in read), read  # uneven rows: about half each
        assert all(r[name][2] == tied for r in reports)
