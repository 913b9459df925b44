-- Named queries: every SQL statement the Python code runs. Each block starts with
-- "-- name: <name>"; parameters are named (%(name)s) and cast explicitly.
-- Most are one-line calls of functions defined in sql/migrations (see docs/sql.md).

-- name: create_batch
-- Create a validated, normalised batch atomically; returns created tasks in input order.
SELECT * FROM taskrunner.create_batch(%(tasks)s::jsonb, %(requester)s::text);

-- name: set_batch_trace
-- Before create_batch, in its transaction: the batch row it makes takes these as its
-- traceparent and tracestate (their column defaults read the settings).
SELECT set_config('taskrunner.traceparent', %(traceparent)s::text, true),
       set_config('taskrunner.tracestate', coalesce(%(tracestate)s::text, ''), true);

-- name: get_task
SELECT * FROM taskrunner.task WHERE id = %(id)s::uuid;

-- name: task_actions
SELECT * FROM taskrunner.action WHERE task_id = %(id)s::uuid ORDER BY id;

-- name: task_deliveries
SELECT * FROM taskrunner.delivery WHERE task_id = %(id)s::uuid ORDER BY created_at, id;

-- name: task_attempts
SELECT a.* FROM taskrunner.delivery_attempt a
JOIN taskrunner.delivery d ON d.id = a.delivery_id
WHERE d.task_id = %(id)s::uuid ORDER BY a.delivery_id, a.attempt;

-- name: task_dependencies
SELECT parent_id, requires_success FROM taskrunner.dependency
WHERE child_id = %(id)s::uuid ORDER BY parent_id;

-- name: list_tasks
-- Newest first; every filter is optional (NULL = no filter).
SELECT * FROM taskrunner.task
WHERE (%(status)s::taskrunner.task_status IS NULL OR status = %(status)s::taskrunner.task_status)
  AND (%(kind)s::text IS NULL OR kind = %(kind)s::text)
  AND (%(name)s::text IS NULL OR strpos(name, %(name)s::text) > 0)
  AND (%(batch_id)s::uuid IS NULL OR batch_id = %(batch_id)s::uuid)
  AND (%(metadata)s::jsonb IS NULL OR metadata @> %(metadata)s::jsonb)
ORDER BY seq DESC
LIMIT %(limit)s::int OFFSET %(offset)s::int;

-- name: update_task
SELECT * FROM taskrunner.update_task(%(id)s::uuid, %(status)s::taskrunner.task_status,
    %(new_success)s::bigint, %(new_failures)s::bigint, %(metadata)s::jsonb,
    %(failure_reason)s::text, %(retryable)s::boolean, %(expected_count)s::bigint,
    %(priority)s::int);

-- name: cancel_task
SELECT * FROM taskrunner.cancel_task(%(id)s::uuid);

-- name: pause_task
SELECT * FROM taskrunner.pause_task(%(id)s::uuid);

-- name: resume_task
SELECT * FROM taskrunner.resume_task(%(id)s::uuid);

-- name: rerun_task
-- The task, its cascade and its unstarted children: one row per task whose status changed.
SELECT * FROM taskrunner.rerun_task(%(id)s::uuid);

-- name: add_counters
SELECT taskrunner.add_counters(%(updates)s::jsonb) AS updated;

-- name: existing_tasks
-- Which of these ids are tasks (PUT /task checks ids it has not seen; primary-key probes).
SELECT id::text AS id FROM taskrunner.task WHERE id = ANY(%(ids)s::uuid[]);

-- name: set_dead_end_cancel
-- taskrunner migrate: DEAD_END_CANCEL into the settings row that the triggers read.
UPDATE taskrunner.settings SET dead_end_cancel = %(on)s::boolean;

-- name: claim_tasks
SELECT * FROM taskrunner.claim_tasks(%(worker)s::text, %(max)s::int, %(lease_seconds)s::int);

-- name: claim_deliveries
SELECT * FROM taskrunner.claim_deliveries(%(worker)s::text, %(max)s::int,
    %(lease_seconds)s::int);

