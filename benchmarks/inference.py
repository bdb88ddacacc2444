"""Decode speed of the quantized GGUF vs the HF merged model on this CPU, and against the
memory-bandwidth bound, side by side in one run.

    .venv/bin/python benchmarks/inference.py [--merged models/merged] [--gguf models/gguf/model-q4_k_m.gguf]
        [--ref-gguf models/gguf/model-f16.gguf] [--threads 2] [--prompt-tokens 64] [--gen-tokens 64]

Defaults are the pipeline's outputs (core/paths.py with export.quant / export.outtype and
evaluate.threads from params.yaml); any merged HF folder + GGUF pair works.

Targets (issue 5):
  1. quantized GGUF decode tokens/s >= 5 x the HF merged model's (torch `generate`, float32, same threads);
  2. quantized decode rate >= 0.6 of the memory-bandwidth bound. Decoding one token reads every
     weight once, so bound = copy bandwidth / GGUF tensor bytes. Bandwidth is measured here with a
     numpy copy of a 512 MiB array split over the same threads, counted the STREAM way (read + write).

GGUF speeds come from llama-bench (tg = tokens generated one by one from an empty context, pp =
one batch of prompt tokens), the HF ones from core/inference_speed.hf_speed (same test shape).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "I have been feeling really lonely since I moved to a new city, and I don't know how to make friends. "


def main() -> int:
    os.chdir(REPO)
    from lorapipe import params as params_mod
    from lorapipe.core import inference_speed, paths

    p = params_mod.load("params.yaml")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--merged", type=Path, default=paths.MERGED_DIR, help="merged HF model folder")
    ap.add_argument("--gguf", type=Path, default=paths.gguf_path(p.export.quant), help="quantized GGUF")
    ap.add_argument("--ref-gguf", type=Path, default=paths.gguf_path(p.export.outtype),
                    help="unquantized GGUF shown for reference (skipped when missing)")
    ap.add_argument("--threads", type=int, default=p.evaluate.threads)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=64)
    args = ap.parse_args()
    for path in (args.merged, args.gguf):
        if not path.exists():
            print(f"error: {path} not found (run `make repro`, or pass --merged / --gguf)", file=sys.stderr)
            return 2

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    bandwidth = inference_speed.copy_bandwidth(args.threads)
    bandwidth_1 = inference_speed.copy_bandwidth(1) if args.threads > 1 else bandwidth

    rows = []  # (name, size bytes read per token, prompt tok/s, decode tok/s)
    tok = AutoTokenizer.from_pretrained(args.merged)
    model = AutoModelForCausalLM.from_pretrained(args.merged, dtype=torch.float32).eval()
    ids = tok(PROMPT * (args.prompt_tokens // 8 + 1), add_special_tokens=False)["input_ids"][: args.prompt_tokens]
    hf = inference_speed.hf_speed(model, ids, gen_tokens=args.gen_tokens, repetitions=3)
    # float32 weights in memory; tied embeddings counted once, like the GGUF's single token_embd
    hf_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in model.parameters()}.values())
    rows.append((f"HF merged (torch f32)", hf_bytes, hf["prompt_tok_s"], hf["decode_tok_s"]))
    del model

    ggufs = ([args.ref_gguf] if args.ref_gguf.is_file() and args.ref_gguf != args.gguf else []) + [args.gguf]
    for path in ggufs:
        s = inference_speed.gguf_speed(path, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                                       threads=args.threads, repetitions=5)
        rows.append((f"{path.name} (llama.cpp)", inference_speed.gguf_tensor_bytes(path), s["prompt_tok_s"], s["decode_tok_s"]))

    print(f"\nmachine: {os.cpu_count()} CPUs, {args.threads} threads used; torch {torch.__version__}")
    print(f"copy bandwidth: {bandwidth / 1e9:.2f} GB/s with {args.threads} threads, {bandwidth_1 / 1e9:.2f} GB/s with 1 "
          "(numpy copy of 512 MiB, read + write counted)")
    print(f"test: prompt {args.prompt_tokens} tokens, decode {args.gen_tokens} tokens\n")
    head = f"{'variant':<34} {'MB/token':>9} {'prompt tok/s':>13} {'decode tok/s':>13} {'bound tok/s':>12} {'of bound':>9}"
    print(head)
    print("-" * len(head))
    for name, nbytes, pp, tg in rows:
        bound = bandwidth / nbytes
        print(f"{name:<34} {nbytes / 1e6:>9.1f} {pp:>13.1f} {tg:>13.1f} {bound:>12.1f} {tg / bound:>9.2f}")

    hf_tg, (q_name, q_bytes, _, q_tg) = rows[0][3], rows[-1]
    speedup, of_bound = q_tg / hf_tg, q_tg / (bandwidth / q_bytes)
    print()
    print(f"decode speed-up {args.gguf.name} vs HF merged: {speedup:.2f}x   (target >= 5x)   "
          f"{'MET' if speedup >= 5 else 'NOT MET'}")
    print(f"decode rate of {args.gguf.name} vs bandwidth bound: {of_bound:.2f}   (target >= 0.6)   "
          f"{'MET' if of_bound >= 0.6 else 'NOT MET'}")
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
