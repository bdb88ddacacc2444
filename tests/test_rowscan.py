"""The clean stage's native row scanner (core.rowscan, C) against the Python path it shortcuts.

Whatever the scanner takes must equal what core.sharegpt gives (roles, normalised replies, the
bytes the fingerprint hashes); whatever it is unsure of it must give back (None), and only rows the
Python path also finds plain may be taken. The stage's outputs must be byte-identical either way.
"""

from __future__ import annotations

import hashlib
import json
import random
from array import array
from pathlib import Path

import orjson
import pytest

from lorapipe.core import rowscan
from lorapipe.core.sharegpt import fingerprint, normalise
from lorapipe.stages import clean

REPO = Path(__file__).resolve().parents[1]


SALT = b"lorapipe\x00"  # as the clean stage makes it from data.split.salt
CUT = int(0.3 * 2**64)  # eval_fraction 0.3: both sides occur


def reference(raw: bytes, salt: bytes = SALT, cut: int = CUT):
    """What the Python path finds for a line: None if it is not a plain row, else (roles,
    normalised replies, fingerprint, to_eval, canonical: the line is orjson.dumps of its value)."""
    plain = clean._plain_row(raw)
    if plain is None:
        return None
    _, roles, contents = plain
    dialogue = [normalise(c) for r, c in zip(roles, contents) if r != "system"]
    fp = fingerprint(zip(("user", "assistant") * len(dialogue), dialogue))
    to_eval = int.from_bytes(hashlib.blake2b(salt + fp, digest_size=8).digest(), "big") < cut
    return roles, dialogue[1::2], fp, to_eval, orjson.dumps(orjson.loads(raw)) == raw


def check(lines: list[bytes], salt: bytes = SALT, cut: int = CUT) -> int:
    """Assert the scanner agrees with the Python path on every line; return how many it took."""
    taken = 0
    for raw, found in zip(lines, rowscan.scan(lines, salt, cut)):
        if found is None:
            continue
        taken += 1
        assert found == reference(raw, salt, cut), raw[:200]
    return taken


def line(*turns: str, system: str | None = None, compact: bool = True, ensure_ascii: bool = False) -> bytes:
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return json.dumps({"messages": messages, "source": "s", "origin": "o:1"}, ensure_ascii=ensure_ascii,
                      separators=(",", ":") if compact else None).encode("utf-8")


def test_scanner_is_built():
    """`make setup` compiles it (pip install -e .); without it the stage would run ~2x slower."""
    assert rowscan.available()


def test_a_scanner_built_from_another_source_is_refused(monkeypatch):
    import types

    from lorapipe.core.errors import LorapipeError

    stale = types.SimpleNamespace(VERSION=rowscan.SCANNER_VERSION - 1, __file__="_rowscan.so", scan=rowscan._rowscan.scan)
    monkeypatch.setattr(rowscan, "_rowscan", stale)
    with pytest.raises(LorapipeError, match="built from another version of _rowscan.c.*make setup"):
        rowscan.scan([line("a", "b")], SALT, CUT)
    monkeypatch.setattr(rowscan, "_rowscan", None)  # not built at all: every line goes the Python path
    assert rowscan.scan([line("a", "b")], SALT, CUT) == [None]


def test_table_maps_each_code_point_as_normalise_does():
    table = array("I")
    table.frombytes(rowscan.normalisation_table())
    handled = 0
    for c, m in enumerate(table):
        if m == rowscan.NOT_HANDLED:
            continue
        handled += 1
        expected = "" if m & rowscan.WHITESPACE else chr(m & ~rowscan.WHITESPACE)
        assert normalise(chr(c)) == expected, hex(c)
    assert handled > 150_000  # nearly all of the BMP and the emoji / CJK planes
    for ch in "ßİ\u0301\u1161\u11a8":  # several characters out / may compose with the one before
        assert table[ord(ch)] == rowscan.NOT_HANDLED


# Characters chosen to meet every rule the table relies on: full-width forms, compatibility
# characters, Hangul syllables and jamo (which compose), combining marks, case folding that is not
# lower-casing (Cherokee, sigma), multi-character folds, every kind of whitespace, emoji, controls.
POOL = ("aZ 09.,!?\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f\x00\x01\x7f\"\\/"
        "ＡＺａｚ０９，？！　（）＂＼"
        "中文情绪支持你好吗。、《》「」"
        "가각힣ᄀᄁ\u1161\u1175\u11a8\u11c2ㄱ"
        "éÉèàÅÅΩΩℌℍ\u0301\u0308\u0327"
        "ΣσςßẞİıﬁﬃᏸᎰ"
        "\xa0\u2000\u2007\u2028\u2029\u202f\u205f\u3000\x85\u1680\u200b\ufeff"
        "😊👍🏽\U0001f1e8\U0001f1f3𠀀\U00030000")


