-- migrate:up

-- The transition guard and what every status change does: history rows, the webhooks it
-- queues (the outbox), propagation (see the propagation migration), wake-ups and the
-- counters behind take_stats(). Triggers, so a DBA's UPDATE behaves like the API.

CREATE FUNCTION taskrunner._raise(p_code text, p_message text, p_detail text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = p_code, MESSAGE = p_message, DETAIL = coalesce(p_detail, '');
END $$;

COMMENT ON FUNCTION taskrunner._raise(text, text, text) IS
'Raise an error with a taskrunner SQLSTATE (TR400, TR404, TR409: the API maps them to
HTTP 400, 404, 409) and a detail ("field: problem" lines).';

CREATE FUNCTION taskrunner.is_terminal(p_status taskrunner.task_status)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p_status IN ('success', 'failure', 'canceled')
$$;

COMMENT ON FUNCTION taskrunner.is_terminal(taskrunner.task_status) IS
'True for the statuses a task ends in: success, failure, canceled.';

CREATE FUNCTION taskrunner.transition_allowed(p_from taskrunner.task_status,
                                              p_to taskrunner.task_status)
RETURNS boolean LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE p_from
        WHEN 'waiting' THEN p_to IN ('pending', 'paused', 'canceled', 'failure')
        WHEN 'pending' THEN p_to IN ('running', 'paused', 'canceled', 'failure')
        WHEN 'running' THEN p_to IN ('success', 'failure', 'canceled', 'pending')
        WHEN 'paused'  THEN p_to IN ('waiting', 'pending', 'canceled', 'failure')
        ELSE false
    END
$$;

COMMENT ON FUNCTION taskrunner.transition_allowed(taskrunner.task_status, taskrunner.task_status) IS
'The legal transitions (table in docs/sql.md); the transition guard raises TR409 for the
others.';

CREATE FUNCTION taskrunner._add_stats(p_lines text)
RETURNS void LANGUAGE sql AS $$
    SELECT set_config('taskrunner.stats',
        coalesce(nullif(current_setting('taskrunner.stats', true), ''), '') || p_lines, true)
$$;

COMMENT ON FUNCTION taskrunner._add_stats(text) IS
'Transitions counted in this transaction, for Prometheus (see take_stats()).';

CREATE FUNCTION taskrunner.take_stats() RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_stats text := nullif(current_setting('taskrunner.stats', true), '');
BEGIN
    PERFORM set_config('taskrunner.stats', '', true);
    RETURN v_stats;
END $$;

COMMENT ON FUNCTION taskrunner.take_stats() IS
'The transitions counted by triggers in this transaction ("from>to>kind>n;" lines, plus
"created>n;", "propagation>outcome>n;" and "blocked>n;"), then forget them.';

CREATE FUNCTION taskrunner.tg_task__guard_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.previous_status := OLD.status;
    IF NEW.status = OLD.status THEN
        RETURN NEW;
    END IF;
    IF NOT taskrunner.transition_allowed(OLD.status, NEW.status) THEN
        PERFORM taskrunner._raise('TR409',
            format('illegal transition %s -> %s for task %s', OLD.status, NEW.status, OLD.id),
            CASE WHEN taskrunner.is_terminal(OLD.status)
                 THEN format('status: task already ended as %s', OLD.status) END);
    END IF;
    IF NEW.status = 'pending' AND NEW.deps_finished < NEW.deps_total THEN
        PERFORM taskrunner._raise('TR409',
            format('task %s has %s unfinished dependencies', OLD.id,
                   NEW.deps_total - NEW.deps_finished));
    END IF;
    IF NEW.status_reason IS NOT DISTINCT FROM OLD.status_reason THEN
        NEW.status_reason := format('set to %s by %s', NEW.status, session_user);
    END IF;
    IF NEW.status = 'failure' AND NEW.failure_reason IS NULL THEN
        NEW.failure_reason := NEW.status_reason;
    END IF;
    NEW.last_updated := now();
    CASE
        WHEN NEW.status = 'running' THEN
            NEW.claimed_at := now();
            NEW.started_at := NULL;
        WHEN NEW.status = 'pending' AND OLD.status = 'running' THEN
            NEW.claimed_by := NULL;
            NEW.claimed_at := NULL;
            NEW.started_at := NULL;
        WHEN taskrunner.is_terminal(NEW.status) THEN
            NEW.ended_at := now();
        ELSE
            NULL;
    END CASE;
    RETURN NEW;
