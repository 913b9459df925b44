"""Promises of the SQL state machine under races and abuse (issue 13, items 1, 3-7).

Each test reproduces a defect that was seen on real PostgreSQL; races are forced with a
second connection holding a transaction open (a lock the other session must wait for),
never by timing luck. docs/reliability.md lists each promise with its test.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import psycopg
import pytest
from conftest import create_batch, status_of, task_spec, webhook
from falcon import testing
from invariants import assert_rule_respected
from psycopg.rows import dict_row

from taskrunner import db
from taskrunner.api.app import create_app
from taskrunner.api.counters import CounterBuffer
from taskrunner.config import Config
from taskrunner.db import QUERIES

# --- helpers -----------------------------------------------------------------------------


def claim(conn, worker="w1", n=100, lease=60):
    return conn.execute(
        "SELECT * FROM taskrunner.claim_tasks(%s, %s, %s)", (worker, n, lease)
    ).fetchall()


def report(conn, task_id, status=None, reason=None, metadata=None, new_success=None):
    """What PATCH /task/{id} runs."""
    return conn.execute(
        QUERIES["update_task"],
        {
            "id": task_id,
            "status": status,
            "new_success": new_success,
            "new_failures": None,
            "metadata": json.dumps(metadata) if metadata is not None else None,
            "failure_reason": reason,
            "retryable": None,
            "expected_count": None,
            "priority": None,
        },
    ).fetchone()


def delivery(conn, delivery_id):
    return conn.execute(
        "SELECT status::text, attempts, last_status_code, last_error"
        " FROM taskrunner.delivery WHERE id = %s",
        (delivery_id,),
    ).fetchone()


def attempt_errors(conn, delivery_id):
    rows = conn.execute(
        "SELECT attempt, status_code, error FROM taskrunner.delivery_attempt"
        " WHERE delivery_id = %s ORDER BY attempt",
        (delivery_id,),
    ).fetchall()
    return [(r["attempt"], r["status_code"], r["error"]) for r in rows]


def run_in_thread(db_url, sql, params):
    """Run one statement on its own autocommit connection in a thread; returns the thread,
    the backend pid (once connected) and a dict receiving the rows or the error."""
    out: dict = {}
    connected = threading.Event()

    def body():
        with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as c:
            out["pid"] = c.info.backend_pid
            connected.set()
            try:
                out["rows"] = c.execute(sql, params).fetchall()
            except psycopg.Error as exc:
                out["error"] = exc

    thread = threading.Thread(target=body)
    thread.start()
    assert connected.wait(10), "the second session did not connect"
    return thread, out


@contextlib.contextmanager
def api_client(db_url, config=None):
    """The Falcon app on its own pool (what gunicorn serves), through the test client."""
    pool = db.create_pool(db_url, max_size=2, timeout=5)
    pool.open(wait=True)
    counters = CounterBuffer(pool, interval=3600)
    try:
        yield testing.TestClient(create_app(config or Config(), pool, counters))
    finally:
        counters.close()
        pool.close()


def wait_blocked_or_done(conn, thread, pid, timeout=20.0):
    """Until the other session waits for a lock, or has finished (the unfixed code does not
    wait at all). Returns True when it is blocked."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not thread.is_alive():
            return False
        row = conn.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
        if row and row["wait_event_type"] == "Lock":
            return True
        time.sleep(0.02)
    raise AssertionError("the second session neither finished nor waited for a lock")


# --- 1. a new task linked to a parent that is ending concurrently --------------------------


def _child_specs(parent_id, via):
    if via == "uuid":
        return [task_spec("c", deps=[parent_id])]
    # a dedupe hit on the running parent: "c" depends on it through the skipped "dup"
    dup = task_spec("dup", dedupe=[{"kind": "k", "status": "running", "fields": []}])
    return [dup, task_spec("c", deps=["dup"])]


