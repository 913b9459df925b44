"""Invariants checked from the database's own records -- the transition history
(``task_history``), the outbox (``delivery``) and its attempts (``delivery_attempt``) --
never by sampling the live state. Each ``assert_*`` fails with the offending rows and
returns a figure worth reporting (docs/reliability.md quotes them).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import psycopg

TERMINAL = ("success", "failure", "canceled")


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


def assert_rule_respected(
    conn: psycopg.Connection, kind: str, fields: list[str], limit: int
) -> dict:
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


def assert_history_consistent(conn: psycopg.Connection) -> int:
    """Every task's history is one unbroken chain (each row starts where the previous one
    ended, the first is the creation) ending in the task's current status. Returns the
    number of transitions checked."""
    broken = conn.execute(
        """
        WITH h AS (
            SELECT task_id, id, from_status, to_status,
                   lag(to_status) OVER w AS before, row_number() OVER w AS n
            FROM taskrunner.task_history WINDOW w AS (PARTITION BY task_id ORDER BY id)
        )
        SELECT task_id, id, from_status::text, to_status::text, before::text FROM h
        WHERE (n = 1 AND from_status IS NOT NULL)
           OR (n > 1 AND from_status IS DISTINCT FROM before)
        LIMIT 10
        """
    ).fetchall()
    assert not broken, f"broken history chains: {broken}"
    mismatched = conn.execute(
        """
        SELECT t.id, t.status::text, last.to_status::text AS last
        FROM taskrunner.task t
        LEFT JOIN LATERAL (SELECT to_status FROM taskrunner.task_history h
                           WHERE h.task_id = t.id ORDER BY h.id DESC LIMIT 1) last ON true
        WHERE last.to_status IS DISTINCT FROM t.status
        LIMIT 10
        """
    ).fetchall()
    assert not mismatched, f"history does not end in the task's status: {mismatched}"
    return conn.execute("SELECT count(*) AS n FROM taskrunner.task_history").fetchone()["n"]


def assert_final_states(conn: psycopg.Connection, expected: Mapping[str, str]) -> None:
    """Each task (by id) is in the status the scenario dictates; no task is missing."""
    rows = conn.execute("SELECT id::text, status::text FROM taskrunner.task").fetchall()
    actual = {r["id"]: r["status"] for r in rows}
    assert set(actual) == set(expected), "tasks missing or unexpected"
    wrong = {t: (actual[t], s) for t, s in expected.items() if actual[t] != s}
    assert not wrong, (
        f"{len(wrong)} tasks not in their expected state, e.g. {list(wrong.items())[:5]}"
    )


def assert_no_double_start(conn: psycopg.Connection) -> dict[str, int]:
    """No start webhook fired twice for a task without a crash in between.

    Each claim (a ``running`` entry in the history) makes one start delivery; a task gets
    another only after the previous one's worker vanished or let go of it (delivery
    ``expired``: lease ran out or released at shutdown). So per task: starts == claims,
    every start but the newest is expired, and no delivery succeeded twice. Returns
    ``{"claims": n, "restarts": m}`` (restarts = starts that followed a crash).
    """
    rows = conn.execute(
        """
        WITH starts AS (
            SELECT task_id, count(*) AS n,
                   count(*) FILTER (WHERE status = 'expired') AS expired,
                   bool_and(status = 'expired' OR is_newest) AS only_newest_live
            FROM (SELECT d.*, row_number() OVER (PARTITION BY task_id
                                                 ORDER BY created_at DESC, attempts) = 1
                              AS is_newest
                  FROM taskrunner.delivery d WHERE event = 'start') d
            GROUP BY task_id
        ), claims AS (
            SELECT task_id, count(*) AS n FROM taskrunner.task_history
            WHERE to_status = 'running' GROUP BY task_id
        )
        SELECT c.task_id, c.n AS claims, coalesce(s.n, 0) AS starts,
               coalesce(s.expired, 0) AS expired, coalesce(s.only_newest_live, true) AS ok
        FROM claims c LEFT JOIN starts s USING (task_id)
        """
    ).fetchall()
    bad = [r for r in rows if r["claims"] != r["starts"] or not r["ok"]]
    assert not bad, f"start webhooks doubled without a crash in between: {bad[:5]}"
    twice = conn.execute(
        """
        SELECT delivery_id, count(*) AS n FROM taskrunner.delivery_attempt
        WHERE error IS NULL GROUP BY delivery_id HAVING count(*) > 1 LIMIT 5
        """
    ).fetchall()
    assert not twice, f"deliveries that succeeded more than once: {twice}"
    return {"claims": sum(r["claims"] for r in rows), "restarts": sum(r["expired"] for r in rows)}


def assert_deliveries_settled(
    conn: psycopg.Connection, received: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Nothing lost in the outbox: no delivery is left queued or in flight; every ended
    task has one delivery per webhook its end fires; every delivered or failed delivery
    has its attempts recorded as 1..attempts, the last one matching its status. With
    ``received`` (requests the target saw, per Idempotency-Key), every request that
    reached the target is recorded as an attempt. Returns counts for the report."""
    open_ = conn.execute(
        "SELECT id, event::text, status::text FROM taskrunner.delivery"
        " WHERE status IN ('queued', 'in_flight') LIMIT 5"
    ).fetchall()
    assert not open_, f"deliveries never finished: {open_}"
    missing = conn.execute(
        """
        SELECT t.id, t.status::text, a.event::text FROM taskrunner.task t
        JOIN taskrunner.action a ON a.task_id = t.id
         AND a.event::text = CASE t.status WHEN 'success' THEN 'success'
                                           WHEN 'failure' THEN 'failure' END
        WHERE NOT EXISTS (SELECT 1 FROM taskrunner.delivery d WHERE d.action_id = a.id)
        LIMIT 5
        """
    ).fetchall()
    assert not missing, f"end webhooks never queued: {missing}"
    doubled = conn.execute(
        "SELECT action_id, count(*) AS n FROM taskrunner.delivery WHERE event <> 'start'"
        " GROUP BY action_id HAVING count(*) > 1 LIMIT 5"
    ).fetchall()
    assert not doubled, f"end/cancel webhooks queued twice: {doubled}"
    unrecorded = conn.execute(
        """
        SELECT d.id, d.status::text, d.attempts, count(a.*) AS recorded,
               max(a.attempt) AS last, bool_or(a.attempt = d.attempts AND a.error IS NULL) AS ok
        FROM taskrunner.delivery d
        LEFT JOIN taskrunner.delivery_attempt a ON a.delivery_id = d.id
        WHERE d.status IN ('delivered', 'failed')
        GROUP BY d.id
        HAVING count(a.*) <> d.attempts OR d.attempts < 1 OR max(a.attempt) <> d.attempts
            OR (d.status = 'delivered') IS DISTINCT FROM bool_or(a.attempt = d.attempts
                                                                AND a.error IS NULL)
        LIMIT 5
        """
    ).fetchall()
    assert not unrecorded, f"deliveries whose attempts are not all recorded: {unrecorded}"
    recorded = {
        str(r["delivery_id"]): r["n"]
        for r in conn.execute(
            "SELECT delivery_id, count(*) AS n FROM taskrunner.delivery_attempt GROUP BY 1"
        ).fetchall()
    }
    if received is not None:
        unseen = {k: n for k, n in received.items() if k and n > recorded.get(k, 0)}
        assert not unseen, f"requests the target saw but no attempt records: {unseen}"
    counts = conn.execute(
        """
        SELECT count(*) AS deliveries,
               count(*) FILTER (WHERE status = 'delivered') AS delivered,
               count(*) FILTER (WHERE status = 'failed') AS failed,
               (SELECT count(*) FROM taskrunner.delivery_attempt) AS attempts
        FROM taskrunner.delivery
        """
    ).fetchone()
    return dict(counts)