-- name: finish_delivery
SELECT taskrunner.finish_delivery(%(delivery_id)s::uuid, %(worker)s::text, %(ok)s::boolean,
    %(status_code)s::int, %(error)s::text, %(retry_delay_ms)s::int,
    %(cancel_actions)s::jsonb, %(started_at)s::timestamptz) AS status;

-- name: finish_deliveries
-- Record many webhook attempts in one call (the worker batches the outcomes of a round).
SELECT * FROM taskrunner.finish_deliveries(%(worker)s::text, %(results)s::jsonb);

-- name: release_deliveries
SELECT taskrunner.release_deliveries(%(worker)s::text, %(ids)s::uuid[]) AS released;

-- name: retry_delivery
SELECT * FROM taskrunner.retry_delivery(%(delivery_id)s::uuid);

-- name: tick
-- Housekeeping: timeouts and expired leases (a lease that expired is an attempt: gives up
-- at max_attempts), then fold the batch count deltas, prune the rate-limit ledger and look
-- again at the dead-end candidates that a walk had to skip (dead-end cancellation on).
SELECT taskrunner.tick(%(max_attempts)s::int) AS result,
       taskrunner.fold_batch_deltas() AS batch_deltas_folded,
       taskrunner.prune_rate_starts() AS rate_starts_pruned,
       taskrunner.recheck_dead_ends() AS dead_ends_canceled;

-- name: next_wakeup
-- Seconds until the earliest scheduled task (delayed start, retry backoff) falls due, by
-- the database's clock (NULL: nothing scheduled; <= 0: due already).
SELECT extract(epoch FROM taskrunner.next_wakeup() - clock_timestamp())::float8 AS seconds;
-- name: purge_finished
-- Retention (RETENTION_DAYS): delete one chunk of the batches whose tasks all ended more
-- than older_than_seconds ago; every column NULL when another worker is purging.
SELECT * FROM taskrunner.purge_finished(
    make_interval(secs => %(older_than_seconds)s::float8), %(max_tasks)s::int);

-- name: take_stats
SELECT taskrunner.take_stats() AS stats;

-- name: ready
-- Readiness: the database answers and the newest migration is applied.
SELECT max(version) AS version FROM public.schema_migrations;

-- name: metrics_snapshot
-- GET /metrics reads these gauges at each scrape (taskrunner.metrics.database_families).
-- Bounded by the backlog, never by finished tasks: the counts are index-only scans of one
-- status (deliveries: their partial indexes); "ready" walks the admission groups as
-- claim_tasks does (one probe per group; _group_slots > 0: no rule holds the group back)
-- and takes the longest a group's head task has been pending (last_updated: its latest
-- transition). 120-180 ms at 100,000 pending tasks in 100 groups on a busy 2-core machine.
SELECT
    (SELECT count(*) FROM taskrunner.task WHERE status = 'waiting') AS waiting,
    (SELECT count(*) FROM taskrunner.task WHERE status = 'pending') AS pending,
    (SELECT count(*) FROM taskrunner.task WHERE status = 'running') AS running,
    (SELECT count(*) FROM taskrunner.task WHERE status = 'paused') AS paused,
    (SELECT coalesce(extract(epoch FROM now() - min(t.last_updated)), 0)::float8
     FROM taskrunner._claim_groups g JOIN taskrunner.task t ON t.seq = g.seq
     WHERE taskrunner._group_slots(g.kind, g.rules, g.metadata, g.expected_count) > 0)
       AS ready_oldest_seconds,
    (SELECT count(*) FROM taskrunner.delivery WHERE status = 'queued') AS deliveries_queued,
    (SELECT count(*) FROM taskrunner.delivery WHERE status = 'in_flight')
        AS deliveries_in_flight,
    (SELECT coalesce(extract(epoch FROM now() - min(next_attempt_at)), 0)::float8
     FROM taskrunner.delivery WHERE status = 'queued' AND next_attempt_at <= now())
        AS deliveries_due_oldest_seconds,
    -- each worker process holds one LISTEN connection, always direct (LISTEN_DATABASE_URL)
    (SELECT count(*) FROM pg_stat_activity
     WHERE datname = current_database() AND application_name = 'taskrunner-listen')
        AS workers_listening;

-- name: listen
-- The worker's wake-up channels (see "Notifications" in docs/sql.md).
LISTEN taskrunner_task; LISTEN taskrunner_delivery;

