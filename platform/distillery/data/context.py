"""The settings the driver hands to the tasks of `prepare`'s passes (through `fn_kwargs`).

Frozen dataclasses of plain values, numpy arrays and config sections: Ray pickles them into
every task, and no task can change what another one sees.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from distillery.config import DedupeConfig, WindowConfig


@dataclass(frozen=True)
class IngestContext:
    """What pass 1 (ingest) needs, and what the later passes share with it."""

    tokenizer: str
    """Path of the tokenizer (`model.tokenizer` or `model.path`); each task loads it itself."""
    chat_template: str | None
    """`data.chat_template`: a Jinja template to render with instead of the tokenizer's own."""
    seed: int
    """The top-level seed: MinHash permutations, the mix and the split are derived from it."""
    tmp: str
    """The temporary output directory (`<data.prepared>.tmp-<pid>`) every task writes under."""
    min_length: int
    """`data.min_length`: rows with fewer tokens are dropped at ingest."""
    max_length: int
    """`data.max_length`: tokens per written row (truncation, windows, packing)."""
    window: WindowConfig | None
    """`data.window`: sliding windows for long plain-text rows, or None to truncate them."""
    packing: bool
    """`data.packing`: pack short rows together up to `max_length`."""
    dedupe: DedupeConfig
    """`data.dedupe`: which dedupe keys ingest computes (exact, MinHash near) and how."""
    buckets: int
    """Number of key buckets the dedupe keys are spread over (one pass-2 task each)."""
    keep_messages: bool
    """Stage each row's messages as JSON: only augmented copies are made from them."""
    count_labels: bool
    """Count kept rows per class (`data.balance.by: label`) in the stats."""


@dataclass(frozen=True)
class SynonymSettings:
    """Synonym replacement as the finalise tasks apply it."""

    groups: list[list[str]]
    """The synonym groups read from `data.augment.synonyms.path` (any term may replace another)."""
    probability: float
    """Chance that each matched term in a row is replaced."""


@dataclass(frozen=True)
class AugmentSettings:
    """How augmented copies of training rows are made (synonyms and clause reordering)."""

    copies: int
    """Augmented copies per training row (0: none)."""
    seed: int
    """`data.augment.seed`, or the top-level seed when that is unset."""
    synonyms: SynonymSettings | None
    """Synonym replacement, or None when off."""
    reorder: float | None
    """Chance that a row's clauses are reordered, or None when off."""


@dataclass(frozen=True)
class FinalizeContext(IngestContext):
    """What pass 3 (finalise, and the back-translation branch) needs: the ingest settings plus
    the outcome of dedupe and mixing."""

    dups: np.ndarray
    """Sorted int64 uids of the rows dedupe removed."""
    rates: dict[str, float]
    """{source: rows written per row it has} that bring each source to its mix weight."""
    balance_by: str | None
    """`data.balance.by` (label or source), or None: training rows are also scaled by `balance`."""
    balance: dict[str, float]
    """{label or source: factor on the mix rate of its training rows} that balances the training split."""
    val_fraction: float
    """`data.val_fraction`: share of rows the split hash sends to val."""
    test_fraction: float
    """`data.test_fraction`: share of rows the split hash sends to test."""
    augment: AugmentSettings
    """How augmented copies of training rows are made."""
    bt_probability: float
    """Share of training rows sent through back-translation (0.0 when it is off)."""

    @classmethod
    def extending(cls, ingest: IngestContext, **more) -> FinalizeContext:
        """The ingest settings as they were, plus the finalise-only fields in `more`."""
        return cls(**{f.name: getattr(ingest, f.name) for f in dataclasses.fields(IngestContext)}, **more)
