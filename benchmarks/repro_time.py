"""Time the whole default pipeline (`dvc repro` from a fresh clone, llama.cpp built and cached) at two
commits, one after the other on this machine, and print each stage's time side by side.

    .venv/bin/python benchmarks/repro_time.py --before <commit> [--after HEAD]

Each commit is cloned into a temporary folder that shares this checkout's DVC cache and runs every
stage (`dvc repro --force --no-run-cache`: nothing is restored from the cache or an earlier run) with its own code
(PYTHONPATH=<clone>/src) in this checkout's virtualenv. The stage times are the `[stage] ... (N s)`
lines each stage prints; "dvc repro" is the wall time of the whole command. With --keep DIR the
clones stay there (the second one's dvc.lock and metrics are a full run of that commit, its outputs
in the shared cache). Run it on an otherwise idle machine: it takes two full pipeline runs.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"^\[(\w+)\] .*\((\d+(?:\.\d+)?) s\)$")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def run_at(commit: str, work: Path) -> dict[str, float]:
    clone = work / commit[:12]
    subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "--quiet", commit], check=True)
    (clone / ".venv").symlink_to(ROOT / ".venv")
    subprocess.run([str(ROOT / ".venv/bin/dvc"), "cache", "dir", "--local", str(ROOT / ".dvc/cache")], cwd=clone, check=True)
    env = {**os.environ, "PYTHONPATH": str(clone / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{ROOT / '.venv/bin'}{os.pathsep}{os.environ['PATH']}"}
    print(f"== {commit[:12]}: dvc repro in {clone}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen([str(ROOT / ".venv/bin/dvc"), "repro", "--force", "--no-run-cache"], cwd=clone, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    times: dict[str, float] = {}
    for line in proc.stdout:
        if m := STAGE_LINE.match(line.strip()):
            times[m.group(1)] = float(m.group(2))
            print(f"   {line.strip()[:160]}", flush=True)
    if proc.wait() != 0:
        sys.exit(f"dvc repro failed at {commit} (rc {proc.returncode}); rerun it in {clone} to see why")
    times["dvc repro"] = time.perf_counter() - start
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="the commit to compare against")
    ap.add_argument("--after", default="HEAD", help="the commit measured second (default: HEAD)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the clones in this folder")
    args = ap.parse_args()
    commits = [subprocess.run(["git", "-C", str(ROOT), "rev-parse", c], check=True, capture_output=True,
                              text=True).stdout.strip() for c in (args.before, args.after)]
    print(f"{cpu_name()}, {os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f}", flush=True)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        before, after = (run_at(c, args.keep.resolve()) for c in commits)
    else:
        with tempfile.TemporaryDirectory(prefix="lorapipe-repro-time-") as work:
            before, after = (run_at(c, Path(work)) for c in commits)
    print(f"\n{'stage':<12}{'before s':>10}{'after s':>10}{'after/before':>14}")
    for stage in [s for s in before if s != "dvc repro"] + [s for s in after if s not in before] + ["dvc repro"]:
        b, a = before.get(stage), after.get(stage)
        ratio = f"{a / b:.2f}" if a is not None and b else "-"
        print(f"{stage:<12}{b if b is not None else float('nan'):>10.1f}{a if a is not None else float('nan'):>10.1f}{ratio:>14}")
    print(f"before = {commits[0][:12]}, after = {commits[1][:12]}; target: after/before <= 0.67 for `dvc repro`")


if __name__ == "__main__":
    main()
