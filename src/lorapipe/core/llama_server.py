"""Start, health-check and stop llama.cpp's llama-server (used by `lorapipe serve` and `lorapipe ui`).

llama-server runs with `--jinja`, so /v1/chat/completions renders the GGUF's own chat template. We
check what llama-server would report late or vaguely (a port already taken) before starting it,
wait for its /health, and stop it in order: it runs in its own session (a terminal's Ctrl-C reaches
only us) and is asked to die with us (PR_SET_PDEATHSIG), so it never outlives the command.

Access: llama-server answers every origin by default (`Access-Control-Allow-Origin` echoes the
page's Origin), so `--cors-origins` is always passed. Its API key travels in the environment
(LLAMA_API_KEY, readable only by this user in /proc), never on the command line (readable by every
user). The environment is passed without the user's LLAMA_ARG_* / LLAMA_API_KEY, which would
otherwise silently change what the server enables, unless the user asks for them. A server can
listen on a Unix socket (a --host ending in .sock); `Endpoint` talks HTTP to either kind.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lorapipe.core.errors import LorapipeError
from lorapipe.core.llamacpp import LlamaCppMissing, tool

STOP_GRACE_S = 10.0
# llama-server's read/write timeout per socket operation (its default is an hour): a half-sent
# request or a client that stops reading frees its HTTP thread after this long.
SOCKET_TIMEOUT_S = 60


def check_port_free(host: str, port: int, what: str = "serve.port") -> None:
    """Fail clearly if something already listens on host:port (llama-server would only log it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR as llama-server sets it (cpp-httplib): a port held only by TIME_WAIT
        # connections of a previous run is free for it, a listening socket is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except PermissionError:
            raise LorapipeError(f"{what}: {port} needs privileges on {host}; use a port above 1023") from None
        except OSError as exc:
            raise LorapipeError(f"{what}: {host}:{port} is already in use ({exc.strerror}); stop what listens "
                                "there or pick another port (--port or " + what + ")") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def url(host: str, port: int) -> str:
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def _die_with_parent() -> None:
    """In the child before exec: have the kernel SIGTERM it if this process dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def command(model: Path, host: str | Path, port: int | None, *, ctx: int, alias: str, parallel: int,
            cors_origins: str, threads: int | None = None) -> list[str]:
    """llama-server's command line. `parallel` decoding slots share one KV pool of `ctx` tokens
    (--kv-unified, what llama-server's own default of 4 auto slots does): continuous batching of up
    to `parallel` requests, each of which may still use the whole context when the others are short.

    `host` may be a Unix socket path (`port` is then None). `cors_origins` is what llama-server writes
    as Access-Control-Allow-Origin: one origin (the only page that may read cross-origin),
    `localhost` (pages of localhost) or `*`."""
    try:
        exe = tool("llama-server")
    except LlamaCppMissing as exc:
        raise LorapipeError(str(exc)) from None
    cmd = [str(exe), "--model", str(model), "--host", str(host)]
    if port is not None:
        cmd += ["--port", str(port)]
    cmd += ["--ctx-size", str(ctx), "--parallel", str(parallel), "--jinja", "--alias", alias,
            "--cors-origins", cors_origins, "--timeout", str(SOCKET_TIMEOUT_S)]
    if parallel > 1:
        cmd.append("--kv-unified")
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


def server_env(api_key: str | None, keep_llama_env: bool = False) -> dict[str, str]:
    """Our environment for llama-server: without LLAMA_ARG_* and LLAMA_API_KEY unless `keep_llama_env`
    (llama-server reads every option from a LLAMA_ARG_ variable), with LLAMA_API_KEY = `api_key` if given."""
    env = {k: v for k, v in os.environ.items()
           if keep_llama_env or not (k.startswith("LLAMA_ARG_") or k == "LLAMA_API_KEY")}
    if api_key:
        env["LLAMA_API_KEY"] = api_key
    return env


def start(cmd: list[str], *, log=None, api_key: str | None = None, keep_llama_env: bool = False) -> subprocess.Popen:
    """Start llama-server in its own session, dying with us; its log goes to `log` (an open file), else
    ours. `api_key`, if given, is required on every route but /health (passed in the environment)."""
    env = server_env(api_key, keep_llama_env)
    exe = Path(cmd[0])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(exe.parent), env.get("LD_LIBRARY_PATH")]))
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                            preexec_fn=_die_with_parent)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


@dataclass(frozen=True)
class Endpoint:
    """Where one llama-server listens (TCP host and port, or a Unix socket path) and its API key."""

    host: str = "127.0.0.1"
    port: int | None = None
    socket_path: Path | None = None
    api_key: str | None = None

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.socket_path is not None:
            return _UnixHTTPConnection(str(self.socket_path), timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None, *, timeout: float):
        """Send one request; return (connection, response): read the response, then close the connection."""
        conn = self.connection(timeout)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self.api_key:
            headers["Authorization"] = "Bearer " + self.api_key
        try:
            conn.request(method, path, body=body, headers=headers)
            return conn, conn.getresponse()
        except BaseException:
            conn.close()
            raise


def wait_healthy(proc: subprocess.Popen, endpoint: Endpoint, timeout: float, what: str = "serve.startup_timeout") -> None:
    """Poll llama-server's /health until it answers 200 (model loaded) or the child exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LorapipeError(f"llama-server exited with code {proc.returncode} before it was ready "
                                "(its log is above)")
        try:
            conn, resp = endpoint.request("GET", "/health", timeout=2)
            with contextlib.closing(conn):
                resp.read()
                if resp.status == 200:
                    return
        except (http.client.HTTPException, OSError):
            pass  # not listening yet, or 503 while the model loads
        time.sleep(0.2)
    raise LorapipeError(f"llama-server did not become ready within {timeout:.0f} s ({what})")


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM the server, wait for it, SIGKILL if it hangs; return its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
