-- migrate:up

-- Retention: delete batches whose tasks all ended long ago, with everything that hangs
-- off their tasks (dependencies, actions, deliveries, attempts, history) and their
-- summary rows (batch, batch_delta). The workers' housekeeping calls purge_finished()
-- when RETENTION_DAYS is set; a DBA may call it too.

-- Deleting an action makes its foreign key look up the deliveries that point at it: without
-- this index, one scan of the whole delivery table per action deleted.
CREATE INDEX delivery_action_idx ON taskrunner.delivery (action_id);

-- A batch may go when every task of it has ended before p_cutoff. Read from the task
-- rows (through task_batch_idx), so it is exact whatever the summary rows say.
CREATE FUNCTION taskrunner._batch_ended_before(p_batch uuid, p_cutoff timestamptz)
RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT NOT EXISTS (
        SELECT 1 FROM taskrunner.task t
        WHERE t.batch_id = p_batch
          AND (NOT taskrunner.is_terminal(t.status)
               OR coalesce(t.ended_at, t.last_updated) >= p_cutoff))
$$;

COMMENT ON FUNCTION taskrunner._batch_ended_before(uuid, timestamptz) IS
'Whether every task of the batch has ended before p_cutoff (purge_finished''s batch rule).';

-- A task of such a batch is kept while something still needs it: a task of another
-- batch that depends on it (the child never loses its parent: it goes once the child''s
-- batch goes), or a webhook of it that is still queued or in flight.
CREATE FUNCTION taskrunner._task_still_needed(p_task uuid, p_batch uuid)
RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
               SELECT 1 FROM taskrunner.dependency d
               JOIN taskrunner.task c ON c.id = d.child_id
               WHERE d.parent_id = p_task AND c.batch_id <> p_batch)
        OR EXISTS (
               SELECT 1 FROM taskrunner.delivery x
               WHERE x.task_id = p_task AND x.status IN ('queued', 'in_flight'))
$$;

COMMENT ON FUNCTION taskrunner._task_still_needed(uuid, uuid) IS
'Whether purge_finished must keep this task of an otherwise purgeable batch: a task of
another batch depends on it, or one of its webhooks is still queued or in flight.';

CREATE FUNCTION taskrunner.purge_finished(
    p_older_than interval, p_max_tasks int DEFAULT 1000,
    OUT batches int, OUT tasks int, OUT dependencies int, OUT actions int,
    OUT deliveries int, OUT attempts int, OUT history int)
LANGUAGE plpgsql AS $$
DECLARE
    v_cutoff timestamptz := now() - p_older_than;
    v_batch uuid;
    v_picked uuid[] := '{}';
    v_ids uuid[];
    v_batches uuid[];
