-- Rerun: a failed or canceled task runs again, and so do the tasks downstream that failed
-- because of it (the cascade), without rebuilding the batch. POST /task/{id}/rerun and
-- POST /batch/{id}/rerun call rerun_task and rerun_batch; a DBA calls them the same way.
--
-- A rerun is the one way back from failure or canceled: the transition guard allows
-- failure/canceled -> waiting/pending (and pending -> waiting for a child that must wait
-- for a rerun parent again) only inside _rerun, which keeps the dependency counters,
-- the batch counts and the history right. A DBA's plain UPDATE of an ended task is still
-- refused (TR409).

-- migrate:up

-- Moves p_roots (failed or canceled tasks, checked by the caller) and their cascade back
-- to run. Steps:
--   1. no root may require the success of a failed or canceled task that is not rerun
--      with it: it would only fail again (TR409 naming that parent);
--   2. the cascade: children, through requires_success links, transitively, that failed
--      without running (claimed_at IS NULL: a parent's failure made them fail), but those
--      that another failed or canceled required parent, not rerun, holds down (and what
--      lies below them). Two recursive queries, so a 10,000-deep chain is one statement;
--   3. one UPDATE moves the rerun tasks back (pending if their finished parents allow,
--      else waiting): a new run, the previous run's outcome cleared. The place to reset
--      per-run state (a retry budget, a delayed start) is this UPDATE. A start delivery
--      of the previous run still in flight is dropped;
--   4. children that have not started (waiting, pending, paused) count a rerun parent as
--      unfinished again; a pending one goes back to waiting.
-- Dependency counters are recomputed from the parents' statuses (a task failed by the
-- cascade stopped counting its parents' ends). Tasks that already succeeded or ran are
-- left alone: the cascade stops at them.
--
-- Concurrency: reruns run one at a time (an advisory lock), so ended tasks, which only a
-- rerun moves, hold still meanwhile. The required parents of the tasks to rerun are
-- locked FOR SHARE before their statuses are checked, so none can fail unseen while this
-- transaction reruns its child (its failure then finds the child waiting and fails it
-- again). The tasks to change are locked in id order before the UPDATEs, which are
-- separate statements: under READ COMMITTED they see every end committed before the locks
-- were granted, and an end not yet committed propagates into the locked children after us.
-- Every join follows an index from a small set of tasks; as in _propagate, sequential
-- scans are discouraged (the planner cannot size the arrays and recursive work tables).
CREATE FUNCTION taskrunner._rerun(p_roots uuid[], p_reason text)
RETURNS TABLE (task_id uuid, batch_id uuid, from_status taskrunner.task_status,
               to_status taskrunner.task_status, role text)
LANGUAGE plpgsql
SET enable_seqscan TO 'off'
SET jit TO 'off'
AS $$
#variable_conflict use_column
DECLARE
    v_reach uuid[];
    v_all uuid[];
    v_children uuid[];
    v_blocker record;
BEGIN
    -- How these queries are written, for plans that stay proportional to the tasks they
    -- touch, whatever the table's size:
    -- * a task's status is read through "LATERAL (SELECT ... WHERE id = ... OFFSET 0)": a
    --   primary-key probe. Joined directly, a status test lets the planner scan the
    --   status index instead (every failed task, with its dead versions), once per level
    --   of a recursive query when the statistics are off;
    -- * array membership is "IN (SELECT unnest(...))", a hashed subplan, where
    --   "= ANY (...)" would compare with every element (a 10,000-task batch).

    -- 2a. what the cascade can reach: through requires_success links, tasks that failed
    --     without running. Ended tasks hold still (reruns take turns), so no lock yet.
    WITH RECURSIVE reach(id) AS (
        SELECT unnest(p_roots)
        UNION
        SELECT d.child_id
        FROM reach r
        JOIN taskrunner.dependency d ON d.parent_id = r.id AND d.requires_success
        CROSS JOIN LATERAL (SELECT c.status, c.claimed_at FROM taskrunner.task c
                            WHERE c.id = d.child_id OFFSET 0) c
        WHERE c.status = 'failure' AND c.claimed_at IS NULL
    )
    SELECT array_agg(id) INTO v_reach FROM reach;

    -- Their required parents, locked before their statuses are read (see above): every
    -- one, ended or not.
    PERFORM 1 FROM taskrunner.dependency d
    JOIN taskrunner.task p ON p.id = d.parent_id
    WHERE d.child_id = ANY (v_reach) AND d.requires_success
    ORDER BY p.id
    FOR SHARE OF p;

    -- 2b. the cascade: what the cascade reaches, but the tasks that a failed or canceled
    --     required parent not rerun holds down, and everything below those
    WITH RECURSIVE held(id) AS (
        SELECT d.child_id
        FROM taskrunner.dependency d
        CROSS JOIN LATERAL (SELECT p.status FROM taskrunner.task p
                            WHERE p.id = d.parent_id OFFSET 0) p
        WHERE d.child_id = ANY (v_reach) AND d.requires_success
          AND p.status IN ('failure', 'canceled')
          AND d.parent_id NOT IN (SELECT unnest(v_reach))
          AND d.child_id NOT IN (SELECT unnest(p_roots))
        UNION
        SELECT d.child_id
        FROM held h
        JOIN taskrunner.dependency d ON d.parent_id = h.id AND d.requires_success
        WHERE d.child_id IN (SELECT unnest(v_reach))
          AND d.child_id NOT IN (SELECT unnest(p_roots))
    )
    SELECT array_agg(r) INTO v_all
    FROM unnest(v_reach) r
    WHERE r NOT IN (SELECT id FROM held);

    -- 1. (now that the cascade is known) no root may require the success of a task that
    --    stays failed or canceled
    SELECT d.child_id, d.parent_id, p.status INTO v_blocker
    FROM taskrunner.dependency d
    CROSS JOIN LATERAL (SELECT p.status FROM taskrunner.task p
                        WHERE p.id = d.parent_id OFFSET 0) p
    WHERE d.child_id = ANY (p_roots) AND d.requires_success
      AND p.status IN ('failure', 'canceled') AND d.parent_id NOT IN (SELECT unnest(v_all))
    ORDER BY d.child_id, d.parent_id
    LIMIT 1;
    IF FOUND THEN
        PERFORM taskrunner._raise('TR409',
            format('cannot rerun task %s: it requires the success of task %s, which %s',
                   v_blocker.child_id, v_blocker.parent_id,
                   CASE WHEN v_blocker.status = 'canceled' THEN 'was canceled' ELSE 'failed' END),
            format('dependencies: task %s is %s; rerun it instead (its rerun reruns this '
                   'task too)', v_blocker.parent_id, v_blocker.status));
    END IF;

    -- the children that have not started, locked with the tasks to rerun; a child claimed
    -- (or canceled...) before we got its lock is left alone
    SELECT array_agg(DISTINCT d.child_id) INTO v_children
    FROM taskrunner.dependency d
    WHERE d.parent_id = ANY (v_all) AND d.child_id NOT IN (SELECT unnest(v_all));
    -- (deliveries before tasks, as finish_deliveries locks them)
    PERFORM 1 FROM taskrunner.delivery d
    WHERE d.task_id = ANY (v_all) AND d.event = 'start' AND d.status IN ('queued', 'in_flight')
    ORDER BY d.id
    FOR NO KEY UPDATE;
    PERFORM 1 FROM taskrunner.task t
    WHERE t.id = ANY (v_all || coalesce(v_children, '{}'))
    ORDER BY t.id
    FOR NO KEY UPDATE;
    SELECT array_agg(u.id) INTO v_children
    FROM unnest(v_children) u(id)
    CROSS JOIN LATERAL (SELECT t.status FROM taskrunner.task t
                        WHERE t.id = u.id OFFSET 0) t
    WHERE t.status IN ('waiting', 'pending', 'paused');

    PERFORM set_config('taskrunner.rerun', 'on', true);

    -- 3. the rerun tasks: a new run
    RETURN QUERY
    WITH counts AS (
        SELECT r.id,
               count(p.id) FILTER (WHERE taskrunner.is_terminal(p.status)
                                     AND p.id NOT IN (SELECT unnest(v_all))) AS finished,
               count(p.id) FILTER (WHERE p.status = 'success') AS succeeded,
               min(p.id::text) FILTER (WHERE p.id IN (SELECT unnest(v_all))) AS rerun_parent
        FROM unnest(v_all) r(id)
        LEFT JOIN taskrunner.dependency d ON d.child_id = r.id
        LEFT JOIN taskrunner.task p ON p.id = d.parent_id
        GROUP BY r.id
    ), moved AS (
        UPDATE taskrunner.task t
        SET status = CASE WHEN c.finished = t.deps_total THEN 'pending'
                          ELSE 'waiting' END::taskrunner.task_status,
            status_reason = CASE WHEN t.id IN (SELECT unnest(p_roots)) THEN p_reason
                                 ELSE format('dependency %s rerun', c.rerun_parent) END,
            deps_finished = c.finished,
            deps_succeeded = c.succeeded,
            failure_reason = NULL,
            claimed_by = NULL,
            claimed_at = NULL,
            started_at = NULL,
            ended_at = NULL,
            -- a new retry cycle: the rerun task gets all its runs again, due at once
            attempt = 0,
            not_before = NULL
        FROM counts c
        WHERE t.id = c.id  -- each failed or canceled: ended tasks hold still, see above
        RETURNING t.id, t.batch_id, t.previous_status, t.status,
                  CASE WHEN t.id IN (SELECT unnest(p_roots)) THEN 'rerun'
                       ELSE 'downstream' END AS role
    )
    SELECT * FROM moved ORDER BY 1;

    -- A start of an earlier run still in flight (a task canceled while its start webhook
    -- was being called) is dropped: its answer, arriving during the new run, is stale
    -- for finish_deliveries and tick, and cannot start or fail the new run.
    UPDATE taskrunner.delivery d
    SET status = 'canceled', finished_at = now(), lease_until = NULL,
        last_error = 'dropped: the task was rerun'
    WHERE d.task_id = ANY (v_all) AND d.event = 'start' AND d.status IN ('queued', 'in_flight');

    -- 4. children that have not started wait for their rerun parents again
    IF v_children IS NOT NULL THEN
        RETURN QUERY
        WITH counts AS (
            SELECT d.child_id AS id,
                   count(*) FILTER (WHERE taskrunner.is_terminal(p.status)) AS finished,
                   count(*) FILTER (WHERE p.status = 'success') AS succeeded,
                   min(p.id::text) FILTER (WHERE p.id IN (SELECT unnest(v_all))) AS rerun_parent
            FROM taskrunner.dependency d
            JOIN taskrunner.task p ON p.id = d.parent_id
            WHERE d.child_id = ANY (v_children)
            GROUP BY d.child_id
        ), moved AS (
            UPDATE taskrunner.task t
            SET status = CASE WHEN t.status = 'pending' AND c.finished < t.deps_total
                              THEN 'waiting' ELSE t.status END::taskrunner.task_status,
                status_reason = CASE WHEN t.status = 'pending' AND c.finished < t.deps_total
                                     THEN format('dependency %s rerun', c.rerun_parent)
                                     ELSE t.status_reason END,
                deps_finished = c.finished,
                deps_succeeded = c.succeeded
            FROM counts c
            WHERE t.id = c.id  -- locked while waiting, pending or paused, see above
            RETURNING t.id, t.batch_id, t.previous_status, t.status
        )
        SELECT m.id, m.batch_id, m.previous_status, m.status, 'waiting_again'
        FROM moved m
        WHERE m.status IS DISTINCT FROM m.previous_status
        ORDER BY m.id;
    END IF;

    PERFORM set_config('taskrunner.rerun', '', true);
END $$;
COMMENT ON FUNCTION taskrunner._rerun(uuid[], text) IS
'The work of rerun_task and rerun_batch: move failed/canceled p_roots (reason p_reason) and '
'their cascade back to run, and make the unstarted children of those wait for them again; '
'counters recomputed from the parents'' statuses. TR409 when a root requires the success '
'of a failed or canceled task that is not rerun with it. Call with the rerun lock held.';

CREATE FUNCTION taskrunner.rerun_task(p_id uuid)
RETURNS TABLE (task_id uuid, batch_id uuid, from_status taskrunner.task_status,
               to_status taskrunner.task_status, role text)
LANGUAGE plpgsql AS $$
DECLARE
    v_status taskrunner.task_status;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('taskrunner.rerun', 0));
    SELECT t.status INTO v_status FROM taskrunner.task t WHERE t.id = p_id;
    IF NOT FOUND THEN
        PERFORM taskrunner._raise('TR404', format('task %s not found', p_id),
                                  format('id: no task %s', p_id));
    END IF;
    IF v_status NOT IN ('failure', 'canceled') THEN
        PERFORM taskrunner._raise('TR409',
            format('cannot rerun task %s: it is %s', p_id, v_status),
            format('status: task is %s; only a failure or canceled task can be rerun',
                   v_status));
    END IF;
    RETURN QUERY
    SELECT * FROM taskrunner._rerun(ARRAY[p_id],
                                    format('rerun by %s', taskrunner.session_actor()));
