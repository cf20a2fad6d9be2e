"""Timing and memory helpers shared by the benchmark scripts (not tests: they print, they don't assert)."""

from __future__ import annotations

import gc
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def interleaved_medians(cases: dict[str, Callable[[], None]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each case, running the cases round-robin so drift hits all of them alike."""
    for _ in range(warmup):
        for run in cases.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            gc.collect()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_in_subprocess(module: str, *args: str) -> float:
    """Peak RSS growth (MB) of ``python -m module args`` beyond its set-up, measured in a fresh process."""
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def report(title: str, medians: dict[str, float], baseline: str) -> None:
    print(f"\n{title}")
    for name, seconds in medians.items():
        print(f"  {name:44s} {seconds * 1000:9.1f} ms   {seconds / medians[baseline]:5.3f}x {baseline}")
