-- migrate:up

-- PATCH /task/{id} as ArcRun has it (issue 9, item 5): it takes priority, and its metadata
-- is merged into the task's (it replaced it). A merge can still change a value that a rule
-- of the task reads; _110_freeze_rule_fields refuses that (TR409 naming metadata.<field>),
-- as before.

-- The admission key (kind, priority, rules and the values the rules read) follows every
-- change of those columns, whoever makes it (PATCH, set_batch_rules, a DBA's UPDATE), so a
-- task that goes back to pending is claimed with the tasks that are now its equals.
CREATE FUNCTION taskrunner.tg_task__admission_key() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.admission_key := taskrunner._admission_key(NEW.kind, NEW.priority, NEW.rules,
                                                   NEW.metadata, NEW.expected_count);
    RETURN NEW;
END $$;

CREATE TRIGGER _120_admission_key
BEFORE UPDATE OF kind, priority, rules, metadata, expected_count ON taskrunner.task
FOR EACH ROW
WHEN (OLD.kind IS DISTINCT FROM NEW.kind OR OLD.priority IS DISTINCT FROM NEW.priority
      OR OLD.rules IS DISTINCT FROM NEW.rules OR OLD.metadata IS DISTINCT FROM NEW.metadata
      OR OLD.expected_count IS DISTINCT FROM NEW.expected_count)
EXECUTE FUNCTION taskrunner.tg_task__admission_key();

COMMENT ON FUNCTION taskrunner.tg_task__admission_key() IS
'Trigger: recompute admission_key when kind, priority, rules, metadata or expected_count
change (expected_count is in the key of a task with a capacity rule, see _admission_key).';

-- the trigger above covers expected_count too
DROP TRIGGER _120_capacity_key ON taskrunner.task;
DROP FUNCTION taskrunner.tg_task__capacity_key();

DROP FUNCTION taskrunner.update_task(uuid, taskrunner.task_status, bigint, bigint, jsonb, text, boolean, bigint);

CREATE FUNCTION taskrunner.update_task(p_id uuid, p_status taskrunner.task_status DEFAULT NULL::taskrunner.task_status, p_new_success bigint DEFAULT NULL::bigint, p_new_failures bigint DEFAULT NULL::bigint, p_metadata jsonb DEFAULT NULL::jsonb, p_failure_reason text DEFAULT NULL::text, p_retryable boolean DEFAULT NULL, p_expected_count bigint DEFAULT NULL, p_priority int DEFAULT NULL)
 RETURNS taskrunner.task
 LANGUAGE plpgsql
AS $$
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
    IF p_retryable IS NOT NULL AND p_status IS DISTINCT FROM 'failure' THEN
        PERFORM taskrunner._raise('TR400', 'invalid retryable',
                                  'retryable: only allowed when status is Failure');
    END IF;
    IF p_expected_count < 0 THEN
        PERFORM taskrunner._raise('TR400', 'invalid expected_count',
                                  'expected_count: must be at least 0');
    END IF;
    IF p_expected_count IS NOT NULL THEN
        -- a larger expected_count grows the remaining work that capacity rules of the
        -- task's kind count: change it under the lock their claims take (_lock_group),
        -- before the row lock, in the order claims take them
        PERFORM pg_advisory_xact_lock(hashtextextended('taskrunner.kind:' || t.kind, 0))
        FROM taskrunner.task t WHERE t.id = p_id;
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
        -- merged, as ArcRun does: the keys given replace theirs, the others stay
        metadata = metadata || coalesce(p_metadata, '{}'),
        expected_count = coalesce(p_expected_count, expected_count),
        priority = coalesce(p_priority, priority),
        status = coalesce(p_status, status),
        failure_reason = CASE WHEN p_status = 'failure' THEN p_failure_reason ELSE failure_reason END,
        status_reason = CASE WHEN p_status IS NULL THEN status_reason
                             ELSE format('reported %s', p_status) END,
        -- not retryable: this run is the last (see tg_task__retry)
        max_attempts = CASE WHEN p_status = 'failure' AND p_retryable IS FALSE
                            THEN least(max_attempts, greatest(attempt, 1))
                            ELSE max_attempts END,
        -- a report through the handle proves the target got the start: acknowledged,
        -- so an expired start lease no longer puts the task back to pending (tick())
        started_at = coalesce(started_at, now()),
        last_updated = now()
    WHERE id = p_id
    RETURNING * INTO v_task;
    IF v_task.status = 'running' AND v_task.expected_count IS NOT NULL
       AND (p_new_success > 0 OR p_new_failures > 0 OR p_expected_count IS NOT NULL) THEN
        PERFORM pg_notify('taskrunner_task', '');  -- less remaining work: capacity freed
    END IF;
    RETURN v_task;
END $$;

COMMENT ON FUNCTION taskrunner.update_task(uuid, taskrunner.task_status, bigint, bigint, jsonb, text, boolean, bigint, int) IS
'PATCH /task/{id}: counters, metadata (merged into the task''s: the keys given replace
theirs), priority, expected_count (>= 0) and the outcome of a running task. A report
acknowledges the start (started_at), so tick() does not restart the task. A failure with
runs left is retried (see tg_task__retry) unless p_retryable is false. Progress on a task
with an expected_count wakes the workers (capacity rules may admit more).';

