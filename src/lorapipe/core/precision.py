"""train.precision: auto on a CPU: time a few real LoRA steps in fp32 and in bf16 autocast, take the faster.

Whether bf16 pays depends on the CPU: with bf16 units (AMX, AVX512-BF16) a bf16 matmul runs 2-7x
fp32; without them torch emulates it and bf16 is slower; some VMs list AMX in /proc/cpuinfo and
trap on it. So the flags are reported, never trusted: a child process (an illegal instruction kills
only it) loads the real base model, adds LoRA layers and times forward + backward + AdamW steps on a
batch of the training shape in both precisions. bf16 is taken only when it is clearly faster
(BF16_MIN_RATIO); a failed probe means fp32. The answer is cached per CPU model, flags, torch
version, thread count, model architecture (config.json) and probe shape, under
$LORAPIPE_CACHE/precision/: a second run on the same machine does not pay for it.

    python -m lorapipe.core.precision MODEL_DIR [--rows 2 --seq 256 --rank 16]   # print a probe's timings
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lorapipe.core import lora
from lorapipe.core.io import write_json

BF16_MIN_RATIO = 1.2  # fp32 step time / bf16 step time; below it the rounding is not worth it
WARMUP_STEPS, TIMED_STEPS = 1, 3
PROBE_TIMEOUT_S = 600
MAX_PROBE_SEQ = 256  # a longer cutoff_len is probed at 256 tokens: same kernels, a bounded cost


@dataclass(frozen=True)
class Choice:
    precision: str  # fp32 | bf16 (| fp16 on a GPU)
    reason: str
    ratio: float | None = None  # fp32 step time / bf16 step time, when probed


def cache_dir() -> Path:
    return Path(os.environ.get("LORAPIPE_CACHE") or Path.home() / ".cache" / "lorapipe") / "precision"


def cpu_info() -> tuple[str, list[str], set[str]]:
    """CPU model name, its bf16-related instruction sets (information only) and all its flags, from /proc/cpuinfo."""
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown CPU":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return name, sorted(flags & {"amx_bf16", "amx_tile", "avx512_bf16", "avx_ne_convert"}) or ["no bf16 instructions listed"], flags


def cache_key(model_dir: Path, rows: int, seq: int, target, threads: int) -> str:
    """What decides the measured ratio: the CPU (name and every flag), torch, threads, architecture,
    batch shape and which layers carry LoRA.

    The weights do not change the speed, so config.json stands for the model: the cache survives a
    retrained base of the same shape. The rank is left out: the base's matmuls, not the thin LoRA
    branches, decide the ratio, and a rank sweep (`dvc exp run -S lora.rank=8`) then trains every
    experiment in the precision the first run measured.
    """
    import torch

    name, _, flags = cpu_info()
    config = (model_dir / "config.json").read_bytes() if (model_dir / "config.json").exists() else b""
    key = json.dumps({"cpu": name, "flags": sorted(flags), "torch": torch.__version__, "threads": threads,
                      "config": hashlib.sha256(config).hexdigest(), "rows": rows, "seq": seq, "target": target},
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def probe_shape(cutoff_len: int) -> tuple[int, int]:
    """Rows x tokens of the probe batch: one packed row of at most MAX_PROBE_SEQ tokens, the same
    kernels as a real step (the default packs its 8 samples into about 4 such rows) at a bounded cost."""
    return 1, min(cutoff_len, MAX_PROBE_SEQ)


def choose(requested: str, model_dir: Path, *, cutoff_len: int, rank: int, alpha: int, target,
           processes: int = 1) -> Choice:
    """The precision to train in, and why. Explicit values win; auto probes on a CPU (cached)."""
    import torch

    if requested != "auto":
        return Choice(requested, f"{requested}: train.precision")
    if torch.cuda.is_available():
        p = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return Choice(p, f"auto: {p} on {torch.cuda.get_device_name()}")
    if processes > 1:
        # several processes would probe at once and time each other; they must also agree
        return Choice("fp32", f"auto: fp32, not probed with {processes} processes (set train.precision: bf16 to use it)")
    name, isa, _ = cpu_info()
    threads = torch.get_num_threads()
    rows, seq = probe_shape(cutoff_len)
    cached = cache_dir() / f"{cache_key(model_dir, rows, seq, target, threads)}.json"
    where = f"on {name} ({', '.join(isa)}), {threads} threads"
    try:
        m, how = json.loads(cached.read_text()), "cached probe"
    except (OSError, ValueError):
        m, how = None, "probe"
    if m is None:
        m = run_probe(model_dir, rows=rows, seq=seq, rank=rank, alpha=alpha, target=target, threads=threads)
        if "error" in m:
            return Choice("fp32", f"auto: fp32, the bf16 probe failed ({m['error']}) {where}")
        write_json(cached, m)
    ratio = round(m["fp32_s"] / m["bf16_s"], 3)
    pick = "bf16" if ratio >= BF16_MIN_RATIO else "fp32"
    return Choice(pick, f"auto: {pick}, a bf16 step takes 1/{ratio:.2f} of fp32's ({how}: {m['steps']} steps of "
                        f"{rows}x{seq} tokens; bf16 needs >= {BF16_MIN_RATIO}x) {where}", ratio)


def run_probe(model_dir: Path, *, rows: int, seq: int, rank: int, alpha: int, target, threads: int,
              variants: tuple[str, ...] = ("fp32", "bf16")) -> dict:
    """Run the probe in a child process; its timings, or {"error": why} when it did not finish."""
    cmd = [sys.executable, "-m", "lorapipe.core.precision", str(model_dir), "--rows", str(rows), "--seq", str(seq),
           "--rank", str(rank), "--alpha", str(alpha), "--target", json.dumps(target), "--threads", str(threads),
           "--variants", ",".join(variants), "--json"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"no answer within {PROBE_TIMEOUT_S} s"}
    if proc.returncode < 0:
        return {"error": f"killed by {signal.Signals(-proc.returncode).name}"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"error": last[-300:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ child
def measure(model_dir: Path, rows: int, seq: int, rank: int, alpha: int, target, variants) -> dict:
    """Median seconds of a LoRA training step (forward, backward, AdamW) per variant.

    fp32 | bf16 (autocast, weights fp32) | bf16-base (autocast, frozen base held in bf16, LoRA fp32).
    """
    import inspect

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {"steps": TIMED_STEPS, "rows": rows, "seq": seq}
    for variant in variants:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if variant == "bf16-base":
            model.to(torch.bfloat16)
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=lora.target_modules(model, target),
                                                 task_type="CAUSAL_LM"))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.randint(0, model.config.vocab_size, (rows, seq))
        # the stage projects only assistant positions onto the vocabulary: about half of them
        keep = {"logits_to_keep": seq // 2} if "logits_to_keep" in inspect.signature(model.get_base_model().forward).parameters else {}
        times = []
        for _ in range(WARMUP_STEPS + TIMED_STEPS):
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant != "fp32"):
                logits = model(input_ids=ids, use_cache=False, **keep).logits
            n = logits.shape[1]
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, -n:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
        out[f"{variant.replace('-', '_')}_s"] = round(sorted(times[WARMUP_STEPS:])[TIMED_STEPS // 2], 4)
        del model, opt
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Time LoRA training steps in fp32 and bf16 on this CPU")
    ap.add_argument("model", type=Path)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--target", default='"all"', help="lora.target as JSON")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--variants", default="fp32,bf16", help="fp32, bf16, bf16-base")
    ap.add_argument("--json", action="store_true", help="print one JSON line (what the stage reads)")
    a = ap.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    m = measure(a.model, a.rows, a.seq, a.rank, a.alpha, json.loads(a.target), a.variants.split(","))
    if a.json:
        print(json.dumps(m))
    else:
        for k, v in m.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
