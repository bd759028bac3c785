"""Which parameters train: full, LoRA adapters, the last (or first) N decoder layers, or chosen experts (ESFT).

`apply_method` changes `requires_grad` (or wraps the model with PEFT) and returns a `ParamPlan`
that names exactly the trainable parameters, so runs can report and tests can check them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distillery.config import ConfigError, MethodConfig
from distillery.models.structure import decoder_layers, is_moe_config


@dataclass
class ParamPlan:
    kind: str
    total: int
    trainable: int
    trainable_names: list[str] = field(default_factory=list)
    expert_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    """ESFT: parameter name -> bool [E], the expert slices of a fused expert tensor that train."""

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def describe(self) -> str:
        return f"{self.kind}: {self.trainable:,} of {self.total:,} parameters train ({100 * self.fraction:.2f}%)"


def check_trainable_layers(n: int, layers: int) -> None:
    """`method.freeze.trainable_layers` must pick 1..layers decoder layers from the end (n > 0) or the start (n < 0)."""
    if n == 0 or abs(n) > layers:
        raise ConfigError(f"method.freeze.trainable_layers: {n} is not in ±1..±{layers} for a {layers}-layer model")


def check_method(method: MethodConfig, model_config) -> None:
    """What can be checked of `method` from the model's config alone, before any worker loads it."""
    from distillery.models.experts import check_selection, read_selection

    if method.kind == "esft":
        if not is_moe_config(model_config):
            raise ConfigError(
                f"method.kind: esft trains chosen experts of a mixture-of-experts model; this is a dense "
                f"'{getattr(model_config, 'model_type', '?')}' model (use full, lora or freeze)"
            )
        if method.esft.experts_file:
            check_selection(read_selection(method.esft.experts_file), model_config, "method.esft.experts_file")
    layers = getattr(model_config, "num_hidden_layers", None)
    if method.kind == "freeze" and layers:
        check_trainable_layers(method.freeze.trainable_layers, layers)


def _plan(model, kind: str) -> ParamPlan:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ParamPlan(kind, total, trainable, names)


def apply_method(model, method: MethodConfig, experts: dict[int, list[int]] | None = None):
    """Apply `method.kind` to a freshly loaded model; returns (model, plan). LoRA returns a PeftModel.
    `experts` (ESFT only): the chosen experts per layer (train/esft.py measures them)."""
    if method.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, _plan(model, "full")

    if method.kind == "lora":
        from peft import LoraConfig, get_peft_model

        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in method.lora.target_modules if t not in names]
        if missing:
            raise ConfigError(f"method.lora.target_modules: {missing} not found in the model's modules")
        peft_cfg = LoraConfig(
            r=method.lora.r,
            lora_alpha=method.lora.alpha,
            lora_dropout=method.lora.dropout,
            target_modules=list(method.lora.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, peft_cfg)
        return model, _plan(model, "lora")

    if method.kind == "freeze":
        layers = decoder_layers(model)
        n = method.freeze.trainable_layers
        check_trainable_layers(n, len(layers))
        chosen = list(layers)[-n:] if n > 0 else list(layers)[: -n]
        for p in model.parameters():
            p.requires_grad_(False)
        trainable_modules = chosen + [model.model.norm]
        tied = model.config.tie_word_embeddings
        if not tied:  # a tied lm_head *is* the embedding matrix, which stays frozen
            trainable_modules.append(model.lm_head)
        for module in trainable_modules:
            for p in module.parameters():
                p.requires_grad_(True)
        return model, _plan(model, "freeze")

    if method.kind == "esft":
        from distillery.models.experts import apply_esft

        if experts is None:
            raise ConfigError("method.kind: esft needs the chosen experts per layer (train/esft.py)")
        masks, trainable = apply_esft(model, method.esft, experts)
        plan = _plan(model, "esft")
        plan.trainable, plan.expert_masks = trainable, masks
        return model, plan

    raise ConfigError(f"method.kind: unknown '{method.kind}' (full, lora, freeze, esft)")
