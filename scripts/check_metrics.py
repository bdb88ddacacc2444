#!/usr/bin/env python3
"""Compare this checkout's metrics (after a rerun) with the committed ones, within the tolerances
stated in TOLERANCE below, one for every key a stage writes to metrics/*.json.

    python scripts/check_metrics.py             # metrics/*.json vs HEAD's
    python scripts/check_metrics.py --rev v1.0  # vs another commit

The rules:
  - equal: data counts (metrics/data.json), row and token counts, tensor types and file sizes, type
    names, the gates' flags and their wording;
  - within a relative or absolute tolerance: losses, perplexities, KL divergences, argmax agreements,
    finetune_kept. Float kernels differ between CPU vendors and instruction sets, so model artifacts
    are not byte-identical across machines, but their quality is, within these bounds;
  - informational, not compared: speeds, durations and the thread and process counts (the machine,
    not what the pipeline made).
A key with no stated tolerance is an error naming it; a key only one side has (a metric added or
removed between the two commits) is listed and not compared. `candidates` of metrics/quantize.json
is compared per quantization type: the types tried, in order, must be equal, then each field.
Exits 1 listing every metric outside its tolerance and every key without one.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
FILES = ("data", "train", "quantize", "eval")
NO_TOLERANCE = "no tolerance stated (add one to TOLERANCE in scripts/check_metrics.py)"


class Rule(NamedTuple):
    kind: str  # "equal", "rel", "abs", "info" (not compared) or "wording" (equal once numbers are masked)
    tol: float = 0.0

    def holds(self, a, b) -> bool:
        if self.kind == "info":
            return True
        if self.kind == "wording":
            return _wording(a) == _wording(b)
        if self.kind == "rel" and _number(a) and _number(b):
            return math.isclose(a, b, rel_tol=self.tol)
        if self.kind == "abs" and _number(a) and _number(b):
            return math.isclose(a, b, abs_tol=self.tol)
        return a == b  # also a number against null or text: a real difference

    def text(self) -> str:
        return {"rel": f"tolerance {self.tol:.1%}", "abs": f"tolerance {self.tol:g}", "info": "informational",
                "wording": "must be equal but for the numbers in it"}.get(self.kind, "must be equal")


EQUAL, INFO = Rule("equal"), Rule("info")
# A gate's failure texts: the same gates must fail for the same reasons; the figures in the texts
# are compared on their own, within their tolerances.
WORDING = Rule("wording")


def rel(tol: float) -> Rule:
    return Rule("rel", tol)


def abs_(tol: float) -> Rule:
    return Rule("abs", tol)


def each(rule: Rule, *patterns: str) -> list[tuple[str, Rule]]:
    return [(p, rule) for p in patterns]


COUNTS = ("read", "kept", "train", "eval", "rejected", "blank_lines")
# Per file, (key pattern, rule) in order: the first pattern that matches a key (fnmatch: `*` matches
# anything, dots included) gives its rule. Keys are flattened with dots: parity.passed, sources.<name>.read.
TOLERANCE: dict[str, list[tuple[str, Rule]]] = {
    "data": each(EQUAL, *COUNTS, "token_counted", "dropped.*", *(f"sources.*.{c}" for c in COUNTS)),
    "train": [
        *each(rel(0.005), "train_loss", "eval_loss"), ("eval_ppl", rel(0.015)),
        ("eval_loss_base", rel(0.001)), ("eval_ppl_base", rel(0.003)),
        *each(EQUAL, "train_tokens", "trainable_params", "total_params", "steps",
              "train_rows", "train_rows_truncated", "train_rows_untrainable",
              "eval_rows", "eval_rows_truncated", "eval_rows_untrainable"),
        # how this run went on this machine: durations, speed, processes, a resumed checkpoint, and the
        # precision train.precision: auto measured fastest here (its losses are held to the tolerances above)
        *each(INFO, "runtime_s", "stage_s", "train_tokens_per_s", "processes", "resumed_from_step",
              "precision", "precision_reason", "precision_probe_ratio"),
    ],
    "quantize": [
        *each(EQUAL, "quant", "choice", "imatrix", "size_bytes", "size_*_bytes", "size_ratio", "n_weights", "tensor_types.*"),
        ("bits_per_weight", rel(0.001)),
        ("ppl_unquantized", rel(0.005)), ("kld_assistant_*", abs_(0.01)),
        *each(EQUAL, *(f"parity.{k}" for k in ("passed", "n_prompts", "tokens_match", "template_match", "bos_doubled", "add_bos",
                                               "eos_id", "eot_id", "stop_tokens_ok", "stops_on_its_own", "max_abs_logit_diff_limit"))),
        # a 4-bit file's top-token agreement moves most between CPUs (docs/reproducibility.md has the figures)
        ("parity.f16_argmax_agreement", abs_(0.02)), ("parity.quant_argmax_agreement", abs_(0.1)),
        # the gate (export.parity.max_abs_logit_diff) bounds it; the adapter's own weights move it, and
        # train.precision: auto trains in fp32 or bf16 by CPU (docs/reproducibility.md has the figures)
        ("parity.f16_max_abs_logit_diff", abs_(0.15)), ("parity.quant_max_abs_logit_diff", abs_(2.0)),
        *each(abs_(0.25), "parity.stop_fraction", "parity.hf_stop_fraction"),  # one prompt of four
        # greedy reply lengths: one other token changes them; the stop fractions above are what is compared
        *each(INFO, "parity.gen_tokens", "parity.hf_gen_tokens"),
        ("candidates", EQUAL),  # the types tried, in order
        *each(EQUAL, "candidates.*.size_mb", "candidates.*.passed"), ("candidates.*.failures", WORDING),
        ("candidates.*.bits_per_weight", rel(0.001)), ("candidates.*.argmax_agreement", abs_(0.1)),
        ("candidates.*.ppl_delta_pct", abs_(0.5)), ("candidates.*.kld", abs_(0.005)),
        ("candidates.*.kld_assistant_vs_merged", abs_(0.01)), ("candidates.*.finetune_kept", abs_(0.02)),
    ],
    "eval": [
        *each(EQUAL, "eval_rows", "eval_tokens", "ctx", "ctx_used", "chunks", "scored_tokens", "assistant_tokens",
              "quant", "unquantized", "samples_total"),
        ("ppl_hf_base", rel(0.001)), ("ppl_hf_merged", rel(0.005)), ("ppl_quant", rel(0.005)),
        *each(abs_(0.5), "ppl_delta_pct", "ppl_merged_vs_base_pct"),
        ("ppl_*_vs_hf_pct", abs_(0.1)),  # the unquantized file (ppl_f16_vs_hf_pct, ppl_bf16_vs_hf_pct)
        ("ppl_*", rel(0.005)),  # the unquantized file's perplexity (ppl_f16, ppl_bf16)
        ("loss_assistant_*", rel(0.005)), ("kld_assistant_*", abs_(0.01)), ("finetune_kept", abs_(0.02)),
        ("kld_quant_vs_*", abs_(0.005)), ("same_top_token_pct", abs_(1.0)), ("rms_dp_pct", abs_(0.5)),
        ("size_hf_merged_mb", rel(0.001)), *each(EQUAL, "size_*_mb", "size_ratio"),
        ("samples_stopped", abs_(3)),
        *each(INFO, "threads", "prompt_tok_s_*", "decode_tok_s_*", "decode_speedup_quant_vs_hf", "answers_s"),
        # answers to the eval prompts (evaluate.predict): the references' figures are data, equal; greedy
        # answers change where a near-tie flips on another CPU, so their scores move by a few points
        *each(EQUAL, "answers_rows", "answers_*_ref"),
        # quant against merged compares two sets of greedy answers, each flipping at its own near-ties
        ("answers_bleu4_quant_vs_merged", abs_(10.0)),
        *each(abs_(3.0), "answers_bleu4_*", "answers_rouge*"),
        *each(abs_(0.05), "answers_distinct*", "answers_seqrep4_*"),
        *each(abs_(0.1), "answers_cut_*", "answers_empty_*"),
        ("answers_len_*", rel(0.2)), ("answers_exact_quant_vs_merged", abs_(0.2)),
    ],
}


def rule_for(name: str, key: str) -> Rule | None:
    """The rule of `key` in metrics/<name>.json; None when TOLERANCE states none."""
    return next((r for pattern, r in TOLERANCE.get(name, ()) if fnmatch.fnmatchcase(key, pattern)), None)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _wording(x):
    return [re.sub(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", "#", s) for s in x] if isinstance(x, list) else x


def flat(node, prefix: str = "") -> dict:
    """Nested objects -> dotted keys; a list of objects with a `type` (the quantize candidates) -> the
    list of types under its own key plus each object's fields under `<key>.<type>.`."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out
    if isinstance(node, list) and node and all(isinstance(x, dict) and "type" in x for x in node):
        out = {prefix[:-1]: [x["type"] for x in node]}
        for x in node:
            out.update(flat({k: v for k, v in x.items() if k != "type"}, f"{prefix}{x['type']}."))
        return out
    return {prefix[:-1]: node}


