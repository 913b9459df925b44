"""The peer queue: pgqueuer on the same PostgreSQL server, in the same run.

``pgbench -N`` swings 3x between runs here (fsync cost), so the engine (S3) and creation
(S5) are also compared with a real queue doing the least it can on the same server at the
same time: pgqueuer (https://pypi.org/project/pgqueuer/, the ``bench`` extra) draining and
enqueueing no-op jobs. Its tables live in the bench database's ``public`` schema; they are
installed for the measurement and uninstalled after it.

Like for like: the drain uses as many connections and the same batch size as S3's claims
(each connection is one ``QueueManager`` in drain mode, an async no-op entrypoint), and
the enqueue the same batch size and number of clients as S5's ``POST /task``.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

import psycopg

ENTRYPOINT = "noop"


def available() -> bool:
    try:
        import pgqueuer  # noqa: F401
    except ImportError:
        return False
    return True


def measure(
    db_url: str,
    *,
    drain_jobs: int,
    drain_connections: int,
    drain_batch: int,
    enqueue_batches: int,
    enqueue_batch: int,
    enqueue_clients: int,
) -> dict:
    """pgqueuer's enqueue and drain rates (jobs/s), each measured once."""

    async def both() -> dict:
        from pgqueuer import __version__

        async with _queries(db_url) as admin:
            await admin.install()
            try:
                enqueue = await _enqueue(db_url, enqueue_batches, enqueue_batch, enqueue_clients)
                await admin.clear_queue()
                drain = await _drain(db_url, admin, drain_jobs, drain_connections, drain_batch)
            finally:
                await admin.uninstall()
        return {"version": __version__, "enqueue": enqueue, "drain": drain}

    return asyncio.run(both())


@asynccontextmanager
async def _queries(db_url: str):
    from pgqueuer import PsycopgDriver, Queries

    conn = await psycopg.AsyncConnection.connect(db_url, autocommit=True)
    try:
        yield Queries(PsycopgDriver(conn))
    finally:
        await conn.close()


async def _enqueue(db_url: str, batches: int, batch: int, clients: int) -> dict:
    """``clients`` connections enqueue ``batches`` batches of ``batch`` jobs in all."""
    per_client = -(-batches // clients)

    async def client(c: int) -> int:
        done = 0
        async with _queries(db_url) as q:
            for _ in range(per_client):
                if c * per_client + done // batch >= batches:
                    break
                await q.enqueue([ENTRYPOINT] * batch, [None] * batch, [0] * batch)
                done += batch
        return done

    start = time.perf_counter()
    jobs = sum(await asyncio.gather(*(client(c) for c in range(clients))))
    elapsed = time.perf_counter() - start
    return {
        "jobs": jobs,
        "batch": batch,
        "clients": clients,
        "seconds": round(elapsed, 3),
        "jobs_per_s": round(jobs / elapsed, 1),
    }


async def _drain(db_url: str, admin, jobs: int, connections: int, batch: int) -> dict:
    """Enqueue ``jobs`` (untimed), then ``connections`` queue managers drain them."""
    from pgqueuer import QueueManager
    from pgqueuer.types import QueueExecutionMode

    for i in range(0, jobs, 5_000):
        n = min(5_000, jobs - i)
        await admin.enqueue([ENTRYPOINT] * n, [None] * n, [0] * n)
    await admin.driver.execute("ANALYZE pgqueuer")
    ran, last = 0, 0.0
    managers: list = []

    async def manager() -> None:
        async with _queries(db_url) as q:
            qm = QueueManager(q)
            managers.append(qm)

            @qm.entrypoint(ENTRYPOINT)
            async def noop(job) -> None:
                nonlocal ran, last
                ran += 1
                last = time.perf_counter()
                if ran == jobs:  # all done: no need to wait for drain mode's own exit
                    for m in managers:
                        m.shutdown.set()

            await qm.run(batch_size=batch, mode=QueueExecutionMode.drain)

    start = time.perf_counter()
    await asyncio.gather(*(manager() for _ in range(connections)))
    # to the last job run: the managers' exit (buffers flushed) is not part of the rate,
    # as S3's clock stops at its last claim
    elapsed = last - start
    left = await admin.queued_work([ENTRYPOINT])
    if ran != jobs or left:
        raise RuntimeError(f"pgqueuer drain: ran {ran} of {jobs} jobs, {left} left queued")
    return {
        "jobs": ran,
        "batch": batch,
        "connections": connections,
        "seconds": round(elapsed, 3),
        "jobs_per_s": round(ran / elapsed, 1),
    }
