"""Stage clean: validation, reply rules, template-token length filter, fingerprint dedupe, stable split,
accounting. Runs the real stage on small files with SmolLM2's real tokenizer (no model weights)."""

from __future__ import annotations

import json
import random
import shutil
import unicodedata
from pathlib import Path

import pytest

from lorapipe import cli
from lorapipe.core.errors import LorapipeError
from lorapipe.core.chatlength import _CJK, ChatLength
from lorapipe.core.sharegpt import fingerprint, normalise
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
def length(smollm2_tokenizer_dir) -> ChatLength:
    return ChatLength(smollm2_tokenizer_dir)


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
                                           "eval": metrics["sources"]["alpha"]["eval"], "rejected": 2, "blank_lines": 0}
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


def test_output_does_not_depend_on_the_chunk_size(project, monkeypatch):
    """Lines are examined (and their tokens counted) a chunk at a time, decided in input order."""
    write_raw(project, "s", [row(f"My worry number {i % 7}", f"Thanks for telling me about worry {i % 7}." + " more" * (i % 3) * 200)
                             for i in range(30)] + ["", "{bad"])
    outputs = []
    for chunk in (1024, 3):
        monkeypatch.setattr(clean, "CHUNK_LINES", chunk)
        metrics = run({"max_tokens": 300}, {"eval_fraction": 0.3})
        outputs.append([(project / f"data/clean/{n}.jsonl").read_bytes() for n in ("train", "eval", "rejects")] + [metrics])
    assert outputs[0] == outputs[1] and outputs[0][-1]["rejected"] > 10


def test_accounting_check_refuses_counts_that_do_not_add_up():
    report = clean.Report(sources={"s": clean.Counts(read=3, train=1, eval=1, rejected=1, blank_lines=2)}, dropped={"duplicate": 1})
    metrics = report.metrics()
    assert (metrics["read"], metrics["kept"], metrics["blank_lines"]) == (3, 2, 2)
    report.dropped["duplicate"] = 0
    with pytest.raises(RuntimeError, match="dropped per reason sum to 0, rejected is 1"):
        report.metrics()
    report.dropped["duplicate"], report.sources["s"].read = 1, 4
    with pytest.raises(RuntimeError, match=r"source s: read 4 != train 1 \+ eval 1 \+ rejected 1"):
        report.metrics()


def test_fingerprint_is_fixed_size_and_normalisation_is_nfkc_casefold_collapsed():
    texts = ["Ｈｅｌｌｏ，  World\n", " 你好！ ", "Straße\tZWEI", "a\x00b"]
    assert [normalise(t) for t in texts] == ["hello, world", "你好!", "strasse zwei", "a\x00b"]
    # The shortcuts (ASCII, full-width forms first, the collapsed check) give exactly the plain definition.
    rng = random.Random(7)
    alphabet = ([chr(c) for c in range(0x20, 0x250)] + ["\x00", "\t", "\n", "\x1c", "\x85", "\xa0", "\u2028", "\u3000",
                "，", "！", "Ａ", "ﬁ", "ẞ", "İ", "你", "好", "\u0301", "\uff76\uff9e", "  "])
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        for t in (text, text.encode("ascii", "ignore").decode()):
            assert normalise(t) == " ".join(unicodedata.normalize("NFKC", t).casefold().split()), repr(t)
    fp = fingerprint([("user", "a" * 10_000), ("assistant", "b")])
    assert isinstance(fp, bytes) and len(fp) == 16
    assert fingerprint([("user", "ab"), ("assistant", "c")]) != fingerprint([("user", "a"), ("assistant", "bc")])


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


def test_too_long_comes_before_duplicate(project, smollm2_tokenizer_dir):
    """A row as long as max_tokens allows is kept; the same user+assistant text with a long system
    turn (not part of the fingerprint) is too long, not a duplicate: length is judged first."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(smollm2_tokenizer_dir))
    short = row("How are you?", "I am fine, thanks for asking.")
    write_raw(project, "s", [short, row("How are you?", "I am fine, thanks for asking.", system="Be kind. " * 50), short])
    n_short = len(tok.apply_chat_template(short["messages"], tokenize=True, return_dict=False))
    run({"max_tokens": n_short}, {"eval_fraction": 0.0})
    assert [r["reason"] for r in read(project / "data/clean/rejects.jsonl")] == ["too_long", "duplicate"]


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
        ideographs = _CJK.findall(tok.decode([i]))
        assert len(ideographs) <= k and (len(ideographs) < 2 or all(c in shared for c in ideographs))
    for r in samples:
        text = length.render(r["messages"])
        assert text == tok.apply_chat_template(r["messages"], tokenize=False)
        n = length.count([text])[0]
        assert n == len(tok(text, add_special_tokens=False)["input_ids"])
        assert length.lower_bound(text) <= n <= length.upper_bound(tuple(m["role"] for m in r["messages"]), [m["content"] for m in r["messages"]])
    assert length.lower_bound("") == 0 and length.lower_bound("一二三四五 six seven") >= 3
    long_chinese = length.render(samples[-1]["messages"])  # a floor of about one token per ideograph here
    assert length.count([long_chinese])[0] >= length.lower_bound(long_chinese) >= 0.9 * len(_CJK.findall(long_chinese))


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


def test_keywords_only_skip_replies_the_rule_would_pass(rules):
    """A rule's keywords are a prefilter: with or without them, every reply gets the same decision."""
    import dataclasses

    with_keywords = [r for r in rules if r.keywords]
    assert {r.name for r in with_keywords} == {"refusal", "harmful"}
    replies = [normalise(r) for rs in FILTERED.values() for r in rs] + [normalise(r) for r in KEPT]
    for rule in with_keywords:
        plain = dataclasses.replace(rule, keywords=None)
        for reply in replies:
            assert rule.first_rejected([reply]) == plain.first_rejected([reply]), (rule.name, reply)
        for reply in FILTERED[rule.name]:
            assert any(k in normalise(reply) for k in rule.keywords), (rule.name, reply)


@pytest.mark.parametrize("text,message", [
    ("rules: [{name: a, min_chars: 0}]", r"rules\[0\] \(a\): min_chars must be a positive integer"),
    ("rules: [{name: a, contains: ['(']}]", r"rules\[0\] \(a\): contains\[0\] is not a valid regex"),
    ("rules: [{name: a, min_chars: 2, no_content: true}]", r"needs exactly one of"),
    ("rules: [{name: duplicate, min_chars: 2}]", r"name already used"),
    ("rules: [{name: a, min_char: 2}]", r"unknown key\(s\) min_char"),
    ("rules: [{name: a, min_chars: 2, keywords: [x]}]", r"keywords go with full_match or contains only"),
    ("rules: [{name: a, contains: [x], keywords: [X]}]", r"keywords\[0\] 'X' never occurs in a normalised reply; write 'x'"),
    ("rules: [{name: a, contains: [x], keywords: []}]", r"keywords must be a non-empty list of strings"),
    ("rules: 3", r"expected a mapping with a 'rules' list"),
    ("rules:\n  - name: a\n    min_chars: [2\n", r"r\.yaml:\d+: rules file \(params key data\.clean\.rules\) is not valid YAML"),
])
def test_rules_file_errors_name_the_file_and_rule(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(LorapipeError, match=message) as err:
        clean.load_rules(path)
    assert str(path) in str(err.value)
