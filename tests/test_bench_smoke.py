"""A smoke run of the bench (``python -m bench --quick``): every scenario runs and lands
in the results file. No timing assertions: figures depend on the machine."""

from __future__ import annotations

import importlib.util
import json
import shutil
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
        timeout=180,  # ~40 s alone; the margin is for a machine shared with other suites
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(output.read_text())
    assert set(results["scenarios"]) == {"S1", "S2", "S3", "S4", "S5", "S6", "S7"}
    assert results["baselines"]["pgbench"]["tps"] > 0
    baselines = results["baselines"]
    assert baselines["health_python"]["rps"] > 0
    if shutil.which("wrk"):  # the API's own rate (.ci/run installs wrk)
        assert baselines["health"]["rps"] > 0
    else:
        assert baselines["health"] is None
    if importlib.util.find_spec("pgqueuer"):  # the peer queue (the bench extra)
        assert baselines["peer"]["drain"]["jobs_per_s"] > 0
        assert baselines["peer"]["enqueue"]["jobs_per_s"] > 0
    s1 = results["scenarios"]["S1"]
    for stage in ("success_to_claimed", "claimed_to_sent", "sent_to_recorded", "engine_hop"):
        assert s1["stages"][stage]["n"] == s1["hops"], stage
    assert s1["at_target"]["start_to_start"]["n"] == s1["hops"]
    assert results["scenarios"]["S5"]["lists_every_task"]
    for name, scenario in results["scenarios"].items():
        assert {"figure", "target", "met"} <= set(scenario), name
    assert results["scenarios"]["S2"]["successes"] == results["scenarios"]["S2"]["tasks"]
    assert results["scenarios"]["S6"]["exact_sums"]
    assert "S1 hop latency" in proc.stdout