@pytest.mark.parametrize("via", ["uuid", "dedupe"])
@pytest.mark.parametrize(
    ("outcome", "reason", "child_status"),
    [("success", None, "pending"), ("failure", "boom", "failure")],
)
def test_child_linked_to_a_parent_ending_concurrently_is_not_stranded(
    conn, db_url, via, outcome, reason, child_status
):
    parent = create_batch(conn, [task_spec("p")])["p"]
    claim(conn)
    ender = psycopg.connect(db_url, row_factory=dict_row)  # session A: ends P, commits later
    try:
        report(ender, parent["id"], outcome, reason)  # P's row is now locked, not committed
        # session B links a new child to P while A's end is uncommitted
        thread, out = run_in_thread(
            db_url,
            "SELECT * FROM taskrunner.create_batch(%s::jsonb, 'b')",
            (json.dumps(_child_specs(str(parent["id"]), via)),),
        )
        wait_blocked_or_done(conn, thread, out["pid"])
        ender.commit()
    finally:
        ender.close()
    thread.join(20)
    assert "error" not in out, out.get("error")
    child = conn.execute(
        "SELECT status::text, deps_finished, failure_reason FROM taskrunner.task"
        " WHERE local_id = 'c'"
    ).fetchone()
    if child_status == "pending":
        assert child == {"status": "pending", "deps_finished": 1, "failure_reason": None}
    else:  # a failed required parent fails the child (which then counts nothing)
        assert child["status"] == "failure"
        assert child["failure_reason"] == f"dependency {parent['id']} failed"


# --- 3. an expired lease is an attempt -----------------------------------------------------


def test_expired_leases_count_as_attempts_and_the_delivery_gives_up(conn):
    t = create_batch(conn, [task_spec("a", actions=[webhook(), webhook("success")])])["a"]
    claim(conn)
    report(conn, t["id"], "success")
    seen = []
    for _ in range(3):  # a worker leases the on_success, then vanishes: lease of 0 s
        items = conn.execute("SELECT * FROM taskrunner.claim_deliveries('w1', 10, 0)").fetchall()
        seen += [i["attempt"] for i in items]
        conn.execute(QUERIES["tick"], {"max_attempts": 2})  # what the worker runs
    (d,) = conn.execute("SELECT id FROM taskrunner.delivery WHERE event = 'success'").fetchall()
    assert seen == [1, 2]
    assert delivery(conn, d["id"]) == {
        "status": "failed",
        "attempts": 2,
        "last_status_code": None,
        "last_error": "lease expired (worker gone?)",
    }
    assert attempt_errors(conn, d["id"]) == [
        (1, None, "lease expired (worker gone?)"),
        (2, None, "lease expired (worker gone?)"),
    ]
    # like any delivery that gave up: listed as a problem, and a retry starts a new round
    problem = conn.execute("SELECT status::text FROM taskrunner.delivery_problems").fetchone()
    assert problem == {"status": "failed"}
    conn.execute("SELECT taskrunner.retry_delivery(%s)", (d["id"],))
    again = conn.execute("SELECT * FROM taskrunner.claim_deliveries('w1', 10, 0)").fetchall()
    assert [i["attempt"] for i in again] == [1]


def test_tick_without_argument_gives_up_at_the_default_five_attempts(conn):
    t = create_batch(conn, [task_spec("a", actions=[webhook(), webhook("success")])])["a"]
    claim(conn)
    report(conn, t["id"], "success")
    for _ in range(6):
        conn.execute("SELECT * FROM taskrunner.claim_deliveries('w1', 10, 0)")
        conn.execute("SELECT taskrunner.tick()")
    row = conn.execute(
        "SELECT status::text, attempts FROM taskrunner.delivery WHERE event = 'success'"
    ).fetchone()
    assert row == {"status": "failed", "attempts": 5}


# --- 4. a start whose task left running is dropped -----------------------------------------

FINISH = "SELECT taskrunner.finish_delivery(%s, 'w1', %s, %s, %s, %s) AS s"


def _timed_out(conn, task_id):
    """Make the claimed task miss its heartbeat and let tick() fail it (reason Timeout)."""
    conn.execute(
        "UPDATE taskrunner.task SET last_updated = now() - interval '1 hour' WHERE id = %s",
        (task_id,),
    )
    conn.execute("SELECT taskrunner.tick()")
    assert status_of(conn, task_id) == "failure"


def _start_in_flight_then(conn, end):
    """A claimed task whose start is in flight ends ("canceled" or "timed out");
    returns the task, its start's work item and the status it ended in."""
    t = create_batch(conn, [task_spec("a")])["a"]
    (item,) = claim(conn)
    if end == "canceled":
        conn.execute("SELECT taskrunner.cancel_task(%s)", (t["id"],))
    else:
        _timed_out(conn, t["id"])
    return t, item, status_of(conn, t["id"])


