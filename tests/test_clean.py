"""Stage clean: validation, reply rules, template-token length filter, fingerprint dedupe, stable split,
accounting. Runs the real stage on small files with SmolLM2's real tokenizer (no model weights)."""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import pytest

from lorapipe import cli
from lorapipe.core.errors import LorapipeError
from lorapipe.core.sharegpt import fingerprint, normalise, normalise_many
from lorapipe.params import parse
from lorapipe.stages import clean

REPO = Path(__file__).resolve().parents[1]


def row(*turns: str, system: str | None = None, source: str = "s", origin: str | None = None) -> dict:
    """row("hi", "hello!") -> a ShareGPT row alternating user/assistant from the first turn."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
    out = {"messages": messages, "source": source}
    if origin:
        out["origin"] = origin
    return out


def write_raw(project: Path, name: str, rows: list) -> Path:
    path = project / "data" / "raw" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def project(tmp_path, smollm2_tokenizer_dir, monkeypatch) -> Path:
    """A repo-shaped temp dir: models/base (tokenizer files only), data/rules.yaml; cwd set to it."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base").symlink_to(smollm2_tokenizer_dir, target_is_directory=True)
    (tmp_path / "data").mkdir()
    shutil.copy(REPO / "data" / "rules.yaml", tmp_path / "data" / "rules.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(clean_params: dict | None = None, split: dict | None = None) -> dict:
    return clean.run(parse({"data": {"clean": clean_params or {}, "split": split or {}}}))


def kept_rows(project: Path) -> list[dict]:
    return read(project / "data/clean/train.jsonl") + read(project / "data/clean/eval.jsonl")


@pytest.fixture(scope="module")
def length(smollm2_tokenizer_dir) -> clean.ChatLength:
    return clean.ChatLength(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def rules() -> list[clean.Rule]:
    return clean.load_rules(REPO / "data" / "rules.yaml")


# ----------------------------------------------------------------------------- the whole stage
def test_stage_outputs_metrics_and_accounting_through_the_cli(project, capsys):
    write_raw(project, "alpha", [
        row("I feel lonely since I moved.", "That sounds hard. Do you want to talk about it?", origin="a.jsonl:1"),
        row("我最近压力很大。", "听到你这么说我很难过，愿意多说说吗？", origin="a.jsonl:2"),
        row("help", "I cannot help with that.", origin="a.jsonl:3"),
        row("I FEEL LONELY  since I moved.", "That sounds hard.  Do you want to talk about it?", origin="a.jsonl:4"),
    ])
    write_raw(project, "beta", [row(f"Question number {i} about my week?", f"Thanks for sharing day {i}, tell me more.") for i in range(40)])
    (project / "params.yaml").write_text("data:\n  split:\n    eval_fraction: 0.25\n", encoding="utf-8")

    assert cli.main(["clean", "--params", "params.yaml"]) == 0
    summary = capsys.readouterr().out.strip()
    assert summary.startswith("[clean] read=44 kept=42 train=") and "rejected=2" in summary

    metrics = json.loads((project / "metrics/data.json").read_text())
    assert (metrics["read"], metrics["kept"], metrics["rejected"]) == (44, 42, 2)
    assert metrics["train"] + metrics["eval"] == metrics["kept"] and metrics["eval"] > 0
    assert metrics["dropped"]["refusal"] == 1 and metrics["dropped"]["duplicate"] == 1
    assert sum(metrics["dropped"].values()) == metrics["rejected"]
    assert metrics["sources"]["alpha"] == {"read": 4, "kept": 2, "train": metrics["sources"]["alpha"]["train"],
                                           "eval": metrics["sources"]["alpha"]["eval"], "rejected": 2}
    assert metrics["sources"]["beta"]["read"] == 40 and metrics["sources"]["beta"]["kept"] == 40

    kept = kept_rows(project)
    assert len(kept) == 42 and all(set(r) == {"messages", "source", "origin"} for r in kept)
    # origin is kept from ingest when present, else the raw file:line
    assert {r["origin"] for r in kept if r["origin"].startswith("a.")} == {"a.jsonl:1", "a.jsonl:2"}
    assert "data/raw/beta.jsonl:40" in {r["origin"] for r in kept}
    rejects = read(project / "data/clean/rejects.jsonl")
    assert [(r["reason"], r["at"], r["origin"], r["source"]) for r in rejects] == [
        ("refusal", "data/raw/alpha.jsonl:3", "a.jsonl:3", "s"),
        ("duplicate", "data/raw/alpha.jsonl:4", "a.jsonl:4", "s"),
    ]
    assert rejects[1]["detail"].endswith("data/raw/alpha.jsonl:1") and rejects[1]["row"]["messages"][0]["content"] == "I FEEL LONELY  since I moved."
    assert not list(project.rglob("*.partial"))


def test_dedupe_is_normalised_keeps_the_first_and_the_input_order(project):
    write_raw(project, "s", [
        row("Hello there", "Hi! How are you feeling today?"),
        row("Different question", "A different, longer answer here."),
        row("  hello   THERE ", "hi! how are you feeling today?"),          # case + whitespace
        row("Ｈｅｌｌｏ　there", "Hi！ How are you feeling today？"),          # full-width forms (NFKC)
        row("Hello there", "Hi! How are you feeling today?", system="Be kind."),  # system turn ignored
        row("Hello", "there Hi! How are you feeling today?"),              # text moved between turns: not a dup
        row("Different question", "A different, longer answer here."),
    ])
    summary = run(split={"eval_fraction": 0.0})
    assert summary["kept"] == 3 and summary["rejected"] == 4
    kept = read(project / "data/clean/train.jsonl")
    assert [r["origin"] for r in kept] == ["data/raw/s.jsonl:1", "data/raw/s.jsonl:2", "data/raw/s.jsonl:6"]
    rejects = read(project / "data/clean/rejects.jsonl")
    assert [(r["at"].rsplit(":", 1)[1], r["reason"]) for r in rejects] == [("3", "duplicate"), ("4", "duplicate"), ("5", "duplicate"), ("7", "duplicate")]
    assert [r["detail"].rsplit(":", 1)[1] for r in rejects] == ["1", "1", "1", "2"]


def test_accounting_check_refuses_counts_that_do_not_add_up():
    report = clean.Report(total=clean.Counts(read=3, train=1, eval=1, rejected=1), dropped={"duplicate": 1},
                          sources={"s": clean.Counts(read=3, train=1, eval=1, rejected=1)})
    assert report.metrics()["read"] == 3
    report.dropped["duplicate"] = 0
    with pytest.raises(RuntimeError, match="dropped per reason sum to 0, rejected is 1"):
        report.metrics()
    report.dropped["duplicate"], report.total.read = 1, 4
    with pytest.raises(RuntimeError, match=r"read 4 != kept 2 \+ rejected 1"):
        report.metrics()


def test_fingerprint_is_fixed_size_and_normalisation_matches_per_text():
    texts = ["Ｈｅｌｌｏ，  World\n", " 你好！ ", "Straße\tZWEI", "a\x00b"]
    assert normalise_many(texts) == [normalise(t) for t in texts] == ["hello, world", "你好!", "strasse zwei", "a\x00b"]
    fp = fingerprint([("user", "a" * 10_000), ("assistant", "b")])
    assert isinstance(fp, bytes) and len(fp) == 16
    assert fingerprint([("user", "ab"), ("assistant", "c")]) != fingerprint([("user", "a"), ("assistant", "bc")])


def test_block_helpers_equal_their_one_row_versions():
    """normalise_many, dialogue_fingerprints and plain_turns_many (one pass over a block) give what
    the one-text / one-row functions give, on random texts and random valid and invalid messages."""
    import random

    from lorapipe.core.sharegpt import dialogue_fingerprint, dialogue_fingerprints, plain_turns, plain_turns_many

    rng = random.Random(7)
    alphabet = ([chr(c) for c in range(0x20, 0x250)] + ["\x00", "\t", "\n", "\x1c", "\x85", "\xa0", "\u2028", "\u3000",
                "，", "！", "Ａ", "ﬁ", "ẞ", "İ", "你", "好", "%s", "  "])
    for _ in range(300):
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(rng.randint(1, 12))]
        if rng.random() < 0.4:
            texts = [t.encode("ascii", "ignore").decode() for t in texts]
        assert normalise_many(texts) == [normalise(t) for t in texts]
    dialogues = [normalise_many(["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9)))
                                 for _ in range(2 * rng.randint(1, 20))]) for _ in range(200)]
    ends = [sum(map(len, dialogues[:k + 1])) for k in range(len(dialogues))]
    assert dialogue_fingerprints([t for d in dialogues for t in d], ends) == list(map(dialogue_fingerprint, dialogues))

    def message(valid: bool):
        good = {"role": "user", "content": "hi"}
        return good if valid else rng.choice([{"role": "user"}, {"role": "user", "content": 3}, {"role": "user", "content": " "},
                                              {"role": "x", "content": "hi"}, "text", {"role": "user", "content": "hi", "name": "a"},
                                              {"role": ["user"], "content": "hi"}])

    def messages(valid: bool):
        n = rng.randint(1, 3)
        turns = [{"role": r, "content": f"t{i}"} for i, r in enumerate(["user", "assistant"] * n)]
        if rng.random() < 0.3:
            turns.insert(0, {"role": "system", "content": "s"})
        if not valid:
            kind = rng.randrange(4)
            if kind == 0:
                turns[rng.randrange(len(turns))] = message(False)
            elif kind == 1:
                turns.append({"role": "user", "content": "again"})
            elif kind == 2:
                turns = []
            else:
                return {"not": "a list"}
        return turns

    for _ in range(200):
        lists = [messages(rng.random() < 0.9) for _ in range(rng.randint(1, 8))]
        assert plain_turns_many(lists) == [plain_turns(m) for m in lists]
    lists = [messages(True) for _ in range(50)]
    assert plain_turns_many(lists) == [plain_turns(m) for m in lists] and None not in plain_turns_many(lists)


def test_too_long_counts_tokens_of_the_chat_template_rendering(project, smollm2_tokenizer_dir):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(smollm2_tokenizer_dir))
    short, longer = row("How are you?", "I am fine, thanks for asking."), row("How are you?", "I am fine, thanks for asking. " * 3)
    # The template adds SmolLM2's default system prompt: the count is of the full rendering.
    n_short = len(tok.apply_chat_template(short["messages"], tokenize=True, return_dict=False))
    n_longer = len(tok.apply_chat_template(longer["messages"], tokenize=True, return_dict=False))
    assert n_short > 20 + len(tok("How are you?\nI am fine, thanks for asking.")["input_ids"])
    write_raw(project, "s", [short, longer])

    assert run({"max_tokens": n_short}, {"eval_fraction": 0.0})["kept"] == 1  # n_short <= max: kept
    rejects = read(project / "data/clean/rejects.jsonl")
    assert [r["reason"] for r in rejects] == ["too_long"] and rejects[0]["detail"].startswith(f"{n_longer} tokens")
    assert run({"max_tokens": n_short - 1})["kept"] == 0
    assert json.loads((project / "metrics/data.json").read_text())["dropped"]["too_long"] == 2


