"""`lorapipe serve`: llama.cpp's llama-server on the quantized GGUF, OpenAI-compatible, on loopback.

    export OPENAI_API_KEY=$(python -c 'import secrets; print(secrets.token_urlsafe(24))')
    lorapipe serve                      # models/gguf/model-quant.gguf on serve.host:serve.port
    curl http://127.0.0.1:8080/v1/chat/completions -H "Authorization: Bearer $OPENAI_API_KEY" \\
         -H 'Content-Type: application/json' -d '{"messages": [{"role": "user", "content": "hi"}]}'

The API key is the one of --api-key, else of the environment variable serve.api_key_env names
(OPENAI_API_KEY, the one OpenAI clients read, so one export serves the server and its clients);
without one, every program of every user of this machine may use the server. llama-server gets
the key in its environment, never on its command line. Cross-origin reads: none unless
--cors-origins / serve.cors_origins allows a page (llama-server's default is any page).

A file that is no GGUF is reported before starting; starting, the health wait and the ordered stop
are core/llama_server.py's (shared with `lorapipe ui`). On SIGINT/SIGTERM the server is stopped and
waited for; it never outlives this command.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from pathlib import Path

from lorapipe.core import paths
from lorapipe.core.errors import LorapipeError
from lorapipe.core.gguf_file import check_gguf
from lorapipe.core.llama_server import (Endpoint, check_port_free, command, is_loopback, start, stop, url,
                                        wait_healthy)

HELP = "serve the quantized GGUF with llama.cpp's OpenAI-compatible server (/v1/chat/completions) on loopback"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="GGUF file (default: models/gguf/model-quant.gguf)")
    parser.add_argument("--host", default=None, help="address to listen on (default: serve.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: serve.port, 8080)")
    parser.add_argument("--ctx", type=int, default=None, help="context window in tokens (default: serve.ctx)")
    parser.add_argument("--parallel", type=int, default=None,
                        help="requests decoded together (continuous batching; default: serve.parallel)")
    parser.add_argument("--alias", default=None, help="model name the API reports (default: export.name)")
    parser.add_argument("--api-key", default=None,
                        help="key clients must send (Authorization: Bearer KEY); default: the value of the "
                             "environment variable serve.api_key_env names (OPENAI_API_KEY). A key given here "
                             "is visible to other users in the process list: prefer the environment")
    parser.add_argument("--cors-origins", default=None,
                        help="the web page origin allowed to read answers cross-origin (http://host:port), "
                             "'localhost' (pages served from localhost) or '*' (any page); "
                             "default: serve.cors_origins, null = none")
    parser.add_argument("--keep-llama-env", action="store_true",
                        help="pass LLAMA_ARG_* and LLAMA_API_KEY of the environment on to llama-server "
                             "(default: removed, so a variable in your shell does not change the server)")


class _Terminated(Exception):
    """SIGTERM, turned into an exception so the same clean-up path as Ctrl-C runs."""


def _raise_terminated(signum, frame):
    raise _Terminated()


_ORIGIN = re.compile(r"https?://[^/,\s]+")


def check_cors_origins(value: str | None, key: str = "serve.cors_origins") -> str | None:
    """None (no cross-origin reads), or what llama-server may write as Access-Control-Allow-Origin:
    it writes the value as is, and a browser honours one origin only, so a list would allow nobody."""
    if value is None or value == "":
        return None
    if value in ("*", "localhost") or _ORIGIN.fullmatch(value):
        return value
    raise LorapipeError(f"{key}: {value!r} is not one origin (scheme://host[:port], no path), 'localhost' or '*'")


def api_key(args_key: str | None, env_name: str | None) -> tuple[str | None, str]:
    """The key and where it came from (for the ready line; the key itself is never printed)."""
    if args_key:
        return args_key, "--api-key"
    if env_name and os.environ.get(env_name):
        return os.environ[env_name], f"${env_name}"
    return None, ""


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
    key, key_from = api_key(args.api_key, sp.api_key_env)
    cors = check_cors_origins(args.cors_origins if args.cors_origins is not None else sp.cors_origins,
                              "--cors-origins" if args.cors_origins is not None else "serve.cors_origins")
    if key is None:
        where = "reachable from other machines" if not is_loopback(host) else "on loopback"
        env_hint = f"export {sp.api_key_env}=... or " if sp.api_key_env else ""
        print(f"warning: serving {where} without an API key: any program of any user that can reach "
              f"{host} may use it ({env_hint}pass --api-key)", file=sys.stderr)
    check_port_free(host, port)
    parallel = args.parallel or sp.parallel
    if parallel < 1:
        raise LorapipeError(f"--parallel: {parallel} must be at least 1")
    base = url(host, port)
    # llama-server has no "no CORS" value; naming its own origin allows no other page (same-origin
    # requests need no CORS header).
    cmd = command(model, host, port, ctx=ctx, alias=args.alias or params.export.name, parallel=parallel,
                  cors_origins=cors or base, threads=sp.threads)

    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    proc = None
    try:
        # Own session: a terminal's Ctrl-C reaches only us, and we stop the child in order.
        proc = start(cmd, api_key=key, keep_llama_env=args.keep_llama_env)
        wait_healthy(proc, Endpoint(host, port), sp.startup_timeout)
        access = f"API key required ({key_from})" if key else "no API key"
        print(f"[serve] llama-server (pid {proc.pid}) ready: {base}/v1/chat/completions  model {model}  "
              f"{access}; cross-origin reads: {cors or 'none'}  (Ctrl-C to stop)", flush=True)
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
