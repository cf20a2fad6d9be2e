"""The benchmark scripts run (tiny sizes): CI checks they work, not how fast anything is."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each benchmark script in its own process

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


SCRIPTS = [
    "bench_loss.py",
    "bench_train_step.py",
    "bench_audit.py",
    "bench_memory.py",
    "bench_compile.py",
    "ab_versions.py",
]
UNREPEATED = ("bench_memory.py", "bench_compile.py")  # they take no --repeats


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_smoke(script):
    repeats = [] if script in UNREPEATED else ["--repeats", "1"]
    run = subprocess.run(
        [sys.executable, script, "--smoke", *repeats], cwd=BENCHMARKS, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert ("x " in run.stdout) or ("x\n" in run.stdout), run.stdout  # a ratio was printed


def test_loss_benchmark_profile_smoke():
    """bench_loss.py --profile: one profiled call of each case, its ops by their own time (the matmuls among them)."""
    run = subprocess.run(
        [sys.executable, "bench_loss.py", "--smoke", "--train_weight", "--profile"],
        cwd=BENCHMARKS,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "chunked two-matmul floor:" in run.stdout and "fused CE + entropy (hf_mrp):" in run.stdout, run.stdout
    assert "aten::mm" in run.stdout and "aten::addmm_" in run.stdout, run.stdout


def test_audit_benchmark_with_the_manifold_smoke(tmp_path):
    """bench_audit.py --manifold: the audit with --layers all, without and with the manifold, and the ratio."""
    command = [sys.executable, "bench_audit.py", "--smoke", "--manifold", "--max_positions", "300"]
    run = subprocess.run(
        [*command, "--output_dir", str(tmp_path)], cwd=BENCHMARKS, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "x audit --layers all" in run.stdout and "manifold sample: 300 of 300 positions" in run.stdout
    assert (tmp_path / "manifold.png").is_file()


def test_gpu_check_smoke():
    """benchmarks/gpu_check.py --smoke: the one-table GPU check on CPU with a tiny config; every row is timed or says
    why it is skipped, and none failed."""
    run = subprocess.run(
        [sys.executable, "gpu_check.py", "--smoke"], cwd=BENCHMARKS, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    table = run.stdout.split("\ncheck ")[1].splitlines()[1:]
    assert len(table) == 13 and not any("FAILED" in line for line in table), run.stdout
    for line in table:
        check, timing, _, note = (cell.strip() for cell in line.split(" | "))
        assert timing or note, line  # a time, or the reason it has none
    assert "skipped: CUDA-only" in run.stdout and "hf_mrp fused CE + fisher" in run.stdout
