"""Back-translation as Ray Data batch inference: text -> pivot language -> back, through a local model.

`BackTranslator` is a callable class for `Dataset.map_batches(..., compute=ray.data.ActorPoolStrategy(size=n))`: each actor
loads the model once and translates whole batches. It uses vLLM when it is importable and a GPU
is visible (continuous batching); on CPU, Hugging Face `generate` is faster for the small batches
augmentation sends, and needs no engine start-up. Only user turns (or plain text) are translated,
so answers stay exactly as written.
"""

from __future__ import annotations

import json


def _use_vllm() -> bool:
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


class BackTranslator:
    def __init__(self, model: str, pivot_prompt: str, return_prompt: str, max_new_tokens: int):
        self.model_path = model
        self.prompts = (pivot_prompt, return_prompt)
        self.max_new_tokens = max_new_tokens
        self.engine = None
        if _use_vllm():
            from vllm import LLM, SamplingParams

            self.engine = LLM(model=model)
            self.params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        else:
            import torch

            from distillery.models.load import load_causal_lm, load_tokenizer

            torch.manual_seed(0)
            self.tok = load_tokenizer(model)
            self.tok.padding_side = "left"  # decoder-only generation continues from the right end
            self.model = load_causal_lm(model, dtype="float32").eval()

    def generate(self, texts: list[str]) -> list[str]:
        """Greedy continuations of `texts` (deterministic, so augmentation stays reproducible)."""
        if not texts:
            return []
        if self.engine is not None:
            return [o.outputs[0].text.strip() for o in self.engine.generate(texts, self.params, use_tqdm=False)]
        import torch

        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id)
        return [t.strip() for t in self.tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]

    def __call__(self, batch: dict) -> dict:
        """Rows with a `messages` JSON column in; the same rows with translated user turns and provenance out."""
        convs = [json.loads(m) for m in batch["messages"]]
        where = [(i, j) for i, c in enumerate(convs) for j, m in enumerate(c) if m["role"] in ("user", "text")]
        originals = [convs[i][j]["content"] for i, j in where]
        pivot = self.generate([self.prompts[0].format(text=t) for t in originals])
        back = self.generate([self.prompts[1].format(text=t) for t in pivot])
        for (i, j), t, orig in zip(where, back, originals):
            convs[i][j]["content"] = t or orig  # an empty translation keeps the original text
        batch = dict(batch)
        batch["messages"] = [json.dumps(c, ensure_ascii=False) for c in convs]
        batch["augment"] = [json.dumps({"copy": 0, "of": rid, "back_translate": self.model_path}, sort_keys=True)
                            for rid in batch["row_id"]]
        return batch
