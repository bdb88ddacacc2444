"""Stage `clean`: data/raw/*.jsonl -> data/clean/{train,eval,rejects}.jsonl + metrics/data.json.

Every line of every raw file ends up in exactly one place: train, eval, or rejects with a reason.
In order, a line is
  1. read (invalid UTF-8 / invalid JSON / an ingest quarantine record -> rejected),
  2. validated as a ShareGPT row (core.sharegpt; `data.clean.strict` turns the first invalid row into
     an error naming file:line instead),
  3. given the optional `system_prompt`,
  4. checked against the reply rules of data/rules.yaml (each rule is a named reason),
  5. length-filtered: tokens of the row rendered with the base model's chat template > max_tokens
     -> `too_long`,
  6. deduplicated by a 16-byte fingerprint of its normalised user + assistant text: the first
     occurrence that survived 1-5 is kept, later ones are `duplicate` (naming the kept one),
  7. put in train or eval by a hash of its fingerprint and `data.split.salt`, so a row's side never
     depends on other rows: adding data never moves an existing row between train and eval.

Speed (benchmarks/clean_throughput.py): rows are streamed in batches and only the decisions that
need a tokenizer wait for the batch. Most rows never need tokenizing, exactly: every token covers at
least one byte of the (tokenizer-normalised) text, so a row whose contents plus the template's own
bytes fit in `max_tokens` cannot be too long (ChatLength.upper_bound); and a row with more words or
CJK ideographs than tokens allow cannot fit (ChatLength.lower_bound). Rows between the two are
rendered with the compiled chat template and counted in one batched call of the fast tokenizer;
every 997th row decided by a bound is counted too, and a bound that fails stops the stage.
Memory holds one batch plus a 16-byte fingerprint per kept row.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from lorapipe.core import paths
from lorapipe.core.errors import LorapipeError
from lorapipe.core.io import atomic_path, dump_jsonl_line, iter_jsonl, write_json
from lorapipe.core.log import info, progress
from lorapipe.core.sharegpt import INVALID_REASONS, Invalid, fingerprint, normalise_many, validate_row

METRICS_JSON = paths.METRICS_DIR / "data.json"

READ_REASONS = ("invalid_utf8", "invalid_json", "quarantined")
FILTER_REASONS = ("too_long", "duplicate")
# The row keys a kept row is written with; a raw line with exactly these keys is copied verbatim.
ROW_KEYS = frozenset(("messages", "source", "origin"))


# ------------------------------------------------------------------------------------ reply rules
_HAS_CONTENT = re.compile(r"[^\W_]")  # a letter or digit in any script (CJK included); emoji are not
# The reply from its first to its last letter/digit: leading/trailing punctuation, emoji, spaces cut.
_CORE = re.compile(r"[^\W_](?:.*[^\W_])?", re.DOTALL)


def required_literals(pattern: re.Pattern) -> frozenset[str] | None:
    """Strings of which every match of `pattern` contains at least one, or None if none is known.

    A `contains` rule first scans for these plain literals, which costs a fraction of running its
    patterns (look-behinds and a leading \\b defeat the re module's own prefix search); the
    patterns run only on replies that contain one. Derived from the parsed pattern, so no match is ever
    missed: a literal run in a sequence (zero-width assertions do not break it), the union over
    alternatives, the item of a repeat with min >= 1; the set with the longest shortest string wins.
    """
    from re import _constants as C, _parser  # the stdlib's own regex parser (private, stable in 3.11+)

    if pattern.flags & re.IGNORECASE:
        return None

    def any_of(seq) -> frozenset[str] | None:
        found: list[frozenset[str]] = []
        run: list[str] = []

        def close() -> None:
            if run:
                found.append(frozenset(("".join(run),)))
                run.clear()

        for op, av in seq:
            if op is C.LITERAL:
                run.append(chr(av))
                continue
            if op in (C.AT, C.ASSERT, C.ASSERT_NOT):  # zero-width: the literal run stays contiguous
                continue
            close()
            sub = None
            if op is C.SUBPATTERN and not (av[1] & re.IGNORECASE):
                sub = any_of(av[-1])
            elif op is C.BRANCH:
                alts = [any_of(branch) for branch in av[1]]
                sub = None if any(a is None for a in alts) else frozenset().union(*alts)
            elif op in (C.MAX_REPEAT, C.MIN_REPEAT, getattr(C, "POSSESSIVE_REPEAT", None)) and av[0] >= 1:
                sub = any_of(av[2])
            if sub:
                found.append(sub)
        close()
        found = [f for f in found if "" not in f]
        return max(found, key=lambda f: min(map(len, f))) if found else None

    try:
        return any_of(_parser.parse(pattern.pattern).data)
    except Exception:  # an unexpected parse tree: no shortcut, the regex alone decides
        return None


@dataclass(frozen=True)
class Rule:
    """One named reply check from the rules file; `name` is the reject reason."""

    name: str
    description: str
    no_content: bool = False
    min_chars: int | None = None
    full_match: re.Pattern | None = None
    contains: tuple[re.Pattern, ...] = ()
    # For `contains`: one regex of plain literals that every match of any pattern contains (see
    # required_literals), or None when some pattern has none.
    trigger: re.Pattern | None = None

    def matches(self, replies: list[str]) -> str | None:
        """The first of the (normalised) replies this rule rejects, or None."""
        if self.no_content:
            return next((r for r in replies if _HAS_CONTENT.search(r) is None), None)
        if self.min_chars is not None:
            return next((r for r in replies if len(r) - r.count(" ") < self.min_chars), None)
        if self.full_match is not None:
            for r in replies:
                core = _CORE.search(r)
                if core is not None and self.full_match.fullmatch(core.group()):
                    return r
            return None
        # Replies joined by a newline (normalised text has none) so one scan covers them all; the
        # literal trigger rules out almost every reply before any pattern runs.
        if self.trigger is not None and not self.trigger.search("\n".join(replies)):
            return None
        return next((r for r in replies if any(rx.search(r) for rx in self.contains)), None)


_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")  # CJK ideographs (incl. ext. A, compatibility)
# Unicode White_Space, the set a tokenizer regex's \s means (str.split also splits at \x1c-\x1f).
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
_WORD_GAP = re.compile(f"[{_WHITE_SPACE}]+")
_CHECKS = ("no_content", "min_chars", "full_match", "contains")


def load_rules(path: str | Path) -> list[Rule]:
    """Parse and compile the rules file; any mistake is an error naming the file and the rule."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LorapipeError(f"{path}: rules file not found (params key data.clean.rules)") from None
    except yaml.YAMLError as exc:
        raise LorapipeError(f"{path}: not valid YAML: {exc}") from None
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
        unknown = set(spec) - {"name", "description", *_CHECKS}
        if unknown:
            raise LorapipeError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; a rule has name, description and one of {', '.join(_CHECKS)}")
        checks = [k for k in _CHECKS if k in spec]
        if len(checks) != 1:
            raise LorapipeError(f"{where}: needs exactly one of {', '.join(_CHECKS)}, has {len(checks)}")
        check, value = checks[0], spec[checks[0]]
        kwargs: dict[str, Any] = {}
        if check == "no_content":
            if value is not True:
                raise LorapipeError(f"{where}: no_content must be true")
            kwargs["no_content"] = True
        elif check == "min_chars":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LorapipeError(f"{where}: min_chars must be a positive integer")
            kwargs["min_chars"] = value
        else:
            if not isinstance(value, list) or not value or not all(isinstance(p, str) and p for p in value):
                raise LorapipeError(f"{where}: {check} must be a non-empty list of regex strings")
            for j, pattern in enumerate(value):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise LorapipeError(f"{where}: {check}[{j}] is not a valid regex: {exc}") from None
            if check == "full_match":  # anchored: one alternation is as fast as one pattern
                kwargs[check] = re.compile("|".join(f"(?:{p})" for p in value))
            else:
                kwargs[check] = tuple(map(re.compile, value))
                literals = [required_literals(rx) for rx in kwargs[check]]
                if all(literals):
                    # Outer spaces trimmed: a leading space would make every space a match attempt.
                    alternatives = sorted({lit.strip(" ") or lit for lit in set().union(*literals)}, key=len, reverse=True)
                    kwargs["trigger"] = re.compile("|".join(map(re.escape, alternatives)))
        rules.append(Rule(name=name, description=str(spec.get("description", "")), **kwargs))
    return rules


def first_broken_rule(rules: list[Rule], replies: list[str]) -> tuple[str, str] | None:
    """(rule name, offending reply) for the first rule that rejects any normalised reply, else None."""
    for rule in rules:
        reply = rule.matches(replies)
        if reply is not None:
            return rule.name, reply
    return None


# ----------------------------------------------------------------------------------- token length
class ChatLength:
    """Token length of a dialogue rendered with the base model's chat template.

    Reads only the tokenizer files of the model folder (never config.json or the weights), through
    transformers' fast tokenizer class so that the template is rendered exactly as training renders
    it (same Jinja sandbox and globals as `apply_chat_template`).
    """

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        if not (model_dir / "tokenizer.json").is_file():
            raise LorapipeError(f"{model_dir}/tokenizer.json not found: the clean stage needs the base model's fast tokenizer (run `lorapipe base` first)")
        from transformers import PreTrainedTokenizerFast  # heavy import, only when the stage runs

        tok = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
        if not tok.chat_template:
            raise LorapipeError(f"{model_dir}: the tokenizer has no chat template (chat_template.jinja or tokenizer_config.json)")
        self._tokenizer = tok
        self._template_kwargs = dict(tok.special_tokens_map)
        try:
            # The compiled template that apply_chat_template itself uses (cached, sandboxed). Calling it
            # directly skips apply_chat_template's per-row deep copy of the conversation: ~2x faster.
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self._template = _compile_jinja_template(tok.chat_template)
        except ImportError:  # a transformers without that helper: the public API, slower
            self._template = None
        backend = tok.backend_tokenizer
        self._normalizer = backend.normalizer
        self._overheads: dict[tuple[str, ...], int | None] = {}
        self._max_cjk_per_token: int | None = None  # computed on first use (decodes the vocabulary)
        pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
        # Pre-tokenizers that never put two whitespace-separated words in one piece; an added
        # (special) token whose text holds whitespace could span two words, so none may.
        self._splits_words = (
            ((pre.get("type") == "ByteLevel" and pre.get("use_regex") is True)
             or pre.get("type") in ("Whitespace", "WhitespaceSplit", "BertPreTokenizer"))
            and not any(_WORD_GAP.search(t.content) for t in backend.get_added_tokens_decoder().values())
        )
        self._encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)

    def render(self, messages: list[dict]) -> str:
        if self._template is None:
            return self._tokenizer.apply_chat_template(messages, tokenize=False)
        return self._template.render(messages=messages, add_generation_prompt=False, **self._template_kwargs)

    def _size(self, text: str) -> int:
        """UTF-8 bytes of `text` after the tokenizer's own normalizer (which may expand it)."""
        if self._normalizer is not None:
            text = self._normalizer.normalize_str(text)
        return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))

    def _overhead(self, roles: tuple[str, ...]) -> int | None:
        """Bytes the template adds around the contents of a dialogue with these roles, or None.

        Measured once per role sequence by rendering it with every content "a" and again with "ab":
        a template that inserts each content once (all the templates we know) grows by exactly one
        byte per message. Anything else (content repeated, dropped, transformed) gets None: such
        rows are always rendered and counted.
        """
        if roles not in self._overheads:
            n = len(roles)
            try:
                one = self._size(self.render([{"role": r, "content": "a"} for r in roles]))
                two = self._size(self.render([{"role": r, "content": "ab"} for r in roles]))
            except Exception:  # a template that rejects this shape: render real rows instead
                one, two = 0, -1
            self._overheads[roles] = one - n if two == one + n else None
        return self._overheads[roles]

    def upper_bound(self, messages: list[dict]) -> int | None:
        """A number of tokens the rendered dialogue cannot exceed, found without rendering it.

        Every token of a BPE / WordPiece / Unigram model covers at least one byte of the normalised
        text (byte-level BPE and byte fallback at worst one token per byte; special tokens are longer
        than one byte). The only tokens that cover nothing are SentencePiece prefix spaces ("▁"), at
        most one per segment between special tokens: 4 per message + 8 is generous. No special
        tokens are added by the tokenizer (the template already wrote them). None = unknown: render.
        """
        overhead = self._overhead(tuple(m["role"] for m in messages))
        if overhead is None:
            return None
        return overhead + sum(self._size(m["content"]) for m in messages) + 4 * len(messages) + 8

    def lower_bound(self, text: str) -> int:
        """A number of tokens the rendered `text` has at least, found without tokenizing it.

        Lets a 1 MB paste be rejected as too long without tokenizing a megabyte. Two counts, each a
        floor: (1) when the pre-tokenizer splits at whitespace (byte-level BPE's GPT-2 regex,
        split, Whitespace, BERT), no token spans two whitespace-separated words, so tokens >= words;
        (2) no token holds more CJK ideographs than the most any vocabulary entry holds (K, read from
        the vocabulary once), so tokens >= ideographs / K.
        """
        if self._max_cjk_per_token is None:
            backend = self._tokenizer.backend_tokenizer
            vocab = backend.get_vocab(with_added_tokens=True)
            self._max_cjk_per_token = max(1, max(len(_CJK.findall(backend.decode([i], skip_special_tokens=False))) for i in vocab.values()))
        n = -(-len(_CJK.findall(text)) // self._max_cjk_per_token)
        if self._splits_words:
            words = text.strip(_WHITE_SPACE)
            n = max(n, len(_WORD_GAP.split(words)) if words else 0)
        return n

    def count(self, texts: list[str]) -> list[int]:
        """Token counts, one batched call into the Rust tokenizer (parallel across cores)."""
        if not texts:
            return []
        return [len(e) for e in self._encode_batch(texts, add_special_tokens=False)]


# ------------------------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class Settings:
    max_tokens: int = 2048
    strict: bool = False
    system_prompt: str | None = None
    eval_fraction: float = 0.05
    salt: str = "lorapipe"
    batch_size: int = 2048        # rows examined per tokenizer batch
    # Render and tokenize every n-th row that the size bound let through, to check the bound at run
    # time; 1 = count every row (slow, exact counts for all).
    bound_check_every: int = 997


@dataclass
class Counts:
    read: int = 0
    train: int = 0
    eval: int = 0
    rejected: int = 0

    @property
    def kept(self) -> int:
        return self.train + self.eval

    def as_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "train": self.train, "eval": self.eval, "rejected": self.rejected}


