"""init-model outputs run through a real vLLM engine on CPU, and agree with transformers greedily."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.slow

# vLLM starts its engine in a spawned process, so it runs as a script with a __main__ guard,
# as a user's would.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        model, prompts = sys.argv[1], json.loads(sys.argv[2])
        llm = LLM(model=model, dtype="float32", max_model_len=256, seed=0, enforce_eager=True)
        outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
        print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
    """
)


def test_vllm_generates_same_greedy_tokens_as_transformers(tmp_path, tiny_teacher):
    prompts = ["Add 12 and 30.", "计算 5 加 7 等于多少？"]
    script = tmp_path / "gen.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_teacher), json.dumps(prompts)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    vllm_tokens = json.loads(lines[0][len("RESULT "):])

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    for prompt, got in zip(prompts, vllm_tokens):
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            ref = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        expected = ref[0, enc["input_ids"].shape[1]:].tolist()
        # vLLM stops at eos; compare up to its length.
        assert len(got) >= 1 and expected[: len(got)] == got
