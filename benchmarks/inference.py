"""Decode speed of the quantized GGUF vs the HF merged model on this CPU, and against the
memory-bandwidth bound, side by side in one run.

    .venv/bin/python benchmarks/inference.py [--merged models/merged] [--gguf models/gguf/model-quant.gguf]
        [--ref-gguf models/gguf/model-auto.gguf] [--threads 2] [--prompt-tokens 64] [--gen-tokens 64]
    .venv/bin/python benchmarks/inference.py --shape qwen2.5-1.5b-instruct

Defaults are the pipeline's outputs (core/paths.py with export.outtype and
evaluate.threads from params.yaml); any merged HF folder + GGUF pair works.

--shape NAME measures a model with exactly the shapes of a model our users ship (its config.json
values below) instead: random weights, the real tokenizer of its family from the pinned llama.cpp
tree, converted by the convert stage's own function and quantized by llama-quantize (export.quant, or
the first of export.quant_candidates for `auto`: random weights keep no fine-tune to choose by).
Decode speed depends on the shapes and the file's tensor types, not on the weights' values, so this
is the speed of that model on this machine without downloading it. Built once under
$LORAPIPE_CACHE/bench/NAME (~7 GB; LORAPIPE_CACHE defaults to ~/.cache/lorapipe) in ~3 minutes,
reused after.

Targets (issue 5):
  1. quantized GGUF decode tokens/s >= 5 x the HF merged model's (torch `generate`, float32, same threads);
  2. quantized decode rate >= 0.6 of the memory-bandwidth bound. Decoding one token reads every
     weight once, so bound = copy bandwidth / GGUF tensor bytes. Bandwidth is measured here with a
     numpy copy of a 512 MiB array split over the same threads, counted the STREAM way (read + write).
The bound holds only for a decoder that is limited by memory. So the run also decodes the quantized
GGUF with one thread: if N threads decode about N times as fast as one while one thread reads far
less than it can copy, decode is compute-bound on this machine and the bound is out of reach.

GGUF speeds come from llama-bench (tg = tokens generated one by one from an empty context, pp =
one batch of prompt tokens), the HF ones from core/inference_speed.hf_speed (same test shape).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "I have been feeling really lonely since I moved to a new city, and I don't know how to make friends. "

# name -> (config.json values of the real model, vocab GGUF of its tokenizer in the pinned llama.cpp tree)
SHAPES = {
    # Qwen/Qwen2.5-1.5B-Instruct, the seed's main model (its Q4_K_M file is 986 MB, as here)
    "qwen2.5-1.5b-instruct": (dict(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True), "ggml-vocab-qwen2.gguf"),
}


def shaped_model(name: str, quant: str) -> tuple[Path, Path, Path]:
    """(HF folder, F16 GGUF, quantized GGUF) of a random-weight model with SHAPES[name]; built once.

    Each is written under a temporary name and renamed when complete (core.io.atomic_path), so an
    interrupted build is redone, never reused half-written.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lorapipe.core import llamacpp
    from lorapipe.core.io import atomic_path
    from lorapipe.stages.convert import convert
    from lorapipe.stages.quantize import check_type, quantize_file

    config_values, vocab_gguf = SHAPES[name]
    root = Path(os.environ.get("LORAPIPE_CACHE", Path.home() / ".cache" / "lorapipe")) / "bench" / name
    hf, f16, quantized = root / "hf", root / "model-f16.gguf", root / f"model-{quant.lower()}.gguf"
    root.mkdir(parents=True, exist_ok=True)
    if not (hf / "config.json").is_file():
        print(f"building {hf} (random weights, {name} shapes)", flush=True)
        vocab = llamacpp.source_dir() / "models" / vocab_gguf
        tok = AutoTokenizer.from_pretrained(vocab.parent, gguf_file=vocab.name)
        values = dict(config_values)
        config = AutoConfig.for_model(values.pop("model_type"), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, **values)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # bf16, as the real checkpoint
        with atomic_path(hf, is_dir=True) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        del model
    if not f16.is_file():
        convert(hf, f16, "f16", name=f"{name}-shape")
    if not quantized.is_file():
        print(f"quantizing {f16} -> {quantized} ({quant})", flush=True)
        with atomic_path(quantized) as tmp:
            quantize_file(f16, tmp, check_type(quant), threads=os.cpu_count() or 1)
    return hf, f16, quantized