def test_render_matches_apply_chat_template_and_the_size_bound_holds(length, smollm2_tokenizer_dir):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(smollm2_tokenizer_dir))
    samples = [
        row("hi", "hello"), row("最近工作压力很大，晚上总是睡不着。", "听到你这么说我很难过。", system="你是一位温暖的助手。"),
        row("a", "b", "c", "d"), row("emoji 😊😊 and  spaces\n\n", "Ünïcödé ñ ß 𝒳 " * 50), row("#" * 500, "=" * 300),
        row("我和最好的朋友吵架了，心里很难受。" * 40, "你的感受是真实的，也是可以被理解的。" * 40),
    ]
    k, shared = length.cjk_profile()  # the vocabulary's ideographs that share a token with another one
    for i in tok.get_vocab().values():
        ideographs = clean._CJK.findall(tok.decode([i]))
        assert len(ideographs) <= k and (len(ideographs) < 2 or all(shared[ord(c)] for c in ideographs))
    for r in samples:
        text = length.render(r["messages"])
        assert text == tok.apply_chat_template(r["messages"], tokenize=False)
        n = length.count([text])[0]
        assert n == len(tok(text, add_special_tokens=False)["input_ids"])
        assert length.lower_bound(text) <= n <= length.upper_bound(r["messages"])
    assert length.lower_bound("") == 0 and length.lower_bound("一二三四五 six seven") >= 3
    long_chinese = length.render(samples[-1]["messages"])  # a floor of about one token per ideograph here
    assert length.count([long_chinese])[0] >= length.lower_bound(long_chinese) >= 0.9 * len(clean._CJK.findall(long_chinese))


