"""Smoke run of bench/serve.py: it starts both servers, prints every row its README describes, and
exits 0 or 1 (targets met or missed: speed is for the benchmark to judge, not this test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_serve_bench_prints_overheads_and_throughputs(tmp_path):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    done = subprocess.run([sys.executable, str(REPO / "bench" / "serve.py"), "--requests", "2",
                           "--throughput-requests", "4"], capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(REPO), MLFLOW_DISABLE_TELEMETRY="true",
                                   TMPDIR=str(temporary)))
    assert done.returncode in (0, 1), done.stderr[-3000:]
    assert not any(temporary.glob("bench-serve-*")), "the benchmark left its working directory behind"
    out = done.stdout
    for name in ("in-process Detector.detect", "detr serve ", "detr serve --no-batching", "mlflow models serve"):
        assert any(line.strip().startswith(name.strip()) and "p50" in line for line in out.splitlines()), (name, out)
    rows = [line.split() for line in out.splitlines() if line.strip()[:1] in ("1", "4", "8") and len(line.split()) == 4]
    assert [row[0] for row in rows] == ["1", "4", "8"], out
    assert all(float(value) > 0 for row in rows for value in row[1:]), out