@pytest.mark.parametrize("end", ["canceled", "timed out"])
def test_failed_start_of_a_task_no_longer_running_is_dropped_not_resent(conn, end):
    t, item, ended = _start_in_flight_then(conn, end)
    status = conn.execute(FINISH, (item["delivery_id"], False, 503, "HTTP 503", 0)).fetchone()
    assert status["s"] == "canceled"
    assert delivery(conn, item["delivery_id"]) == {
        "status": "canceled",
        "attempts": 1,
        "last_status_code": 503,
        "last_error": f"HTTP 503; dropped: task is {ended}",
    }
    assert attempt_errors(conn, item["delivery_id"]) == [(1, 503, "HTTP 503")]
    time.sleep(0.01)  # the retry would have been due
    assert conn.execute("SELECT * FROM taskrunner.claim_deliveries('w1', 10, 60)").fetchall() == []
    assert status_of(conn, t["id"]) == ended


@pytest.mark.parametrize("end", ["canceled", "timed out"])
def test_late_start_success_of_an_ended_task_is_recorded_as_dropped(conn, end):
    t, item, ended = _start_in_flight_then(conn, end)
    status = conn.execute(FINISH, (item["delivery_id"], True, 200, None, None)).fetchone()
    assert status["s"] == "canceled"
    assert delivery(conn, item["delivery_id"]) == {
        "status": "canceled",
        "attempts": 1,
        "last_status_code": 200,
        "last_error": f"dropped: task is {ended} (answered after the task ended)",
    }
    assert attempt_errors(conn, item["delivery_id"]) == [(1, 200, None)]  # what happened
    row = conn.execute(
        "SELECT status::text, started_at FROM taskrunner.task WHERE id = %s", (t["id"],)
    ).fetchone()
    assert row == {"status": ended, "started_at": None}


def test_failed_start_after_the_target_reported_is_not_resent(conn):
    """The target reported through its handle (so it has the start), then its answer to
    the start failed: re-sending would start it twice."""
    t = create_batch(conn, [task_spec("a")])["a"]
    (item,) = claim(conn)
    report(conn, t["id"], new_success=1)
    status = conn.execute(FINISH, (item["delivery_id"], False, None, "timeout", 0)).fetchone()
    assert status["s"] == "canceled"
    assert delivery(conn, item["delivery_id"])["last_error"] == (
        "timeout; dropped: the target already reported on the task"
    )
    assert conn.execute("SELECT * FROM taskrunner.claim_deliveries('w1', 10, 60)").fetchall() == []
    assert status_of(conn, t["id"]) == "running"


# --- 6. a report through the handle acknowledges the start -------------------------------


def _progress(conn, task_id, how):
    if how == "PATCH":
        report(conn, task_id, new_success=1)
    else:  # PUT /task, as the API's counter buffer flushes it
        conn.execute(
            QUERIES["add_counters"],
            {"updates": json.dumps([{"task_id": str(task_id), "new_success": 1}])},
        )


@pytest.mark.parametrize("how", ["PATCH", "PUT"])
def test_a_task_whose_target_reported_is_not_restarted_when_the_start_lease_expires(conn, how):
    t = create_batch(conn, [task_spec("a")])["a"]
    (item,) = claim(conn)
    _progress(conn, t["id"], how)  # the target got the start and reports progress
    conn.execute("UPDATE taskrunner.delivery SET lease_until = now() - interval '1 s'")
    result = conn.execute("SELECT taskrunner.tick() AS r").fetchone()["r"]
    assert result["expired_leases"] == 1  # the worker that sent the start is gone...
    assert status_of(conn, t["id"]) == "running"  # ...but the task keeps its run
    assert claim(conn, "w2") == []
    report(conn, t["id"], "success")  # the (only) run completes it
    runs = conn.execute(
        "SELECT count(*) AS n FROM taskrunner.task_history WHERE task_id = %s"
        " AND to_status = 'running'",
        (t["id"],),
    ).fetchone()
    assert runs["n"] == 1
    assert delivery(conn, item["delivery_id"])["status"] == "expired"
    # the worker that sent the start comes back late: its lease is gone, nothing changes
    late = conn.execute(FINISH, (item["delivery_id"], True, 200, None, None)).fetchone()
    assert late["s"] == "stale"
    assert status_of(conn, t["id"]) == "success"


# --- 5. a metadata change cannot move a task out of (or into) a rule's count --------------

TENANT_RULE = {"kind": "k", "status": "running", "fields": ["tenant"], "max": 2}


