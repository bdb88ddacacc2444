"""`lorapipe serve`: the real llama-server on a tiny GGUF, a real HTTP request, clean shutdown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from conftest import CHILD_ENV, LORAPIPE, REPO_ROOT, free_port
from lorapipe import cli



def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start(gguf, port: int) -> tuple[subprocess.Popen, int]:
    """Start `lorapipe serve`; return it and llama-server's pid once it says it is ready."""
    # SIGINT's default disposition, as under a terminal: a suite started in the background by a
    # non-interactive shell inherits it ignored, and Python keeps an ignored SIGINT.
    proc = subprocess.Popen([*LORAPIPE, "serve", "--model", str(gguf), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=CHILD_ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = proc.stdout.readline()  # blocks until ready (or exit: then the line is empty)
    assert "ready" in line, f"serve did not come up (exit code {proc.poll()})"
    return proc, int(line.split("(pid ")[1].split(")")[0])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_serves_openai_chat_completions_and_shuts_down_cleanly(sig, tiny_gguf):
    _, gguf = tiny_gguf("scripted", quant="Q4_K_M")  # what serve runs by default: the quantized file
    port = free_port()
    proc, server_pid = start(gguf, port)
    try:
        resp = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "I feel lonely."}],
            "max_tokens": 32, "temperature": 0})
        assert resp.status_code == 200
        body = resp.json()
        choice = body["choices"][0]
        # The GGUF's chat template was applied (--jinja): the scripted model only answers this after
        # the template's generation prompt, and stops at its end-of-turn token.
        assert choice["message"]["role"] == "assistant"
        assert choice["message"]["content"].startswith("Hello") and choice["message"]["content"].endswith("world!")
        assert choice["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] <= 5
    finally:
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
    if sig == signal.SIGKILL:  # no clean-up can run: the kernel's parent-death signal ends the child
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 0
        assert "stopped" in out
    deadline = time.monotonic() + 5
    while pid_alive(server_pid) and time.monotonic() < deadline:  # reaped by serve: gone at once
        time.sleep(0.1)
    assert not pid_alive(server_pid), "llama-server outlived lorapipe serve"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_port_in_use_is_a_clear_error(tiny_gguf, capsys):
    _, gguf = tiny_gguf("scripted")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["serve", "--model", str(gguf), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port} is already in use" in err and "--port" in err


def test_missing_or_foreign_model_is_a_clear_error(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip, not a model")
    assert cli.main(["serve", "--model", str(fake), "--port", str(free_port())]) == 2
    assert "model.gguf: not a GGUF file" in capsys.readouterr().err
    assert cli.main(["serve", "--model", str(tmp_path / "nope.gguf"), "--port", str(free_port())]) == 2
    assert "nope.gguf: GGUF file not found" in capsys.readouterr().err


def test_bad_requests_are_answered_and_the_server_survives(tiny_gguf):
    """The quick part of benchmarks/serve_load.py: invalid JSON, wrong types, an over-long prompt,
    negative max_tokens, a client that disconnects mid-stream; then a normal request."""
    _, gguf = tiny_gguf("scripted", quant="Q4_K_M")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks/serve_load.py"), "--bad-only", "--model", str(gguf),
                           "--ctx", "256"], capture_output=True, text=True, env=CHILD_ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert len(lines) == 9 and all(line.startswith("  ok ") for line in lines), proc.stdout
    assert "normal request afterwards: answered" in proc.stdout
