-- migrate:up

-- Creating and changing tasks: the functions behind POST /task, PATCH /task/{id},
-- PUT /task, cancel, pause and resume. Each checks its input, locks in id order and makes
-- one UPDATE; the transition triggers do the rest.

CREATE FUNCTION taskrunner.create_batch(p_tasks jsonb, p_requester text DEFAULT NULL)
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

    -- Links to existing tasks: lock those (FOR SHARE, after our links exist) and read
    -- their status. One that ends concurrently either committed before the lock (we see
    -- it ended) or waits for our commit (its propagation then sees our links). Links to
    -- tasks that had already ended count at once; a failed required parent fails the
    -- child, which cascades through the batch.
    SELECT array_agg(id) INTO v_ended
    FROM (SELECT id, status FROM taskrunner.task WHERE id = ANY (v_existing)
          ORDER BY id FOR SHARE) p
    WHERE taskrunner.is_terminal(p.status);
    IF v_ended IS NOT NULL THEN
        PERFORM taskrunner._propagate(v_ended, v_created);
    END IF;

    RETURN QUERY
    SELECT t.* FROM unnest(v_created) WITH ORDINALITY c(id, ord)
    JOIN taskrunner.task t ON t.id = c.id
    ORDER BY c.ord;
END $$;

COMMENT ON FUNCTION taskrunner.create_batch(jsonb, text) IS
'Create a batch of tasks atomically. Input: a JSON array already validated and
normalised by the API (format in docs/sql.md). Dependencies name a local_id of the
batch or the task_id of an existing task. A task whose dedupe matcher finds an existing
task is skipped, and dependencies on it point at that existing task instead. Returns
the created tasks in input order.';

CREATE FUNCTION taskrunner.update_task(p_id uuid,
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

COMMENT ON FUNCTION taskrunner.update_task(uuid, taskrunner.task_status, bigint, bigint, jsonb, text) IS
'PATCH /task/{id}: counters, metadata and the outcome of a running task.';

CREATE FUNCTION taskrunner.complete_tasks(p_results jsonb)
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

COMMENT ON FUNCTION taskrunner.complete_tasks(jsonb) IS
'The outcome of many running tasks at once: the batch form of PATCH /task/{id} with a
status. Each element of p_results: {"task_id", "status": "success"|"failure",
"failure_reason"} (required for failure). A task that is not running is left alone
(completed = false). Rows are locked in id order; one UPDATE moves them all, so the
history, outbox, propagation and wake-up run once for the batch.';

CREATE FUNCTION taskrunner._move_task(p_id uuid, p_allowed taskrunner.task_status[],
                                      p_to taskrunner.task_status, p_reason text,
                                      p_verb text)
RETURNS taskrunner.task
LANGUAGE plpgsql AS $$
DECLARE
    v_task taskrunner.task;
BEGIN
    SELECT * INTO v_task FROM taskrunner.task WHERE id = p_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        PERFORM taskrunner._raise('TR404', format('task %s not found', p_id));
    END IF;
    IF NOT v_task.status = ANY (p_allowed) THEN
        PERFORM taskrunner._raise('TR409',
            format('cannot %s task %s: it is %s', p_verb, p_id, v_task.status),
            format('status: task is %s', v_task.status));
    END IF;
    UPDATE taskrunner.task
    SET status = coalesce(p_to, CASE WHEN deps_finished = deps_total THEN 'pending'
                                     ELSE 'waiting' END::taskrunner.task_status),
        status_reason = p_reason
    WHERE id = p_id
    RETURNING * INTO v_task;
    RETURN v_task;
END $$;

COMMENT ON FUNCTION taskrunner._move_task(uuid, taskrunner.task_status[], taskrunner.task_status, text, text) IS
'The common shape of cancel/pause/resume: lock, check the current status, move.';

CREATE FUNCTION taskrunner.cancel_task(p_id uuid) RETURNS taskrunner.task
LANGUAGE sql AS $$
    SELECT taskrunner._move_task(p_id, '{waiting,pending,paused,running}', 'canceled',
                                 'canceled', 'cancel')
$$;

COMMENT ON FUNCTION taskrunner.cancel_task(uuid) IS
'Cancel a waiting, pending, paused or running task (a running one fires its cancel
webhooks).';

CREATE FUNCTION taskrunner.pause_task(p_id uuid) RETURNS taskrunner.task
LANGUAGE sql AS $$
    SELECT taskrunner._move_task(p_id, '{waiting,pending}', 'paused', 'paused', 'pause')
$$;

COMMENT ON FUNCTION taskrunner.pause_task(uuid) IS
'Pause a waiting or pending task: claims skip it until resume_task().';

CREATE FUNCTION taskrunner.resume_task(p_id uuid) RETURNS taskrunner.task
LANGUAGE sql AS $$
    SELECT taskrunner._move_task(p_id, '{paused}', NULL, 'resumed', 'resume')
$$;

COMMENT ON FUNCTION taskrunner.resume_task(uuid) IS
'Resume a paused task: back to waiting or pending, per its dependency counters.';

CREATE FUNCTION taskrunner.add_counters(p_updates jsonb) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    v_count int;
BEGIN
    WITH u AS (
        SELECT (e ->> 'task_id')::uuid AS id,
               sum(coalesce((e ->> 'new_success')::bigint, 0)) AS s,
               sum(coalesce((e ->> 'new_failures')::bigint, 0)) AS f
        FROM jsonb_array_elements(p_updates) e GROUP BY 1
    ), locked AS (
        SELECT t.id FROM taskrunner.task t JOIN u ON u.id = t.id ORDER BY t.id FOR NO KEY UPDATE OF t
    ), upd AS (
        UPDATE taskrunner.task t
        SET success = t.success + u.s, failures = t.failures + u.f,
            last_updated = CASE WHEN t.status = 'running' THEN now() ELSE t.last_updated END
        FROM u, locked l
        WHERE t.id = u.id AND l.id = u.id
        RETURNING 1
    )
    SELECT count(*) INTO v_count FROM upd;
    RETURN v_count;
END $$;

COMMENT ON FUNCTION taskrunner.add_counters(jsonb) IS
'PUT /task: add progress counters to many tasks at once (rows locked in id order, so
concurrent flushes cannot deadlock). Running tasks also get a heartbeat.';

-- migrate:down

DROP FUNCTION taskrunner.add_counters(jsonb);
DROP FUNCTION taskrunner.resume_task(uuid);
DROP FUNCTION taskrunner.pause_task(uuid);
DROP FUNCTION taskrunner.cancel_task(uuid);
DROP FUNCTION taskrunner._move_task(uuid, taskrunner.task_status[], taskrunner.task_status, text, text);
DROP FUNCTION taskrunner.complete_tasks(jsonb);
DROP FUNCTION taskrunner.update_task(uuid, taskrunner.task_status, bigint, bigint, jsonb, text);
DROP FUNCTION taskrunner.create_batch(jsonb, text);
