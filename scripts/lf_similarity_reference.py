#!/usr/bin/env python3
"""Score tests/fixtures/answers/predictions.jsonl with LLaMA-Factory's own ComputeSimilarity and write
the figures to tests/fixtures/answers/lf_scores.json, the reference tests/test_answer_scores.py holds
core/answer_scores.py to.

    .venv/bin/pip install --no-deps --target /tmp/lf llamafactory==0.9.5   # LF_VERSION of benchmarks/train_throughput.py
    PYTHONPATH=src .venv/bin/python scripts/lf_similarity_reference.py --lf /tmp/lf

It runs LLaMA-Factory the way its trainer does: predictions and labels as token ids (padded with
IGNORE_INDEX) in an EvalPrediction, decoded by ComputeSimilarity itself with the SmolLM2 tokenizer.
Only llamafactory.train.sft.metric and what it imports (llamafactory.extras) are loaded: the package
__init__ files are skipped, since they import the whole training stack (torchaudio, datasets
plugins) that scoring does not use. Every fixture text must survive the tokenizer's encode/decode
unchanged, so that both sides score the same strings; the script stops if one does not.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "answers" / "predictions.jsonl"
OUT = FIXTURE.with_name("lf_scores.json")


def load_compute_similarity(lf_root: Path):
    package = lf_root / "llamafactory"
    for name, sub in (("llamafactory", ""), ("llamafactory.train", "train"), ("llamafactory.train.sft", "train/sft")):
        module = types.ModuleType(name)
        module.__path__ = [str(package / sub)]
        sys.modules[name] = module
    sys.path.insert(0, str(lf_root))
    return importlib.import_module("llamafactory.train.sft.metric")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lf", required=True, type=Path, help="a folder holding an installed llamafactory package")
    args = p.parse_args()
    metric = load_compute_similarity(args.lf.resolve())
    dist = next(args.lf.glob("llamafactory-*.dist-info"), None)
    lf_version = dist.name.removeprefix("llamafactory-").removesuffix(".dist-info") if dist else "unknown"

    import numpy as np
    from transformers import AutoTokenizer, EvalPrediction

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import smollm2_gguf

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    rows = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]
    preds, labels = [r["predict"] for r in rows], [r["label"] for r in rows]
    ids = {}
    for name, texts in (("preds", preds), ("labels", labels)):
        enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        for text, e in zip(texts, enc):
            back = tok.decode(e, skip_special_tokens=True)
            if back != text:
                sys.exit(f"{FIXTURE}: {text!r} decodes back as {back!r}; use a text the tokenizer keeps")
        width = max(len(e) for e in enc) or 1
        ids[name] = np.array([e + [metric.IGNORE_INDEX] * (width - len(e)) for e in enc], dtype=np.int64)

    scorer = metric.ComputeSimilarity(tokenizer=tok)
    scorer(EvalPrediction(predictions=ids["preds"], label_ids=ids["labels"]), compute_result=False)
    per_answer = {k: list(v) for k, v in scorer.score_dict.items()}
    means = scorer._dump()
    out = {"llamafactory": lf_version, "fixture": FIXTURE.relative_to(ROOT).as_posix(),
           "per_answer": per_answer, "mean": means}
    OUT.write_text(json.dumps(out, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)} (llamafactory {lf_version}): {means}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