def test_system_prompt_is_added_only_where_missing(project):
    write_raw(project, "s", [row("hi there", "hello, how are you?"), row("hey", "hey, what's up?", system="Own prompt.")])
    run({"system_prompt": "You are a kind listener."}, {"eval_fraction": 0.0})
    kept = read(project / "data/clean/train.jsonl")
    assert [r["messages"][0] for r in kept] == [
        {"role": "system", "content": "You are a kind listener."}, {"role": "system", "content": "Own prompt."}]


def test_split_is_stable_when_rows_are_added(project):
    base = [row(f"My worry number {i}", f"Thank you for telling me about worry {i}.", origin=f"o:{i}") for i in range(300)]
    write_raw(project, "s", base)
    run(split={"eval_fraction": 0.2})
    first = {r["origin"]: side for side in ("train", "eval") for r in read(project / f"data/clean/{side}.jsonl")}
    assert 30 < sum(v == "eval" for v in first.values()) < 90  # ~20 % of 300

    new = [row(f"A new topic {i}", f"A new reply about topic {i}.", origin=f"n:{i}") for i in range(200)]
    write_raw(project, "s", new[:100] + base + new[100:])  # rows added before and after
    write_raw(project, "another", [row("x y z", "another source row")])
    run(split={"eval_fraction": 0.2})
    second = {r["origin"]: side for side in ("train", "eval") for r in read(project / f"data/clean/{side}.jsonl")}
    assert {o: second[o] for o in first} == first
    # A different salt gives a different split.
    run(split={"eval_fraction": 0.2, "salt": "other"})
    third = {r["origin"]: side for side in ("train", "eval") for r in read(project / f"data/clean/{side}.jsonl")}
    assert {o: third[o] for o in first} != first


