-- migrate:up

-- W3C trace context (https://www.w3.org/TR/trace-context/): a batch keeps the traceparent
-- (and tracestate) of the request that created it, and the claims hand them to the worker
-- with each webhook to make, which sends a child of it (same trace id, a new span id).
--
-- The API sets them for create_batch without changing it: in the same transaction it
-- runs SET LOCAL taskrunner.traceparent (and taskrunner.tracestate), and the batch row,
-- inserted by create_batch's trigger, takes them as its column defaults. A DBA can do
-- the same before SELECT taskrunner.create_batch(...).

ALTER TABLE taskrunner.batch
    ADD COLUMN traceparent text
        DEFAULT nullif(current_setting('taskrunner.traceparent', true), '')
        CONSTRAINT batch_traceparent_check
        CHECK (traceparent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'),
    ADD COLUMN tracestate text
        DEFAULT nullif(current_setting('taskrunner.tracestate', true), '')
        CONSTRAINT batch_tracestate_check CHECK (length(tracestate) <= 512);

COMMENT ON COLUMN taskrunner.batch.traceparent IS
'W3C traceparent of the request that created the batch (version 00 form), or NULL; the
worker sends a child of it on every webhook of the batch''s tasks. Defaults to the
setting taskrunner.traceparent (SET LOCAL it before create_batch).';
COMMENT ON COLUMN taskrunner.batch.tracestate IS
'W3C tracestate sent with traceparent, passed on as it came (setting taskrunner.tracestate).';

-- The work item carries them (and the batch id, for the worker's logs): one more join
-- per claimed row, on the batch's primary key.
ALTER TYPE taskrunner.work_item
    ADD ATTRIBUTE batch_id uuid,
    ADD ATTRIBUTE traceparent text,
    ADD ATTRIBUTE tracestate text;

CREATE OR REPLACE FUNCTION taskrunner.claim_tasks(p_worker text, p_max integer, p_lease_seconds integer DEFAULT 60)
 RETURNS SETOF taskrunner.work_item
 LANGUAGE plpgsql
AS $$
DECLARE
    g record;
    v_left int := p_max;
    v_waited boolean := false;
    v_slots int;
    v_claimed uuid[] := '{}';
    v_batch uuid[];
    v_blocked int := 0;
BEGIN
    IF p_max <= 0 THEN
        RETURN;
    END IF;
    -- Scheduled tasks that fell due join the claim index: their not_before is cleared.
    -- SKIP LOCKED: a row another claim is promoting is that claim's to take. At most 1000
    -- per claim (~50 ms), so a burst of tasks due at once is spread over claims.
    IF EXISTS (SELECT 1 FROM taskrunner.task WHERE status = 'pending' AND not_before <= now()) THEN
        UPDATE taskrunner.task t SET not_before = NULL
        WHERE t.id = ANY (ARRAY(
                SELECT x.id FROM taskrunner.task x
                WHERE x.status = 'pending' AND x.not_before <= now()
                ORDER BY x.not_before LIMIT 1000
                FOR NO KEY UPDATE SKIP LOCKED))
          AND t.status = 'pending';
    END IF;
    FOR g IN
        SELECT * FROM taskrunner._claim_groups
    LOOP
        IF NOT v_waited THEN
            PERFORM taskrunner._lock_group(g.kind, g.rules, true);
            v_waited := true;
        ELSIF NOT taskrunner._lock_group(g.kind, g.rules, false) THEN
            CONTINUE;  -- another claimer holds this group; it will take care of it
        END IF;
        v_slots := taskrunner._group_slots(g.kind, g.rules, g.metadata, g.expected_count);
        IF v_slots <= 0 THEN
            v_blocked := v_blocked + 1;
            CONTINUE;
        END IF;
        WITH picked AS (
            SELECT id FROM taskrunner.task
            WHERE status = 'pending' AND not_before IS NULL AND admission_key = g.admission_key
            ORDER BY priority DESC, seq
            LIMIT least(v_slots, v_left)
            FOR NO KEY UPDATE SKIP LOCKED
        ), moved AS (
            UPDATE taskrunner.task t
            SET status = 'running', claimed_by = p_worker, attempt = t.attempt + 1,
                status_reason = CASE WHEN t.attempt = 0 THEN format('claimed by %s', p_worker)
                                     ELSE format('claimed by %s (run %s of %s)', p_worker,
                                                 t.attempt + 1, t.max_attempts) END
            FROM picked WHERE t.id = picked.id AND t.status = 'pending' AND t.not_before IS NULL
            RETURNING t.id
        )
        SELECT array_agg(id) INTO v_batch FROM moved;
        IF v_batch IS NOT NULL THEN
            IF g.rules @> '[{"type": "rate_limit"}]' THEN
                PERFORM taskrunner._record_starts(g.rules, g.metadata, v_batch);
            END IF;
            v_claimed := v_claimed || v_batch;
            v_left := p_max - cardinality(v_claimed);
            EXIT WHEN v_left <= 0;
        END IF;
    END LOOP;

    IF v_blocked > 0 THEN
        PERFORM taskrunner._add_stats(format('blocked>%s;', v_blocked));
    END IF;
    IF cardinality(v_claimed) = 0 THEN
        RETURN;
    END IF;

    RETURN QUERY
    WITH starts AS (
        INSERT INTO taskrunner.delivery (action_id, task_id, event, status, attempts,
                                         lease_until, worker)
        SELECT a.id, a.task_id, 'start', 'in_flight', 1,
               now() + make_interval(secs => p_lease_seconds), p_worker
        FROM taskrunner.action a
        WHERE a.task_id = ANY (v_claimed) AND a.event = 'start'
        RETURNING id, action_id, task_id
    )
    SELECT s.id, s.task_id, 'start'::taskrunner.action_event, 1, a.url, a.verb, a.body,
           a.headers, t.name, t.kind, t.batch_id, b.traceparent, b.tracestate
    FROM starts s
    JOIN taskrunner.action a ON a.id = s.action_id
    JOIN taskrunner.task t ON t.id = s.task_id
    LEFT JOIN taskrunner.batch b ON b.batch_id = t.batch_id;
END $$;

CREATE OR REPLACE FUNCTION taskrunner.claim_deliveries(p_worker text, p_max int,
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
           t.name, t.kind, t.batch_id, b.traceparent, b.tracestate
    FROM leased l
    JOIN taskrunner.action a ON a.id = l.action_id
    JOIN taskrunner.task t ON t.id = l.task_id
    LEFT JOIN taskrunner.batch b ON b.batch_id = t.batch_id
$$;

-- migrate:down

ALTER TYPE taskrunner.work_item
    DROP ATTRIBUTE tracestate,
    DROP ATTRIBUTE traceparent,
    DROP ATTRIBUTE batch_id;

CREATE OR REPLACE FUNCTION taskrunner.claim_tasks(p_worker text, p_max integer, p_lease_seconds integer DEFAULT 60)
 RETURNS SETOF taskrunner.work_item
 LANGUAGE plpgsql
AS $$
DECLARE
    g record;
    v_left int := p_max;
    v_waited boolean := false;
    v_slots int;
    v_claimed uuid[] := '{}';
    v_batch uuid[];
    v_blocked int := 0;
BEGIN
    IF p_max <= 0 THEN
        RETURN;
    END IF;
    -- Scheduled tasks that fell due join the claim index: their not_before is cleared.
    -- SKIP LOCKED: a row another claim is promoting is that claim's to take. At most 1000
    -- per claim (~50 ms), so a burst of tasks due at once is spread over claims.
    IF EXISTS (SELECT 1 FROM taskrunner.task WHERE status = 'pending' AND not_before <= now()) THEN
        UPDATE taskrunner.task t SET not_before = NULL
        WHERE t.id = ANY (ARRAY(
                SELECT x.id FROM taskrunner.task x
                WHERE x.status = 'pending' AND x.not_before <= now()
                ORDER BY x.not_before LIMIT 1000
                FOR NO KEY UPDATE SKIP LOCKED))
          AND t.status = 'pending';
    END IF;
    FOR g IN
        SELECT * FROM taskrunner._claim_groups
    LOOP
        IF NOT v_waited THEN
            PERFORM taskrunner._lock_group(g.kind, g.rules, true);
            v_waited := true;
        ELSIF NOT taskrunner._lock_group(g.kind, g.rules, false) THEN
            CONTINUE;  -- another claimer holds this group; it will take care of it
        END IF;
        v_slots := taskrunner._group_slots(g.kind, g.rules, g.metadata, g.expected_count);
        IF v_slots <= 0 THEN
            v_blocked := v_blocked + 1;
            CONTINUE;
        END IF;
        WITH picked AS (
            SELECT id FROM taskrunner.task
            WHERE status = 'pending' AND not_before IS NULL AND admission_key = g.admission_key
            ORDER BY priority DESC, seq
            LIMIT least(v_slots, v_left)
            FOR NO KEY UPDATE SKIP LOCKED
        ), moved AS (
            UPDATE taskrunner.task t
            SET status = 'running', claimed_by = p_worker, attempt = t.attempt + 1,
                status_reason = CASE WHEN t.attempt = 0 THEN format('claimed by %s', p_worker)
                                     ELSE format('claimed by %s (run %s of %s)', p_worker,
                                                 t.attempt + 1, t.max_attempts) END
            FROM picked WHERE t.id = picked.id AND t.status = 'pending' AND t.not_before IS NULL
            RETURNING t.id
        )
        SELECT array_agg(id) INTO v_batch FROM moved;
        IF v_batch IS NOT NULL THEN
            IF g.rules @> '[{"type": "rate_limit"}]' THEN
                PERFORM taskrunner._record_starts(g.rules, g.metadata, v_batch);
            END IF;
            v_claimed := v_claimed || v_batch;
            v_left := p_max - cardinality(v_claimed);
            EXIT WHEN v_left <= 0;
        END IF;
    END LOOP;

    IF v_blocked > 0 THEN
        PERFORM taskrunner._add_stats(format('blocked>%s;', v_blocked));
    END IF;
    IF cardinality(v_claimed) = 0 THEN
        RETURN;
    END IF;

    RETURN QUERY
    WITH starts AS (
        INSERT INTO taskrunner.delivery (action_id, task_id, event, status, attempts,
                                         lease_until, worker)
        SELECT a.id, a.task_id, 'start', 'in_flight', 1,
               now() + make_interval(secs => p_lease_seconds), p_worker
        FROM taskrunner.action a
        WHERE a.task_id = ANY (v_claimed) AND a.event = 'start'
        RETURNING id, action_id, task_id
    )
    SELECT s.id, s.task_id, 'start'::taskrunner.action_event, 1, a.url, a.verb, a.body,
           a.headers, t.name, t.kind
    FROM starts s
    JOIN taskrunner.action a ON a.id = s.action_id
    JOIN taskrunner.task t ON t.id = s.task_id;
END $$;

CREATE OR REPLACE FUNCTION taskrunner.claim_deliveries(p_worker text, p_max int,
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

ALTER TABLE taskrunner.batch DROP COLUMN tracestate, DROP COLUMN traceparent;
