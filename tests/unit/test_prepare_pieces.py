"""The pure-Python pieces of `distillery prepare`: reading with lines, validation, normalisation,
MinHash dedupe, augmentation, mixing, splitting and token masking (no Ray)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from distillery.data import dedupe as dd
from distillery.data.augment import Synonyms, augment_messages, reorder_clauses
from distillery.data.mix import copies_of, keep_rates, unit_hash
from distillery.data.normalize import normalize_fields, normalize_text
from distillery.data.read import index_file, read_chunk
from distillery.data.splits import IGNORE_INDEX
from distillery.data.tokenize import pack, truncate, windows
from distillery.data.validate import Invalid, validate


def test_chunks_keep_line_numbers_and_bad_lines_are_reported(tmp_path):
    p = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": f"row {i} " + "x" * (i % 7)}).encode() for i in range(200)]
    lines[17] = b'{"text": "broken'
    lines[42] = b'{"text": "caf\xe9"}'  # latin-1 byte: not UTF-8
    p.write_bytes(b"\n".join(lines) + b"\n")
    info = index_file(str(p), chunk_bytes=256)
    assert len(info.chunks) > 5 and info.size == p.stat().st_size and len(info.sha256) == 64
    seen = {}
    for start, end, first in info.chunks:
        for line, obj, raw, reason in read_chunk(str(p), start, end, first):
            seen[line] = (obj, reason)
    assert sorted(seen) == list(range(1, 201))
    assert seen[18][1].startswith("bad_json") and seen[43][1].startswith("undecodable")
    assert seen[100][0] == {"text": "row 99 " + "x" * (99 % 7)}


@pytest.mark.parametrize("row,fmt,reason", [
    ({"output": "x"}, "instruction", "missing_field"),
    ({"instruction": 3, "output": "x"}, "instruction", "wrong_type"),
    ({"instruction": "  \n", "output": "x"}, "instruction", "empty_text"),
    ([1, 2], "text", "not_an_object"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "chat", "wrong_type"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "chat", "wrong_type"),
])
def test_invalid_rows_have_reasons(row, fmt, reason):
    with pytest.raises(Invalid) as e:
        normalize_fields(validate(row, fmt), fmt)
    assert e.value.reason == reason


def test_normalize_nfc_and_whitespace():
    assert normalize_text("Cafe\u0301  \t au\u3000lait\r\n\n\n\nnext ") == "Café au lait\n\nnext"
    fields = normalize_fields(validate({"instruction": " 指令 ", "input": None, "output": "输出", "label": 1}, "instruction"), "instruction")
    assert fields == {"instruction": "指令", "input": "", "output": "输出", "label": 1, "metadata": None}


def test_minhash_separates_near_copies_from_different_rows():
    a = "The quarterly report shows revenue of 512 million and a profit of 48 million for Acme."
    near = a.replace("512", "513")
    other = "Sort the numbers 5 3 9 1 in ascending order and print them on one line."
    sa, sn, so = (dd.minhash(t) for t in (a, near, other))
    assert (sa == sn).mean() > 0.8 and (sa == so).mean() < 0.2
    b, r = dd.lsh_params(0.85, 64)
    assert b * r <= 64
    uids = np.array([5, 9, 7], dtype=np.int64)
    keys, us, sigs = [], [], []
    for u, s in zip(uids, (sa, sn, so)):
        for k in dd.band_keys(s, b, r):
            keys.append(k), us.append(u), sigs.append(s)
    keys.append(dd.exact_key("ab" * 8)), us.append(11), sigs.append(so)
    keys.append(dd.exact_key("ab" * 8)), us.append(3), sigs.append(so)
    found = dd.find_duplicates(np.array(keys), np.array(us), np.stack(sigs), 0.85)
    assert found == {9: "near", 11: "exact"}


@pytest.mark.parametrize("shingle", [5, 2])
def test_minhash_batch_equals_minhash_row_by_row(shingle):
    rng = random.Random(1)
    texts = ["", "a", "abcd", "abcde", "日本語のテキスト", "😀😀😀😀😀x", "x" * 3000]
    texts += [" ".join("".join(rng.choice("abcdefg") for _ in range(rng.randint(1, 8))) for _ in range(rng.randint(1, 30)))
              for _ in range(300)]
    rng.shuffle(texts)
    ref = np.stack([dd.minhash(t, 32, shingle, 7) for t in texts])
    for group in (1 << 17, 50, 1):  # one group, several, one text per group
        assert (dd.minhash_batch(texts, 32, shingle, 7, max_shingles=group) == ref).all()
    assert dd.minhash_batch([], 32).shape == (0, 32)
    keys = dd.band_keys_batch(ref, 4, 8)
    assert keys.shape == (len(texts), 4) and (keys >= 0).all()
    assert ((keys >> 48) == np.arange(4)).all()  # the band number sits in the top bits
    assert keys[0].tolist() == dd.band_keys(ref[0], 4, 8)
    changed = ref[0].copy()
    changed[9] ^= 1  # band 1's slice changes: only band 1's key does
    assert (dd.band_keys_batch(changed[None], 4, 8)[0] != keys[0]).tolist() == [False, True, False, False]


def test_augmentation_is_seeded_and_changes_only_what_it_says():
    syn = Synonyms([["心电图", "ECG", "electrocardiogram"], ["add", "sum"]])
    msgs = [{"role": "user", "content": "The ECG is normal, the patient is calm, we add notes. 心电图正常，患者平稳，可以出院。"},
            {"role": "assistant", "content": "ECG fine"}]
    a = augment_messages(msgs, "r1", 1, 7, syn, 1.0, None)
    assert a == augment_messages(msgs, "r1", 1, 7, syn, 1.0, None)
    new, prov = a
    assert prov["copy"] == 1 and prov["synonyms"]
    # Applying exactly the recorded replacements to the original gives the copy: nothing else changed.
    chosen = dict(prov["synonyms"])
    assert [syn.apply(m["content"], chosen) for m in msgs] == [m["content"] for m in new]
    assert new != msgs
    assert "address" == syn.apply("address", {"add": "sum"})
    # Reordering keeps every clause and the sentence end, and only touches user turns.
    text, orders = reorder_clauses("First, we eat, then we sleep, and we go home.", random.Random(3))
    assert sorted(text.rstrip(".").replace(",", "").split()) == sorted("First we eat then we sleep and we go home".split())
    assert text.endswith("and we go home.")
    r = next(x for x in (augment_messages(msgs, "r2", c, 0, None, 0.0, 1.0) for c in range(1, 9)) if x is not None)
    assert r[0][1] == msgs[1] and "reorder" in r[1]
    json_text = 'Extract: {"a": 1, "b": 2, "c": 3}.'
    assert reorder_clauses(json_text, random.Random(0)) == (json_text, [])


def test_mix_rates_hit_weights_and_split_hash_is_stable():
    rates = keep_rates({"general": 1000, "domain": 1000, "task": 100}, {"general": 7, "domain": 2, "task": 1})
    kept = {"general": 1000 * rates["general"], "domain": 1000 * rates["domain"], "task": 100 * rates["task"]}
    assert kept["task"] == 100 and abs(kept["general"] / kept["task"] - 7) < 1e-9 and abs(kept["domain"] / kept["task"] - 2) < 1e-9
    assert unit_hash("split", 0, "abc") == unit_hash("split", 0, "abc") != unit_hash("split", 1, "abc")
    up = keep_rates({"general": 1000, "domain": 1000, "task": 100}, {"general": 7, "domain": 2, "task": 1}, upsample=True)
    written = {"general": 1000 * up["general"], "domain": 1000 * up["domain"], "task": 100 * up["task"]}
    assert up["domain"] == 1 and up["general"] == 3.5 and abs(written["general"] / written["task"] - 7) < 1e-9 and abs(written["domain"] / written["task"] - 2) < 1e-9
    # a row is written floor(rate) or floor(rate) + 1 times, rate times on average
    assert [copies_of(2.25, u) for u in (0.0, 0.2, 0.3, 0.99)] == [3, 3, 2, 2] and copies_of(0.4, 0.5) == 0
    mean = sum(copies_of(2.25, unit_hash("mix", 0, i)) for i in range(20000)) / 20000
    assert abs(mean - 2.25) < 0.02


def test_truncate_windows_and_pack_keep_prompt_masked():
    ids, labels = list(range(10)), [IGNORE_INDEX] * 4 + list(range(4, 10))
    t_ids, t_labels = truncate(ids, labels, 6)
    assert t_ids == ids[:6] and t_labels == labels[:6]
    assert truncate(ids, labels, 4) is None  # only prompt left
    w = windows(list(range(10)), list(range(10)), size=4, stride=3)
    assert [x for x, _ in w] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    trained = [t for _, lab in w for t in lab if t != IGNORE_INDEX]
    assert trained == list(range(10))  # every token is a target exactly once
    rows = [{"row_id": str(i), "source": "s", "prompt": "p", "response": "r", "input_ids": [1, 2], "labels": [IGNORE_INDEX, 2],
             "num_tokens": 2, "augment": "", "split": "train"} for i in range(5)]
    packed = pack(rows, 4)
    assert [r["num_tokens"] for r in packed] == [4, 4, 2]
    assert packed[0]["labels"] == [IGNORE_INDEX, 2, IGNORE_INDEX, 2]


def test_split_summary_digest_does_not_depend_on_batching():
    import pyarrow as pa

    from distillery.data.finalize import split_summary

    rows = [{"split": "train" if i % 3 else "val", "source": "s", "row_id": f"r{i}", "input_ids": [i, i + 1],
             "labels": [-100, i + 1], "augment": ""} for i in range(50)]

    def total(batches):
        acc = {}
        for b in batches:
            for r in split_summary(pa.Table.from_pylist(b)).to_pylist():
                a = acc.setdefault(r["split"], [0, 0])
                a[0], a[1] = (a[0] + r["h1"]) % 2**63, (a[1] + r["h2"]) % 2**63
        return acc

    assert total([rows]) == total([rows[:7], rows[7:30], rows[30:]]) == total([rows[::-1]])


def test_token_ids_straight_from_the_rust_tokenizer_match_the_tokenizer_call(tiny_teacher):
    from distillery.data.tokenize import _plain_backend, load_tokenizer_cached, token_ids

    tok = load_tokenizer_cached(str(tiny_teacher))
    texts = ["Sort the numbers 5 3 9 1.", "", "心电图正常 ECG", "<|im_start|>user\nhi<|im_end|>\n", "  two  spaces "]
    assert _plain_backend(tok)
    assert token_ids(tok, texts) == tok(texts, add_special_tokens=False)["input_ids"]
    tok.backend_tokenizer.enable_truncation(3)  # a setting the tokenizer call would undo: the call is used instead
    try:
        assert not _plain_backend(tok)
        assert token_ids(tok, texts) == tok(texts, add_special_tokens=False)["input_ids"]
    finally:
        tok.backend_tokenizer.no_truncation()


def _near_copies(rows: list[list[dict]], near_by: str, threshold: float = 0.85, num_perm: int = 64) -> dict[int, str]:
    """Near-dedupe of chat rows as ingest and pass 2 do it: band keys from the row (or prompt), the
    response's signature beside it with near_by=row."""
    from distillery.data.normalize import content_text, dedupe_texts

    b, r = dd.lsh_params(threshold, num_perm)
    keys, uids, sigs = [], [], []
    for uid, messages in enumerate(rows):
        prompt, response = dedupe_texts(messages, None)
        key_sig = dd.minhash(content_text(messages, None) if near_by == "row" else prompt, num_perm)
        sig = np.concatenate([key_sig, dd.minhash(response, num_perm)]) if near_by == "row" else key_sig
        for k in dd.band_keys(key_sig, b, r):
            keys.append(k), uids.append(uid), sigs.append(sig)
    return dd.find_duplicates(np.array(keys), np.array(uids), np.stack(sigs), threshold, parts=2 if near_by == "row" else 1)


