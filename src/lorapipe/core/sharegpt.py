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
from itertools import chain, islice
from operator import itemgetter
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


_ROLE, _CONTENT = itemgetter("role"), itemgetter("content")


def checked_turns(row: Any) -> tuple[tuple[str, ...], list[str]]:
    """The roles and contents of a valid ShareGPT row (as validate_row decides), else raise Invalid.

    The fast path for clean's hot loop: a well-formed row is recognised with a few C-level calls
    (one lookup of its role sequence, one join of its contents); anything unusual goes through
    validate_row, which finds the exact reason.
    """
    try:
        turns = _fast_turns(row["messages"], two_keys=False)
    except (TypeError, KeyError):
        turns = None
    if turns is not None:
        return turns
    messages = validate_row(row)  # raises Invalid with the reason; returns only if the fast path was too cautious
    return tuple(m["role"] for m in messages), [m["content"] for m in messages]


def plain_turns(messages: Any, *, from_orjson: bool = False) -> tuple[tuple[str, ...], list[str]] | None:
    """(roles, contents) of valid `messages` made of exactly a role and a content each, else None.

    None says nothing about validity: the caller validates such messages the slow way. A valid
    list of plain messages holds strings only, which lets clean trust a faster JSON parser's value.
    from_orjson: the messages were parsed by orjson, which rejects lone surrogate escapes, so the
    (costly) check that every content is encodable text is skipped.
    """
    try:
        return _fast_turns(messages, two_keys=True, encodable=from_orjson)
    except (TypeError, KeyError):
        return None


def _fast_turns(messages: Any, two_keys: bool, encodable: bool = False) -> tuple[tuple[str, ...], list[str]] | None:
    """(roles, contents) if `messages` is certainly valid, else None or TypeError/KeyError."""
    roles = tuple(map(_ROLE, messages))  # TypeError: not a list of dicts; KeyError: no role
    contents = list(map(_CONTENT, messages))
    joined = "\x00".join(contents)  # TypeError: a content that is not a string
    if two_keys and sum(map(len, messages)) != 2 * len(contents):
        return None
    if (_role_sequence_ok(roles) and "" not in contents and not any(map(str.isspace, contents))
            and (encodable or joined.isascii() or _encodable(joined))):  # (an unhashable role: TypeError in the lookup)
        return roles, contents
    return None


def plain_turns_many(messages_lists: list, *, from_orjson: bool = False) -> list[tuple[tuple[str, ...], list[str]] | None]:
    """[plain_turns(m, from_orjson=...) for m in messages_lists], checked all at once when all are
    plain and valid (the usual case): each check is one C-level pass over all messages of all
    lists instead of a few Python calls per list. Anything unusual: one plain_turns call per list.
    """
    try:
        if set(map(type, messages_lists)) != {list}:
            raise TypeError
        counts = list(map(len, messages_lists))
        messages = list(chain.from_iterable(messages_lists))
        if set(map(type, messages)) != {dict} or set(map(len, messages)) != {2}:
            raise TypeError
        roles = list(map(_ROLE, messages))
        contents = list(map(_CONTENT, messages))
        joined = "".join(contents)  # TypeError: a content that is not a string
        if "" in contents or any(map(str.isspace, contents)) or not (from_orjson or joined.isascii() or _encodable(joined)):
            raise TypeError
        role_iter, content_iter = iter(roles), iter(contents)
        role_seqs = [tuple(islice(role_iter, n)) for n in counts]  # TypeError: an unhashable role
        if not all(map(_role_sequence_ok, role_seqs)):
            raise TypeError
        return [(seq, list(islice(content_iter, n))) for seq, n in zip(role_seqs, counts)]
    except (TypeError, KeyError):
        return [plain_turns(m, from_orjson=from_orjson) for m in messages_lists]


# Role sequences already checked (True = well ordered). Bounded: one entry per distinct dialogue shape.
_ROLE_SEQUENCES: dict[tuple, bool] = {}


def _role_sequence_ok(roles: tuple) -> bool:
    ok = _ROLE_SEQUENCES.get(roles)
    if ok is None:
        try:
            validate_messages([{"role": r, "content": "x"} for r in roles])
            ok = True
        except Invalid:
            ok = False
        if len(_ROLE_SEQUENCES) < 4096:
            _ROLE_SEQUENCES[roles] = ok
    return ok


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # a lone surrogate
        return False


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


# Full-width forms (，？！Ａ１) and the ideographic space, common in Chinese text, with their NFKC mapping.
_FULLWIDTH = {chr(c): chr(c - 0xFEE0) for c in range(0xFF01, 0xFF5F)} | {"\u3000": " "}
_FULLWIDTH_CHAR = re.compile("[\uff01-\uff5e\u3000]")


def _fold_fullwidth(text: str) -> str:
    """text with its full-width forms mapped as NFKC maps them.

    One str.replace per distinct full-width character present (one or two in typical text) instead
    of str.translate, which costs a dict lookup per character of non-ASCII text (~10x slower here).
    Each search resumes where the last one stopped: nothing before it is full-width any more.
    """
    found = _FULLWIDTH_CHAR.search(text)
    while found is not None:
        char = found.group()
        text = text.replace(char, _FULLWIDTH[char])
        found = _FULLWIDTH_CHAR.search(text, found.start())
    return text


