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
from taskrunner.client.models import (
    BatchStats,
    Created,
    RerunResponse,
    StopBatchResponse,
    TaskDetail,
)

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


# -- commands: fetch a result, print it ----------------------------------------------------

Fetch = Callable[[Client, argparse.Namespace], Any]


def shown(fetch: Fetch, render: Callable[[Any, TextIO], None]) -> Callable[..., int]:
    """A command printing what ``fetch`` returns: as JSON with ``--json``, else through
    ``render`` (a table or a few lines)."""

    def run(client: Client, args: argparse.Namespace, out: TextIO) -> int:
        result = fetch(client, args)
        if args.json:
            dump(result, out)
        else:
            render(result, out)
        return 0

    return run


def _by_id(method: Callable[[Client, str], Any]) -> Fetch:
    """Fetch: ``method`` applied to the ``id`` argument."""
    return lambda client, args: method(client, args.id)


def _listed(method: Callable[..., Iterator[Any]], filters: tuple[str, ...]) -> Fetch:
    """Fetch: the first ``--limit`` items of ``method`` (an ``iter_*``) filtered by the
    arguments named ``filters``; only the pages needed are fetched."""

    def fetch(client: Client, args: argparse.Namespace) -> list[Any]:
        items = method(client, **{name: getattr(args, name) for name in filters})
        return list(islice(items, args.limit or None))  # --limit 0: all

    return fetch


def _tabled(headers: list[str], row: Callable[[Any], list[Any]]) -> Callable[[Any, TextIO], None]:
    """Render: one ``row`` of the table per item."""
    return lambda items, out: table(headers, [row(item) for item in items], out)


# -- task ---------------------------------------------------------------------------------


def _print_created(created: Created, out: TextIO) -> None:
    if not created.tasks:
        print("no task created: the dedupe strategy skipped every one", file=out)
        return
    print(f"batch {created.batch_id}: {len(created.tasks)} tasks", file=out)
    rows = [[t.local_id, t.id, t.kind, t.status] for t in created.tasks]
    table(["LOCAL ID", "ID", "KIND", "STATUS"], rows, out)


task_create = shown(
    lambda client, args: client.create_tasks(load_tasks(args.file), requester=args.requester),
    _print_created,
)


def _print_task(task: TaskDetail, out: TextIO) -> None:
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


task_get = shown(_by_id(Client.get_task), _print_task)

task_list = shown(
    _listed(Client.iter_tasks, ("status", "kind", "name", "batch_id", "metadata")),
    _tabled(
        ["ID", "NAME", "KIND", "STATUS", "SUCCESS", "FAILURES", "CREATED"],
        lambda t: [
            t.id,
            t.name,
            t.kind,
            t.status,
            t.success,
            t.failures,
            _short_time(t.created_at),
        ],
    ),
)


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


def _print_rerun(result: RerunResponse, out: TextIO) -> None:
    """One row per task whose status changed: why (rerun, downstream, waiting again)."""
    rows = [
        [role.replace("_", " "), t.id, f"{t.from_status} -> {t.status}"]
        for role in ("rerun", "downstream", "waiting_again")
        for t in getattr(result, role)
    ]
    table(["CHANGE", "TASK", "STATUS"], rows, out)


task_rerun = shown(_by_id(Client.rerun_task), _print_rerun)

task_history = shown(
    _by_id(Client.task_history),
    _tabled(
        ["AT", "FROM", "TO", "REASON", "ACTOR"],
        lambda t: [_short_time(t.at), t.from_, t.to, t.reason, t.actor],
    ),
)

delivery_retry = shown(
    _by_id(Client.retry_delivery),
    lambda d, out: print(f"{d.id}  {d.status}  next attempt {d.next_attempt_at}", file=out),
)


# -- batch --------------------------------------------------------------------------------

batch_list = shown(
    _listed(Client.iter_batches, ("status", "kind", "name", "created_after", "created_before")),
    _tabled(
        ["BATCH", "TASKS", "STATUS", "KINDS", "CREATED"],
        lambda b: [
            b.batch_id,
            b.total_tasks,
            counts_text(b.status_counts),
            ",".join(b.kinds),
            _short_time(b.first_created_at),
        ],
    ),
)


def _print_batch(stats: BatchStats, out: TextIO) -> None:
    print(f"batch {stats.batch_id}: {stats.total_tasks} tasks ({', '.join(stats.kinds)})", file=out)
    print(f"  {counts_text(stats.status_counts)}", file=out)
    print(f"  counters: success {stats.total_success}, failures {stats.total_failures}", file=out)
    print(f"  created {_short_time(stats.first_created_at)}, updated ", end="", file=out)
    print(_short_time(stats.latest_updated_at), file=out)


batch_get = shown(_by_id(Client.get_batch), _print_batch)


def _print_stopped(stopped: StopBatchResponse, out: TextIO) -> None:
    canceled = {
        name: getattr(stopped, f"canceled_{name}")
        for name in ("waiting", "pending", "claimed", "running", "paused")
    }
    parts = [f"{n} {name}" for name, n in canceled.items() if n]
    text = ", ".join(parts) or "nothing"
    print(
        f"batch {stopped.batch_id}: canceled {text}; already ended {stopped.already_terminal}",
        file=out,
    )


