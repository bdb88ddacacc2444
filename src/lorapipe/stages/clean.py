"""Stage `clean`: data/raw/*.jsonl -> data/clean/{train,eval,rejects}.jsonl + metrics/data.json.

Every line of every raw file ends up in exactly one place: train, eval, rejects with a reason, or
the `blank_lines` count (an empty or whitespace-only line holds no row). In order, a line is
  1. read (UTF-8 BOM, CRLF fine; invalid UTF-8 / invalid JSON / an ingest quarantine record -> rejected),
  2. validated as a ShareGPT row (core.sharegpt; `data.clean.strict`: the first unreadable or
     invalid row is an error naming file:line instead),
  3. given the optional `system_prompt`,
  4. checked against the reply rules of data/rules.yaml (each rule is a named reason),
  5. length-filtered: tokens of the row rendered with the base model's chat template > max_tokens
     -> `too_long` (ChatLength: bounds spare most rows the rendering and counting),
  6. deduplicated by a 16-byte fingerprint of its normalised user + assistant text: the first
     occurrence that survived 1-5 is kept, later ones are `duplicate` (naming the kept one),
  7. put in train or eval by a hash of its fingerprint and `data.split.salt`: adding rows never
     moves an existing row between train and eval.
A kept row in ingest's layout (keys messages, source, origin) is written as the line read, any
other (or one given the system prompt) is written again in that layout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from lorapipe.core import paths
from lorapipe.core.chatlength import ChatLength
from lorapipe.core.errors import LorapipeError
from lorapipe.core.io import atomic_path, dump_jsonl_line, write_json
from lorapipe.core.log import info, progress
from lorapipe.core.sharegpt import INVALID_REASONS, Invalid, fingerprint, normalise, validate_row
from lorapipe.core.yamlfile import read_yaml

METRICS_JSON = paths.METRICS_DIR / "data.json"

READ_REASONS = ("invalid_utf8", "invalid_json", "quarantined")
FILTER_REASONS = ("too_long", "duplicate")
# The keys of a row as ingest writes it: such a line is kept as read.
ROW_KEYS = frozenset(("messages", "source", "origin"))
CHUNK_LINES = 1024  # lines examined before one batched tokenizer call for the rows that need it


# ------------------------------------------------------------------------------------ reply rules
_HAS_CONTENT = re.compile(r"[^\W_]")  # a letter or digit in any script (CJK included); emoji are not
# The reply from its first to its last letter/digit: leading/trailing punctuation, emoji, spaces cut.
_CORE = re.compile(r"[^\W_](?:.*[^\W_])?", re.DOTALL)
_CHECKS = ("no_content", "min_chars", "full_match", "contains")


@dataclass(frozen=True)
class Rule:
    """One named reply check from the rules file; `name` is the reject reason."""

    name: str
    description: str = ""
    no_content: bool = False
    min_chars: int | None = None
    full_match: re.Pattern | None = None
    contains: tuple[re.Pattern, ...] = ()
    keywords: tuple[str, ...] | None = None  # every match holds one of these: other replies skip the regexes

    def first_rejected(self, replies: list[str]) -> str | None:
        """The first of the (normalised) replies this rule rejects, or None."""
        if self.keywords is not None and not any(map("\n".join(replies).__contains__, self.keywords)):
            return None  # (normalised text holds no newline)
        for r in replies:
            if self.no_content:
                rejected = _HAS_CONTENT.search(r) is None
            elif self.min_chars is not None:
                rejected = len(r) - r.count(" ") < self.min_chars
            elif self.full_match is not None:  # the whole reply, from its first to its last letter or digit
                core = _CORE.search(r)
                rejected = core is not None and self.full_match.fullmatch(core.group()) is not None
            else:
                rejected = any(rx.search(r) for rx in self.contains)
            if rejected:
                return r
        return None


def load_rules(path: str | Path) -> list[Rule]:
    """Parse and compile the rules file; any mistake is an error naming the file and the rule."""
    path = Path(path)
    doc = read_yaml(path, "rules file (params key data.clean.rules)")
    if not isinstance(doc, dict) or not isinstance(doc.get("rules"), list):
        raise LorapipeError(f"{path}: expected a mapping with a 'rules' list")
    reserved = set(READ_REASONS) | set(INVALID_REASONS) | set(FILTER_REASONS)
    rules: list[Rule] = []
    for i, spec in enumerate(doc["rules"]):
        where = f"{path}: rules[{i}]"
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise LorapipeError(f"{where}: each rule needs a 'name'")
        name = spec["name"]
        where = f"{where} ({name})"
        if name in reserved or name in {r.name for r in rules}:
            raise LorapipeError(f"{where}: name already used (reasons {', '.join(sorted(reserved))} are built in)")
        unknown = set(spec) - {"name", "description", "keywords", *_CHECKS}
        if unknown:
            raise LorapipeError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; a rule has name, description, "
                                f"one of {', '.join(_CHECKS)} and, with the last two, optional keywords")
        checks = [k for k in _CHECKS if k in spec]
        if len(checks) != 1:
            raise LorapipeError(f"{where}: needs exactly one of {', '.join(_CHECKS)}, has {len(checks)}")
        check, value = checks[0], spec[checks[0]]
        kwargs: dict[str, Any] = {"name": name, "description": str(spec.get("description", ""))}
        if check == "no_content" and value is not True:
            raise LorapipeError(f"{where}: no_content must be true")
        if check == "min_chars" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise LorapipeError(f"{where}: min_chars must be a positive integer")
        if check in ("full_match", "contains"):
            kwargs[check] = _patterns(value, f"{where}: {check}")
            if check == "full_match":  # one alternation of all patterns, matched against the whole reply
                kwargs[check] = re.compile("|".join(f"(?:{p.pattern})" for p in kwargs[check]))
        else:
            kwargs[check] = value
        if "keywords" in spec:
            if check not in ("full_match", "contains"):
                raise LorapipeError(f"{where}: keywords go with full_match or contains only")
            words = spec["keywords"]
            if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
                raise LorapipeError(f"{where}: keywords must be a non-empty list of strings")
            for j, word in enumerate(words):
                if normalise(word) != word:
                    raise LorapipeError(f"{where}: keywords[{j}] {word!r} never occurs in a normalised reply; write {normalise(word)!r}")
            kwargs["keywords"] = tuple(words)
        rules.append(Rule(**kwargs))
    return rules


def _patterns(value: Any, where: str) -> tuple[re.Pattern, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(p, str) and p for p in value):
        raise LorapipeError(f"{where} must be a non-empty list of regex strings")
    compiled = []
    for j, pattern in enumerate(value):
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise LorapipeError(f"{where}[{j}] is not a valid regex: {exc}") from None
    return tuple(compiled)


def first_broken_rule(rules: list[Rule], replies: list[str]) -> tuple[str, str] | None:
    """(rule name, offending reply) for the first rule that rejects any normalised reply, else None."""
    for rule in rules:
        reply = rule.first_rejected(replies)
        if reply is not None:
            return rule.name, reply
    return None


# ------------------------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class Settings:
    max_tokens: int = 2048
    strict: bool = False
    system_prompt: str | None = None
    eval_fraction: float = 0.05
    salt: str = "lorapipe"


@dataclass
class Counts:
    read: int = 0  # non-blank lines
    train: int = 0
    eval: int = 0
    rejected: int = 0
    blank_lines: int = 0  # empty or whitespace-only lines: no row

    def as_dict(self) -> dict:
        return {"read": self.read, "kept": self.train + self.eval, "train": self.train, "eval": self.eval,
                "rejected": self.rejected, "blank_lines": self.blank_lines}


@dataclass
class Report:
    """What metrics/data.json holds; `metrics()` checks first that nothing was lost."""

    sources: dict[str, Counts] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    token_counted: int = 0  # rows actually tokenized (the rest decided by a bound)

    def metrics(self) -> dict:
        total = Counts(*(sum(getattr(c, key) for c in self.sources.values()) for key in ("read", "train", "eval", "rejected", "blank_lines")))
        problems = [f"source {name}: read {c.read} != train {c.train} + eval {c.eval} + rejected {c.rejected}"
                    for name, c in self.sources.items() if c.read != c.train + c.eval + c.rejected]
        if sum(self.dropped.values()) != total.rejected:
            problems.append(f"dropped per reason sum to {sum(self.dropped.values())}, rejected is {total.rejected}")
        if problems:  # a bug in this stage, never bad input: fail rather than publish wrong counts
            raise RuntimeError("clean: row accounting does not add up: " + "; ".join(problems))
        return {**total.as_dict(), "dropped": dict(self.dropped), "token_counted": self.token_counted,
                "sources": {name: c.as_dict() for name, c in sorted(self.sources.items())}}


@dataclass
class Outputs:
    """The three open output files, in binary mode (a kept row is often the line as read)."""

    train: BinaryIO
    eval: BinaryIO
    rejects: BinaryIO


@dataclass(slots=True)
class Examined:
    """A non-blank line, as far as the line alone tells: rejected (`reason`) or a candidate."""

    lineno: int
    raw: bytes                   # the line as read (no line end, no BOM)
    row: Any = None              # its JSON value (None when unreadable)
    reason: str | None = None    # why it is rejected, else None
    detail: str = ""
    text: str | None = None      # the line's text when it is not a JSON value (kept in the reject record)
    fp: bytes = b""              # a candidate's fingerprint, split side and output line
    to_eval: bool = False
    line: bytes = b""
    rendered: str | None = None  # rows the upper bound does not clear: their rendering, its floor, its tokens
    floor: int = 0
    tokens: int = 0


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(number, line) of each line of a file, without its line end (LF or CRLF) or a leading BOM."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            yield lineno, (raw[3:] if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else raw).rstrip(b"\r\n")


def _dump(obj: Any) -> bytes:
    """One JSONL line as core.io writes them; a lone surrogate (from a JSON \\ud800 escape) is
    written as that escape again."""
    return dump_jsonl_line(obj).encode("utf-8", "backslashreplace")


class Cleaner:
    """The clean stage's core: stream raw files into train / eval / rejects and count everything."""

    def __init__(self, settings: Settings, length: ChatLength, rules: list[Rule]):
        self.s, self.length, self.rules = settings, length, rules
        self.report = Report(dropped={r: 0 for r in (*READ_REASONS, *INVALID_REASONS, *(r.name for r in rules), *FILTER_REASONS)})
        self._salt = settings.salt.encode("utf-8") + b"\x00"
        self._eval_cut = int(settings.eval_fraction * 2**64)
        self._seen: dict[bytes, tuple[str, int]] = {}  # fingerprint -> (file, line) of the row kept
        self._label = self._source = ""

    def clean_file(self, path: Path, out: Outputs, show_progress: bool = True) -> None:
        self._label, self._source = str(path), path.stem
        counts = self.report.sources.setdefault(self._source, Counts())
        lines = progress(_lines(path), desc=f"clean {path.name}", unit="lines") if show_progress else _lines(path)
        while chunk := list(islice(lines, CHUNK_LINES)):
            examined = [self.examine(lineno, raw) for lineno, raw in chunk if raw and not raw.isspace()]
            counts.blank_lines += len(chunk) - len(examined)
            # The rows neither bound decides: their tokens counted in one batched call.
            to_count = [e for e in examined if e.rendered is not None and e.floor <= self.s.max_tokens]
            for e, n in zip(to_count, self.length.count([e.rendered for e in to_count])):
                e.tokens = n
            self.report.token_counted += len(to_count)
            for e in examined:
                self._decide(e, out, counts)

    def examine(self, lineno: int, raw: bytes) -> Examined:
        """Steps 1-5 for one line (bar counting tokens), and its fingerprint, split side and output line."""
        e = Examined(lineno, raw)
        try:
            e.text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return self._reject(e, "invalid_utf8", f"invalid UTF-8 at byte {exc.start}", raw.decode("utf-8", "replace"))
        try:
            e.row = row = json.loads(e.text)
        except json.JSONDecodeError as exc:
            return self._reject(e, "invalid_json", f"invalid JSON: {exc.msg} (column {exc.colno})", e.text)
        if type(row) is dict and "messages" not in row and "error" in row:
            # ingest could not read this input and quarantined it: count it, keep its text.
            return self._reject(e, "quarantined", str(row["error"]))
        try:
            messages = validate_row(row)
        except Invalid as exc:
            return self._reject(e, exc.reason, exc.detail, e.text)
        verbatim = row.keys() == ROW_KEYS and type(row["source"]) is str and type(row["origin"]) is str
        if self.s.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.s.system_prompt}, *messages]
            verbatim = False
        roles, contents = tuple([m["role"] for m in messages]), [m["content"] for m in messages]
        start = 1 if roles[0] == "system" else 0  # then user, assistant, user, ..., assistant
        normalised = list(map(normalise, contents[start:]))
        broken = first_broken_rule(self.rules, normalised[1::2])
        if broken:
            return self._reject(e, broken[0], f"assistant reply {broken[1][:80]!r}")
        e.fp = fingerprint(zip(roles[start:], normalised))
        e.to_eval = int.from_bytes(hashlib.blake2b(self._salt + e.fp, digest_size=8).digest(), "big") < self._eval_cut
        if verbatim:
            e.line = raw + b"\n"
        else:
            e.line = _dump({"messages": messages, "source": row["source"] if isinstance(row.get("source"), str) else self._source,
                            "origin": row.get("origin") or f"{self._label}:{lineno}", **{k: v for k, v in row.items() if k not in ROW_KEYS}})
        bound = self.length.upper_bound(roles, contents)
        if bound is None or bound > self.s.max_tokens:  # rendered; counted unless its floor is too high
            try:
                e.rendered = self.length.render(messages)
            except Exception as exc:  # e.g. a template that raises on a system turn (jinja's raise_exception)
                raise LorapipeError(f"{self._label}:{lineno}: the base model's chat template cannot render this row: {exc}") from None
            e.floor = self.length.lower_bound(e.rendered)
        return e

    def _reject(self, e: Examined, reason: str, detail: str, text: str | None = None) -> Examined:
        if self.s.strict and (reason in READ_REASONS or reason in INVALID_REASONS):
            raise LorapipeError(f"{self._label}:{e.lineno}: {reason}: {detail} (data.clean.strict is true; set it to false to reject bad rows instead)")
        e.reason, e.detail, e.text = reason, detail, text
        return e

    def _decide(self, e: Examined, out: Outputs, counts: Counts) -> None:
        """Steps 5-7 in input order: too long, duplicate, or written to its side."""
        counts.read += 1
        if e.reason is None and e.rendered is not None:
            if e.floor > self.s.max_tokens:
                e.reason, e.detail = "too_long", f"at least {e.floor} tokens > max_tokens {self.s.max_tokens}"
            elif e.tokens > self.s.max_tokens:
                e.reason, e.detail = "too_long", f"{e.tokens} tokens > max_tokens {self.s.max_tokens}"
        if e.reason is None:
            place = (self._label, e.lineno)
            kept = self._seen.setdefault(e.fp, place)
            if kept is not place:
                e.reason, e.detail = "duplicate", f"same user+assistant text as {kept[0]}:{kept[1]}"
        if e.reason is None:
            (out.eval if e.to_eval else out.train).write(e.line)
            counts.eval += e.to_eval
            counts.train += not e.to_eval
            return
        # The reject record: the row as parsed, or the line's text when unreadable.
        row, at = e.row, f"{self._label}:{e.lineno}"
        record = {"reason": e.reason, "detail": e.detail,
                  "source": row.get("source") if isinstance(row, dict) and isinstance(row.get("source"), str) else self._source,
                  "at": at, "origin": (row.get("origin") if isinstance(row, dict) else None) or at}
        if e.reason == "quarantined":
            record["raw"] = row.get("raw")
        elif row is None:  # unreadable line (or a JSON null): keep its text as read
            record["raw"] = e.text
        else:
            record["row"] = row
        out.rejects.write(_dump(record))
        self.report.dropped[e.reason] += 1
        counts.rejected += 1


