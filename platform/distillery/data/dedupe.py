"""Exact and near-duplicate detection: MinHash over character shingles, LSH banding, grouping by key.

Every row gets a `uid` (its source, file and line, so smaller means earlier) and a list of keys:
its exact `row_id` hash and, for near-dedupe, one key per LSH band of its MinHash signature.
Rows that share a key are candidates; grouping the narrow (key, uid, signature) table by key
happens in Ray Data (`groupby(...).map_groups`), so no process ever holds the corpus.
Within a key group the earliest row wins: an exact copy of an earlier row is dropped, and a row
whose estimated Jaccard similarity to an earlier kept row is at or above the threshold is dropped.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

_POLY = np.uint64(0x100000001B3)  # FNV-style multiplier for the rolling shingle hash
EXACT_BAND = 0x7FFF  # band number of the exact key (LSH bands are 0..b-1); keys stay positive int64


@lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients of `num_perm` universal hash functions h(x) = (a*x + b) >> 32, fixed by `seed`."""
    rng = np.random.default_rng([seed, num_perm])
    a = rng.integers(1, 1 << 63, size=num_perm, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64)
    return a[:, None], b[:, None]


def shingle_hashes(text: str, k: int) -> np.ndarray:
    """uint64 hashes of every character k-gram (the whole text when shorter than k); deterministic across processes."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(cps) == 0:
        return np.zeros(1, dtype=np.uint64)
    if len(cps) < k:
        k = len(cps)
    n = len(cps) - k + 1
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):  # polynomial hash of each window, wrapping mod 2^64
            h = h * _POLY + cps[j : j + n] + np.uint64(1)
    return np.unique(h)


def minhash(text: str, num_perm: int = 64, shingle: int = 5, seed: int = 0) -> np.ndarray:
    """MinHash signature (uint32[num_perm]) of the text's character shingles.

    The fraction of equal positions in two signatures estimates the Jaccard similarity of their shingle sets.
    """
    a, b = _permutations(num_perm, seed)
    h = shingle_hashes(text, shingle)
    with np.errstate(over="ignore"):
        return ((a * h[None, :] + b) >> np.uint64(32)).min(axis=1).astype(np.uint32)


def minhash_batch(texts: list[str], num_perm: int = 64, shingle: int = 5, seed: int = 0,
                  max_shingles: int = 1 << 13) -> np.ndarray:
    """uint32[len(texts), num_perm]: `minhash` of every text, equal to it row for row.

    One pass of numpy operations per group of texts instead of a dozen small ones per text: the
    texts' code points are concatenated, every k-gram hash is computed at once, windows that cross
    two texts are left out, and each permutation's minimum is taken per text with `reduceat`.
    Duplicate shingles need no `unique` (they cannot change a minimum), and the `>> 32` is applied
    after the minimum (a shift preserves order). A group holds at most `max_shingles` shingles, so
    the (num_perm, shingles) uint64 temporary stays in cache (4 MiB for 64 permutations): groups of
    2^13 shingles run twice as fast as groups of 2^17, whose temporaries go through memory.
    """
    a, b = _permutations(num_perm, seed)
    out = np.empty((len(texts), num_perm), dtype=np.uint32)
    cps = [np.frombuffer(t.encode("utf-32-le"), dtype=np.uint32) for t in texts]
    lens = np.fromiter((len(c) for c in cps), dtype=np.int64, count=len(cps))
    wins = np.maximum(lens - shingle + 1, 0)
    lo = 0
    while lo < len(texts):
        hi = lo + 1  # at least one text per group, however long
        total = wins[lo]
        while hi < len(texts) and total + wins[hi] <= max_shingles:
            total += wins[hi]
            hi += 1
        full = np.flatnonzero(wins[lo:hi] > 0) + lo  # texts shorter than one shingle go the per-text way
        if len(full):
            c = np.concatenate([cps[i] for i in full]).astype(np.uint64)
            n = len(c) - shingle + 1
            h = np.zeros(n, dtype=np.uint64)
            with np.errstate(over="ignore"):
                for j in range(shingle):  # the same polynomial hash as shingle_hashes
                    h = h * _POLY + c[j : j + n] + np.uint64(1)
            starts = np.concatenate([[0], np.cumsum(lens[full])[:-1]])
            w = wins[full]
            seg = np.concatenate([[0], np.cumsum(w)[:-1]])  # where each text's windows begin once gathered
            # Window positions inside each text: start_t .. start_t + wins_t - 1.
            h = h[np.arange(int(w.sum())) + np.repeat(starts - seg, w)]
            with np.errstate(over="ignore"):
                v = a * h[None, :]
                v += b
            mins = np.minimum.reduceat(v, seg, axis=1)
            out[full] = (mins >> np.uint64(32)).astype(np.uint32).T
        for i in range(lo, hi):
            if wins[i] == 0:
                out[i] = minhash(texts[i], num_perm, shingle, seed)
        lo = hi
    return out


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) whose S-curve 1-(1-s^r)^b rises through `threshold`.

    Picks the pair minimising the false-positive area below the threshold plus the false-negative area
    above it (as datasketch does); candidates are then verified against the signature, so false
    positives cost only time while false negatives are lost duplicates: misses weigh five times more.
    """
    s = np.linspace(0, 1, 201)
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1 - (1 - s**r) ** b
            fp = np.trapezoid(np.where(s < threshold, p, 0), s)
            fn = np.trapezoid(np.where(s >= threshold, 1 - p, 0), s)
            err = 0.2 * fp + fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[int]:
    """One int64 key per band of one signature: `band_keys_batch` of one row, in plain integers
    (a row at a time, a dozen numpy calls per band would cost more than the hashing)."""
    values, keys = sig.tolist(), []
    for i in range(bands):
        h = ((i + 1) * _MIX_INT) & _M64
        for v in values[i * rows : (i + 1) * rows]:
            h = ((h ^ v) * _MIX_INT) & _M64
            h ^= h >> 29
        keys.append((h >> 16) | (i << 48))
    return keys