@dataclass
class Report:
    """What metrics/data.json holds; `check()` proves nothing was lost."""

    total: Counts = field(default_factory=Counts)
    sources: dict[str, Counts] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    token_counted: int = 0  # rows actually tokenized (the rest fit by the byte bound)

    def check(self) -> None:
        t = self.total
        problems = []
        if t.read != t.kept + t.rejected:
            problems.append(f"read {t.read} != kept {t.kept} + rejected {t.rejected}")
        if sum(self.dropped.values()) != t.rejected:
            problems.append(f"dropped per reason sum to {sum(self.dropped.values())}, rejected is {t.rejected}")
        if sum(c.read for c in self.sources.values()) != t.read:
            problems.append("rows read per source do not add up to rows read")
        for name, c in self.sources.items():
            if c.read != c.kept + c.rejected:
                problems.append(f"source {name}: read {c.read} != kept {c.kept} + rejected {c.rejected}")
        if problems:  # a bug in this stage, never bad input: fail rather than publish wrong counts
            raise RuntimeError("clean: row accounting does not add up: " + "; ".join(problems))

    def metrics(self) -> dict:
        self.check()
        return {
            **self.total.as_dict(),
            "dropped": dict(self.dropped),
            "sources": {name: c.as_dict() for name, c in sorted(self.sources.items())},
            "token_counted": self.token_counted,
        }


