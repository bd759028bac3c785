"""Check that a parsed row has the fields its source's format needs, with the right types.

A row that fails gets a short machine-readable reason (`missing_field`, `wrong_type`,
`empty_text`, `not_an_object`) plus the field it is about; the caller sends it to quarantine.
"""

from __future__ import annotations

from typing import Any

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


def _messages(value: Any) -> list[dict]:
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
    if out[-1]["role"] != "assistant":
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
