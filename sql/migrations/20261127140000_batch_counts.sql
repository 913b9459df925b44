-- migrate:up

-- Per-batch counts without a hot row and without scanning tasks on read.
--
-- `batch` holds one row per batch: what is fixed at creation (first_seq, requester,
-- first_created_at, kinds) and the counts as of the last fold. Statements that change
-- tasks never update it: a statement-level trigger appends what the statement changed
-- (one `batch_delta` row per batch touched, inserts only, so concurrent claims of one
-- batch never wait on each other and can never deadlock on it). `fold_batch_deltas()`,
-- run by the workers' housekeeping tick, adds the deltas into `batch` and deletes them.
-- The `batch_summary` view adds the batch row and its (few) unfolded deltas, so it is
-- exact at any time, folded or not.
--
-- `claimed` counts running tasks whose start webhook has not been acknowledged yet
-- (started_at IS NULL: ArcRun's state between claim and start); `running` counts the
-- others, so the counts add up to the total.

CREATE TABLE taskrunner.batch (
    batch_id uuid PRIMARY KEY,
    first_seq bigint NOT NULL,
    requester text,
    first_created_at timestamptz NOT NULL,
    latest_updated_at timestamptz NOT NULL,
    kinds text[] NOT NULL,
    total bigint NOT NULL DEFAULT 0,
    waiting bigint NOT NULL DEFAULT 0,
    pending bigint NOT NULL DEFAULT 0,
    claimed bigint NOT NULL DEFAULT 0,
    running bigint NOT NULL DEFAULT 0,
    success bigint NOT NULL DEFAULT 0,
    failure bigint NOT NULL DEFAULT 0,
    paused bigint NOT NULL DEFAULT 0,
    canceled bigint NOT NULL DEFAULT 0,
    sum_success numeric NOT NULL DEFAULT 0,
    sum_failures numeric NOT NULL DEFAULT 0
);
COMMENT ON TABLE taskrunner.batch IS
    'One row per batch: creation facts and counts as of the last fold_batch_deltas(); read '
    'batch_summary for exact figures.';

-- Newest first (GET /batches) and the created_after/created_before filters.
CREATE INDEX batch_first_seq_idx ON taskrunner.batch (first_seq DESC);
CREATE INDEX batch_first_created_idx ON taskrunner.batch (first_created_at DESC);

CREATE TABLE taskrunner.batch_delta (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch_id uuid NOT NULL,
    latest_updated_at timestamptz,
    total bigint NOT NULL DEFAULT 0,
    waiting bigint NOT NULL DEFAULT 0,
    pending bigint NOT NULL DEFAULT 0,
    claimed bigint NOT NULL DEFAULT 0,
    running bigint NOT NULL DEFAULT 0,
    success bigint NOT NULL DEFAULT 0,
    failure bigint NOT NULL DEFAULT 0,
    paused bigint NOT NULL DEFAULT 0,
    canceled bigint NOT NULL DEFAULT 0,
    sum_success numeric NOT NULL DEFAULT 0,
    sum_failures numeric NOT NULL DEFAULT 0
);
COMMENT ON TABLE taskrunner.batch_delta IS
    'Append-only changes of batch counts, one row per statement and batch; folded into '
    'batch by fold_batch_deltas().';
CREATE INDEX batch_delta_batch_idx ON taskrunner.batch_delta (batch_id);

-- The status_counts bucket of a task: running splits into claimed (start not acknowledged)
-- and running.
CREATE FUNCTION taskrunner._batch_bucket(p_status taskrunner.task_status, p_started_at timestamptz)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN p_status = 'running' AND p_started_at IS NULL THEN 'claimed'
                ELSE p_status::text END
$$;

-- One task row leaving (sign -1) or arriving (+1) in a batch's counts.
CREATE TYPE taskrunner.batch_change AS (
    batch_id uuid,
    sign int,
    bucket text,
    success bigint,
    failures bigint,
    last_updated timestamptz
);

-- Append the net change of one statement: one batch_delta row per batch whose counts,
-- counter sums or latest update time moved.
CREATE FUNCTION taskrunner._add_batch_deltas(p_changes taskrunner.batch_change[])
RETURNS void LANGUAGE sql AS $$
    INSERT INTO taskrunner.batch_delta (batch_id, latest_updated_at, total, waiting, pending,
                                        claimed, running, success, failure, paused, canceled,
                                        sum_success, sum_failures)
    SELECT batch_id, latest_updated_at, total, waiting, pending, claimed, running, success,
           failure, paused, canceled, sum_success, sum_failures
    FROM (SELECT batch_id,
                 max(last_updated) FILTER (WHERE sign = 1) AS latest_updated_at,
                 max(last_updated) FILTER (WHERE sign = -1) AS previous_updated_at,
                 sum(sign) AS total,
                 coalesce(sum(sign) FILTER (WHERE bucket = 'waiting'), 0) AS waiting,
                 coalesce(sum(sign) FILTER (WHERE bucket = 'pending'), 0) AS pending,
                 coalesce(sum(sign) FILTER (WHERE bucket = 'claimed'), 0) AS claimed,
                 coalesce(sum(sign) FILTER (WHERE bucket = 'running'), 0) AS running,
                 coalesce(sum(sign) FILTER (WHERE bucket = 'success'), 0) AS success,
                 coalesce(sum(sign) FILTER (WHERE bucket = 'failure'), 0) AS failure,
                 coalesce(sum(sign) FILTER (WHERE bucket = 'paused'), 0) AS paused,
                 coalesce(sum(sign) FILTER (WHERE bucket = 'canceled'), 0) AS canceled,
                 sum(sign * success) AS sum_success,
                 sum(sign * failures) AS sum_failures
          FROM unnest(p_changes) c
          GROUP BY batch_id) d
    -- a statement that moved nothing (e.g. a no-op UPDATE) leaves no row
    WHERE total <> 0 OR waiting <> 0 OR pending <> 0 OR claimed <> 0 OR running <> 0
       OR success <> 0 OR failure <> 0 OR paused <> 0 OR canceled <> 0
       OR sum_success <> 0 OR sum_failures <> 0
       OR latest_updated_at > previous_updated_at
$$;

-- New tasks: a new batch gets its row at once (create_batch always makes a new batch id;
-- a DBA's INSERT into an existing batch adds to its row).
CREATE FUNCTION taskrunner.tg_task__batch_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO taskrunner.batch AS b (batch_id, first_seq, requester, first_created_at,
                                       latest_updated_at, kinds, total, waiting, pending,
                                       paused, sum_success, sum_failures)
    SELECT batch_id, min(seq), min(requester), min(created_at), max(last_updated),
           array_agg(DISTINCT kind ORDER BY kind), count(*),
           count(*) FILTER (WHERE status = 'waiting'),
           count(*) FILTER (WHERE status = 'pending'),
           count(*) FILTER (WHERE status = 'paused'),
           sum(success), sum(failures)
    FROM new_rows
    GROUP BY batch_id
    ORDER BY batch_id
    ON CONFLICT (batch_id) DO UPDATE
    SET first_seq = least(b.first_seq, excluded.first_seq),
        first_created_at = least(b.first_created_at, excluded.first_created_at),
        latest_updated_at = greatest(b.latest_updated_at, excluded.latest_updated_at),
        kinds = ARRAY(SELECT DISTINCT k FROM unnest(b.kinds || excluded.kinds) k ORDER BY k),
        total = b.total + excluded.total,
        waiting = b.waiting + excluded.waiting,
        pending = b.pending + excluded.pending,
        paused = b.paused + excluded.paused,
        sum_success = b.sum_success + excluded.sum_success,
        sum_failures = b.sum_failures + excluded.sum_failures;
    RETURN NULL;
END $$;

CREATE FUNCTION taskrunner.tg_task__batch_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM taskrunner._add_batch_deltas(ARRAY(
        SELECT ROW(batch_id, -1, taskrunner._batch_bucket(status, started_at), success,
                   failures, last_updated)::taskrunner.batch_change
        FROM old_rows
        UNION ALL
        SELECT ROW(batch_id, 1, taskrunner._batch_bucket(status, started_at), success,
                   failures, last_updated)::taskrunner.batch_change
        FROM new_rows));
    RETURN NULL;
END $$;

CREATE FUNCTION taskrunner.tg_task__batch_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM taskrunner._add_batch_deltas(ARRAY(
        SELECT ROW(batch_id, -1, taskrunner._batch_bucket(status, started_at), success,
                   failures, NULL)::taskrunner.batch_change
        FROM old_rows));
    RETURN NULL;
END $$;

CREATE TRIGGER _500_batch_counts_insert
AFTER INSERT ON taskrunner.task
REFERENCING NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION taskrunner.tg_task__batch_insert();

CREATE TRIGGER _500_batch_counts_update
AFTER UPDATE ON taskrunner.task
REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
FOR EACH STATEMENT EXECUTE FUNCTION taskrunner.tg_task__batch_update();

CREATE TRIGGER _500_batch_counts_delete
AFTER DELETE ON taskrunner.task
REFERENCING OLD TABLE AS old_rows
FOR EACH STATEMENT EXECUTE FUNCTION taskrunner.tg_task__batch_delete();

-- TRUNCATE of the tasks (bench/env.py's reset, a DBA's clean slate) fires no row triggers:
-- empty the counts with them.
CREATE FUNCTION taskrunner.tg_task__batch_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE taskrunner.batch, taskrunner.batch_delta;
    RETURN NULL;
END $$;

CREATE TRIGGER _500_batch_counts_truncate
AFTER TRUNCATE ON taskrunner.task
FOR EACH STATEMENT EXECUTE FUNCTION taskrunner.tg_task__batch_truncate();

-- Add the deltas into the batch rows and delete them. One caller at a time (others get
-- NULL at once); batch rows are locked in batch_id order. Deltas of transactions still
-- open are not visible yet and are folded by a later call.
CREATE FUNCTION taskrunner.fold_batch_deltas() RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    v_folded int;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtextextended('taskrunner.fold_batch_deltas', 0)) THEN
        RETURN NULL;
    END IF;
    WITH gone AS (
        DELETE FROM taskrunner.batch_delta RETURNING *
    ), sums AS (
        SELECT batch_id, max(latest_updated_at) AS latest_updated_at, sum(total) AS total,
               sum(waiting) AS waiting, sum(pending) AS pending, sum(claimed) AS claimed,
               sum(running) AS running, sum(success) AS success, sum(failure) AS failure,
               sum(paused) AS paused, sum(canceled) AS canceled,
               sum(sum_success) AS sum_success, sum(sum_failures) AS sum_failures
        FROM gone GROUP BY batch_id
    ), locked AS (
        SELECT b.batch_id FROM taskrunner.batch b
        WHERE b.batch_id IN (SELECT batch_id FROM sums)
        ORDER BY b.batch_id FOR NO KEY UPDATE
    ), folded AS (
        UPDATE taskrunner.batch b
        SET latest_updated_at = greatest(b.latest_updated_at, s.latest_updated_at),
            total = b.total + s.total, waiting = b.waiting + s.waiting,
            pending = b.pending + s.pending, claimed = b.claimed + s.claimed,
            running = b.running + s.running, success = b.success + s.success,
            failure = b.failure + s.failure, paused = b.paused + s.paused,
            canceled = b.canceled + s.canceled,
            sum_success = b.sum_success + s.sum_success,
            sum_failures = b.sum_failures + s.sum_failures
        FROM sums s, locked l
        WHERE b.batch_id = s.batch_id AND l.batch_id = s.batch_id
        RETURNING 1
    )
    SELECT count(*) INTO v_folded FROM folded;
    RETURN v_folded;
END $$;
COMMENT ON FUNCTION taskrunner.fold_batch_deltas() IS
    'Adds batch_delta rows into batch and deletes them; run by the workers'' tick. Returns '
    'the batches folded, NULL when another call is folding.';

-- Every batch with its exact counts: the folded row plus its unfolded deltas (few: the
-- tick folds them every second), found per batch through batch_delta_batch_idx. A page of
-- GET /batches costs one probe per batch it reads, whatever the batches' sizes.
CREATE VIEW taskrunner.batch_summary AS
SELECT b.batch_id, b.requester, b.first_seq, b.first_created_at,
       greatest(b.latest_updated_at, d.latest_updated_at) AS latest_updated_at, b.kinds,
       b.total + d.total AS total_tasks,
       b.waiting + d.waiting AS waiting,
       b.pending + d.pending AS pending,
       b.claimed + d.claimed AS claimed,
       b.running + d.running AS running,
       b.success + d.success AS success,
       b.failure + d.failure AS failure,
       b.paused + d.paused AS paused,
       b.canceled + d.canceled AS canceled,
       (b.sum_success + d.sum_success)::bigint AS total_success,
       (b.sum_failures + d.sum_failures)::bigint AS total_failures
FROM taskrunner.batch b
CROSS JOIN LATERAL (
    SELECT max(x.latest_updated_at) AS latest_updated_at,
           coalesce(sum(x.total), 0)::bigint AS total,
           coalesce(sum(x.waiting), 0)::bigint AS waiting,
           coalesce(sum(x.pending), 0)::bigint AS pending,
           coalesce(sum(x.claimed), 0)::bigint AS claimed,
           coalesce(sum(x.running), 0)::bigint AS running,
           coalesce(sum(x.success), 0)::bigint AS success,
           coalesce(sum(x.failure), 0)::bigint AS failure,
           coalesce(sum(x.paused), 0)::bigint AS paused,
           coalesce(sum(x.canceled), 0)::bigint AS canceled,
           coalesce(sum(x.sum_success), 0) AS sum_success,
           coalesce(sum(x.sum_failures), 0) AS sum_failures
    FROM taskrunner.batch_delta x
    WHERE x.batch_id = b.batch_id) d
WHERE b.total + d.total > 0;
COMMENT ON VIEW taskrunner.batch_summary IS
    'Every batch with exact counts per status (claimed = running, start not yet '
    'acknowledged), counter sums, kinds, first creation and latest update; GET /batches '
    'and GET /batch/{id} read it.';

-- Existing tasks. The triggers above exist already and hold a lock that keeps task writers
-- out until this migration commits, so no change is counted twice or missed.
INSERT INTO taskrunner.batch (batch_id, first_seq, requester, first_created_at,
                              latest_updated_at, kinds, total, waiting, pending, claimed,
                              running, success, failure, paused, canceled, sum_success,
                              sum_failures)
SELECT batch_id, min(seq), min(requester), min(created_at), max(last_updated),
       array_agg(DISTINCT kind ORDER BY kind), count(*),
       count(*) FILTER (WHERE taskrunner._batch_bucket(status, started_at) = 'waiting'),
       count(*) FILTER (WHERE taskrunner._batch_bucket(status, started_at) = 'pending'),
       count(*) FILTER (WHERE taskrunner._batch_bucket(status, started_at) = 'claimed'),
       count(*) FILTER (WHERE taskrunner._batch_bucket(status, started_at) = 'running'),
       count(*) FILTER (WHERE taskrunner._batch_bucket(status, started_at) = 'success'),
       count(*) FILTER (WHERE taskrunner._batch_bucket(status, started_at) = 'failure'),
       count(*) FILTER (WHERE taskrunner._batch_bucket(status, started_at) = 'paused'),
       count(*) FILTER (WHERE taskrunner._batch_bucket(status, started_at) = 'canceled'),
       sum(success), sum(failures)
FROM taskrunner.task
GROUP BY batch_id;

-- migrate:down

DROP VIEW taskrunner.batch_summary;
DROP FUNCTION taskrunner.fold_batch_deltas();
DROP TRIGGER _500_batch_counts_truncate ON taskrunner.task;
DROP FUNCTION taskrunner.tg_task__batch_truncate();
DROP TRIGGER _500_batch_counts_delete ON taskrunner.task;
DROP TRIGGER _500_batch_counts_update ON taskrunner.task;
DROP TRIGGER _500_batch_counts_insert ON taskrunner.task;
DROP FUNCTION taskrunner.tg_task__batch_delete();
DROP FUNCTION taskrunner.tg_task__batch_update();
DROP FUNCTION taskrunner.tg_task__batch_insert();
DROP FUNCTION taskrunner._add_batch_deltas(taskrunner.batch_change[]);
DROP TYPE taskrunner.batch_change;
DROP FUNCTION taskrunner._batch_bucket(taskrunner.task_status, timestamptz);
DROP TABLE taskrunner.batch_delta;
DROP TABLE taskrunner.batch;