def test_strict_fails_on_the_first_bad_row_naming_file_and_line_and_writes_nothing(project):
    path = write_raw(project, "s", [row("hi", "hello there"), row("hi", "I cannot help with that."),
                                    {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
                                    {"messages": []}])
    with pytest.raises(LorapipeError, match=r"^data/raw/s\.jsonl:3: not_alternating: messages\[1\] is a second user turn"):
        run({"strict": True})
    assert not (project / "data/clean").exists() or not list((project / "data/clean").iterdir())
    assert not (project / "metrics/data.json").exists()
    path.write_bytes(path.read_bytes() + b"[1, 2]\n")
    run({"strict": False})  # not strict: both bad rows are rejects, refusal too
    assert [r["reason"] for r in read(project / "data/clean/rejects.jsonl")] == ["refusal", "not_alternating", "empty_messages", "not_an_object"]


def test_missing_inputs_are_clear_errors(project):
    with pytest.raises(LorapipeError, match=r"data/raw/ not found: run `lorapipe ingest` first"):
        run()
    write_raw(project, "s", [row("hi", "hello there")])
    with pytest.raises(LorapipeError, match=r"nope\.yaml: rules file \(params key data\.clean\.rules\) not found"):
        run({"rules": "nope.yaml"})
    (project / "models" / "base").unlink()
    (project / "models" / "base").mkdir()
    with pytest.raises(LorapipeError, match=r"models/base/tokenizer\.json not found.*lorapipe base"):
        run()


# --------------------------------------------------------------------------------- reply rules
FILTERED = {
    "empty_reply": ["...", "😊😊😊", "？！", " ~ ~ "],
    "too_short": ["k", "嗯"],
    "refusal": ["I cannot help with that.", "Sorry, but I can't assist with that request.", "I'm sorry, I can't help you with this.",
                "As an AI language model, I cannot answer that.", "我无法回答。", "抱歉，我不能回答这个问题。",
                "对不起，我没法帮你。", "作为一个AI，我无法回答这个问题。"],
    "harmful": ["You should just kill yourself.", "why don't you hurt yourself", "Honestly, kys.",
                "You're better off dead.", "Suicide is the only way out.", "你去死吧", "你不如死了算了", "你应该去自杀。",
                "自杀是一种解脱。", "割腕吧，试试看。"],
}
KEPT = [
    "I'm sorry you feel this way.", "I'm so sorry you're going through this. I'm here with you.",
    "I can't help with that alone, but a counsellor could really support you. Would you consider calling one?",
    "Are you thinking about killing yourself? You can tell me, I'm listening.",
    "It may feel like suicide is the only way out, but you matter and help is available.",
    "It sounds like you feel you're better off dead. That is a heavy feeling, and I want to understand it.",
    "Please don't hurt yourself. Can we talk about what's going on?",
    "听到你这么说我很难过。", "你可能觉得自杀是唯一的出路，但其实还有人愿意帮助你。", "好的", "OK", "I don't know what to say, but I'm here.",
    "我无法想象你有多难受，愿意多说说吗？", "Sorry to hear that 😔", "你说“不如死了算了”，听到这句话我很担心你。",
    "I can't answer that for you, but I can listen.", "不如试试出去走走吧。",
]


@pytest.mark.parametrize("reason,reply", [(k, v) for k, vs in FILTERED.items() for v in vs])
def test_reply_rules_filter(rules, reason, reply):
    assert clean.first_broken_rule(rules, [normalise(reply)]) == (reason, normalise(reply))


@pytest.mark.parametrize("reply", KEPT)
def test_reply_rules_keep_supportive_replies(rules, reply):
    assert clean.first_broken_rule(rules, [normalise(reply)]) is None


def test_rules_check_every_assistant_turn(rules):
    assert clean.first_broken_rule(rules, ["hello, how are you?", "..."])[0] == "empty_reply"


def test_literal_pretrigger_never_hides_a_match():
    import re

    for pattern, text in [(r"(?<!feel )\byou(?: are|'re) better off dead\b", "oh you're better off dead"),
                          (r"(a|bc)+d", "xbcad"), (r"去死吧|(不如|还是)(去)?死了?(吧|算了)", "还是死吧"), (r"x?y*", "")]:
        rx = re.compile(pattern)
        lits = clean.required_literals(rx)
        assert rx.search(text)
        assert lits is None or any(lit in text for lit in lits), (pattern, lits)
    assert clean.required_literals(re.compile(r"\bkys\b")) == {"kys"}
    assert clean.required_literals(re.compile(r"x?y*")) is None


@pytest.mark.parametrize("text,message", [
    ("rules: [{name: a, min_chars: 0}]", r"rules\[0\] \(a\): min_chars must be a positive integer"),
    ("rules: [{name: a, contains: ['(']}]", r"rules\[0\] \(a\): contains\[0\] is not a valid regex"),
    ("rules: [{name: a, min_chars: 2, no_content: true}]", r"needs exactly one of"),
    ("rules: [{name: duplicate, min_chars: 2}]", r"name already used"),
    ("rules: [{name: a, min_char: 2}]", r"unknown key\(s\) min_char"),
    ("rules: 3", r"expected a mapping with a 'rules' list"),
    ("rules:\n  - name: a\n    min_chars: [2\n", r"r\.yaml:\d+: rules file \(params key data\.clean\.rules\) is not valid YAML"),
])
def test_rules_file_errors_name_the_file_and_rule(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(LorapipeError, match=message) as err:
        clean.load_rules(path)
    assert str(path) in str(err.value)


def test_parallel_workers_write_the_same_bytes_as_one_process(project, monkeypatch):
    """Workers only examine rows; deciding (dedupe, split, order) stays in one process."""
    rows = [row(f"I feel sad about thing {i % 150}", f"I'm sorry that thing {i % 150} weighs on you.")
            for i in range(600)] + ["{not json", [1, 2]]
    write_raw(project, "many", rows)
    monkeypatch.setattr(clean, "_BLOCK_BYTES", 2000)  # many small blocks: exercise the hand-over
    outputs = {}
    for workers in (1, 2):
        monkeypatch.setattr(clean, "Settings", functools.partial(clean.Settings, workers=workers))
        metrics = run()
        outputs[workers] = [(project / p).read_bytes() for p in ("data/clean/train.jsonl", "data/clean/eval.jsonl", "data/clean/rejects.jsonl")]
        assert metrics["kept"] == 150 and metrics["rejected"] == 452
    assert outputs[1] == outputs[2]


@pytest.mark.parametrize("failure", ["error", "death"])
def test_a_worker_error_or_death_is_raised_in_the_parent(project, monkeypatch, failure):
    """An exception in a worker comes back with its traceback; a worker that dies is reported; no hang."""
    rows = [row(f"I feel sad about thing {i}", f"I'm sorry that thing {i} weighs on you.") for i in range(300)]
    write_raw(project, "many", rows)
    monkeypatch.setattr(clean, "_BLOCK_BYTES", 2000)
    examine = clean._Examiner.block

    def failing(self, label, source, first_lineno, block):
        if first_lineno > 100:
            if failure == "death":
                os._exit(3)
            raise LorapipeError(f"{label}:{first_lineno}: boom")
        return examine(self, label, source, first_lineno, block)

    monkeypatch.setattr(clean._Examiner, "block", failing)  # forked workers inherit it
    monkeypatch.setattr(clean, "Settings", functools.partial(clean.Settings, workers=2))
    expected = (LorapipeError, r"many\.jsonl:\d+: boom") if failure == "error" else (RuntimeError, r"worker process \d+ died \(exit code 3\)")
    with pytest.raises(expected[0], match=expected[1]) as err:
        run()
    if failure == "error":
        assert any("Traceback" in note and "failing" in note for note in err.value.__notes__)
    assert not (project / "data" / "clean" / "train.jsonl").exists()  # nothing half-written


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("system_prompt", [None, "You are kind."])
def test_block_examination_decides_exactly_as_row_by_row(length, rules, system_prompt, native):
    """_Examiner.block examines plain rows together (the native scanner or one normalisation pass,
    one rule scan per block); each row must get exactly what line() alone gives it (bar a looser,
    still valid bound)."""
    replies = [r for rs in FILTERED.values() for r in rs] + KEPT + ["Ｆｕｌｌ　ｗｉｄｔｈ，ok", "tab\tand  spaces ", "ß straße",
                                                            # refusals far longer than the pattern, by their punctuation
                                                            "我不能回答。" + "！" * 300, "I cannot help with that" + "." * 300]
    rows = []
    for i, reply in enumerate(replies):
        rows.append(row(f"user {i}", reply, origin=f"a:{i}"))
        rows.append(row("Hi", "Hello!", f"And {i}?", reply, system="Be brief." if i % 3 == 0 else None, origin=f"b:{i}"))
        rows.append(row("同一个问题", reply, origin=f"c:{i}"))  # a duplicate text across rows: the same fingerprint
    lines = [json.dumps(r, ensure_ascii=i % 2 == 0).encode() for i, r in enumerate(rows)]
    lines[5] = b"{truncated"
    lines[9] = json.dumps({"messages": rows[9]["messages"], "source": "s", "origin": "o", "extra": 1}).encode()
    settings = clean.Settings(system_prompt=system_prompt, native=native)
    examiner = clean._Examiner(settings, length, rules)
    examined_together = []
    examine_plain = examiner._examine_plain
    examiner._examine_plain = lambda label, source, numbered, raws, scanned, native_rows, python_rows, out: (
        examined_together.extend([*native_rows, *python_rows]), examine_plain(label, source, numbered, raws, scanned, native_rows, python_rows, out))
    together = examiner.block("f.jsonl", "f", 1, b"\n".join(lines) + b"\n")
    assert len(examined_together) >= (10 if system_prompt else len(lines) - 3)  # rows with a system turn / all plain rows
    alone = [examiner.line("f.jsonl", "f", n, raw) for n, raw in enumerate(lines, 1)]
    assert len(together) == len(alone) == len(lines)
    assert {a[1] for a in alone} >= {"refusal", "harmful", "empty_reply", "too_short", "invalid_json", None}
    for t, a, raw in zip(together, alone, lines):
        if a[1] is None:  # a candidate: all but the bound equal; both bounds hold
            assert t[:4] + t[5:] == a[:4] + a[5:]
            n = length.count([length.render(examiner.messages_of(raw))])[0]
            assert n <= a[4] <= t[4]
        else:
            assert t == a


def test_idle_cpus_sees_busy_cpus():
    """Workers are started only on CPUs found idle; with every CPU kept busy, at most one looks idle."""
    import subprocess
    import sys

    cpus = len(os.sched_getaffinity(0))
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cpus)]
    try:
        import time

        time.sleep(0.3)
        assert 0 <= clean.idle_cpus() <= 1
    finally:
        for b in burners:
            b.kill()
            b.wait()
