-- migrate:up

-- Dead-end cancellation, as ArcRun has it (issue 9, item 5), behind a setting that is off
-- by default: a task that has not ended, all of whose children have ended (canceled, or
-- failed through another parent), can no longer matter and is canceled; the walk goes on
-- upward from it. A task with dead_end_barrier is canceled like any other but stops the
-- walk: its parents are not looked at.

ALTER TABLE taskrunner.task ADD COLUMN dead_end_barrier boolean NOT NULL DEFAULT false;

COMMENT ON COLUMN taskrunner.task.dead_end_barrier IS
'Dead-end cancellation (taskrunner.settings.dead_end_cancel) does not walk above this task.';

-- Settings that SQL itself reads (triggers cannot take parameters): one row, so a DBA
-- sees and changes them with SELECT/UPDATE, in a transaction, for every session at once.
CREATE TABLE taskrunner.settings (
    id boolean PRIMARY KEY DEFAULT true CONSTRAINT settings_one_row CHECK (id),
    dead_end_cancel boolean NOT NULL DEFAULT false
);
INSERT INTO taskrunner.settings DEFAULT VALUES;

COMMENT ON TABLE taskrunner.settings IS
'Settings read by the SQL state machine: one row (UPDATE it; taskrunner migrate writes the
environment''s DEAD_END_CANCEL into it when that is set).';
COMMENT ON COLUMN taskrunner.settings.dead_end_cancel IS
'On: a task whose children have all ended is canceled, walking upward (see _cancel_dead_ends).';

-- The walk, set-based, in three statements:
-- 1. the candidates: every unfinished task reachable upward from the tasks that just
--    ended, through unfinished tasks that are not barriers (a barrier is a candidate, its
--    parents are not), by one recursive query;
-- 2. lock them in id order, skipping those another transaction holds (SKIP LOCKED);
-- 3. in a new statement (a new snapshot, after the locks), the dead ends among the locked
--    ones: those that are not kept alive. A candidate is kept alive by a child that has not
--    ended and is not a locked candidate, and passes that on to its candidate parents (a
--    second recursive query, upward). Since every candidate has a child (it was reached
--    from one), a candidate that nothing keeps alive has children that all end now.
-- They are canceled by one UPDATE (history, cancel webhooks of running ones, propagation:
-- as for any cancel), whose own trigger does not walk again (taskrunner.dead_end_walk).
-- A 10,000-deep chain is two recursive queries and one UPDATE, no trigger recursion.
--
-- A candidate whose row another transaction holds is not waited for: waiting could
-- deadlock with that transaction's propagation when it is ending the candidate (it locks
-- the candidate, then wants this transaction's children). It is skipped (counted as alive)
-- and queued in dead_end_recheck, and the workers' housekeeping looks at it again
-- (recheck_dead_ends). That also closes the race of two children of one parent ending in
-- two concurrent transactions, each seeing the other child still live: the second one to
-- reach the parent finds it locked by the first, so the parent is queued and rechecked
-- once both have committed.
-- (No unique task_id: an insert never waits on another transaction's insert of the same
-- task; the recheck takes duplicates together.)
CREATE TABLE taskrunner.dead_end_recheck (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id uuid NOT NULL
);

COMMENT ON TABLE taskrunner.dead_end_recheck IS
'Dead-end candidates that a walk skipped because another transaction held them; the
workers'' housekeeping rechecks them (recheck_dead_ends).';

CREATE FUNCTION taskrunner._cancel_dead_ends(p_ended uuid[], p_candidates uuid[] DEFAULT '{}')
RETURNS int
LANGUAGE plpgsql
SET enable_seqscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
DECLARE
    v_candidates uuid[];
    v_locked uuid[];
    v_is_candidate jsonb;  -- {"<id>": true}: a set; `?` finds a key in O(log n), = ANY in O(n)
    v_alive jsonb;
    v_dead uuid[];
