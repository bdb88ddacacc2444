"""chatterbot adapter: the installed chatterbot-corpus YAML -> pairs per alternative answer / real dialogues."""

from __future__ import annotations

import pytest

from lorapipe.core.errors import LorapipeError
from lorapipe.sources import chatterbot

SOURCE = {"name": "cb", "type": "chatterbot"}  # the data.sources entry ctx_for() completes


def test_alternatives_become_pairs_and_yaml_text_stays_text(ctx_for, fixtures):
    out = list(chatterbot.read_file(ctx_for(), fixtures / "chatterbot" / "quirks.yml", "emotion", "quirks.yml"))
    pairs = [[m["content"] for m in r["messages"]] for r in out if "messages" in r]
    assert pairs == [
        ["Are you happy?", "yes"],  # not True: read with BaseLoader
        ["Are you happy?", "I am as happy as software can be."],
        ["Hello"],  # a statement without an answer: `clean` rejects it (last turn user)
        ["Do you like numbers?", "1.0"],
    ]
    assert [r["origin"] for r in out if "messages" in r] == ["quirks.yml:5", "quirks.yml:6", "quirks.yml:7", "quirks.yml:10"]
    errors = [r for r in out if "error" in r]
    assert [(r["origin"], r["error"]) for r in errors] == [
        ("quirks.yml:8", "conversation is not a list of texts"),
        ("quirks.yml:11", "conversation is not a list of texts"),
    ]
    assert errors[0]["raw"] == "Just a string, not a list"


def test_dialogue_category_is_one_multi_turn_row(ctx_for, fixtures):
    ctx = ctx_for(dialogue_categories=["emotion"])
    out = list(chatterbot.read_file(ctx, fixtures / "chatterbot" / "quirks.yml", "emotion", "quirks.yml"))
    assert [m["role"] for m in out[0]["messages"]] == ["user", "assistant"]  # 3 lines: the trailing user turn trimmed
    assert ctx.stats["trimmed_turns"] == 1


def test_installed_corpus_defaults(ctx_for):
    ctx = ctx_for()
    out = list(chatterbot.read(ctx))
    files = {r["origin"].rsplit(":", 1)[0] for r in out}
    assert files == {f"chatterbot_corpus/data/{lang}/{cat}.yml" for lang in ("english", "chinese") for cat in ("emotion", "psychology", "conversations")}
    emotion = [r for r in out if r["origin"].startswith("chatterbot_corpus/data/english/emotion.yml")]
    assert all(len(r["messages"]) == 2 for r in emotion)  # alternatives: one pair each, never a fake chat
    assert emotion[0]["messages"] == [
        {"role": "user", "content": "You are arrogant"},
        {"role": "assistant", "content": "Arrogance is not one of my emotions."},
    ]
    hello = next(r for r in out if r["origin"].startswith("chatterbot_corpus/data/english/conversations.yml") and r["messages"][0]["content"] == "Hello")
    assert [m["content"] for m in hello["messages"][:4]] == ["Hello", "Hi", "How are you doing?", "I am doing well."]
    assert all(r["messages"][-1]["role"] == "assistant" for r in out)
    assert any("你" in r["messages"][0]["content"] for r in out)


def test_unknown_language_or_category_lists_the_available_ones(ctx_for):
    with pytest.raises(LorapipeError, match=r"languages: no language 'klingon' .*available: .*english"):
        list(chatterbot.read(ctx_for(languages=["klingon"])))
    with pytest.raises(LorapipeError, match=r"categories: no category 'coding' for chinese; available: ai, "):
        list(chatterbot.read(ctx_for(languages=["chinese"], categories=["coding"])))
