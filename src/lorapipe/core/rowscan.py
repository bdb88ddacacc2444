"""The clean stage's native fast path for rows exactly as ingest writes them (C: _rowscan.c).

`scan(lines, salt, eval_cut)` answers, for each raw line, None (not taken: examine it in Python)
or (roles, normalised replies, fingerprint, to_eval, canonical): the same values the Python path
gives for that row (`plain_turns` roles, `normalise` of the replies, `dialogue_fingerprint`, the
clean stage's split side), and whether the line is exactly orjson.dumps() of its value, found in
one pass over the line's bytes without building its JSON objects: a fraction of the CPU per row.

The Unicode part is Python's own: normalisation_table() maps each code point to
normalise()'s output for it (NFKC, then casefold), computed here with the running Python's
unicodedata. A text is normalised one code point at a time only when that is exact, so the table
holds only code points for which it is: a single-character result, and no canonical composition or
reordering can involve the character (a starter that never comes second in a composition, nor does
its decomposition's first character). Any other code point makes the scanner give the line back.
tests/test_rowscan.py checks the scanner against the Python path on every kind of line.
"""

from __future__ import annotations

import unicodedata
from array import array
from functools import cache

from lorapipe.core.errors import LorapipeError

# The _rowscan.c this module is written for (its VERSION): bumped together on any change there.
SCANNER_VERSION = 2

try:
    from lorapipe.core import _rowscan
except ImportError:  # not compiled (a source tree without `pip install -e .`): the Python path only
    _rowscan = None

# Code points the table covers: the BMP, emoji and the common CJK extensions; anything above is
# given back to Python.
TABLE_SIZE = 0x30000
NOT_HANDLED = 0xFFFFFFFF
WHITESPACE = 0x80000000


def available() -> bool:
    """True when the scanner is compiled; an error when it was compiled from another source."""
    if _rowscan is None:
        return False
    if getattr(_rowscan, "VERSION", None) != SCANNER_VERSION:
        raise LorapipeError(f"{_rowscan.__file__} was built from another version of _rowscan.c "
                            f"({getattr(_rowscan, 'VERSION', None)}, this code needs {SCANNER_VERSION}): run `make setup` to rebuild it")
    return True


@cache
def _second_in_composition() -> frozenset[str]:
    """Characters that can come second in a canonical composition (so may compose with the one
    before): the second of every two-character canonical decomposition, and the Hangul vowel and
    trailing jamo (Hangul syllables compose algorithmically, without decomposition data)."""
    second = {chr(c) for c in (*range(0x1161, 0x1176), *range(0x11A8, 0x11C3))}
    decomposition = unicodedata.decomposition
    for c in range(0x110000):
        d = decomposition(chr(c))
        if d and d[0] != "<":
            parts = d.split()
            if len(parts) == 2:
                second.add(chr(int(parts[1], 16)))
    return frozenset(second)


@cache
def normalisation_table() -> bytes:
    """uint32 per code point below TABLE_SIZE (native byte order): normalise()'s one-character
    output for it, with WHITESPACE set when that output is whitespace (collapsed), or NOT_HANDLED."""
    second = _second_in_composition()
    nfkc, nfkd, combining = (lambda s: unicodedata.normalize("NFKC", s)), (lambda s: unicodedata.normalize("NFKD", s)), unicodedata.combining
    table = array("I", [NOT_HANDLED]) * TABLE_SIZE
    for c in range(TABLE_SIZE):
        if 0xD800 <= c <= 0xDFFF:  # surrogates: never valid text
            continue
        ch = chr(c)
        if c < 0x80:  # ASCII: NFKC is the identity, casefold is lower
            mapped = ch.lower()
        else:
            if combining(ch) or ch in second:
                continue
            first = nfkd(ch)[:1]
            if combining(first) or first in second:
                continue
            mapped = nfkc(ch).casefold()
            if len(mapped) != 1:
                continue
        table[c] = ord(mapped) | (WHITESPACE if mapped.isspace() else 0)
    return table.tobytes()


def scan(lines: list[bytes], salt: bytes, eval_cut: int) -> list[tuple[tuple[str, ...], list[str], bytes, bool, bool] | None]:
    """One entry per line (see the module doc); all None when the scanner is not compiled.

    to_eval is blake2b(salt + fingerprint, digest_size=8) read big-endian < eval_cut (>= 0).
    """
    if not available():
        return [None] * len(lines)
    if eval_cut < 0:
        raise ValueError(f"eval_cut must not be negative, got {eval_cut}")
    return _rowscan.scan(lines, normalisation_table(), salt, eval_cut)