BEGIN
    SELECT p_candidates || coalesce(array_agg(d.parent_id), '{}') INTO v_candidates
    FROM taskrunner.dependency d WHERE d.child_id = ANY (p_ended);
    WITH RECURSIVE up(id, barrier) AS (
        SELECT p.id, p.dead_end_barrier
        FROM taskrunner.task p
        WHERE p.id = ANY (v_candidates) AND NOT taskrunner.is_terminal(p.status)
        UNION
        SELECT p.id, p.dead_end_barrier
        FROM up
        JOIN taskrunner.dependency d ON d.child_id = up.id
        JOIN taskrunner.task p ON p.id = d.parent_id
        WHERE NOT up.barrier AND NOT taskrunner.is_terminal(p.status)
    )
    SELECT array_agg(DISTINCT id) INTO v_candidates FROM up;
    IF v_candidates IS NULL THEN
        RETURN 0;
    END IF;

    SELECT array_agg(id) INTO v_locked FROM (
        SELECT t.id FROM taskrunner.task t
        WHERE t.id = ANY (v_candidates)
        ORDER BY t.id
        FOR NO KEY UPDATE SKIP LOCKED) locked;
    IF cardinality(v_locked) IS DISTINCT FROM cardinality(v_candidates) THEN
        INSERT INTO taskrunner.dead_end_recheck (task_id)
        SELECT id FROM unnest(v_candidates) id
        WHERE NOT id = ANY (coalesce(v_locked, '{}'));
    END IF;
    v_candidates := v_locked;
    IF v_candidates IS NULL THEN
        RETURN 0;
    END IF;
    SELECT jsonb_object_agg(id, true) INTO v_is_candidate FROM unnest(v_candidates) id;

    WITH RECURSIVE alive(id) AS (
        SELECT p.id
        FROM taskrunner.task p
        WHERE p.id = ANY (v_candidates)
          AND EXISTS (SELECT 1 FROM taskrunner.dependency d
                      JOIN taskrunner.task c ON c.id = d.child_id
                      WHERE d.parent_id = p.id AND NOT taskrunner.is_terminal(c.status)
                        AND NOT v_is_candidate ? c.id::text)
        UNION
        SELECT p.parent_id
        FROM alive
        CROSS JOIN LATERAL (SELECT d.parent_id FROM taskrunner.dependency d
                            WHERE d.child_id = alive.id) p
        WHERE v_is_candidate ? p.parent_id::text
    )
    SELECT coalesce(jsonb_object_agg(id, true), '{}') INTO v_alive FROM alive;

    SELECT array_agg(t.id) INTO v_dead
    FROM taskrunner.task t
    WHERE t.id = ANY (v_candidates) AND NOT taskrunner.is_terminal(t.status)
      AND NOT v_alive ? t.id::text;
    IF v_dead IS NULL THEN
        RETURN 0;
    END IF;

    PERFORM set_config('taskrunner.dead_end_walk', 'on', true);
    UPDATE taskrunner.task
    SET status = 'canceled', status_reason = 'dead end: every child task has ended'
    WHERE id = ANY (v_dead);
    PERFORM set_config('taskrunner.dead_end_walk', '', true);
    RETURN cardinality(v_dead);
END $$;

COMMENT ON FUNCTION taskrunner._cancel_dead_ends(uuid[], uuid[]) IS
'Dead-end cancellation from tasks that just ended (p_ended: the after-update trigger calls
it when settings.dead_end_cancel is on) or from candidates to look at again
(p_candidates): cancels, in one UPDATE, every unfinished task above them whose children
all end, walking upward; a dead_end_barrier task is canceled but its parents are not
looked at. Candidates locked by another transaction are queued in dead_end_recheck.
Returns how many it canceled.';

-- The workers' housekeeping (the tick query): candidates that a walk had to skip.
CREATE FUNCTION taskrunner.recheck_dead_ends(p_max int DEFAULT 1000) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    v_ids uuid[];
BEGIN
    WITH taken AS (
        DELETE FROM taskrunner.dead_end_recheck
        WHERE id IN (SELECT id FROM taskrunner.dead_end_recheck
                     ORDER BY id LIMIT p_max FOR UPDATE SKIP LOCKED)
        RETURNING task_id
    )
    SELECT array_agg(DISTINCT task_id) INTO v_ids FROM taken;
    IF v_ids IS NULL OR NOT (SELECT dead_end_cancel FROM taskrunner.settings) THEN
        RETURN 0;
    END IF;
    RETURN taskrunner._cancel_dead_ends('{}', v_ids);
END $$;

COMMENT ON FUNCTION taskrunner.recheck_dead_ends(int) IS
'Look again at up to p_max dead-end candidates that a walk skipped (dead_end_recheck):
cancels those that are dead ends now, queues again those still locked. The workers''
housekeeping calls it; returns how many it canceled.';

