"""A smoke run of the bench (``python -m bench --quick``): every scenario runs and lands
in the results file. No timing assertions: figures depend on the machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_bench_reports_every_scenario(tmp_path):
    output = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(output.read_text())
    assert set(results["scenarios"]) == {"S1", "S2", "S3", "S4", "S5", "S6", "S7"}
    assert results["baselines"]["pgbench"]["tps"] > 0
    assert results["baselines"]["health"]["rps"] > 0
    for name, scenario in results["scenarios"].items():
        assert {"figure", "target", "met"} <= set(scenario), name
    assert results["scenarios"]["S2"]["successes"] == results["scenarios"]["S2"]["tasks"]
    assert results["scenarios"]["S6"]["exact_sums"]
    assert "S1 hop latency" in proc.stdout
