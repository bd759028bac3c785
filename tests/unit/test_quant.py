"""The INT8 W8A8 scheme: per-channel weights, per-token activations, the straight-through QAT layer,
clip calibration and the transformers stand-in for a W8A8 export (vLLM itself: tests/integration/test_w8a8_vllm.py)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2MoeConfig

from distillery.models.quant import (
    QATLinear,
    QuantizedWeightLinear,
    apply_qat,
    dequantize,
    fake_quant_activation,
    fake_quant_weight,
    quantizable_linears,
    quantize_per_channel,
    remove_qat,
)
from distillery.models.w8a8 import calibrate_clips, export_w8a8, load_w8a8_for_hf


def _tiny_llama(tie: bool = False, seed: int = 0) -> nn.Module:
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=tie, initializer_range=0.1)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _log_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


# --------------------------------------------------------------------------- weights and activations


def test_per_channel_round_trip_is_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(16, 40) * torch.logspace(-3, 1, 16).unsqueeze(1)  # rows four decades apart
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and q.shape == (16, 40)
    assert scale.dtype == torch.float32 and scale.shape == (16, 1)
    assert torch.equal(q.abs().amax(1), torch.full((16,), 127, dtype=torch.int8))  # each row's max hits the grid's end
    assert ((w - dequantize(q, scale)).abs() <= scale / 2 * (1 + 1e-6)).all()
    assert torch.allclose(scale.squeeze(1), w.abs().amax(1) / 127)


def test_clip_shrinks_the_step_and_saturates_beyond_it():
    torch.manual_seed(1)
    w = torch.randn(4, 64)
    clip = torch.tensor([1.0, 0.8, 0.5, 0.7])
    q, scale = quantize_per_channel(w, clip)
    assert torch.allclose(scale.squeeze(1), clip * w.abs().amax(1) / 127)
    inside = w.abs() <= clip.unsqueeze(1) * w.abs().amax(1, keepdim=True)
    assert ((w - dequantize(q, scale)).abs()[inside] <= (scale / 2 * (1 + 1e-6)).expand_as(w)[inside]).all()
    assert (q[~inside].abs() == 127).all() and (~inside).any()
    zero_row = torch.zeros(2, 8)
    qz, sz = quantize_per_channel(zero_row)
    assert not qz.any() and torch.equal(dequantize(qz, sz), zero_row)
    with pytest.raises(ValueError, match="clip"):
        quantize_per_channel(w, torch.ones(3))
    with pytest.raises(ValueError, match="weight"):
        quantize_per_channel(torch.ones(2, 3, 4))


def test_activation_fake_quant_is_per_token_and_keeps_dtype():
    torch.manual_seed(2)
    x = torch.randn(3, 5, 32) * torch.tensor([1e-3, 1.0, 50.0]).view(3, 1, 1)
    x[0, 0] = 0.0
    y = fake_quant_activation(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    scale = x.abs().amax(-1, keepdim=True) / 127
    assert torch.equal(y[0, 0], torch.zeros(32))  # an all-zero token stays zero
    steps = (y / torch.where(scale > 0, scale, 1)).round()
    assert torch.allclose(y, steps * scale) and steps.abs().max() <= 127
    assert ((x - y).abs() <= scale / 2 * (1 + 1e-5) + 1e-12).all()
    xb = x.to(torch.bfloat16)
    assert fake_quant_activation(xb).dtype == torch.bfloat16


def test_simulated_w8a8_equals_integer_arithmetic():
    """F.linear on the dequantised operands is the int8 kernel: int32 accumulation, then scale_x · scale_w."""
    torch.manual_seed(3)
    x, w = torch.randn(7, 48), torch.randn(24, 48) * 0.1
    q, sw = quantize_per_channel(w)
    sx = x.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(x * (1.0 / sx)).clamp(-128, 127)
    exact = (xq.long() @ q.long().T).double() * sx.double() * sw.double().T
    assert torch.allclose(F.linear(fake_quant_activation(x), dequantize(q, sw)).double(), exact, rtol=1e-5, atol=1e-6)


def test_straight_through_gradients_are_the_identity():
    torch.manual_seed(4)
    w = torch.randn(6, 10, requires_grad=True)
    g = torch.randn(6, 10)
    fake_quant_weight(w).backward(g)
    assert torch.equal(w.grad, g)
    x = torch.randn(2, 3, 10, requires_grad=True)
    gx = torch.randn(2, 3, 10)
    fake_quant_activation(x).backward(gx)
    assert torch.equal(x.grad, gx)

    # Through a QAT layer: the gradients are those of a plain linear evaluated at the fake-quantised values.
    lin = nn.Linear(10, 6)
    apply_qat(nn.Sequential(lin))
    x = torch.randn(4, 10, requires_grad=True)
    gy = torch.randn(4, 6)
    lin(x).backward(gy)
    xr = fake_quant_activation(x.detach()).requires_grad_()
    wr = fake_quant_weight(lin.weight.detach()).requires_grad_()
    br = lin.bias.detach().clone().requires_grad_()
    F.linear(xr, wr, br).backward(gy)
    assert torch.allclose(x.grad, xr.grad) and torch.allclose(lin.weight.grad, wr.grad) and torch.allclose(lin.bias.grad, br.grad)


# --------------------------------------------------------------------------- the QAT swap


def test_qat_linear_keeps_parameters_and_state_dict_keys():
    model = _tiny_llama()
    before = dict(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    x = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        fp_logits = model(x).logits
    assert apply_qat(model) == 14  # 2 layers × (q, k, v, o, gate, up, down)
    assert apply_qat(model) == 0  # already swapped
    assert list(model.state_dict()) == list(before)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert type(model.lm_head) is nn.Linear and isinstance(model.model.layers[0].self_attn.q_proj, QATLinear)
    with torch.no_grad():
        qat_logits = model(x).logits
    assert not torch.equal(qat_logits, fp_logits) and _log_kl(fp_logits, qat_logits).mean() < 1e-2
    assert remove_qat(model) == 14
    assert all(type(m) is nn.Linear for _, m in quantizable_linears(model))
    with torch.no_grad():
        assert torch.equal(model(x).logits, fp_logits)


def test_quantizable_linears_skip_lm_head_and_routers():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.gate, self.router, self.shared_expert_gate = (nn.Linear(4, 4) for _ in range(5))

    model = nn.Module()
    model.mlp, model.lm_head = Block(), nn.Linear(4, 8)
    model.head = nn.Module()
    model.head.lm_head = nn.Linear(4, 8)
    assert [n for n, _ in quantizable_linears(model)] == ["mlp.gate_proj", "mlp.up_proj"]

    cfg = Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         shared_expert_intermediate_size=32)
    moe = AutoModelForCausalLM.from_config(cfg)
    names = [n for n, _ in quantizable_linears(moe)]
    assert names and not any(n.endswith(("lm_head", "gate", "_gate")) for n in names)
    assert "model.layers.0.mlp.shared_expert.gate_proj" in names
    with pytest.raises(ValueError, match="dense models"):
        export_w8a8(moe, None, "unused")


def test_apply_qat_refuses_what_it_cannot_swap():
    with pytest.raises(ValueError, match="no nn.Linear"):
        apply_qat(nn.Sequential(nn.Embedding(4, 4)))

    class Custom(nn.Linear):
        pass

    with pytest.raises(ValueError, match="not a plain torch.nn.Linear"):
        apply_qat(nn.Sequential(Custom(4, 4)))


# --------------------------------------------------------------------------- calibration


class _Toy(nn.Module):
    """Embedding then one linear; its forward takes the keyword arguments a causal LM does."""

    def __init__(self, emb: torch.Tensor, weight: torch.Tensor):
        super().__init__()
        self.emb = nn.Embedding.from_pretrained(emb)
        self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.proj.weight.data.copy_(weight)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return self.proj(self.emb(input_ids))


def _objective(x: torch.Tensor, w: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    xq = fake_quant_activation(x)
    q, s = quantize_per_channel(w, clip)
    return (xq @ (w - dequantize(q, s)).T).double().pow(2).sum(0)


def test_calibrated_clips_never_lose_to_round_to_nearest():
    torch.manual_seed(5)
    emb = torch.randn(50, 32)
    emb[:, 0] *= 0.01  # the input feature an outlier weight multiplies is nearly silent
    w = torch.randn(8, 32) * 0.05
    w[0, 0] = 3.0  # row 0's range is set by one outlier: clipping it refines every other step of the row
    emb[49] = 100.0  # the padding token: would dominate every objective if it counted
    model = _Toy(emb, w)
    batches = [torch.randint(0, 49, (2, 12)) for _ in range(3)]
    linears = [("proj", model.proj)]
    clips = calibrate_clips(model, linears, batches)
    assert clips["proj"].shape == (8,) and clips["proj"].dtype == torch.float32
    assert torch.equal(clips["proj"], calibrate_clips(model, linears, batches)["proj"])  # deterministic
    x = emb[torch.cat([b.reshape(-1) for b in batches])]
    best = _objective(x, w, clips["proj"])
    plain = _objective(x, w, torch.ones(8))
    assert (best <= plain * (1 + 1e-6)).all()
    assert clips["proj"][0] < 1.0 and best[0] < 0.5 * plain[0]

    # Padded positions are not calibration evidence.
    padded = [{"input_ids": torch.cat([b, torch.full((2, 5), 49)], 1), "attention_mask": torch.cat([torch.ones_like(b), torch.zeros(2, 5, dtype=torch.long)], 1)}
              for b in batches]
    assert torch.equal(calibrate_clips(model, linears, padded)["proj"], clips["proj"])
    with pytest.raises(ValueError, match="grid"):
        calibrate_clips(model, linears, batches, grid=(1.2,))
    with pytest.raises(ValueError, match="batches"):
        calibrate_clips(model, linears, [])


# --------------------------------------------------------------------------- export and the transformers stand-in


@pytest.mark.parametrize("tie", [False, True])
def test_export_layout_and_hf_stand_in(tmp_path, tie):
    model = _tiny_llama(tie=tie, seed=6)
    x = torch.randint(0, 96, (2, 16))
    batches = [{"input_ids": x, "attention_mask": torch.ones_like(x)}]
    out = tmp_path / "w8a8"
    out.mkdir()
    (out / "stale.txt").write_text("replaced")  # an existing export is replaced whole
    summary = export_w8a8(model, None, out, calibration_batches=batches)
    assert summary["layers"] == 14 and summary["calibrated"] is True
    assert summary["parameters_int8"] == sum(m.weight.numel() for _, m in quantizable_linears(model))
    assert not (out / "stale.txt").exists() and not list(tmp_path.glob("*.tmp-*"))
    assert summary["bytes_on_disk"] == sum(p.stat().st_size for p in out.iterdir())

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized" and qc["ignore"] == ["lm_head"]
    ct = pytest.importorskip("compressed_tensors.quantization")
    parsed = ct.QuantizationConfig.model_validate(qc)
    group = parsed.config_groups["group_0"]
    assert group.weights.strategy == "channel" and group.input_activations.strategy == "token" and group.input_activations.dynamic

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for name, m in quantizable_linears(model):
            q, s = f.get_tensor(f"{name}.weight"), f.get_tensor(f"{name}.weight_scale")
            assert q.dtype == torch.int8 and q.shape == m.weight.shape and s.dtype == torch.float32 and s.shape == (m.out_features, 1)
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert ("lm_head.weight" in keys) != tie

    sim = load_w8a8_for_hf(out)
    assert isinstance(sim.model.layers[1].mlp.down_proj, QuantizedWeightLinear) and type(sim.lm_head) is nn.Linear
    with torch.no_grad():
        fp_logits, sim_logits = model(x).logits, sim(x).logits
        kl = _log_kl(fp_logits, sim_logits)
        assert kl.mean() < 1e-3 and kl.max() < 5e-3
        # Round to nearest (no calibration): exactly the QAT forward, which fake-quantises the fp weights.
        plain = export_w8a8(model, None, tmp_path / "rtn")
        assert plain["calibrated"] is False
        apply_qat(model)
        assert torch.allclose(load_w8a8_for_hf(tmp_path / "rtn")(x).logits, model(x).logits, atol=1e-5)


def test_export_keeps_the_model_dtype_or_casts_to_the_one_asked(tmp_path):
    model = _tiny_llama(seed=7)
    for name, m, dtype in [("own", model.to(torch.bfloat16), None), ("cast", _tiny_llama(seed=7), torch.bfloat16)]:
        export_w8a8(m, None, tmp_path / name, dtype=dtype)
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        assert cfg["dtype"] == "bfloat16"
        with safe_open(str(tmp_path / name / "model.safetensors"), "pt") as f:
            assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
            assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
            assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.int8
            assert f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale").dtype == torch.float32
    sim = load_w8a8_for_hf(tmp_path / "cast", dtype=torch.bfloat16)
    assert sim.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
