"""The ``task``, ``batch`` and ``delivery`` commands as subprocesses against a real API and
worker: create from a file and stdin, list/get/pause/resume/cancel, stop, and ``batch
watch``'s exit codes (0: every task succeeded, 1: one failed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from procs import TASKRUNNER, Sink, service

from taskrunner import cli

pytestmark = pytest.mark.slow


def tr(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TASKRUNNER, *args], input=stdin, capture_output=True, text=True, env=env, timeout=120
    )


def _env(base: str) -> dict[str, str]:
    env = dict(os.environ, TASKRUNNER_URL=base)
    env.pop("API_TOKEN", None)
    return env


def _complete_by_path(req: dict, sink: Sink) -> None:
    sink.complete(req, "Failure" if "/fail" in req["path"] else "Success")


def test_watch_exits_0_when_all_succeed_and_1_when_one_fails(db_url, tmp_path) -> None:
    sink = Sink()
    sink.on_start = lambda req: _complete_by_path(req, sink)
    try:
        with service(db_url, tmp_path, worker_processes=1) as svc:
            env = _env(svc.base)
            good = [
                {"id": "a", "name": "a", "kind": "ci", "on_start": _hook(sink, "/ok")},
                {
                    "id": "b",
                    "name": "b",
                    "kind": "ci",
                    "on_start": _hook(sink, "/ok"),
                    "dependencies": [{"id": "a"}],
                },
            ]
            path = tmp_path / "good.json"
            path.write_text(json.dumps(good))
            created = tr("task", "create", str(path), "--json", env=env)
            assert created.returncode == 0, created.stderr
            batch = json.loads(created.stdout)["batch_id"]

            watched = tr("batch", "watch", batch, "--interval", "0.2", env=env)
            assert watched.returncode == 0, watched.stdout + watched.stderr
            assert watched.stdout.splitlines()[-1].startswith("[########################] 2/2")
            assert "success 2" in watched.stdout.splitlines()[-1]

            url = f"{sink.url}/fail"
            bad = (
                "- id: x\n  name: x\n  kind: ci\n"
                f"  on_start: {{kind: Webhook, params: {{url: '{url}', verb: Post}}}}\n"
            )
            created = tr("task", "create", "--json", env=env, stdin=bad)
            assert created.returncode == 0, created.stderr  # YAML on stdin
            batch = json.loads(created.stdout)["batch_id"]
            watched = tr("batch", "watch", batch, "--interval", "0.2", "--json", env=env)
            assert watched.returncode == 1, watched.stdout + watched.stderr
            last = json.loads(watched.stdout.splitlines()[-1])
            assert (last["failure"], last["done"], last["total"]) == (1, 1, 1)
    finally:
        sink.close()


def _hook(sink: Sink, path: str) -> dict:
    return {"kind": "Webhook", "params": {"url": f"{sink.url}{path}", "verb": "Post"}}


def test_task_and_batch_commands(db_url, tmp_path) -> None:
    with service(db_url, tmp_path, worker_processes=0) as svc:
        env = _env(svc.base)
        tasks = [
            {"id": "p", "name": "parent", "kind": "k", "on_start": _hook_url("/s")},
            {
                "id": "c",
                "name": "child",
                "kind": "k",
                "on_start": _hook_url("/s"),
                "dependencies": [{"id": "p"}],
            },
        ]
        created = tr("task", "create", "--requester", "cli", env=env, stdin=json.dumps(tasks))
        assert created.returncode == 0, created.stderr
        lines = created.stdout.splitlines()
        assert lines[0].startswith("batch ") and lines[0].endswith(": 2 tasks")
        assert lines[1].split() == ["LOCAL", "ID", "ID", "KIND", "STATUS"]
        ids = {line.split()[0]: line.split()[1] for line in lines[2:]}
        batch = lines[0].split()[1].rstrip(":")

        listed = tr("task", "list", "--batch", batch, "--json", env=env)
        assert sorted(t["id"] for t in json.loads(listed.stdout)) == sorted(ids.values())
        table = tr("task", "list", "--kind", "k", "--status", "waiting", env=env)
        assert table.stdout.splitlines()[0].split()[:4] == ["ID", "NAME", "KIND", "STATUS"]
        assert [line.split()[0] for line in table.stdout.splitlines()[1:]] == [ids["c"]]

        got = tr("task", "get", ids["c"], env=env)
        assert f"depends on:     {ids['p']} (requires success)" in got.stdout
        assert "not running:    unfinished_parents parent (Pending)" in got.stdout

        paused = tr("task", "pause", ids["c"], ids["p"], env=env)
        assert paused.returncode == 0, paused.stderr
        assert paused.stdout.split() == [ids["c"], "Paused", ids["p"], "Paused"]
        assert tr("task", "resume", ids["p"], env=env).stdout.split() == [ids["p"], "Pending"]
        again = tr("task", "resume", ids["p"], str(uuid.uuid4()), env=env)
        assert again.returncode == 1
        assert "409 " in again.stderr and "status: task is Pending" in again.stderr
        assert "404 " in again.stderr
        assert tr("task", "cancel", ids["p"], env=env).stdout.split() == [ids["p"], "Canceled"]
        history = tr("task", "history", ids["p"], "--json", env=env)
        assert [t["to"] for t in json.loads(history.stdout)][-1] == "Canceled"

        batches = tr("batch", "list", "--kind", "k", env=env)
        assert batches.stdout.splitlines()[1].split()[:2] == [batch, "2"]
        stats = json.loads(tr("batch", "get", batch, "--json", env=env).stdout)
        # the child required the canceled parent's success: it failed with it
        assert (stats["status_counts"]["canceled"], stats["status_counts"]["failure"]) == (1, 1)
        stopped = tr("batch", "stop", batch, "--json", env=env)
        assert json.loads(stopped.stdout)["already_terminal"] == 2
        # the child failed because of p: rerunning it alone is refused; p's rerun takes it along
        refused = tr("task", "rerun", ids["c"], env=env)
        assert refused.returncode == 1 and f"dependencies: task {ids['p']}" in refused.stderr
        rerun = tr("task", "rerun", ids["p"], env=env)
        assert rerun.returncode == 0, rerun.stderr
        assert [line.split() for line in rerun.stdout.splitlines()] == [
            ["CHANGE", "TASK", "STATUS"],
            ["rerun", ids["p"], "Canceled", "->", "Pending"],
            ["downstream", ids["c"], "Failure", "->", "Waiting"],
        ]
        assert tr("task", "cancel", ids["p"], env=env).returncode == 0
        rerun = tr("batch", "rerun", batch, "--json", env=env)
        assert [t["id"] for t in json.loads(rerun.stdout)["rerun"]] == sorted(ids.values())

        missing = tr("delivery", "retry", str(uuid.uuid4()), env=env)
        assert missing.returncode == 1 and missing.stderr.startswith("taskrunner: POST ")
        unreadable = tr("task", "create", str(tmp_path / "nope.json"), env=env)
        assert unreadable.returncode == 1 and "nope.json" in unreadable.stderr
        invalid = tr("task", "create", env=env, stdin='[{"id": "x"}]')
        assert invalid.returncode == 1 and "[0].name" in invalid.stderr


def _hook_url(path: str) -> dict:
    return {"kind": "Webhook", "params": {"url": f"http://127.0.0.1:9{path}", "verb": "Post"}}


@pytest.mark.parametrize(
    "argv",
    [["task"], ["task", "create"], ["task", "list"], ["batch"], ["batch", "watch"], ["delivery"]],
)
def test_help_has_examples(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    out = capsys.readouterr().out

    assert exit_info.value.code == 0
    assert f"usage: taskrunner {' '.join(argv)}" in out
    assert "examples:\n  taskrunner " in out and "TASKRUNNER_URL" in out


def test_unreachable_server_is_one_line_and_exit_1() -> None:
    env = dict(os.environ, TASKRUNNER_URL="http://127.0.0.1:9")
    result = subprocess.run(
        [sys.executable, "-m", "taskrunner.cli", "batch", "list"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("taskrunner: GET /batches: ConnectError")