batch_stop = shown(_by_id(Client.stop_batch), _print_stopped)
batch_rerun = shown(_by_id(Client.rerun_batch), _print_rerun)


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
    *,
    takes_id: bool = False,
) -> argparse.ArgumentParser:
    """One action of a group; ``takes_id``: it acts on one object, the ``id`` argument."""
    parser = group.add_parser(
        name,
        parents=[_connection_options()],
        help=summary,
        description=summary,
        epilog=f"examples:\n{examples}\n\n" + _CONNECTION_HELP.format(extra=extra_exit),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(run=run)
    if takes_id:
        parser.add_argument("id")
    return parser


def _actions(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    """The ``ACTION`` sub-commands of a group (``task``, ``batch``, ``delivery``)."""
    return parser.add_subparsers(dest="action", metavar="ACTION", required=True)


def _limit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--limit", type=_non_negative, default=50, metavar="N", help="at most N (0: all; 50)"
    )


def add_task_commands(parser: argparse.ArgumentParser) -> None:
    group = _actions(parser)
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

    _leaf(group, "get", task_get, "show a task", "  taskrunner task get $TASK", takes_id=True)

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
    p.add_argument("--batch", dest="batch_id", metavar="BATCH_ID", help="one batch's tasks")
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

    _leaf(
        group,
        "rerun",
        task_rerun,
        "run a Failure/Canceled task again, with the tasks downstream that failed because of it",
        "  taskrunner task rerun $TASK",
        takes_id=True,
    )
    _leaf(
        group,
        "history",
        task_history,
        "a task's transitions",
        "  taskrunner task history $TASK",
        takes_id=True,
    )


def add_delivery_commands(parser: argparse.ArgumentParser) -> None:
    group = _actions(parser)
    _leaf(
        group,
        "retry",
        delivery_retry,
        "queue again a webhook delivery that gave up (Failed)",
        "  taskrunner delivery retry $DELIVERY   # ids: taskrunner task get $TASK --json",
        takes_id=True,
    )


def add_batch_commands(parser: argparse.ArgumentParser) -> None:
    group = _actions(parser)
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

    _leaf(
        group, "get", batch_get, "a batch's counts", "  taskrunner batch get $BATCH", takes_id=True
    )
    _leaf(
        group,
        "stop",
        batch_stop,
        "stop a batch: every unfinished task -> Canceled",
        "  taskrunner batch stop $BATCH",
        takes_id=True,
    )

    _leaf(
        group,
        "rerun",
        batch_rerun,
        "run every Failure/Canceled task of a batch again (one transaction)",
        "  taskrunner batch rerun $BATCH",
        takes_id=True,
    )

    p = _leaf(
        group,
        "watch",
        batch_watch,
        "follow a batch until it ends: exit 0 if every task succeeded, 1 if any "
        "failed or was canceled",
        "  taskrunner batch watch $BATCH\n"
        "  taskrunner batch watch $BATCH --timeout 600 || echo 'the batch did not succeed'",
        f", {WATCH_TIMEOUT_EXIT} --timeout expired",
        takes_id=True,
    )
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


def _group(
    name: str,
    add: Callable[[argparse.ArgumentParser], None],
    summary: str,
    text: str,
    examples: str,
) -> tuple:
    """One entry of ``cli.SUBCOMMANDS``: (name, run, add its actions, one-line help,
    description, epilog)."""
    epilog = _GROUP_EPILOG.format(name=name, url=DEFAULT_URL, examples=examples)
    return (name, run, add, summary, text, epilog)


COMMANDS = [
    _group(
        "task",
        add_task_commands,
        "create, show, list, cancel, pause, resume and rerun tasks (through the API)",
        "Tasks through the HTTP API: create a batch from a JSON/YAML file or stdin, get, "
        "list with filters, cancel, pause, resume, rerun, history.",
        "  taskrunner task create dag.json\n"
        "  taskrunner task list --status Failure --json\n"
        "  taskrunner task cancel $TASK",
    ),
    _group(
        "batch",
        add_batch_commands,
        "list, show, stop, rerun and watch batches (through the API)",
        "Batches through the HTTP API: list with filters, get counts, stop, rerun, and watch "
        "until the batch ends (exit 0 when every task succeeded, 1 when one failed or "
        "was canceled: usable in CI).",
        "  taskrunner batch watch $BATCH\n"
        "  taskrunner batch stop $BATCH\n"
        "  BATCH=$(taskrunner task create dag.json --json | "
        "python3 -c 'import json,sys; print(json.load(sys.stdin)[\"batch_id\"])')",
    ),
    _group(
        "delivery",
        add_delivery_commands,
        "retry a webhook delivery that gave up (through the API)",
        "Webhook deliveries through the HTTP API: queue again one that gave up.",
        "  taskrunner delivery retry $DELIVERY",
    ),
]
