"""`distillery generate` through a real vLLM engine under Ray Data, then `prepare` over its output.

One Ray instance and one generation run for the module. The teacher is the tiny test teacher,
changed so that it ends an answer by itself about one step in five (a randomly initialised model
almost never emits eos): then some answers stop, some run into max_new_tokens, some are empty,
and the prompts' references decide the rest, so every filter has something to count.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillery.config import load_config
from distillery.distill.generate import (
    GENERATED, LOGPROBS_DIR, MANIFEST, QUARANTINE, REJECTED, load_generated_logprobs, run_generate, sequence_key,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MAX_LENGTH = 64


def stopping_teacher(src: Path, dst: Path, p_stop: float = 0.2, share: float = 0.25) -> Path:
    """A copy of the teacher at `src` that ends its answers: P(eos) about `p_stop` per step, the rest
    of its distribution still depending on the context.

    Hidden dimension 0 carries a constant through the residual stream (every embedding sets it, no
    layer reads or writes it) and makes up `share` of the final hidden state's mean square; lm_head
    reads it only into eos's logit, with the weight that gives a mean P(eos) of `p_stop`.
    """
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    eos = AutoTokenizer.from_pretrained(src).eos_token_id
    ids = torch.randint(0, model.config.vocab_size, (8, 48), generator=torch.Generator().manual_seed(0))
    m, seen = model.model, {}
    m.norm.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0], y=out))
    with torch.no_grad():
        for layer in m.layers:
            layer.self_attn.o_proj.weight[0].zero_()
            layer.mlp.down_proj.weight[0].zero_()
            layer.input_layernorm.weight[0] = 0.0
            layer.post_attention_layernorm.weight[0] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        m.norm.weight[0] = 1.0
        c = 0.0
        for _ in range(4):  # the other dimensions' scale moves a little with c: settle it
            m.embed_tokens.weight[:, 0] = c
            model(input_ids=ids)
            rest = (seen["x"][..., 1:] ** 2).sum(-1).mean()
            c = float((rest * share / (1 - share)).sqrt())
        m.embed_tokens.weight[:, 0] = c
        logits = model(input_ids=ids).logits
        h0 = seen["y"][..., 0]
        lo, hi = 0.0, 50.0
        for _ in range(50):
            b = (lo + hi) / 2
            boosted = logits.clone()
            boosted[..., eos] += b * h0
            lo, hi = (b, hi) if torch.softmax(boosted, -1)[..., eos].mean() < p_stop else (lo, b)
        model.lm_head.weight[eos, 0] = b
    shutil.copytree(src, dst)
    model.save_pretrained(dst)
    return dst


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows), encoding="utf-8")
    return path


ANY = {"reference": ".", "metric": "regex"}  # any answer with a character agrees
NEVER = {"reference": "an answer nobody gives"}  # exact_match (generate.metric): every answer disagrees


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from distillery.runtime import ensure_ray

    # Generation's actor holds one CPU and its read tasks need another (run_generate sizes its own
    # Ray the same way); prepare afterwards runs in the same instance.
    started = ensure_ray(num_cpus=3, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def generated(ray_local, tmp_path_factory, tiny_teacher):
    root = tmp_path_factory.mktemp("generate")
    teacher = stopping_teacher(tiny_teacher, root / "teacher")
    prompts = _jsonl(root / "prompts.jsonl", [
        {"prompt": "Add 12 and 30.", "task": "arithmetic", **ANY},  # line 1
        {"prompt": "Name a colour.", **NEVER},  # line 2
        {"reference": "a row without a prompt"},  # line 3: quarantined
        {"prompt": "Add 12 and 30.", "task": "arithmetic", **ANY},  # line 4: line 1 again, in another batch
        {"prompt": " ".join(f"word{i}" for i in range(80)), **ANY},  # line 5: fills data.max_length alone
        {"prompt": "计算 5 加 7 等于多少？", **NEVER},  # line 6
        {"prompt": "Convert 3 km to metres.", "metadata": {"id": 7}, **ANY},  # line 7
    ])
    instructions = _jsonl(root / "instructions.jsonl", [
        {"instruction": "Sort these numbers.", "input": "3, 1, 2", "output": ".", "metric": "regex"},
        {"instruction": "Spell 42 in words.", "output": "forty-two"},
    ])
    chats = _jsonl(root / "chats.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."},
                      {"role": "assistant", "content": "."}], "metric": "regex"},
        {"messages": [{"role": "user", "content": "Name a city."}], **ANY},
    ])
    cfg = load_config(None, [
        f"output_dir={root / 'run'}", "seed=3", f"model.path={tiny_teacher}", f"model.teacher={teacher}",
        f"data.max_length={MAX_LENGTH}", "distill.top_k=8", "distill.cache_dtype=float32",
        f"generate.sources=[{{path: {prompts}, format: prompts, name: prompts}}, {{path: {instructions}, format: instruction, name: instructions}}, {{path: {chats}, format: chat, name: chats}}]",
        "generate.n=3", "generate.temperature=1.0", "generate.max_new_tokens=8", "generate.batch_size=2",
        "generate.accept=reference",
    ])
    assert run_generate(cfg) == 0
    out = Path(cfg.generated_dir)
    manifest = json.loads((out / MANIFEST).read_text())
    rows = [json.loads(line) for line in (out / GENERATED).read_text().splitlines()]
    rejected = [json.loads(line) for line in (out / REJECTED).read_text().splitlines()]
    return cfg, out, teacher, manifest, rows, rejected


def test_counts_add_up_and_every_filter_drops_something(generated):
    cfg, out, _, manifest, rows, rejected = generated
    c = manifest["counts"]
    assert c["prompts"]["read"] == 11 and c["prompts"]["quarantine"] == {"missing_field": 1}
    assert c["prompts"]["valid"] == 10 and c["prompts"]["too_long"] == 1 and c["prompts"]["answered"] == 9
    assert c["samples"]["generated"] == 27
    dropped = c["samples"]["dropped"]
    assert dropped["rejected"] > 0 and dropped["truncated"] > 0
    assert c["samples"]["kept"] == len(rows) > 0
    assert c["samples"]["generated"] == c["samples"]["kept"] + sum(dropped.values()) == len(rows) + len(rejected)
    for reason, n in dropped.items():
        assert sum(r["reason"] == reason for r in rejected) == n
    assert all(r["finish_reason"] == "length" for r in rejected if r["reason"] == "truncated")
    quarantined = [json.loads(line) for line in (out / QUARANTINE).read_text().splitlines()]
    assert [(q["line"], q["reason"], q["detail"]) for q in quarantined] == [(3, "missing_field", "prompt")]
    assert manifest["teacher"]["hash"] and manifest["settings"]["n"] == 3 and manifest["settings"]["seed"] == 3
    assert manifest["tokenizer_identity"]["vocab_size"] == 512


def test_generated_rows_are_the_kept_samples_with_provenance(generated):
    cfg, out, teacher, manifest, rows, _ = generated
    table = pq.read_table(out / LOGPROBS_DIR).to_pylist()
    assert [r["metadata"]["seq_key"] for r in rows] == [t["seq_key"] for t in table]
    for row, t in zip(rows, table):
        meta = row["metadata"]
        assert row["messages"][-1]["role"] == "assistant" and row["messages"][-1]["content"]
        assert meta["finish_reason"] == "stop" and meta["score"]["value"] == 1.0  # kept: agrees with its reference
        assert meta["generated_by"] == {"path": str(teacher), "hash": manifest["teacher"]["hash"]}
        assert meta["sampling"] == {"n": 3, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8, "seed": 3}
        assert meta["source"] in ("prompts", "instructions", "chats") and 0 <= meta["sample"] < 3
        assert sequence_key(t["input_ids"]) == t["seq_key"] and len(t["input_ids"]) <= MAX_LENGTH
    assert all(r["metadata"]["row_metadata"] == {"id": 7} for r in rows if r["metadata"]["line"] == 7 and r["metadata"]["source"] == "prompts")
    assert all(r["metadata"]["reference"] == "." and r["metadata"]["task"] == "arithmetic" for r in rows if r["metadata"]["line"] == 1 and r["metadata"]["source"] == "prompts")


def test_same_prompt_same_samples_in_another_batch(generated):
    """Line 4 repeats line 1 and is answered in another batch, beside other prompts: per-request
    seeds make its samples the same, so a re-run reproduces the output whatever the batching."""
    _, _, _, _, rows, rejected = generated
    by_line: dict[int, dict[int, tuple]] = defaultdict(dict)
    for r in rows:
        m = r["metadata"]
        if m["source"] == "prompts":
            by_line[m["line"]][m["sample"]] = ("kept", r["messages"][-1]["content"])
    for r in rejected:
        if r["source"] == "prompts":
            by_line[r["line"]][r["sample"]] = (r["reason"], r["answer"])
    assert len(by_line[1]) == 3 and by_line[1] == by_line[4]
    assert len({a for _, a in by_line[1].values()} | {a for _, a in by_line[6].values()}) > 1  # not one answer everywhere


def test_stored_logprobs_line_up_with_the_teacher_forward(generated):
    """Every stored position holds the teacher's distribution over the next token of the stored
    sequence: top-1 equal to an HF forward's, logprobs within 1e-3 (fp32)."""
    _, out, teacher, _, _, _ = generated
    entries = load_generated_logprobs(str(out))
    table = pq.read_table(out / LOGPROBS_DIR).to_pylist()
    assert len(entries) == len({t["seq_key"] for t in table})
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    for t in table:
        pos, ids, lps, tail = entries[t["seq_key"]]
        labels = np.array(t["labels"])
        assert (pos == np.nonzero(labels[1:] != -100)[0]).all() and len(pos) > 0
        assert ids.shape == lps.shape == (len(pos), 8) and tail.shape == (len(pos),)
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=torch.tensor([t["input_ids"]])).logits[0].float(), -1)[pos]
        assert (ref.argmax(-1).numpy() == ids[:, 0]).all()
        assert np.allclose(ref.gather(1, torch.from_numpy(ids).long()).numpy(), lps, atol=1e-3)
        assert np.all(np.diff(lps, axis=1) <= 1e-6)  # sorted by descending logprob
        rest = 1 - np.exp(ref.topk(8).values.double().numpy()).sum(-1)
        assert np.allclose(np.exp(tail), rest, atol=1e-4)


