"""`lorapipe ui` left running while its user browses: what another site's page (or another user)
must not do, refused with a JSON error, and what the ui's own page and curl still do.

Real `lorapipe ui`, real llama-servers on a tiny scripted GGUF (it answers "Hello world!"), real
HTTP on loopback; one test drives headless Chromium from a page of another origin.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import REPO_ROOT, headless_chromium
from lorapipe import ui as ui_mod

LORAPIPE = [sys.executable, "-m", "lorapipe.cli"]
CHAT = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 16}
EVIL = "http://evil.example"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(gguf, host: str = "127.0.0.1", *args: str):
    port = free_port()
    # A shell holding LLAMA_API_KEY made every chat a 502; a LLAMA_ARG_ would change the servers.
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", LLAMA_API_KEY="shell-key",
               LLAMA_ARG_ENDPOINT_METRICS="1")
    proc = subprocess.Popen([*LORAPIPE, "ui", "--model", str(gguf), "--compare", str(gguf), "--host", host,
                             "--port", str(port), *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()  # blocks until ready (or exit: then the line is empty)
    if "ready" not in line:
        proc.kill()
        pytest.fail(f"ui did not come up (exit code {proc.wait()}): {proc.stderr.read()[-2000:]}")
    return proc, port


def stop_ui(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "stopped" in out


@pytest.fixture(scope="module")
def ui(tiny_gguf):
    _, gguf = tiny_gguf("scripted")
    proc, port = start_ui(gguf)
    yield port, proc
    stop_ui(proc)


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            host: str = "127.0.0.1"):
    """(status, headers, body) of one raw request; `headers` may set Host to anything."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.putrequest(method, path, skip_host="Host" in (headers or {}), skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, r.headers, r.read()
    finally:
        conn.close()


