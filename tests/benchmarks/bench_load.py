"""Benchmark: median wall time of a cached ``oculi.load()`` (the default model), 5 repetitions.

The first call (outside the timing) fills the cache and pays the one-time imports; the timed
calls are what a user sees on every later load in a running process.

    python tests/benchmarks/bench_load.py
"""

from __future__ import annotations

import statistics
import time

import oculi_dsl as oculi

REPEATS = 5


def main() -> None:
    start = time.perf_counter()
    oculi.load()
    print(f"first load in this process (cache fill if needed, imports): "
          f"{time.perf_counter() - start:.2f} s")
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        oculi.load(progress=False)
        times.append(time.perf_counter() - start)
    print(f"cached load(): median {statistics.median(times):.3f} s over {REPEATS} runs "
          f"(min {min(times):.3f} s, max {max(times):.3f} s)")


if __name__ == "__main__":
    main()
