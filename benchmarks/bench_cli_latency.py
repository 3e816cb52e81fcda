"""How long a bad input takes to be refused, against the floor of importing torch.

Prints ``error_latency_ratio=X``: the median wall time of
``klgap replicate --model tiny-gpt2 --sae /nonexistent --site mlp_out --layer 0`` (which must fail with a one-line
error) over that of ``python -c "import torch"``, 5 runs each, interleaved, in one run of this script.
Target: ≤ 1.5 (bad input is refused before a model, transformers or pandas is loaded).

    .venv/bin/python benchmarks/bench_cli_latency.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
BAD = [str(BIN / "klgap"), "replicate", "--model", "tiny-gpt2", "--sae", "/nonexistent", "--site", "mlp_out", "--layer", "0"]
FLOOR = [sys.executable, "-c", "import torch"]


def timed(command: list[str], expect_fail: bool) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if expect_fail and (done.returncode != 2 or "klgap: error:" not in done.stderr):
        raise SystemExit(f"expected a one-line klgap error, got exit {done.returncode}: {done.stderr[-500:]}")
    if not expect_fail and done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr[-500:]}")
    return elapsed


def main(repeats: int = 5) -> None:
    timed(FLOOR, False), timed(BAD, True)  # warm the file cache
    bad, floor = [], []
    for _ in range(repeats):
        floor.append(timed(FLOOR, False))
        bad.append(timed(BAD, True))
    print(f"import torch: median {statistics.median(floor):.2f} s  ({', '.join(f'{t:.2f}' for t in floor)})")
    print(f"bad input:    median {statistics.median(bad):.2f} s  ({', '.join(f'{t:.2f}' for t in bad)})")
    print(f"error_latency_ratio={statistics.median(bad) / statistics.median(floor):.2f}")


if __name__ == "__main__":
    main()
