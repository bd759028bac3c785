"""Contamination check: which eval prompts occur word for word in the training split of the prepared data.

Prompts are compared by content, the user text without chat-template markup, after
`data.normalize.normalize_text` (what prepare applies to every row), so an eval prompt that differs
from a training prompt only in spacing or Unicode form still counts. Prepared rows store `prompt`
rendered through the chat template prepare used (the manifest's `tokenizer`, and `data.chat_template`
in the manifest's config); the markup that template puts around one user turn is found by rendering a
marker through it, and stripped. A prompt of another shape (several turns, a system message of the
corpus's own) keeps its markup, so it matches only an identical rendering. Augmented training rows
count like original ones: the model saw their prompts too.

The training split may be large: it is streamed (prompt column only, one record batch at a time)
and compared against the set of eval contents, which is the small side.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from typing import Any

from distillery.data.normalize import normalize_text
from distillery.evaluation.metrics import Example

# A user turn that no template or corpus text contains, to find where a template puts the content.
_MARKER = "\ue000distillery-prompt\ue000"
_BATCH_ROWS = 8192


@dataclass
class Contamination:
    """The check's outcome for one eval set: a flag per example, or the reason it did not run."""

    prepared: str
    checked: bool
    reason: str = ""  # why the check did not run
    flags: list[bool] = field(default_factory=list)  # per example, in eval order; empty when not checked
    tasks: list[str] = field(default_factory=list)  # per example
    train_prompts: int = 0  # training rows compared

    @property
    def count(self) -> int:
        return sum(self.flags)

    def flag(self, i: int) -> bool | None:
        """Example `i`'s flag; None when the check did not run (unknown, not clean)."""
        return self.flags[i] if self.checked else None

    def summary(self) -> dict[str, Any]:
        """What metrics.json records: count, fraction and per-task counts, or why the check did not run."""
        if not self.checked:
            return {"checked": False, "prepared": self.prepared, "reason": self.reason}
        per_task: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"examples": 0, "contaminated": 0})
        for task, hit in zip(self.tasks, self.flags):
            per_task[task]["examples"] += 1
            per_task[task]["contaminated"] += int(hit)
        return {
            "checked": True, "prepared": self.prepared, "train_prompts": self.train_prompts,
            "examples": len(self.flags), "contaminated": self.count,
            "fraction": self.count / len(self.flags) if self.flags else 0.0,
            "per_task": {t: per_task[t] for t in sorted(per_task)},
        }

    def message(self) -> str:
        """The line `distillery eval` prints."""
        if not self.checked:
            return f"eval: contamination check not run: {self.reason}"
        n = len(self.flags)
        if self.count:
            return (f"eval: WARNING: {self.count} of {n} eval prompts ({100 * self.count / n:.1f}%) occur in the training "
                    f"split of {self.prepared}; scores on them are not held-out")
        return f"eval: contamination check: none of {n} eval prompts occur in the training split of {self.prepared}"


def template_markup(tokenizer, chat_template: str | None = None) -> tuple[str, str] | None:
    """(text before, text after) the content of one user turn rendered with the generation prompt;
    None when the tokenizer has no chat template or the template does not keep the content whole."""
    if not (chat_template or getattr(tokenizer, "chat_template", None)):
        return None
    kw = {"chat_template": chat_template} if chat_template else {}
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARKER}], tokenize=False, add_generation_prompt=True, **kw)
    if text.count(_MARKER) != 1:
        return None
    before, after = text.split(_MARKER)
    return before, after


def prompt_content(prompt: str, markup: tuple[str, str] | None) -> str:
    """The normalised user text of a prompt: `markup` stripped where the prompt is exactly one templated user turn."""
    if markup is not None:
        before, after = markup
        if len(prompt) >= len(before) + len(after) and prompt.startswith(before) and prompt.endswith(after):
            prompt = prompt[len(before) : len(prompt) - len(after)]
    return normalize_text(prompt)


def _prepared_markup(manifest: dict, fallback_tokenizer) -> tuple[str, str] | None:
    """The markup of the template prepare rendered with: its own tokenizer where that still loads, else the eval's."""
    from distillery.models.load import load_tokenizer

    chat_template = (manifest.get("config") or {}).get("data", {}).get("chat_template")
    tokenizer = fallback_tokenizer
    path = manifest.get("tokenizer")
    if path and os.path.exists(path):
        try:
            tokenizer = load_tokenizer(path)
        except (OSError, ValueError):  # no longer a tokenizer there: the eval models were trained on this data, with its template
            pass
    return template_markup(tokenizer, chat_template)


def check_contamination(examples: list[Example], prepared: str, tokenizer) -> Contamination:
    """Flag the examples whose prompt content occurs in `prepared`'s training split.

    `tokenizer` renders the template when the manifest's tokenizer cannot be loaded. Returns an
    unchecked result, with the reason, when there is no prepared manifest or training split.
    """
    import pyarrow.parquet as pq

    from distillery.data.splits import MANIFEST, load_manifest, split_dir

    d = split_dir(prepared, "train")
    files = sorted(f for f in os.listdir(d) if f.endswith(".parquet")) if os.path.isdir(d) else []
    if not os.path.isfile(os.path.join(prepared, MANIFEST)) or not files:
        return Contamination(prepared, checked=False, reason=f"no prepared training split at {d} (data.prepared)")
    markup = _prepared_markup(load_manifest(prepared), tokenizer)
    wanted = [prompt_content(e.prompt, markup) if e.rendered else normalize_text(e.prompt) for e in examples]
    pending, found, n_train = set(wanted), set(), 0
    for name in files:
        pf = pq.ParquetFile(os.path.join(d, name))
        n_train += pf.metadata.num_rows
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=["prompt"]) if pending else ():
            for p in batch.column(0).to_pylist():
                if not p:  # plain-text rows have no prompt: nothing an eval prompt could repeat
                    continue
                content = prompt_content(p, markup)
                if content in pending:
                    pending.discard(content)
                    found.add(content)
            if not pending:  # every eval prompt is found: the rest of the split cannot change a flag
                break
    return Contamination(prepared, checked=True, flags=[w in found for w in wanted], tasks=[e.task for e in examples],
                         train_prompts=n_train)
