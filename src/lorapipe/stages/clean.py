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

Speed (benchmarks/clean_throughput.py): everything that needs no other row (steps 1-5 bar the
sampled bound checks, the fingerprint, the split side) is done by _Examiner, in worker processes
when the input is large (one per idle CPU; output identical for any number); this process then takes
the rows in input order, in batches, and does what needs order: dedupe, the sampled checks, writing.
The per-row path avoids work a row does not need: orjson parses (json re-parses the rare row that
holds a number, to keep json's exact values), and a row exactly as ingest writes it (nearly all) is
recognised with a few C-level calls and copied to the output as the bytes read. Such rows are
examined a block (~1 MB of lines) at a time: one normalisation pass over all their texts (NFKC only
when the quick check fails), one RE2 scan of all their replies for the literals the reply rules
need (RuleScan: only rows where one occurs run those rules), one formatting of all fingerprints.
Most rows never need tokenizing, exactly: every token covers at least one byte of the
(tokenizer-normalised) text, so a row whose contents plus the template's own bytes fit in
`max_tokens` cannot be too long (ChatLength.upper_bound, from the JSON line's length when that
suffices); and a row with more words or CJK ideographs than tokens allow cannot fit
(ChatLength.lower_bound). Rows between the two are rendered with the compiled chat template and
counted in one batched call of the fast tokenizer per block; every 997th row decided by a bound is
counted too, and a bound that fails stops the stage.
Memory holds a few blocks of raw lines per worker, one batch, and a 16-byte fingerprint per kept row.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import multiprocessing
import os
import re
import time
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass, field
from itertools import accumulate, chain, compress, repeat
from operator import add, is_, itemgetter, not_, or_
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
import orjson
import re2  # google-re2

from lorapipe.core import paths, rowscan
from lorapipe.core.errors import LorapipeError
from lorapipe.core.io import atomic_path, dump_jsonl_line, write_json
from lorapipe.core.log import info, progress
from lorapipe.core.sharegpt import (INVALID_REASONS, Invalid, checked_turns, dialogue_fingerprint, dialogue_fingerprints,
                                    normalise_many, plain_turns_many)
from lorapipe.core.yamlfile import read_yaml

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


def _fewest_literals(literals: set[str]) -> tuple[str, ...]:
    """The literals that contain no other one: a text holding "kill yourself" holds "yourself"."""
    return tuple(sorted(lit for lit in literals if not any(other != lit and other in lit for other in literals)))


@dataclass(frozen=True)
class Rule:
    """One named reply check from the rules file; `name` is the reject reason."""

    name: str
    description: str
    no_content: bool = False
    min_chars: int | None = None
    full_match: re.Pattern | None = None
    contains: tuple[re.Pattern, ...] = ()
    # For `full_match` and `contains`: plain strings of which every match of the pattern(s) contains
    # at least one (see required_literals), or None when some pattern has none. A reply holding none
    # of them cannot match, and `in` (a C substring search) rules that out far faster than the re
    # module, which has no multi-literal search.
    trigger: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.trigger is not None:  # an ASCII text can hold only the ASCII literals: fewer searches
            object.__setattr__(self, "_ascii_trigger", tuple(lit for lit in self.trigger if lit.isascii()))

    def _triggered(self, joined: str) -> bool:
        return any(map(joined.__contains__, self._ascii_trigger if joined.isascii() else self.trigger))

    def matches(self, replies: list[str], joined: str, triggered: bool = False) -> str | None:
        """The first of the (normalised) replies this rule rejects, or None.

        `joined` is the replies joined by a newline (normalised text has none), so one substring
        search per trigger literal covers them all; triggered: a literal is known to occur (the
        search is skipped, and `joined` not used).
        """
        if self.no_content:
            for r in replies:
                if _HAS_CONTENT.search(r) is None:
                    return r
            return None
        if self.min_chars is not None:
            for r in replies:
                if len(r) - r.count(" ") < self.min_chars:
                    return r
            return None
        if self.trigger is not None and not triggered and not self._triggered(joined):
            return None
        if self.full_match is not None:
            # The pattern must match the whole reply from its first to its last letter or digit.
            for r in replies:
                core = _CORE.search(r)
                if core is not None and self.full_match.fullmatch(core.group()):
                    return r
            return None
        for r in replies:
            for rx in self.contains:
                if rx.search(r):
                    return r
        return None


_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")  # CJK ideographs (incl. ext. A, compatibility)
_IDEOGRAPHS = np.zeros(0x10000, dtype=bool)  # the same set, as a lookup table over the BMP
for _first, _last in ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF)):
    _IDEOGRAPHS[_first:_last + 1] = True
# Unicode White_Space, the set a tokenizer regex's \s means (str.split also splits at \x1c-\x1f).
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
_WORD_GAP = re.compile(f"[{_WHITE_SPACE}]+")
_CHECKS = ("no_content", "min_chars", "full_match", "contains")


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
                patterns = [kwargs[check]]
            else:
                kwargs[check] = patterns = tuple(map(re.compile, value))
            literals = [required_literals(rx) for rx in patterns]
            if all(literals):
                # Outer spaces trimmed: a shorter literal is still in every match.
                kwargs["trigger"] = _fewest_literals({lit.strip(" ") or lit for lit in set().union(*literals)})
        rules.append(Rule(name=name, description=str(spec.get("description", "")), **kwargs))
    return rules


def first_broken_rule(rules: list[Rule], replies: list[str], triggered: bool = False) -> tuple[str, str] | None:
    """(rule name, offending reply) for the first rule that rejects any normalised reply, else None.

    triggered: the caller (RuleScan) found a trigger literal of each pattern rule in `rules` in
    these replies already, so Rule.matches need not search for them again.
    """
    joined = "" if triggered else replies[0] if len(replies) == 1 else "\n".join(replies)
    for rule in rules:
        reply = rule.matches(replies, joined, triggered)
        if reply is not None:
            return rule.name, reply
    return None