def clean_files(files: list[Path], out: Outputs, settings: Settings, length: ChatLength, rules: list[Rule], show_progress: bool = True) -> dict:
    """Clean `files` in order into `out`; return the metrics (accounting checked)."""
    cleaner = Cleaner(settings, length, rules)
    for path in files:
        cleaner.clean_file(path, out, show_progress=show_progress)
    return cleaner.report.metrics()


def run(params) -> dict:
    """The `lorapipe clean` stage; reads only params.data.clean and params.data.split.

    (`params` is a lorapipe.params.Params; not imported here so that editing other params sections'
    code does not make dvc rerun this stage.)
    """
    c, split = params.data.clean, params.data.split
    rules = load_rules(c.rules)
    if not paths.RAW_DIR.is_dir():
        raise LorapipeError(f"{paths.RAW_DIR}/ not found: run `lorapipe ingest` first")
    files = sorted(paths.RAW_DIR.glob("*.jsonl"))
    if not files:
        raise LorapipeError(f"{paths.RAW_DIR}/ has no .jsonl files: run `lorapipe ingest` first")
    length = ChatLength(paths.BASE_DIR)
    settings = Settings(max_tokens=c.max_tokens, strict=c.strict, system_prompt=c.system_prompt,
                        eval_fraction=split.eval_fraction, salt=split.salt)
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(open(stack.enter_context(atomic_path(final)), "wb"))
                   for final in (paths.TRAIN_JSONL, paths.EVAL_JSONL, paths.REJECTS_JSONL)]
        metrics = clean_files(files, Outputs(*handles), settings, length, rules)
    write_json(METRICS_JSON, metrics)
    if metrics["kept"] == 0:
        info(f"warning: no row survived cleaning; see {paths.REJECTS_JSONL}")
    return {key: metrics[key] for key in ("read", "kept", "train", "eval", "rejected")}