def test_rule_never_exceeded_when_patch_tries_to_change_a_rule_field(conn):
    """The issue's history: max 2 per tenant, A..D of t1; claim A; PATCH A to t2; claim;
    A's start released; claim again. A rule field cannot change while the task can still
    run, so A stays counted as t1 and no instant has 3 t1 tasks running."""
    specs = [task_spec(x, rules=[TENANT_RULE], metadata={"tenant": "t1"}) for x in "ABCD"]
    t = create_batch(conn, specs)
    (a,) = claim(conn, n=1)
    with pytest.raises(psycopg.Error) as err:
        report(conn, t["A"]["id"], metadata={"tenant": "t2"})
    assert err.value.sqlstate == "TR409"
    assert err.value.diag.message_detail.startswith("metadata.tenant: read by a concurrency rule")
    # other fields may change; the rule's own field may be sent unchanged
    report(conn, t["A"]["id"], metadata={"tenant": "t1", "note": "halfway"})
    claim(conn)  # B only: A and B fill the tenant's 2 slots
    conn.execute("SELECT taskrunner.release_deliveries('w1', %s::uuid[])", ([a["delivery_id"]],))
    claim(conn)
    claim(conn)
    peaks = assert_rule_respected(conn, "k", ["tenant"], 2)  # replayed from the history
    assert peaks == {("t1",): 2}
    running = conn.execute(
        "SELECT local_id FROM taskrunner.task WHERE status = 'running' ORDER BY local_id"
    ).fetchall()
    assert [r["local_id"] for r in running] == ["A", "B"]


def test_rule_fields_are_frozen_for_a_dba_update_too_until_the_task_ends(conn):
    t = create_batch(conn, [task_spec("a", rules=[TENANT_RULE], metadata={"tenant": "t1"})])
    task_id = t["a"]["id"]
    change = "UPDATE taskrunner.task SET metadata = %s::jsonb WHERE id = %s"
    for removed_or_changed in ({"tenant": "t2"}, {}):
        with pytest.raises(psycopg.Error) as err:
            conn.execute(change, (json.dumps(removed_or_changed), task_id))
        assert err.value.sqlstate == "TR409"
    conn.execute("SELECT taskrunner.cancel_task(%s)", (task_id,))
    conn.execute(change, (json.dumps({"tenant": "t2"}), task_id))  # ended: never runs again
    # a task without rules keeps its metadata free
    free = create_batch(conn, [task_spec("b", metadata={"tenant": "t1"})])["b"]
    conn.execute(change, (json.dumps({"tenant": "t2"}), free["id"]))


def test_patch_changing_a_rule_field_is_a_409_naming_the_field(conn, db_url):
    matcher = {"kind": "k", "status": "Running", "fields": ["tenant"]}
    rule = {"Concurency": {"matcher": matcher, "max_concurency": 2}}
    task = {
        "id": "a",
        "name": "a",
        "kind": "k",
        "metadata": {"tenant": "t1"},
        "rules": [rule],
        "on_start": {"kind": "Webhook", "params": {"url": "http://example.com/h", "verb": "Post"}},
    }
    with api_client(db_url) as client:
        created = client.simulate_post("/task", json=[task])
        assert created.status_code == 201, created.text
        task_id = created.json[0]["id"]
        claim(conn)
        result = client.simulate_patch(f"/task/{task_id}", json={"metadata": {"tenant": "t2"}})
        assert result.status_code == 409, result.text
        assert any(d.startswith("metadata.tenant: ") for d in result.json["details"])
        kept = {"tenant": "t1", "progress": "half"}
        result = client.simulate_patch(f"/task/{task_id}", json={"metadata": kept})
        assert result.status_code == 200, result.text


# --- 7. dedupe probes use an index; API statements have a timeout ------------------------

# The metadata probe of taskrunner._dedupe_match (keep in step with the migration).
DEDUPE_PROBE = """
        SELECT x.id, x.seq FROM taskrunner.task x
        WHERE x.metadata @> p_pattern AND x.kind = p_kind AND x.status = p_status
        ORDER BY x.seq DESC LIMIT 1
"""


def _existing_tasks(conn, n=20_000):
    specs = [task_spec(f"e{i}", metadata={"tenant": f"t{i}"}, actions=[]) for i in range(n)]
    create_batch(conn, specs)
    conn.execute("VACUUM ANALYZE taskrunner.task")


def _rows_read(conn):
    """Task rows this transaction read so far (sequential and index scans)."""
    row = conn.execute(
        "SELECT seq_tup_read + coalesce(idx_tup_fetch, 0) AS n FROM pg_stat_xact_user_tables"
        " WHERE relid = 'taskrunner.task'::regclass"
    ).fetchone()
    return row["n"] if row else 0


