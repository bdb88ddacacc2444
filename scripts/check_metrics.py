#!/usr/bin/env python3
"""Compare this checkout's metrics (after a rerun) with the committed ones, within the tolerances
README's reproducibility section states.

    python scripts/check_metrics.py             # metrics/*.json vs HEAD's
    python scripts/check_metrics.py --rev v1.0  # vs another commit

What is compared and how:
  - exact: data counts (metrics/data.json), row and token counts, quantized tensor types and sizes,
    the parity gate's token/template/stop checks (integers and flags);
  - within TOLERANCE: losses and perplexities (relative), KL divergence and argmax agreements
    (absolute); float kernels differ between CPU vendors and instruction sets, so model artifacts
    are not byte-identical across machines, but their quality is;
  - not compared: speeds and durations (machine-dependent), and keys only one side has.
Exits 1 listing every metric outside its tolerance.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ("data", "train", "quantize", "eval")
# (relative, absolute) tolerance per metric name; a float metric not listed and not skipped must be equal.
TOLERANCE = {
    "train_loss": (0.005, 0), "eval_loss": (0.005, 0), "eval_ppl": (0.015, 0),
    "eval_loss_base": (0.001, 0), "eval_ppl_base": (0.003, 0),
    "ppl_hf_base": (0.001, 0), "ppl_hf_merged": (0.005, 0), "ppl_f16": (0.005, 0), "ppl_quant": (0.005, 0),
    "ppl_f16_vs_hf_pct": (0, 0.1), "ppl_delta_pct": (0, 0.5), "ppl_merged_vs_base_pct": (0, 0.5),
    "kld_quant_vs_f16": (0, 0.005), "same_top_token_pct": (0, 1.0), "rms_dp_pct": (0, 0.5),
    "f16_argmax_agreement": (0, 0.02), "quant_argmax_agreement": (0, 0.05),
    "f16_max_abs_logit_diff": (0, 0.1), "quant_max_abs_logit_diff": (0, 2.0),
    "stop_fraction": (0, 0.25), "bits_per_weight": (0.001, 0), "size_hf_merged_mb": (0.001, 0),
    "samples_stopped": (0, 3),
}
# Timings and speeds: what the machine does, not what the pipeline made.
SKIP = {"decode_speedup_quant_vs_hf", "gen_tokens", "threads", "processes"}


def flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def skipped(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return leaf in SKIP or leaf.startswith(("prompt_tok_s", "decode_tok_s")) or leaf.endswith(("_s", "tokens_per_s"))


def compare(committed: dict, current: dict) -> list[str]:
    """Every metric outside its tolerance, as `file: key: committed -> current (tolerance)`."""
    bad = []
    for name in FILES:
        old, new = flat(committed.get(name) or {}), flat(current.get(name) or {})
        for key in sorted(old.keys() & new.keys()):
            if skipped(key):
                continue
            a, b = old[key], new[key]
            leaf = key.rsplit(".", 1)[-1]
            if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
                if a != b:
                    bad.append(f"{name}: {key}: {a!r} -> {b!r} (must be equal)")
                continue
            rel, abs_ = TOLERANCE.get(leaf, (0, 0))
            if not math.isclose(a, b, rel_tol=rel, abs_tol=abs_):
                bad.append(f"{name}: {key}: {a} -> {b} (tolerance {f'{rel:.1%}' if rel else abs_})")
    return bad


def committed_metrics(rev: str, root: Path = ROOT) -> dict:
    out = {}
    for name in FILES:
        proc = subprocess.run(["git", "show", f"{rev}:metrics/{name}.json"], cwd=root, capture_output=True, text=True)
        out[name] = json.loads(proc.stdout) if proc.returncode == 0 else None
    return out


def current_metrics(root: Path = ROOT) -> dict:
    out = {}
    for name in FILES:
        path = root / "metrics" / f"{name}.json"
        out[name] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", default="HEAD", help="the commit whose metrics are the reference (default HEAD)")
    p.add_argument("--root", default=str(ROOT), help="the checkout (default: this one)")
    args = p.parse_args(argv)
    root = Path(args.root)
    committed, current = committed_metrics(args.rev, root), current_metrics(root)
    missing = [n for n in FILES if committed[n] is None or current[n] is None]
    bad = compare(committed, current)
    for name in missing:
        print(f"metrics/{name}.json: missing {'in ' + args.rev if committed[name] is None else 'here'}; not compared")
    for line in bad:
        print(f"OUTSIDE TOLERANCE  {line}")
    compared = len([n for n in FILES if n not in missing])
    print(f"{compared} metrics files compared with {args.rev}: "
          f"{'all within tolerance' if not bad else f'{len(bad)} outside tolerance'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
