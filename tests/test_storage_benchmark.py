"""Smoke test of benchmarks/storage_throughput.py at a tiny size: it runs, prints every row of its table
and the command to reproduce, for the local and the S3 (moto over loopback HTTP) paths; timings themselves are
only reported, never asserted."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_benchmark_runs_and_prints_its_table():
    out = subprocess.run([sys.executable, "benchmarks/storage_throughput.py", "--rows", "5000", "--repeat", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for row in ("local: bare write_table", "local: commit (1 shard)", "local: ratio", "duckdb aggregate",
                "export trl-prm", "export trl-dpo", "export step-dpo", "export math-shepherd", "export prm800k", "export rstar-ppm",
                "s3 (moto): bare write_table", "s3 (moto): commit (1 shard)", "s3 (moto): ratio",
                "s3 (moto): duckdb httpfs aggregate",
                "trl-prm: whole-table exporter (before)", "prm800k: streamed exporter alone (after)",
                "math-shepherd: streamed run_export (after)", "prm800k: streamed run_export peak RSS growth"):
        assert row in out.stdout
    assert "reproduce: .venv/bin/python benchmarks/storage_throughput.py --rows 5000 --repeat 1\n" in out.stdout


def test_step_exports_with_pairs_and_s3_print_their_rows():
    out = subprocess.run([sys.executable, "benchmarks/storage_throughput.py", "--rows", "5000", "--repeat", "1",
                          "--step-exports-only", "--pair-exports", "--s3-export"],
                         cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    for row in ("trl-dpo: streamed run_export peak RSS growth", "rstar-ppm: streamed run_export (after)",
                "prm800k to S3 (moto): streamed run_export peak RSS growth"):
        assert row in out.stdout
    assert "--step-exports-only --pair-exports --s3-export\n" in out.stdout