def test_templated_rows_with_different_answers_are_not_near_copies():
    """A long shared instruction with a few characters of input makes two rows look alike; they are
    near copies only when their responses are too (or when prompts alone are asked to match)."""
    instruction = ("You are a careful unit converter. Convert the quantity below to metric units and answer with the "
                   "number and the unit only, rounded to one decimal place, without any explanation or extra words.")

    def row(value: str, answer: str) -> list[dict]:
        return [{"role": "user", "content": f"{instruction}\n{value}"}, {"role": "assistant", "content": answer}]

    rows = [row("12 miles", "19.3 km"), row("13 miles", "20.9 km"), row("12 mile", "19.3 km")]
    whole = [dd.minhash(f"{m[0]['content']}\n{m[1]['content']}") for m in rows]
    assert (whole[0] == whole[1]).mean() >= 0.85  # whole rows alone would call row 1 a copy of row 0
    assert _near_copies(rows, "row") == {2: "near"}  # same answer: a copy; different answer: kept
    assert _near_copies(rows, "prompt") == {1: "near", 2: "near"}  # the opt-in: prompts alone decide


def test_a_malformed_csv_row_is_quarantined_alone(tmp_path):
    """Each bad CSV row is one record with a reason and its own line; every later row is still read,
    quoted fields may span lines, and every value stays a string."""
    from distillery.data.read import index_file, read_chunk

    p = tmp_path / "rows.csv"
    p.write_bytes(b'\xef\xbb\xbfinstruction,output,label\n"a, b",1,007\nbad,row\n"multi\nline",2,x\n'
                  b'\xff\xfebad,utf,8\n\nlast,3,y\n')
    (start, end, first), = index_file(str(p)).chunks
    records = list(read_chunk(str(p), start, end, first))
    got = [(line, obj, reason.split(":")[0]) for line, obj, _, reason in records]
    assert got == [
        (2, {"instruction": "a, b", "output": "1", "label": "007"}, ""),
        (3, None, "bad_csv"),
        (4, {"instruction": "multi\nline", "output": "2", "label": "x"}, ""),
        (6, None, "undecodable"),
        (8, {"instruction": "last", "output": "3", "label": "y"}, ""),
    ]
    assert "2 fields where the header has 3 (instruction, output, label)" in records[1][3]
    assert records[1][2] == "bad,row"


