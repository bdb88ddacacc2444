"""`lorapipe serve`: llama.cpp's llama-server on the quantized GGUF, OpenAI-compatible, on loopback.

    lorapipe serve                      # models/gguf/model-quant.gguf on serve.host:serve.port
    curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "hi"}]}'

A file that is no GGUF is reported before starting; starting, the health wait and the ordered stop
are core/llama_server.py's (shared with `lorapipe ui`). On SIGINT/SIGTERM the server is stopped and
waited for; it never outlives this command.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from lorapipe.core import paths
from lorapipe.core.errors import LorapipeError
from lorapipe.core.gguf_file import check_gguf
from lorapipe.core.llama_server import check_port_free, command, is_loopback, start, stop, url, wait_healthy

HELP = "serve the quantized GGUF with llama.cpp's OpenAI-compatible server (/v1/chat/completions) on loopback"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="GGUF file (default: models/gguf/model-quant.gguf)")
    parser.add_argument("--host", default=None, help="address to listen on (default: serve.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: serve.port, 8080)")
    parser.add_argument("--ctx", type=int, default=None, help="context window in tokens (default: serve.ctx)")
    parser.add_argument("--parallel", type=int, default=None,
                        help="requests decoded together (continuous batching; default: serve.parallel)")
    parser.add_argument("--alias", default=None, help="model name the API reports (default: export.name)")


class _Terminated(Exception):
    """SIGTERM, turned into an exception so the same clean-up path as Ctrl-C runs."""


def _raise_terminated(signum, frame):
    raise _Terminated()


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
    model = check_gguf(args.model or paths.QUANT_GGUF,
                       "pass --model, or build it with `dvc repro`")
    if not is_loopback(host):
        print(f"warning: serving on {host}, reachable from other machines; the server has no authentication",
              file=sys.stderr)
    check_port_free(host, port)
    parallel = args.parallel or sp.parallel
    if parallel < 1:
        raise LorapipeError(f"--parallel: {parallel} must be at least 1")
    cmd = command(model, host, port, ctx=ctx, alias=args.alias or params.export.name, parallel=parallel,
                  threads=sp.threads)
    base = url(host, port)

    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    proc = None
    try:
        # Own session: a terminal's Ctrl-C reaches only us, and we stop the child in order.
        proc = start(cmd)
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
