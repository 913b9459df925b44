-- migrate:up

-- One owner per rule (issue 7.4).
-- * failure_reason: update_task and complete_tasks share failure_reason_problem() (they
--   had two wordings, the API a third); the API no longer checks it itself.
-- * A start response's cancel actions are checked by the worker with the code that checks
--   on_cancel at creation (taskrunner.api.validation.cancel_actions_input); a missing
--   verb is no longer filled in with POST here: the action table's NOT NULL refuses it.

CREATE FUNCTION taskrunner._failure_reason_problem(p_status taskrunner.task_status,
                                                  p_reason text)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN p_status = 'failure' AND p_reason IS NULL
            THEN 'failure_reason: is required when status is Failure'
        WHEN p_reason IS NOT NULL AND p_status IS DISTINCT FROM 'failure'
            THEN 'failure_reason: only allowed when status is Failure'
    END
$$;
COMMENT ON FUNCTION taskrunner._failure_reason_problem(taskrunner.task_status, text) IS
'The failure_reason rule, one owner and one wording for update_task and complete_tasks (the
API shows the text as the 400''s detail): a reason iff the status is failure. NULL: no problem.';

CREATE OR REPLACE FUNCTION taskrunner.update_task(p_id uuid,
                                       p_status taskrunner.task_status DEFAULT NULL,
                                       p_new_success bigint DEFAULT NULL,
                                       p_new_failures bigint DEFAULT NULL,
                                       p_metadata jsonb DEFAULT NULL,
                                       p_failure_reason text DEFAULT NULL)
RETURNS taskrunner.task
LANGUAGE plpgsql AS $$
DECLARE
    v_status taskrunner.task_status;
    v_task taskrunner.task;
    v_problem text;
BEGIN
    IF p_status IS NOT NULL AND p_status NOT IN ('success', 'failure') THEN
        PERFORM taskrunner._raise('TR400', 'invalid status',
                                  'status: must be Success or Failure');
    END IF;
    v_problem := taskrunner._failure_reason_problem(p_status, p_failure_reason);
    IF v_problem IS NOT NULL THEN
        PERFORM taskrunner._raise('TR400', 'invalid failure_reason', v_problem);
    END IF;
    SELECT status INTO v_status FROM taskrunner.task WHERE id = p_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        PERFORM taskrunner._raise('TR404', format('task %s not found', p_id));
    END IF;
    IF v_status <> 'running' THEN
        PERFORM taskrunner._raise('TR409',
            format('task %s is %s; only running tasks can be updated', p_id, v_status),
            format('status: task is %s', v_status));
    END IF;
    UPDATE taskrunner.task
    SET success = success + coalesce(p_new_success, 0),
        failures = failures + coalesce(p_new_failures, 0),
        metadata = coalesce(p_metadata, metadata),
        status = coalesce(p_status, status),
        failure_reason = CASE WHEN p_status = 'failure' THEN p_failure_reason ELSE failure_reason END,
        status_reason = CASE WHEN p_status IS NULL THEN status_reason
                             ELSE format('reported %s', p_status) END,
        last_updated = now()
    WHERE id = p_id
    RETURNING * INTO v_task;
    RETURN v_task;
END $$;

CREATE OR REPLACE FUNCTION taskrunner.complete_tasks(p_results jsonb)
RETURNS TABLE (task_id uuid, completed boolean, status taskrunner.task_status)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_bad text;
BEGIN
    SELECT string_agg(format('[%s].%s', ord - 1, problem), E'\n') INTO v_bad
    FROM (SELECT ord, CASE
                 WHEN r ->> 'task_id' IS NULL THEN 'task_id: required'
                 WHEN coalesce(r ->> 'status', '') NOT IN ('success', 'failure')
                     THEN 'status: must be success or failure'
                 ELSE taskrunner._failure_reason_problem((r ->> 'status')::taskrunner.task_status,
                                                        r ->> 'failure_reason')
                 END AS problem
          FROM jsonb_array_elements(p_results) WITH ORDINALITY x(r, ord)) p
    WHERE problem IS NOT NULL;
    IF v_bad IS NOT NULL THEN
        PERFORM taskrunner._raise('TR400', 'invalid results', v_bad);
    END IF;

    RETURN QUERY
    WITH input AS MATERIALIZED (
        SELECT DISTINCT ON (id) * FROM (
            SELECT (r ->> 'task_id')::uuid AS id, (r ->> 'status')::taskrunner.task_status AS to_status,
                   r ->> 'failure_reason' AS reason, ord
            FROM jsonb_array_elements(p_results) WITH ORDINALITY x(r, ord)) i
        ORDER BY id, ord
    ), locked AS MATERIALIZED (
        SELECT t.id FROM taskrunner.task t WHERE t.id IN (SELECT id FROM input)
        ORDER BY t.id FOR NO KEY UPDATE
    ), done AS (
        UPDATE taskrunner.task t
        SET status = i.to_status,
            failure_reason = CASE WHEN i.to_status = 'failure' THEN i.reason END,
            status_reason = format('reported %s', i.to_status),
            last_updated = now()
        FROM input i, locked l
        WHERE t.id = i.id AND l.id = i.id AND t.status = 'running'
        RETURNING t.id, t.status
    )
    SELECT i.id, d.id IS NOT NULL, coalesce(d.status, t.status)
    FROM input i
    LEFT JOIN done d ON d.id = i.id
    LEFT JOIN taskrunner.task t ON t.id = i.id
    ORDER BY i.ord;