def normalise(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed: 'Ｈｅｌｌｏ\n  World' and 'hello world' are one text.

    NFKC folds full-width forms (common in Chinese text) and compatibility characters; casefold is
    the Unicode-correct lower-casing; split/join collapses every kind of whitespace run to one space.
    """
    return _collapse_whitespace(_nfkc_casefold(text))


def normalise_many(texts: list[str]) -> list[str]:
    """[normalise(t) for t in texts], with one NFKC/casefold pass over the joined texts (faster).

    NUL is the joint: NFKC and casefold leave it alone and nothing composes across it. A text that
    itself contains NUL falls back to one call per text. The clean stage passes all the texts of a
    block of rows at once, so the costs per call are paid once per block, not once per row.
    """
    joined = "\x00".join(texts)
    if joined.count("\x00") != len(texts) - 1:
        return [normalise(t) for t in texts]
    if joined.isascii():
        folded = [joined.lower()]
        parts = folded[0].split("\x00")
    else:
        # ASCII texts only need lower(), far cheaper than casefold over non-ASCII text: fold the
        # two kinds apart, then put the texts back in order.
        is_ascii = list(map(str.isascii, texts))
        folded = ["\x00".join([t for t, a in zip(texts, is_ascii) if a]).lower(),
                  _nfkc_casefold("\x00".join([t for t, a in zip(texts, is_ascii) if not a]))]
        ascii_texts, other_texts = (iter(f.split("\x00")) for f in folded)
        parts = [next(ascii_texts) if a else next(other_texts) for a in is_ascii]
    # Whitespace collapsing changes nothing in most texts: checked over the joined texts at once
    # (no double space, no space at either end of a text, nothing but the space among whitespace).
    if not all(map(_collapsed_joined, folded)) or not all(map(str.isprintable, parts)):
        return list(map(_collapse_whitespace, parts))
    return parts


def _collapsed_joined(joined: str) -> bool:
    """No NUL-joined text in `joined` has a double space or a space at either end."""
    return "  " not in joined and " \x00" not in joined and "\x00 " not in joined and joined[:1] != " " and joined[-1:] != " "


def _nfkc_casefold(text: str) -> str:
    if text.isascii():
        return text.lower()  # NFKC is the identity on ASCII, and casefold is lower
    if not unicodedata.is_normalized("NFKC", text):  # a quick check, true for most text
        # Full-width forms are what makes most Chinese text non-NFKC: map them first (NFKC's own
        # mapping, so the result is identical), then the costly full normalisation is usually skipped.
        text = _fold_fullwidth(text)
        if not unicodedata.is_normalized("NFKC", text):
            text = unicodedata.normalize("NFKC", text)
    return text.casefold()


def _collapse_whitespace(text: str) -> str:
    # Every character str.split() splits at is non-printable, except the space itself: so a
    # printable text without leading, trailing or double spaces is unchanged by split/join, and
    # checking that costs a fraction of splitting it into words.
    if text.isprintable() and "  " not in text and text[:1] != " " and text[-1:] != " ":
        return text
    return " ".join(text.split())


def fingerprint(normalised_turns: Iterable[tuple[str, str]]) -> bytes:
    """16-byte BLAKE2b of the normalised user + assistant turns (system turns excluded, like the seed).

    A fixed-size digest keeps dedupe memory proportional to the number of unique rows, not to their
    text. Turns are joined with control characters that normalised text cannot contain as separators
    (whitespace is collapsed to spaces), so ("ab", "c") and ("a", "bc") differ.
    """
    # Each turn is 'u' / 'a', its text, then \x1e; built as one string and hashed in one call.
    data = "".join([f"{role[0]}{text}\x1e" for role, text in normalised_turns if role != "system"])
    return hashlib.blake2b(data.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def dialogue_fingerprint(normalised: list[str]) -> bytes:
    """fingerprint() of normalised user, assistant, user, ... turns (no system turn), built faster:
    one %-format of the whole dialogue instead of a string per turn."""
    data = ("u%s\x1ea%s\x1e" * (len(normalised) // 2)) % tuple(normalised)
    return hashlib.blake2b(data.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def dialogue_fingerprints(normalised: list[str], ends: list[int]) -> list[bytes]:
    """[dialogue_fingerprint(normalised[start:end]) for each dialogue], dialogue k being the turns
    before ends[k] (after the previous one): one %-format and one UTF-8 encoding for all of them.

    The dialogues are cut apart again at \\x1d, which normalised text cannot contain (str.split()
    splits at it: whitespace collapsing removes it), like the \\x1e that ends each turn.
    """
    pairs, start = [], 0
    for end in ends:
        pairs.append((end - start) // 2)
        start = end
    template = "".join([_TURN_PAIRS[n] if n < len(_TURN_PAIRS) else "u%s\x1ea%s\x1e" * n + "\x1d" for n in pairs])
    data = (template % tuple(normalised)).encode("utf-8", "surrogatepass").split(b"\x1d")
    blake2b = hashlib.blake2b
    return [blake2b(d, digest_size=16).digest() for d in data[:-1]]


_TURN_PAIRS = ["u%s\x1ea%s\x1e" * n + "\x1d" for n in range(16)]  # the template of a dialogue of n turn pairs