CREATE OR REPLACE FUNCTION taskrunner.tg_task__after_update() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_ended uuid[];
    v_wake_tasks boolean;
    v_queued bigint;
    v_lines text;
BEGIN
    WITH changed AS MATERIALIZED (
        SELECT n.id, n.kind, n.previous_status AS from_status, n.status AS to_status,
               CASE WHEN n.status = 'failure' THEN n.failure_reason ELSE n.status_reason END
                   AS reason
        FROM new_rows n
        WHERE n.status <> n.previous_status
    ), hist AS (
        INSERT INTO taskrunner.task_history (task_id, from_status, to_status, reason)
        SELECT id, from_status, to_status, reason FROM changed
    ), outbox AS (
        INSERT INTO taskrunner.delivery (action_id, task_id, event)
        SELECT a.id, a.task_id, a.event
        FROM changed c
        JOIN taskrunner.action a ON a.task_id = c.id AND a.event =
            CASE c.to_status WHEN 'success' THEN 'success'::taskrunner.action_event
                             WHEN 'failure' THEN 'failure'::taskrunner.action_event
                             WHEN 'canceled' THEN 'cancel'::taskrunner.action_event END
        WHERE c.to_status IN ('success', 'failure')
           OR (c.to_status = 'canceled' AND c.from_status = 'running')
        RETURNING 1
    ), dropped_starts AS (
        -- a start still waiting for a retry is pointless once the task left running
        UPDATE taskrunner.delivery d
        SET status = 'canceled', finished_at = now(), lease_until = NULL
        FROM changed c
        WHERE d.task_id = c.id AND c.from_status = 'running' AND d.event = 'start'
          AND d.status = 'queued'
    ), stats AS (
        SELECT string_agg(format('%s>%s>%s>%s;', from_status, to_status, kind, n), '') AS lines
        FROM (SELECT from_status, to_status, kind, count(*) AS n
              FROM changed GROUP BY 1, 2, 3) s
    )
    SELECT array_agg(id) FILTER (WHERE taskrunner.is_terminal(to_status)),
           coalesce(bool_or(to_status = 'pending' OR from_status = 'running'), false),
           (SELECT count(*) FROM outbox),
           (SELECT lines FROM stats)
    INTO v_ended, v_wake_tasks, v_queued, v_lines
    FROM changed;

    IF v_lines IS NOT NULL THEN
        PERFORM taskrunner._add_stats(v_lines);
    END IF;
    IF v_ended IS NOT NULL THEN
        PERFORM taskrunner._propagate(v_ended);
        -- dead-end cancellation (off by default); not for the tasks that a walk itself
        -- cancels (it goes on from them, or stops at a barrier)
        IF current_setting('taskrunner.dead_end_walk', true) IS DISTINCT FROM 'on'
           AND (SELECT dead_end_cancel FROM taskrunner.settings) THEN
            PERFORM taskrunner._cancel_dead_ends(v_ended);
        END IF;
    END IF;
    IF v_wake_tasks THEN
        PERFORM pg_notify('taskrunner_task', '');
    END IF;
    IF v_queued > 0 THEN
        PERFORM pg_notify('taskrunner_delivery', '');
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION taskrunner.create_batch(p_tasks jsonb, p_requester text DEFAULT NULL::text)
 RETURNS SETOF taskrunner.task
 LANGUAGE plpgsql
AS $$
DECLARE
    v_batch uuid := gen_random_uuid();
    v_existing uuid[];
    v_missing text;
    v_ended uuid[];
    v_created uuid[];