END $$;

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

-- migrate:down

CREATE OR REPLACE FUNCTION taskrunner.update_task(p_id uuid,
                                       p_status taskrunner.task_status DEFAULT NULL,
                                       p_new_success bigint DEFAULT NULL,
                                       p_new_failures bigint DEFAULT NULL,
                                       p_metadata jsonb DEFAULT NULL,
                                       p_failure_reason text DEFAULT NULL)
RETURNS taskrunner.task
LANGUAGE plpgsql AS $$
DECLARE
    v_status taskrunner.task_status;
    v_task taskrunner.task;
BEGIN
    IF p_status IS NOT NULL AND p_status NOT IN ('success', 'failure') THEN
        PERFORM taskrunner._raise('TR400', 'invalid status',
                                  'status: must be Success or Failure');
    END IF;
    IF p_status = 'failure' AND p_failure_reason IS NULL THEN
        PERFORM taskrunner._raise('TR400', 'missing failure_reason',
                                  'failure_reason: required when status is Failure');
    END IF;
    IF p_failure_reason IS NOT NULL AND p_status IS DISTINCT FROM 'failure' THEN
        PERFORM taskrunner._raise('TR400', 'unexpected failure_reason',
                                  'failure_reason: only allowed when status is Failure');
    END IF;
    SELECT status INTO v_status FROM taskrunner.task WHERE id = p_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        PERFORM taskrunner._raise('TR404', format('task %s not found', p_id));
    END IF;
    IF v_status <> 'running' THEN
        PERFORM taskrunner._raise('TR409',
            format('task %s is %s; only running tasks can be updated', p_id, v_status),
            format('status: task is %s', v_status));
    END IF;
    UPDATE taskrunner.task
    SET success = success + coalesce(p_new_success, 0),
        failures = failures + coalesce(p_new_failures, 0),
        metadata = coalesce(p_metadata, metadata),
        status = coalesce(p_status, status),
        failure_reason = CASE WHEN p_status = 'failure' THEN p_failure_reason ELSE failure_reason END,
        status_reason = CASE WHEN p_status IS NULL THEN status_reason
                             ELSE format('reported %s', p_status) END,
        last_updated = now()
    WHERE id = p_id
    RETURNING * INTO v_task;
    RETURN v_task;
END $$;

CREATE OR REPLACE FUNCTION taskrunner.complete_tasks(p_results jsonb)
RETURNS TABLE (task_id uuid, completed boolean, status taskrunner.task_status)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_bad text;
BEGIN
    SELECT string_agg(format('[%s]: %s', ord - 1, problem), E'\n') INTO v_bad
    FROM (SELECT ord, CASE
                 WHEN r ->> 'task_id' IS NULL THEN 'task_id: required'
                 WHEN coalesce(r ->> 'status', '') NOT IN ('success', 'failure')
                     THEN 'status: must be success or failure'
                 WHEN r ->> 'status' = 'failure' AND r ->> 'failure_reason' IS NULL
                     THEN 'failure_reason: required when status is failure'
                 END AS problem
          FROM jsonb_array_elements(p_results) WITH ORDINALITY x(r, ord)) p
    WHERE problem IS NOT NULL;
    IF v_bad IS NOT NULL THEN
        PERFORM taskrunner._raise('TR400', 'invalid results', v_bad);
    END IF;

    RETURN QUERY
    WITH input AS MATERIALIZED (
        SELECT DISTINCT ON (id) * FROM (
            SELECT (r ->> 'task_id')::uuid AS id, (r ->> 'status')::taskrunner.task_status AS to_status,
                   r ->> 'failure_reason' AS reason, ord
            FROM jsonb_array_elements(p_results) WITH ORDINALITY x(r, ord)) i
        ORDER BY id, ord
    ), locked AS MATERIALIZED (
        SELECT t.id FROM taskrunner.task t WHERE t.id IN (SELECT id FROM input)
        ORDER BY t.id FOR NO KEY UPDATE
    ), done AS (
        UPDATE taskrunner.task t
        SET status = i.to_status,
            failure_reason = CASE WHEN i.to_status = 'failure' THEN i.reason END,
            status_reason = format('reported %s', i.to_status),
            last_updated = now()
        FROM input i, locked l
        WHERE t.id = i.id AND l.id = i.id AND t.status = 'running'
        RETURNING t.id, t.status
    )
    SELECT i.id, d.id IS NOT NULL, coalesce(d.status, t.status)
    FROM input i
    LEFT JOIN done d ON d.id = i.id
    LEFT JOIN taskrunner.task t ON t.id = i.id
    ORDER BY i.ord;
END $$;

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

DROP FUNCTION taskrunner._failure_reason_problem(taskrunner.task_status, text);
