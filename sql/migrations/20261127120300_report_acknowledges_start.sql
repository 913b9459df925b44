-- migrate:up

-- A report through the handle (PATCH: update_task; PUT: add_counters) acknowledges the
-- start: started_at is set if it was not, so tick() does not restart a task whose target
-- got the start and reported back, and the previous run cannot complete a second one
-- (issue 13, item 6).

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
        -- a report through the handle proves the target got the start: acknowledged,
        -- so an expired start lease no longer puts the task back to pending (tick())
        started_at = coalesce(started_at, now()),
        last_updated = now()
    WHERE id = p_id
    RETURNING * INTO v_task;
    RETURN v_task;
END $$;

CREATE OR REPLACE FUNCTION taskrunner.add_counters(p_updates jsonb) RETURNS int
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
            last_updated = CASE WHEN t.status = 'running' THEN now() ELSE t.last_updated END,
            -- a report acknowledges the start (see update_task)
            started_at = CASE WHEN t.status = 'running' THEN coalesce(t.started_at, now())
                              ELSE t.started_at END
        FROM u, locked l
        WHERE t.id = u.id AND l.id = u.id
        RETURNING 1
    )
    SELECT count(*) INTO v_count FROM upd;
    RETURN v_count;
END $$;

COMMENT ON FUNCTION taskrunner.update_task(uuid, taskrunner.task_status, bigint, bigint, jsonb, text) IS
'PATCH /task/{id}: counters, metadata and the outcome of a running task. A report
acknowledges the start (started_at), so tick() does not restart the task.';

COMMENT ON FUNCTION taskrunner.add_counters(jsonb) IS
'PUT /task: add progress counters to many tasks at once (rows locked in id order, so
concurrent flushes cannot deadlock). Running tasks also get a heartbeat, and their
start is acknowledged (started_at), as by update_task.';

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

CREATE OR REPLACE FUNCTION taskrunner.add_counters(p_updates jsonb) RETURNS int
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

COMMENT ON FUNCTION taskrunner.update_task(uuid, taskrunner.task_status, bigint, bigint, jsonb, text) IS
'PATCH /task/{id}: counters, metadata and the outcome of a running task.';

COMMENT ON FUNCTION taskrunner.add_counters(jsonb) IS
'PUT /task: add progress counters to many tasks at once (rows locked in id order, so
concurrent flushes cannot deadlock). Running tasks also get a heartbeat.';
