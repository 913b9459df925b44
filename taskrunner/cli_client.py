"""The ``task``, ``batch`` and ``delivery`` groups of the ``taskrunner`` command: the API
from a shell or a CI script, through ``taskrunner.client``.

``cli.py`` registers ``COMMANDS`` in its ``SUBCOMMANDS`` table. Every command takes
``--url`` (default ``$TASKRUNNER_URL``, else http://127.0.0.1:8085), ``--token`` (default
``$API_TOKEN``) and ``--json`` (machine-readable output instead of tables). Exit status: 0
done, 1 the server refused or could not be reached (its error and details on stderr) or,
for ``batch watch``, a task failed or was canceled, 2 bad usage, 124 ``watch --timeout``
expired.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

from taskrunner import vocabulary as vocab
from taskrunner.client import Client, StatusCounts, TaskrunnerError
from taskrunner.client.core import DEFAULT_URL

WATCH_TIMEOUT_EXIT = 124  # as timeout(1)


# -- output -------------------------------------------------------------------------------


def table(headers: list[str], rows: Iterable[list[Any]], out: TextIO) -> None:
    """Columns aligned to their widest cell; None shows as ``-``."""
    cells = [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    for row in [headers, *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def dump(value: Any, out: TextIO) -> None:
    """``value`` (a model, a list of them, or plain data) as indented JSON."""
    print(json.dumps(_plain(value), indent=2), file=out)


def _plain(value: Any) -> Any:
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _short_time(value: str | None) -> str | None:
    """``2026-11-27T10:01:02.123456+00:00`` -> ``2026-11-27 10:01:02``."""
    return value[:19].replace("T", " ") if value else value


def counts_text(counts: StatusCounts) -> str:
    """``success 3  running 1``: the non-zero counts, in the API's status order."""
    parts = [f"{name} {getattr(counts, name)}" for name in _COUNT_ORDER if getattr(counts, name)]
    return "  ".join(parts) or "no tasks"


_COUNT_ORDER = ("success", "failure", "canceled", "running", "claimed", "pending", "waiting")
_COUNT_ORDER = (*_COUNT_ORDER, "paused")


# -- reading input ------------------------------------------------------------------------


class InputError(Exception):
    """The tasks file cannot be read or parsed."""


