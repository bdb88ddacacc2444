"""kill -9 at a random point of every stage, then `dvc repro`: the same outputs as an uninterrupted run,
and at no time a partial file at an output path (real git + DVC, a tiny model, small real data)."""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from test_pipeline_e2e import STAGES, copy_project_for_pipeline, run

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("KILL_SEED", "20261207"))
# Outputs that hold timings (speeds, run times) differ between two runs by nature; they are checked
# for presence, the rest byte for byte.
TIMED = ("metrics/", "dvclive/", "plots/", "models/README.md")


def snapshot(root: Path, outs: list[str]) -> dict[str, str]:
    """md5 of every file under the outputs that exist (a missing output has no entry)."""
    found = {}
    for out in outs:
        path = root / out
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
        for f in files:
            found[f.relative_to(root).as_posix()] = hashlib.md5(f.read_bytes()).hexdigest()
    return found


def stage_outs(root: Path) -> dict[str, list[str]]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {name: [o["path"] for o in lock[name].get("outs", []) if not o["path"].startswith("models/checkpoints")]
            for name in STAGES}


def timed_repro(root: Path, env: dict) -> dict[str, float]:
    """`dvc repro` of the whole graph; seconds each stage took (from one "Running stage" line to the next)."""
    proc = subprocess.Popen(["dvc", "repro"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    starts, lines = [], []
    for line in proc.stdout:
        lines.append(line)
        m = re.match(r"Running stage '([\w-]+)'", line)
        if m:
            starts.append((m.group(1), time.monotonic()))
    assert proc.wait() == 0, "".join(lines[-50:])
    ends = [t for _, t in starts[1:]] + [time.monotonic()]
    return {name: end - start for (name, start), end in zip(starts, ends)}


def test_kill_9_anywhere_in_any_stage_then_repro_gives_the_uninterrupted_outputs(tmp_path, tiny_model):
    root, env = copy_project_for_pipeline(tmp_path, tiny_model)
    lengths = timed_repro(root, env)
    assert sorted(lengths) == sorted(STAGES)
    outs = stage_outs(root)
    every = [o for stage_outs_ in outs.values() for o in stage_outs_]
    baseline = snapshot(root, every)
    rng = random.Random(SEED)
    for stage in STAGES:
        proc = subprocess.Popen(["dvc", "repro", "-f", "-s", stage], cwd=root, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        at = rng.uniform(0.1, 0.95) * lengths[stage]
        time.sleep(at)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        where = f"{stage} killed at {at:.1f}s of {lengths[stage]:.1f}s (KILL_SEED={SEED})"
        # Each output is absent or whole: never a half-written file at its path.
        for path, digest in snapshot(root, outs[stage]).items():
            if not path.startswith(TIMED):
                assert digest == baseline[path], f"{where}: {path} is partial"

        run(["dvc", "repro"], root, env)
        final = snapshot(root, every)
        assert final.keys() == baseline.keys(), f"{where}: outputs differ {final.keys() ^ baseline.keys()}"
        changed = [p for p in final if final[p] != baseline[p] and not p.startswith(TIMED)]
        assert not changed, f"{where}: differ after repro: {changed}"

        # The next run of the stage removes what the killed one left beside its outputs (a stage whose
        # outputs survived whole is not rerun by `dvc repro`, so its leftovers wait for that run).
        run(["dvc", "repro", "-f", "-s", stage], root, env)
        rerun = snapshot(root, outs[stage])
        assert all(rerun[p] == baseline[p] for p in rerun if not p.startswith(TIMED)), f"{where}: a rerun changed its outputs"
        leftovers = [p for p in root.rglob("*.partial") if ".dvc" not in p.parts]
        assert not leftovers, f"{where}: temporary files left behind after the next run: {leftovers}"
    assert "Data and pipelines are up to date" in run(["dvc", "status"], root, env).stdout


def snapshot_of(baseline: dict[str, str], outs: list[str]) -> dict[str, str]:
    return {p: d for p, d in baseline.items() if any(p == o or p.startswith(o.rstrip("/") + "/") for o in outs)}