def post_chat(port: int, body, headers: dict | None = None, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    return request(port, "POST", "/api/chat", data, {"Content-Type": "application/json", **(headers or {})})


def refused(answer, status: int, words: str) -> None:
    got, headers, body = answer
    assert got == status, (got, body)
    assert headers["Content-Type"] == "application/json"
    assert words in json.loads(body)["error"], body


def chat_text(answer) -> str:
    status, _, body = answer
    assert status == 200, body
    lines = [json.loads(line) for line in body.splitlines() if line]
    assert lines[-1].get("done"), lines
    return "".join(line.get("delta", "") for line in lines)


# --------------------------------------------------------------------------------- Host: DNS rebinding
@pytest.mark.parametrize("path", ["/", "/api/info", "/run"])
def test_a_foreign_host_name_is_refused_on_every_route(ui, path):
    """A page on evil.example, its name re-pointed to 127.0.0.1, sends Host: evil.example:PORT."""
    port, _ = ui
    refused(request(port, "GET", path, headers={"Host": f"evil.example:{port}"}), 403, "Host")
    refused(post_chat(port, CHAT, {"Host": f"evil.example:{port}"}), 403, "Host")
    refused(request(port, "GET", path, headers={"Host": f"localhost:{port + 1}"}), 403, "Host")


def test_loopback_names_are_answered(ui):
    port, _ = ui
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
        status, _, body = request(port, "GET", "/api/info", headers={"Host": host})
        assert status == 200 and json.loads(body)["models"]["b"]["name"].endswith(".gguf"), host


# ---------------------------------------------------------------------------- Origin, cross-site, CSRF
def test_another_origin_cannot_chat_or_read(ui):
    port, _ = ui
    refused(post_chat(port, CHAT, {"Origin": EVIL}), 403, "evil.example")
    refused(post_chat(port, CHAT, {"Origin": "null"}), 403, "not allowed")
    # Another local server (a notebook, a dev server) is another origin as well.
    refused(request(port, "GET", "/api/info", headers={"Origin": f"http://127.0.0.1:{port + 1}"}), 403, "not allowed")
    refused(request(port, "OPTIONS", "/api/chat", headers={
        "Origin": EVIL, "Access-Control-Request-Method": "POST"}), 403, "not allowed")


def test_a_cross_site_text_plain_post_is_refused(ui):
    """What a page may send without a CORS preflight: text/plain, a form, or no type at all."""
    port, _ = ui
    body = json.dumps(CHAT).encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        refused(request(port, "POST", "/api/chat", body, {"Content-Type": ctype}), 415, "application/json")
    refused(request(port, "POST", "/api/chat", body), 415, "application/json")


def test_subresources_of_another_site_are_refused(ui):
    """<img src=http://127.0.0.1:PORT/run> on another site: no Origin, but Sec-Fetch-Site says so."""
    port, _ = ui
    for path in ("/run", "/api/info"):
        refused(request(port, "GET", path, headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors",
                                                    "Sec-Fetch-Dest": "image"}), 403, "another site")
    # A link followed from another site opens the page itself.
    status, _, body = request(port, "GET", "/", headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"})
    assert status == 200 and b"<nav>" in body


def test_the_own_page_and_curl_still_chat(ui):
    port, _ = ui
    own = {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}
    assert chat_text(post_chat(port, CHAT, own)) == "Hello world!"
    assert chat_text(post_chat(port, dict(CHAT, model="a"), {"Content-Type": "application/json; charset=utf-8"})) \
        == "Hello world!"
    curl = subprocess.run(["curl", "-sS", f"http://localhost:{port}/api/chat", "-H", "Content-Type: application/json",
                           "-d", json.dumps(CHAT)], capture_output=True, text=True, timeout=60)
    assert curl.returncode == 0 and '"done": true' in curl.stdout
    status, headers, _ = request(port, "GET", "/")
    assert status == 200 and headers["X-Frame-Options"] == "DENY"


# ------------------------------------------------------------------------------------ malformed bodies
@pytest.mark.parametrize("raw, words", [
    (b'{"model": [], "messages": [{"role": "user", "content": "x"}]}', "model must be one of"),
    (b'{"model": {}, "messages": [{"role": "user", "content": "x"}]}', "model must be one of"),
    (b"[" * 200_000 + b"]" * 200_000, "nests deeper than Python's JSON parser goes"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "not JSON"),
    (b'{"messages": [{"role": "user", "content": "\xff"}]}', "not JSON"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": true}', "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000000000000000000}', "max_tokens"),
    (b"{not json", "not JSON"),
    (b"null", "JSON object"),
])
def test_every_malformed_body_is_a_400(ui, raw, words):
    port, _ = ui
    refused(post_chat(port, None, raw=raw), 400, words)


def test_sizes_and_lengths(ui):
    port, _ = ui
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    with s:  # a declared 2 MiB body is refused before it is read
        s.sendall(f"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {2 << 20}\r\n\r\n".encode())
        answer = s.makefile("rb").read()
    assert answer.startswith(b"HTTP/1.0 413") and b'"error"' in answer
    refused(request(port, "POST", "/api/chat", None, {"Content-Type": "application/json"}), 411, "Content-Length")
    refused(request(port, "GET", "/api/chat"), 405, "POST")
    refused(request(port, "DELETE", "/api/info"), 405, "not supported")
    refused(request(port, "GET", "/nope"), 404, "no page")


# --------------------------------------------------------------------------- time, threads, /run cost
def test_idle_and_half_sent_requests_time_out(ui):
    port, _ = ui
    idle = socket.create_connection(("127.0.0.1", port), timeout=30)
    half = socket.create_connection(("127.0.0.1", port), timeout=30)
    with idle, half:
        half.sendall(f"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 100\r\n\r\n{{\"messages\"".encode())
        t0 = time.monotonic()
        assert idle.recv(100) == b""  # closed by the server, not by our 30 s
        answer = half.makefile("rb").read()
        took = time.monotonic() - t0
    assert took < ui_mod.BODY_TIMEOUT_S + 5
    assert answer.startswith(b"HTTP/1.0 408") and b"did not arrive" in answer


def test_connections_beyond_the_bound_get_503_then_service_resumes(ui):
    port, _ = ui
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(ui_mod.MAX_THREADS)]
    try:
        for s in held:
            s.sendall(b"GET /api/info HTTP/1.1\r\n")  # a request line, then nothing: each holds a thread
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
            answer = extra.makefile("rb").read()  # answered on accepting it, before any request
        assert answer.startswith(b"HTTP/1.0 503") and b'"error": "busy' in answer, answer
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 5
    while request(port, "GET", "/api/info")[0] != 200:
        assert time.monotonic() < deadline, "the ui did not recover after the connections closed"
        time.sleep(0.1)


