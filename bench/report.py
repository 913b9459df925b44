"""Targets (issue 4) and the printed table."""

from __future__ import annotations


def judge(results: dict) -> None:
    """Add ``figure``, ``target`` and ``met`` to every scenario in ``results``."""
    tps = results["baselines"]["pgbench"]["tps"]
    health = results["baselines"]["health"]["rps"]
    s = results["scenarios"]
    if "S1" in s:
        r = s["S1"]
        r["figure"] = f"median {r['median_ms']} ms, p99 {r['p99_ms']} ms per hop"
        r["target"] = "median <= 5 ms, p99 <= 25 ms"
        r["met"] = r["median_ms"] <= 5 and r["p99_ms"] <= 25
    if "S2" in s:
        _ratio(s["S2"], s["S2"]["tasks_per_s"], tps, 0.4, "tasks/s", "pgbench TPS")
        s["S2"]["met"] = s["S2"]["met"] and s["S2"]["successes"] == s["S2"]["tasks"]
    if "S3" in s:
        _ratio(s["S3"], s["S3"]["tasks_per_s"], tps, 1.0, "tasks/s", "pgbench TPS")
    if "S4" in s:
        r = s["S4"]
        r["figure"] = (
            f"claim {r['small_median_ms']} ms ({r['small_backlog']} blocked) vs "
            f"{r['large_median_ms']} ms ({r['large_backlog']} blocked): ratio {r['ratio']}"
        )
        r["target"] = "ratio <= 1.5"
        r["met"] = r["ratio"] <= 1.5
    if "S5" in s:
        r = s["S5"]
        _ratio(r, r["tasks_per_s"], tps, 2.0, "tasks/s", "pgbench TPS")
        r["target"] = ">= 5000 tasks/s and " + r["target"] + "; reject <= accept"
        r["met"] = r["met"] and r["tasks_per_s"] >= 5000 and r["reject_ms"] <= r["accept_ms"]
        r["figure"] += (
            f"; a {r['body_bytes'] // 1024} KiB body: accepted in {r['accept_ms']} ms, "
            f"rejected in {r['reject_ms']} ms"
        )
    if "S6" in s:
        r = s["S6"]
        _ratio(r, r["rps"], health, 0.5, "req/s", "/health rate")
        r["figure"] += ", sums " + ("exact" if r["exact_sums"] else "WRONG")
        r["met"] = r["met"] and r["exact_sums"] and r["errors"] == 0
    if "S7" in s:
        r = s["S7"]
        base = r["runs"][0]["tasks_per_s"]
        r["scaling"] = {str(x["workers"]): round(x["tasks_per_s"] / base, 2) for x in r["runs"]}
        r["figure"] = ", ".join(
            f"{x['workers']}w {x['tasks_per_s']} tasks/s ({r['scaling'][str(x['workers'])]}x)"
            for x in r["runs"]
        )
        r["target"] = "report the scaling"
        r["met"] = None


def _ratio(r: dict, value: float, baseline: float, want: float, unit: str, name: str) -> None:
    r["ratio"] = round(value / baseline, 3)
    r["figure"] = f"{value} {unit} = {r['ratio']} x {name}"
    r["target"] = f">= {want} x {name}"
    r["met"] = r["ratio"] >= want


NAMES = {
    "S1": "S1 hop latency",
    "S2": "S2 end-to-end throughput",
    "S3": "S3 engine throughput (SQL)",
    "S4": "S4 blocked backlog",
    "S5": "S5 creation",
    "S6": "S6 counters (PUT /task)",
    "S7": "S7 scale-out",
}


def table(results: dict) -> str:
    b = results["baselines"]
    lines = [
        f"baselines: pgbench -N {b['pgbench']['tps']} TPS (4 clients, "
        f"{b['pgbench']['seconds']} s); GET /health {b['health']['rps']} req/s "
        f"({b['health']['clients']} clients)",
        "",
        f"| {'scenario':<28} | {'result':<72} | {'target':<34} | met |",
        f"|{'-' * 30}|{'-' * 74}|{'-' * 36}|-----|",
    ]
    for key, r in results["scenarios"].items():
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        lines.append(f"| {NAMES[key]:<28} | {r['figure']:<72} | {r['target']:<34} | {met:<3} |")
    return "\n".join(lines)
