"""The memory plan (train/memory_plan.py) against a tiny model's measured tensors."""

from __future__ import annotations

import torch

from distillery.train.memory_plan import plan_memory


def _tiny(vocab=256, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def _saved_bytes(model, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward (with the loss)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.requires_grad and isinstance(t, torch.nn.Parameter) or t.data_ptr() == 0:
            return t
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return sum(n for ptr, n in seen.items() if ptr not in params)  # weights are parameters, not activations


def test_state_bytes_are_exact_after_one_adamw_step():
    model = _tiny()
    ids = torch.randint(0, 256, (2, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    params = list(model.parameters())
    measured_params = sum(p.numel() * p.element_size() for p in params)
    measured_grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
    measured_opt = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k != "step")
    n = sum(p.numel() for p in params)
    plan = plan_memory(model.config, n, n, 4, 4, 2, 16, shards=1)
    assert (plan.parameters, plan.gradients, plan.optimizer) == (measured_params, measured_grads, measured_opt)
    # FSDP over 4 workers: each holds a quarter of every term; frozen parameters add no grads or moments.
    sharded = plan_memory(model.config, n, n // 2, 4, 4, 2, 16, shards=4)
    assert sharded.parameters == measured_params // 4 and sharded.optimizer == 2 * sharded.gradients == n * 4 // 4


def test_activation_estimate_matches_saved_tensors():
    """Within 25% of the saved storages of one forward: the formula counts the large per-token
    tensors (hidden, MLP, attention and vocabulary widths) and leaves out what scales otherwise
    (RoPE cos/sin, attention log-sum-exp, masks, index tensors), a few percent at these sizes."""
    for batch, length, layers in ((2, 32, 2), (4, 16, 3)):
        model = _tiny(layers=layers)
        ids = torch.randint(0, 256, (batch, length))
        measured = _saved_bytes(model, ids)
        n = sum(p.numel() for p in model.parameters())
        plan = plan_memory(model.config, n, n, 4, 4, batch, length, shards=1)
        assert 0.75 * measured <= plan.activations <= 1.25 * measured, (plan.activations, measured)
        assert plan.activations_checkpointed < plan.activations