def test_run_is_rendered_once_for_many_requests(ui):
    """Fifty <img src=/run> (or a reload storm) share one render: one `dvc exp show`, not fifty."""
    port, _ = ui
    statuses, lock = [], threading.Lock()

    def get():
        status = request(port, "GET", "/run")[0]
        with lock:
            statuses.append(status)

    t0 = time.monotonic()
    threads = [threading.Thread(target=get) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 20
    assert time.monotonic() - t0 < 30  # twenty renders (several seconds each here) would take minutes


def test_run_page_cache_renders_once_per_period(monkeypatch):
    calls = []

    def render():
        calls.append(1)
        time.sleep(0.2)
        return "<p>run</p>"

    page = ui_mod.RunPage(render)
    threads = [threading.Thread(target=page.get) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and page.get() == b"<p>run</p>" and len(calls) == 1
    monkeypatch.setattr(ui_mod, "RUN_CACHE_S", 0.0)
    page.get()
    assert len(calls) == 2


# ------------------------------------------------------------------------------------- the backends
def _listening_tcp_inodes() -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in f.readlines()[1:]:
                cols = row.split()
                if cols[3] == "0A":  # LISTEN
                    inodes.add(cols[9])
    return inodes


def test_backends_are_reachable_by_this_process_only(ui):
    port, proc = ui
    children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    servers = [pid for pid in children if "llama-server" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(servers) == 2
    listening = _listening_tcp_inodes()
    for pid in servers:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in kv)
        sock = Path(argv[argv.index("--host") + 1])
        assert sock.suffix == ".sock" and "--port" not in argv and "--api-key" not in argv
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700  # other users cannot reach the socket
        assert argv[argv.index("--cors-origins") + 1] == f"http://127.0.0.1:{port}"
        # No TCP port to scan for: the server's sockets include no listening TCP one.
        fds = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert not {fd[8:-1] for fd in fds if fd.startswith("socket:[")} & listening
        # A key of this run, in the environment only; the shell's LLAMA_* did not come along.
        key = env["LLAMA_API_KEY"]
        assert key != "shell-key" and len(key) >= 32 and key not in " ".join(argv)
        assert "LLAMA_ARG_ENDPOINT_METRICS" not in env
        # Even this user, without the key, is refused.
        conn = ui_mod.Endpoint(socket_path=sock).connection(10)
        conn.request("GET", "/v1/models")
        assert conn.getresponse().status == 401
        conn.close()


def test_ipv6_loopback(tiny_gguf):
    _, gguf = tiny_gguf("scripted")
    proc, port = start_ui(gguf, "::1")
    try:
        status, _, body = request(port, "GET", "/api/info", host="::1")
        assert status == 200 and json.loads(body)["models"]
        assert chat_text(request(port, "POST", "/api/chat", json.dumps(CHAT).encode(),
                                 {"Content-Type": "application/json", "Origin": f"http://[::1]:{port}"}, host="::1")) \
            == "Hello world!"
        refused(request(port, "GET", "/api/info", headers={"Host": f"evil.example:{port}"}, host="::1"), 403, "Host")
    finally:
        stop_ui(proc)


def test_allow_host_must_be_a_name(tmp_path, capsys):
    from lorapipe import cli

    missing = str(tmp_path / "missing.gguf")  # checked after the flags: a flag let through fails fast too
    for bad in ("http://box", "box:80", "*.example", "box/x", ""):
        assert cli.main(["ui", "--model", missing, "--compare", missing, "--allow-host", bad]) == 2
        assert "--allow-host" in capsys.readouterr().err, bad
    assert ui_mod._is_host_name("box.lan") and ui_mod._is_host_name("fe80::1") and ui_mod._is_host_name("[::1]")


# ------------------------------------------------------------------------------ a real browser
ATTACK_PAGE = """<!doctype html><meta charset=utf-8><body><script>
const ui = "UI";
async function attempt(name, call) {
  try { const r = await call(); document.body.dataset[name] = "read " + r.status + " " + (await r.text()).slice(0, 80); }
  catch (e) { document.body.dataset[name] = "failed: " + e.name; }
}
(async () => {
  await attempt("info", () => fetch(ui + "/api/info"));
  await attempt("chatJson", () => fetch(ui + "/api/chat", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({messages: [{role: "user", content: "hi"}], max_tokens: 4})}));
  await attempt("chatPlain", () => fetch(ui + "/api/chat", {method: "POST", headers: {"Content-Type": "text/plain"},
    body: JSON.stringify({messages: [{role: "user", content: "hi"}], max_tokens: 4})}));
  document.body.dataset.done = "1";
})();
</script></body>"""


def test_a_page_of_another_origin_cannot_use_the_ui_in_chromium(ui):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port, _ = ui
    seen: list[tuple[str, str]] = []
    page = ATTACK_PAGE.replace('"UI"', json.dumps(f"http://127.0.0.1:{port}")).encode()

    class Attacker(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    attacker = ThreadingHTTPServer(("127.0.0.1", 0), Attacker)  # another origin: another port of loopback
    threading.Thread(target=attacker.serve_forever, daemon=True).start()
    drv = headless_chromium()
    try:
        drv.get(f"http://localhost:{attacker.server_address[1]}/")
        WebDriverWait(drv, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-done") == "1")
        body = drv.find_element(By.TAG_NAME, "body")
        for name in ("info", "chat-json", "chat-plain"):
            seen.append((name, body.get_attribute(f"data-{name}")))
        assert all(v == "failed: TypeError" for _, v in seen), seen  # the browser hands the page nothing

        # The ui's own page, in the same browser, chats.
        drv.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(drv, 60)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        temp = drv.find_element(By.ID, "chat-temp")
        temp.clear()
        temp.send_keys("0")
        drv.find_element(By.ID, "chat-input").send_keys("hello")
        drv.find_element(By.ID, "chat-send").click()
        sel = "#chat-log .msg.assistant"
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, sel).get_attribute("data-state") == "done")
        assert drv.find_element(By.CSS_SELECTOR, sel + " .text").text == "Hello world!"
    finally:
        drv.quit()
        attacker.shutdown()
        attacker.server_close()