def test_random_texts_normalise_exactly_or_are_given_back():
    rng = random.Random(0)
    lines, taken_expected = [], 0
    table = array("I")
    table.frombytes(rowscan.normalisation_table())
    for _ in range(4000):
        text = "".join(rng.choices(POOL, k=rng.randint(1, 14)))
        if text.isspace():
            continue
        lines.append(line("x " + text, text + " y"))
        lines.append(line(text, "ok", text, system=text if rng.random() < 0.3 else None, compact=rng.random() < 0.5,
                          ensure_ascii=rng.random() < 0.3))
        taken_expected += all(ord(ch) < len(table) and table[ord(ch)] != rowscan.NOT_HANDLED for ch in text)
    taken = check(lines)
    assert taken >= taken_expected  # every line of table characters only is taken (2 per text, some more)


# Lines around the plain layout: each is either taken with the Python path's values, or given back.
EDGE = [
    b'{"messages":[{"role":"user","content":"a\\"b\\\\c\\/d\\be\\ff\\ng\\rh\\ti"},{"role":"assistant","content":"ok \\u00e9\\u00C9 \\ud83d\\ude00"}],"source":"s","origin":"o"}',
    b'{"messages":[{"role":"user","content":"lone \\ud800"},{"role":"assistant","content":"ok"}],"source":"s","origin":"o"}',
    b'{"messages":[{"role":"user","content":"lone \\udc00 low"},{"role":"assistant","content":"ok"}],"source":"s","origin":"o"}',
    b'{"messages":[{"role":"user","content":"bad \\x"},{"role":"assistant","content":"ok"}],"source":"s","origin":"o"}',
    b'{"messages":[{"role":"user","content":"bad \\u12"},{"role":"assistant","content":"ok"}],"source":"s","origin":"o"}',
    b'{"messages":[{"role":"user","content":"nul \\u0000 here"},{"role":"assistant","content":"ok"}],"source":"s","origin":"o"}',
    b'{"messages":[{"role":"user","content":"caf\xc3\xa9 \xff"},{"role":"assistant","content":"ok"}],"source":"s","origin":"o"}',
    b'{"messages":[{"role":"user","content":"overlong \xc0\xaf"},{"role":"assistant","content":"ok"}],"source":"s","origin":"o"}',
    b'{"messages":[{"role":"user","content":"surrogate \xed\xa0\x80"},{"role":"assistant","content":"ok"}],"source":"s","origin":"o"}',
    b'{"messages":[{"role":"user","content":"cut \xe4\xb8"},{"role":"assistant","content":"ok"}],"source":"s","origin":"o"}',
    b'{"messages":[{"role":"user","content":"raw\ttab"},{"role":"assistant","content":"ok"}],"source":"s","origin":"o"}',
    b'{"messages":[{"role":"user","content":"raw \x01 control"},{"role":"assistant","content":"ok"}],"source":"s","origin":"o"}',
    b'  { "messages" : [ { "role" : "user" , "content" : "spaced" } , { "role" : "assistant" , "content" : "out" } ] , "source" : "s" , "origin" : "o" }  ',
    b'{"messages":[{"content":"key order","role":"user"},{"role":"assistant","content":"ok"}],"source":"s","origin":"o"}',
    b'{"source":"s","messages":[{"role":"user","content":"row key order"},{"role":"assistant","content":"ok"}],"origin":"o"}',
    b'{"messages":[{"role":"user","content":"extra"},{"role":"assistant","content":"ok"}],"source":"s","origin":"o","x":1}',
    b'{"messages":[{"role":"user","content":"no origin"},{"role":"assistant","content":"ok"}],"source":"s"}',
    b'{"messages":[{"role":"user","content":"number source"},{"role":"assistant","content":"ok"}],"source":1,"origin":"o"}',
    b'{"messages":[{"role":"user","content":"msg extra","name":"x"},{"role":"assistant","content":"ok"}],"source":"s","origin":"o"}',
    b'{"messages":[{"role":"User","content":"caps role"},{"role":"assistant","content":"ok"}],"source":"s","origin":"o"}',
    b'{"messages":[{"role":"us\\u0065r","content":"escaped role"},{"role":"assistant","content":"ok"}],"source":"s","origin":"o"}',
    b'{"messages":[{"role":"bot","content":"hi"},{"role":"assistant","content":"ok"}],"source":"s","origin":"o"}',
    b'{"messages":[{"role":"user","content":""},{"role":"assistant","content":"ok"}],"source":"s","origin":"o"}',
    b'{"messages":[{"role":"user","content":"\\u3000 \\n"},{"role":"assistant","content":"ok"}],"source":"s","origin":"o"}',
    b'{"messages":[{"role":"system","content":" "},{"role":"user","content":"hi"},{"role":"assistant","content":"ok"}],"source":"s","origin":"o"}',
    b'{"messages":[{"role":"user","content":"hi"},{"role":"system","content":"late"},{"role":"assistant","content":"ok"}],"source":"s","origin":"o"}',
    b'{"messages":[{"role":"user","content":"a"},{"role":"user","content":"b"},{"role":"assistant","content":"ok"}],"source":"s","origin":"o"}',
    b'{"messages":[{"role":"user","content":"ends"},{"role":"assistant","content":"ok"},{"role":"user","content":"with user"}],"source":"s","origin":"o"}',
    b'{"messages":[{"role":"system","content":"only system"}],"source":"s","origin":"o"}',
    b'{"messages":[],"source":"s","origin":"o"}',
    b'{"messages":[{"role":"user","content":"trailing"},{"role":"assistant","content":"ok"}],"source":"s","origin":"o"} x',
    b'{"messages":[{"role":"user","content":"trailing comma"},{"role":"assistant","content":"ok"},],"source":"s","origin":"o"}',
    b'{"messages":[{"role":"user","content":"dup key","content":"two"},{"role":"assistant","content":"ok"}],"source":"s","origin":"o"}',
    b'{"messages":[{"role":"user","content":"trunc',
    b'{"messages":[{"role":"user","content":"s\\u00dfe \\u0130 A\\u030a \\u1100\\u1161"},{"role":"assistant","content":"\\u0041\\u0301"}],"source":"s","origin":"o"}',
    b'{"messages":[{"role":"user","content":"source escapes"},{"role":"assistant","content":"ok"}],"source":"\\u00e9\\"","origin":"o \\ud83d\\ude00"}',
    b'{"messages":[{"role":"user","content":"source lone"},{"role":"assistant","content":"ok"}],"source":"\\ud800","origin":"o"}',
    b'[{"role":"user","content":"array"}]',
    b'"just a string"',
]