def test_prepare_over_generated_rows_matches_their_seq_keys(generated, demo_corpus, tmp_path):
    """`prepare` mixing generated.jsonl with labelled rows by weight writes the generated rows with
    exactly the input_ids their teacher logprobs were stored for."""
    from distillery.data.prepare import prepare

    cfg, out, _, _, rows, _ = generated
    labelled = _jsonl(tmp_path / "labelled.jsonl", demo_corpus["train"].read_text().splitlines()[:40])
    pcfg = load_config(None, [
        f"model.path={cfg.model.path}", f"data.max_length={MAX_LENGTH}", f"data.prepared={tmp_path / 'prepared'}",
        f"data.sources=[{{path: {out / GENERATED}, format: chat, name: generated, weight: 1}}, {{path: {labelled}, format: instruction, name: labelled, weight: 2}}]",
        "data.val_fraction=0.2", "data.test_fraction=0.0", "data.dedupe.near=false",
    ])
    manifest = prepare(pcfg, log=lambda text: None)
    keys = set(load_generated_logprobs(str(out)))
    prepared = [r for split in ("train", "val") for r in pq.read_table(tmp_path / "prepared" / split).to_pylist()]
    generated_rows = [r for r in prepared if r["source"] == "generated"]
    assert manifest["per_source"]["generated"]["valid"] == len(rows)  # prepare quarantines none of them
    assert generated_rows and all(sequence_key(r["input_ids"]) in keys for r in generated_rows)
    assert all(json.loads(r["metadata"])["seq_key"] == sequence_key(r["input_ids"]) for r in generated_rows)
    assert any(r["source"] == "labelled" for r in prepared)

    # cache-teacher over that prepared data with distill.cache_reuse: the generated rows take the
    # stored entries (first 4 of 8, tail recomputed) without a teacher run; the labelled rows are scored.
    from distillery.distill.teacher_cache import CACHE_MANIFEST, IDS_COL, LOGPROBS_COL, TAIL_COL, run_cache_teacher

    ccfg = load_config(None, [
        f"model.path={cfg.model.path}", f"model.teacher={cfg.model.teacher}", f"data.prepared={tmp_path / 'prepared'}",
        "distill.top_k=4", "distill.cache_samples=0", "distill.cache_dtype=float32", f"distill.cache_reuse=[{out}]",
        f"distill.cache={tmp_path / 'cache'}",
    ])
    assert run_cache_teacher(ccfg) == 0
    cmanifest = json.loads((tmp_path / "cache" / CACHE_MANIFEST).read_text())
    assert sum(cmanifest["reused_rows"].values()) == len(generated_rows)
    stored = load_generated_logprobs(str(out))
    cached = [r for split in ("train", "val") for r in pq.read_table(tmp_path / "cache" / split).to_pylist()]
    model = AutoModelForCausalLM.from_pretrained(cfg.model.teacher, dtype=torch.float32).eval()
    for r in cached:
        pos = [t for t, ids in enumerate(r[IDS_COL]) if ids]
        ids, lps, tail = (np.array([r[c][t] for t in pos]) for c in (IDS_COL, LOGPROBS_COL, TAIL_COL))
        if r["source"] == "generated":
            _, s_ids, s_lps, _ = stored[sequence_key(r["input_ids"])]
            assert (ids == s_ids[:, :4]).all() and np.allclose(lps, s_lps[:, :4], atol=1e-6)
        else:  # scored by the HF teacher: the same distribution within the engines' 1e-3
            with torch.no_grad():
                ref = torch.log_softmax(model(input_ids=torch.tensor([r["input_ids"]])).logits[0].float(), -1)[pos]
            assert np.allclose(ref.topk(4).values.numpy(), lps, atol=1e-3)
        assert np.allclose(np.exp(tail), 1 - np.exp(lps.astype(np.float64)).sum(-1), atol=1e-4)
    # Another teacher's output is refused before Ray, naming the key.
    with pytest.raises(ValueError, match=r"distill.cache_reuse.0: .* was generated by teacher"):
        run_cache_teacher(load_config(None, [*[o for o in (f"model.path={cfg.model.path}", f"data.prepared={tmp_path / 'prepared'}",
                                                             "distill.top_k=4", "distill.cache_samples=0", f"distill.cache_reuse=[{out}]",
                                                             f"distill.cache={tmp_path / 'cache2'}")], f"model.teacher={cfg.model.path}"]))