def load_tasks(source: str) -> Any:
    """The tasks in a JSON or YAML file (``-``: stdin). YAML needs PyYAML, which is not a
    dependency: it is used when installed (``pip install pyyaml``)."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        raise InputError(f"{source}: {exc.strerror}") from exc
    try:
        return json.loads(text)
    except ValueError as json_error:
        if source.endswith((".yaml", ".yml")) or source == "-":
            return _load_yaml(source, text, json_error)
        raise InputError(f"{source}: not JSON: {json_error}") from json_error


def _load_yaml(source: str, text: str, json_error: ValueError) -> Any:
    try:
        import yaml
    except ImportError:
        raise InputError(
            f"{source}: not JSON ({json_error}); YAML needs PyYAML: pip install pyyaml"
        ) from json_error
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"{source}: neither JSON nor YAML: {exc}") from exc


# -- task ---------------------------------------------------------------------------------


def task_create(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    created = client.create_tasks(load_tasks(args.file), requester=args.requester)
    if args.json:
        dump({"batch_id": created.batch_id, "tasks": _plain(created.tasks)}, out)
        return 0
    if not created.tasks:
        print("no task created: the dedupe strategy skipped every one", file=out)
        return 0
    print(f"batch {created.batch_id}: {len(created.tasks)} tasks", file=out)
    rows = [[t.local_id, t.id, t.kind, t.status] for t in created.tasks]
    table(["LOCAL ID", "ID", "KIND", "STATUS"], rows, out)
    return 0


def task_get(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    task = client.get_task(args.id)
    if args.json:
        dump(task, out)
        return 0
    fields = ["id", "name", "kind", "status", "status_reason", "failure_reason", "batch_id"]
    fields += ["local_id", "requester", "priority", "timeout", "success", "failures"]
    fields += ["created_at", "started_at", "ended_at", "last_updated"]
    for name in fields:
        value = getattr(task, name)
        if value is not None:
            print(f"{name + ':':16}{value}", file=out)
    print(f"{'metadata:':16}{json.dumps(task.metadata)}", file=out)
    for dep in task.dependencies:
        required = "requires success" if dep.requires_success else "any outcome"
        print(f"{'depends on:':16}{dep.id} ({required})", file=out)
    if task.why_not_running:
        why = task.why_not_running
        names = [f"{p.name} ({p.status})" for p in why.parents]
        print(f"{'not running:':16}{why.reason} {', '.join(names)}".rstrip(), file=out)
    for action in [task.on_start, *task.on_success, *task.on_failure, *task.on_cancel]:
        if action is not None:
            states = ", ".join(d.status for d in action.deliveries) or "not sent"
            line = f"{action.trigger} {action.params.verb} {action.params.url}: {states}"
            print(f"{'webhook:':16}{line}", file=out)
    return 0


def task_list(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    filters = {
        "status": args.status,
        "kind": args.kind,
        "name": args.name,
        "batch_id": args.batch,
        "metadata": args.metadata,
    }
    tasks = _limited(client.iter_tasks(**filters), args.limit)
    if args.json:
        dump(tasks, out)
        return 0
    rows = [
        [t.id, t.name, t.kind, t.status, t.success, t.failures, _short_time(t.created_at)]
        for t in tasks
    ]
    table(["ID", "NAME", "KIND", "STATUS", "SUCCESS", "FAILURES", "CREATED"], rows, out)
    return 0


def _limited(items: Iterator[Any], limit: int) -> list[Any]:
    """The first ``limit`` items (all of them for 0): only the pages needed are fetched."""
    return list(islice(items, limit or None))


def _each_task(action: Callable[[Client, str], Any]) -> Callable[..., int]:
    """A command applying ``action`` to each task id given: prints each outcome, goes on
    after an error, exits 1 if any failed."""

    def run(client: Client, args: argparse.Namespace, out: TextIO) -> int:
        code, done = 0, []
        for task_id in args.ids:
            try:
                done.append(action(client, task_id))
            except TaskrunnerError as exc:
                print(f"taskrunner: {exc}", file=sys.stderr)
                code = 1
        if args.json:
            dump(done, out)
        else:
            for task in done:
                print(f"{task.id}  {task.status}", file=out)
        return code

    return run


def task_history(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    history = client.task_history(args.id)
    if args.json:
        dump(history, out)
        return 0
    rows = [[_short_time(t.at), t.from_, t.to, t.reason, t.actor] for t in history]
    table(["AT", "FROM", "TO", "REASON", "ACTOR"], rows, out)
    return 0


def delivery_retry(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    delivery = client.retry_delivery(args.id)
    if args.json:
        dump(delivery, out)
    else:
        print(
            f"{delivery.id}  {delivery.status}  next attempt {delivery.next_attempt_at}", file=out
        )
    return 0


# -- batch --------------------------------------------------------------------------------


def batch_list(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    filters = {
        "status": args.status,
        "kind": args.kind,
        "name": args.name,
        "created_after": args.created_after,
        "created_before": args.created_before,
    }
    batches = _limited(client.iter_batches(**filters), args.limit)
    if args.json:
        dump(batches, out)
        return 0
    rows = [
        [
            b.batch_id,
            b.total_tasks,
            counts_text(b.status_counts),
            ",".join(b.kinds),
            _short_time(b.first_created_at),
        ]
        for b in batches
    ]
    table(["BATCH", "TASKS", "STATUS", "KINDS", "CREATED"], rows, out)
    return 0


def batch_get(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    stats = client.get_batch(args.id)
    if args.json:
        dump(stats, out)
        return 0
    print(f"batch {stats.batch_id}: {stats.total_tasks} tasks ({', '.join(stats.kinds)})", file=out)
    print(f"  {counts_text(stats.status_counts)}", file=out)
    print(f"  counters: success {stats.total_success}, failures {stats.total_failures}", file=out)
    print(f"  created {_short_time(stats.first_created_at)}, updated ", end="", file=out)
    print(_short_time(stats.latest_updated_at), file=out)
    return 0


def batch_stop(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    stopped = client.stop_batch(args.id)
    if args.json:
        dump(stopped, out)
        return 0
    canceled = {
        name: getattr(stopped, f"canceled_{name}")
        for name in ("waiting", "pending", "claimed", "running", "paused")
    }
    parts = [f"{n} {name}" for name, n in canceled.items() if n]
    text = ", ".join(parts) or "nothing"
    print(f"batch {stopped.batch_id}: canceled {text}; already ended {stopped.already_terminal}")
    return 0


class Progress:
    """The watch line of a batch: counts, rate (tasks ended per second since the watch
    began) and an estimate of the time left at that rate."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.first_done: int | None = None

    def measure(self, counts: StatusCounts) -> dict[str, Any]:
        total, done = counts.total, counts.total - counts.unfinished
        if self.first_done is None:
            self.first_done = done
        elapsed = time.monotonic() - self.started
        rate = (done - self.first_done) / elapsed if elapsed > 0 else 0.0
        left = counts.unfinished / rate if rate > 0 else None
        return {"done": done, "total": total, "rate": rate, "eta_seconds": left}

    @staticmethod
    def line(counts: StatusCounts, m: dict[str, Any], width: int = 24) -> str:
        filled = int(width * m["done"] / m["total"]) if m["total"] else width
        bar = "#" * filled + "-" * (width - filled)
        eta = "" if m["eta_seconds"] is None else f"  ~{_duration(m['eta_seconds'])} left"
        rate = f"  {m['rate']:.1f}/s" if m["rate"] else ""
        return f"[{bar}] {m['done']}/{m['total']}  {counts_text(counts)}{rate}{eta}"


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def batch_watch(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    """Poll the batch until no task is unfinished: 0 if all succeeded, 1 if any failed or
    was canceled; ``WATCH_TIMEOUT_EXIT`` after ``--timeout``. On a terminal the line is
    redrawn in place; otherwise a line is printed each time the counts change."""
    progress, last, tty = Progress(), None, out.isatty() and not args.json
    deadline = time.monotonic() + args.timeout if args.timeout else None
    while True:
        stats = client.get_batch(args.id)
        counts = stats.status_counts
        measured = progress.measure(counts)
        if args.json:
            print(
                json.dumps({"batch_id": stats.batch_id, **counts.to_json(), **measured}), file=out
            )
        else:
            line = progress.line(counts, measured)
            if tty:
                print(f"\r{line}\033[K", end="", file=out, flush=True)
            elif line != last:
                print(line, file=out, flush=True)
            last = line
        if counts.unfinished == 0:
            if tty:
                print(file=out)
            return 0 if counts.failure == 0 and counts.canceled == 0 else 1
        if deadline is not None and time.monotonic() >= deadline:
            if tty:
                print(file=out)
            print(
                f"taskrunner: batch {args.id} still running after {args.timeout:g}s",
                file=sys.stderr,
            )
            return WATCH_TIMEOUT_EXIT
        time.sleep(args.interval)


# -- argument parsing ---------------------------------------------------------------------

_CONNECTION_HELP = f"""\
connection: --url (default $TASKRUNNER_URL, else {DEFAULT_URL}) and --token (default
$API_TOKEN) name the server; --json prints JSON instead of tables.
exit status: 0 done, 1 refused by the server (its error and details on stderr) or out of
reach, 2 bad usage{{extra}}.
"""


def _connection_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--url", help="the API (default: $TASKRUNNER_URL or " + DEFAULT_URL + ")")
    options.add_argument("--token", help="bearer token (default: $API_TOKEN)")
    options.add_argument("--json", action="store_true", help="print JSON for scripts")
    return options


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _leaf(
    group: argparse._SubParsersAction,
    name: str,
    run: Callable[..., int],
    summary: str,
    examples: str,
    extra_exit: str = "",
) -> argparse.ArgumentParser:
    parser = group.add_parser(
        name,
        parents=[_connection_options()],
        help=summary,
        description=summary,
        epilog=f"examples:\n{examples}\n\n" + _CONNECTION_HELP.format(extra=extra_exit),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(run=run)
    return parser


def _limit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--limit", type=_non_negative, default=50, metavar="N", help="at most N (0: all; 50)"
    )


def add_task_commands(parser: argparse.ArgumentParser) -> None:
    group = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = _leaf(
        group,
        "create",
        task_create,
        "create a batch of tasks from a JSON (or YAML) file or stdin",
        "  taskrunner task create dag.json\n"
        "  cat dag.json | taskrunner task create --requester ci --json",
    )
    p.add_argument("file", nargs="?", default="-", help="the tasks (default: - for stdin)")
    p.add_argument("--requester", help="recorded on every task (X-Requester)")

    p = _leaf(group, "get", task_get, "show a task", "  taskrunner task get $TASK")
    p.add_argument("id")

    p = _leaf(
        group,
        "list",
        task_list,
        "list tasks, newest first",
        "  taskrunner task list --status Running --kind ingest\n"
        "  taskrunner task list --batch $BATCH --limit 0 --json\n"
        '  taskrunner task list --metadata \'{"tenant": "t1"}\'',
    )
    p.add_argument("--status", choices=vocab.STATUS_LABELS, type=str.capitalize)
    p.add_argument("--kind", help="exactly this kind")
    p.add_argument("--name", help="names containing this")
    p.add_argument("--batch", metavar="BATCH_ID", help="one batch's tasks")
    p.add_argument("--metadata", metavar="JSON", help="a JSON object the metadata contains")
    _limit(p)

    for name, method, summary in (
        ("cancel", Client.cancel_task, "cancel tasks (a Running task's cancel webhooks fire)"),
        ("pause", Client.pause_task, "pause Waiting/Pending tasks"),
        ("resume", Client.resume_task, "resume Paused tasks"),
    ):
        p = _leaf(
            group,
            name,
            _each_task(method),
            summary,
            f"  taskrunner task {name} $TASK\n  taskrunner task {name} $TASK1 $TASK2",
            ", also when one of several ids failed",
        )
        p.add_argument("ids", nargs="+", metavar="ID")

    p = _leaf(
        group,
        "history",
        task_history,
        "a task's transitions",
        "  taskrunner task history $TASK",
    )
    p.add_argument("id")


def add_delivery_commands(parser: argparse.ArgumentParser) -> None:
    group = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = _leaf(
        group,
        "retry",
        delivery_retry,
        "queue again a webhook delivery that gave up (Failed)",
        "  taskrunner delivery retry $DELIVERY   # ids: taskrunner task get $TASK --json",
    )
    p.add_argument("id")


def add_batch_commands(parser: argparse.ArgumentParser) -> None:
    group = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = _leaf(
        group,
        "list",
        batch_list,
        "list batches, newest first",
        "  taskrunner batch list --status Running\n"
        "  taskrunner batch list --kind ingest --created-after 2026-11-27T00:00:00Z",
    )
    p.add_argument("--status", choices=vocab.BATCH_STATUS_LABELS, type=str.capitalize)
    p.add_argument("--kind", help="batches with a task of this kind")
    p.add_argument("--name", help="batches with a task whose name contains this")
    p.add_argument("--created-after", metavar="TIME", help="ISO 8601")
    p.add_argument("--created-before", metavar="TIME", help="ISO 8601")
    _limit(p)

    p = _leaf(group, "get", batch_get, "a batch's counts", "  taskrunner batch get $BATCH")
    p.add_argument("id")
    p = _leaf(
        group,
        "stop",
        batch_stop,
        "stop a batch: every unfinished task -> Canceled",
        "  taskrunner batch stop $BATCH",
    )
    p.add_argument("id")

    p = _leaf(
        group,
        "watch",
        batch_watch,
        "follow a batch until it ends: exit 0 if every task succeeded, 1 if any "
        "failed or was canceled",
        "  taskrunner batch watch $BATCH\n"
        "  taskrunner batch watch $BATCH --timeout 600 || echo 'the batch did not succeed'",
        f", {WATCH_TIMEOUT_EXIT} --timeout expired",
    )
    p.add_argument("id")
    p.add_argument(
        "--interval", type=_positive_seconds, default=1.0, metavar="S", help="poll every S s (1)"
    )
    p.add_argument(
        "--timeout", type=_positive_seconds, metavar="S", help="give up after S s (exit 124)"
    )


def run(args: argparse.Namespace) -> int:
    """Run the chosen action with a client; the server's refusal is one line on stderr."""
    try:
        with Client(args.url, args.token) as client:
            return args.run(client, args, sys.stdout)
    except (TaskrunnerError, InputError) as exc:
        print(f"taskrunner: {exc}", file=sys.stderr)
        return 1


_GROUP_EPILOG = """\
examples:
{examples}

`taskrunner {name} ACTION --help` shows each action's options. The server is
$TASKRUNNER_URL (default {url}); the token $API_TOKEN."""

# (name, run, add its actions, one-line help, description, epilog): cli.SUBCOMMANDS' shape
COMMANDS = [
    (
        "task",
        run,
        add_task_commands,
        "create, show, list, cancel, pause and resume tasks (through the API)",
        "Tasks through the HTTP API: create a batch from a JSON/YAML file or stdin, get, "
        "list with filters, cancel, pause, resume, history.",
        _GROUP_EPILOG.format(
            name="task",
            url=DEFAULT_URL,
            examples="  taskrunner task create dag.json\n"
            "  taskrunner task list --status Failure --json\n"
            "  taskrunner task cancel $TASK",
        ),
    ),
    (
        "batch",
        run,
        add_batch_commands,
        "list, show, stop and watch batches (through the API)",
        "Batches through the HTTP API: list with filters, get counts, stop, and watch "
        "until the batch ends (exit 0 when every task succeeded, 1 when one failed or "
        "was canceled: usable in CI).",
        _GROUP_EPILOG.format(
            name="batch",
            url=DEFAULT_URL,
            examples="  taskrunner batch watch $BATCH\n"
            "  taskrunner batch stop $BATCH\n"
            "  BATCH=$(taskrunner task create dag.json --json | "
            "python3 -c 'import json,sys; print(json.load(sys.stdin)[\"batch_id\"])')",
        ),
    ),
    (
        "delivery",
        run,
        add_delivery_commands,
        "retry a webhook delivery that gave up (through the API)",
        "Webhook deliveries through the HTTP API: queue again one that gave up.",
        _GROUP_EPILOG.format(
            name="delivery", url=DEFAULT_URL, examples="  taskrunner delivery retry $DELIVERY"
        ),
    ),
]
