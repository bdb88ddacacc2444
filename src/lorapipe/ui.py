"""`lorapipe ui`: a local web page to chat with the model, compare two models, and read the run.

    lorapipe ui                                  # http://127.0.0.1:7860
    lorapipe ui --compare other.gguf             # the compare view's left model
    lorapipe ui --model exp-a.gguf --compare exp-b.gguf

Three tabs on one page: Chat (the pipeline's quantized GGUF, streaming, system prompt, reset),
Compare (one prompt, two models side by side, both answers streaming at once; default: the base
model's GGUF left, the fine-tuned one right) and Run (core/run_report.py: data counts, loss curve,
variants, gates, experiments, read from the committed metrics).

Each model runs in its own llama-server (core/llama_server.py, the server `lorapipe serve` ships) on a
Unix socket in a private folder (mode 0700), with a random API key of this run in its environment:
no web page can reach it (browsers speak no Unix sockets) and no other user can connect. This
process serves the page and relays the servers' streamed answers from /api/chat, so the page talks
to one origin only. Built on the standard library's HTTP server and one static page without
JavaScript libraries: nothing is loaded from outside this machine (docs/commands.md says why not Gradio).

The page is left running while its user browses other sites, so every request is checked before it
is routed: its Host must be one this ui answers to (loopback names and the bound address; more only
with --allow-host), which defeats DNS rebinding (a page on another name resolving to 127.0.0.1);
a browser's Origin / Sec-Fetch-Site must be this page's own, and a POST must say
`Content-Type: application/json` (a cross-site form or `text/plain` fetch cannot set it without a
CORS preflight, which this server never grants). Threads are bounded, every socket read and write
times out, and /run is rendered at most once per RUN_CACHE_S however often it is asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.resources
import ipaddress
import json
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from lorapipe.core import paths
from lorapipe.core.errors import LorapipeError
from lorapipe.core.gguf_file import check_gguf
from lorapipe.core.llama_server import Endpoint, check_port_free, command, is_loopback, start, stop, url, wait_healthy

HELP = "a local web page: chat with the model, compare two models side by side, see the run's metrics"

MAX_BODY_BYTES = 1 << 20
SOCKET_TIMEOUT_S = 10  # any single read or write of a client connection (an idle or half-sent request)
BODY_TIMEOUT_S = 10  # the whole request body, however slowly it trickles in
MAX_THREADS = 32  # connections handled at once; more get a 503 at once (each chat stream holds one)
UPSTREAM_TIMEOUT_S = 300  # the longest wait for llama-server's next streamed token
RUN_CACHE_S = 10  # /run runs `dvc exp show`: at most once per this many seconds
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
ROLES = ("system", "user", "assistant")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="the model to chat with, right in compare (default: models/gguf/model-quant.gguf)")
    parser.add_argument("--compare", default=None,
                        help="left model of the compare view (default: ui.compare, else the base model's GGUF)")
    parser.add_argument("--host", default=None, help="address to listen on (default: ui.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port of the page (default: ui.port, 7860)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="also answer requests for this host name (repeatable; default: only localhost, "
                             "127.0.0.1, [::1] and the --host address), e.g. the machine's name behind --host 0.0.0.0")
    parser.add_argument("--keep-llama-env", action="store_true",
                        help="pass LLAMA_ARG_* of the environment on to the llama-servers (default: removed)")


def base_gguf(params) -> Path:
    """The base model as a GGUF, for the compare view's default left side."""
    source = params.model.source
    if source == "embedded":
        from lorapipe.stages.base import embedded_gguf

        return embedded_gguf()
    if source.endswith(".gguf"):
        return Path(source)
    raise LorapipeError(f"model.source {source!r} is no GGUF, so the base model has none to compare with: "
                        "pass --compare FILE.gguf (or set ui.compare)")


class Backend:
    """One llama-server on a Unix socket in `folder` (private to this user), requiring `api_key`; its
    log in a temporary file (shown if it fails). CORS names the ui's origin, should the socket ever be
    reachable from a page."""

    def __init__(self, key: str, model: Path, params, *, folder: Path, api_key: str, origin: str,
                 keep_llama_env: bool = False):
        self.key, self.model = key, model
        self.endpoint = Endpoint(socket_path=folder / f"{key}.sock", api_key=api_key)
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = start(command(model, self.endpoint.socket_path, None, ctx=params.serve.ctx, alias=model.stem,
                                  parallel=params.serve.parallel, cors_origins=origin, threads=params.serve.threads),
                          log=self.log, api_key=api_key, keep_llama_env=keep_llama_env)

    def wait(self, timeout: float) -> None:
        try:
            wait_healthy(self.proc, self.endpoint, timeout)
        except LorapipeError as exc:
            self.log.seek(0)
            tail = "\n".join("    " + line for line in self.log.read().strip().splitlines()[-15:])
            raise LorapipeError(f"{self.model}: {exc}\n{tail}") from None

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()


