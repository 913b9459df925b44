"""Child processes of one supervising process: start them, notice a death, stop them in order.

``taskrunner up`` and ``taskrunner worker --processes N`` run their children through a
``Supervisor``; the bench uses ``die_with_parent`` for the processes it starts, so a killed
bench leaves no orphans either.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from taskrunner import logs

_PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class ChildExited(Exception):
    """A supervised child exited on its own (the message names it and its exit code)."""


class Stop(Exception):
    """Raised in the main thread by SIGINT/SIGTERM/SIGHUP while supervising."""


def die_with_parent() -> None:
    """In a child, before exec: get SIGTERM if the parent dies (Linux only), so a killed
    supervisor leaves no orphaned API or workers holding the port."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _raise_stop(signum: int, _frame) -> None:
    raise Stop(signum)


def _note_repeat(signum: int, _frame) -> None:
    logs.say("taskrunner: still stopping, please wait", stream=sys.stderr, logger=__name__)


def _set_stop_handlers(handler: Callable) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)


class Supervisor:
    """Starts child processes, notices when one dies, and stops them all in order."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.children: list[tuple[str, subprocess.Popen]] = []

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        # Each child in its own process group: a terminal's Ctrl-C reaches only us, and we
        # stop the children with SIGTERM (a graceful shutdown for gunicorn and workers).
        proc = subprocess.Popen(argv, env=env, process_group=0, preexec_fn=die_with_parent)
        self.children.append((name, proc))
        return proc

    def dead_child(self) -> tuple[str, int] | None:
        for name, proc in self.children:
            code = proc.poll()
            if code is not None:
                return name, code
        return None

    def watch(self, until: Callable[[], bool] | None = None, interval: float = 0.2) -> None:
        """Return when ``until()`` is true; raise ChildExited as soon as a child exits."""
        while True:
            dead = self.dead_child()
            if dead:
                name, code = dead
                raise ChildExited(f"{name} exited unexpectedly (exit code {code})")
            if until is not None and until():
                return
            time.sleep(interval)

    def stop_all(self) -> None:
        """SIGTERM every child, wait up to ``grace`` seconds, then SIGKILL the rest."""
        for _, proc in self.children:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for name, proc in self.children:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logs.say(
                    f"taskrunner: {name} did not stop in time, killing it",
                    level=logging.WARNING,
                    stream=sys.stderr,
                    logger=__name__,
                    pid=proc.pid,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def run(self, start: Callable[[], None], errors: tuple[type[Exception], ...] = ()) -> int:
        """Run ``start`` then watch the children until a stop signal (exit 0), a child's
        death or one of ``errors`` raised by ``start`` (exit 1); then stop every child."""
        _set_stop_handlers(_raise_stop)
        code = 0
        try:
            start()
            self.watch()
        except Stop:
            logs.say("taskrunner: stopping", stream=sys.stderr, logger=__name__)
        except (ChildExited, *errors) as exc:
            logs.say(
                f"taskrunner: {exc}; stopping everything",
                level=logging.ERROR,
                stream=sys.stderr,
                logger=__name__,
            )
            code = 1
        finally:
            _set_stop_handlers(_note_repeat)
            self.stop_all()
        return code
