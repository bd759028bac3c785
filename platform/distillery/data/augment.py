"""Training-row augmentation: synonym/entity replacement and meaning-keeping clause reordering.

Every change is drawn from a random generator seeded by (seed, row_id, copy), so a row's copies
are the same on every run and on any worker, whatever the order rows arrive in. Each augmented
row records exactly what was changed in its `augment` column (JSON), e.g.
`{"copy": 1, "of": "<original row_id>", "synonyms": [["心电图", "ECG"]], "reorder": [[1, 0]]}`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass

# Clause separators inside a sentence (English and Chinese); sentence ends are never moved across.
_CLAUSE_SEP = re.compile(r"(?<=[,;，；、])(\s*)")
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])(\s+|(?=\S))")
# Structured text (JSON, code, lists of numbers) must keep its order: reordering would change meaning.
_STRUCTURED = re.compile(r"[{}\[\]()<>=\"`|]|\d\s*,\s*\d")


def load_synonyms(path: str) -> list[list[str]]:
    """Synonym groups from a TSV (one group per line, tab-separated terms; `#` starts a comment line)."""
    import fsspec

    groups = []
    with fsspec.open(path, "r", encoding="utf-8") as f:
        for line in f:
            terms = [t.strip() for t in line.rstrip("\n").split("\t") if t.strip()]
            if line.startswith("#") or len(terms) < 2:
                continue
            groups.append(terms)
    return groups


@dataclass
class Synonyms:
    """A matcher for every term of every group; each term maps to the other terms of its group."""

    groups: list[list[str]]

    def __post_init__(self):
        self.alternatives: dict[str, list[str]] = {}
        for g in self.groups:
            for t in g:
                self.alternatives.setdefault(t, [])
                self.alternatives[t] += [o for o in g if o != t and o not in self.alternatives[t]]
        # Longest first so "electrocardiogram" wins over a shorter term inside it; ASCII terms only
        # match whole words ("add" must not match inside "address"); CJK terms match anywhere.
        parts = []
        for t in sorted(self.alternatives, key=len, reverse=True):
            e = re.escape(t)
            parts.append(rf"(?<![A-Za-z0-9_]){e}(?![A-Za-z0-9_])" if t.isascii() else e)
        self.pattern = re.compile("|".join(parts)) if parts else None

    def choose(self, texts: list[str], rng: random.Random, probability: float) -> dict[str, str]:
        """A replacement for each distinct matched term (kept with `probability`), applied consistently to all texts."""
        if self.pattern is None:
            return {}
        found = []
        for text in texts:
            for m in self.pattern.finditer(text):
                if m.group(0) not in found:
                    found.append(m.group(0))
        chosen = {}
        for term in found:
            if rng.random() < probability:
                chosen[term] = rng.choice(self.alternatives[term])
        return chosen

    def apply(self, text: str, chosen: dict[str, str]) -> str:
        if not chosen:
            return text
        return self.pattern.sub(lambda m: chosen.get(m.group(0), m.group(0)), text)


def reorder_clauses(text: str, rng: random.Random) -> tuple[str, list[list[int]]]:
    """Shuffle the clauses of each sentence that has several; returns the text and each changed sentence's order.

    Clauses are cut after , ; ， ； 、 and keep their own punctuation and the spacing between them;
    the sentence's last clause (with its end mark) stays last ("A, B, C." -> "B, A, C."), and lines
    and sentences stay where they are, so only clause order changes. Sentences that look structured
    (JSON, code, number lists) are left alone.
    """
    orders: list[list[int]] = []
    lines = []
    for line in text.split("\n"):
        parts = _SENTENCE_END.split(line)  # sentence, space, sentence, space, ...
        for si in range(0, len(parts), 2):
            sentence = parts[si]
            pieces = _CLAUSE_SEP.split(sentence)  # clause, space, clause, ...
            clauses, spaces = pieces[0::2], pieces[1::2]
            if len(clauses) < 3 or _STRUCTURED.search(sentence):
                continue
            order = list(range(len(clauses) - 1))
            rng.shuffle(order)
            if order == sorted(order):
                continue
            orders.append(order)
            moved = [clauses[i] for i in order] + [clauses[-1]]
            parts[si] = "".join(c + (spaces[i] if i < len(spaces) else "") for i, c in enumerate(moved))
        lines.append("".join(parts))
    return "\n".join(lines), orders


def row_rng(seed: int, row_id: str, copy: int, what: str) -> random.Random:
    d = hashlib.sha256(f"{what}:{seed}:{row_id}:{copy}".encode()).digest()
    return random.Random(int.from_bytes(d[:8], "little"))


def augment_messages(messages: list[dict], row_id: str, copy: int, seed: int, synonyms: Synonyms | None,
                     synonym_p: float, reorder_p: float | None) -> tuple[list[dict], dict] | None:
    """One augmented copy of a conversation (plain text is a one-message list), or None if nothing changed.

    Synonyms are replaced consistently in every turn (an entity renamed in the question is renamed
    in the answer too); clauses are reordered in user turns only, so answers stay as written.
    """
    prov: dict = {"copy": copy, "of": row_id}
    new = [dict(m) for m in messages]
    if synonyms is not None:
        chosen = synonyms.choose([m["content"] for m in new], row_rng(seed, row_id, copy, "synonyms"), synonym_p)
        if chosen:
            for m in new:
                m["content"] = synonyms.apply(m["content"], chosen)
            prov["synonyms"] = sorted(chosen.items())
    if reorder_p is not None:
        rng = row_rng(seed, row_id, copy, "reorder")
        if rng.random() < reorder_p:
            orders = []
            for m in new:
                if m["role"] in ("user", "text"):
                    m["content"], o = reorder_clauses(m["content"], rng)
                    orders += o
            if orders:
                prov["reorder"] = orders
    if len(prov) == 2:
        return None
    return new, prov


def provenance(prov: dict) -> str:
    return json.dumps(prov, ensure_ascii=False, sort_keys=True)
