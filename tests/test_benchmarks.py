"""The benchmark scripts run (smoke sizes) and print their tables: they must not rot.

Numbers are not checked here (speed targets live in the benchmarks' own output and in
benchmarks/RESULTS.md); what is checked is that each script runs end to end on tiny sizes and
prints a markdown table with the rows it promises.
"""
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"

CASES = {
    "bench_ops": ["--quick", "--only", "blocks,rate,lanczos"],
    "bench_scoring": ["--widths", "16", "--samples", "128", "--repeats", "1"],
    "bench_sites": ["--quick", "--repeats", "1"],
    "bench_vit": ["--quick", "--repeats", "1", "--models", "S"],
    "bench_transformer": ["--small", "--repeats", "1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_runs(name):
    out = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *CASES[name]], capture_output=True, text=True,
                         timeout=600, cwd=BENCH)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("|")]
    assert len(lines) >= 3, out.stdout[-3000:]  # header, separator, at least one row