def test_edge_lines_are_taken_exactly_or_given_back():
    found = rowscan.scan(EDGE, SALT, CUT)
    taken = {i for i, f in enumerate(found) if f is not None}
    assert check(EDGE) == len(taken)
    # What must be taken: valid rows in the two layouts, with every escape JSON has.
    assert {0, 5, 12, 35} <= taken
    # What must be given back: anything invalid, lone surrogates, other layouts, characters out of the table.
    assert not taken & {1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 36, 37, 38}


def test_reject_record_of_a_canonical_line_is_made_without_parsing_it():
    """clean._plain_reject_line (splicing the line into the record) writes the same bytes as
    parsing the row and serialising the record."""
    lines = [line("a", "b"), line("\"quoted\" \\ \n \x1f \x7f \u2028 /", "ok"), line("x", "y", system="s")] + [
        json.dumps({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "source": src, "origin": origin},
                   ensure_ascii=False, separators=(",", ":")).encode() for src, origin in
        [("s", ""), ("é\"\\,\"origin\":", "o,\"origin\":x"), ("", "😀"), ("\x00", ",\"source\":")]]
    found = rowscan.scan(lines, SALT, CUT)
    assert all(f is not None and f[4] for f in found)  # all taken, all canonical
    for raw in lines:
        for label in ("data/raw/x.jsonl", "data/raw/é \"q\".jsonl", "data/raw/\udcff.jsonl"):
            for reason, detail in (("duplicate", f"same user+assistant text as {label}:3"), ("too_long", "at least 5000 tokens > max_tokens 2048")):
                fast = clean._plain_reject_line(reason, detail, raw, label, 7, "x")
                assert fast == clean._row_reject_line(reason, detail, raw, True, label, 7, "x"), (raw, label)
                assert json.loads(fast)["row"] == json.loads(raw)


