"""`lorapipe serve` left running while its user browses: an API key, no cross-origin reads, an
environment that cannot reconfigure it. Real `lorapipe serve`, real llama-server, real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from lorapipe import cli

LORAPIPE = [sys.executable, "-m", "lorapipe.cli"]
KEY = "test-key-5f0c1d"
EVIL = "http://evil.example"
CHAT = {"messages": [{"role": "user", "content": "I feel lonely."}], "max_tokens": 16, "temperature": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LLAMA_ARG_") and k not in ("LLAMA_API_KEY", "OPENAI_API_KEY")}
    return dict(env, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)


def start_serve(gguf, *args: str, env: dict[str, str]):
    port = free_port()
    proc = subprocess.Popen([*LORAPIPE, "serve", "--model", str(gguf), "--port", str(port), "--ctx", "512", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = proc.stdout.readline()  # blocks until ready (or exit: then the line is empty)
    if "ready" not in line:
        proc.kill()
        pytest.fail(f"serve did not come up (exit code {proc.wait()}): {proc.stderr.read()[-2000:]}")
    return proc, f"http://127.0.0.1:{port}", line


def stop_serve(proc) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    return err


def http(method: str, url: str, body: dict | None = None, headers: dict[str, str] | None = None):
    """(status, headers, body bytes) of one request; an error status is an answer too."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={
        **({"Content-Type": "application/json"} if data is not None else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.fixture(scope="module")
def keyed(tiny_gguf):
    """`lorapipe serve` whose key comes from OPENAI_API_KEY, started from a shell that also holds a
    LLAMA_API_KEY and a LLAMA_ARG_ variable (they must not reach llama-server)."""
    _, gguf = tiny_gguf("scripted")
    env = clean_env(OPENAI_API_KEY=KEY, LLAMA_API_KEY="shell-key", LLAMA_ARG_ENDPOINT_METRICS="1")
    proc, base, line = start_serve(gguf, env=env)
    yield base, line
    stop_serve(proc)


def test_requests_without_the_key_are_refused(keyed):
    base, line = keyed
    assert "API key required ($OPENAI_API_KEY)" in line and KEY not in line
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer shell-key"}):
        status, _, body = http("POST", base + "/v1/chat/completions", CHAT, headers)
        assert status == 401, headers
        assert json.loads(body)["error"]["type"] == "authentication_error"
        assert http("GET", base + "/v1/models", None, headers)[0] == 401
    # /health stays open (llama-server keeps it public): it says "up", nothing else.
    assert http("GET", base + "/health")[0] == 200


def test_with_the_key_the_openai_api_answers(keyed):
    base, _ = keyed
    status, _, body = http("POST", base + "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {KEY}"})
    assert status == 200
    assert json.loads(body)["choices"][0]["message"]["content"] == "Hello world!"
    status, _, body = http("GET", base + "/v1/models", None, {"Authorization": f"Bearer {KEY}"})
    assert status == 200 and json.loads(body)["data"]


def test_curl_with_the_key(keyed):
    base, _ = keyed
    curl = subprocess.run(["curl", "-sS", base + "/v1/chat/completions", "-H", f"Authorization: Bearer {KEY}",
                           "-H", "Content-Type: application/json", "-d", json.dumps(CHAT)],
                          capture_output=True, text=True, timeout=60)
    assert curl.returncode == 0, curl.stderr
    assert json.loads(curl.stdout)["choices"][0]["message"]["content"] == "Hello world!"


def test_openai_client_with_the_key(keyed):
    openai = pytest.importorskip("openai", reason="the openai package is not installed")
    base, _ = keyed
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY)
    out = client.chat.completions.create(model="any", **CHAT)
    assert out.choices[0].message.content == "Hello world!"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong").chat.completions.create(model="any", **CHAT)


def test_no_other_origin_may_read_answers(keyed):
    """llama-server echoes any Origin back by default; here it names only its own origin, so a
    browser hands another site's page nothing (the preflight of a keyed request fails too)."""
    base, _ = keyed
    status, headers, _ = http("POST", base + "/v1/chat/completions", CHAT,
                              {"Authorization": f"Bearer {KEY}", "Origin": EVIL})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == base
    status, headers, _ = http("OPTIONS", base + "/v1/chat/completions", None, {
        "Origin": EVIL, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert headers["Access-Control-Allow-Origin"] == base != EVIL


def test_llama_variables_of_the_shell_do_not_reach_llama_server(keyed):
    base, _ = keyed
    # LLAMA_ARG_ENDPOINT_METRICS=1 in the shell would have turned on /metrics.
    status, _, _ = http("GET", base + "/metrics", None, {"Authorization": f"Bearer {KEY}"})
    assert status != 200


def test_keep_llama_env_passes_them_and_no_key_warns(tiny_gguf):
    _, gguf = tiny_gguf("scripted")
    proc, base, line = start_serve(gguf, "--keep-llama-env", "--cors-origins", "http://localhost:3000",
                                   env=clean_env(LLAMA_ARG_ENDPOINT_METRICS="1"))
    try:
        assert "no API key" in line and "cross-origin reads: http://localhost:3000" in line
        assert http("GET", base + "/metrics")[0] == 200
        status, headers, _ = http("POST", base + "/v1/chat/completions", CHAT, {"Origin": "http://localhost:3000"})
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    finally:
        err = stop_serve(proc)
    assert "without an API key" in err and "OPENAI_API_KEY" in err


def test_api_key_flag(tiny_gguf):
    _, gguf = tiny_gguf("scripted")
    proc, base, line = start_serve(gguf, "--api-key", "flag-key", env=clean_env())
    try:
        assert "API key required (--api-key)" in line
        assert http("POST", base + "/v1/chat/completions", CHAT)[0] == 401
        assert http("POST", base + "/v1/chat/completions", CHAT, {"Authorization": "Bearer flag-key"})[0] == 200
    finally:
        stop_serve(proc)


@pytest.mark.parametrize("value", ["http://a.example,http://b.example", "evil.example", "http://x.example/path"])
def test_a_cors_value_llama_server_cannot_honour_is_an_error(value, tiny_gguf, capsys):
    _, gguf = tiny_gguf("scripted")
    assert cli.main(["serve", "--model", str(gguf), "--port", str(free_port()), "--cors-origins", value]) == 2
    assert "--cors-origins" in capsys.readouterr().err


def test_ipv6_loopback_with_the_key(tiny_gguf):
    _, gguf = tiny_gguf("scripted")
    port = free_port()
    proc = subprocess.Popen([*LORAPIPE, "serve", "--model", str(gguf), "--host", "::1", "--port", str(port),
                             "--ctx", "512"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env(OPENAI_API_KEY=KEY))
    try:
        line = proc.stdout.readline()
        assert f"http://[::1]:{port}/v1/chat/completions" in line, proc.stderr.read() if not line else line
        base = f"http://[::1]:{port}"
        assert http("POST", base + "/v1/chat/completions", CHAT)[0] == 401
        status, _, body = http("POST", base + "/v1/chat/completions", CHAT, {"Authorization": f"Bearer {KEY}"})
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "Hello world!"
    finally:
        stop_serve(proc)
