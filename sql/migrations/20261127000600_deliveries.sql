-- migrate:up

-- The outbox and deliveries: leasing queued webhook calls to workers, recording their
-- outcomes (retry, give up, a start acknowledged with cancel actions), handing leases back
-- and retrying a delivery by hand. Rows are queued by the transition triggers and by
-- claim_tasks (starts).

CREATE FUNCTION taskrunner.claim_deliveries(p_worker text, p_max int,
                                            p_lease_seconds int DEFAULT 60)
RETURNS SETOF taskrunner.work_item
LANGUAGE sql AS $$
    WITH picked AS (
        SELECT id FROM taskrunner.delivery
        WHERE status = 'queued' AND next_attempt_at <= now()
        ORDER BY next_attempt_at
        LIMIT greatest(p_max, 0)
        FOR NO KEY UPDATE SKIP LOCKED
    ), leased AS (
        UPDATE taskrunner.delivery d
        SET status = 'in_flight', attempts = d.attempts + 1, worker = p_worker,
            lease_until = now() + make_interval(secs => p_lease_seconds)
        FROM picked WHERE d.id = picked.id
        RETURNING d.id, d.action_id, d.task_id, d.event, d.attempts - d.round_base AS attempt
    )
    SELECT l.id, l.task_id, l.event, l.attempt, a.url, a.verb, a.body, a.headers,
           t.name, t.kind
    FROM leased l
    JOIN taskrunner.action a ON a.id = l.action_id
    JOIN taskrunner.task t ON t.id = l.task_id
$$;

COMMENT ON FUNCTION taskrunner.claim_deliveries(text, int, int) IS
'Lease up to p_max queued deliveries that are due (end and cancel webhooks, and starts
waiting for a retry).';

CREATE FUNCTION taskrunner.finish_deliveries(p_worker text, p_results jsonb)
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
               upper(coalesce(a ->> 'verb', 'POST')), a -> 'body', coalesce(a -> 'headers', '{}')
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

CREATE FUNCTION taskrunner.finish_delivery(p_id uuid, p_worker text, p_ok boolean,
                                           p_status_code int DEFAULT NULL,
                                           p_error text DEFAULT NULL,
                                           p_retry_delay_ms int DEFAULT NULL,
                                           p_cancel_actions jsonb DEFAULT NULL,
                                           p_started_at timestamptz DEFAULT NULL)
RETURNS text
LANGUAGE sql AS $$
    SELECT f.status FROM taskrunner.finish_deliveries(p_worker, jsonb_build_array(
        jsonb_build_object('delivery_id', p_id, 'ok', p_ok, 'status_code', p_status_code,
                           'error', p_error, 'retry_delay_ms', p_retry_delay_ms,
                           'cancel_actions', p_cancel_actions, 'started_at', p_started_at))) f
$$;

COMMENT ON FUNCTION taskrunner.finish_delivery(uuid, text, boolean, int, text, int, jsonb, timestamptz) IS
'Record the outcome of one webhook attempt: finish_deliveries for a single result.';

CREATE FUNCTION taskrunner.release_deliveries(p_worker text, p_ids uuid[]) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    v_count int;
BEGIN
    WITH released AS (
        UPDATE taskrunner.delivery
        SET status = CASE WHEN event = 'start' THEN 'expired'::taskrunner.delivery_status
                          ELSE 'queued' END,
            attempts = attempts - 1,
            lease_until = NULL,
            next_attempt_at = now(),
            last_error = 'released by worker shutdown',
            finished_at = CASE WHEN event = 'start' THEN now() END
        WHERE id = ANY (p_ids) AND status = 'in_flight' AND worker = p_worker
        RETURNING task_id, event
    ), requeued AS (
        UPDATE taskrunner.task t
        SET status = 'pending', status_reason = format('released by %s', p_worker)
        FROM released r
        WHERE r.event = 'start' AND t.id = r.task_id AND t.status = 'running'
          AND t.started_at IS NULL
    )
    SELECT count(*) INTO v_count FROM released;
    IF v_count > 0 THEN
        PERFORM pg_notify('taskrunner_delivery', '');
    END IF;
    RETURN v_count;
END $$;

COMMENT ON FUNCTION taskrunner.release_deliveries(text, uuid[]) IS
'Put leased deliveries back (a worker shutting down): the task of a start goes back to
pending for another worker; other deliveries are queued again, the attempt not counted.';

CREATE FUNCTION taskrunner.retry_delivery(p_id uuid) RETURNS taskrunner.delivery
LANGUAGE plpgsql AS $$
DECLARE
    d taskrunner.delivery;
BEGIN
    SELECT * INTO d FROM taskrunner.delivery WHERE id = p_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        PERFORM taskrunner._raise('TR404', format('delivery %s not found', p_id));
    END IF;
    IF d.status <> 'failed' THEN
        PERFORM taskrunner._raise('TR409',
            format('delivery %s is %s; only failed deliveries can be retried', p_id, d.status),
            format('status: delivery is %s', d.status));
    END IF;
    IF d.event = 'start' THEN
        PERFORM taskrunner._raise('TR409',
            format('delivery %s is a start; its task already failed', p_id));
    END IF;
    UPDATE taskrunner.delivery
    SET status = 'queued', next_attempt_at = now(), finished_at = NULL, round_base = attempts
    WHERE id = p_id
    RETURNING * INTO d;
    PERFORM pg_notify('taskrunner_delivery', '');
    RETURN d;
END $$;

COMMENT ON FUNCTION taskrunner.retry_delivery(uuid) IS
'Queue again a delivery that gave up (or was canceled), for another round of attempts.';

-- migrate:down

DROP FUNCTION taskrunner.retry_delivery(uuid);
DROP FUNCTION taskrunner.release_deliveries(text, uuid[]);
DROP FUNCTION taskrunner.finish_delivery(uuid, text, boolean, int, text, int, jsonb, timestamptz);
DROP FUNCTION taskrunner.finish_deliveries(text, jsonb);
DROP FUNCTION taskrunner.claim_deliveries(text, int, int);
