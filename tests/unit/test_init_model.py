"""init-model: tokenizer + model directories that load with transformers, deterministic under a seed."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillery.models.init_model import CHAT_TEMPLATE, ArchSpec, directory_digest, init_model
from distillery.models.load import count_parameters, load_causal_lm, load_tokenizer, resolve_model_dir


def test_teacher_loads_and_generates(tiny_teacher):
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    assert tok.bos_token == "<|bos|>" and tok.eos_token == "<|eos|>" and tok.pad_token == "<|pad|>"
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.generation_config.eos_token_id == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    # Byte-level BPE round-trips English and Chinese text exactly.
    text = "Extract the profit from the report. 从财务报告中提取 profit。"
    assert tok.decode(tok(text)["input_ids"]) == text
    enc = tok("Add 2 and 3.", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == enc["input_ids"].shape[1] + 4
    assert (tiny_teacher / "model.safetensors").exists()
    assert not list(tiny_teacher.glob("*.bin"))


def test_chat_template_renders_chatml(tiny_teacher):
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    assert tok.chat_template == CHAT_TEMPLATE
    text = tok.apply_chat_template(
        [{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    for special in ("<|im_start|>", "<|im_end|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1


def test_student_shares_vocabulary_and_is_smaller(tiny_teacher, tiny_student):
    t_tok, s_tok = AutoTokenizer.from_pretrained(tiny_teacher), AutoTokenizer.from_pretrained(tiny_student)
    assert t_tok.get_vocab() == s_tok.get_vocab()
    t_total, _ = count_parameters(AutoModelForCausalLM.from_pretrained(tiny_teacher))
    s_total, _ = count_parameters(AutoModelForCausalLM.from_pretrained(tiny_student))
    assert s_total < t_total / 2
    info = json.loads((tiny_student / "distillery_init.json").read_text())
    assert info["parameters"] == s_total and "reused" in info["tokenizer"]


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, demo_corpus):
    spec = ArchSpec(arch="qwen2", layers=1, hidden=32, heads=2, intermediate=64)
    for name, seed in [("a", 3), ("b", 3), ("c", 4)]:
        init_model(tmp_path / name, spec, corpus=[str(demo_corpus["train"])], vocab_size=300, seed=seed)
    assert directory_digest(tmp_path / "a") == directory_digest(tmp_path / "b")
    assert directory_digest(tmp_path / "a") != directory_digest(tmp_path / "c")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "c" / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_architectures(tmp_path, tiny_teacher, arch):
    spec = ArchSpec(arch=arch, layers=1, hidden=32, heads=2, intermediate=32, experts=4, experts_per_token=2)
    init_model(tmp_path / arch, spec, tokenizer_from=str(tiny_teacher), seed=0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / arch)
    assert model.config.model_type == arch
    experts = model.config.num_local_experts if arch == "mixtral" else model.config.num_experts
    assert experts == 4 and model.config.num_experts_per_tok == 2
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size) and torch.isfinite(logits).all()


def test_refuses_bad_specs_and_existing_output(tmp_path, tiny_teacher):
    with pytest.raises(ValueError, match="divisible by heads"):
        init_model(tmp_path / "x", ArchSpec(hidden=30, heads=4), tokenizer_from=str(tiny_teacher))
    with pytest.raises(ValueError, match="experts_per_token"):
        init_model(tmp_path / "x", ArchSpec(arch="mixtral", experts=2, experts_per_token=3), tokenizer_from=str(tiny_teacher))
    with pytest.raises(ValueError, match="exactly one"):
        init_model(tmp_path / "x", ArchSpec())
    with pytest.raises(FileExistsError, match="overwrite"):
        init_model(tiny_teacher, ArchSpec(), tokenizer_from=str(tiny_teacher))
    assert not (tmp_path / "x").exists()


def test_loaders_resolve_run_directories(tmp_path, tiny_student):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model").symlink_to(tiny_student, target_is_directory=True)
    assert resolve_model_dir(run) == run / "model"
    assert len(load_tokenizer(run)) == len(load_tokenizer(tiny_student))
    assert count_parameters(load_causal_lm(run))[0] == count_parameters(load_causal_lm(tiny_student))[0]
    with pytest.raises(FileNotFoundError, match="neither a model directory"):
        resolve_model_dir(tmp_path)
