"""Eval loss of the train stage in fp32 and in bf16 autocast over several seeds: is bf16's difference
within fp32's own seed-to-seed spread?

Each run is the real stage (lorapipe.stages.train.run) with params.yaml's train and lora sections, only
train.seed and train.precision changed, in a child process and a work folder of its own (the
checkout's models/base and data/clean are read, nothing of the checkout is written).

Usage (from the repository root, after `dvc checkout base clean` or `make repro`):
    .venv/bin/python benchmarks/precision_parity.py [--seeds 42,1,2] [--precisions fp32,bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_run(work: Path, seed: int, precision: str) -> dict:
    """Child: the train stage in `work`, reading the checkout's base model and clean data."""
    import os

    import yaml

    from lorapipe.params import parse
    from lorapipe.stages import train

    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw["train"].update(seed=seed, precision=precision)
    params = parse(raw)
    (work / "data").mkdir(parents=True)
    (work / "data/clean").symlink_to(REPO / "data/clean")
    os.chdir(work)
    train.run(params, base_dir=REPO / "models/base")
    return json.loads((work / "metrics/train.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="42,1,2")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--out", type=Path, help="also write the runs' metrics here (JSON)")
    ap.add_argument("--child", nargs=3, metavar=("WORK", "SEED", "PRECISION"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one_run(Path(a.child[0]), int(a.child[1]), a.child[2])))
        return 0
    seeds = [int(s) for s in a.seeds.split(",")]
    precisions = a.precisions.split(",")
    runs: dict[str, dict[int, dict]] = {p: {} for p in precisions}
    with tempfile.TemporaryDirectory(prefix="lorapipe-parity-") as tmp:
        for seed in seeds:  # interleaved: a change in the machine's load hits both precisions alike
            for p in precisions:
                work = Path(tmp) / f"{p}-{seed}"
                proc = subprocess.run([sys.executable, __file__, "--child", str(work), str(seed), p],
                                      capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(f"seed {seed} {p}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
                m = json.loads(proc.stdout.strip().splitlines()[-1])
                runs[p][seed] = m
                print(f"seed {seed} {p}: eval loss {m['eval_loss']:.4f}, {m['train_tokens_per_s']} tokens/s, "
                      f"{m['runtime_s']} s ({m['precision']})", flush=True)
    if a.out:
        a.out.write_text(json.dumps(runs, indent=2))
    print(f"\n{'seed':>6}" + "".join(f"{'eval ' + p:>12}{p + ' tok/s':>13}" for p in precisions))
    for seed in seeds:
        print(f"{seed:>6}" + "".join(f"{runs[p][seed]['eval_loss']:>12.4f}{runs[p][seed]['train_tokens_per_s']:>13.1f}"
                                     for p in precisions))
    ref = precisions[0]
    losses = {p: [runs[p][s]["eval_loss"] for s in seeds] for p in precisions}
    print(f"\n{ref} seed spread (max - min): {max(losses[ref]) - min(losses[ref]):.4f}")
    for p in precisions[1:]:
        diff = statistics.mean(b - f for b, f in zip(losses[p], losses[ref]))
        speed = statistics.mean(runs[p][s]["train_tokens_per_s"] / runs[ref][s]["train_tokens_per_s"] for s in seeds)
        print(f"{p} - {ref}: mean eval loss difference {diff:+.4f} (per seed: "
              + ", ".join(f"{b - f:+.4f}" for b, f in zip(losses[p], losses[ref]))
              + f"); {p} spread {max(losses[p]) - min(losses[p]):.4f}; mean speed ratio {speed:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
