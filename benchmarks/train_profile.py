"""Where a train step's time goes: torch.profiler over a few steps of the real train stage.

Runs lorapipe.stages.train.run with params.yaml's train and lora sections (max_steps cut to
--warmup + --steps) in a work folder of its own, reading the checkout's models/base and data/clean,
and prints the top operations by self CPU time with their share of the profiled steps.

Usage (from the repository root, after `dvc checkout base clean` or `make repro`):
    .venv/bin/python benchmarks/train_profile.py [--precision auto|fp32|bf16] [--steps 3] [--warmup 1] [--top 12]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--steps", type=int, default=3, help="profiled optimizer steps")
    ap.add_argument("--warmup", type=int, default=1, help="steps before profiling starts")
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from lorapipe.params import parse
    from lorapipe.stages import train

    class Profile(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == a.warmup and self.prof is None:
                self.prof = profile(activities=[ProfilerActivity.CPU])
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == a.warmup + a.steps and self.prof is not None:
                self.prof.__exit__(None, None, None)

    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw["train"].update(max_steps=a.warmup + a.steps, precision=a.precision, save_steps=10_000)
    cb = Profile()
    with tempfile.TemporaryDirectory(prefix="lorapipe-profile-") as tmp:
        (Path(tmp) / "data").mkdir()
        (Path(tmp) / "data/clean").symlink_to(REPO / "data/clean")
        os.chdir(tmp)
        train.run(parse(raw), base_dir=REPO / "models/base", callbacks=[cb])
        metrics = json.loads(Path("metrics/train.json").read_text())
    events = [e for e in cb.prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    print(f"precision {metrics['precision']} ({metrics['precision_reason']})")
    print(f"{a.steps} profiled steps, {total / 1e6:.1f} s of self CPU time over all threads' ops")
    print(f"{'op':<44}{'self CPU s':>11}{'share':>8}{'calls':>8}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: a.top]:
        print(f"{e.key[:43]:<44}{e.self_cpu_time_total / 1e6:>11.2f}{e.self_cpu_time_total / total:>8.1%}{e.count:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