def compare(committed: dict, current: dict) -> list[str]:
    """Every key without a tolerance, as `file: key: no tolerance stated ...`, and every metric
    outside its tolerance, as `file: key: committed -> current (tolerance)`."""
    bad = []
    for name in FILES:
        old, new = flat(committed.get(name) or {}), flat(current.get(name) or {})
        for key in sorted(old.keys() | new.keys()):
            rule = rule_for(name, key)
            if rule is None:
                bad.append(f"{name}: {key}: {NO_TOLERANCE}")
            elif key in old and key in new and not rule.holds(old[key], new[key]):
                bad.append(f"{name}: {key}: {old[key]!r} -> {new[key]!r} ({rule.text()})")
    return bad


def one_sided(committed: dict, current: dict) -> list[str]:
    """Keys only one side has, as `file: key (only committed|only here)`: listed, not compared."""
    out = []
    for name in FILES:
        if committed.get(name) is None or current.get(name) is None:
            continue
        old, new = flat(committed[name]), flat(current[name])
        out += [f"{name}: {k} (only {'committed' if k in old else 'here'})" for k in sorted(old.keys() ^ new.keys())]
    return out


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
    for line in one_sided(committed, current):
        print(f"not compared       {line}")
    for line in bad:
        print(f"{'NO TOLERANCE' if line.endswith(NO_TOLERANCE) else 'OUTSIDE TOLERANCE'}  {line}")
    compared = len([n for n in FILES if n not in missing])
    print(f"{compared} metrics files compared with {args.rev}: "
          f"{'all within tolerance' if not bad else f'{len(bad)} outside tolerance or without one'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
