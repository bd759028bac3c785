"""Normalise text (Unicode NFC, whitespace) and render rows into one prompt/response shape.

Instruction and chat rows go through the tokenizer's chat template (or `data.chat_template`),
so every later stage sees the same two strings: `prompt` (not trained on) and `response`.
"""

from __future__ import annotations

import re
import unicodedata

_HSPACE = re.compile(r"[ \t\f\v\u00a0\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """NFC, Windows/Mac newlines to \\n, runs of spaces/tabs to one space, at most one blank line, stripped.

    Single newlines are kept: they carry structure (lists, code, the instruction/input boundary).
    Full-width spaces (U+3000) become ASCII spaces, as Chinese text copied from documents often has them.
    """
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _HSPACE.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def normalize_fields(fields: dict, fmt: str) -> dict:
    """The same fields with every text normalised; raises validate.Invalid(`empty_text`) on empty content."""
    from distillery.data.validate import Invalid

    out = dict(fields)
    if fmt == "instruction":
        for k in ("instruction", "input", "output"):
            out[k] = normalize_text(fields[k])
        for k in ("instruction", "output"):
            if not out[k]:
                raise Invalid("empty_text", k)
    elif fmt == "text":
        out["text"] = normalize_text(fields["text"])
        if not out["text"]:
            raise Invalid("empty_text", "text")
    else:
        out["messages"] = [{"role": m["role"], "content": normalize_text(m["content"])} for m in fields["messages"]]
        if not out["messages"][-1]["content"]:
            raise Invalid("empty_text", f"messages.{len(out['messages']) - 1}.content")
    return out


def to_messages(fields: dict, fmt: str) -> list[dict] | None:
    """The conversation a row stands for; None for plain text. Instruction + input join with a newline."""
    if fmt == "instruction":
        user = fields["instruction"] + ("\n" + fields["input"] if fields["input"] else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": fields["output"]}]
    if fmt == "chat":
        return fields["messages"]
    return None


def render(messages: list[dict] | None, text: str | None, tokenizer, chat_template: str | None = None) -> tuple[str, str]:
    """(prompt, response): the chat template up to the last assistant turn, and that turn's rendering.

    The response is the full conversation's rendering minus the prompt, so it carries the template's
    end-of-turn markup (e.g. ChatML's `<|im_end|>\\n`) and the model learns to stop. Plain text has
    an empty prompt. Templates whose full rendering does not start with the prompt are refused.
    """
    if messages is None:
        return "", text or ""
    kw = {"chat_template": chat_template} if chat_template else {}
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True, **kw)
    full = tokenizer.apply_chat_template(messages, tokenize=False, **kw)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the conversation differently from its prompt; cannot split off the response")
    return prompt, full[len(prompt):]


def dedupe_texts(messages: list[dict] | None, text: str | None) -> tuple[str, str]:
    """(prompt, response) contents without template markup, for near-dedupe: the response is the
    final assistant message (empty when the row ends otherwise); a plain-text row is both."""
    if messages is None:
        return text or "", text or ""
    if messages and messages[-1].get("role") == "assistant":
        return "\n".join(m["content"] for m in messages[:-1]), messages[-1]["content"]
    return "\n".join(m["content"] for m in messages), ""


def content_text(messages: list[dict] | None, text: str | None) -> str:
    """The row's content without template markup: what dedupe compares (markup would make all rows alike)."""
    if messages is None:
        return text or ""
    return "\n".join(m["content"] for m in messages)
