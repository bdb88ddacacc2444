"""`lorapipe serve` under load, and under bad requests, on loopback only.

    python benchmarks/serve_load.py                       # the quantized GGUF of `dvc repro`
    python benchmarks/serve_load.py --model x.gguf --clients 1,4,8 --requests 4 --parallel 4,1
    python benchmarks/serve_load.py --bad-only --model tiny.gguf   # the quick check `make test` runs

For each --parallel setting (llama-server slots decoded together by continuous batching; the first is
the one `serve.parallel` ships, then 1 slot), the real `lorapipe serve` is started on a free
127.0.0.1 port; for each client count N, N threads each send M streamed chat requests one after
another to each setting's server in turn. Printed per row: completion tokens/s over the round's wall time, p50/p95 latency and time to
first token. Then the bad requests (invalid JSON, wrong types, an over-long prompt, negative
max_tokens, a client that disconnects mid-stream): each must be answered or closed within its time
limit, and the server must still answer a normal request afterwards. Everything is bounded in count
and time (--time-limit per setting, a timeout on every request). Exits 1 if a bad request hung or the
server stopped answering.

Each server runs with an API key, as a server left running should (a random one, given to `lorapipe
serve` in OPENAI_API_KEY); every request sends it, and a request without it must be refused (401).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # never anything but loopback
PROMPTS = [
    "I feel lonely since I moved to a new city.",
    "My exam went badly and I feel like a failure.",
    "Can you tell me something that might cheer me up?",
    "最近工作压力很大，晚上总是睡不着。",
    "What do you do when you cannot sleep?",
    "I had an argument with my best friend.",
]
REQUEST_TIMEOUT_S = 120.0
BAD_TIMEOUT_S = 60.0
API_KEY = secrets.token_urlsafe(24)
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_serve(model: Path, parallel: int, ctx: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lorapipe.cli", "serve", "--model", str(model), "--host", HOST,
                             "--port", str(port), "--parallel", str(parallel), "--ctx", str(ctx)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
                            env=dict(os.environ, OPENAI_API_KEY=API_KEY, PYTHONPATH=os.pathsep.join(
                                filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))))
    line = proc.stdout.readline()
    if "ready" not in line:
        proc.kill()
        raise SystemExit(f"lorapipe serve did not start (exit code {proc.wait()})")
    return proc, f"http://{HOST}:{port}"


def stop_serve(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def one_request(base: str, prompt: str, max_tokens: int) -> dict:
    """One streamed chat request: latency, time to first token, completion tokens."""
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    pieces = 0
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0.7,
            "stream": True, "stream_options": {"include_usage": True}}
    with requests.post(base + "/v1/chat/completions", json=body, headers=AUTH, stream=True,
                       timeout=REQUEST_TIMEOUT_S) as r:
        r.raise_for_status()
        for line in r.iter_lines(chunk_size=None):
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"].get("completion_tokens", tokens)
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    pieces += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    return {"latency": time.perf_counter() - t0, "ttft": ttft if ttft is not None else float("nan"),
            "tokens": tokens or pieces}


def pct(values: list[float], q: float) -> float:
    values = sorted(v for v in values if v == v)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def load_round(base: str, clients: int, requests_per_client: int, max_tokens: int, deadline: float) -> dict:
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(requests_per_client):
            if time.monotonic() > deadline:
                return
            try:
                res = one_request(base, PROMPTS[(i * requests_per_client + j) % len(PROMPTS)], max_tokens)
            except (requests.RequestException, ValueError) as exc:
                with lock:
                    errors.append(str(exc))
                continue
            with lock:
                results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results]
    return {"clients": clients, "done": len(results), "errors": len(errors), "wall_s": wall,
            "tok_s": sum(r["tokens"] for r in results) / wall if wall else 0.0,
            "p50": pct(lat, 0.5), "p95": pct(lat, 0.95), "ttft50": pct(ttft, 0.5), "ttft95": pct(ttft, 0.95)}


# ----------------------------------------------------------------------------------- bad requests
class Hung(Exception):
    """The server did not answer or close as it should."""


def _raw_post(base: str, body: bytes) -> int:
    r = requests.post(base + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json", **AUTH},
                      timeout=BAD_TIMEOUT_S)
    return r.status_code


def _json_post(base: str, body: dict) -> int:
    r = requests.post(base + "/v1/chat/completions", json=body, headers=AUTH, timeout=BAD_TIMEOUT_S)
    return r.status_code


def _disconnect_mid_stream(base: str) -> str:
    """Start a long streamed answer over a plain socket, read its first piece, close the socket."""
    host, port = base.removeprefix("http://").split(":")
    body = json.dumps({"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 512,
                       "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=BAD_TIMEOUT_S) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
                  b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                  b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        got = b""
        while b"data: " not in got:
            chunk = s.recv(4096)
            if not chunk:
                return "closed by the server before the first piece"
            got += chunk
    # The server must notice and stop generating for nobody: its slot is free again soon after.
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 10:
        slots = requests.get(base + "/slots", headers=AUTH, timeout=BAD_TIMEOUT_S)
        if slots.status_code != 200:
            return f"first piece received, then closed by the client (GET /slots: {slots.status_code})"
        if not any(s.get("is_processing") for s in slots.json()):
            return f"first piece received, then closed by the client; slot free again after {time.perf_counter() - t0:.1f} s"
        time.sleep(0.1)
    raise Hung("the server was still generating 10 s after its client had gone")


def bad_requests(base: str, ctx: int) -> list[tuple[str, str, bool]]:
    """Each bad request with what the server did; ok means answered (any status) or closed in time."""
    long_prompt = "lonely " * (ctx * 3)  # ~3x the context in tokens
    cases = [
        ("invalid JSON", lambda: _raw_post(base, b'{"messages": [')),
        ("not an object", lambda: _raw_post(base, b"[1, 2, 3]")),
        ("messages is a string", lambda: _json_post(base, {"messages": "hello"})),
        ("content is a number", lambda: _json_post(base, {"messages": [{"role": "user", "content": 42}]})),
        ("max_tokens is a string", lambda: _json_post(base, {"messages": [{"role": "user", "content": "hi"}],
                                                             "max_tokens": "ten"})),
        ("over-long prompt (3x ctx)", lambda: _json_post(base, {"messages": [{"role": "user", "content": long_prompt}],
                                                                "max_tokens": 8})),
        ("negative max_tokens", lambda: _json_post(base, {"messages": [{"role": "user", "content": "hi"}],
                                                          "max_tokens": -5})),
        ("disconnect mid-stream", lambda: _disconnect_mid_stream(base)),
    ]
    out = []
    for name, call in cases:
        t0 = time.perf_counter()
        try:
            what = call()
            outcome, ok = (f"HTTP {what}" if isinstance(what, int) else what), True
        except requests.Timeout:
            outcome, ok = f"no answer within {BAD_TIMEOUT_S:.0f} s", False
        except Hung as exc:
            outcome, ok = str(exc), False
        except requests.ConnectionError as exc:
            outcome, ok = f"connection closed ({type(exc).__name__})", True
        out.append((name, f"{outcome} in {time.perf_counter() - t0:.2f} s", ok))
    try:
        after = one_request(base, "Are you still there?", 8)
        out.append(("normal request afterwards", f"answered, {after['tokens']} tokens in {after['latency']:.2f} s", True))
    except (requests.RequestException, ValueError) as exc:
        out.append(("normal request afterwards", f"FAILED: {exc}", False))
    return out


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from lorapipe import params as params_mod
    from lorapipe.core import paths

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF (default: models/gguf/model-quant.gguf)")
    p.add_argument("--clients", default="1,4,8", help="concurrent clients per round (comma-separated)")
    p.add_argument("--requests", type=int, default=4, help="requests per client per round")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    p.add_argument("--parallel", default=None, help="slot settings to compare (default: serve.parallel,1)")
    p.add_argument("--ctx", type=int, default=None, help="server context (default: serve.ctx)")
    p.add_argument("--time-limit", type=float, default=300.0,
                   help="seconds per setting for all rounds; requests past it are skipped (and counted)")
    p.add_argument("--bad-only", action="store_true", help="only the bad requests (one server, the shipped setting)")
    args = p.parse_args(argv)

    params = params_mod.load(ROOT / "params.yaml")
    model = Path(args.model) if args.model else ROOT / paths.QUANT_GGUF
    if not model.is_file():
        raise SystemExit(f"{model}: not found; run `dvc repro quantize` or pass --model")
    ctx = args.ctx or params.serve.ctx
    shipped = params.serve.parallel
    settings = [int(x) for x in (args.parallel or f"{shipped},1").split(",")]
    if args.bad_only:
        settings = settings[:1]
    print(f"model {model.name}  ctx {ctx}  max_tokens {args.max_tokens}  cpus {os.cpu_count()}", flush=True)

    failed = False
    servers = {}
    try:
        for parallel in settings:
            servers[parallel] = start_serve(model, parallel, ctx)
        if not args.bad_only:
            # Every setting's server runs from the start and the rounds alternate between them, so
            # a change in what else the machine does hits both settings alike.
            deadline = time.monotonic() + args.time_limit * len(settings)
            for _, base in servers.values():
                one_request(base, PROMPTS[0], 8)  # warm-up: first-request costs are not load
            print("\n| slots | clients | requests | completion tok/s | p50 latency s | p95 latency s | p50 TTFT s | "
                  "p95 TTFT s | errors |")
            print("|---|---|---|---|---|---|---|---|---|")
            for n in (int(x) for x in args.clients.split(",")):
                for parallel, (_, base) in servers.items():
                    r = load_round(base, n, args.requests, args.max_tokens, deadline)
                    label = f"{parallel}{' (shipped)' if parallel == shipped else ''}"
                    print(f"| {label} | {n} | {r['done']} | {r['tok_s']:.1f} | {r['p50']:.2f} | {r['p95']:.2f} | "
                          f"{r['ttft50']:.2f} | {r['ttft95']:.2f} | {r['errors']} |", flush=True)
                    failed |= r["errors"] > 0
        for parallel, (_, base) in servers.items():
            no_key = requests.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                                   timeout=BAD_TIMEOUT_S).status_code
            print(f"\nwithout the API key (--parallel {parallel}): HTTP {no_key}", flush=True)
            failed |= no_key != 401
            print(f"\nbad requests (--parallel {parallel}):")
            for name, outcome, ok in bad_requests(base, ctx):
                print(f"  {'ok ' if ok else 'BAD'} {name}: {outcome}", flush=True)
                failed |= not ok
    finally:
        for proc, _ in servers.values():
            stop_serve(proc)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
