"""chitchat adapter: the installed chitchat-dataset's dataset.json -> merged, role-mapped, capped chats."""

from __future__ import annotations

from lorapipe.sources import chitchat

SOURCE = {"name": "cc", "type": "chitchat"}  # the data.sources entry ctx_for() completes


def test_fixture_sorted_ids_merged_senders_trimmed_and_quarantined(ctx_for, fixtures):
    ctx = ctx_for(max_conversations=None)
    out = list(chitchat.read(ctx, fixtures / "chitchat" / "dataset.json"))
    assert [r["origin"] for r in out] == [f"chitchat_dataset/dataset.json:c-{i}" for i in (1, 2, 3)]
    assert out[0]["messages"] == [
        {"role": "user", "content": "what is your favourite food?"},
        {"role": "assistant", "content": "pizza for sure"},
    ]
    assert out[1]["messages"] == [
        {"role": "user", "content": "hey"},
        {"role": "assistant", "content": "hi there\nhow was your day?"},
        {"role": "user", "content": "long\nbut good"},  # consecutive groups of one sender merged
        {"role": "assistant", "content": "glad to hear"},
    ]  # the trailing "bye!" of the user is trimmed
    assert ctx.stats["trimmed_turns"] == 1
    assert out[2]["error"].startswith("not a chitchat conversation")


def test_cap_takes_first_ids_in_sorted_order(ctx_for, fixtures):
    out = list(chitchat.read(ctx_for(max_conversations=2), fixtures / "chitchat" / "dataset.json"))
    assert [r["origin"].rsplit(":", 1)[1] for r in out] == ["c-1", "c-2"]


def test_installed_dataset_is_deterministic(ctx_for):
    out = list(chitchat.read(ctx_for(max_conversations=5)))
    ids = [r["origin"].rsplit(":", 1)[1] for r in out]
    assert ids == sorted(ids) and len(ids) == 5
    assert ids[0] == "0004441d-0390-4033-a321-6fef32ed7ddb"
    for r in out:
        roles = [m["role"] for m in r["messages"]]
        # alternating from the user; a one-message chat is passed on as is for `clean` to reject
        assert roles == (["user", "assistant"] * len(roles))[: len(roles)]
        assert len(roles) == 1 or roles[-1] == "assistant"
