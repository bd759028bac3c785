"""ESFT as a user runs it: `distillery finetune` on a tiny Qwen2-MoE whose routers prefer known
experts, on 2 FSDP workers; then the trained model generates in vLLM."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from moe_fixture import biased_moe

pytestmark = pytest.mark.slow

DISTILLERY = shutil.which("distillery", path=os.path.dirname(sys.executable)) or "distillery"

# vLLM starts its engine in a spawned process: a script with a __main__ guard, as a user's would be.
GENERATE = textwrap.dedent(
    """
    import json, sys
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=256, seed=0, enforce_eager=True)
        outs = llm.generate(["Add 12 and 30."], SamplingParams(max_tokens=6, temperature=0.0), use_tqdm=False)
        print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
    """
)


@pytest.mark.timeout(1200)
def test_esft_trains_exactly_the_experts_the_router_prefers_and_loads_in_vllm(tmp_path, tiny_teacher, prepared_tiny):
    chosen = {0: [1, 2], 1: [0, 3]}
    model = biased_moe(tmp_path / "moe", "qwen2_moe", str(tiny_teacher), chosen)
    run = tmp_path / "run"
    cfg = tmp_path / "esft.yaml"
    cfg.write_text(textwrap.dedent(f"""
        output_dir: {run}
        data: {{prepared: {prepared_tiny}}}
        model: {{path: {model}}}
        method: {{kind: esft, esft: {{threshold: 0.9, sample_tokens: 500}}}}
        train: {{num_workers: 2, strategy: fsdp, max_steps: 4, batch_size: 4, lr: 0.01, weight_decay: 0.1, scheduler: constant}}
    """))
    p = subprocess.run([DISTILLERY, "finetune", str(cfg)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "esft:" in p.stdout and "parameters train" in p.stdout
    record = json.loads((run / "esft_experts.json").read_text())
    assert {int(l): e["selected"] for l, e in record["layers"].items()} == chosen
    before, after = load_file(str(model / "model.safetensors")), load_file(str(run / "model" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = {k for k in before if ".mlp.experts." in k and int(k.split(".mlp.experts.")[1].split(".")[0]) in chosen[int(k.split(".")[2])]}
    assert changed == expected  # the chosen experts, all of them, and nothing else (shared experts, routers: frozen)
    script = tmp_path / "gen.py"
    script.write_text(GENERATE)
    g = subprocess.run([sys.executable, str(script), str(run / "model")], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    lines = [l for l in g.stdout.splitlines() if l.startswith("RESULT ")]
    assert g.returncode == 0 and lines, g.stderr[-3000:]
    assert len(json.loads(lines[0][len("RESULT "):])[0]) >= 1
