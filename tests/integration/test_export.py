"""`distillery export` on real files (no Ray): LoRA merges keyed by content, dtype, model card,
lineage record and registration, and the errors a user meets before any weights load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distillery.config import ConfigError, load_config

pytestmark = pytest.mark.timeout(300)


def make_adapter(base: Path, run_dir: Path, seed: int) -> Path:
    """A LoRA run directory whose adapter (r=4, alpha=16, B non-zero) moves the logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    shutil.rmtree(run_dir / "model", ignore_errors=True)
    model.save_pretrained(run_dir / "model", safe_serialization=True)
    (run_dir / "config.yaml").write_text(f"output_dir: {run_dir}\nmethod: {{kind: lora}}\n")
    return run_dir


def expected_q_proj(base: Path, adapter_dir: Path) -> torch.Tensor:
    """Layer 0's q_proj after the merge, by hand: W + (alpha / r) · B · A."""
    w = load_file(str(base / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    a = load_file(str(adapter_dir / "adapter_model.safetensors"))
    lora_a = next(v for k, v in a.items() if "layers.0.self_attn.q_proj.lora_A" in k)
    lora_b = next(v for k, v in a.items() if "layers.0.self_attn.q_proj.lora_B" in k)
    return w + (16 / 4) * lora_b @ lora_a


def test_merge_is_base_plus_scaled_delta_and_never_stale(tmp_path, tiny_teacher):
    from distillery.export.merge import merge_adapter

    run = make_adapter(tiny_teacher, tmp_path / "run", seed=0)
    first = merge_adapter(run / "model", say=lambda _: None)
    merged = load_file(str(first / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert torch.allclose(merged, expected_q_proj(tiny_teacher, run / "model"), atol=1e-5)
    assert merge_adapter(run / "model", say=lambda _: None) == first  # same contents: reused

    make_adapter(tiny_teacher, run, seed=1)  # the adapter is retrained in place
    second = merge_adapter(run / "model", say=lambda _: None)
    assert second != first and not first.exists()
    merged = load_file(str(second / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert torch.allclose(merged, expected_q_proj(tiny_teacher, run / "model"), atol=1e-5)


def test_export_of_a_lora_run_writes_card_manifest_lineage_and_registers(tmp_path, tiny_teacher):
    from transformers import AutoModelForCausalLM

    from distillery.export.merge import merged_dir
    from distillery.export.run import run_export
    from distillery.models.load import model_identity
    from distillery.registry.store import Registry

    run = make_adapter(tiny_teacher, tmp_path / "run", seed=0)
    (run / "run.json").write_text(json.dumps({"run_id": "f" * 32, "stage": "finetune", "settings": {"method": {"kind": "lora"}},
                                              "inputs": {"model": model_identity(tiny_teacher)["hash"]}, "metrics": {"val_loss": 1.5}}))
    cfg = load_config(overrides=[f"export.model={run}", "export.dtype=bfloat16", "export.name=tiny", "export.alias=canary",
                                 f"registry.dir={tmp_path / 'registry'}", f"output_dir={tmp_path / 'unused'}"])
    assert run_export(cfg) == 0
    out = run / "export"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    merged = AutoModelForCausalLM.from_pretrained(merged_dir(run / "model"))
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits.float(), merged(ids).logits, atol=0.1)
    manifest = json.loads((out / "distillery_export.json").read_text())
    assert manifest["source"] == str((run / "model").resolve()) and manifest["quantize"] == "none"
    assert manifest["source_hash"] == model_identity(run / "model")["hash"]
    card = (out / "README.md").read_text()
    assert "# tiny" in card and manifest["source_hash"][:16] in card and "val_loss: 1.5" in card
    record = json.loads((out / "run.json").read_text())
    assert record["stage"] == "export" and record["inputs"]["model"] == manifest["source_hash"]
    assert record["outputs"]["model"] == model_identity(out)["hash"]
    registry = Registry(tmp_path / "registry")
    assert registry.resolve("tiny", "canary") == {"name": "tiny", "version": 1, "path": str(out), "run_id": record["run_id"],
                                                 "model_hash": record["outputs"]["model"]}
    assert registry.get_run(record["run_id"])["stage"] == "export"


def test_bad_exports_fail_before_any_weights_load(tmp_path, tiny_teacher, tiny_moe):
    from distillery.export.run import validate_export

    def check(*overrides: str) -> str:
        with pytest.raises(ConfigError) as e:
            validate_export(load_config(overrides=[f"registry.dir={tmp_path / 'registry'}", *overrides]))
        return str(e.value)

    assert "export.quantize" in check(f"export.model={tiny_moe}", "export.quantize=w8a8", "export.calibration_rows=0")
    assert "export.calibration_rows" in check(f"export.model={tiny_teacher}", "export.quantize=w8a8", f"data.prepared={tmp_path / 'none'}")
    assert "export.output" in check(f"export.model={tiny_teacher}", f"export.output={tiny_teacher}")
    assert "export.model" in check(f"export.model={tmp_path / 'missing'}")
    assert "export.model" in check("export.model=registry:nobody@champion")
    with pytest.raises(ConfigError, match="alias needs `name`"):
        load_config(overrides=["export.alias=canary"])
    with pytest.raises(ConfigError, match="name .a/b. must be"):
        load_config(overrides=["export.name=a/b"])