def private_folder() -> Path:
    """A new folder only this user can enter (mkdtemp: mode 0700), short enough for socket paths (108 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="lorapipe-ui-"))
    if len(str(folder)) > 80:  # a long TMPDIR
        shutil.rmtree(folder)
        folder = Path(tempfile.mkdtemp(prefix="lorapipe-ui-", dir="/tmp"))
    return folder


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_json_body(raw: bytes):
    """The JSON value of a request body; ValueError saying why not (NaN and Infinity are Python's, not JSON).
    The json module stops a body nested past Python's recursion limit with a RecursionError."""
    try:
        return json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        raise ValueError("the body nests deeper than Python's JSON parser goes") from None
    except ValueError as exc:
        raise ValueError(f"the body is not JSON: {exc}") from None


def _check_chat_request(body, models, max_tokens_limit: int) -> str | None:
    """Why a /api/chat body is unusable, or None."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    model = body.get("model", "b")
    if not isinstance(model, str) or model not in models:
        return f"model must be one of {sorted(models)}"
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "messages must be a non-empty list"
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return "each message needs a role (system, user, assistant) and a string content"
    for key in ("temperature", "top_p"):
        if key in body and (not isinstance(body[key], (int, float)) or isinstance(body[key], bool) or body[key] < 0):
            return f"{key} must be a number >= 0"
    mt = body.get("max_tokens", 1)
    if not isinstance(mt, int) or isinstance(mt, bool) or not 0 < mt <= max_tokens_limit:
        return f"max_tokens must be an integer from 1 to {max_tokens_limit} (serve.ctx)"
    return None


def _is_host_name(name: str) -> bool:
    """A DNS name or an IP address (IPv6 with or without brackets); no scheme, port, path or wildcard."""
    try:
        ipaddress.ip_address(name[1:-1] if name.startswith("[") and name.endswith("]") else name)
        return True
    except ValueError:
        return re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*", name) is not None


def allowed_authorities(host: str, port: int, extra=()) -> frozenset[str]:
    """The Host header values (name:port) this ui answers to; the page's own origins are these behind http://."""
    names = {*LOOPBACK_NAMES, host, *extra}
    names = {f"[{n}]" if ":" in n and not n.startswith("[") else n for n in names}
    return frozenset(f"{n.lower()}:{port}" for n in names) | (frozenset(n.lower() for n in names) if port == 80 else frozenset())


class RunPage:
    """The run page, rendered at most once per RUN_CACHE_S whatever the number of requests (each
    render runs `dvc exp show`); requests arriving during a render wait for it and share it."""

    def __init__(self, render):
        self._render, self._lock = render, threading.Lock()
        self._page: bytes | None = None
        self._at = float("-inf")

    def get(self) -> bytes:
        with self._lock:
            if self._page is None or time.monotonic() - self._at > RUN_CACHE_S:
                self._page = self._render().encode()
                self._at = time.monotonic()
            return self._page


class UiHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with at most MAX_THREADS connections handled at once (a further one is
    answered 503 and closed at once) on IPv4 or IPv6."""

    daemon_threads = True

    def __init__(self, address, handler, max_threads: int = MAX_THREADS):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._slots = threading.BoundedSemaphore(max_threads)
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            body = json.dumps({"error": f"busy: {MAX_THREADS} connections open; try again"}).encode()
            with contextlib.suppress(OSError):
                request.settimeout(1)
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def make_handler(backends: dict[str, Backend], params, root: Path, authorities: frozenset[str]):
    """The request handler class; `authorities` are the Host values it answers to (allowed_authorities)."""
    page = importlib.resources.files("lorapipe").joinpath("resources/ui.html").read_bytes()
    cp = params.chat
    info = json.dumps({
        "models": {k: {"name": b.model.name, "path": str(b.model)} for k, b in backends.items()},
        "defaults": {"system": cp.system or "", "temperature": cp.temperature, "top_p": cp.top_p,
                     "max_tokens": cp.max_new_tokens, "repeat_penalty": cp.repetition_penalty},
    }).encode()
    origins = frozenset("http://" + a for a in authorities)

    def render_run() -> str:
        from lorapipe.core.run_report import render

        dvc = str(Path(sys.executable).with_name("dvc"))
        return render(root, params, dvc if Path(dvc).exists() else "dvc")

    run_page = RunPage(render_run)

    class Handler(BaseHTTPRequestHandler):
        server_version = "lorapipe-ui"
        timeout = SOCKET_TIMEOUT_S  # set on the socket: an idle or half-sent request ends, its thread freed

        def log_message(self, fmt, *args):  # one line per request would drown the terminal
            pass

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self._common_headers()
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _common_headers(self) -> None:
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("X-Frame-Options", "DENY")  # no other page may frame this one (clickjacking)
            self.send_header("Content-Security-Policy", "frame-ancestors 'none'")

        def _error(self, status: int, msg: str) -> None:
            self.close_connection = True
            self._send(status, json.dumps({"error": msg}).encode(), "application/json")

        def send_error(self, code, message=None, explain=None):
            # What the base class refuses itself (a malformed request line or header) is JSON too.
            self._error(code, message or HTTPStatus(code).phrase)

        def _refusal(self) -> str | None:
            """Why this request must not be served (answered 403), or None; checked on every route."""
            host = (self.headers.get("Host") or "").strip().lower()
            if host not in authorities:
                return (f"Host {host!r} is not this ui's: it answers to {', '.join(sorted(authorities))} "
                        "(lorapipe ui --allow-host NAME adds a name)")
            origin = self.headers.get("Origin")
            if origin is not None and origin.lower() not in origins:
                return f"requests from the page {origin!r} are not allowed; only this ui's own page may call it"
            site = self.headers.get("Sec-Fetch-Site")
            navigation = self.command == "GET" and self.headers.get("Sec-Fetch-Mode") == "navigate"
            if site not in (None, "same-origin", "none") and not navigation:
                # Images, scripts and fetches another site's page makes (they may carry no Origin).
                return f"requests made by another site's page are not allowed (Sec-Fetch-Site: {site})"
            return None

        def _guard(self) -> bool:
            why = self._refusal()
            if why:
                self._error(403, why)
            return why is None

        def do_GET(self):
            if not self._guard():
                return
            route = self.path.split("?", 1)[0]
            if route == "/":
                self._send(200, page, "text/html; charset=utf-8")
            elif route == "/api/info":
                self._send(200, info, "application/json")
            elif route == "/run":
                try:
                    body = run_page.get()
                except Exception as exc:  # a broken metrics file must not take the page down
                    return self._error(500, f"the run page failed: {type(exc).__name__}: {exc}")
                self._send(200, body, "text/html; charset=utf-8")
            elif route == "/api/chat":
                self._error(405, "/api/chat takes POST")
            else:
                self._error(404, f"no page {route}")

        do_HEAD = do_GET

        def _not_allowed(self):
            if self._guard():
                self._error(405, f"{self.command} is not supported; the ui takes GET, and POST on /api/chat")

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # OPTIONS: no CORS preflight is ever granted

        def _read_body(self, length: int) -> bytes:
            """`length` bytes of body within BODY_TIMEOUT_S in all (TimeoutError), else ConnectionError."""
            deadline = time.monotonic() + BODY_TIMEOUT_S
            chunks, got = [], 0
            while got < length:
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunk = self.rfile.read1(min(1 << 16, length - got))
                if not chunk:
                    raise ConnectionError("the client closed before sending the whole body")
                chunks.append(chunk)
                got += len(chunk)
            return b"".join(chunks)

        def do_POST(self):
            if not self._guard():
                return
            if self.path.split("?", 1)[0] != "/api/chat":
                return self._error(404, f"no endpoint {self.path}")
            if self.headers.get_content_type() != "application/json":
                return self._error(415, "the body must be sent as Content-Type: application/json")
            if "Content-Length" not in self.headers:
                return self._error(411, "Content-Length is required")
            try:
                length = int(self.headers["Content-Length"])
            except ValueError:
                return self._error(400, "bad Content-Length")
            if not 0 < length <= MAX_BODY_BYTES:
                return self._error(413 if length > MAX_BODY_BYTES else 400, "the body must be 1 byte to 1 MiB of JSON")
            try:
                raw = self._read_body(length)
            except (TimeoutError, OSError) as exc:
                return self._error(408, f"the body did not arrive within {BODY_TIMEOUT_S} s ({type(exc).__name__})")
            try:
                body = parse_json_body(raw)
            except ValueError as exc:
                return self._error(400, str(exc))
            why = _check_chat_request(body, backends, params.serve.ctx)
            if why:
                return self._error(400, why)
            self._relay(backends[body.get("model", "b")], body)

        def _relay(self, backend: Backend, body: dict) -> None:
            """Stream llama-server's answer to the page as JSON lines: {"delta"}, then {"done"} or {"error"}."""
            upstream_body = json.dumps({"messages": body["messages"], "stream": True,
                                        "temperature": body.get("temperature", cp.temperature),
                                        "top_p": body.get("top_p", cp.top_p),
                                        "max_tokens": body.get("max_tokens", cp.max_new_tokens),
                                        "repeat_penalty": cp.repetition_penalty}).encode()
            try:
                conn, upstream = backend.endpoint.request("POST", "/v1/chat/completions", upstream_body,
                                                          timeout=UPSTREAM_TIMEOUT_S)
            except (http.client.HTTPException, OSError) as exc:
                return self._error(502, f"llama-server of {backend.model.name} did not answer: {exc}")
            # Closing the connection (also when the page stops reading) ends the generation upstream.
            with contextlib.closing(conn):
                if upstream.status != 200:
                    text = upstream.read(500).decode("utf-8", "replace")
                    return self._error(502, f"llama-server: {upstream.status} {text}")
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self._common_headers()
                self.end_headers()  # HTTP/1.0 and no length: the stream ends when we close
                try:
                    while line := upstream.readline():
                        line = line.rstrip(b"\r\n")
                        if not line.startswith(b"data: ") or line == b"data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        choice = (event.get("choices") or [{}])[0]
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            self.wfile.write(json.dumps({"delta": text}).encode() + b"\n")
                        if choice.get("finish_reason"):
                            timings = event.get("timings") or {}
                            self.wfile.write(json.dumps({
                                "done": True, "finish_reason": choice["finish_reason"],
                                "tokens": timings.get("predicted_n"),
                                "tokens_per_s": timings.get("predicted_per_second")}).encode() + b"\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the page stopped reading (Stop, reload)
                except (http.client.HTTPException, OSError, ValueError) as exc:
                    with contextlib.suppress(OSError):
                        self.wfile.write(json.dumps({"error": f"stream broke off: {exc}"}).encode() + b"\n")

    return Handler


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame):
    raise _Terminated()


def main(args: argparse.Namespace) -> int:
    from lorapipe.serve import _load_params

    params = _load_params(args.params)
    up = params.ui
    host = args.host or up.host
    port = args.port if args.port is not None else up.port
    if not 0 < port < 65536:
        raise LorapipeError(f"--port: {port} is not a TCP port (1-65535)")
    for name in args.allow_host:
        if not _is_host_name(name):
            raise LorapipeError(f"--allow-host: {name!r} is not a host name or address "
                                "(no scheme, port, path or wildcard)")
    model = check_gguf(args.model or paths.QUANT_GGUF, "pass --model, or build it with `dvc repro`")
    left = args.compare or up.compare
    left = check_gguf(left if left else base_gguf(params), "pass --compare FILE.gguf")
    if not is_loopback(host):
        print(f"warning: the ui listens on {host}, reachable from other machines; it has no authentication",
              file=sys.stderr)
    check_port_free(host, port, "ui.port")
    server = UiHTTPServer((host, port), BaseHTTPRequestHandler)  # bound now: the port is ours
    authorities = allowed_authorities(host, port, args.allow_host)
    origin = url(host, port)

    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    backends: dict[str, Backend] = {}
    thread = None
    folder = private_folder()
    api_key = secrets.token_urlsafe(32)  # this run's: only this process knows it
    try:
        for key, gguf in (("a", left), ("b", model)):
            backends[key] = Backend(key, gguf, params, folder=folder, api_key=api_key, origin=origin,
                                    keep_llama_env=args.keep_llama_env)
        for b in backends.values():
            b.wait(params.serve.startup_timeout)
        server.RequestHandlerClass = make_handler(backends, params, Path.cwd(), authorities)
        thread = threading.Thread(target=server.serve_forever, name="ui-http", daemon=True)
        thread.start()
        print(f"[ui] ready: {origin}/  chat: {model}  compare: {left} | {model}  (Ctrl-C to stop)",
              flush=True)
        while thread.is_alive():
            for b in backends.values():
                if b.proc.poll() is not None:
                    raise LorapipeError(f"llama-server of {b.model} exited with code {b.proc.returncode}")
            thread.join(1.0)
        return 0
    except (KeyboardInterrupt, _Terminated):
        print("[ui] stopped", flush=True)
        return 0
    finally:
        if thread is not None:
            server.shutdown()
        server.server_close()
        for b in backends.values():
            b.stop()
        shutil.rmtree(folder, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
