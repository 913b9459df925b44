"""``python -m bench`` (``bin/bench``): measure the baselines and scenarios S1-S7 against a
fresh database on the local server, print one table and write ``bench/results.json``.

Targets are ratios to baselines measured in the same run (the ``GET /health`` rate of the
same API processes under ``wrk``, a peer queue's drain and enqueue on the same server,
``pgbench -N`` TPS), so they hold on a noisy machine. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

from bench import peer, report, scenarios
from bench.env import Service, Sink, connect, fresh_database

RESULTS = Path(__file__).with_name("results.json")
ALL = ("S1", "S2", "S3", "S4", "S5", "S6", "S7")


def machine(db_url: str) -> dict:
    with connect(db_url) as conn:
        version = conn.execute("SHOW server_version").fetchone()["server_version"]
        settings = {
            name: conn.execute(f"SHOW {name}").fetchone()[name]
            for name in ("shared_buffers", "synchronous_commit", "max_connections")
        }
    cpu = (
        next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "postgresql": version,
        **settings,
        "load_average": os.getloadavg(),
    }


def run(sizes: scenarios.Sizes, only: tuple[str, ...], output: Path) -> dict:
    results: dict = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": sizes == scenarios.QUICK,
        "baselines": {},
        "scenarios": {},
    }
    scen = results["scenarios"]
    with fresh_database() as db_url:
        results["machine"] = machine(db_url)
        baselines = results["baselines"]
        step("baseline: pgbench -N")
        baselines["pgbench"] = scenarios.pgbench_tps(db_url, sizes)
        step("baseline: round trip and commit latency")
        baselines["latency"] = scenarios.commit_latency(db_url, sizes)
        baselines["peer"] = None
        if {"S3", "S5"} & set(only):
            if peer.available():
                step("baseline: pgqueuer drain and enqueue")
                baselines["peer"] = scenarios.peer_rates(db_url, sizes)
            else:
                step("baseline: pgqueuer not installed (pip install -e '.[bench]'): skipped")
        service = Service(db_url)
        sink = Sink()
        try:
            service.start_api()
            step("baseline: GET /health (wrk, then the Python client)")
            baselines["health"] = scenarios.health_wrk(service, sizes, sizes.s6_clients)
            if baselines["health"] is None:
                step("wrk not installed (apt-get install wrk): S2 against the Python client")
            baselines["health_python"] = scenarios.health_rate(service, sizes, sizes.s6_clients)
            if "S1" in only:
                step("S1 hop latency")
                scen["S1"] = scenarios.s1_hop_latency(db_url, service, sink, sizes)
            if "S2" in only:
                step("S2 end-to-end throughput")
                scen["S2"] = scenarios.s2_throughput(
                    db_url, service, sink, sizes.s2_tasks, sizes.s2_batch, workers=1
                )
            if "S3" in only:
                step("S3 engine throughput")
                scen["S3"] = scenarios.s3_engine(db_url, sizes)
            if "S4" in only:
                step("S4 blocked backlog")
                scen["S4"] = scenarios.s4_blocked_backlog(db_url, sizes)
            if "S5" in only:
                step("S5 creation")
                scen["S5"] = scenarios.s5_creation(service, sizes, db_url)
            if "S6" in only:
                step("S6 counters")
                scen["S6"] = scenarios.s6_counters(service, sizes, db_url)
            if "S7" in only:
                runs = []
                for workers in sizes.s7_workers:
                    step(f"S7 scale-out, {workers} worker processes")
                    runs.append(
                        scenarios.s2_throughput(
                            db_url, service, sink, sizes.s7_tasks, sizes.s2_batch, workers
                        )
                    )
                scen["S7"] = {"runs": runs}
        finally:
            sink.close()
            service.close()
    report.judge(results)
    output.write_text(json.dumps(results, indent=2) + "\n")
    return results


def step(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bin/bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument(
        "--only", default=",".join(ALL), help="comma-separated scenarios (default: all)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="results file")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: services stopped, bench database dropped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    only = tuple(s.strip().upper() for s in args.only.split(",") if s.strip())
    unknown = set(only) - set(ALL)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    sizes = scenarios.QUICK if args.quick else scenarios.Sizes()
    results = run(sizes, only, args.output)
    print(report.table(results))
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