BEGIN
    -- Dependencies must name a task of the batch or an existing task.
    WITH deps AS MATERIALIZED (
        SELECT t.ord - 1 AS pos, dep ->> 'local_id' AS local_id, (dep ->> 'task_id')::uuid AS task_id
        FROM jsonb_array_elements(p_tasks) WITH ORDINALITY t(t, ord),
             jsonb_array_elements(coalesce(t.t -> 'dependencies', '[]')) dep
    ), locals AS MATERIALIZED (
        SELECT t ->> 'local_id' AS local_id FROM jsonb_array_elements(p_tasks) t
    )
    SELECT string_agg(problem, E'\n') INTO v_missing FROM (
        SELECT format('[%s].dependencies: unknown local id %s', d.pos, d.local_id)
        FROM deps d LEFT JOIN locals l ON l.local_id = d.local_id
        WHERE d.local_id IS NOT NULL AND l.local_id IS NULL
        UNION ALL
        SELECT format('[%s].dependencies: unknown task %s', d.pos, d.task_id)
        FROM deps d LEFT JOIN taskrunner.task x ON x.id = d.task_id
        WHERE d.task_id IS NOT NULL AND x.id IS NULL
    ) problems(problem);
    IF v_missing IS NOT NULL THEN
        PERFORM taskrunner._raise('TR400', 'unknown dependency', v_missing);
    END IF;

    WITH input AS MATERIALIZED (
        SELECT t, ord FROM jsonb_array_elements(p_tasks) WITH ORDINALITY x(t, ord)
    ), dedupe AS MATERIALIZED (
        -- the newest existing task that any dedupe matcher of the input task finds
        -- (one probe per matcher, its pattern computed once: see _dedupe_match)
        SELECT i.ord, (
            SELECT e.id FROM jsonb_array_elements(i.t -> 'dedupe') m
            CROSS JOIN LATERAL taskrunner._dedupe_match(
                m ->> 'kind', (m ->> 'status')::taskrunner.task_status,
                taskrunner._rule_pattern(m, i.t -> 'metadata')) e
            ORDER BY e.seq DESC LIMIT 1) AS existing_id
        FROM input i
        WHERE jsonb_array_length(coalesce(i.t -> 'dedupe', '[]')) > 0
    ), ids AS MATERIALIZED (
        SELECT i.t, i.ord, i.t ->> 'local_id' AS local_id,
               CASE WHEN d.existing_id IS NULL THEN gen_random_uuid() END AS new_id,
               d.existing_id
        FROM input i LEFT JOIN dedupe d ON d.ord = i.ord
    ), edges AS MATERIALIZED (
        SELECT c.new_id AS child_id,
               coalesce(l.new_id, l.existing_id, (dep ->> 'task_id')::uuid) AS parent_id,
               bool_or(coalesce((dep ->> 'requires_success')::boolean, true)) AS requires_success,
               bool_and(l.new_id IS NULL) AS external
        FROM ids c
        CROSS JOIN jsonb_array_elements(coalesce(c.t -> 'dependencies', '[]')) dep
        LEFT JOIN ids l ON l.local_id = dep ->> 'local_id'
        WHERE c.new_id IS NOT NULL
        GROUP BY 1, 2
    ), new_tasks AS (
        INSERT INTO taskrunner.task (id, batch_id, local_id, requester, name, kind, status,
                                     priority, timeout, metadata, rules, admission_key,
                                     deps_total, status_reason, max_attempts, backoff_seconds,
                                     backoff_max_seconds, not_before, expected_count,
                                     dead_end_barrier)
        SELECT i.new_id, v_batch, i.local_id, p_requester, i.t ->> 'name', i.t ->> 'kind',
               CASE WHEN coalesce(e.n, 0) > 0 THEN 'waiting' ELSE 'pending' END::taskrunner.task_status,
               coalesce((i.t ->> 'priority')::int, 0),
               coalesce((i.t ->> 'timeout')::int, 60),
               coalesce(i.t -> 'metadata', '{}'),
               coalesce(i.t -> 'rules', '[]'),
               taskrunner._admission_key(i.t ->> 'kind', coalesce((i.t ->> 'priority')::int, 0),
                                         coalesce(i.t -> 'rules', '[]'),
                                         coalesce(i.t -> 'metadata', '{}'),
                                         (i.t ->> 'expected_count')::bigint),
               coalesce(e.n, 0),
               'created',
               coalesce((i.t #>> '{retry,max_attempts}')::int, 1),
               coalesce((i.t #>> '{retry,backoff_seconds}')::float8, 5),
               coalesce((i.t #>> '{retry,backoff_max_seconds}')::float8, 300),
               CASE WHEN s.not_before > now() THEN s.not_before END,
               (i.t ->> 'expected_count')::bigint,
               coalesce((i.t ->> 'dead_end_barrier')::boolean, false)
        FROM ids i
        LEFT JOIN (SELECT child_id, count(*) AS n FROM edges GROUP BY 1) e ON e.child_id = i.new_id
        -- a delay counts from the database's clock; a time already past is no delay
        CROSS JOIN LATERAL (SELECT coalesce((i.t ->> 'not_before')::timestamptz,
                                            now() + make_interval(
                                                secs => (i.t ->> 'delay_seconds')::float8))
                                AS not_before) s
        WHERE i.new_id IS NOT NULL
        ORDER BY i.ord
        RETURNING id
    ), new_edges AS (
        INSERT INTO taskrunner.dependency (parent_id, child_id, requires_success)
        SELECT parent_id, child_id, requires_success FROM edges
    ), new_actions AS (
        INSERT INTO taskrunner.action (task_id, event, url, verb, body, headers)
        SELECT i.new_id, (a ->> 'event')::taskrunner.action_event, a ->> 'url',
               upper(a ->> 'verb'), a -> 'body', coalesce(a -> 'headers', '{}')
        FROM ids i CROSS JOIN jsonb_array_elements(coalesce(i.t -> 'actions', '[]')) a
        WHERE i.new_id IS NOT NULL
    )
    SELECT (SELECT array_agg(new_id ORDER BY ord) FROM ids WHERE new_id IS NOT NULL),
           (SELECT array_agg(DISTINCT e.parent_id) FROM edges e WHERE e.external)
    INTO v_created, v_existing;

    -- Links to existing tasks (by id or through a dedupe hit): lock those (FOR SHARE,
    -- after our links exist), then read their status. One that ends concurrently either
    -- committed before the lock (we see it ended) or waits for our commit (its
    -- propagation then sees our links). Links to tasks that had already ended count at
    -- once; a failed required parent fails the child, which cascades through the batch.
    -- Two statements on purpose: with the status test in the locking query, the planner
    -- applies it below the lock, to the row as it was before a concurrent end committed,
    -- so an ending parent was neither locked nor counted and the child waited forever.
    -- The second statement takes a new snapshot, after every lock was granted.
    PERFORM 1 FROM taskrunner.task WHERE id = ANY (v_existing) ORDER BY id FOR SHARE;
    SELECT array_agg(id) INTO v_ended
    FROM taskrunner.task
    WHERE id = ANY (v_existing) AND taskrunner.is_terminal(status);
    IF v_ended IS NOT NULL THEN
        PERFORM taskrunner._propagate(v_ended, v_created);
    END IF;

    RETURN QUERY
    SELECT t.* FROM unnest(v_created) WITH ORDINALITY c(id, ord)
    JOIN taskrunner.task t ON t.id = c.id
    ORDER BY c.ord;
END $$;

-- migrate:down

CREATE OR REPLACE FUNCTION taskrunner.create_batch(p_tasks jsonb, p_requester text DEFAULT NULL::text)
 RETURNS SETOF taskrunner.task
 LANGUAGE plpgsql
AS $$
DECLARE
    v_batch uuid := gen_random_uuid();
    v_existing uuid[];
    v_missing text;
    v_ended uuid[];
    v_created uuid[];
BEGIN
    -- Dependencies must name a task of the batch or an existing task.
    WITH deps AS MATERIALIZED (
        SELECT t.ord - 1 AS pos, dep ->> 'local_id' AS local_id, (dep ->> 'task_id')::uuid AS task_id
        FROM jsonb_array_elements(p_tasks) WITH ORDINALITY t(t, ord),
             jsonb_array_elements(coalesce(t.t -> 'dependencies', '[]')) dep
    ), locals AS MATERIALIZED (
        SELECT t ->> 'local_id' AS local_id FROM jsonb_array_elements(p_tasks) t
    )
    SELECT string_agg(problem, E'\n') INTO v_missing FROM (
        SELECT format('[%s].dependencies: unknown local id %s', d.pos, d.local_id)
        FROM deps d LEFT JOIN locals l ON l.local_id = d.local_id
        WHERE d.local_id IS NOT NULL AND l.local_id IS NULL
        UNION ALL
        SELECT format('[%s].dependencies: unknown task %s', d.pos, d.task_id)
        FROM deps d LEFT JOIN taskrunner.task x ON x.id = d.task_id
        WHERE d.task_id IS NOT NULL AND x.id IS NULL
    ) problems(problem);
    IF v_missing IS NOT NULL THEN
        PERFORM taskrunner._raise('TR400', 'unknown dependency', v_missing);
    END IF;

    WITH input AS MATERIALIZED (
        SELECT t, ord FROM jsonb_array_elements(p_tasks) WITH ORDINALITY x(t, ord)
    ), dedupe AS MATERIALIZED (
        -- the newest existing task that any dedupe matcher of the input task finds
        -- (one probe per matcher, its pattern computed once: see _dedupe_match)
        SELECT i.ord, (
            SELECT e.id FROM jsonb_array_elements(i.t -> 'dedupe') m
            CROSS JOIN LATERAL taskrunner._dedupe_match(
                m ->> 'kind', (m ->> 'status')::taskrunner.task_status,
                taskrunner._rule_pattern(m, i.t -> 'metadata')) e
            ORDER BY e.seq DESC LIMIT 1) AS existing_id
        FROM input i
        WHERE jsonb_array_length(coalesce(i.t -> 'dedupe', '[]')) > 0
    ), ids AS MATERIALIZED (
        SELECT i.t, i.ord, i.t ->> 'local_id' AS local_id,
               CASE WHEN d.existing_id IS NULL THEN gen_random_uuid() END AS new_id,
               d.existing_id
        FROM input i LEFT JOIN dedupe d ON d.ord = i.ord
    ), edges AS MATERIALIZED (
        SELECT c.new_id AS child_id,
               coalesce(l.new_id, l.existing_id, (dep ->> 'task_id')::uuid) AS parent_id,
               bool_or(coalesce((dep ->> 'requires_success')::boolean, true)) AS requires_success,
               bool_and(l.new_id IS NULL) AS external
        FROM ids c
        CROSS JOIN jsonb_array_elements(coalesce(c.t -> 'dependencies', '[]')) dep
        LEFT JOIN ids l ON l.local_id = dep ->> 'local_id'
        WHERE c.new_id IS NOT NULL
        GROUP BY 1, 2
    ), new_tasks AS (
        INSERT INTO taskrunner.task (id, batch_id, local_id, requester, name, kind, status,
                                     priority, timeout, metadata, rules, admission_key,
                                     deps_total, status_reason, max_attempts, backoff_seconds,
                                     backoff_max_seconds, not_before, expected_count)
        SELECT i.new_id, v_batch, i.local_id, p_requester, i.t ->> 'name', i.t ->> 'kind',
               CASE WHEN coalesce(e.n, 0) > 0 THEN 'waiting' ELSE 'pending' END::taskrunner.task_status,
               coalesce((i.t ->> 'priority')::int, 0),
               coalesce((i.t ->> 'timeout')::int, 60),
               coalesce(i.t -> 'metadata', '{}'),
               coalesce(i.t -> 'rules', '[]'),
               taskrunner._admission_key(i.t ->> 'kind', coalesce((i.t ->> 'priority')::int, 0),
                                         coalesce(i.t -> 'rules', '[]'),
                                         coalesce(i.t -> 'metadata', '{}'),
                                         (i.t ->> 'expected_count')::bigint),
               coalesce(e.n, 0),
               'created',
               coalesce((i.t #>> '{retry,max_attempts}')::int, 1),
               coalesce((i.t #>> '{retry,backoff_seconds}')::float8, 5),
               coalesce((i.t #>> '{retry,backoff_max_seconds}')::float8, 300),
               CASE WHEN s.not_before > now() THEN s.not_before END,
               (i.t ->> 'expected_count')::bigint
        FROM ids i
        LEFT JOIN (SELECT child_id, count(*) AS n FROM edges GROUP BY 1) e ON e.child_id = i.new_id
        -- a delay counts from the database's clock; a time already past is no delay
        CROSS JOIN LATERAL (SELECT coalesce((i.t ->> 'not_before')::timestamptz,
                                            now() + make_interval(
                                                secs => (i.t ->> 'delay_seconds')::float8))
                                AS not_before) s
        WHERE i.new_id IS NOT NULL
        ORDER BY i.ord
        RETURNING id
    ), new_edges AS (
        INSERT INTO taskrunner.dependency (parent_id, child_id, requires_success)
        SELECT parent_id, child_id, requires_success FROM edges
    ), new_actions AS (
        INSERT INTO taskrunner.action (task_id, event, url, verb, body, headers)
        SELECT i.new_id, (a ->> 'event')::taskrunner.action_event, a ->> 'url',
               upper(a ->> 'verb'), a -> 'body', coalesce(a -> 'headers', '{}')
        FROM ids i CROSS JOIN jsonb_array_elements(coalesce(i.t -> 'actions', '[]')) a
        WHERE i.new_id IS NOT NULL
    )
    SELECT (SELECT array_agg(new_id ORDER BY ord) FROM ids WHERE new_id IS NOT NULL),
           (SELECT array_agg(DISTINCT e.parent_id) FROM edges e WHERE e.external)
    INTO v_created, v_existing;

    -- Links to existing tasks (by id or through a dedupe hit): lock those (FOR SHARE,
    -- after our links exist), then read their status. One that ends concurrently either
    -- committed before the lock (we see it ended) or waits for our commit (its
    -- propagation then sees our links). Links to tasks that had already ended count at
    -- once; a failed required parent fails the child, which cascades through the batch.
    -- Two statements on purpose: with the status test in the locking query, the planner
    -- applies it below the lock, to the row as it was before a concurrent end committed,
    -- so an ending parent was neither locked nor counted and the child waited forever.
    -- The second statement takes a new snapshot, after every lock was granted.
    PERFORM 1 FROM taskrunner.task WHERE id = ANY (v_existing) ORDER BY id FOR SHARE;
    SELECT array_agg(id) INTO v_ended
    FROM taskrunner.task
    WHERE id = ANY (v_existing) AND taskrunner.is_terminal(status);
    IF v_ended IS NOT NULL THEN
        PERFORM taskrunner._propagate(v_ended, v_created);
    END IF;

    RETURN QUERY
    SELECT t.* FROM unnest(v_created) WITH ORDINALITY c(id, ord)
    JOIN taskrunner.task t ON t.id = c.id
    ORDER BY c.ord;
END $$;

CREATE OR REPLACE FUNCTION taskrunner.tg_task__after_update() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_ended uuid[];
    v_wake_tasks boolean;
    v_queued bigint;
    v_lines text;
BEGIN
    WITH changed AS MATERIALIZED (
        SELECT n.id, n.kind, n.previous_status AS from_status, n.status AS to_status,
               CASE WHEN n.status = 'failure' THEN n.failure_reason ELSE n.status_reason END
                   AS reason
        FROM new_rows n
        WHERE n.status <> n.previous_status
    ), hist AS (
        INSERT INTO taskrunner.task_history (task_id, from_status, to_status, reason)
        SELECT id, from_status, to_status, reason FROM changed
    ), outbox AS (
        INSERT INTO taskrunner.delivery (action_id, task_id, event)
        SELECT a.id, a.task_id, a.event
        FROM changed c
        JOIN taskrunner.action a ON a.task_id = c.id AND a.event =
            CASE c.to_status WHEN 'success' THEN 'success'::taskrunner.action_event
                             WHEN 'failure' THEN 'failure'::taskrunner.action_event
                             WHEN 'canceled' THEN 'cancel'::taskrunner.action_event END
        WHERE c.to_status IN ('success', 'failure')
           OR (c.to_status = 'canceled' AND c.from_status = 'running')
        RETURNING 1
    ), dropped_starts AS (
        -- a start still waiting for a retry is pointless once the task left running
        UPDATE taskrunner.delivery d
        SET status = 'canceled', finished_at = now(), lease_until = NULL
        FROM changed c
        WHERE d.task_id = c.id AND c.from_status = 'running' AND d.event = 'start'
          AND d.status = 'queued'
    ), stats AS (
        SELECT string_agg(format('%s>%s>%s>%s;', from_status, to_status, kind, n), '') AS lines
        FROM (SELECT from_status, to_status, kind, count(*) AS n
              FROM changed GROUP BY 1, 2, 3) s
    )
    SELECT array_agg(id) FILTER (WHERE taskrunner.is_terminal(to_status)),
           coalesce(bool_or(to_status = 'pending' OR from_status = 'running'), false),
           (SELECT count(*) FROM outbox),
           (SELECT lines FROM stats)
    INTO v_ended, v_wake_tasks, v_queued, v_lines
    FROM changed;

    IF v_lines IS NOT NULL THEN
        PERFORM taskrunner._add_stats(v_lines);
    END IF;
    IF v_ended IS NOT NULL THEN
        PERFORM taskrunner._propagate(v_ended);
    END IF;
    IF v_wake_tasks THEN
        PERFORM pg_notify('taskrunner_task', '');
    END IF;
    IF v_queued > 0 THEN
        PERFORM pg_notify('taskrunner_delivery', '');
    END IF;
    RETURN NULL;
END $$;

DROP FUNCTION taskrunner.recheck_dead_ends(int);
DROP FUNCTION taskrunner._cancel_dead_ends(uuid[], uuid[]);
DROP TABLE taskrunner.dead_end_recheck;
DROP TABLE taskrunner.settings;
ALTER TABLE taskrunner.task DROP COLUMN dead_end_barrier;
