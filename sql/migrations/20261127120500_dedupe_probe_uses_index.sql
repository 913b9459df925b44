-- migrate:up

-- Dedupe probes that cost what they find, not the table (issue 13, item 7). Inside
-- create_batch the probe's pattern was an expression of the input row, evaluated per
-- task row, and the planner chose to walk task_seq_idx backwards hoping for an early
-- match: a matcher that finds nothing read every task (20,000 tasks: 4.5 s per probe).

-- The newest task of p_kind in p_status whose metadata contains p_pattern. Bitmap scans
-- only (seqscan and indexscan off for this function): an ordered scan in seq order bets
-- on an early match and reads the whole table when there is none, while a bitmap of
-- task_metadata_idx reads only the tasks that carry the pattern's values. A matcher
-- without fields (empty pattern) finds the newest of its kind and status through
-- task_kind_status_idx instead. tests/test_hardening_sql.py pins the plan.
CREATE FUNCTION taskrunner._dedupe_match(p_kind text, p_status taskrunner.task_status,
                                         p_pattern jsonb)
RETURNS TABLE (id uuid, seq bigint)
LANGUAGE plpgsql STABLE
SET enable_seqscan = off
SET enable_indexscan = off
AS $$
BEGIN
    IF p_pattern = '{}'::jsonb THEN
        RETURN QUERY
        SELECT x.id, x.seq FROM taskrunner.task x
        WHERE x.kind = p_kind AND x.status = p_status
        ORDER BY x.seq DESC LIMIT 1;
    ELSE
        RETURN QUERY
        SELECT x.id, x.seq FROM taskrunner.task x
        WHERE x.metadata @> p_pattern AND x.kind = p_kind AND x.status = p_status
        ORDER BY x.seq DESC LIMIT 1;
    END IF;
END $$;

CREATE OR REPLACE FUNCTION taskrunner.create_batch(p_tasks jsonb, p_requester text DEFAULT NULL)
RETURNS SETOF taskrunner.task
LANGUAGE plpgsql AS $$
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
                                     deps_total, status_reason)
        SELECT i.new_id, v_batch, i.local_id, p_requester, i.t ->> 'name', i.t ->> 'kind',
               CASE WHEN coalesce(e.n, 0) > 0 THEN 'waiting' ELSE 'pending' END::taskrunner.task_status,
               coalesce((i.t ->> 'priority')::int, 0),
               coalesce((i.t ->> 'timeout')::int, 60),
               coalesce(i.t -> 'metadata', '{}'),
               coalesce(i.t -> 'rules', '[]'),
               taskrunner._admission_key(i.t ->> 'kind', coalesce((i.t ->> 'priority')::int, 0),
                                         coalesce(i.t -> 'rules', '[]'),
                                         coalesce(i.t -> 'metadata', '{}')),
               coalesce(e.n, 0),
               'created'
        FROM ids i
        LEFT JOIN (SELECT child_id, count(*) AS n FROM edges GROUP BY 1) e ON e.child_id = i.new_id
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

COMMENT ON FUNCTION taskrunner._dedupe_match(text, taskrunner.task_status, jsonb) IS
'A dedupe probe of create_batch: the newest task of p_kind in p_status whose metadata
contains p_pattern. Bitmap scans only, so it reads the tasks that carry the pattern''s
values, never the table.';

-- migrate:down

CREATE OR REPLACE FUNCTION taskrunner.create_batch(p_tasks jsonb, p_requester text DEFAULT NULL)
RETURNS SETOF taskrunner.task
LANGUAGE plpgsql AS $$
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
        SELECT i.ord, (
            SELECT e.id FROM jsonb_array_elements(i.t -> 'dedupe') m
            CROSS JOIN LATERAL (
                SELECT x.id, x.seq FROM taskrunner.task x
                WHERE x.kind = m ->> 'kind'
                  AND x.status = (m ->> 'status')::taskrunner.task_status
                  AND x.metadata @> taskrunner._rule_pattern(m, i.t -> 'metadata')
                ORDER BY x.seq DESC LIMIT 1) e
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
                                     deps_total, status_reason)
        SELECT i.new_id, v_batch, i.local_id, p_requester, i.t ->> 'name', i.t ->> 'kind',
               CASE WHEN coalesce(e.n, 0) > 0 THEN 'waiting' ELSE 'pending' END::taskrunner.task_status,
               coalesce((i.t ->> 'priority')::int, 0),
               coalesce((i.t ->> 'timeout')::int, 60),
               coalesce(i.t -> 'metadata', '{}'),
               coalesce(i.t -> 'rules', '[]'),
               taskrunner._admission_key(i.t ->> 'kind', coalesce((i.t ->> 'priority')::int, 0),
                                         coalesce(i.t -> 'rules', '[]'),
                                         coalesce(i.t -> 'metadata', '{}')),
               coalesce(e.n, 0),
               'created'
        FROM ids i
        LEFT JOIN (SELECT child_id, count(*) AS n FROM edges GROUP BY 1) e ON e.child_id = i.new_id
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

DROP FUNCTION taskrunner._dedupe_match(text, taskrunner.task_status, jsonb);
