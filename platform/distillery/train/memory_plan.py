"""How much memory each worker's training state and one micro-batch's activations take, printed
before training so a run that cannot fit is seen before it runs out of memory.

Per worker, with P parameters of which T train, weights of w bytes (4: fp32 in fp32 and the mixed
modes, whose fp32 weights are the optimiser's master copy; 2: bf16-pure) and S = the world size
under FSDP (else 1):

    parameters = P·w / S
    gradients  = T·w / S              (fp32 gradients of fp32 weights in the mixed modes)
    optimiser  = 2·T·w / S            (AdamW's exp_avg and exp_avg_sq, in the weights' dtype)

Under FSDP each decoder layer's parameters are also all-gathered unsharded (in the compute dtype)
for its forward and backward: transient, one or two layers at a time, not counted.

Activations saved for backward by one micro-batch of N = batch_size × max_length tokens, in the
compute dtype of s bytes (2 in the bf16/fp16 modes, else 4), for a Llama-style decoder of L layers
(hidden H, MLP width I, query width A = heads·head_dim, key/value width K = kv_heads·head_dim,
vocabulary V):

    per layer = N·s·(3H + 3A + 2K + 4I)   (+ 2·N·H·4 in mixed modes: RMSNorm's fp32 upcasts)
        layer input and residual (2H), the two norm outputs (1H beyond what is shared), q, attention
        output and its contiguous copy (3A), k and v (2K), gate, up, SiLU(gate), gate·up (4I)
    head      = N·(2H·s + V·(s + 4))      final norm in and out, logits, fp32 log-softmax of the loss
    total     = L·per layer + head

With activation checkpointing each layer keeps only its input (N·H·s) and one layer is recomputed
at a time: L·N·H·s + per layer + head. Activations are per worker whatever the strategy (each
worker runs its own micro-batch). The test (tests/unit/test_memory_plan.py) checks this against the
tensors one forward actually saves.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024 ** 3


@dataclass
class MemoryPlan:
    """Bytes per worker (see the module docstring for each formula)."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int  # without activation checkpointing
    activations_checkpointed: int
    shards: int  # S: the number of workers the state is sharded over (1 unless FSDP)

    @property
    def state(self) -> int:
        return self.parameters + self.gradients + self.optimizer

    def describe(self, tokens: str, checkpointing: bool, offload: bool = False) -> list[str]:
        """Two progress lines: the training state, then the activations of one micro-batch (`tokens`:
        e.g. "8x512")."""
        where = "host memory (cpu_offload)" if offload else "per worker"
        shard = f", sharded over {self.shards} workers" if self.shards > 1 else ""
        act, other = (self.activations_checkpointed, self.activations) if checkpointing else (self.activations, self.activations_checkpointed)
        return [
            f"memory plan {where}: parameters {gib(self.parameters)}, gradients {gib(self.gradients)}, "
            f"AdamW state {gib(self.optimizer)} (total {gib(self.state)}{shard})",
            f"memory plan: activations of a {tokens} micro-batch ~{gib(act)} with activation checkpointing "
            f"{'on' if checkpointing else 'off'} (~{gib(other)} {'off' if checkpointing else 'on'})",
        ]


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 100 else f"{n / 1024 ** 2:.2f} MiB"


def layer_activation_bytes(model_config, tokens: int, compute_bytes: int) -> int:
    """Bytes one decoder layer saves for backward for `tokens` tokens (module docstring, "per layer")."""
    h, i = model_config.hidden_size, model_config.intermediate_size
    heads = model_config.num_attention_heads
    kv = getattr(model_config, "num_key_value_heads", None) or heads
    d = getattr(model_config, "head_dim", None) or h // heads
    a, k = heads * d, kv * d
    upcasts = 2 * tokens * h * 4 if compute_bytes != 4 else 0
    return tokens * compute_bytes * (3 * h + 3 * a + 2 * k + 4 * i) + upcasts


def head_activation_bytes(model_config, tokens: int, compute_bytes: int) -> int:
    """Bytes the final norm, lm_head and the loss save (module docstring, "head")."""
    h, v = model_config.hidden_size, model_config.vocab_size
    return tokens * (2 * h * compute_bytes + v * (compute_bytes + 4))


def plan_memory(model_config, total_params: int, trainable_params: int, weight_bytes: int, compute_bytes: int,
                batch_size: int, max_length: int, shards: int) -> MemoryPlan:
    """The `MemoryPlan` of a model (`model_config`: its Hugging Face config) with `total_params`
    parameters of which `trainable_params` train, weights of `weight_bytes` bytes, computing in
    `compute_bytes`, a micro-batch of [batch_size, max_length] tokens, state sharded `shards` ways."""
    n = batch_size * max_length
    layers = model_config.num_hidden_layers
    per_layer = layer_activation_bytes(model_config, n, compute_bytes)
    head = head_activation_bytes(model_config, n, compute_bytes)
    return MemoryPlan(
        parameters=total_params * weight_bytes // shards,
        gradients=trainable_params * weight_bytes // shards,
        optimizer=2 * trainable_params * weight_bytes // shards,
        activations=layers * per_layer + head,
        activations_checkpointed=layers * n * model_config.hidden_size * compute_bytes + per_layer + head,
        shards=shards,
    )