END $$;
COMMENT ON FUNCTION taskrunner.rerun_task(uuid) IS
'POST /task/{id}/rerun: a failed or canceled task runs again (pending, or waiting for '
'unfinished parents), with the tasks downstream that failed because of it (back to '
'waiting); children that had not started wait for it again. Returns one row per task '
'whose status changed (role rerun, downstream or waiting_again). TR404; TR409 when the '
'task has not failed or been canceled, or requires the success of a task that failed or '
'was canceled (rerun that one instead).';

CREATE FUNCTION taskrunner.rerun_batch(p_batch uuid)
RETURNS TABLE (task_id uuid, batch_id uuid, from_status taskrunner.task_status,
               to_status taskrunner.task_status, role text)
LANGUAGE plpgsql AS $$
DECLARE
    v_roots uuid[];
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('taskrunner.rerun', 0));
    SELECT array_agg(t.id ORDER BY t.id) INTO v_roots
    FROM taskrunner.task t
    WHERE t.batch_id = p_batch AND t.status IN ('failure', 'canceled');
    IF v_roots IS NULL THEN
        IF NOT EXISTS (SELECT 1 FROM taskrunner.task t WHERE t.batch_id = p_batch) THEN
            PERFORM taskrunner._raise('TR404', format('batch %s not found', p_batch),
                                      format('id: no batch %s', p_batch));
        END IF;
        PERFORM taskrunner._raise('TR409',
            format('cannot rerun batch %s: no task of it failed or was canceled', p_batch),
            'status: no task of the batch is failure or canceled');
    END IF;
    RETURN QUERY
    SELECT * FROM taskrunner._rerun(v_roots,
                                    format('batch rerun by %s', taskrunner.session_actor()));
END $$;
COMMENT ON FUNCTION taskrunner.rerun_batch(uuid) IS
'POST /batch/{id}/rerun: rerun_task for every failed or canceled task of the batch, in '
'one transaction (their cascade in other batches too). Returns one row per task whose '
'status changed. TR404 for an unknown batch; TR409 when no task of it failed or was '
'canceled, or one requires the success of a failed or canceled task of another batch.';

-- The guard lets _rerun move ended tasks back (failure/canceled -> waiting/pending) and
-- pending children back to waiting; nothing else can.
CREATE OR REPLACE FUNCTION taskrunner.tg_task__guard_transition() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.previous_status := OLD.status;
    IF NEW.status = OLD.status THEN
        RETURN NEW;
    END IF;
    IF NOT taskrunner.transition_allowed(OLD.status, NEW.status)
       AND NOT (coalesce(current_setting('taskrunner.rerun', true), '') = 'on'
                AND OLD.status IN ('failure', 'canceled', 'pending')
                AND NEW.status IN ('waiting', 'pending')) THEN
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

DROP FUNCTION taskrunner.rerun_batch(uuid);
DROP FUNCTION taskrunner.rerun_task(uuid);
DROP FUNCTION taskrunner._rerun(uuid[], text);