def assert_counters(conn: psycopg.Connection, expected: Mapping[str, tuple[int, int]]) -> int:
    """Each task's ``success``/``failures`` equal the sums the clients sent (PATCH + PUT).
    Returns the total increments checked."""
    rows = conn.execute("SELECT id::text, success, failures FROM taskrunner.task").fetchall()
    actual = {r["id"]: (r["success"], r["failures"]) for r in rows}
    wrong = {t: (actual.get(t), e) for t, e in expected.items() if actual.get(t) != tuple(e)}
    assert not wrong, (
        f"{len(wrong)} counters off (actual, expected), e.g. {list(wrong.items())[:5]}"
    )
    return sum(s + f for s, f in expected.values())


def assert_capacity_respected(conn: psycopg.Connection, kind: str, field: str, limit: int) -> int:
    """A Capacity rule on ``kind`` by metadata ``field``, from task_history: when each task
    started, the expected counts of the tasks of its key then running summed below
    ``limit``. For scenarios whose counters move only at a task's end (so the remaining
    work of a running task is its expected count). Returns the highest such sum."""
    rows = conn.execute(
        """
        WITH iv AS (
            SELECT h.task_id, t.metadata -> %s AS k, t.expected_count AS e, h.at AS s,
                   coalesce((SELECT min(n.at) FROM taskrunner.task_history n
                             WHERE n.task_id = h.task_id AND n.from_status = 'running'
                               AND n.id > h.id), 'infinity') AS f
            FROM taskrunner.task_history h JOIN taskrunner.task t ON t.id = h.task_id
            WHERE h.to_status = 'running' AND t.kind = %s)
        SELECT a.task_id, a.k, coalesce(sum(b.e), 0) AS before
        FROM iv a LEFT JOIN iv b ON b.k = a.k AND b.task_id <> a.task_id
                                AND b.s < a.s AND b.f > a.s
        GROUP BY a.task_id, a.k
        """,
        (field, kind),
    ).fetchall()
    over = [r for r in rows if r["before"] >= limit]
    assert not over, f"capacity {limit} exceeded at a start: {over[:5]}"
    return max(r["before"] for r in rows)


