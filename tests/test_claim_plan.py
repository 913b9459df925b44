"""The claim's plan: admission groups are found through ``task_pending_claim_idx`` (a skip
scan, one probe per group), never by a sequential scan of pending tasks. The bench
(S4) measures the cost; this pins the plan that makes it flat."""

from __future__ import annotations

import json

from conftest import create_batch, task_spec

# claim_tasks walks the admission groups of this view (sql/migrations/*_admission.sql),
# so the plan checked here is the real one, not a copy of its text.
GROUP_QUERY = "SELECT * FROM taskrunner._claim_groups"


def _nodes(plan: dict):
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def test_the_group_query_is_the_one_in_claim_tasks(conn):
    source = conn.execute("SELECT prosrc FROM pg_proc WHERE proname = 'claim_tasks'").fetchone()[
        "prosrc"
    ]
    squash = lambda text: " ".join(text.split())  # noqa: E731
    assert squash(GROUP_QUERY) in squash(source)


def test_claim_groups_use_the_pending_claim_index(conn):
    rule = {"kind": "k", "status": "running", "fields": ["g"], "max": 1}
    specs = [task_spec(f"t{i}", metadata={"g": i % 50}, rules=[rule]) for i in range(5000)]
    create_batch(conn, specs)
    create_batch(conn, [task_spec(f"done{i}") for i in range(2000)])
    conn.execute("UPDATE taskrunner.task SET status = 'canceled' WHERE local_id LIKE 'done%'")
    conn.execute("ANALYZE taskrunner.task")

    (row,) = conn.execute("EXPLAIN (FORMAT JSON) " + GROUP_QUERY).fetchall()
    plan = row["QUERY PLAN"]
    plan = json.loads(plan) if isinstance(plan, str) else plan
    nodes = list(_nodes(plan[0]["Plan"]))
    on_task = [n for n in nodes if n.get("Relation Name") == "task"]
    assert on_task, "the plan reads no task rows?"
    assert all(n["Node Type"] != "Seq Scan" for n in on_task), json.dumps(plan, indent=1)
    assert {n.get("Index Name") for n in on_task} == {"task_pending_claim_idx"}