@pytest.mark.parametrize("near_by, copies", [("row", [3]), ("prompt", [2, 3])])
def test_near_by_setting_through_ingest_and_the_bucket_pass(tmp_path, tiny_teacher, near_by, copies):
    """`data.dedupe.near_by` end to end through pass 1 (ingest_chunk on a real file) and pass 2
    (duplicates_in_bucket on the key files it wrote), without Ray: with `row` a templated row is a
    near copy only when its answer matches too; with `prompt` the prompt alone decides."""
    import json

    from distillery.config import DedupeConfig
    from distillery.data.context import IngestContext
    from distillery.data.duplicates import duplicates_in_bucket
    from distillery.data.ingest import UID_LINE_BITS, ingest_chunk
    from distillery.data.read import index_file

    instruction = ("You are a careful unit converter. Convert the quantity below to metric units and answer with the "
                   "number and the unit only, rounded to one decimal place, without any explanation or extra words.")
    path = tmp_path / "rows.jsonl"
    rows = [("12 miles", "19.3 km"), ("13 miles", "20.9 km"), ("12 mile", "19.3 km")]
    path.write_text("".join(json.dumps({"instruction": instruction, "input": i, "output": o}) + "\n" for i, o in rows))
    tmp = tmp_path / "tmp"
    for d in ("quarantine", "_stats"):
        (tmp / d).mkdir(parents=True)
    ctx = IngestContext(tokenizer=str(tiny_teacher), chat_template=None, seed=0, tmp=str(tmp), min_length=1, max_length=512,
                        window=None, packing=False, dedupe=DedupeConfig(near_by=near_by), buckets=1, keep_messages=False, count_labels=False)
    (start, end, first), = index_file(str(path)).chunks
    chunk = {"source_idx": 0, "file_idx": 0, "source": "s", "format": "instruction", "file": str(path),
             "start": start, "end": end, "first_line": first}
    ingest_chunk({k: np.array([v]) for k, v in chunk.items()}, ctx)
    found = duplicates_in_bucket({"bucket": np.array([0])}, root=str(tmp / "_keys"), threshold=0.85, num_perm=64)
    lines = sorted(int(u) & ((1 << UID_LINE_BITS) - 1) for u in found["uid"])
    assert lines == copies and set(found["kind"]) == {"near"}
