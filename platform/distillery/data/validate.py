"""Check that a parsed row has the fields its source's format needs, with the right types.

A row that fails gets a short machine-readable reason (`missing_field`, `wrong_type`,
`empty_text`, `not_an_object`) plus the field it is about; the caller sends it to quarantine.
"""

from __future__ import annotations

from typing import Any

from distillery.data.answers import METRICS

ROLES = ("system", "user", "assistant")


class Invalid(Exception):
    """A row that cannot be used: `reason` is the quarantine category, `detail` names the field."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _text(row: dict, field: str, required: bool = True) -> str | None:
    value = row.get(field)
    if value is None:
        if required:
            raise Invalid("missing_field", field)
        return None
    if not isinstance(value, str):
        raise Invalid("wrong_type", f"{field} is {type(value).__name__}, not a string")
    return value


def _messages(value: Any, answered: bool = True) -> list[dict]:
    """The {role, content} turns; `answered`: they must end with the assistant turn that is trained on."""
    if isinstance(value, str):  # CSV cells hold the list as JSON text
        import json

        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise Invalid("wrong_type", "messages is a string that is not a JSON list") from None
    if value is None:
        raise Invalid("missing_field", "messages")
    if not isinstance(value, list) or not value:
        raise Invalid("wrong_type", "messages must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise Invalid("wrong_type", f"messages.{i} must be {{role: str, content: str}}")
        if m["role"] not in ROLES:
            raise Invalid("wrong_type", f"messages.{i}.role '{m['role']}' is not one of {ROLES}")
        out.append({"role": m["role"], "content": m["content"]})
    if answered and out[-1]["role"] != "assistant":
        raise Invalid("wrong_type", "messages must end with an assistant turn (the response that is trained on)")
    return out


def validate(row: Any, fmt: str) -> dict:
    """The row's fields for `fmt` (instruction/input/output, text, or messages) plus label/metadata.

    Raises Invalid. Emptiness is checked after normalisation by the caller (`empty_text`).
    """
    if not isinstance(row, dict):
        raise Invalid("not_an_object", f"row is a JSON {type(row).__name__}, not an object")
    if fmt == "instruction":
        fields: dict[str, Any] = {"instruction": _text(row, "instruction"), "input": _text(row, "input", required=False) or "",
                                  "output": _text(row, "output")}
    elif fmt == "text":
        fields = {"text": _text(row, "text")}
    else:
        fields = {"messages": _messages(row.get("messages"))}
    fields["label"] = row.get("label")
    fields["metadata"] = row.get("metadata")
    return fields


def validate_prompt(row: Any, fmt: str) -> dict:
    """A prompt row for `distillery generate`: its prompt fields (`instruction` and `input` for
    instruction rows, else `messages` ending with a user turn), plus reference (str or None), task,
    metric (None when the row names none) and metadata.

    `prompts` rows are {prompt, reference?, task?, metric?}; `instruction` rows may lack `output`
    (when present it is the reference); `chat` rows end with a user turn, or with an assistant turn
    that is then the reference. Raises Invalid; emptiness is checked after normalisation.
    """
    if not isinstance(row, dict):
        raise Invalid("not_an_object", f"row is a JSON {type(row).__name__}, not an object")
    reference = _text(row, "reference", required=False)
    if fmt == "prompts":
        fields: dict[str, Any] = {"messages": [{"role": "user", "content": _text(row, "prompt")}]}
    elif fmt == "instruction":
        fields = {"instruction": _text(row, "instruction"), "input": _text(row, "input", required=False) or ""}
        output = _text(row, "output", required=False)
        if output is not None:
            if reference is not None:
                raise Invalid("wrong_type", "both output and reference are set: which one is the reference?")
            reference = output
    elif fmt == "chat":
        messages = _messages(row.get("messages"), answered=False)
        if messages[-1]["role"] == "assistant":
            if reference is not None:
                raise Invalid("wrong_type", "both a final assistant turn and reference are set: which one is the reference?")
            reference = messages.pop()["content"]
        if not messages or messages[-1]["role"] != "user":
            raise Invalid("wrong_type", "messages must end with the user turn the teacher answers (or that turn and an assistant reference)")
        fields = {"messages": messages}
    else:
        raise ValueError(f"format `{fmt}` holds no prompts")
    metric = _text(row, "metric", required=False)
    if metric is not None and metric not in METRICS:
        raise Invalid("wrong_type", f"metric '{metric}' is not one of {', '.join(METRICS)}")
    task = row.get("task")
    return {**fields, "reference": reference, "task": None if task is None else str(task), "metric": metric,
            "metadata": row.get("metadata")}