def test_mutated_lines_are_taken_exactly_or_given_back():
    """Random byte damage to valid lines (flips, JSON and UTF-8 fragments, cuts): the scanner never
    takes a line the Python path would read otherwise. (Also run under AddressSanitizer while the
    scanner was written: 100,000 cases, no error.)"""
    rng = random.Random(2)
    seeds = EDGE + [line("x " + t, t + " y", system=t if i % 3 == 0 else None, compact=i % 2 == 0)
                    for i, t in enumerate("".join(rng.choices(POOL, k=rng.randint(1, 12))) for _ in range(100)) if not t.isspace()]
    fragments = [b'"', b"\\", b"\\u", b"\\ud83d", b"\\ude00", b"\xe4", b"\xb8", b"\xf0\x9f", b"\x00", b" ", b",", b"}", b"]", b"{",
                 b":", b"\\n", b'"role":"user"', b'"content":"', b"\xed\xa0\x80", b"\xc0\x80", b"\xff"]
    lines = []
    for _ in range(5000):
        raw = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(raw) + 1)
            op = rng.random()
            if op < 0.3 and at < len(raw):
                raw[at] = rng.randrange(256)
            elif op < 0.7:
                raw[at:at] = rng.choice(fragments)
            elif at < len(raw):
                del raw[at:at + rng.randint(1, 8)]
        lines.append(bytes(raw))
    assert check(lines) > 20


def test_many_turns_and_long_texts():
    long_turns = [f"turn {i} " + "很长的句子，" * (i % 50) for i in range(5000)]
    lines = [line(*long_turns[:4000]), line(*long_turns[:4096]), line(*long_turns[:4100]), line("x" * 2_000_000, "ok")]
    assert check(lines) >= 2


@pytest.mark.parametrize("salt,cut", [(b"\x00", 0), (b"x" * 200 + b"\x00", 2**64), (b"s\x00", 2**64 - 1), (b"", 2**70), (b"k\x00", 2**63)])
def test_fingerprint_and_split_side_match_hashlib(salt, cut):
    """BLAKE2b in C against hashlib: texts across the 128-byte block boundaries, every cut."""
    lines = [line("a" * n, "b" * m) for n in (1, 50, 60, 61, 62, 63, 124, 125, 126, 200, 300) for m in (1, 2, 120, 250)]
    assert check(lines, salt, cut) == len(lines)
    sides = {found[3] for found in rowscan.scan(lines, salt, cut)}
    assert sides == ({False} if cut == 0 else {True} if cut >= 2**64 else sides)
    with pytest.raises(ValueError, match="must not be negative"):
        rowscan.scan(lines, salt, -1)


@pytest.mark.parametrize("workers", [1, 2])
def test_stage_output_is_byte_identical_with_and_without_the_scanner(smollm2_tokenizer_dir, tmp_path, monkeypatch, workers):
    rng = random.Random(1)
    raw = tmp_path / "raw.jsonl"
    # A BOM, CRLF and blank lines, the edge lines, then many rows (~1/4 duplicates) of pool characters.
    body = [b"\xef\xbb\xbf" + line("BOM", "first line") + b"\r\n\r\n", b"\r\n".join(EDGE) + b"\r\n   \n"]
    texts = ["".join(rng.choices(POOL, k=rng.randint(1, 10))) for _ in range(300)]
    for i in range(3000):
        text = texts[rng.randrange(300)]
        body.append(line(f"I feel {text}", f"I'm sorry, that sounds hard {len(text)}.", system="Be kind." if i % 5 == 0 else None,
                         compact=i % 2 == 0) + b"\n")
    raw.write_bytes(b"".join(body))
    monkeypatch.setattr(clean, "_BLOCK_BYTES", 20_000)  # several blocks
    length = clean.ChatLength(smollm2_tokenizer_dir)
    rules = clean.load_rules(REPO / "data" / "rules.yaml")
    outputs = {}
    for native in (True, False):
        for prompt in (None, "You are a kind listener."):
            names = [tmp_path / f"{native}-{prompt is None}-{n}.jsonl" for n in ("train", "eval", "rejects")]
            handles = [open(p, "wb") for p in names]
            settings = clean.Settings(native=native, workers=workers, system_prompt=prompt)
            metrics = clean.clean_files([raw], clean.Outputs(*handles), settings, length, rules, show_progress=False)
            for h in handles:
                h.close()
            outputs[native, prompt] = ([p.read_bytes() for p in names], metrics)
    for prompt in (None, "You are a kind listener."):
        assert outputs[True, prompt] == outputs[False, prompt]
    kept = outputs[True, None][1]["kept"]
    assert 200 < kept < 400 and outputs[True, None][1]["dropped"]["duplicate"] > 2500