def test_dedupe_probes_read_only_matching_rows_not_the_table(conn):
    _existing_tasks(conn)
    misses = [{"kind": "k", "status": "pending", "fields": ["tenant"]}] * 2
    hit = {"kind": "k", "status": "pending", "fields": ["tenant"]}
    with conn.transaction():
        before = _rows_read(conn)
        new = create_batch(
            conn,
            [
                task_spec("new", metadata={"tenant": "nobody"}, dedupe=misses),
                task_spec("dup", metadata={"tenant": "t7"}, dedupe=[hit]),
                task_spec("child", deps=["dup"]),
            ],
        )
        read = _rows_read(conn) - before
    assert set(new) == {"new", "child"}  # "dup" found e7
    parent = conn.execute("SELECT parent_id FROM taskrunner.dependency").fetchone()
    assert status_of(conn, parent["parent_id"]) == "pending"
    assert read < 50, f"the dedupe probes read {read} task rows of 20,000"


def _plan_nodes(plan):
    yield plan
    for child in plan.get("Plans", []):
        yield from _plan_nodes(child)


@pytest.mark.parametrize("mode", ["force_custom_plan", "force_generic_plan"])
def test_dedupe_probe_plan_uses_the_metadata_index(conn, mode):
    """The probe's own text, planned under the function's own settings, both ways
    PL/pgSQL may plan it: a bitmap of the metadata GIN index, never a scan in seq order
    (which reads the whole table when nothing matches)."""
    _existing_tasks(conn)
    fn = conn.execute(
        "SELECT prosrc, proconfig FROM pg_proc WHERE proname = '_dedupe_match'"
    ).fetchone()
    assert fn is not None, "taskrunner._dedupe_match is missing"
    squash = lambda text: " ".join(text.split())  # noqa: E731
    assert squash(DEDUPE_PROBE) in squash(fn["prosrc"])
    with conn.transaction():
        for setting in fn["proconfig"] or []:
            name, value = setting.split("=", 1)
            conn.execute("SELECT set_config(%s, %s, true)", (name, value))
        conn.execute("SELECT set_config('plan_cache_mode', %s, true)", (mode,))
        query = DEDUPE_PROBE.replace("p_pattern", "$3").replace("p_kind", "$1")
        conn.execute(
            "PREPARE probe(text, taskrunner.task_status, jsonb) AS "
            + query.replace("p_status", "$2")
        )
        # a utility statement takes no bind parameters: the value goes in as a literal
        (row,) = conn.execute(
            "EXPLAIN (FORMAT JSON, ANALYZE, BUFFERS)"
            """ EXECUTE probe('k', 'pending', '{"tenant": "nobody"}')"""
        ).fetchall()
        conn.execute("DEALLOCATE probe")
    plan = row["QUERY PLAN"]
    plan = (json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"]
    nodes = list(_plan_nodes(plan))
    index_scans = [n.get("Index Name") for n in nodes if n["Node Type"] == "Bitmap Index Scan"]
    assert "task_metadata_idx" in index_scans, nodes
    assert not [n for n in nodes if n["Node Type"] in ("Seq Scan", "Index Scan")], nodes
    assert (
        sum(n.get("Shared Hit Blocks", 0) + n.get("Shared Read Blocks", 0) for n in nodes[:1]) < 20
    )


def test_api_statements_stop_at_statement_timeout_with_a_503(conn, db_url, monkeypatch):
    """A request cannot hold the database: the pool gunicorn serves (get_app) sets
    STATEMENT_TIMEOUT on its connections. Forced with a row lock held by a DBA session."""
    from taskrunner.api.app import get_app

    t = create_batch(conn, [task_spec("a")])["a"]
    claim(conn)
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("STATEMENT_TIMEOUT", "0.5")
    client = testing.TestClient(get_app())
    out = {}
    with psycopg.connect(db_url) as holder:
        holder.execute("SELECT 1 FROM taskrunner.task WHERE id = %s FOR UPDATE", (t["id"],))
        patch = threading.Thread(
            target=lambda: out.update(
                result=client.simulate_patch(f"/task/{t['id']}", json={"new_success": 1})
            )
        )
        patch.start()
        patch.join(20)
        stuck = patch.is_alive()
        holder.rollback()  # let an unfixed server finish
    patch.join(20)
    assert not stuck, "PATCH waited on the lock past STATEMENT_TIMEOUT"
    result = out["result"]
    assert result.status_code == 503, result.text
    assert result.json["error"] == "statement timeout (STATEMENT_TIMEOUT)"
    assert result.json["details"] == []
    again = client.simulate_patch(f"/task/{t['id']}", json={"new_success": 1})
    assert again.status_code == 200, again.text
