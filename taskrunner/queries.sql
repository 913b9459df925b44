-- Named queries: every SQL statement the Python code runs. Each block starts with
-- "-- name: <name>"; parameters are named (%(name)s) and cast explicitly.
-- Most are one-line calls of functions defined in sql/migrations (see docs/sql.md).

-- name: create_batch
-- Create a validated, normalised batch atomically; returns created tasks in input order.
SELECT * FROM taskrunner.create_batch(%(tasks)s::jsonb, %(requester)s::text);

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
    %(failure_reason)s::text);

-- name: cancel_task
SELECT * FROM taskrunner.cancel_task(%(id)s::uuid);

-- name: pause_task
SELECT * FROM taskrunner.pause_task(%(id)s::uuid);

-- name: resume_task
SELECT * FROM taskrunner.resume_task(%(id)s::uuid);

-- name: add_counters
SELECT taskrunner.add_counters(%(updates)s::jsonb) AS updated;

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
-- Timeouts and expired leases; a lease that expired is an attempt (gives up at max_attempts).
SELECT taskrunner.tick(%(max_attempts)s::int) AS result;

-- name: take_stats
SELECT taskrunner.take_stats() AS stats;

-- name: ready
-- Readiness: the database answers and the newest migration is applied.
SELECT max(version) AS version FROM public.schema_migrations;

-- name: listen
-- The worker's wake-up channels (see "Notifications" in docs/sql.md).
LISTEN taskrunner_task; LISTEN taskrunner_delivery;
