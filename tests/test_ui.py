"""The web UI in a real browser: Debian's chromium driven by Playwright against a real API
(gunicorn), worker and webhook sink. Each view shows the tasks and states the database
holds, each action changes the database, the token prompt works, no console errors.

Skipped (with the reason) only when chromium or the playwright package is missing; CI
installs chromium (.ci/run). With ``UI_SCREENSHOTS=<dir>`` the tests also save a
screenshot of each view there (``bin/ui-screenshots`` writes docs/ui/).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import psycopg
import pytest
from procs import Reply, Sink, free_port, hook, running, service_env, wait_for, wait_healthy

from taskrunner.client import Client

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is missing")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK),
        reason="chromium is not installed (apt-get install -y chromium; .ci/run does it)",
    ),
]
SHOTS = os.environ.get("UI_SCREENSHOTS")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        # root in a container: chromium's sandbox needs user namespaces it may not get
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Ui:
    """A page on the UI that records console errors and uncaught exceptions."""

    def __init__(self, browser, base: str) -> None:
        self.base = base
        self.context = browser.new_context(viewport={"width": 1400, "height": 860})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("dialog", lambda d: self.errors.append(f"unexpected dialog {d.message}"))

    def open(self, fragment: str = "") -> None:
        self.page.goto(f"{self.base}/ui{fragment}")

    def confirm(self) -> None:
        self.page.locator("#confirm-yes").click()

    def shot(self, name: str) -> None:
        if SHOTS:
            Path(SHOTS).mkdir(parents=True, exist_ok=True)
            self.page.wait_for_timeout(300)  # let the canvas paint its frame
            self.page.screenshot(path=str(Path(SHOTS) / f"{name}.png"))

    def click_dag_node(self, task_id: str) -> None:
        pos = self.page.evaluate(f"window.taskrunnerUi.dag.screenPositionOf('{task_id}')")
        assert pos, f"task {task_id} is not drawn"
        self.page.mouse.click(pos["x"], pos["y"])


@pytest.fixture
def service(db_url, tmp_path) -> Iterator[dict]:
    """API + one worker + a sink: /start/* completes, /fail/* answers 500."""

    def complete_once_started(req: dict) -> None:
        # report the outcome only after the worker recorded the start (started_at), so the
        # timeline has every task's start: otherwise which one comes first is luck
        task_id = req["query"]["handle"][0].rsplit("/", 1)[1]
        with psycopg.connect(db_url) as c:
            started = "SELECT started_at FROM taskrunner.task WHERE id = %s"
            wait_for(lambda: c.execute(started, (task_id,)).fetchone()[0], 30, message="start")
        sink.complete(req)

    sink = Sink(
        on_start=complete_once_started,
        respond=lambda req: Reply(500) if req["path"].startswith("/fail") else Reply(),
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = service_env(
        db_url,
        port,
        tmp_path,
        API_PROCESSES="1",
        WEBHOOK_MAX_ATTEMPTS="2",
        WEBHOOK_BACKOFF_BASE="0.05",
    )
    with ExitStack() as stack:
        stack.callback(sink.close)
        stack.enter_context(running(["api"], env))
        worker = stack.enter_context(running(["worker", "--processes", "1"], env))
        wait_healthy(base)
        yield {"base": base, "sink": sink, "worker": worker}


@pytest.fixture
def api_only(db_url, tmp_path) -> Iterator[str]:
    """The API alone: no worker claims, so tasks stay where the test puts them."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = service_env(db_url, port, tmp_path, API_PROCESSES="1")
    with running(["api"], env):
        wait_healthy(base)
        yield base


@pytest.fixture
def ui(browser, request) -> Iterator[Ui]:
    base = request.getfixturevalue(request.param) if hasattr(request, "param") else None
    page = Ui(browser, base["base"] if isinstance(base, dict) else base)
    yield page
    if page.errors:  # shown with a failure: what the browser said
        print("browser errors:", *page.errors, sep="\n  ")
    page.context.close()


def _task(local_id: str, sink_url: str, deps=(), kind="etl", **extra) -> dict:
    return {
        "id": local_id,
        "name": local_id,
        "kind": kind,
        "on_start": hook(f"{sink_url}/start/{local_id}"),
        "dependencies": [{"id": d, "requires_success": True} for d in deps],
        **extra,
    }


def _post(base: str, tasks: list[dict], **headers: str) -> str:
    resp = httpx.post(f"{base}/task", json=tasks, headers=headers, timeout=60)
    assert resp.status_code == 201, resp.text
    return resp.headers["X-Batch-ID"]


def _statuses(conn, batch: str) -> dict[str, str]:
    rows = conn.execute(
        "SELECT name, status::text AS s FROM taskrunner.task WHERE batch_id = %s", (batch,)
    )
    return {r["name"]: r["s"].capitalize() for r in rows}


@pytest.mark.parametrize("ui", ["service"], indirect=True)
def test_views_show_the_database_and_retry_a_failed_delivery(ui, service, conn):
    base, sink = service["base"], service["sink"]
    dag = [
        _task("ingest-a", sink.url),
        _task("ingest-b", sink.url, metadata={"source": "b"}),
        _task("cluster", sink.url, ["ingest-a", "ingest-b"]),
        _task("report", sink.url, ["cluster"], on_success=[hook(f"{sink.url}/fail/report")]),
        {**_task("broken", sink.url), "on_start": hook(f"{sink.url}/fail/broken")},
    ]
    batch = _post(base, dag, **{"X-Requester": "ui-test"})
    failed_end = (
        "SELECT d.id, d.attempts FROM taskrunner.delivery d JOIN taskrunner.task t "
        "ON t.id = d.task_id WHERE t.name = 'report' AND d.event = 'success' "
        "AND d.status = 'failed'"
    )
    wait_for(lambda: conn.execute(failed_end).fetchone(), 60, message="report's end webhook")
    wait_for(lambda: _statuses(conn, batch)["broken"] == "Failure", 60, message="broken")
    statuses = _statuses(conn, batch)
    assert statuses == {
        "ingest-a": "Success",
        "ingest-b": "Success",
        "cluster": "Success",
        "report": "Success",
        "broken": "Failure",
    }
    page = ui.page

    # /view redirects to /ui
    ui.page.goto(f"{base}/view")
    assert page.url.endswith("/ui")

    # batch list: the batch, its counts per status
    row = page.locator(f"tr[data-batch-id='{batch}']")
    row.wait_for()
    assert row.locator("[data-status=Success]").inner_text() == "Success 4"
    assert row.locator("[data-status=Failure]").inner_text() == "Failure 1"
    ui.shot("batches")

    # filters: no batch has a paused task
    page.select_option("select[name=status]", "Paused")
    page.get_by_role("button", name="Filter").click()
    page.get_by_text("No batches").wait_for()
    assert "status=Paused" in page.url

    # DAG: every task drawn with its status; clicking one opens its panel
    ui.open(f"#/batch/{batch}/dag")
    nodes = page.locator(".dag-nodes li")
    nodes.first.wait_for(state="attached")
    drawn = {
        li.get_attribute("data-task-id"): li.get_attribute("data-status") for li in nodes.all()
    }
    ids = {
        r["name"]: str(r["id"])
        for r in conn.execute("SELECT id, name FROM taskrunner.task WHERE batch_id = %s", (batch,))
    }
    assert drawn == {ids[name]: s for name, s in statuses.items()}
    ui.shot("dag")
    ui.click_dag_node(ids["cluster"])
    title = page.locator("#panel h2.task-title")
    title.wait_for()
    assert title.inner_text().endswith("cluster")
    assert title.get_attribute("data-task-id") == ids["cluster"]
    panel = page.locator("#panel")
    deps = panel.locator("ul li a").all_inner_texts()
    assert sorted(deps) == ["ingest-a", "ingest-b"]
    history = panel.locator("table.history tbody tr")
    n_history = conn.execute(
        "SELECT count(*) AS n FROM taskrunner.task_history WHERE task_id = %s", (ids["cluster"],)
    ).fetchone()["n"]
    assert history.count() == n_history
    assert panel.locator(".delivery .badge").first.inner_text().endswith("Delivered")
    ui.shot("task-panel")

    # the report task's failed end webhook: every attempt listed, HTTP 500
    panel.locator("button.close").click()
    panel.wait_for(state="hidden")
    ui.click_dag_node(ids["report"])
    page.locator(f"#panel h2[data-task-id='{ids['report']}']").wait_for()
    failed = panel.locator(".delivery").filter(has_text="Failed")
    assert failed.locator("table.attempts tbody tr").count() == 2
    assert "500" in failed.inner_text()

    # table: sort by name, filter by status
    page.locator("[data-tab=table]").click()
    page.locator("table.tasks tbody tr").first.wait_for()
    page.locator("th[data-key=name]").click()
    names = page.locator("table.tasks tbody tr td:first-child").all_inner_texts()
    assert names == sorted(statuses)
    page.select_option("#table-status", "Failure")
    assert page.locator("table.tasks tbody tr td:first-child").all_inner_texts() == ["broken"]
    page.select_option("#table-status", "")
    ui.shot("table")

    # timeline: one bar per started task
    page.locator("[data-tab=timeline]").click()
    page.locator(".tl-row").first.wait_for()
    started = conn.execute(
        "SELECT count(*) AS n FROM taskrunner.task WHERE batch_id = %s AND started_at IS NOT NULL",
        (batch,),
    ).fetchone()["n"]
    assert started == 4  # all but broken, whose start webhook failed
    assert page.locator(".tl-row").count() == started
    ui.shot("timeline")

    # problems: the failed deliveries (also through taskrunner.client); retrying the end
    # one queues it again
    with Client(base) as client:
        found = client.list_problems(batch_id=batch)
    assert sorted(d.task_name for d in found.deliveries) == ["broken", "report"]
    ui.open("#/problems")
    problems = page.locator("table.problem-deliveries tbody tr")
    problems.first.wait_for()
    assert sorted(t.split("\t")[0] for t in problems.all_inner_texts()) == ["broken", "report"]
    ui.shot("problems")
    (delivery_id, attempts) = conn.execute(failed_end).fetchone().values()
    page.locator(f"tr[data-delivery-id='{delivery_id}'] button.retry").click()
    ui.confirm()
    made = "SELECT count(*) AS n FROM taskrunner.delivery_attempt WHERE delivery_id = %s"
    wait_for(
        lambda: conn.execute(made, (delivery_id,)).fetchone()["n"] > attempts,
        30,
        message="the retried delivery's new attempt",
    )
    assert ui.errors == []


def _blocked_batch(base: str) -> tuple[str, dict]:
    """a, c: Pending (no worker); b: Waiting on a; d: another kind."""
    url = "http://127.0.0.1:9/never"
    tasks = [_task("a", url), _task("b", url, ["a"]), _task("c", url), _task("d", url, kind="mail")]
    return _post(base, tasks), {}


@pytest.mark.parametrize("ui", ["api_only"], indirect=True)
def test_actions_change_the_database(ui, api_only, conn):
    base = api_only
    batch, _ = _blocked_batch(base)
    page = ui.page
    ids = {
        r["name"]: str(r["id"])
        for r in conn.execute("SELECT id, name FROM taskrunner.task WHERE batch_id = %s", (batch,))
    }

    def status(name: str) -> str:
        return _statuses(conn, batch)[name]

    ui.open(f"#/batch/{batch}/table?task={ids['a']}")
    # a change made elsewhere shows up by itself (the page polls the batch's fingerprint)
    badge = page.locator(f"tr[data-task-id='{ids['d']}'] .badge")
    assert badge.inner_text().endswith("Pending")
    assert httpx.patch(f"{base}/task/pause/{ids['d']}").status_code == 200
    page.locator(f"tr[data-task-id='{ids['d']}'] .badge", has_text="Paused").wait_for(
        timeout=10_000
    )
    page.locator("#task-pause").click()
    ui.confirm()
    wait_for(lambda: status("a") == "Paused", 10, message="a paused")
    page.locator("#task-resume").click()
    ui.confirm()
    wait_for(lambda: status("a") == "Pending", 10, message="a resumed")

    # why b is not running: its unfinished parent a
    page.locator(f"tr[data-task-id='{ids['b']}']").click()
    page.locator(f"#panel h2[data-task-id='{ids['b']}']").wait_for()
    assert re.search(r"Waiting for a \(Pending\)", page.locator("#panel .why").inner_text())

    # cancel c; declining the confirmation changes nothing
    page.locator(f"tr[data-task-id='{ids['c']}']").click()
    page.locator(f"#panel h2[data-task-id='{ids['c']}']").wait_for()
    page.locator("#task-cancel").click()
    page.locator("#confirm-no").click()
    time.sleep(0.5)
    assert status("c") == "Pending"
    page.locator("#task-cancel").click()
    ui.confirm()
    wait_for(lambda: status("c") == "Canceled", 10, message="c canceled")

    # edit rules of kind etl: the unfinished etl tasks get them, mail keeps none
    page.locator("#edit-rules").click()
    page.select_option("#rules-kind", "etl")
    matcher = {"kind": "etl", "status": "Running", "fields": []}
    rules = [{"Concurency": {"matcher": matcher, "max_concurency": 2}}]
    page.locator("#rules-text").fill(json.dumps(rules))
    ui.shot("rules-editor")
    page.locator("#rules-save").click()
    ui.confirm()
    rule_counts = (
        "SELECT name, jsonb_array_length(rules) AS n FROM taskrunner.task WHERE batch_id = %s"
    )
    wait_for(
        lambda: (
            {r["name"]: r["n"] for r in conn.execute(rule_counts, (batch,))}
            == {"a": 1, "b": 1, "c": 0, "d": 0}
        ),
        10,
        message="rules set",
    )
    page.get_by_text("Rules updated on 2 tasks").wait_for()

    # stop the batch: every unfinished task canceled
    page.locator("#stop-batch").click()
    ui.confirm()
    wait_for(lambda: set(_statuses(conn, batch).values()) == {"Canceled"}, 10, message="stopped")
    page.get_by_text("Batch stopped").wait_for()
    # the page refreshed by itself: no unfinished task left to stop
    page.locator("#stop-batch[disabled]").wait_for()

    # rerun c from its panel, then the rest of the batch from its head
    page.locator(f"tr[data-task-id='{ids['c']}']").click()
    page.locator(f"#panel h2[data-task-id='{ids['c']}']").wait_for()
    page.locator("#task-rerun").click()
    ui.confirm()
    wait_for(lambda: status("c") == "Pending", 10, message="c rerun")
    page.get_by_text("Rerun: 1 task(s) rerun").wait_for()
    page.locator("#rerun-batch").click()
    ui.confirm()
    expected = {"a": "Pending", "b": "Waiting", "c": "Pending", "d": "Pending"}
    wait_for(lambda: _statuses(conn, batch) == expected, 10, message="batch rerun")
    page.get_by_text("Rerun: 3 task(s) rerun").wait_for()
    page.locator("#rerun-batch[disabled]").wait_for()
    assert ui.errors == []


def test_token_is_asked_once_and_sent_as_bearer(browser, db_url, tmp_path, conn):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = service_env(db_url, port, tmp_path, API_PROCESSES="1", API_TOKEN="s3cret-token")
    with running(["api"], env):
        wait_healthy(base)
        batch = _post(
            base, [_task("t", "http://127.0.0.1:9/x")], Authorization="Bearer s3cret-token"
        )
        ui = Ui(browser, base)
        page = ui.page
        sent: list[str | None] = []
        page.on(
            "request", lambda r: "/batches" in r.url and sent.append(r.headers.get("authorization"))
        )
        ui.open()
        dialog = page.locator("#token-dialog")
        dialog.wait_for()
        ui.shot("token")
        page.locator("#token-input").fill("wrong")
        page.locator("#token-submit").click()
        page.get_by_text("That token was refused").wait_for()
        page.locator("#token-input").fill("s3cret-token")
        page.locator("#token-submit").click()
        page.locator(f"tr[data-batch-id='{batch}']").wait_for()
        # a reload keeps the token for the tab: no second prompt
        page.reload()
        page.locator(f"tr[data-batch-id='{batch}']").wait_for()
        assert not dialog.is_visible()
        assert "s3cret" not in page.url
        assert sent[-1] == "Bearer s3cret-token"
        # the only errors are the browser's notes on the two refused calls
        assert ui.errors and all("401" in e for e in ui.errors), ui.errors
        ui.context.close()


@pytest.mark.parametrize("ui", ["api_only"], indirect=True)
def test_ten_thousand_tasks_open(ui, api_only, conn):
    """10,000 tasks in 100 chains of 100: the DAG opens (aggregated); the time it took is
    printed for docs/performance.md (no timing assertion)."""
    url = "http://127.0.0.1:9/never"
    tasks = []
    for chain in range(100):
        for step in range(100):
            deps = [f"c{chain}s{step - 1}"] if step else []
            tasks.append(_task(f"c{chain}s{step}", url, deps, kind=f"k{chain % 4}"))
    batch = _post(api_only, tasks)
    page = ui.page
    started = time.monotonic()
    ui.open(f"#/batch/{batch}/dag")
    page.locator(".dag-nodes li").first.wait_for(state="attached")
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => r()))")
    took = time.monotonic() - started
    print(f"\n10,000-task batch: DAG drawn {took:.2f} s after navigation")
    groups = page.locator(".dag-nodes li")
    total = sum(int(re.search(r": (\d+) tasks", t).group(1)) for t in groups.all_inner_texts())
    assert total == 10_000
    ui.shot("dag-10000")
    # a group opens the list of its tasks
    first = conn.execute(
        "SELECT id FROM taskrunner.task WHERE batch_id = %s AND name = 'c0s0'", (batch,)
    ).fetchone()["id"]
    ui.click_dag_node(str(first))
    listed = page.locator("#panel tr[data-task-id]")
    listed.first.wait_for()
    assert page.locator(f"#panel tr[data-task-id='{first}']").count() == 1
    heading = page.locator("#panel h2").inner_text()
    assert heading.startswith("k0 · depth 0")
    group_size = re.search(r"(\d+) tasks", page.locator("#panel p").first.inner_text()).group(1)
    assert listed.count() == min(500, int(group_size))
    # the table shows the first rows and counts them all
    page.locator("[data-tab=table]").click()
    page.get_by_text("10000 tasks, first 500 shown").wait_for()
    assert ui.errors == []
