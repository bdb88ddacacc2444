"""The ShareGPT row: structural validation, text normalisation and the dedupe fingerprint.

A row is `{"messages": [{"role": ..., "content": ...}, ...], "source": ...}`: an optional system turn
first, then user/assistant alternating starting with user, the last turn assistant, every content a
non-empty, non-whitespace string. `clean` uses this to validate raw rows; `train` (or anything else
that reads data/clean/) can use `validate_row` to check its input with the same rules and reasons.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any, Iterable

ROLES = ("system", "user", "assistant")

# Reasons a row is structurally invalid, as written to rejects.jsonl and counted in metrics/data.json.
INVALID_REASONS = (
    "not_an_object",        # the JSON line is an array, string, number, ...
    "missing_messages",     # no `messages` key
    "messages_not_a_list",
    "empty_messages",
    "bad_message",          # a message that is not an object with `role` and `content`
    "unknown_role",         # role not in system|user|assistant
    "system_not_first",
    "first_not_user",       # after the optional system turn, the dialogue must open with user
    "not_alternating",      # two user or two assistant turns in a row
    "last_not_assistant",
    "content_not_string",
    "empty_content",        # empty or whitespace-only content
    "invalid_unicode",      # content with a lone surrogate (a JSON "\\ud800" escape): not encodable text
)


class Invalid(Exception):
    """A row that breaks the ShareGPT contract: `reason` is one of INVALID_REASONS, `detail` says where."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def validate_row(row: Any) -> list[dict]:
    """Return the row's messages if the row is a valid ShareGPT row, else raise Invalid."""
    if not isinstance(row, dict):
        raise Invalid("not_an_object", f"expected a JSON object, got a JSON {_json_type(row)}")
    if "messages" not in row:
        raise Invalid("missing_messages", f"no 'messages' key (keys: {', '.join(sorted(map(str, row))) or 'none'})")
    messages = row["messages"]
    validate_messages(messages)
    return messages


def validate_messages(messages: Any) -> None:
    """Raise Invalid unless `messages` is a non-empty, well-ordered list of role/content turns."""
    if not isinstance(messages, list):
        raise Invalid("messages_not_a_list", f"'messages' is a JSON {_json_type(messages)}")
    if not messages:
        raise Invalid("empty_messages", "'messages' is an empty list")
    expected = "user"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise Invalid("bad_message", f"messages[{i}] is not an object with 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise Invalid("unknown_role", f"messages[{i}] has role {role!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise Invalid("content_not_string", f"messages[{i}] content is a JSON {_json_type(content)}")
        if not content or content.isspace():
            raise Invalid("empty_content", f"messages[{i}] ({role}) has empty or whitespace-only content")
        if not content.isascii():
            try:
                content.encode("utf-8")
            except UnicodeEncodeError:
                raise Invalid("invalid_unicode", f"messages[{i}] content has a lone surrogate escape") from None
        if role == "system":
            if i != 0:
                raise Invalid("system_not_first", f"messages[{i}] is a system turn; only the first turn may be")
            continue
        if role != expected:
            if expected == "user" and i == (1 if messages[0]["role"] == "system" else 0):
                raise Invalid("first_not_user", f"messages[{i}] is {role}; the dialogue must start with user")
            raise Invalid("not_alternating", f"messages[{i}] is a second {role} turn in a row")
        expected = "assistant" if role == "user" else "user"
    if messages[-1]["role"] != "assistant":
        raise Invalid("last_not_assistant", f"the last turn is {messages[-1]['role']}, not assistant")


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__
    )


def normalise(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed: 'Ｈｅｌｌｏ\n  World' and 'hello world' are one text.

    NFKC folds full-width forms (common in Chinese text) and compatibility characters; casefold is
    the Unicode-correct lower-casing; split/join collapses every kind of whitespace run to one space.
    """
    if text.isascii():  # NFKC is the identity on ASCII, and casefold is lower: the same, faster
        return _collapse_whitespace(text.lower())
    if not unicodedata.is_normalized("NFKC", text):  # a quick check, true for most text
        # Full-width forms are what makes most Chinese text non-NFKC: mapped first (as NFKC maps
        # them, one str.replace per distinct character), the full normalisation is usually skipped.
        for char in set(_FULLWIDTH.findall(text)):
            text = text.replace(char, unicodedata.normalize("NFKC", char))
        if not unicodedata.is_normalized("NFKC", text):
            text = unicodedata.normalize("NFKC", text)
    return _collapse_whitespace(text.casefold())


def _collapse_whitespace(text: str) -> str:
    # Every character str.split() splits at is non-printable, except the space itself: a printable
    # text without leading, trailing or double spaces is unchanged, and checking that is cheaper.
    if text.isprintable() and "  " not in text and text[:1] != " " and text[-1:] != " ":
        return text
    return " ".join(text.split())


_FULLWIDTH = re.compile("[\uff01-\uff5e\u3000]")  # full-width forms (，？！Ａ１) and the ideographic space


def fingerprint(normalised_turns: Iterable[tuple[str, str]]) -> bytes:
    """16-byte BLAKE2b of the normalised user + assistant turns (system turns excluded, like the seed).

    A fixed-size digest keeps dedupe memory proportional to the number of unique rows, not to their
    text. Each turn is 'u' / 'a', its text, then \\x1e, a control character that normalised text
    cannot contain (whitespace collapsing removes it), so ("ab", "c") and ("a", "bc") differ.
    """
    data = "".join([f"{role[0]}{text}\x1e" for role, text in normalised_turns if role != "system"])
    return hashlib.blake2b(data.encode("utf-8", "surrogatepass"), digest_size=16).digest()
