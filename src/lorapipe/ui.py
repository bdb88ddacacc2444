"""`lorapipe ui`: a local web page to chat with the model, compare two models, and read the run.

    lorapipe ui                                  # http://127.0.0.1:7860
    lorapipe ui --compare other.gguf             # the compare view's left model
    lorapipe ui --model exp-a.gguf --compare exp-b.gguf

Three tabs on one page: Chat (the pipeline's quantized GGUF, streaming, system prompt, reset),
Compare (one prompt, two models side by side, both answers streaming at once; default: the base
model's GGUF left, the fine-tuned one right) and Run (core/run_report.py: data counts, loss curve,
variants, gates, experiments, read from the committed metrics).

Each model runs in its own llama-server (core/llama_server.py, the server `lorapipe serve` ships) on a
free loopback port; this process serves the page and relays the servers' streamed answers from
/api/chat, so the page talks to one origin only. Built on the standard library's HTTP server and one
static page without JavaScript libraries: nothing is loaded from outside this machine (docs/commands.md
says why not Gradio).
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import signal
import sys
import tempfile
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

from lorapipe.core import paths
from lorapipe.core.errors import LorapipeError
from lorapipe.core.gguf_file import check_gguf
from lorapipe.core.llama_server import (check_port_free, command, free_loopback_port, is_loopback, start, stop,
                                        url, wait_healthy)

HELP = "a local web page: chat with the model, compare two models side by side, see the run's metrics"

MAX_BODY_BYTES = 1 << 20
UPSTREAM_TIMEOUT_S = (5, 300)  # connect, and the longest wait for the next streamed token
ROLES = ("system", "user", "assistant")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="the model to chat with, right in compare (default: models/gguf/model-quant.gguf)")
    parser.add_argument("--compare", default=None,
                        help="left model of the compare view (default: ui.compare, else the base model's GGUF)")
    parser.add_argument("--host", default=None, help="address to listen on (default: ui.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port of the page (default: ui.port, 7860)")


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
    """One llama-server on a free loopback port, its log in a temporary file (shown if it fails)."""

    def __init__(self, key: str, model: Path, params):
        self.key, self.model = key, model
        self.port = free_loopback_port()
        self.url = url("127.0.0.1", self.port)
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = start(command(model, "127.0.0.1", self.port, ctx=params.serve.ctx, alias=model.stem,
                                  parallel=params.serve.parallel, threads=params.serve.threads), log=self.log)

    def wait(self, timeout: float) -> None:
        try:
            wait_healthy(self.proc, self.url + "/health", timeout)
        except LorapipeError as exc:
            self.log.seek(0)
            tail = "\n".join("    " + line for line in self.log.read().strip().splitlines()[-15:])
            raise LorapipeError(f"{self.model}: {exc}\n{tail}") from None

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()


def _check_chat_request(body) -> str | None:
    """Why a /api/chat body is unusable, or None."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "messages must be a non-empty list"
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return "each message needs a role (system, user, assistant) and a string content"
    for key in ("temperature", "top_p"):
        if key in body and (not isinstance(body[key], (int, float)) or isinstance(body[key], bool) or body[key] < 0):
            return f"{key} must be a number >= 0"
    if "max_tokens" in body and (not isinstance(body["max_tokens"], int) or body["max_tokens"] <= 0):
        return "max_tokens must be a positive integer"
    return None


