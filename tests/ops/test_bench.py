"""Smoke run of bench/msda.py (the decoder case, one timed call per measurement, each cell the best of two
processes)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_runs_and_reports_ratios(native_cpu):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "msda.py"), "--cases", "c", "--repeats", "1",
                           "--device", "cpu", "--threads", "1", "--rounds", "2"], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "best of 2 rounds" in lines[0]
    assert any(line.startswith("decoder N=1 800x1333, 300 queries") for line in lines)
    for backend in ("native", "reference"):
        row = next(line for line in lines if line.strip().startswith(backend))
        times_and_memory = [float(x) for x in row.split()[1:]]
        # fwd ms, fwd+bwd ms, fwd peak MB, f+b peak MB, f+b extra MB (peak beyond output and gradients)
        assert len(times_and_memory) == 5 and all(x >= 0 for x in times_and_memory)
        assert times_and_memory[0] > 0 and times_and_memory[1] > 0
        assert times_and_memory[4] <= times_and_memory[3]
    ratio_line = next(line for line in lines if "speed-up" in line)
    assert len(re.findall(r"\d+\.\d+x", ratio_line)) == 2
    assert len(re.findall(r"\s\d+\.\d\d(?=\s|$)", ratio_line)) == 3  # three memory fractions


def test_bench_rejects_unknown_cases():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "msda.py"), "--cases", "z"], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 2 and "unknown case(s) ['z']" in done.stderr


def test_bench_rejects_unknown_dtypes():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "msda.py"), "--dtypes", "fp32,int8"],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 2 and "--dtypes 'fp32,int8': choose from fp32, bf16, fp16" in done.stderr


def test_bench_rejects_zero_rounds():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "msda.py"), "--rounds", "0"], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 2 and "--rounds 0: at least 1" in done.stderr