class RuleScan:
    """Finds, for a whole block of replies at once, the rows that a reply rule might reject, and
    which rules might.

    Checking each reply against each rule costs Python calls per reply and rule. Here each check
    runs once over all replies of a block: `no_content` maps its regex over the replies, `min_chars`
    looks at their lengths (a normalised reply has only single inner spaces, so one of at least
    2N-1 characters has N that are not spaces), and the `full_match` / `contains` rules are covered
    by one scan of all replies for the literals every match of their patterns contains
    (Rule.trigger). That scan uses RE2's set matcher (google-re2): which of many literals occur, in
    one linear pass, where Python's re has no multi-literal search and `in` would rescan the text
    once per literal. A `full_match` rule can also only match a reply whose core (first to last
    letter or digit) is no longer than its pattern's longest match. Only the rows where something is
    found run those rules (first_broken_rule); every other row passes all of them.
    """

    def __init__(self, rules: list[Rule]):
        self.rules = rules
        self._no_content = tuple(j for j, r in enumerate(rules) if r.no_content)
        self._min_chars = [(j, 2 * r.min_chars - 1) for j, r in enumerate(rules) if r.min_chars is not None]
        pattern_rules = [(j, r) for j, r in enumerate(rules) if r.full_match is not None or r.contains]
        self.check_all = any(r.trigger is None for _, r in pattern_rules)  # a pattern without a literal
        self._literals = [] if self.check_all else sorted(set().union(*(r.trigger for _, r in pattern_rules)))
        self._literal_rules = [tuple(j for j, r in pattern_rules if lit in r.trigger) for lit in self._literals]
        widths = {j: _max_width(r.full_match) for j, r in pattern_rules if r.full_match is not None}
        self._max_width = {j: w for j, w in widths.items() if w is not None}  # bounded full_match patterns
        self._full_match = {j: r.full_match for j, r in pattern_rules if r.full_match is not None}
        self._scanner = self._compile(self._literals)

    @staticmethod
    def _compile(literals: list[str]):
        """An RE2::Set of the literals: which of them occur in a text, in one pass over it."""
        if not literals:
            return None
        scanner = re2.Set.SearchSet()
        for literal in literals:
            scanner.Add(re2.escape(literal))
        scanner.Compile()
        return scanner

    def __getstate__(self) -> dict:  # an RE2 set cannot be pickled: rebuilt from the literals
        return {**self.__dict__, "_scanner": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._scanner = self._compile(self._literals)

    def suspects(self, replies: list[str], ends: list[int]) -> dict[int, list[Rule]]:
        """{row index: the rules (in order) that might reject it} for the rows some rule might
        reject. `replies` are the normalised replies of all rows, row k's ending before ends[k]."""
        if self.check_all:
            return dict.fromkeys(range(len(ends)), self.rules)
        hits: dict[int, set[int]] = {}  # reply index -> indexes of the rules it might break
        # A reply that starts with a letter or digit has content: the regex runs on the others only.
        if self._no_content and not all(map(str.isalnum, map(_FIRST, replies))):
            for i in [i for i, r in enumerate(replies) if not r[:1].isalnum() and _HAS_CONTENT.search(r) is None]:
                hits.setdefault(i, set()).update(self._no_content)
        for j, cut in self._min_chars:
            if replies and min(map(len, replies)) < cut:
                for i in [i for i, r in enumerate(replies) if len(r) < cut]:
                    hits.setdefault(i, set()).add(j)
        if self._scanner is not None:
            full_match = self._full_match
            cores: dict[int, str] = {}
            for k in self._scanner.Match("\n".join(replies)) or ():
                literal, rule_ids = self._literals[k], self._literal_rules[k]
                for i in [i for i, r in enumerate(replies) if literal in r]:
                    reply = replies[i]
                    own_core = reply[0].isalnum() and reply[-1].isalnum()  # starts and ends with a letter or digit
                    for j in rule_ids:  # a full_match rule cannot match a core longer than its pattern's widest match
                        if own_core and len(reply) > self._max_width.get(j, _UNBOUNDED):
                            continue
                        if j in full_match:
                            # Decided here, at once: a pure refusal is rare, and a row sent on to
                            # first_broken_rule costs several calls more than this one match.
                            core = cores.get(i)
                            if core is None:
                                found = _CORE.search(reply)
                                core = cores[i] = found.group() if found is not None else ""
                            if not core or full_match[j].fullmatch(core) is None:
                                continue
                        hits.setdefault(i, set()).add(j)
        rows: dict[int, set[int]] = {}
        for i, rule_ids in hits.items():
            rows.setdefault(bisect_right(ends, i), set()).update(rule_ids)
        return {k: [self.rules[j] for j in sorted(rule_ids)] for k, rule_ids in rows.items()}


_FIRST = itemgetter(slice(0, 1))  # a string's first character ('' if empty)
_UNBOUNDED = 1 << 62


def _max_width(pattern: re.Pattern) -> int | None:
    """The most characters a match of `pattern` can hold, or None when unbounded or unknown.

    From the re module's own parser (re._parser, sre_parse before Python 3.11): the regex engine
    computes exactly this for every pattern it compiles, and no public API exposes it.
    """
    try:
        parser = getattr(re, "_parser", None)
        if parser is None:
            import sre_parse as parser  # Python < 3.11
        hi = parser.parse(pattern.pattern, pattern.flags).getwidth()[1]
    except Exception:  # a future re without that parser: no width filter, still exact
        return None
    return hi if hi < (1 << 16) else None


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
        self._cjk_profile: tuple[int, np.ndarray] | None = None  # on first use (decodes the vocabulary)
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
        return self.upper_bound_of(tuple(m["role"] for m in messages), [m["content"] for m in messages])

    def upper_bound_of(self, roles: tuple[str, ...], contents: list[str]) -> int | None:
        """upper_bound() of the messages with these roles and contents."""
        overhead = self._overhead(roles)
        if overhead is None:
            return None
        if self._normalizer is None:  # the byte sizes add up: measure the contents in one piece
            text = "".join(contents)
            size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
        else:
            size = sum(map(self._size, contents))
        return overhead + size + 4 * len(contents) + 8

    def loose_bound(self, roles: tuple[str, ...], line_bytes: int, limit: int) -> int | None:
        """A looser upper_bound() found without the contents, when it is <= limit; else None.

        The contents come from one JSON line of line_bytes bytes, and a JSON string is never
        shorter than its text in UTF-8 (escapes only lengthen it), so together they hold at most
        line_bytes bytes. Only without a normalizer (which may lengthen the text).
        """
        if self._normalizer is not None:
            return None
        overhead = self._overhead(roles)
        if overhead is None:
            return None
        loose = overhead + line_bytes + 4 * len(roles) + 8
        return loose if loose <= limit else None

    def lower_bound(self, text: str) -> int:
        """A number of tokens the rendered `text` has at least, found without tokenizing it.

        Lets a 1 MB paste be rejected as too long without tokenizing a megabyte. Two counts, each a
        floor: (1) when the pre-tokenizer splits at whitespace (byte-level BPE's GPT-2 regex,
        split, Whitespace, BERT), no token spans two whitespace-separated words, so tokens >= words;
        (2) from the vocabulary, read once (cjk_profile): an ideograph that no vocabulary entry
        shares with another ideograph needs a token of its own, and no token holds more than K
        ideographs, so tokens >= lone ideographs + other ideographs / K. For an English-centred
        vocabulary nearly every ideograph is lone: the floor is about one token per ideograph, and
        long Chinese rows are found too long without tokenizing them.
        """
        n = 0
        if not text.isascii():
            # Counted over the code points as a numpy array: a regex findall makes a string per
            # ideograph, ~30x slower on the long Chinese rows that get here.
            codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
            is_ideograph = _IDEOGRAPHS[np.minimum(codes, 0xFFFF)]  # (U+FFFF is none)
            ideographs = int(np.count_nonzero(is_ideograph))
            if ideographs:
                k, shared = self.cjk_profile()
                in_shared = int(np.count_nonzero(shared[codes[is_ideograph]]))
                n = ideographs - in_shared + -(-in_shared // k)
        if self._splits_words:
            if not any(map(text.__contains__, "\x1c\x1d\x1e\x1f")):
                n = max(n, len(text.split()))  # str.split's whitespace is White_Space plus \x1c-\x1f: same words here
            else:
                words = text.strip(_WHITE_SPACE)
                n = max(n, len(_WORD_GAP.split(words)) if words else 0)
        return n

    def cjk_profile(self) -> tuple[int, np.ndarray]:
        """(K, shared): the most CJK ideographs any vocabulary entry holds, and the ideographs that
        some entry holds together with another one, as a lookup table over the BMP (where all CJK
        ideographs are): shared[ord(ch)]. Decodes the vocabulary once."""
        if self._cjk_profile is None:
            backend = self._tokenizer.backend_tokenizer
            most, shared = 1, set()
            for i in backend.get_vocab(with_added_tokens=True).values():
                ideographs = _CJK.findall(backend.decode([i], skip_special_tokens=False))
                if len(ideographs) >= 2:
                    most = max(most, len(ideographs))
                    shared.update(ideographs)
            table = np.zeros(0x10000, dtype=bool)
            table[[ord(ch) for ch in shared]] = True
            self._cjk_profile = (most, table)
        return self._cjk_profile

    def count(self, texts: list[str]) -> list[int]:
        """Token counts, one batched call into the Rust tokenizer (parallel across cores).

        A few texts are encoded one by one: waking the tokenizer's thread pool costs more than it
        saves for them (the clean stage mostly counts one or two rows per block)."""
        if len(texts) < 8:
            encode = self._tokenizer.backend_tokenizer.encode
            return [len(encode(t, add_special_tokens=False)) for t in texts]
        return [len(e) for e in self._encode_batch(texts, add_special_tokens=False)]


# ------------------------------------------------------------------------------------- the stage
@dataclass(frozen=True)
class Settings:
    max_tokens: int = 2048
    strict: bool = False
    system_prompt: str | None = None
    eval_fraction: float = 0.05
    salt: str = "lorapipe"
    # Render and tokenize every n-th row that the size bound let through, to check the bound at run
    # time; 1 = count every row (slow, exact counts for all).
    bound_check_every: int = 997
    # Processes examining rows in parallel; None = one per CPU when the input is large enough to
    # pay for starting them (worker_count). The output does not depend on it.
    workers: int | None = None
    # Read plain rows with the native scanner (core.rowscan); False: in Python only (same output,
    # for tests that compare the two).
    native: bool = True


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


class Outputs:
    """The three open output files, in binary mode (temporary paths until the stage succeeds).

    Binary, because a kept row already in output form is copied as the raw bytes it was read as.
    """

    def __init__(self, train: BinaryIO, eval: BinaryIO, rejects: BinaryIO):
        self.train, self.eval, self.rejects = train, eval, rejects


# ------------------------------------------------------------------------------- reading a line
_BOM = b"\xef\xbb\xbf"
_NOT_CHECKED = object()  # _Examiner.line(): whether the line is a plain row is not known yet
_STRICT_REASONS = frozenset((*READ_REASONS, *INVALID_REASONS))  # what data.clean.strict turns into an error


def _strings_only(row: Any) -> bool:
    """True if the parsed row holds no number anywhere (only dicts, lists of dicts and strings).

    orjson parses 2-3x faster than the json module (a well-kept library; it is already a dependency
    of dvc) and gives the same values, except that it turns integers beyond 64 bits into floats. So
    its value is used only for rows without numbers (every row ingest writes); any other row is
    parsed again by json, and stays exactly what json reads.
    """
    try:
        if row.keys() == ROW_KEYS:
            if type(row["source"]) is not str or type(row["origin"]) is not str:
                return False
        elif not all([type(v) is str for k, v in row.items() if k != "messages"]):
            return False
        "".join(chain.from_iterable(map(dict.values, row["messages"])))  # TypeError unless dicts of strings
        return True
    except (AttributeError, TypeError, KeyError):  # not a dict, no messages, a non-string somewhere
        return False


def _parse_with_json(raw: bytes) -> tuple[Any, tuple[str, str, str] | None]:
    """(value, None), or (None, (reason, detail, text as read)) for a line that is not JSON."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, ("invalid_utf8", f"invalid UTF-8 at byte {exc.start}", raw.decode("utf-8", "replace"))
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, ("invalid_json", f"invalid JSON: {exc.msg} (column {exc.colno})", text)


def parse_line(raw: bytes) -> tuple[Any, bool, tuple[str, str, str] | None]:
    """(value, strings_only, error) of one raw line (no line end): the value json.loads gives."""
    try:
        row = orjson.loads(raw)
        if _strings_only(row):
            return row, True, None
    except orjson.JSONDecodeError:  # invalid JSON, invalid UTF-8, NaN, a lone surrogate escape...: json decides
        pass
    row, error = _parse_with_json(raw)
    return row, False, error


def _plain_row(raw: bytes) -> tuple[dict, tuple[str, ...], list[str]] | None:
    """(row, roles, contents) if the line is a valid row exactly as ingest writes them, else None.

    The fast path of nearly every row: keys messages/source/origin, string source and origin, and
    messages of a role and a content each that pass validation. Such a row holds strings only, so
    orjson's value is exact (see _strings_only) and it can be copied to the output as read.
    """
    return _plain_rows([raw])[0]


def _plain_rows(lines: list[bytes]) -> list[tuple[dict, tuple[str, ...], list[str]] | None]:
    """[_plain_row(raw) for raw in lines], with the messages of all rows checked at once
    (sharegpt.plain_turns_many: a few C-level passes instead of a few Python calls per row)."""
    rows = []
    loads = orjson.loads
    for raw in lines:
        try:
            rows.append(loads(raw))
        except orjson.JSONDecodeError:
            rows.append(None)
    keys_ok = [i for i, row in enumerate(rows) if type(row) is dict and row.keys() == ROW_KEYS
               and type(row["source"]) is str and type(row["origin"]) is str]
    plain: list = [None] * len(rows)
    for i, turns in zip(keys_ok, plain_turns_many([rows[i]["messages"] for i in keys_ok], from_orjson=True)):
        if turns is not None:
            plain[i] = (rows[i], *turns)
    return plain


def _row_reject_line(reason: str, detail: str, raw: bytes, plain: bool, label: str, lineno: int, source: str) -> bytes:
    """The rejects.jsonl line of a valid row, parsed again for it (a plain row holds strings only,
    so orjson's value is exact)."""
    row, strings_only = (orjson.loads(raw), True) if plain else parse_line(raw)[:2]
    return _dump_line(_reject_record(reason, detail, row, None, label, lineno, source), strings_only)


def _plain_reject_line(reason: str, detail: str, raw: bytes, label: str, lineno: int, source: str) -> bytes:
    """_row_reject_line() for a line that is exactly orjson.dumps() of its plain row (the native
    scanner says which), made without parsing it: the line itself is the record's "row", and its
    "source" and "origin" strings are taken as they stand in it.

    Both keys occur once in such a line, last, in this order, and nowhere else: inside a JSON
    string a quote is always escaped, so `,"origin":` can only be the key.
    """
    origin_at = raw.rfind(b',"origin":')
    source_at = raw.rfind(b',"source":', 0, origin_at)
    try:
        at = orjson.dumps(f"{label}:{lineno}")
        origin = raw[origin_at + 10:-1]
        return b"".join((b'{"reason":', orjson.dumps(reason), b',"detail":', orjson.dumps(detail), b',"source":', raw[source_at + 10:origin_at],
                         b',"at":', at, b',"origin":', at if origin == b'""' else origin, b',"row":', raw, b"}\n"))
    except TypeError:  # a lone surrogate in the file name: the general way writes it escaped
        return _row_reject_line(reason, detail, raw, True, label, lineno, source)


def _dump_line(obj: dict, strings_only: bool) -> bytes:
    """One JSONL line as core.io.dump_jsonl_line writes it (compact, non-ASCII as is), in UTF-8.

    orjson writes exactly the same bytes for strings (checked for every code point) but not for
    every number, so it serialises only rows known to hold strings only.
    """
    if strings_only:
        try:
            return orjson.dumps(obj) + b"\n"
        except TypeError:  # a lone surrogate (e.g. in the system prompt): json writes it escaped below
            pass
    # backslashreplace: a lone surrogate kept from a JSON \\udXXX escape is written as that escape.
    return dump_jsonl_line(obj).encode("utf-8", "backslashreplace")


def _reject_record(reason: str, detail: str, row: Any, text: str | None, label: str, lineno: int, source: str) -> dict:
    """The rejects.jsonl record of a line: the row as parsed, or the line's text when unreadable."""
    at = f"{label}:{lineno}"
    record: dict[str, Any] = {
        "reason": reason,
        "detail": detail,
        "source": row.get("source") if isinstance(row, dict) and isinstance(row.get("source"), str) else source,
        "at": at,
        "origin": (row.get("origin") if isinstance(row, dict) else None) or at,
    }
    if reason == "quarantined":
        record["raw"] = row.get("raw")
    elif row is None:  # unreadable line (or a JSON null): keep its text as read
        record["raw"] = text
    else:
        record["row"] = row
    return record


# ------------------------------------------------------------------------- examining one row
# What _Examiner returns for each non-blank line, in input order. Plain tuples: they are built for
# every row and, with worker processes, pickled back to the parent, where a tuple is the cheapest.
#   rejected here:  (lineno, reason, detail, record line)
#   a candidate:    (lineno, None, fingerprint, to_eval, upper bound, kept line, rendering or None)
#                    kept line: the line to write, or None / False when it is the raw line as read:
#                    None when that line is also exactly orjson.dumps() of the row (the native
#                    scanner checks), so that a reject record can hold it as it is.
# The raw line itself is not in the tuple: with worker processes these tuples travel back to the
# parent, which has the line already (it read the block) and pairs them up with _numbered().
#   rendering (for rows the upper bound cannot clear): (lower bound, rendered text, None, tokens or
#                    None when the lower bound shows the row too long) or (None, None, error message,
#                    None) when the template cannot render the row.


# Fields of the native scanner's results and of _numbered()'s pairs, for map() in _Examiner.
_ROLES, _REPLIES, _FP, _SIDE, _CANONICAL = map(itemgetter, range(5))
_AS_READ = {True: None, False: False}.__getitem__  # the kept-line field of a row kept as read
_LINE = itemgetter(1)

# Fields of _Examiner's tuples (layout above _Examiner), for map() in Cleaner._decide (and _LINENO
# for _numbered()'s pairs too).
_LINENO, _REASON, _FINGERPRINT, _TO_EVAL, _BOUND, _KEPT_LINE, _RENDERING = map(itemgetter, range(7))


class _Examiner:
    """Everything the stage decides about a row without looking at other rows.

    Parse, validate, add the system prompt, normalise, apply the reply rules, fingerprint, pick the
    split side, bound the token length (rendering rows the bound cannot clear). Runs in worker
    processes when there are enough rows; the parent then only dedupes, counts tokens and writes.
    """

    def __init__(self, settings: Settings, length: ChatLength, rules: list[Rule]):
        self.s = settings
        self.length = length
        self.rules = rules
        self.rule_scan = RuleScan(rules)
        self._salt = settings.salt.encode("utf-8") + b"\x00"
        self._eval_cut = int(settings.eval_fraction * 2**64)
        self.native = settings.native and rowscan.available()
        if self.native:
            rowscan.normalisation_table()  # made once (~0.2 s), and before any worker is forked

    def block(self, label: str, source: str, first_lineno: int, block: bytes) -> list[tuple]:
        """Examine the lines of a block of whole lines of a file, its first line numbered first_lineno.

        Rows exactly as ingest writes them (nearly all) are examined together by _examine_plain:
        most are read by the native scanner (core.rowscan), the rest that are plain by
        _plain_rows; any other line alone, by line(). Returns one tuple per row of
        _numbered(block, first_lineno), in order (layout above _Examiner).
        """
        return self.rows(label, source, _numbered(block, first_lineno)[0])

    def rows(self, label: str, source: str, numbered: list[tuple[int, bytes]]) -> list[tuple]:
        """block() for the (line number, line) pairs of a block, as _numbered() gives them."""
        raws = list(map(_LINE, numbered))
        scanned = rowscan.scan(raws, self._salt, self._eval_cut) if self.native else [None] * len(raws)
        needs_system = bool(self.s.system_prompt)
        examined: list = [None] * len(numbered)
        if None not in scanned and not (needs_system and any(found[0][0] != "system" for found in scanned)):
            self._examine_plain(label, source, numbered, raws, scanned, range(len(raws)), [], examined)  # the usual block
            return examined
        given_back = [k for k, found in enumerate(scanned) if found is None]
        python_plain = dict(zip(given_back, _plain_rows([raws[k] for k in given_back]))) if given_back else {}
        native: list[int] = []  # slots of rows the native scanner read
        python: list[tuple] = []  # (slot in examined, lineno, raw, row, roles, contents)
        for k, ((lineno, raw), found) in enumerate(zip(numbered, scanned)):
            if found is not None:
                if not (needs_system and found[0][0] != "system"):
                    native.append(k)
                    continue
                plain = None  # known plain, but gets the system prompt: line() does that
            else:
                plain = python_plain[k]
                if plain is not None and not (needs_system and plain[1][0] != "system"):
                    python.append((k, lineno, raw, *plain))
                    continue
            examined[k] = self.line(label, source, lineno, raw, _NOT_CHECKED if found is not None else plain)
        if native or python:
            self._examine_plain(label, source, numbered, raws, scanned, native, python, examined)
        return examined

    def _examine_plain(self, label: str, source: str, numbered: list[tuple[int, bytes]], raws: list[bytes], scanned: list,
                       native: range | list[int], python: list[tuple], examined: list) -> None:
        """line() for many plain rows (see _plain_row) at once, into their slots of `examined`.

        `native`: the slots of rows the native scanner read (scanned[slot]: roles, normalised
        replies, fingerprint, split side); `python`: rows that get the same here, with one
        normalisation pass over the texts of all of them. Then, for all: one scan of all replies
        for what the reply rules look for (only rows where something is found run the rules), and
        a token bound from the line's byte length. The same decisions as line(). The native rows,
        nearly all, take a few C-level passes (map, zip) for the whole block; only rows that need
        more (a rule to check, a bound that does not clear them) are looked at one by one.
        """
        everything = len(native) == len(numbered)
        found = scanned if everything else list(map(scanned.__getitem__, native))
        native_replies = list(map(_REPLIES, found))
        # Python rows: (slot, lineno, raw, roles, replies, fingerprint, to_eval, row, contents)
        texts: list[str] = []
        ends: list[int] = []  # where each python row's dialogue texts end in `texts`
        for item in python:
            contents = item[5]
            texts += contents[1:] if item[4][0] == "system" else contents
            ends.append(len(texts))
        normalised = normalise_many(texts) if texts else []
        others: list[tuple] = []
        start = 0
        for item, end, fp in zip(python, ends, dialogue_fingerprints(normalised, ends)):
            slot, lineno, raw, row, roles, contents = item
            others.append((slot, lineno, raw, roles, normalised[start + 1:end:2], fp, self._to_eval(fp), row, contents))
            start = end
        # The rule scan over the replies of all rows: native rows first (k < len(native)), then python.
        reply_lists = native_replies + [item[4] for item in others] if others else native_replies
        suspects = self.rule_scan.suspects(list(chain.from_iterable(reply_lists)), list(accumulate(map(len, reply_lists))))

        # Native rows: the examined tuples of the whole block in C-level passes, with the loose
        # token bound (ChatLength.loose_bound: overhead + line bytes + 4 per turn + 8) of each.
        max_tokens, length = self.s.max_tokens, self.length
        roles_list = list(map(_ROLES, found))
        line_bytes = list(map(len, raws if everything else map(raws.__getitem__, native)))
        per_roles = {roles: length.loose_bound(roles, 0, max_tokens) for roles in set(roles_list)}
        if None in per_roles.values():  # no loose bound for some role sequence: None there
            bounds = [None if per_roles[r] is None else per_roles[r] + n for r, n in zip(roles_list, line_bytes)]
        else:
            bounds = list(map(add, map(per_roles.__getitem__, roles_list), line_bytes))
        linenos = list(map(_LINENO, numbered if everything else map(numbered.__getitem__, native)))
        tuples = zip(linenos, repeat(None), map(_FP, found), map(_SIDE, found), bounds, map(_AS_READ, map(_CANONICAL, found)), repeat(None))
        if everything:
            examined[:] = tuples
        else:
            for slot, t in zip(native, tuples):
                examined[slot] = t
        # The native rows that need more, and the python rows, one by one.
        bound_fails = None in bounds or (bounds and max(bounds) > max_tokens)
        look = sorted(set(k for k in suspects if k < len(native)) | ({k for k, b in enumerate(bounds) if b is None or b > max_tokens} if bound_fails else set()))
        items = [(native[k], linenos[k], raws[native[k]], roles_list[k], native_replies[k], found[k][2], found[k][3], None, None, k,
                  _AS_READ(found[k][4])) for k in look]
        items += [(*item, len(native) + j, False) for j, item in enumerate(others)]
        to_count: list[int] = []  # slots of rows whose tokens must be counted
        for slot, lineno, raw, roles, replies, fp, to_eval, row, contents, k, as_read in items:
            if k in suspects:
                broken = first_broken_rule(suspects[k], replies, triggered=True)
                if broken:
                    row = row if row is not None else orjson.loads(raw)  # a plain row: orjson's value is exact
                    examined[slot] = self._rejected(broken[0], f"assistant reply {broken[1][:80]!r}", row, True, None, label, lineno, source)
                    continue
            bound = length.loose_bound(roles, len(raw), max_tokens)
            rendering = None
            if bound is None:
                if row is None:
                    row = orjson.loads(raw)
                    contents = [m["content"] for m in row["messages"]]
                bound = length.upper_bound_of(roles, contents)
                if bound is None or bound > max_tokens:
                    rendering = self._rendering(row["messages"], label, lineno, count=False)
                    if rendering[0] is not None and rendering[0] <= max_tokens:
                        to_count.append(slot)
            examined[slot] = (lineno, None, fp, to_eval, bound, as_read, rendering)
        if to_count:  # one batched tokenizer call for the rows of this block that the bounds cannot decide
            for slot, n in zip(to_count, length.count([examined[slot][6][1] for slot in to_count])):
                examined[slot] = (*examined[slot][:6], (*examined[slot][6][:3], n))

    def _to_eval(self, fp: bytes) -> bool:
        """The row's split side: a salted hash of its fingerprint against eval_fraction."""
        return int.from_bytes(hashlib.blake2b(self._salt + fp, digest_size=8).digest(), "big") < self._eval_cut

    def _rendering(self, messages: list[dict], label: str, lineno: int, count: bool = True) -> tuple:
        """(lower bound, rendered text, None, tokens) of a row the upper bound cannot clear, or
        (None, None, error message, None) when the template cannot render it. Tokens are counted
        (when `count`) only if the lower bound does not already show the row too long, else None."""
        try:
            text = self.length.render(messages)
        except Exception as exc:  # e.g. a template that raises on a system turn (jinja's raise_exception)
            return (None, None, f"{label}:{lineno}: the base model's chat template cannot render this row: {exc}", None)
        floor = self.length.lower_bound(text)
        n = self.length.count([text])[0] if count and floor <= self.s.max_tokens else None
        return (floor, text, None, n)

    def line(self, label: str, source: str, lineno: int, raw: bytes, plain: Any = _NOT_CHECKED) -> tuple:
        """Examine one line; `plain` is _plain_row(raw) when the caller has it already."""
        if plain is _NOT_CHECKED:
            plain = _plain_row(raw)
        if plain is not None:
            row, roles, contents = plain
            strings_only = verbatim = True
        else:
            row, strings_only, error = parse_line(raw)
            if error is not None:
                reason, detail, text = error
                return self._rejected(reason, detail, None, strings_only, text, label, lineno, source)
            if type(row) is dict and "messages" not in row and "error" in row:
                # ingest could not read this input and quarantined it: count it, keep its text.
                return self._rejected("quarantined", str(row["error"]), row, strings_only, None, label, lineno, source)
            try:
                roles, contents = checked_turns(row)
            except Invalid as exc:
                return self._rejected(exc.reason, exc.detail, row, strings_only, raw.decode("utf-8"), label, lineno, source)
            verbatim = row.keys() == ROW_KEYS and type(row["source"]) is str and type(row["origin"]) is str
        messages = row["messages"]
        system_prompt = self.s.system_prompt
        if system_prompt and roles[0] != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
            roles, contents, verbatim = ("system", *roles), [system_prompt, *contents], False

        # After the optional system turn the dialogue is user, assistant, user, ..., assistant.
        normalised = normalise_many(contents[1:] if roles[0] == "system" else contents)
        replies = normalised[1::2]
        broken = first_broken_rule(self.rules, replies)
        if broken:
            return self._rejected(broken[0], f"assistant reply {broken[1][:80]!r}", row, strings_only, None, label, lineno, source)
        fp = dialogue_fingerprint(normalised)
        to_eval = self._to_eval(fp)
        bound = self.length.upper_bound_of(roles, contents)

        if verbatim:
            kept_line = False  # already in output form: the raw line is copied, not re-serialised
        else:
            extra = {k: v for k, v in row.items() if k not in ROW_KEYS}
            kept_line = _dump_line({
                "messages": messages,
                "source": row["source"] if isinstance(row.get("source"), str) else source,
                "origin": row.get("origin") or f"{label}:{lineno}",
                **extra,
            }, strings_only)[:-1]  # without its line end, like the raw lines kept as read
        rendering = None
        if bound is None or bound > self.s.max_tokens:  # the parent will have to count its tokens
            rendering = self._rendering(messages, label, lineno)
        return (lineno, None, fp, to_eval, bound, kept_line, rendering)

    def _rejected(self, reason: str, detail: str, row: Any, strings_only: bool, text: str | None, label: str, lineno: int, source: str) -> tuple:
        record = _reject_record(reason, detail, row, text, label, lineno, source)
        return (lineno, reason, detail, _dump_line(record, strings_only))

    def messages_of(self, raw: bytes) -> list[dict]:
        """The messages of a valid row's raw line as the stage uses them (system prompt added)."""
        messages = parse_line(raw)[0]["messages"]
        if self.s.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.s.system_prompt}, *messages]
        return messages


def _blocks(path: Path, size: int) -> Iterator[tuple[int, bytes]]:
    """(byte offset, block) for consecutive blocks of ~size bytes of whole lines."""
    offset = 0
    with open(path, "rb") as f:
        while block := f.read(size):
            if not block.endswith(b"\n"):
                block += f.readline()  # complete the last line (or the file, without a line end)
            yield offset, block
            offset += len(block)


def _numbered(block: bytes, first_lineno: int) -> tuple[list[tuple[int, bytes]], int]:
    """(line number, line) of each line of a block that holds a row, and the number of lines of
    the block. Lines are without their line end (LF or CRLF) and, in the file's first line, a UTF-8
    BOM. Blank lines hold no row: not read, not counted."""
    lines = block.split(b"\n")
    n_lines = len(lines) - (lines[-1] == b"")  # (a last line without a line end counts too)
    if first_lineno == 1 and lines[0].startswith(_BOM):
        lines[0] = lines[0][3:]
    if b"\r" in block:
        lines = [raw.rstrip(b"\r\n") for raw in lines]  # CRLF line ends
    return [(first_lineno + offset, raw) for offset, raw in enumerate(lines) if raw and not raw.isspace()], n_lines


# --------------------------------------------------------------------------- worker processes
_BLOCK_BYTES = 1 << 20  # raw bytes per unit of work: ~1,000-5,000 rows, a few ms to hand over
_PARALLEL_MIN_BYTES = 8 << 20  # below this, starting workers costs more than it saves


def _worker_loop(examiner: _Examiner, conn) -> None:
    """A worker process: examine the blocks it is sent until told to stop (None) or its parent is
    gone. It reads each block from the file itself (the page cache has it: the parent just read
    it), so no block goes through the pipe; only the examined tuples travel back. Any error goes
    back too, with its traceback, and is raised in the parent."""
    files: dict[str, BinaryIO] = {}
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        label, source, path, offset, size, first_lineno = task
        try:
            f = files.get(path)
            if f is None:
                f = files[path] = open(path, "rb")
            reply = (True, examiner.block(label, source, first_lineno, os.pread(f.fileno(), size, offset)))
        except BaseException as exc:  # handed to the parent, which raises it
            import traceback

            detail = traceback.format_exc()
            try:
                conn.send((False, exc, detail))
                continue
            except Exception:  # an exception that cannot be pickled: its text instead
                reply = (False, RuntimeError(f"{type(exc).__name__}: {exc}"), detail)
        conn.send(reply)


def worker_count(settings: Settings, files: list[Path]) -> int:
    """How many processes examine rows: settings.workers, else one per idle CPU for large inputs.

    Idle, because workers only pay off on CPUs nobody else uses: on a saturated machine they add
    their hand-over costs (~20% more CPU in all) and finish no sooner (measured on the 2-core
    development machine under a load of 6-8). The count never changes the output.
    """
    if "fork" not in multiprocessing.get_all_start_methods():  # workers inherit the loaded tokenizer
        return 1
    if settings.workers is not None:
        return max(1, settings.workers)
    total = sum(p.stat().st_size for p in files)
    if total < _PARALLEL_MIN_BYTES:
        return 1
    idle = idle_cpus()
    return idle if idle >= 2 else 1


def idle_cpus(window: float = 0.2) -> int:
    """CPUs (of those this process may run on) that were idle over the last `window` seconds.

    From the per-CPU lines of /proc/stat. Not the load average: it trails by a minute, so right
    after other heavy work it still counts CPUs as busy that are idle.
    """
    mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))

    def times() -> dict[int, tuple[int, int]] | None:
        """cpu number -> (idle + iowait ticks, all ticks but guest time), for the CPUs in `mine`."""
        try:
            with open("/proc/stat") as f:
                rows = [line.split() for line in f if line.startswith("cpu") and line[3:4].isdigit()]
            return {n: (v[3] + v[4], sum(v[:8])) for n, v in ((int(r[0][3:]), [int(x) for x in r[1:]]) for r in rows) if n in mine}
        except (OSError, ValueError, IndexError):
            return None

    before = times()
    if not before:  # no /proc/stat (not Linux): the load average instead
        try:
            return max(0, len(mine) - int(os.getloadavg()[0]))
        except OSError:
            return len(mine)
    time.sleep(window)
    after = times() or before
    idle = 0.0
    for n, (idle0, total0) in before.items():
        idle1, total1 = after.get(n, (idle0, total0))
        idle += (idle1 - idle0) / (total1 - total0) if total1 > total0 else 1.0
    return round(idle)


