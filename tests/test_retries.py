"""Webhook retries with real processes: start, end and cancel webhooks whose target
answers 503 a few times are retried (exponential backoff with jitter, same
Idempotency-Key) until they get through; each attempt is visible through GET /task/{id}
and in SQL; a delivery that exhausted WEBHOOK_MAX_ATTEMPTS is visible as Failed and can
be retried again with POST /delivery/{id}/retry and with taskrunner.retry_delivery().
"""

from __future__ import annotations

import threading
from collections import Counter

import httpx
import pytest
from invariants import assert_deliveries_settled, assert_history_consistent
from procs import Reply, Sink, hook, local_ids, service, wait_for

pytestmark = pytest.mark.slow

FAILS = 2  # 503s before a flaky target answers 200
MAX_ATTEMPTS = 4


def _attempts(detail_delivery: dict) -> list[tuple]:
    return [(a["attempt"], a["status_code"], a["error"]) for a in detail_delivery["attempts"]]


def test_start_end_and_cancel_webhooks_retry_then_exhaust_then_retry_by_api_and_sql(
    db_url, conn, tmp_path
):
    settings = {
        "WEBHOOK_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "WEBHOOK_BACKOFF_BASE": "0.05",
        "WEBHOOK_BACKOFF_MAX": "0.5",
    }
    seen: Counter = Counter()
    lock = threading.Lock()
    healthy = threading.Event()  # the always-failing target recovers (for the manual retries)
    cancel_action = hook("")  # filled in below with the sink's URL

    def respond(req: dict) -> Reply:
        key = req["headers"].get("idempotency-key")
        with lock:
            seen[key] += 1
            n = seen[key]
        if req["path"] == "/down-until-fixed":
            return Reply() if healthy.is_set() else Reply(status=503)
        if n <= FAILS:
            return Reply(status=503)
        if req["path"] == "/start-cancelable":
            return Reply(body=cancel_action, report=False)  # started; stays running
        return Reply()

    sink = Sink(respond=respond)
    cancel_action["params"]["url"] = f"{sink.url}/cancel"
    batch = [
        {
            "id": "flaky",
            "name": "flaky start and end",
            "kind": "retry",
            "on_start": hook(f"{sink.url}/start"),
            "on_success": [hook(f"{sink.url}/done")],
        },
        {
            "id": "cancel",
            "name": "flaky cancel",
            "kind": "retry",
            "on_start": hook(f"{sink.url}/start-cancelable"),
        },
        {
            "id": "exhausted-api",
            "name": "end webhook gives up, retried by the API",
            "kind": "retry",
            "on_start": hook(f"{sink.url}/start"),
            "on_success": [hook(f"{sink.url}/down-until-fixed")],
        },
        {
            "id": "exhausted-sql",
            "name": "end webhook gives up, retried in SQL",
            "kind": "retry",
            "on_start": hook(f"{sink.url}/start"),
            "on_success": [hook(f"{sink.url}/down-until-fixed")],
        },
    ]
    try:
        with service(db_url, tmp_path, **settings) as svc:
            base = svc.base
            ids = local_ids(svc.post(batch))

            def detail(local_id: str) -> dict:
                return httpx.get(f"{base}/task/{ids[local_id]}").json()

            def end_delivery(local_id: str) -> dict | None:
                (action,) = detail(local_id)["on_success"]
                return next(iter(action["deliveries"]), None)

            def delivered(deliveries: list[dict]) -> bool:
                return bool(deliveries) and deliveries[0]["status"] == "Delivered"

            # the cancelable task starts (third attempt), then we cancel it
            wait_for(
                # no delivery yet until a worker claimed the task
                lambda: delivered(detail("cancel")["on_start"]["deliveries"]),
                30,
                message="the cancelable task to start",
            )
            assert httpx.delete(f"{base}/task/{ids['cancel']}").status_code == 200

            wait_for(
                lambda: delivered(detail("flaky")["on_success"][0]["deliveries"]),
                30,
                message="the flaky on_success webhook",
            )
            wait_for(
                lambda: delivered(detail("cancel")["on_cancel"][0]["deliveries"]),
                30,
                message="the flaky cancel webhook",
            )
            for local_id in ("exhausted-api", "exhausted-sql"):
                wait_for(
                    lambda i=local_id: (end_delivery(i) or {}).get("status") == "Failed",
                    30,
                    message=f"{local_id}: the end webhook to give up",
                )
            flaky, cancel = detail("flaky"), detail("cancel")
            gave_up = {i: end_delivery(i) for i in ("exhausted-api", "exhausted-sql")}
            problems = conn.execute(
                "SELECT id::text, status::text, attempts, last_error"
                " FROM taskrunner.delivery_problems ORDER BY id"
            ).fetchall()

            # the target recovers; retry one delivery by the API, the other in SQL
            healthy.set()
            api_retry = httpx.post(f"{base}/delivery/{gave_up['exhausted-api']['id']}/retry")
            assert api_retry.status_code == 200, api_retry.text
            assert api_retry.json()["status"] == "Queued"
            conn.execute("SELECT taskrunner.retry_delivery(%s)", (gave_up["exhausted-sql"]["id"],))
            for local_id in ("exhausted-api", "exhausted-sql"):
                wait_for(
                    lambda i=local_id: end_delivery(i)["status"] == "Delivered",
                    30,
                    message=f"{local_id}: the retried webhook to get through",
                )
            retried = {i: end_delivery(i) for i in ("exhausted-api", "exhausted-sql")}
            again = httpx.post(f"{base}/delivery/{retried['exhausted-api']['id']}/retry")
    finally:
        sink.close()

    flaky_503s = [(n, 503, "HTTP 503") for n in range(1, FAILS + 1)]
    expected = flaky_503s + [(FAILS + 1, 200, None)]
    # GET /task/{id}: every attempt of the start, end and cancel deliveries, in order
    assert _attempts(flaky["on_start"]["deliveries"][0]) == expected
    assert _attempts(flaky["on_success"][0]["deliveries"][0]) == expected
    assert _attempts(cancel["on_start"]["deliveries"][0]) == expected
    assert _attempts(cancel["on_cancel"][0]["deliveries"][0]) == expected
    # each retry waited for the previous attempt to end (backoff, never overlapping)
    for d in (flaky["on_start"]["deliveries"][0], cancel["on_cancel"][0]["deliveries"][0]):
        pairs = zip(d["attempts"], d["attempts"][1:], strict=False)
        assert all(b["started_at"] >= a["finished_at"] for a, b in pairs)
    # the same Idempotency-Key on every attempt of a delivery
    assert sorted(seen.values()).count(FAILS + 1) >= 4
    # given up: visible as Failed with all its attempts, through the API and the SQL view
    for d in gave_up.values():
        assert d["status"] == "Failed" and d["attempt_count"] == MAX_ATTEMPTS
        assert _attempts(d) == [(n, 503, "HTTP 503") for n in range(1, MAX_ATTEMPTS + 1)]
    assert {(p["id"], p["status"]) for p in problems} == {
        (d["id"], "failed") for d in gave_up.values()
    }
    # retried: one more attempt, recorded after the ones that gave up
    for d in retried.values():
        assert _attempts(d)[-1] == (MAX_ATTEMPTS + 1, 200, None)
    assert again.status_code == 409  # only a delivery that gave up can be retried
    sql_attempts = conn.execute("SELECT count(*) AS n FROM taskrunner.delivery_attempt").fetchone()[
        "n"
    ]
    settled = assert_deliveries_settled(conn, sink.received())
    assert_history_consistent(conn)
    print(f"\nretries: {sql_attempts} attempts recorded, {settled}")
