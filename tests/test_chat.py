"""`lorapipe chat` on real tiny models through both backends (llama.cpp GGUF and transformers).

The 'scripted' tiny model (conftest.build_scripted_model) is a real Llama whose weights make it answer
every chat prompt with the tokens Hello, <|im_start|>, Ġworld, ! and then EOS (<|im_end|>): so the
tests can assert exact output, i.e. that generation stops at EOS/EOT and special tokens are never
printed. The random tiny model gives long gibberish for determinism and Ctrl-C tests.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CHILD_ENV, LORAPIPE
from lorapipe import cli
from lorapipe.chat import Conversation, GGUFBackend, HFBackend, Sampling, interactive

ANSWER = "Hello world!"
GREEDY = Sampling(max_new_tokens=24, temperature=0.0, top_p=1.0, repetition_penalty=1.0)
DEFAULTS = Sampling(max_new_tokens=512, temperature=0.7, top_p=0.8, repetition_penalty=1.1, seed=1)


@pytest.fixture(scope="module")
def scripted(tiny_gguf):
    return tiny_gguf("scripted")


@pytest.fixture(scope="module")
def gguf_backend(scripted):
    return GGUFBackend(scripted[1], ctx=512)


@pytest.fixture(scope="module")
def hf_backend(scripted):
    return HFBackend(scripted[0])


def special_tokens(folder: Path) -> list[str]:
    added = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
    return [t["content"] for t in added if t.get("special")]


def test_one_shot_prompt_prints_only_the_answer(tiny_gguf):
    """Scriptable: stdout is the answer and a newline, nothing else (logs go to stderr). On the
    quantized file, as `lorapipe chat` runs by default."""
    _, quantized = tiny_gguf("scripted", quant="Q4_K_M")
    proc = subprocess.run([*LORAPIPE, "chat", "--model", str(quantized), "--prompt", "How are you?"],
                          capture_output=True, text=True, env=CHILD_ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ANSWER + "\n"


@pytest.mark.parametrize("backend", ["gguf", "hf"])
def test_streams_tokens_stops_at_eos_and_hides_special_tokens(backend, request, scripted):
    chat = request.getfixturevalue(f"{backend}_backend")
    msgs = Conversation("You are kind.").messages_for("I feel lonely.")
    pieces = list(chat.stream(msgs, DEFAULTS))  # max_new_tokens 512: only EOS can end it this early
    text = "".join(pieces)
    assert text == ANSWER
    assert len(pieces) >= 2  # streamed as generated, not as one block
    for token in special_tokens(scripted[0]):  # <|im_start|> was generated, <|im_end|> ended it
        assert token not in text


def test_hf_backend_one_shot_via_cli(scripted, capsys):
    assert cli.main(["chat", "--backend", "hf", "--model", str(scripted[0]), "--prompt", "hi"]) == 0
    assert capsys.readouterr().out == ANSWER + "\n"


@pytest.mark.parametrize("backend", ["gguf", "hf"])
def test_greedy_is_deterministic(backend, tiny_gguf):
    folder, gguf = tiny_gguf("random")
    chat = GGUFBackend(gguf, ctx=256) if backend == "gguf" else HFBackend(folder)
    msgs = [{"role": "user", "content": "Tell me something."}]
    first = "".join(chat.stream(msgs, GREEDY))
    second = "".join(chat.stream(msgs, GREEDY))
    assert first and first == second


def test_session_commands_and_history(gguf_backend, monkeypatch, capsys):
    """/system, /reset and /exit act on the conversation the backend sees."""
    seen: list[list[dict]] = []

    class Recording:  # the real backend, with the messages of each call kept
        def stream(self, messages, s):
            seen.append([dict(m) for m in messages])
            yield from gguf_backend.stream(messages, s)

    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/system Be brief.\nagain\n/reset\nfresh\n/bogus\n/exit\nnever\n"))
    assert interactive(Recording(), Conversation(), DEFAULTS, "test") == 0
    out, err = capsys.readouterr()
    assert out.count(f"bot> {ANSWER}\n") == 3
    assert [m["content"] for m in seen[0]] == ["hi"]
    assert [m["role"] for m in seen[1]] == ["system", "user", "assistant", "user"]
    assert seen[1][0]["content"] == "Be brief." and seen[1][2]["content"] == ANSWER
    assert [m["content"] for m in seen[2]] == ["Be brief.", "fresh"]  # /reset kept the system prompt
    assert len(seen) == 3  # nothing after /exit
    assert "conversation cleared" in err and "unknown command /bogus" in err


@pytest.mark.parametrize("backend", ["gguf", pytest.param("hf", marks=pytest.mark.slow)])  # hf: a torch process start
def test_ctrl_c_stops_the_reply_not_the_session(backend, tiny_gguf):
    folder, gguf = tiny_gguf("random")
    model = gguf if backend == "gguf" else folder
    # Ctrl-C as a terminal delivers it: a suite started in the background by a non-interactive shell
    # inherits SIGINT ignored, and Python keeps an ignored SIGINT, so the child gets the default back.
    proc = subprocess.Popen([*LORAPIPE, "chat", "--backend", backend, "--model", str(model), "--max-new-tokens", "100000"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=CHILD_ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        proc.stdin.write(b"Talk to me.\n")
        proc.stdin.flush()
        seen = b""
        deadline = time.monotonic() + 120
        while b"bot> " not in seen or len(seen.split(b"bot> ", 1)[1]) < 3:  # a few bytes of the reply streamed
            assert time.monotonic() < deadline, "no streamed reply"
            seen += os.read(proc.stdout.fileno(), 64)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        rest, err = proc.communicate(b"/exit\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()  # the session went on and ended on /exit
    assert b"[stopped]" in seen + rest
    assert b"Traceback" not in err


def test_bad_models_are_clear_errors(tmp_path, scripted, capsys):
    text_file = tmp_path / "notes.gguf"
    text_file.write_text("not a model")
    cases = [
        (["--model", str(tmp_path / "absent.gguf")], "absent.gguf: GGUF file not found"),
        (["--model", str(text_file)], "notes.gguf: not a GGUF file"),
        (["--model", str(tmp_path)], "is a folder, not a GGUF file"),
        (["--backend", "hf", "--model", str(scripted[1])], "the hf backend needs an HF model folder"),
        (["--model", str(scripted[1]), "--top-p", "2"], "--top-p:"),
    ]
    for flags, message in cases:
        assert cli.main(["chat", *flags, "--prompt", "hi"]) == 2
        assert message in capsys.readouterr().err

    no_template = tmp_path / "no-template"
    shutil.copytree(scripted[0], no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    assert cli.main(["chat", "--backend", "hf", "--model", str(no_template), "--prompt", "hi"]) == 2
    assert "no chat template" in capsys.readouterr().err