def make_handler(backends: dict[str, Backend], params, root: Path):
    page = importlib.resources.files("lorapipe").joinpath("resources/ui.html").read_bytes()
    cp = params.chat
    info = json.dumps({
        "models": {k: {"name": b.model.name, "path": str(b.model)} for k, b in backends.items()},
        "defaults": {"system": cp.system or "", "temperature": cp.temperature, "top_p": cp.top_p,
                     "max_tokens": cp.max_new_tokens, "repeat_penalty": cp.repetition_penalty},
    }).encode()

    class Handler(BaseHTTPRequestHandler):
        server_version = "lorapipe-ui"

        def log_message(self, fmt, *args):  # one line per request would drown the terminal
            pass

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, msg: str) -> None:
            self._send(status, json.dumps({"error": msg}).encode(), "application/json")

        def do_GET(self):
            route = self.path.split("?", 1)[0]
            if route == "/":
                self._send(200, page, "text/html; charset=utf-8")
            elif route == "/api/info":
                self._send(200, info, "application/json")
            elif route == "/run":
                from lorapipe.core.run_report import render

                dvc = str(Path(sys.executable).with_name("dvc"))
                self._send(200, render(root, params, dvc if Path(dvc).exists() else "dvc").encode(),
                           "text/html; charset=utf-8")
            else:
                self._error(404, f"no page {route}")

        def do_POST(self):
            if self.path != "/api/chat":
                return self._error(404, f"no endpoint {self.path}")
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                return self._error(400, "bad Content-Length")
            if not 0 < length <= MAX_BODY_BYTES:
                return self._error(413 if length > MAX_BODY_BYTES else 400, "the body must be 1 byte to 1 MiB of JSON")
            try:
                body = json.loads(self.rfile.read(length))
            except ValueError:
                return self._error(400, "the body is not JSON")
            why = _check_chat_request(body)
            backend = backends.get(body.get("model", "b")) if isinstance(body, dict) else None
            if why is None and backend is None:
                why = f"model must be one of {sorted(backends)}"
            if why:
                return self._error(400, why)
            self._relay(backend, body)

        def _relay(self, backend: Backend, body: dict) -> None:
            """Stream llama-server's answer to the page as JSON lines: {"delta"}, then {"done"} or {"error"}."""
            upstream_body = {"messages": body["messages"], "stream": True,
                             "temperature": body.get("temperature", cp.temperature),
                             "top_p": body.get("top_p", cp.top_p),
                             "max_tokens": body.get("max_tokens", cp.max_new_tokens),
                             "repeat_penalty": cp.repetition_penalty}
            try:
                upstream = requests.post(backend.url + "/v1/chat/completions", json=upstream_body, stream=True,
                                         timeout=UPSTREAM_TIMEOUT_S)
            except requests.RequestException as exc:
                return self._error(502, f"llama-server of {backend.model.name} did not answer: {exc}")
            with upstream:
                if upstream.status_code != 200:
                    return self._error(502, f"llama-server: {upstream.status_code} {upstream.text[:500]}")
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()  # HTTP/1.0 and no length: the stream ends when we close
                try:
                    for line in upstream.iter_lines(chunk_size=None):
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
                    pass  # the page stopped reading (Stop, reload): closing upstream ends the generation
                except (requests.RequestException, ValueError) as exc:
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
    model = check_gguf(args.model or paths.QUANT_GGUF, "pass --model, or build it with `dvc repro`")
    left = args.compare or up.compare
    left = check_gguf(left if left else base_gguf(params), "pass --compare FILE.gguf")
    if not is_loopback(host):
        print(f"warning: the ui listens on {host}, reachable from other machines; it has no authentication",
              file=sys.stderr)
    check_port_free(host, port, "ui.port")
    server = ThreadingHTTPServer((host, port), BaseHTTPRequestHandler)  # bound now: the port is ours
    server.daemon_threads = True

    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    backends: dict[str, Backend] = {}
    thread = None
    try:
        backends["a"] = Backend("a", left, params)
        backends["b"] = Backend("b", model, params)
        for b in backends.values():
            b.wait(params.serve.startup_timeout)
        server.RequestHandlerClass = make_handler(backends, params, Path.cwd())
        thread = threading.Thread(target=server.serve_forever, name="ui-http", daemon=True)
        thread.start()
        print(f"[ui] ready: {url(host, port)}/  chat: {model}  compare: {left} | {model}  (Ctrl-C to stop)",
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
        signal.signal(signal.SIGTERM, previous)
