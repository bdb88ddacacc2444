"""`lorapipe serve`: llama.cpp's llama-server on the quantized GGUF, OpenAI-compatible, on loopback.

    lorapipe serve                      # models/gguf/model-<export.quant>.gguf on serve.host:serve.port
    curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "hi"}]}'

llama-server runs with `--jinja`, so /v1/chat/completions renders the GGUF's own chat template. We
check what llama-server would report late or vaguely (a file that is no GGUF, a port already taken)
before starting it, wait for its /health, and on SIGINT/SIGTERM stop it and wait for it: it runs in
its own session and is asked to die with us (PR_SET_PDEATHSIG), so it never outlives this command.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from lorapipe.core import paths
from lorapipe.core.errors import LorapipeError
from lorapipe.core.gguf_file import check_gguf
from lorapipe.core.llamacpp import LlamaCppMissing, tool

HELP = "serve the quantized GGUF with llama.cpp's OpenAI-compatible server (/v1/chat/completions) on loopback"

STOP_GRACE_S = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="GGUF file (default: models/gguf/model-<export.quant>.gguf)")
    parser.add_argument("--host", default=None, help="address to listen on (default: serve.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: serve.port, 8080)")
    parser.add_argument("--ctx", type=int, default=None, help="context window in tokens (default: serve.ctx)")
    parser.add_argument("--alias", default=None, help="model name the API reports (default: export.name)")


class _Terminated(Exception):
    """SIGTERM, turned into an exception so the same clean-up path as Ctrl-C runs."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def check_port_free(host: str, port: int) -> None:
    """Fail clearly if something already listens on host:port (llama-server would only log it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR as llama-server sets it (cpp-httplib): a port held only by TIME_WAIT
        # connections of a previous run is free for it, a listening socket is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except PermissionError:
            raise LorapipeError(f"serve.port: {port} needs privileges on {host}; use a port above 1023") from None
        except OSError as exc:
            raise LorapipeError(f"serve.port: {host}:{port} is already in use ({exc.strerror}); stop what listens "
                                "there or pick another port (--port or serve.port)") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _die_with_parent() -> None:
    """In the child before exec: have the kernel SIGTERM it if this process dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float) -> None:
    """Poll llama-server's /health until it answers 200 (model loaded) or the child exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LorapipeError(f"llama-server exited with code {proc.returncode} before it was ready "
                                "(its log is above)")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass  # not listening yet, or 503 while the model loads
        time.sleep(0.2)
    raise LorapipeError(f"llama-server did not become ready within {timeout:.0f} s (serve.startup_timeout)")


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


def _load_params(path: str):
    from lorapipe import params as params_mod

    if path == "params.yaml" and not Path(path).is_file():
        return params_mod.Params()
    return params_mod.load(path)


def main(args: argparse.Namespace) -> int:
    params = _load_params(args.params)
    sp = params.serve
    host = args.host or sp.host
    port = args.port if args.port is not None else sp.port
    ctx = args.ctx or sp.ctx
    if not 0 < port < 65536:
        raise LorapipeError(f"--port: {port} is not a TCP port (1-65535)")
    model = check_gguf(args.model or paths.gguf_path(params.export.quant),
                       "pass --model, or build it with `dvc repro`")
    if not is_loopback(host):
        print(f"warning: serving on {host}, reachable from other machines; the server has no authentication",
              file=sys.stderr)
    check_port_free(host, port)
    try:
        exe = tool("llama-server")
    except LlamaCppMissing as exc:
        raise LorapipeError(str(exc)) from None

    cmd = [str(exe), "--model", str(model), "--host", host, "--port", str(port), "--ctx-size", str(ctx),
           "--jinja", "--alias", args.alias or params.export.name]
    if sp.threads:
        cmd += ["--threads", str(sp.threads)]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(exe.parent), env.get("LD_LIBRARY_PATH")]))
    base = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    proc = None
    try:
        # Own session: a terminal's Ctrl-C reaches only us, and we stop the child in order.
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent)
        wait_healthy(proc, base + "/health", sp.startup_timeout)
        print(f"[serve] llama-server (pid {proc.pid}) ready: {base}/v1/chat/completions  model {model}  "
              "(Ctrl-C to stop)", flush=True)
        code = proc.wait()
        raise LorapipeError(f"llama-server exited unexpectedly with code {code} (its log is above)")
    except (KeyboardInterrupt, _Terminated):
        code = stop(proc) if proc is not None else 0
        print(f"[serve] stopped (llama-server exit code {code})", flush=True)
        return 0
    finally:
        if proc is not None and proc.poll() is None:
            stop(proc)
        signal.signal(signal.SIGTERM, previous)