class _ExaminerPool:
    """Examines the blocks of a file in worker processes; yields the results in input order.

    Block j goes to worker j mod N, each worker answers its blocks in order, and the parent reads
    the answer to the oldest block first: results come back in input order with no reordering.
    At most two blocks per worker are in flight, so memory stays a few blocks however large the
    file. The parent reads answers in its own thread: multiprocessing.Pool would add a task and a
    result thread that contend for the GIL with the thread deciding the rows. Workers are forked:
    they inherit the tokenizer and template without reloading them, and gc.freeze() keeps the
    parent's objects out of their garbage collections, so those pages stay shared instead of being
    copied into every worker.
    """

    def __init__(self, examiner: _Examiner, workers: int):
        examiner.length.cjk_profile()  # compute once here, not once per worker
        context = multiprocessing.get_context("fork")
        self.conns: list = []
        self.procs: list = []
        gc.freeze()
        try:
            for _ in range(workers):
                parent_end, child_end = context.Pipe()
                proc = context.Process(target=_worker_loop, args=(examiner, child_end), daemon=True)
                proc.start()
                child_end.close()
                self.conns.append(parent_end)
                self.procs.append(proc)
        except BaseException:
            self.close()
            raise

    def examined(self, label: str, source: str, path: Path) -> Iterator[tuple[list[tuple[int, bytes]], list[tuple]]]:
        """(the block's _numbered() lines, their examined rows) for each block, in file order."""
        pending: deque = deque()  # (numbered, worker index), oldest first
        lineno = 1
        for j, (offset, block) in enumerate(_blocks(path, _BLOCK_BYTES)):
            w = j % len(self.conns)
            try:
                self.conns[w].send((label, source, str(path), offset, len(block), lineno))
            except OSError:  # a broken pipe: the worker is gone
                self._died(w)
            numbered, n_lines = _numbered(block, lineno)  # while the worker examines the block
            pending.append((numbered, w))
            lineno += n_lines
            if len(pending) >= 2 * len(self.conns):
                yield self._answer(*pending.popleft())
        while pending:
            yield self._answer(*pending.popleft())

    def _answer(self, numbered: list[tuple[int, bytes]], w: int) -> tuple[list[tuple[int, bytes]], list[tuple]]:
        try:
            reply = self.conns[w].recv()
        except (EOFError, OSError):  # end of the pipe, or reset: the worker is gone
            self._died(w)
        if not reply[0]:
            exc = reply[1]
            exc.add_note(f"(raised in clean's worker process {self.procs[w].pid})\n{reply[2]}")
            raise exc
        return numbered, reply[1]

    def _died(self, w: int) -> None:
        self.procs[w].join(1)
        raise RuntimeError(f"clean: worker process {self.procs[w].pid} died (exit code {self.procs[w].exitcode})") from None

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:  # the worker is gone already
                pass
        for proc in self.procs:
            proc.join(1)  # at once when all answers were read; else (an error) it may be stuck sending one
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for conn in self.conns:
            conn.close()
        gc.unfreeze()


