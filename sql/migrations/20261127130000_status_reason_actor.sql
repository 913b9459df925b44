-- Who made a change. A transition whose statement sets no status_reason used to read
-- "set to success by taskrunner" (the role), whether a DBA's psql UPDATE or a worker made
-- it. Now the reason names the session's application_name (the API and workers set
-- taskrunner-api and taskrunner-worker, psql sets psql) and its role, and every history
-- row records the same in a new column, actor.

-- migrate:up

-- "psql (role alice)", "taskrunner-worker (role taskrunner)", or the role alone when the
-- session set no application_name.
CREATE FUNCTION taskrunner.session_actor() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN coalesce(current_setting('application_name', true), '') = ''
                THEN session_user::text
                ELSE format('%s (role %s)', current_setting('application_name', true),
                            session_user) END
$$;

-- Filled by the default: history rows are written by triggers in the session that made
-- the change. Rows written before this migration keep NULL (not known).
ALTER TABLE taskrunner.task_history ADD COLUMN actor text;
ALTER TABLE taskrunner.task_history ALTER COLUMN actor SET DEFAULT taskrunner.session_actor();

COMMENT ON FUNCTION taskrunner.session_actor() IS
'Who the current session is, for history and reasons: "<application_name> (role <role>)", '
'or the role alone when the session set no application_name. The API and workers set '
'taskrunner-api and taskrunner-worker; psql sets psql.';
COMMENT ON COLUMN taskrunner.task_history.actor IS
'Who made the transition (taskrunner.session_actor() of the session that made it); NULL '
'for rows written before this column existed.';

CREATE OR REPLACE FUNCTION taskrunner.tg_task__guard_transition() RETURNS trigger
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
        -- say who: the API, a worker, or a DBA's session (psql sets application_name)
        NEW.status_reason := format('set to %s by %s', initcap(NEW.status::text),
                                    taskrunner.session_actor());
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

-- migrate:down

CREATE OR REPLACE FUNCTION taskrunner.tg_task__guard_transition() RETURNS trigger
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

ALTER TABLE taskrunner.task_history DROP COLUMN actor;
DROP FUNCTION taskrunner.session_actor();