END $$;

COMMENT ON FUNCTION taskrunner.tg_task__guard_transition() IS
'Guard every status change (API, worker or a DBA''s UPDATE) and keep timestamps right.';

CREATE TRIGGER _100_guard_transition
BEFORE UPDATE ON taskrunner.task
FOR EACH ROW EXECUTE FUNCTION taskrunner.tg_task__guard_transition();

CREATE FUNCTION taskrunner.tg_task__guard_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status NOT IN ('waiting', 'pending', 'paused') THEN
        PERFORM taskrunner._raise('TR400',
            format('a new task must be waiting, pending or paused, not %s', NEW.status));
    END IF;
    RETURN NEW;
END $$;

COMMENT ON FUNCTION taskrunner.tg_task__guard_insert() IS
'A new task starts waiting, pending or paused.';

CREATE TRIGGER _100_guard_insert
BEFORE INSERT ON taskrunner.task
FOR EACH ROW EXECUTE FUNCTION taskrunner.tg_task__guard_insert();

CREATE FUNCTION taskrunner.tg_task__after_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_pending boolean;
    v_lines text;
BEGIN
    WITH hist AS (
        INSERT INTO taskrunner.task_history (task_id, from_status, to_status, reason)
        SELECT id, NULL, status, 'created' FROM new_rows
    )
    SELECT bool_or(status = 'pending'), format('created>%s;', count(*))
    INTO v_pending, v_lines FROM new_rows;
    PERFORM taskrunner._add_stats(v_lines);
    IF v_pending THEN
        PERFORM pg_notify('taskrunner_task', '');
    END IF;
    RETURN NULL;
END $$;

COMMENT ON FUNCTION taskrunner.tg_task__after_insert() IS
'After new tasks: history rows, and one wake-up when some are ready.';

CREATE TRIGGER _900_after_insert
AFTER INSERT ON taskrunner.task
REFERENCING NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION taskrunner.tg_task__after_insert();

CREATE FUNCTION taskrunner.tg_task__after_update() RETURNS trigger
LANGUAGE plpgsql AS $$
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

COMMENT ON FUNCTION taskrunner.tg_task__after_update() IS
'After any update of tasks, once per statement: write the history, queue the webhooks
that the transitions fire (the outbox), propagate ends through the graph and wake
workers (one NOTIFY per channel at most).';

CREATE TRIGGER _900_after_update
AFTER UPDATE ON taskrunner.task
REFERENCING NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION taskrunner.tg_task__after_update();

-- migrate:down

DROP TRIGGER _900_after_update ON taskrunner.task;
DROP TRIGGER _900_after_insert ON taskrunner.task;
DROP TRIGGER _100_guard_insert ON taskrunner.task;
DROP TRIGGER _100_guard_transition ON taskrunner.task;
DROP FUNCTION taskrunner.tg_task__after_update();
DROP FUNCTION taskrunner.tg_task__after_insert();
DROP FUNCTION taskrunner.tg_task__guard_insert();
DROP FUNCTION taskrunner.tg_task__guard_transition();
DROP FUNCTION taskrunner.take_stats();
DROP FUNCTION taskrunner._add_stats(text);
DROP FUNCTION taskrunner.transition_allowed(taskrunner.task_status, taskrunner.task_status);
DROP FUNCTION taskrunner.is_terminal(taskrunner.task_status);
DROP FUNCTION taskrunner._raise(text, text, text);