-- migrate:down

DROP FUNCTION taskrunner.update_task(uuid, taskrunner.task_status, bigint, bigint, jsonb, text, boolean, bigint, int);

CREATE FUNCTION taskrunner.update_task(p_id uuid, p_status taskrunner.task_status DEFAULT NULL::taskrunner.task_status, p_new_success bigint DEFAULT NULL::bigint, p_new_failures bigint DEFAULT NULL::bigint, p_metadata jsonb DEFAULT NULL::jsonb, p_failure_reason text DEFAULT NULL::text, p_retryable boolean DEFAULT NULL, p_expected_count bigint DEFAULT NULL)
 RETURNS taskrunner.task
 LANGUAGE plpgsql
AS $$
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
    IF p_retryable IS NOT NULL AND p_status IS DISTINCT FROM 'failure' THEN
        PERFORM taskrunner._raise('TR400', 'invalid retryable',
                                  'retryable: only allowed when status is Failure');
    END IF;
    IF p_expected_count < 0 THEN
        PERFORM taskrunner._raise('TR400', 'invalid expected_count',
                                  'expected_count: must be at least 0');
    END IF;
    IF p_expected_count IS NOT NULL THEN
        -- a larger expected_count grows the remaining work that capacity rules of the
        -- task's kind count: change it under the lock their claims take (_lock_group),
        -- before the row lock, in the order claims take them
        PERFORM pg_advisory_xact_lock(hashtextextended('taskrunner.kind:' || t.kind, 0))
        FROM taskrunner.task t WHERE t.id = p_id;
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
        expected_count = coalesce(p_expected_count, expected_count),
        status = coalesce(p_status, status),
        failure_reason = CASE WHEN p_status = 'failure' THEN p_failure_reason ELSE failure_reason END,
        status_reason = CASE WHEN p_status IS NULL THEN status_reason
                             ELSE format('reported %s', p_status) END,
        -- not retryable: this run is the last (see tg_task__retry)
        max_attempts = CASE WHEN p_status = 'failure' AND p_retryable IS FALSE
                            THEN least(max_attempts, greatest(attempt, 1))
                            ELSE max_attempts END,
        -- a report through the handle proves the target got the start: acknowledged,
        -- so an expired start lease no longer puts the task back to pending (tick())
        started_at = coalesce(started_at, now()),
        last_updated = now()
    WHERE id = p_id
    RETURNING * INTO v_task;
    IF v_task.status = 'running' AND v_task.expected_count IS NOT NULL
       AND (p_new_success > 0 OR p_new_failures > 0 OR p_expected_count IS NOT NULL) THEN
        PERFORM pg_notify('taskrunner_task', '');  -- less remaining work: capacity freed
    END IF;
    RETURN v_task;
END $$;

COMMENT ON FUNCTION taskrunner.update_task(uuid, taskrunner.task_status, bigint, bigint, jsonb,
                                           text, boolean, bigint) IS
'PATCH /task/{id}: counters, metadata, expected_count (>= 0) and the outcome of a running
task. A report acknowledges the start (started_at), so tick() does not restart the task.
A failure with runs left is retried (see tg_task__retry) unless p_retryable is false.
Progress on a task with an expected_count wakes the workers (capacity rules may admit
more).';

CREATE FUNCTION taskrunner.tg_task__capacity_key() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.admission_key := taskrunner._admission_key(NEW.kind, NEW.priority, NEW.rules,
                                                   NEW.metadata, NEW.expected_count);
    RETURN NEW;
END $$;

CREATE TRIGGER _120_capacity_key
BEFORE UPDATE OF expected_count ON taskrunner.task
FOR EACH ROW
WHEN (OLD.expected_count IS DISTINCT FROM NEW.expected_count
      AND NEW.rules @> '[{"type": "capacity"}]'::jsonb)
EXECUTE FUNCTION taskrunner.tg_task__capacity_key();

COMMENT ON FUNCTION taskrunner.tg_task__capacity_key() IS
'Trigger: a task with a capacity rule whose expected_count changes gets its admission key
recomputed (the key includes the expected_count, see _admission_key).';

DROP TRIGGER _120_admission_key ON taskrunner.task;
DROP FUNCTION taskrunner.tg_task__admission_key();