-- Batches (taskrunner/api/batches.py; the views and functions are in docs/sql.md).

-- name: list_batches
-- Newest first; every filter is optional (NULL = no filter). status: the batch has a task
-- in it (running counts claimed ones too); name: one of its tasks' names contains it.
SELECT * FROM taskrunner.batch_summary s
WHERE (%(kind)s::text IS NULL OR %(kind)s::text = ANY (s.kinds))
  AND (%(created_after)s::timestamptz IS NULL
       OR s.first_created_at >= %(created_after)s::timestamptz)
  AND (%(created_before)s::timestamptz IS NULL
       OR s.first_created_at < %(created_before)s::timestamptz)
  AND (%(status)s::text IS NULL OR CASE %(status)s::text
        WHEN 'waiting' THEN s.waiting WHEN 'pending' THEN s.pending
        WHEN 'claimed' THEN s.claimed WHEN 'running' THEN s.running + s.claimed
        WHEN 'success' THEN s.success WHEN 'failure' THEN s.failure
        WHEN 'paused' THEN s.paused WHEN 'canceled' THEN s.canceled END > 0)
  AND (%(name)s::text IS NULL OR EXISTS (
        SELECT 1 FROM taskrunner.task t
        WHERE t.batch_id = s.batch_id AND strpos(t.name, %(name)s::text) > 0))
ORDER BY s.first_seq DESC
LIMIT %(limit)s::int OFFSET %(offset)s::int;

-- name: get_batch
-- total_expected: summed over the batch's tasks (task_batch_idx), null when none has one.
SELECT s.*, (SELECT sum(t.expected_count)::bigint FROM taskrunner.task t
             WHERE t.batch_id = s.batch_id) AS total_expected
FROM taskrunner.batch_summary s WHERE s.batch_id = %(id)s::uuid;

-- name: stop_batch
SELECT * FROM taskrunner.stop_batch(%(id)s::uuid);

-- name: rerun_batch
SELECT * FROM taskrunner.rerun_batch(%(id)s::uuid);

-- name: set_batch_rules
SELECT taskrunner.set_batch_rules(%(id)s::uuid, %(kind)s::text, %(rules)s::jsonb)
    AS updated_count;

-- name: batch_tasks
-- The DAG's nodes: the fields of ArcRun's BasicTaskDto, in creation order.
SELECT id, name, kind, status, created_at, started_at, ended_at, success, failures,
       expected_count, batch_id, priority, dead_end_barrier
FROM taskrunner.task WHERE batch_id = %(id)s::uuid ORDER BY seq;

-- name: batch_links
SELECT parent_id, child_id, requires_success FROM taskrunner.batch_links
WHERE batch_id = %(id)s::uuid ORDER BY child_seq, parent_id;

-- name: task_history
SELECT at, from_status, to_status, reason, actor FROM taskrunner.task_history
WHERE task_id = %(id)s::uuid ORDER BY id;

-- name: why_not_running
SELECT taskrunner.why_not_running(%(id)s::uuid) AS why;

-- name: problem_deliveries
-- The webhook deliveries that gave up or are retrying after an error (delivery_problems),
-- gave-up ones first, then by attempts made.
SELECT p.id, p.task_id, t.name AS task_name, t.batch_id, p.event, p.status, p.attempts,
       p.next_attempt_at, p.last_status_code, p.last_error, p.url, p.verb
FROM taskrunner.delivery_problems p
JOIN taskrunner.task t ON t.id = p.task_id
WHERE %(batch_id)s::uuid IS NULL OR t.batch_id = %(batch_id)s::uuid
ORDER BY p.status = 'failed' DESC, p.attempts DESC, p.id
LIMIT %(limit)s::int;

-- name: stuck_tasks
-- Running tasks, those running longest first (running_tasks).
SELECT r.id, r.name, r.kind, r.batch_id, r.claimed_by, r.claimed_at, r.started_at,
       r.last_updated, r.timeout_at
FROM taskrunner.running_tasks r
WHERE %(batch_id)s::uuid IS NULL OR r.batch_id = %(batch_id)s::uuid
ORDER BY coalesce(r.started_at, r.claimed_at), r.id
LIMIT %(limit)s::int;
