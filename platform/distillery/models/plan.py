"""Which parameters train: full, LoRA adapters, or the last (or first) N decoder layers.

`apply_method` changes `requires_grad` (or wraps the model with PEFT) and returns a `ParamPlan`
that names exactly the trainable parameters, so runs can report and tests can check them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distillery.config import ConfigError, MethodConfig


@dataclass
class ParamPlan:
    kind: str
    total: int
    trainable: int
    trainable_names: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def describe(self) -> str:
        return f"{self.kind}: {self.trainable:,} of {self.total:,} parameters train ({100 * self.fraction:.2f}%)"


def decoder_layers(model):
    """The list of decoder layers of a Hugging Face causal LM (Llama, Qwen2, Mixtral, ... and PEFT-wrapped)."""
    inner = model
    for attr in ("base_model", "model"):  # PeftModel -> LoraModel -> CausalLM
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
    backbone = getattr(inner, "model", None)
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise ConfigError(f"method: cannot find decoder layers (model.layers) in {type(inner).__name__}")
    return layers


def check_trainable_layers(n: int, layers: int) -> None:
    """`method.freeze.trainable_layers` must pick 1..layers decoder layers from the end (n > 0) or the start (n < 0)."""
    if n == 0 or abs(n) > layers:
        raise ConfigError(f"method.freeze.trainable_layers: {n} is not in ±1..±{layers} for a {layers}-layer model")


ESFT_NOT_BUILT = "method.kind: esft (expert-specialised fine-tuning for MoE models) is not available yet; use full, lora or freeze"


def check_method(method: MethodConfig, model_config) -> None:
    """What can be checked of `method` from the model's config alone, before any worker loads it."""
    if method.kind == "esft":
        raise ConfigError(ESFT_NOT_BUILT)
    layers = getattr(model_config, "num_hidden_layers", None)
    if method.kind == "freeze" and layers:
        check_trainable_layers(method.freeze.trainable_layers, layers)


def _plan(model, kind: str) -> ParamPlan:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ParamPlan(kind, total, trainable, names)


def apply_method(model, method: MethodConfig):
    """Apply `method.kind` to a freshly loaded model; returns (model, plan). LoRA returns a PeftModel."""
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

    raise ConfigError(ESFT_NOT_BUILT)