BEGIN
    IF p_older_than IS NULL OR p_older_than < interval '0' THEN
        PERFORM taskrunner._raise('TR400', 'bad retention',
                                  'older_than: must be an interval of 0 or more');
    END IF;
    IF p_max_tasks IS NULL OR p_max_tasks < 1 THEN
        PERFORM taskrunner._raise('TR400', 'bad chunk size', 'max_tasks: must be 1 or more');
    END IF;
    IF NOT pg_try_advisory_xact_lock(hashtextextended('taskrunner.purge_finished', 0)) THEN
        RETURN;  -- another purge is running: every column NULL
    END IF;

    -- 1. Pick one chunk: tasks of the oldest batches that qualify, batch by batch, so a
    -- call reads the tasks of the batches it takes and no more. batch_summary's counts
    -- skip a batch with a task not yet ended without reading its tasks.
    FOR v_batch IN
        SELECT s.batch_id FROM taskrunner.batch_summary s
        WHERE s.first_created_at < v_cutoff
          AND s.waiting + s.pending + s.claimed + s.running + s.paused = 0
        ORDER BY s.first_created_at
    LOOP
        CONTINUE WHEN NOT taskrunner._batch_ended_before(v_batch, v_cutoff);
        v_picked := v_picked || ARRAY(
            SELECT t.id FROM taskrunner.task t
            WHERE t.batch_id = v_batch AND NOT taskrunner._task_still_needed(t.id, t.batch_id)
            LIMIT p_max_tasks - cardinality(v_picked));
        EXIT WHEN cardinality(v_picked) >= p_max_tasks;
    END LOOP;
    IF cardinality(v_picked) = 0 THEN
        batches := 0; tasks := 0; dependencies := 0; actions := 0;
        deliveries := 0; attempts := 0; history := 0;
        RETURN;
    END IF;

    -- 2. Lock them (FOR UPDATE, in id order like every locker of several tasks): this
    -- conflicts with the key-share lock that create_batch's new dependency row takes on
    -- an existing parent, so a batch linking to one of these tasks either committed
    -- before (step 3 sees its link and keeps the parent) or waits and then finds the
    -- parent gone (a 400, unknown dependency). Only ended tasks are locked: claims,
    -- which lock pending tasks, never wait for a purge.
    PERFORM 1 FROM taskrunner.task WHERE id = ANY (v_picked) ORDER BY id FOR UPDATE;

    -- 3. Check again on a new snapshot, taken after every lock was granted (a link, a
    -- rerun or a retried webhook may have committed meanwhile).
    SELECT array_agg(t.id), array_agg(DISTINCT t.batch_id) INTO v_ids, v_batches
    FROM taskrunner.task t
    WHERE t.id = ANY (v_picked)
      AND NOT taskrunner._task_still_needed(t.id, t.batch_id)
      AND t.batch_id IN (SELECT b FROM (SELECT DISTINCT x.batch_id FROM taskrunner.task x
                                         WHERE x.id = ANY (v_picked)) u(b)
                         WHERE taskrunner._batch_ended_before(b, v_cutoff));
    v_ids := coalesce(v_ids, '{}');

    -- 4. Delete, dependents first (set-based: the cascades then find nothing to do).
    DELETE FROM taskrunner.task_history WHERE task_id = ANY (v_ids);
    GET DIAGNOSTICS history = ROW_COUNT;
    DELETE FROM taskrunner.delivery_attempt a
    USING taskrunner.delivery d
    WHERE d.task_id = ANY (v_ids) AND a.delivery_id = d.id;
    GET DIAGNOSTICS attempts = ROW_COUNT;
    DELETE FROM taskrunner.delivery WHERE task_id = ANY (v_ids);
    GET DIAGNOSTICS deliveries = ROW_COUNT;
    DELETE FROM taskrunner.action WHERE task_id = ANY (v_ids);
    GET DIAGNOSTICS actions = ROW_COUNT;
    DELETE FROM taskrunner.dependency WHERE parent_id = ANY (v_ids) OR child_id = ANY (v_ids);
    GET DIAGNOSTICS dependencies = ROW_COUNT;
    DELETE FROM taskrunner.task WHERE id = ANY (v_ids);
    GET DIAGNOSTICS tasks = ROW_COUNT;

    -- 5. A batch left without tasks loses its summary rows. Under fold_batch_deltas'
    -- lock: a fold in progress must not add our deltas back into a batch row we delete.
    v_batches := ARRAY(SELECT b FROM unnest(v_batches) b
                       WHERE NOT EXISTS (SELECT 1 FROM taskrunner.task t WHERE t.batch_id = b));
    PERFORM pg_advisory_xact_lock(hashtextextended('taskrunner.fold_batch_deltas', 0));
    DELETE FROM taskrunner.batch_delta WHERE batch_id = ANY (v_batches);
    DELETE FROM taskrunner.batch WHERE batch_id = ANY (v_batches);
    GET DIAGNOSTICS batches = ROW_COUNT;
END $$;

COMMENT ON FUNCTION taskrunner.purge_finished(interval, int) IS
'Retention: delete one chunk (at most p_max_tasks tasks) of the batches whose tasks all
ended more than p_older_than ago, oldest batch first, with their dependencies, actions,
deliveries, delivery attempts and history; a batch left without tasks loses its batch and
batch_delta rows. Keeps a task that a task of another batch depends on (until that batch
goes) and one with a webhook still queued or in flight. Returns what it deleted (batches
counts batches removed entirely); every column NULL when another purge is running. Call
it again until tasks = 0. The workers call it each tick when RETENTION_DAYS is set.';

-- migrate:down

DROP FUNCTION taskrunner.purge_finished(interval, int);
DROP FUNCTION taskrunner._task_still_needed(uuid, uuid);
DROP FUNCTION taskrunner._batch_ended_before(uuid, timestamptz);
DROP INDEX taskrunner.delivery_action_idx;