def assert_rate_respected(conn: psycopg.Connection, kind: str, limit: int, window: int) -> int:
    """Every claim of ``kind`` (task_history) has its rate_start row, and no window of
    ``window`` seconds holds more than ``limit`` of a key's starts. Returns the most starts
    of a key seen in one window."""
    missing = conn.execute(
        """
        SELECT h.task_id FROM taskrunner.task_history h JOIN taskrunner.task t ON t.id = h.task_id
        WHERE h.to_status = 'running' AND t.kind = %s
        GROUP BY h.task_id
        HAVING count(*) <> (SELECT count(*) FROM taskrunner.rate_start s
                            WHERE s.task_id = h.task_id)
        """,
        (kind,),
    ).fetchall()
    assert not missing, f"starts not in the ledger: {missing[:5]}"
    over = conn.execute(
        """
        SELECT key, at, next_at FROM (
            SELECT key, at, lead(at, %s) OVER (PARTITION BY key ORDER BY at) AS next_at
            FROM taskrunner.rate_start
            WHERE task_id IN (SELECT id FROM taskrunner.task WHERE kind = %s)) s
        WHERE next_at - at < make_interval(secs => %s)
        """,
        (limit, kind, window),
    ).fetchall()
    assert not over, f"more than {limit} starts in {window}s: {over[:5]}"
    return conn.execute(
        """
        SELECT max(n) AS n FROM (
            SELECT count(*) OVER (PARTITION BY key ORDER BY at
                                  RANGE BETWEEN make_interval(secs => %s) PRECEDING
                                  AND CURRENT ROW) AS n
            FROM taskrunner.rate_start
            WHERE task_id IN (SELECT id FROM taskrunner.task WHERE kind = %s)) s
        """,
        (window * 0.999, kind),
    ).fetchone()["n"]