class _Item:
    """One raw line on its way through a batch."""

    __slots__ = ("lineno", "text", "row", "messages", "reason", "detail", "fp", "tokens", "bound", "floor", "changed")

    def __init__(self, lineno: int, text: str):
        self.lineno, self.text = lineno, text
        self.row = self.messages = self.reason = self.detail = self.fp = self.tokens = self.bound = self.floor = None
        self.changed = False


class Outputs:
    """The three open output files (temporary paths until the stage succeeds)."""

    def __init__(self, train: TextIO, eval: TextIO, rejects: TextIO):
        self.train, self.eval, self.rejects = train, eval, rejects


class Cleaner:
    """The clean stage's core: stream raw files into train / eval / rejects and count everything."""

    def __init__(self, settings: Settings, length: ChatLength, rules: list[Rule]):
        self.s = settings
        self.length = length
        self.rules = rules
        self.report = Report(dropped={r: 0 for r in (*READ_REASONS, *INVALID_REASONS, *(r.name for r in rules), *FILTER_REASONS)})
        # fingerprint -> (file index << 32 | line) of the kept row: fixed size per unique row.
        self._seen: dict[bytes, int] = {}
        self._files: list[str] = []
        self._salt = settings.salt.encode("utf-8") + b"\x00"
        self._eval_cut = int(settings.eval_fraction * 2**64)
        self._since_check = 0

    # --- public
    def clean_file(self, path: Path, out: Outputs, show_progress: bool = True) -> None:
        label = str(path)
        self._files.append(label)
        file_index = len(self._files) - 1
        source = path.stem
        counts = self.report.sources.setdefault(source, Counts())
        lines = iter_jsonl(path)
        if show_progress:
            lines = progress(lines, desc=f"clean {path.name}", unit="row")
        batch: list[_Item] = []
        for line in lines:
            item = _Item(line.lineno, line.text)
            self._examine(item, line, label, source)
            batch.append(item)
            if len(batch) >= self.s.batch_size:
                self._flush(batch, out, label, file_index, source, counts)
                batch = []
        self._flush(batch, out, label, file_index, source, counts)

    def metrics(self) -> dict:
        return self.report.metrics()

    # --- per line: everything that needs no tokenizer
    def _examine(self, item: _Item, line, label: str, source: str) -> None:
        if line.error:
            self._reject(item, "invalid_utf8" if line.error.startswith("invalid UTF-8") else "invalid_json", line.error, label)
            return
        row = item.row = line.value
        if isinstance(row, dict) and "messages" not in row and "error" in row:
            # ingest could not read this input and quarantined it: count it, keep its text.
            self._reject(item, "quarantined", str(row["error"]), label)
            return
        try:
            messages = validate_row(row)
        except Invalid as exc:
            self._reject(item, exc.reason, exc.detail, label)
            return
        if self.s.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.s.system_prompt}, *messages]
            item.changed = True
        item.messages = messages
        turns = list(zip([m["role"] for m in messages], normalise_many([m["content"] for m in messages])))
        broken = first_broken_rule(self.rules, [text for role, text in turns if role == "assistant"])
        if broken:
            item.reason, item.detail = broken[0], f"assistant reply {broken[1][:80]!r}"
            return
        item.fp = fingerprint(turns)
        if item.fp in self._seen:  # already kept: no need to render or count it
            item.reason = "duplicate"
            return
        item.bound = self.length.upper_bound(messages)

    def _reject(self, item: _Item, reason: str, detail: str, label: str) -> None:
        if self.s.strict:
            raise LorapipeError(f"{label}:{item.lineno}: {reason}: {detail} (data.clean.strict is true; set it to false to reject bad rows instead)")
        item.reason, item.detail = reason, detail

    # --- per batch: count the tokens that need counting, then decide in input order
    def _flush(self, batch: list[_Item], out: Outputs, label: str, file_index: int, source: str, counts: Counts) -> None:
        to_count: list[_Item] = []
        for item in batch:
            if item.reason is not None:
                continue
            if item.bound is None or item.bound > self.s.max_tokens:
                to_count.append(item)
            else:
                self._since_check += 1
                if self._since_check >= self.s.bound_check_every:
                    self._since_check = 0
                    to_count.append(item)
        texts = [self._render(item, label) for item in to_count]
        # Rows certainly too long by the floor are not tokenized either (bar the sampled checks).
        floors = [self.length.lower_bound(t) if item.bound is None or item.bound > self.s.max_tokens else 0
                  for item, t in zip(to_count, texts)]
        exact = []
        for item, text, floor in zip(to_count, texts, floors):
            if floor > self.s.max_tokens:
                item.floor = floor
                self._since_check += 1
                if self._since_check < self.s.bound_check_every:
                    continue
                self._since_check = 0
            exact.append((item, text))
        for (item, _), n in zip(exact, self.length.count([t for _, t in exact])):
            item.tokens = n
            if (item.bound is not None and n > item.bound) or (item.floor is not None and n < item.floor):
                raise RuntimeError(f"{label}:{item.lineno}: {n} tokens, outside the bounds [{item.floor}, {item.bound}]: "
                                   "the length shortcut does not hold for this tokenizer/template")
        self.report.token_counted += len(exact)

        for item in batch:
            counts.read += 1
            if item.reason is None:
                if item.tokens is not None and item.tokens > self.s.max_tokens:
                    item.reason, item.detail = "too_long", f"{item.tokens} tokens > max_tokens {self.s.max_tokens}"
                elif item.floor is not None:
                    item.reason, item.detail = "too_long", f"at least {item.floor} tokens > max_tokens {self.s.max_tokens}"
                elif item.fp in self._seen:
                    item.reason = "duplicate"
                else:
                    self._seen[item.fp] = file_index << 32 | item.lineno
                    self._keep(item, out, label, source, counts)
                    continue
            self._write_reject(item, out, label, source, counts)

    def _render(self, item: _Item, label: str) -> str:
        try:
            return self.length.render(item.messages)
        except Exception as exc:  # e.g. a template that raises on a system turn (jinja's raise_exception)
            raise LorapipeError(f"{label}:{item.lineno}: the base model's chat template cannot render this row: {exc}") from None

    def _keep(self, item: _Item, out: Outputs, label: str, source: str, counts: Counts) -> None:
        h = hashlib.blake2b(self._salt + item.fp, digest_size=8).digest()
        to_eval = int.from_bytes(h, "big") < self._eval_cut
        row = item.row
        if not item.changed and row.keys() == ROW_KEYS and isinstance(row["source"], str) and isinstance(row["origin"], str):
            line = item.text + "\n"  # already in output form: copy the raw line, skip re-serialising
        else:
            extra = {k: v for k, v in row.items() if k not in ROW_KEYS}
            line = dump_jsonl_line({
                "messages": item.messages,
                "source": row["source"] if isinstance(row.get("source"), str) else source,
                "origin": row.get("origin") or f"{label}:{item.lineno}",
                **extra,
            })
        if to_eval:
            out.eval.write(line)
            counts.eval += 1
            self.report.total.eval += 1
        else:
            out.train.write(line)
            counts.train += 1
            self.report.total.train += 1
        self.report.total.read += 1

    def _write_reject(self, item: _Item, out: Outputs, label: str, source: str, counts: Counts) -> None:
        row = item.row
        detail = item.detail
        if item.reason == "duplicate":
            kept = self._seen[item.fp]
            detail = f"same user+assistant text as {self._files[kept >> 32]}:{kept & 0xFFFFFFFF}"
        record: dict[str, Any] = {
            "reason": item.reason,
            "detail": detail,
            "source": row.get("source") if isinstance(row, dict) and isinstance(row.get("source"), str) else source,
            "at": f"{label}:{item.lineno}",
            "origin": (row.get("origin") if isinstance(row, dict) else None) or f"{label}:{item.lineno}",
        }
        if item.reason == "quarantined":
            record["raw"] = row.get("raw")
        elif row is None:  # unreadable line: keep its text as read
            record["raw"] = item.text
        else:
            record["row"] = row
        out.rejects.write(dump_jsonl_line(record))
        counts.rejected += 1
        self.report.total.rejected += 1
        self.report.total.read += 1
        self.report.dropped[item.reason] += 1


def clean_files(files: list[Path], out: Outputs, settings: Settings, length: ChatLength, rules: list[Rule], show_progress: bool = True) -> dict:
    """Clean `files` in order into `out`; return the metrics (accounting checked)."""
    cleaner = Cleaner(settings, length, rules)
    for path in files:
        cleaner.clean_file(path, out, show_progress=show_progress)
    return cleaner.metrics()


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
        handles = []
        for final in (paths.TRAIN_JSONL, paths.EVAL_JSONL, paths.REJECTS_JSONL):
            tmp = stack.enter_context(atomic_path(final))
            # backslashreplace: a lone surrogate kept in a reject's raw text is written as a JSON \\udXXX escape.
            handles.append(stack.enter_context(open(tmp, "w", encoding="utf-8", errors="backslashreplace", newline="\n")))
        metrics = clean_files(files, Outputs(*handles), settings, length, rules)
    write_json(METRICS_JSON, metrics)
    if metrics["kept"] == 0:
        info(f"warning: no row survived cleaning; see {paths.REJECTS_JSONL}")
    return {"read": metrics["read"], "kept": metrics["kept"], "train": metrics["train"],
            "eval": metrics["eval"], "rejected": metrics["rejected"]}
