-- migrate:up

-- finish_deliveries: a start whose task is no longer running is dropped (delivery
-- 'canceled', the reason in last_error), never requeued or recorded as delivered
-- (issue 13, item 4).

CREATE OR REPLACE FUNCTION taskrunner.finish_deliveries(p_worker text, p_results jsonb)
RETURNS TABLE (delivery_id uuid, status text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_out jsonb;
    v_started jsonb;  -- starts that succeeded: [{task_id, cancel_actions}]
    v_failed jsonb;   -- starts that gave up: [{task_id, error}]
    v_queued int;
BEGIN
    -- Locks first, each in id order (as add_counters does), so concurrent callers cannot
    -- deadlock: the deliveries, then the tasks of starts, whose status decides what a
    -- start's outcome means. The statements below see those rows as locked.
    PERFORM 1 FROM taskrunner.delivery d
    WHERE d.id IN (SELECT (r ->> 'delivery_id')::uuid FROM jsonb_array_elements(p_results) r)
    ORDER BY d.id
    FOR NO KEY UPDATE;
    PERFORM 1 FROM taskrunner.task t
    WHERE t.id IN (SELECT d.task_id FROM taskrunner.delivery d
                   WHERE d.id IN (SELECT (r ->> 'delivery_id')::uuid
                                  FROM jsonb_array_elements(p_results) r)
                     AND d.event = 'start')
    ORDER BY t.id
    FOR NO KEY UPDATE;

    WITH input AS MATERIALIZED (
        SELECT DISTINCT ON (id) * FROM (
            SELECT (r ->> 'delivery_id')::uuid AS id,
                   coalesce((r ->> 'ok')::boolean, false) AS ok,
                   (r ->> 'status_code')::int AS status_code,
                   r ->> 'error' AS error,
                   (r ->> 'retry_delay_ms')::int AS retry_delay_ms,
                   nullif(r -> 'cancel_actions', 'null') AS cancel_actions,
                   (r ->> 'started_at')::timestamptz AS started_at,
                   ord
            FROM jsonb_array_elements(p_results) WITH ORDINALITY x(r, ord)) i
        ORDER BY id, ord
    ), locked AS MATERIALIZED (
        SELECT d.id, d.task_id, d.event, d.attempts, d.status, d.worker,
               t.status AS task_status, t.started_at
        FROM taskrunner.delivery d
        LEFT JOIN taskrunner.task t ON t.id = d.task_id AND d.event = 'start'
        WHERE d.id IN (SELECT id FROM input)
    ), outcome AS MATERIALIZED (
        -- 'stale': a delivery that is no longer in flight for us: the lease ran out and
        -- it moved on without us (tick() recorded our attempt as expired; another worker
        -- may own the current one), so nothing changes.
        -- 'canceled' (dropped): a start whose answer no longer matters. Its task left
        -- running (canceled, timed out) before a 2xx came back; or the attempt failed
        -- but the task ended, or its target already reported through the handle (it has
        -- the start). Re-sending it would start an ended task, or start it twice.
        SELECT i.*, l.task_id, l.event, l.attempts,
               CASE WHEN l.id IS NULL THEN 'unknown'
                    WHEN l.status <> 'in_flight' OR l.worker IS DISTINCT FROM p_worker THEN 'stale'
                    WHEN l.event = 'start' AND i.ok AND l.started_at IS NULL
                         AND l.task_status IN ('canceled', 'failure') THEN 'canceled'
                    WHEN l.event = 'start' AND NOT i.ok
                         AND (l.task_status <> 'running' OR l.started_at IS NOT NULL)
                         THEN 'canceled'
                    WHEN i.ok THEN 'delivered'
                    WHEN i.retry_delay_ms IS NOT NULL THEN 'queued'
                    ELSE 'failed' END AS result,
               CASE WHEN l.task_status <> 'running' AND i.ok
                        THEN format('dropped: task is %s (answered after the task ended)',
                                    l.task_status)
                    WHEN l.task_status <> 'running'
                        THEN format('%s; dropped: task is %s', coalesce(i.error, 'failed'),
                                    l.task_status)
                    ELSE format('%s; dropped: the target already reported on the task',
                                coalesce(i.error, 'failed')) END AS dropped_error
        FROM input i LEFT JOIN locked l ON l.id = i.id
    ), new_attempts AS (
        INSERT INTO taskrunner.delivery_attempt (delivery_id, attempt, worker, started_at,
                                                 status_code, error)
        SELECT o.id, o.attempts, p_worker, coalesce(o.started_at, now()), o.status_code,
               CASE WHEN o.ok THEN NULL ELSE coalesce(o.error, 'failed') END
        FROM outcome o WHERE o.result NOT IN ('unknown', 'stale')
    ), moved AS (
        UPDATE taskrunner.delivery d
        SET status = o.result::taskrunner.delivery_status,
            lease_until = NULL,
            last_status_code = o.status_code,
            last_error = CASE WHEN o.result = 'canceled' THEN o.dropped_error
                              WHEN o.ok THEN NULL ELSE coalesce(o.error, 'failed') END,
            next_attempt_at = CASE WHEN o.result = 'queued'
                                   THEN now() + make_interval(secs => o.retry_delay_ms / 1000.0)
                                   ELSE d.next_attempt_at END,
            finished_at = CASE WHEN o.result = 'queued' THEN NULL ELSE now() END
        FROM outcome o
        WHERE d.id = o.id AND o.result NOT IN ('unknown', 'stale')
    )
    SELECT jsonb_agg(jsonb_build_object('delivery_id', o.id, 'status', o.result) ORDER BY o.ord),
           jsonb_agg(jsonb_build_object('task_id', o.task_id, 'cancel_actions', o.cancel_actions))
               FILTER (WHERE o.event = 'start' AND o.ok
                              AND o.result IN ('delivered', 'canceled')),
           jsonb_agg(jsonb_build_object('task_id', o.task_id,
                                        'error', coalesce(o.error, 'failed')))
               FILTER (WHERE o.event = 'start' AND o.result = 'failed')
    INTO v_out, v_started, v_failed
    FROM outcome o;

    IF v_failed IS NOT NULL THEN
        -- a start that gave up fails its task (never overriding an end reached meanwhile)
        UPDATE taskrunner.task t
        SET status = 'failure', failure_reason = format('start webhook failed: %s', f ->> 'error')
        FROM jsonb_array_elements(v_failed) f
        WHERE t.id = (f ->> 'task_id')::uuid AND t.status = 'running' AND t.started_at IS NULL;
    END IF;

    IF v_started IS NOT NULL THEN
        -- Started. Register the cancel actions the targets answered with.
        INSERT INTO taskrunner.action (task_id, event, url, verb, body, headers)
        SELECT (s ->> 'task_id')::uuid, 'cancel', a ->> 'url',
               upper(a ->> 'verb'), a -> 'body', coalesce(a -> 'headers', '{}')
        FROM jsonb_array_elements(v_started) s
        CROSS JOIN LATERAL jsonb_array_elements(
            CASE WHEN jsonb_typeof(s -> 'cancel_actions') = 'array'
                 THEN s -> 'cancel_actions' ELSE '[]' END) a;

        UPDATE taskrunner.task t SET started_at = now(), last_updated = now()
        WHERE t.id IN (SELECT (s ->> 'task_id')::uuid FROM jsonb_array_elements(v_started) s)
          AND t.status = 'running' AND t.started_at IS NULL;

        -- canceled while the start was in flight: the target did start it, so tell it
        -- to cancel with the actions it just gave us
        INSERT INTO taskrunner.delivery (action_id, task_id, event)
        SELECT a.id, a.task_id, 'cancel'
        FROM taskrunner.action a
        JOIN taskrunner.task t ON t.id = a.task_id AND t.status = 'canceled'
        WHERE a.task_id IN (SELECT (s ->> 'task_id')::uuid FROM jsonb_array_elements(v_started) s
                            WHERE CASE WHEN jsonb_typeof(s -> 'cancel_actions') = 'array'
                                       THEN jsonb_array_length(s -> 'cancel_actions') > 0 END)
          AND a.event = 'cancel'
          AND NOT EXISTS (SELECT 1 FROM taskrunner.delivery x WHERE x.action_id = a.id);
        GET DIAGNOSTICS v_queued = ROW_COUNT;
        IF v_queued > 0 THEN
            PERFORM pg_notify('taskrunner_delivery', '');
        END IF;
    END IF;

    RETURN QUERY
    SELECT (o ->> 'delivery_id')::uuid, o ->> 'status'
    FROM jsonb_array_elements(coalesce(v_out, '[]')) o;
END $$;

COMMENT ON FUNCTION taskrunner.finish_deliveries(text, jsonb) IS
'Record the outcomes of webhook attempts, many in one call (see docs/sql.md). Each
element of p_results: {"delivery_id", "ok", "status_code", "error", "retry_delay_ms",
"cancel_actions", "started_at"}. Returns each delivery''s new status, ''stale'' when our
lease was lost, or ''unknown''. A start whose task is no longer running is dropped
(''canceled'', the reason in last_error): never requeued, never recorded as delivered. Set-based: a worker records a whole round of webhook
results with a few statements, so the per-statement trigger work is paid once.

Locks: deliveries, then the tasks of starts, each in id order (as add_counters does),
so concurrent callers cannot deadlock.';

-- migrate:down

CREATE OR REPLACE FUNCTION taskrunner.finish_deliveries(p_worker text, p_results jsonb)
RETURNS TABLE (delivery_id uuid, status text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_out jsonb;
    v_started jsonb;  -- starts that succeeded: [{task_id, cancel_actions}]
    v_failed jsonb;   -- starts that gave up: [{task_id, error}]
    v_queued int;
BEGIN
    WITH input AS MATERIALIZED (
        SELECT DISTINCT ON (id) * FROM (
            SELECT (r ->> 'delivery_id')::uuid AS id,
                   coalesce((r ->> 'ok')::boolean, false) AS ok,
                   (r ->> 'status_code')::int AS status_code,
                   r ->> 'error' AS error,
                   (r ->> 'retry_delay_ms')::int AS retry_delay_ms,
                   nullif(r -> 'cancel_actions', 'null') AS cancel_actions,
                   (r ->> 'started_at')::timestamptz AS started_at,
                   ord
            FROM jsonb_array_elements(p_results) WITH ORDINALITY x(r, ord)) i
        ORDER BY id, ord
    ), locked AS MATERIALIZED (
        SELECT d.id, d.task_id, d.event, d.attempts, d.status, d.worker
        FROM taskrunner.delivery d
        WHERE d.id IN (SELECT id FROM input)
        ORDER BY d.id
        FOR NO KEY UPDATE
    ), outcome AS MATERIALIZED (
        -- a delivery that is no longer in flight for us: the lease ran out and it moved
        -- on without us (tick() recorded our attempt as expired; another worker may own
        -- the current one), so nothing changes
        SELECT i.*, l.task_id, l.event, l.attempts,
               CASE WHEN l.id IS NULL THEN 'unknown'
                    WHEN l.status <> 'in_flight' OR l.worker IS DISTINCT FROM p_worker THEN 'stale'
                    WHEN i.ok THEN 'delivered'
                    WHEN i.retry_delay_ms IS NOT NULL THEN 'queued'
                    ELSE 'failed' END AS result
        FROM input i LEFT JOIN locked l ON l.id = i.id
    ), new_attempts AS (
        INSERT INTO taskrunner.delivery_attempt (delivery_id, attempt, worker, started_at,
                                                 status_code, error)
        SELECT o.id, o.attempts, p_worker, coalesce(o.started_at, now()), o.status_code,
               CASE WHEN o.ok THEN NULL ELSE coalesce(o.error, 'failed') END
        FROM outcome o WHERE o.result NOT IN ('unknown', 'stale')
    ), moved AS (
        UPDATE taskrunner.delivery d
        SET status = o.result::taskrunner.delivery_status,
            lease_until = NULL,
            last_status_code = o.status_code,
            last_error = CASE WHEN o.ok THEN NULL ELSE coalesce(o.error, 'failed') END,
            next_attempt_at = CASE WHEN o.result = 'queued'
                                   THEN now() + make_interval(secs => o.retry_delay_ms / 1000.0)
                                   ELSE d.next_attempt_at END,
            finished_at = CASE WHEN o.result = 'queued' THEN NULL ELSE now() END
        FROM outcome o
        WHERE d.id = o.id AND o.result NOT IN ('unknown', 'stale')
    )
    SELECT jsonb_agg(jsonb_build_object('delivery_id', o.id, 'status', o.result) ORDER BY o.ord),
           jsonb_agg(jsonb_build_object('task_id', o.task_id, 'cancel_actions', o.cancel_actions))
               FILTER (WHERE o.event = 'start' AND o.result = 'delivered'),
           jsonb_agg(jsonb_build_object('task_id', o.task_id,
                                        'error', coalesce(o.error, 'failed')))
               FILTER (WHERE o.event = 'start' AND o.result = 'failed')
    INTO v_out, v_started, v_failed
    FROM outcome o;

    IF v_started IS NOT NULL OR v_failed IS NOT NULL THEN
        PERFORM 1 FROM taskrunner.task
        WHERE id IN (SELECT (e ->> 'task_id')::uuid
                     FROM jsonb_array_elements(coalesce(v_started, '[]') || coalesce(v_failed, '[]')) e)
        ORDER BY id
        FOR NO KEY UPDATE;
    END IF;

    IF v_failed IS NOT NULL THEN
        -- a start that gave up fails its task (never overriding an end reached meanwhile)
        UPDATE taskrunner.task t
        SET status = 'failure', failure_reason = format('start webhook failed: %s', f ->> 'error')
        FROM jsonb_array_elements(v_failed) f
        WHERE t.id = (f ->> 'task_id')::uuid AND t.status = 'running' AND t.started_at IS NULL;
    END IF;

    IF v_started IS NOT NULL THEN
        -- Started. Register the cancel actions the targets answered with.
        INSERT INTO taskrunner.action (task_id, event, url, verb, body, headers)
        SELECT (s ->> 'task_id')::uuid, 'cancel', a ->> 'url',
               upper(a ->> 'verb'), a -> 'body', coalesce(a -> 'headers', '{}')
        FROM jsonb_array_elements(v_started) s
        CROSS JOIN LATERAL jsonb_array_elements(
            CASE WHEN jsonb_typeof(s -> 'cancel_actions') = 'array'
                 THEN s -> 'cancel_actions' ELSE '[]' END) a;

        UPDATE taskrunner.task t SET started_at = now(), last_updated = now()
        WHERE t.id IN (SELECT (s ->> 'task_id')::uuid FROM jsonb_array_elements(v_started) s)
          AND t.status = 'running' AND t.started_at IS NULL;

        -- canceled while the start was in flight: the target did start it, so tell it
        -- to cancel with the actions it just gave us
        INSERT INTO taskrunner.delivery (action_id, task_id, event)
        SELECT a.id, a.task_id, 'cancel'
        FROM taskrunner.action a
        JOIN taskrunner.task t ON t.id = a.task_id AND t.status = 'canceled'
        WHERE a.task_id IN (SELECT (s ->> 'task_id')::uuid FROM jsonb_array_elements(v_started) s
                            WHERE CASE WHEN jsonb_typeof(s -> 'cancel_actions') = 'array'
                                       THEN jsonb_array_length(s -> 'cancel_actions') > 0 END)
          AND a.event = 'cancel'
          AND NOT EXISTS (SELECT 1 FROM taskrunner.delivery x WHERE x.action_id = a.id);
        GET DIAGNOSTICS v_queued = ROW_COUNT;
        IF v_queued > 0 THEN
            PERFORM pg_notify('taskrunner_delivery', '');
        END IF;
    END IF;

    RETURN QUERY
    SELECT (o ->> 'delivery_id')::uuid, o ->> 'status'
    FROM jsonb_array_elements(coalesce(v_out, '[]')) o;
END $$;

COMMENT ON FUNCTION taskrunner.finish_deliveries(text, jsonb) IS
'Record the outcomes of webhook attempts, many in one call (see docs/sql.md). Each
element of p_results: {"delivery_id", "ok", "status_code", "error", "retry_delay_ms",
"cancel_actions", "started_at"}. Returns each delivery''s new status, ''stale'' when our
lease was lost, or ''unknown''. Set-based: a worker records a whole round of webhook
results with a few statements, so the per-statement trigger work is paid once.

Locks: deliveries, then the tasks of starts, each in id order (as add_counters does),
so concurrent callers cannot deadlock.';