def main() -> int:
    os.chdir(REPO)
    from lorapipe import params as params_mod
    from lorapipe.core import inference_speed, paths
    from lorapipe.core.hfmodel import QUANT_AUTO

    p = params_mod.load("params.yaml")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--merged", type=Path, default=paths.MERGED_DIR, help="merged HF model folder")
    ap.add_argument("--gguf", type=Path, default=paths.QUANT_GGUF, help="quantized GGUF")
    ap.add_argument("--ref-gguf", type=Path, default=paths.gguf_path(p.export.outtype),
                    help="unquantized GGUF shown for reference (skipped when missing)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="measure a random-weight model of these shapes instead")
    ap.add_argument("--threads", type=int, default=p.evaluate.threads)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=64)
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.shape:
        quant = p.export.quant_candidates[0] if p.export.quant == QUANT_AUTO else p.export.quant
        args.merged, args.ref_gguf, args.gguf = shaped_model(args.shape, quant)
    for path in (args.merged, args.gguf):
        if not path.exists():
            print(f"error: {path} not found (run `make repro`, or pass --merged / --gguf)", file=sys.stderr)
            return 2

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    bandwidth = inference_speed.copy_bandwidth(args.threads)
    bandwidth_1 = inference_speed.copy_bandwidth(1) if args.threads > 1 else bandwidth

    rows = []  # (name, size bytes read per token, prompt tok/s, decode tok/s)
    tok = AutoTokenizer.from_pretrained(args.merged)
    model = AutoModelForCausalLM.from_pretrained(args.merged, dtype=torch.float32).eval()
    ids = tok(PROMPT * (args.prompt_tokens // 8 + 1), add_special_tokens=False)["input_ids"][: args.prompt_tokens]
    hf = inference_speed.hf_speed(model, ids, gen_tokens=args.gen_tokens, repetitions=3)
    # float32 weights in memory; tied embeddings counted once, like the GGUF's single token_embd
    hf_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in model.parameters()}.values())
    rows.append(("HF merged (torch f32)", hf_bytes, hf["prompt_tok_s"], hf["decode_tok_s"]))
    del model

    ggufs = ([args.ref_gguf] if args.ref_gguf.is_file() and args.ref_gguf != args.gguf else []) + [args.gguf]
    for path in ggufs:
        s = inference_speed.gguf_speed(path, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                                       threads=args.threads, repetitions=5)
        rows.append((f"{path.name} (llama.cpp)", inference_speed.gguf_tensor_bytes(path), s["prompt_tok_s"], s["decode_tok_s"]))
    one = (inference_speed.gguf_speed(args.gguf, prompt_tokens=args.prompt_tokens, gen_tokens=args.gen_tokens,
                                      threads=1, repetitions=3) if args.threads > 1 else None)

    what = f"{args.shape} shapes, random weights" if args.shape else str(args.merged)
    print(f"\nmodel: {what}")
    print(f"machine: {os.cpu_count()} CPUs, {args.threads} threads used; torch {torch.__version__}")
    print(f"copy bandwidth: {bandwidth / 1e9:.2f} GB/s with {args.threads} threads, {bandwidth_1 / 1e9:.2f} GB/s with 1 "
          "(numpy copy of 512 MiB, read + write counted)")
    print(f"test: prompt {args.prompt_tokens} tokens, decode {args.gen_tokens} tokens\n")
    head = f"{'variant':<34} {'MB/token':>9} {'prompt tok/s':>13} {'decode tok/s':>13} {'bound tok/s':>12} {'of bound':>9}"
    print(head)
    print("-" * len(head))
    for name, nbytes, pp, tg in rows:
        bound = bandwidth / nbytes
        print(f"{name:<34} {nbytes / 1e6:>9.1f} {pp:>13.1f} {tg:>13.1f} {bound:>12.1f} {tg / bound:>9.2f}")

    hf_tg, (_, q_bytes, _, q_tg) = rows[0][3], rows[-1]
    speedup, of_bound = q_tg / hf_tg, q_tg / (bandwidth / q_bytes)
    print()
    if one is not None:
        tg1 = one["decode_tok_s"]
        print(f"compute-bound check, {args.gguf.name}: 1 thread decodes {tg1:.1f} tok/s, {args.threads} threads "
              f"{q_tg:.1f} ({q_tg / tg1:.2f}x); one thread reads {tg1 * q_bytes / 1e9:.1f} GB/s of the "
              f"{bandwidth_1 / 1e9:.1f} GB/s it can copy ({tg1 * q_bytes / bandwidth_1:.2f} of its bound)")
    print(f"decode speed-up {args.gguf.name} vs HF merged: {speedup:.2f}x   (target >= 5x)   "
          f"{'MET' if speedup >= 5 else 'NOT MET'}")
    print(f"decode rate of {args.gguf.name} vs bandwidth bound: {of_bound:.2f}   (target >= 0.6)   "
          f"{'MET' if of_bound >= 0.6 else 'NOT MET'}")
    print(json.dumps({"model": what, "speedup": round(speedup, 2), "of_bound": round(of_bound, 3)}))
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