# ------------------------------------------------------------------------------------- the stage
class Cleaner:
    """The clean stage's core: stream raw files into train / eval / rejects and count everything.

    Rows are examined (by _Examiner, maybe in workers) and then decided here, in input order, a
    block at a time: dedupe against the rows kept so far, token counting of the rows the bounds
    cannot decide (one batched tokenizer call), writing.
    """

    def __init__(self, settings: Settings, length: ChatLength, rules: list[Rule]):
        self.s = settings
        self.length = length
        self.examiner = _Examiner(settings, length, rules)
        self.report = Report(dropped={r: 0 for r in (*READ_REASONS, *INVALID_REASONS, *(r.name for r in rules), *FILTER_REASONS)})
        # fingerprint -> (file index << 32 | line) of the kept row: fixed size per unique row.
        self._seen: dict[bytes, int] = {}
        self._files: list[str] = []
        self._since_check = 0  # rows the bound cleared since the last one counted as a check
        self._since_floor_check = 0  # likewise, rows the floor showed too long

    def clean_file(self, path: Path, out: Outputs, pool: _ExaminerPool | None = None, show_progress: bool = True) -> None:
        label = str(path)
        self._files.append(label)
        file_index = len(self._files) - 1
        source = path.stem
        counts = self.report.sources.setdefault(source, Counts())
        blocks = self._examined(label, source, path) if pool is None else pool.examined(label, source, path)
        if show_progress:
            blocks = progress(blocks, desc=f"clean {path.name}", unit="MB", total=-(-path.stat().st_size // _BLOCK_BYTES))
        for numbered, examined in blocks:
            self._decide(examined, [raw for _, raw in numbered], out, label, file_index, source, counts)

    def _examined(self, label: str, source: str, path: Path) -> Iterator[tuple[list[tuple[int, bytes]], list[tuple]]]:
        """_ExaminerPool.examined() in this process."""
        lineno = 1
        for _, block in _blocks(path, _BLOCK_BYTES):
            numbered, n_lines = _numbered(block, lineno)
            yield numbered, self.examiner.rows(label, source, numbered)
            lineno += n_lines

    def metrics(self) -> dict:
        return self.report.metrics()

    def _decide(self, batch: list[tuple], raws: list[bytes], out: Outputs, label: str, file_index: int, source: str, counts: Counts) -> None:
        """Decide a batch of examined rows in input order: dedupe, count tokens where needed, write.

        Items are _Examiner's tuples (layout above _Examiner), raws[i] the line of batch[i]:
        item[1] is the reason of a row it rejected, else None; a candidate's fields are
        fingerprint [2], to_eval [3], upper bound [4], kept line [5], rendering [6].
        """
        s, seen = self.s, self._seen
        if s.strict:  # the first unreadable or invalid row of the batch stops the stage
            for item in batch:
                if item[1] in _STRICT_REASONS:
                    raise LorapipeError(f"{label}:{item[0]}: {item[1]}: {item[2]} (data.clean.strict is true; set it to false to reject bad rows instead)")

        # The common case takes a few passes over the batch, each one C-level call (map, compress,
        # dict.setdefault) rather than Python code per row: every row passes through this one
        # process, so its cost per row bounds the stage's speed with any number of workers. Rows
        # that need more (rejects, rows to count) are handled one by one after.
        n = len(batch)
        reasons = list(map(_REASON, batch))
        candidates = list(range(n)) if reasons.count(None) == n else [i for i, r in enumerate(reasons) if r is None]
        items = batch if len(candidates) == n else list(map(batch.__getitem__, candidates))

        # Which rows get their tokens counted: those the upper bound cannot clear (unless they repeat
        # a row kept before: duplicates at once), and every bound_check_every-th row it did clear, a
        # run-time check of the bound.
        max_tokens, every = s.max_tokens, s.bound_check_every
        bounds = list(map(_BOUND, items))
        cleared = candidates
        unclear: list[int] = []
        if None in bounds or (bounds and max(bounds) > max_tokens):
            unclear = [i for i, b in zip(candidates, bounds) if b is None or b > max_tokens]
            unclear_set = set(unclear)
            cleared = [i for i in candidates if i not in unclear_set]
            unclear = [i for i in unclear if batch[i][2] not in seen]
        sampled = cleared[(every - 1 - self._since_check) % every::every]
        self._since_check = (self._since_check + len(cleared)) % every
        # Rows certainly too long by the floor are not tokenized either (bar the sampled checks).
        floors: dict[int, int] = {}
        exact: list[tuple[int, str]] = [(i, self._render(batch[i][0], raws[i], label)) for i in sampled]
        tokens: dict[int, int] = {}  # rows counted by the examiner, and below
        for i in unclear:
            rendering = batch[i][6]
            if rendering[2] is not None:
                raise LorapipeError(rendering[2])
            if rendering[3] is not None:  # counted already by the examiner
                tokens[i] = rendering[3]
            elif rendering[0] > max_tokens:
                floors[i] = rendering[0]
                self._since_floor_check += 1
                if self._since_floor_check >= every:
                    self._since_floor_check = 0
                    exact.append((i, rendering[1]))
            else:
                exact.append((i, rendering[1]))
        renderings = list(filter(None, map(_RENDERING, items)))
        # Rows tokenized: here, and by the examiner (also those found duplicates here since).
        self.report.token_counted += len(exact) + sum([1 for r in renderings if r[3] is not None])
        tokens.update(zip([i for i, _ in exact], self.length.count([t for _, t in exact])))
        for i, n_tokens in tokens.items():
            bound, floor = batch[i][4], floors.get(i, batch[i][6][0] if batch[i][6] else None)
            if (bound is not None and n_tokens > bound) or (floor is not None and n_tokens < floor):
                raise RuntimeError(f"{label}:{batch[i][0]}: {n_tokens} tokens, outside the bounds [{floor}, {bound}]: "
                                   "the length shortcut does not hold for this tokenizer/template")
        too_long = {i for i, n_tokens in tokens.items() if n_tokens > max_tokens} | floors.keys()

        # Dedupe: dict.setdefault over the fingerprints in input order inserts each new one with
        # its row's place and returns it (kept), or returns the place of the row kept before
        # (a duplicate).
        fitting = [i for i in candidates if i not in too_long] if too_long else candidates
        if len(fitting) != len(items):
            items = list(map(batch.__getitem__, fitting))
        places = list(map(or_, repeat(file_index << 32), map(_LINENO, items)))
        found = list(map(seen.setdefault, map(_FINGERPRINT, items), places))
        kept_mask = list(map(is_, found, places))
        kept_items = list(compress(items, kept_mask))
        lines = list(compress(raws if len(fitting) == n else map(raws.__getitem__, fitting), kept_mask))
        rewritten = list(map(_KEPT_LINE, kept_items))  # None: the raw line as read
        if rewritten.count(None) != len(rewritten):
            lines = [new or raw for new, raw in zip(rewritten, lines)]
        to_eval = list(map(_TO_EVAL, kept_items))
        if True in to_eval:
            evals = list(compress(lines, to_eval))
            train = list(compress(lines, map(not_, to_eval)))
        else:
            train, evals = lines, []

        # Reject records in input order: the examiner's (made already), duplicates, too long.
        dropped, files = self.report.dropped, self._files
        duplicate_of = dict(compress(zip(fitting, found), map(not_, kept_mask)))  # row -> place of the kept one
        rejects: list[bytes] = []  # with their line end
        for i in sorted(chain(duplicate_of, too_long, [i for i, r in enumerate(reasons) if r is not None] if len(candidates) < n else ())):
            item = batch[i]
            reason = item[1]
            if reason is not None:  # rejected by the examiner: its record is made already
                rejects.append(item[3])
                dropped[reason] += 1
                continue
            if i in too_long:
                n_tokens = tokens.get(i)
                reason, detail = ("too_long", f"{n_tokens} tokens > max_tokens {max_tokens}" if n_tokens is not None and n_tokens > max_tokens
                                  else f"at least {floors[i]} tokens > max_tokens {max_tokens}")
            else:
                where = duplicate_of[i]
                reason, detail = "duplicate", f"same user+assistant text as {files[where >> 32]}:{where & 0xFFFFFFFF}"
            rejects.append(_plain_reject_line(reason, detail, raws[i], label, item[0], source) if item[5] is None
                           else _row_reject_line(reason, detail, raws[i], item[5] is False, label, item[0], source))
            dropped[reason] += 1
        if train:
            out.train.write(b"\n".join(train) + b"\n")
        if evals:
            out.eval.write(b"\n".join(evals) + b"\n")
        out.rejects.write(b"".join(rejects))
        for c in (counts, self.report.total):
            c.read += n
            c.train += len(train)
            c.eval += len(evals)
            c.rejected += len(rejects)

    def _render(self, lineno: int, raw: bytes, label: str) -> str:
        try:
            return self.length.render(self.examiner.messages_of(raw))
        except Exception as exc:  # e.g. a template that raises on a system turn (jinja's raise_exception)
            raise LorapipeError(f"{label}:{lineno}: the base model's chat template cannot render this row: {exc}") from None


def clean_files(files: list[Path], out: Outputs, settings: Settings, length: ChatLength, rules: list[Rule], show_progress: bool = True) -> dict:
    """Clean `files` in order into `out`; return the metrics (accounting checked).

    The output is the same whatever the number of worker processes: workers only examine rows,
    and this process takes their results in input order.
    """
    cleaner = Cleaner(settings, length, rules)
    workers = worker_count(settings, files)
    # The stage makes a few short-lived tuples and lists per row, none in a reference cycle:
    # garbage collection every 700 of them (the default) costs ~10% of its CPU and frees nothing.
    # Rarer here (workers inherit it); the default is back afterwards.
    thresholds = gc.get_threshold()
    gc.set_threshold(max(thresholds[0], 50_000), *thresholds[1:])
    pool = None
    try:
        pool = _ExaminerPool(cleaner.examiner, workers) if workers > 1 else None
        for path in files:
            cleaner.clean_file(path, out, pool, show_progress=show_progress)
    finally:
        if pool is not None:
            pool.close()
        gc.set_threshold(*thresholds)
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
    if not rowscan.available():
        info("clean: the native row scanner is not built (run `make setup`); cleaning in Python only, about 2x slower")
    settings = Settings(max_tokens=c.max_tokens, strict=c.strict, system_prompt=c.system_prompt,
                        eval_fraction=split.eval_fraction, salt=split.salt)
    with contextlib.ExitStack() as stack:
        handles = []
        for final in (paths.TRAIN_JSONL, paths.EVAL_JSONL, paths.REJECTS_JSONL):
            tmp = stack.enter_context(atomic_path(final))
            handles.append(stack.enter_context(open(tmp, "wb")))  # lines are written as UTF-8 bytes
        metrics = clean_files(files, Outputs(*handles), settings, length, rules)
    write_json(METRICS_JSON, metrics)
    if metrics["kept"] == 0:
        info(f"warning: no row survived cleaning; see {paths.REJECTS_JSONL}")
    return {"read": metrics["read"], "kept": metrics["kept"], "train": metrics["train"],
            "eval": metrics["eval"], "rejected": metrics["rejected"]}