_M64 = (1 << 64) - 1
_MIX_INT = 0x9E3779B97F4A7C15
_MIX = np.uint64(_MIX_INT)


def band_keys_batch(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """int64[n, bands]: per band, the band number in the top bits and a 48-bit hash of the band's
    slice of the signature below. `sigs`: uint32[n, num_perm].

    The hash folds the slice's values one at a time (multiply by an odd constant, xor-shift), on
    whole columns at once; two different slices share a key with probability about 2^-48, and a
    shared key only makes the rows candidates, which the signature comparison then verifies.
    """
    n = sigs.shape[0]
    keys = np.empty((n, bands), dtype=np.int64)
    with np.errstate(over="ignore"):
        for i in range(bands):
            h = np.full(n, np.uint64(i + 1) * _MIX, dtype=np.uint64)
            for j in range(i * rows, (i + 1) * rows):
                h = (h ^ sigs[:, j].astype(np.uint64)) * _MIX
                h ^= h >> np.uint64(29)
            keys[:, i] = ((h >> np.uint64(16)) | (np.uint64(i) << np.uint64(48))).astype(np.int64)
    return keys


def exact_key(row_id: str) -> int:
    return (EXACT_BAND << 48) | int(row_id[:12], 16)


def find_duplicates(keys: np.ndarray, uids: np.ndarray, sigs: np.ndarray | None, threshold: float,
                    max_keepers: int = 64, parts: int = 1) -> dict[int, str]:
    """{uid: 'exact' | 'near'} for the rows of one key group table that duplicate an earlier row.

    `keys`, `uids`: int64[n]; `sigs`: uint32[n, parts * num_perm] (None when only exact keys are
    present): `parts` signatures side by side (the row's, and its response's with `near_by: row`).
    For each key, rows are visited by uid: under the exact key every row after the first is a copy;
    under a band key a row is a near copy when every one of its signatures agrees with the same one
    of the first `max_keepers` kept rows in at least `threshold` of positions (the cap bounds
    pathological buckets, e.g. thousands of rows sharing boilerplate, to O(n * max_keepers)).
    """
    dups: dict[int, str] = {}
    order = np.lexsort((uids, keys))
    keys, uids = keys[order], uids[order]
    if sigs is not None:
        sigs = sigs[order]
    bounds = np.flatnonzero(np.diff(keys)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(keys)]):
        if hi - lo < 2:
            continue
        if (int(keys[lo]) >> 48) == EXACT_BAND:
            for u in uids[lo + 1 : hi]:
                dups[int(u)] = "exact"
            continue
        kept = [lo]
        for i in range(lo + 1, hi):
            if uids[i] == uids[i - 1]:
                continue
            agree = (sigs[kept] == sigs[i]).reshape(len(kept), parts, -1).mean(axis=2)  # [kept, parts]
            if (agree >= threshold).all(axis=1).any():
                dups.setdefault(int(uids[i]), "near")
            elif len(kept) < max_keepers:
                kept.append(i)
    return dups
