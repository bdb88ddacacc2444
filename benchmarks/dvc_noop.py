"""Time a no-op `dvc repro` (and `dvc status`) on the finished pipeline; target: under 3 s.

Run after `make repro` from the repository root: `make bench` or `.venv/bin/python benchmarks/dvc_noop.py`.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_S = 3.0


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return elapsed, proc.stdout


def main() -> None:
    dvc = str(Path(sys.executable).parent / "dvc")
    _, out = timed([dvc, "repro"])  # warm-up; also proves the pipeline is up to date
    if "Running stage" in out:
        sys.exit("the pipeline was not up to date; run `make repro` first, then time the no-op")
    repro = [timed([dvc, "repro"])[0] for _ in range(3)]
    status = [timed([dvc, "status"])[0] for _ in range(3)]
    med = statistics.median(repro)
    print(f"no-op dvc repro: median {med:.2f} s over 3 runs (runs: {', '.join(f'{t:.2f}' for t in repro)})")
    print(f"dvc status:      median {statistics.median(status):.2f} s")
    print(f"target < {TARGET_S:.1f} s: {'met' if med < TARGET_S else 'NOT met'} (ratio {med / TARGET_S:.2f} of target)")


if __name__ == "__main__":
    main()
