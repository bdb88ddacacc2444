#!/usr/bin/env python3
"""GPU readiness check: QLoRA-4bit and bf16 LoRA on a model with Qwen2.5-1.5B-Instruct's shapes.

    .venv/bin/python scripts/gpu_check.py [--steps 20] [--cutoff 2048] [--batch-size 8]
        [--variants qlora-4bit,lora-bf16,qlora-4bit-gc,lora-bf16-gc]
    .venv/bin/python scripts/gpu_check.py --cpu-smoke     # the plumbing, on a tiny model, on a CPU

Model: benchmarks/inference.py's `--shape qwen2.5-1.5b-instruct` (random weights, real Qwen2 tokenizer,
cached under $LORAPIPE_CACHE/bench/). Each variant runs the project's own stage code in a temporary
work folder: train.run (its relative paths resolved there), merge.merge (never into 4-bit),
convert.convert, quantize.quantize_file (Q4_K_M); `-gc` sets train.gradient_checkpointing, and
export runs once per method. Train rows are chained dialogues cut at --cutoff, so a step trains
batch-size x cutoff tokens. Peak memory: torch.cuda.max_memory_allocated over the train stage.
docs/gpu.md explains all of it and has the computed memory figures.
Exit: 0 all variants ran, 1 one failed (OOM is reported in the table), 2 no CUDA device.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE = "qwen2.5-1.5b-instruct"
TINY = "qwen2-tiny"  # --cpu-smoke: Qwen2 architecture and tokenizer, tiny layers
BNB_PIN = "bitsandbytes==0.50.2"  # latest release; not in requirements.txt (CUDA-only, QLoRA only)
QUANT = "q4_k_m"
METHODS = {  # variant name (without -gc) -> train.* params
    "qlora-4bit": {"precision": "bf16", "quantization_bit": 4},
    "lora-bf16": {"precision": "bf16", "quantization_bit": None},
    "lora-fp32": {"precision": "fp32", "quantization_bit": None},
}
DEFAULT_VARIANTS = "qlora-4bit,lora-bf16,qlora-4bit-gc,lora-bf16-gc"


def dialogues() -> tuple[Path, list[list[dict]]]:
    """user/assistant turns of each row of data/clean/train.jsonl, else data/sources/support.jsonl."""
    path = REPO / "data/clean/train.jsonl"
    path = path if path.is_file() and path.stat().st_size else REPO / "data/sources/support.jsonl"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        msgs = [m for m in json.loads(line).get("messages", []) if m["role"] in ("user", "assistant")] if line.strip() else []
        if msgs and msgs[0]["role"] == "user" and msgs[-1]["role"] == "assistant":
            out.append(msgs)
    return path, out


def chained_rows(dials: list[list[dict]], tokenizer, cutoff: int, n: int, seed: int) -> list[dict]:
    """n conversations of >= cutoff tokens, each a random chain of whole dialogues."""
    size = [sum(len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) + 5 for m in d) for d in dials]
    rng, rows = random.Random(seed), []
    for _ in range(n):
        msgs, tokens = [], 0
        while tokens < cutoff + 16:
            i = rng.randrange(len(dials))
            msgs, tokens = msgs + dials[i], tokens + size[i]
        rows.append({"messages": msgs})
    return rows


def write_split(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def run_variant(name: str, hf: Path, work: Path, args, export: bool) -> dict:
    """Train (+ merge, convert, quantize) one variant in `work`; the figures of one table row."""
    import torch

    from lorapipe import params as params_mod
    from lorapipe.stages import convert, merge, quantize, train

    method = name.removesuffix("-gc")
    p = params_mod.parse({
        "train": {**METHODS[method], "gradient_checkpointing": name.endswith("-gc"), "max_steps": args.steps,
                  "batch_size": args.batch_size, "cutoff_len": args.cutoff, "save_steps": args.steps + 1,
                  "max_eval_samples": args.eval_rows},
    }, source="gpu_check")
    row: dict = {"variant": name}
    cuda = torch.cuda.is_available()
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cwd = os.getcwd()
    os.chdir(work)  # the train stage's paths (data/clean, models/, metrics/, dvclive/) are relative
    try:
        t = train.run(p, base_dir=hf)
    finally:
        os.chdir(cwd)
    row.update(tok_s=t["train_tokens_per_s"], eval_base=t["eval_loss_base"], eval=t["eval_loss"],
               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
    if not export:
        return row
    t0 = time.perf_counter()
    merge.merge(hf, work / "models/adapter", work / "models/merged", p.merge.dtype)  # never into 4-bit
    t1 = time.perf_counter()
    convert.convert(work / "models/merged", work / "model-f16.gguf", "f16", name=f"gpu-check-{name}")
    t2 = time.perf_counter()
    q4 = work / f"model-{QUANT}.gguf"
    quantize.quantize_file(work / "model-f16.gguf", q4, quantize.check_type(QUANT), threads=os.cpu_count() or 2)
    row.update(merge_s=t1 - t0, convert_s=t2 - t1, quantize_s=time.perf_counter() - t2, q4_mb=q4.stat().st_size / 1e6)
    return row


def fmt(v, spec: str) -> str:
    return "-" if v is None else v if isinstance(v, str) else format(v, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per variant")
    ap.add_argument("--cutoff", type=int, default=2048, help="train.cutoff_len (each sample fills it)")
    ap.add_argument("--batch-size", type=int, default=8, help="train.batch_size (the project default is 8)")
    ap.add_argument("--eval-rows", type=int, default=8, help="eval rows (train.max_eval_samples)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help=f"comma-separated, from {', '.join(METHODS)}, each optionally with -gc (checkpointing)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="no GPU: lora-fp32 on a tiny Qwen2-architecture model for 2 steps (plumbing only)")
    args = ap.parse_args()
    if args.cpu_smoke:
        args.steps, args.cutoff, args.batch_size, args.eval_rows = min(args.steps, 2), min(args.cutoff, 256), 2, 2
        if args.variants == DEFAULT_VARIANTS:
            args.variants = "lora-fp32,lora-fp32-gc"
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v.removesuffix("-gc") not in METHODS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(METHODS)} (each also with -gc)")

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a CUDA machine "
              "with a CUDA build of torch, or `--cpu-smoke` to check the plumbing on this CPU", file=sys.stderr)
        return 2
    if args.cpu_smoke:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    skipped = {v: f"skipped: no bitsandbytes (.venv/bin/pip install {BNB_PIN})"
               for v in variants if v.startswith("qlora") and not has_bnb}

    sys.path.insert(0, str(REPO / "benchmarks"))
    import inference  # benchmarks/inference.py: the shaped-model builder (HF folder + GGUFs, cached)
    from transformers import AutoTokenizer

    if args.cpu_smoke:
        inference.SHAPES[TINY] = (dict(
            model_type="qwen2", vocab_size=151936, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
            rope_theta=1000000.0, tie_word_embeddings=True), "ggml-vocab-qwen2.gguf")
    shape = TINY if args.cpu_smoke else SHAPE
    hf, _, _ = inference.shaped_model(shape, QUANT)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    source, dials = dialogues()
    n_eval = max(1, len(dials) // 8)  # the last eighth of the dialogues are held out for eval
    train_rows = chained_rows(dials[:-n_eval], tokenizer, args.cutoff, args.steps * args.batch_size, seed=0)
    eval_rows = chained_rows(dials[-n_eval:], tokenizer, args.cutoff, args.eval_rows, seed=1)

    import peft
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    bnb = f"bitsandbytes {importlib.metadata.version('bitsandbytes')}" if has_bnb else "no bitsandbytes"
    print(f"\ngpu_check: {shape} (random weights), {device}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, peft {peft.__version__}, {bnb}", flush=True)
    print(f"data: chains of {len(dials)} dialogues from {source.relative_to(REPO)}; {args.steps} steps x batch "
          f"{args.batch_size} x cutoff {args.cutoff} = up to {args.batch_size * args.cutoff} tokens per step\n", flush=True)
    rows, failed, exported = [], False, set()
    for name in variants:
        if name in skipped:
            rows.append({"variant": name, "note": skipped[name]})
            continue
        method = name.removesuffix("-gc")
        with tempfile.TemporaryDirectory(prefix=f"gpu-check-{name}-") as tmp:
            work = Path(tmp)
            write_split(work / "data/clean/train.jsonl", train_rows)
            write_split(work / "data/clean/eval.jsonl", eval_rows)
            try:
                rows.append(run_variant(name, hf, work, args, export=method not in exported))
                exported.add(method)
            except torch.cuda.OutOfMemoryError:
                rows.append({"variant": name, "note": "OOM (try --batch-size 1 or a -gc variant)"})
            except Exception as exc:  # report and go on with the next variant
                traceback.print_exc()
                rows.append({"variant": name, "note": f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"})
                failed = True
        print(f"[gpu_check] {name}: {rows[-1]}", flush=True)

    head = (f"{'variant':<16} {'train tok/s':>11} {'peak GiB':>9} {'eval loss base->end':>20} {'merge s':>8} "
            f"{'convert s':>9} {'quant s':>8} {'Q4_K_M MB':>10}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        if "note" in r:
            print(f"{r['variant']:<16} {r['note']}")
            continue
        loss = f"{fmt(r['eval_base'], '.3f')} -> {fmt(r['eval'], '.3f')}"
        print(f"{r['variant']:<16} {fmt(r['tok_s'], '.0f'):>11} {fmt(r['peak_gib'], '.2f'):>9} {loss:>20} "
              f"{fmt(r.get('merge_s'), '.1f'):>8} {fmt(r.get('convert_s'), '.1f'):>9} {fmt(r.get('quantize_s'), '.1f'):>8} "
              f"{fmt(r.get('q4_mb'), '.0f'):>10}")
    print("\npeak GiB = torch.cuda.max_memory_allocated() over the train stage (CUDA context and cache not included); "
          "merge/convert/quantize run once per method")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.chdir(REPO)
    sys.exit(main())
