"""``taskrunner worker``: run one worker process until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import signal

from taskrunner import tracing
from taskrunner.config import Config
from taskrunner.worker.worker import Worker, default_worker_id


def run_worker(config: Config) -> None:
    """Run a worker (id ``hostname:pid``) until a signal; returns after a clean shutdown
    (its buffered spans exported, when spans are on)."""
    tracing.configure("taskrunner-worker")
    try:
        asyncio.run(_run(Worker(config, default_worker_id())))
    finally:
        tracing.shutdown()


async def _run(worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()
