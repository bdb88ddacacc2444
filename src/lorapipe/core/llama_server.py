"""Start, health-check and stop llama.cpp's llama-server (used by `lorapipe serve` and `lorapipe ui`).

llama-server runs with `--jinja`, so /v1/chat/completions renders the GGUF's own chat template. We
check what llama-server would report late or vaguely (a port already taken) before starting it,
wait for its /health, and stop it in order: it runs in its own session (a terminal's Ctrl-C reaches
only us) and is asked to die with us (PR_SET_PDEATHSIG), so it never outlives the command.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from lorapipe.core.errors import LorapipeError
from lorapipe.core.llamacpp import LlamaCppMissing, tool

STOP_GRACE_S = 10.0


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


def free_loopback_port() -> int:
    """A port the kernel just had free on 127.0.0.1 (for servers only this process talks to)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def command(model: Path, host: str, port: int, *, ctx: int, alias: str, parallel: int,
            threads: int | None = None) -> list[str]:
    """llama-server's command line. `parallel` decoding slots share one KV pool of `ctx` tokens
    (--kv-unified, what llama-server's own default of 4 auto slots does): continuous batching of up
    to `parallel` requests, each of which may still use the whole context when the others are short."""
    try:
        exe = tool("llama-server")
    except LlamaCppMissing as exc:
        raise LorapipeError(str(exc)) from None
    cmd = [str(exe), "--model", str(model), "--host", host, "--port", str(port), "--ctx-size", str(ctx),
           "--parallel", str(parallel), "--jinja", "--alias", alias]
    if parallel > 1:
        cmd.append("--kv-unified")
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


def start(cmd: list[str], *, log=None) -> subprocess.Popen:
    """Start llama-server in its own session, dying with us; its log goes to `log` (an open file), else ours."""
    env = dict(os.environ)
    exe = Path(cmd[0])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(exe.parent), env.get("LD_LIBRARY_PATH")]))
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                            preexec_fn=_die_with_parent)


def wait_healthy(proc: subprocess.Popen, health_url: str, timeout: float, what: str = "serve.startup_timeout") -> None:
    """Poll llama-server's /health until it answers 200 (model loaded) or the child exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LorapipeError(f"llama-server exited with code {proc.returncode} before it was ready "
                                "(its log is above)")
        try:
            with urllib.request.urlopen(health_url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
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
