"""The benchmark scripts run (tiny sizes): CI checks they work, not how fast anything is."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", ["bench_loss.py", "bench_train_step.py", "bench_audit.py", "bench_memory.py"])
def test_benchmark_smoke(script):
    run = subprocess.run([sys.executable, script, "--smoke", *(["--repeats", "1"] if script != "bench_memory.py" else [])],
                         cwd=BENCHMARKS, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert ("x " in run.stdout) or ("x\n" in run.stdout), run.stdout  # a ratio was printed
