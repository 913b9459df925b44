"""Invariants checked from the database's own history (task_history), not by sampling."""

from __future__ import annotations

from collections import defaultdict

import psycopg


def running_intervals(conn: psycopg.Connection) -> list[dict]:
    """Every stretch a task spent in running: task, kind, metadata, start, end (or None)."""
    rows = conn.execute(
        """
        SELECT h.task_id, t.kind, t.metadata, h.at AS start_at,
               (SELECT min(n.at) FROM taskrunner.task_history n
                WHERE n.task_id = h.task_id AND n.from_status = 'running' AND n.at >= h.at
                  AND n.id > h.id) AS end_at
        FROM taskrunner.task_history h
        JOIN taskrunner.task t ON t.id = h.task_id
        WHERE h.to_status = 'running'
        """
    ).fetchall()
    return rows


def max_concurrent(intervals: list[dict], key) -> dict:
    """Highest number of simultaneously running intervals per key(interval)."""
    events = defaultdict(list)
    for iv in intervals:
        k = key(iv)
        if k is None:
            continue
        events[k].append((iv["start_at"], 1))
        if iv["end_at"] is not None:
            events[k].append((iv["end_at"], -1))
    peaks = {}
    for k, evs in events.items():
        evs.sort(key=lambda e: (e[0], e[1]))  # at equal times, ends (-1) before starts
        level = peak = 0
        for _, delta in evs:
            level += delta
            peak = max(peak, level)
        peaks[k] = peak
    return peaks


def assert_rule_respected(conn: psycopg.Connection, kind: str, fields: list[str],
                          limit: int) -> dict:
    """At no instant did more than ``limit`` tasks of ``kind`` with equal ``fields`` run."""
    intervals = running_intervals(conn)

    def key(iv):
        if iv["kind"] != kind:
            return None
        return tuple(str(iv["metadata"].get(f)) for f in fields)

    peaks = max_concurrent(intervals, key)
    over = {k: v for k, v in peaks.items() if v > limit}
    assert not over, f"rule {kind}{fields} <= {limit} exceeded: {over}"
    return peaks
