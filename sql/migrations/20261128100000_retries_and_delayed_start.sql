-- migrate:up

-- Task retries and delayed start (issue 9, items 1 and 2).
--
-- Retries: a task carries max_attempts (runs in all; 1 = no retry) and an exponential
-- backoff. When a run fails (its start webhook gave up, it timed out, or the target
-- reported Failure) and runs remain, the trigger _090_retry turns the failure into a
-- move back to pending, not claimable before the backoff elapses: no end webhook, no
-- cascade, the children keep waiting. It sits before the transition guard, so the guard
-- checks and stamps the move that really happens (running -> pending), and it catches
-- every path that fails a running task, a DBA's UPDATE included, with no change to them.
--
-- Delayed start: not_before. A pending task whose not_before is set is kept out of the
-- claim index (task_pending_claim_idx gains "not_before IS NULL"), so scheduled tasks
-- cost claims nothing; claim_tasks first clears not_before of the tasks that fell due
-- (through task_not_before_idx), which puts them in the index. next_wakeup() tells idle
-- workers when to look next. Retries reuse not_before for their backoff.

ALTER TABLE taskrunner.task
    ADD COLUMN attempt integer NOT NULL DEFAULT 0,
    ADD COLUMN max_attempts integer NOT NULL DEFAULT 1,
    ADD COLUMN backoff_seconds double precision NOT NULL DEFAULT 5,
    ADD COLUMN backoff_max_seconds double precision NOT NULL DEFAULT 300,
    ADD COLUMN not_before timestamp with time zone,
    ADD CONSTRAINT task_retry_range CHECK (
        attempt >= 0 AND max_attempts BETWEEN 1 AND 100
        AND backoff_seconds BETWEEN 0 AND 86400
        AND backoff_max_seconds BETWEEN backoff_seconds AND 86400);

COMMENT ON COLUMN taskrunner.task.attempt IS
'The current run: 1 at the first claim, n at the n-th. A start that never got going (its
lease expired, its worker shut down) does not count: the task goes back to pending with
the run it had.';
COMMENT ON COLUMN taskrunner.task.max_attempts IS
'Runs in all (1 = no retry). A failed run with runs left goes back to pending after a
backoff (_090_retry). A failure reported with retryable = false sets it to attempt.';
COMMENT ON COLUMN taskrunner.task.backoff_seconds IS
'The backoff before the first retry; doubled per retry, capped at backoff_max_seconds,
with jitter (see _retry_delay).';
COMMENT ON COLUMN taskrunner.task.backoff_max_seconds IS
'The longest backoff between two runs.';
COMMENT ON COLUMN taskrunner.task.not_before IS
'A pending task is not claimed before this time (delayed start, retry backoff). Claims
clear it once due, so NULL means "claimable now" (or never scheduled).';

DROP INDEX taskrunner.task_pending_claim_idx;
CREATE INDEX task_pending_claim_idx ON taskrunner.task (admission_key, priority DESC, seq)
    WHERE status = 'pending' AND not_before IS NULL;
COMMENT ON INDEX taskrunner.task_pending_claim_idx IS
'Claims: one head per admission group (skip scan over admission_key). Scheduled tasks
(not_before set) stay out until due.';
CREATE INDEX task_not_before_idx ON taskrunner.task (not_before)
    WHERE status = 'pending' AND not_before IS NOT NULL;
COMMENT ON INDEX taskrunner.task_not_before_idx IS
'Scheduled pending tasks by due time: claims promote the due ones, next_wakeup() reads the
earliest.';

CREATE OR REPLACE VIEW taskrunner._claim_groups AS
WITH RECURSIVE keys(k) AS (
    (SELECT admission_key FROM taskrunner.task WHERE status = 'pending' AND not_before IS NULL
     ORDER BY admission_key LIMIT 1)
    UNION ALL
    SELECT (SELECT t.admission_key FROM taskrunner.task t
            WHERE t.status = 'pending' AND t.not_before IS NULL AND t.admission_key > keys.k
            ORDER BY t.admission_key LIMIT 1)
    FROM keys WHERE keys.k IS NOT NULL
)
SELECT h.* FROM keys
CROSS JOIN LATERAL (
    SELECT t.admission_key, t.kind, t.rules, t.metadata, t.priority, t.seq
    FROM taskrunner.task t
    WHERE t.status = 'pending' AND t.not_before IS NULL AND t.admission_key = keys.k
    ORDER BY t.priority DESC, t.seq LIMIT 1) h
WHERE keys.k IS NOT NULL
ORDER BY h.priority DESC, h.seq;

CREATE FUNCTION taskrunner._retry_delay(p_attempt int, p_base double precision,
                                        p_max double precision)
RETURNS double precision
LANGUAGE sql VOLATILE AS $$
    SELECT d * (0.5 + random() / 2)
    FROM (SELECT least(p_max, p_base * 2 ^ least(greatest(p_attempt, 1) - 1, 60)) AS d) x
$$;

COMMENT ON FUNCTION taskrunner._retry_delay(int, double precision, double precision) IS
'Seconds to wait before the retry that follows failed run p_attempt: the exponential delay
d = min(p_max, p_base * 2^(p_attempt - 1)), with equal jitter: uniform in [d/2, d].';

CREATE FUNCTION taskrunner.tg_task__retry() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_run int := greatest(OLD.attempt, 1);  -- tasks running since before retries: run 1
    v_delay double precision;
BEGIN
    IF NEW.status = 'pending' THEN
        -- a start that never got going (lease expired, worker released it) was no run
        NEW.attempt := greatest(OLD.attempt - 1, 0);
        RETURN NEW;
    END IF;
    IF v_run >= NEW.max_attempts THEN
        RETURN NEW;  -- the last run: a real failure (end webhooks, cascade)
    END IF;
    v_delay := taskrunner._retry_delay(v_run, NEW.backoff_seconds, NEW.backoff_max_seconds);
    NEW.status := 'pending';
    NEW.not_before := now() + make_interval(secs => v_delay);
    NEW.status_reason := format('retry %s of %s in %ss: %s', v_run, NEW.max_attempts - 1,
                                round(v_delay::numeric, 1),
                                coalesce(NEW.failure_reason, NEW.status_reason, 'failed'));
    NEW.failure_reason := NULL;
    PERFORM taskrunner._add_stats(format('retry>%s>1;', NEW.kind));
    -- A start of the failed run still in flight (it timed out before the answer) is
    -- dropped: its answer must not count for the next run. Skipped when its worker is
    -- recording it right now: finish_deliveries then finds the task pending and drops it.
    UPDATE taskrunner.delivery d
    SET status = 'canceled', lease_until = NULL, finished_at = now(),
        last_error = format('dropped: run %s of the task failed before the start was answered',
                            v_run)
    WHERE d.id IN (SELECT x.id FROM taskrunner.delivery x
                   WHERE x.task_id = NEW.id AND x.event = 'start'
                     AND x.status IN ('queued', 'in_flight')
                   FOR NO KEY UPDATE SKIP LOCKED);
    RETURN NEW;
END $$;

COMMENT ON FUNCTION taskrunner.tg_task__retry() IS
'Trigger, before the transition guard, on running -> failure and running -> pending. A
failed run with runs left (attempt < max_attempts) goes back to pending instead, not
before a backoff (_retry_delay; status_reason "retry n of m in Xs: <reason>"), so no end
webhook fires and nothing cascades. A running task put back to pending without failing
(an expired or released start) gives its run back.';

CREATE TRIGGER _090_retry BEFORE UPDATE OF status ON taskrunner.task
    FOR EACH ROW
    WHEN (OLD.status = 'running' AND NEW.status IN ('failure', 'pending'))
    EXECUTE FUNCTION taskrunner.tg_task__retry();

CREATE FUNCTION taskrunner.next_wakeup() RETURNS timestamp with time zone
LANGUAGE sql STABLE AS $$
    SELECT min(not_before) FROM taskrunner.task
    WHERE status = 'pending' AND not_before IS NOT NULL
$$;

COMMENT ON FUNCTION taskrunner.next_wakeup() IS
'The earliest time at which something scheduled may become claimable (a delayed start or
a retry''s backoff); NULL when nothing is scheduled. Idle workers sleep until then. May be
in the past: a task fell due and no claim has promoted it yet.';

CREATE OR REPLACE FUNCTION taskrunner.claim_tasks(p_worker text, p_max integer, p_lease_seconds integer DEFAULT 60)
 RETURNS SETOF taskrunner.work_item
 LANGUAGE plpgsql
AS $$
DECLARE
    g record;
    v_left int := p_max;
    v_waited boolean := false;
    v_slots int;
    v_claimed uuid[] := '{}';
    v_batch uuid[];
    v_blocked int := 0;
BEGIN
    IF p_max <= 0 THEN
        RETURN;
    END IF;
    -- Scheduled tasks that fell due join the claim index: their not_before is cleared.
    -- SKIP LOCKED: a row another claim is promoting is that claim's to take. At most 1000
    -- per claim (~50 ms), so a burst of tasks due at once is spread over claims.
    IF EXISTS (SELECT 1 FROM taskrunner.task WHERE status = 'pending' AND not_before <= now()) THEN
        UPDATE taskrunner.task t SET not_before = NULL
        WHERE t.id = ANY (ARRAY(
                SELECT x.id FROM taskrunner.task x
                WHERE x.status = 'pending' AND x.not_before <= now()
                ORDER BY x.not_before LIMIT 1000
                FOR NO KEY UPDATE SKIP LOCKED))
          AND t.status = 'pending';
    END IF;
    FOR g IN
        SELECT * FROM taskrunner._claim_groups
    LOOP
        IF NOT v_waited THEN
            PERFORM taskrunner._lock_group(g.kind, g.rules, true);
            v_waited := true;
        ELSIF NOT taskrunner._lock_group(g.kind, g.rules, false) THEN
            CONTINUE;  -- another claimer holds this group; it will take care of it
        END IF;
        v_slots := taskrunner._group_slots(g.kind, g.rules, g.metadata);
        IF v_slots <= 0 THEN
            v_blocked := v_blocked + 1;
            CONTINUE;
        END IF;
        WITH picked AS (
            SELECT id FROM taskrunner.task
            WHERE status = 'pending' AND not_before IS NULL AND admission_key = g.admission_key
            ORDER BY priority DESC, seq
            LIMIT least(v_slots, v_left)
            FOR NO KEY UPDATE SKIP LOCKED
        ), moved AS (
            UPDATE taskrunner.task t
            SET status = 'running', claimed_by = p_worker, attempt = t.attempt + 1,
                status_reason = CASE WHEN t.attempt = 0 THEN format('claimed by %s', p_worker)
                                     ELSE format('claimed by %s (run %s of %s)', p_worker,
                                                 t.attempt + 1, t.max_attempts) END
            FROM picked WHERE t.id = picked.id AND t.status = 'pending' AND t.not_before IS NULL
            RETURNING t.id
        )
        SELECT array_agg(id) INTO v_batch FROM moved;
        IF v_batch IS NOT NULL THEN
            v_claimed := v_claimed || v_batch;
            v_left := p_max - cardinality(v_claimed);
            EXIT WHEN v_left <= 0;
        END IF;
    END LOOP;

    IF v_blocked > 0 THEN
        PERFORM taskrunner._add_stats(format('blocked>%s;', v_blocked));
    END IF;
    IF cardinality(v_claimed) = 0 THEN
        RETURN;
    END IF;

    RETURN QUERY
    WITH starts AS (
        INSERT INTO taskrunner.delivery (action_id, task_id, event, status, attempts,
                                         lease_until, worker)
        SELECT a.id, a.task_id, 'start', 'in_flight', 1,
               now() + make_interval(secs => p_lease_seconds), p_worker
        FROM taskrunner.action a
        WHERE a.task_id = ANY (v_claimed) AND a.event = 'start'
        RETURNING id, action_id, task_id
    )
    SELECT s.id, s.task_id, 'start'::taskrunner.action_event, 1, a.url, a.verb, a.body,
           a.headers, t.name, t.kind
    FROM starts s
    JOIN taskrunner.action a ON a.id = s.action_id
    JOIN taskrunner.task t ON t.id = s.task_id;
END $$;

COMMENT ON FUNCTION taskrunner.claim_tasks(text, integer, integer) IS
'Claim up to p_max ready tasks for p_worker: move them to running (attempt + 1) and
return their start deliveries, leased to the worker for p_lease_seconds. Scheduled tasks
that fell due (not_before <= now()) are promoted first: not_before cleared, which puts
them in task_pending_claim_idx.

Exactness: each admission group is claimed under advisory locks on the kinds its rules
count (see _lock_group), and its free slots are counted after the locks are held; under
READ COMMITTED every statement of the claim sees the commits of the claims that held the locks
before us. So when a task with a rule starts, that rule''s count (itself included when
it matches) is at most max_concurency, whatever the number of claimers.

Cost: groups are found with a skip scan over task_pending_claim_idx (one probe per
group with pending tasks, see _claim_groups), so pending tasks blocked behind a
saturated rule cost one check per group, not one per task; tasks not yet due are not in
that index at all.';

DROP FUNCTION taskrunner.update_task(uuid, taskrunner.task_status, bigint, bigint, jsonb, text);
CREATE FUNCTION taskrunner.update_task(p_id uuid, p_status taskrunner.task_status DEFAULT NULL::taskrunner.task_status, p_new_success bigint DEFAULT NULL::bigint, p_new_failures bigint DEFAULT NULL::bigint, p_metadata jsonb DEFAULT NULL::jsonb, p_failure_reason text DEFAULT NULL::text, p_retryable boolean DEFAULT NULL)
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
    RETURN v_task;
END $$;

COMMENT ON FUNCTION taskrunner.update_task(uuid, taskrunner.task_status, bigint, bigint, jsonb, text, boolean) IS
'PATCH /task/{id}: counters, metadata and the outcome of a running task. A report
acknowledges the start (started_at), so tick() does not restart the task. A failure with
runs left is retried (see tg_task__retry) unless p_retryable is false.';

CREATE OR REPLACE FUNCTION taskrunner.complete_tasks(p_results jsonb)
 RETURNS TABLE(task_id uuid, completed boolean, status taskrunner.task_status)
 LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
    v_bad text;
BEGIN
    SELECT string_agg(format('[%s].%s', ord - 1, problem), E'\n') INTO v_bad
    FROM (SELECT ord, CASE
                 WHEN r ->> 'task_id' IS NULL THEN 'task_id: required'
                 WHEN coalesce(r ->> 'status', '') NOT IN ('success', 'failure')
                     THEN 'status: must be success or failure'
                 WHEN r ? 'retryable' AND jsonb_typeof(r -> 'retryable') <> 'boolean'
                     THEN 'retryable: must be true or false'
                 WHEN r ? 'retryable' AND r ->> 'status' <> 'failure'
                     THEN 'retryable: only allowed when status is Failure'
                 ELSE taskrunner._failure_reason_problem((r ->> 'status')::taskrunner.task_status,
                                                        r ->> 'failure_reason')
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
                   r ->> 'failure_reason' AS reason,
                   coalesce((r ->> 'retryable')::boolean, true) AS retryable, ord
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
            -- not retryable: this run is the last (see tg_task__retry)
            max_attempts = CASE WHEN i.to_status = 'failure' AND NOT i.retryable
                                THEN least(t.max_attempts, greatest(t.attempt, 1))
                                ELSE t.max_attempts END,
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
"failure_reason", "retryable"} (failure_reason required for failure; retryable false: no
retry). A task that is not running is left alone (completed = false). Rows are locked in
id order; one UPDATE moves them all, so the history, outbox, propagation and wake-up run
once for the batch.';

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
                                     backoff_max_seconds, not_before)
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
               'created',
               coalesce((i.t #>> '{retry,max_attempts}')::int, 1),
               coalesce((i.t #>> '{retry,backoff_seconds}')::float8, 5),
               coalesce((i.t #>> '{retry,backoff_max_seconds}')::float8, 300),
               CASE WHEN s.not_before > now() THEN s.not_before END
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

COMMENT ON FUNCTION taskrunner.create_batch(jsonb, text) IS
'Create a batch of tasks atomically. Input: a JSON array already validated and
normalised by the API (format in docs/sql.md). Dependencies name a local_id of the
batch or the task_id of an existing task. A task whose dedupe matcher finds an existing
task is skipped, and dependencies on it point at that existing task instead. "retry"
({max_attempts, backoff_seconds, backoff_max_seconds}) and "not_before" or
"delay_seconds" schedule runs. Returns the created tasks in input order.';

CREATE OR REPLACE FUNCTION taskrunner.why_not_running(p_id uuid)
 RETURNS jsonb
 LANGUAGE sql
 STABLE
AS $$
    SELECT CASE t.status
        WHEN 'waiting' THEN jsonb_build_object('reason', 'unfinished_parents', 'parents',
            (SELECT coalesce(jsonb_agg(jsonb_build_object(
                        'id', p.id, 'name', p.name, 'status', p.status,
                        'requires_success', d.requires_success) ORDER BY p.seq), '[]')
             FROM taskrunner.dependency d
             JOIN taskrunner.task p ON p.id = d.parent_id
             WHERE d.child_id = t.id AND NOT taskrunner.is_terminal(p.status)))
        WHEN 'pending' THEN coalesce(
            CASE WHEN t.not_before > now() THEN
                jsonb_build_object('reason', 'scheduled', 'not_before', t.not_before) END,
            (SELECT jsonb_build_object('reason', 'rule', 'rules', jsonb_agg(jsonb_build_object(
                        'rule', b.rule, 'count', b.current_count, 'max', b.max_concurency)))
             FROM taskrunner.blocked_tasks b
             WHERE b.id = t.id
             HAVING count(*) > 0),
            jsonb_build_object('reason', 'ready'))
        WHEN 'paused' THEN jsonb_build_object('reason', 'paused')
        END
    FROM taskrunner.task t
    WHERE t.id = p_id
$$;

COMMENT ON FUNCTION taskrunner.why_not_running(uuid) IS
'Why a waiting/pending task is not running: its unfinished parents, or its start is scheduled later (not_before: a delayed start or a retry''s backoff), or the rules at their limit (blocked_tasks: count and max), or ready; NULL once it ran.';

-- migrate:down

CREATE OR REPLACE FUNCTION taskrunner.why_not_running(p_id uuid)
 RETURNS jsonb
 LANGUAGE sql
 STABLE
AS $$
    SELECT CASE t.status
        WHEN 'waiting' THEN jsonb_build_object('reason', 'unfinished_parents', 'parents',
            (SELECT coalesce(jsonb_agg(jsonb_build_object(
                        'id', p.id, 'name', p.name, 'status', p.status,
                        'requires_success', d.requires_success) ORDER BY p.seq), '[]')
             FROM taskrunner.dependency d
             JOIN taskrunner.task p ON p.id = d.parent_id
             WHERE d.child_id = t.id AND NOT taskrunner.is_terminal(p.status)))
        WHEN 'pending' THEN coalesce(
            (SELECT jsonb_build_object('reason', 'rule', 'rules', jsonb_agg(jsonb_build_object(
                        'rule', b.rule, 'count', b.current_count, 'max', b.max_concurency)))
             FROM taskrunner.blocked_tasks b
             WHERE b.id = t.id
             HAVING count(*) > 0),
            jsonb_build_object('reason', 'ready'))
        WHEN 'paused' THEN jsonb_build_object('reason', 'paused')
        END
    FROM taskrunner.task t
    WHERE t.id = p_id
$$;

COMMENT ON FUNCTION taskrunner.why_not_running(uuid) IS
'Why a waiting/pending task is not running: its unfinished parents, or the rules at their limit (blocked_tasks: count and max), or ready; NULL once it ran.';

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

COMMENT ON FUNCTION taskrunner.create_batch(jsonb, text) IS
'Create a batch of tasks atomically. Input: a JSON array already validated and
normalised by the API (format in docs/sql.md). Dependencies name a local_id of the
batch or the task_id of an existing task. A task whose dedupe matcher finds an existing
task is skipped, and dependencies on it point at that existing task instead. Returns
the created tasks in input order.';

CREATE OR REPLACE FUNCTION taskrunner.complete_tasks(p_results jsonb)
 RETURNS TABLE(task_id uuid, completed boolean, status taskrunner.task_status)
 LANGUAGE plpgsql
AS $$
#variable_conflict use_column
DECLARE
    v_bad text;
BEGIN
    SELECT string_agg(format('[%s].%s', ord - 1, problem), E'\n') INTO v_bad
    FROM (SELECT ord, CASE
                 WHEN r ->> 'task_id' IS NULL THEN 'task_id: required'
                 WHEN coalesce(r ->> 'status', '') NOT IN ('success', 'failure')
                     THEN 'status: must be success or failure'
                 ELSE taskrunner._failure_reason_problem((r ->> 'status')::taskrunner.task_status,
                                                        r ->> 'failure_reason')
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

DROP FUNCTION taskrunner.update_task(uuid, taskrunner.task_status, bigint, bigint, jsonb, text, boolean);
CREATE FUNCTION taskrunner.update_task(p_id uuid, p_status taskrunner.task_status DEFAULT NULL::taskrunner.task_status, p_new_success bigint DEFAULT NULL::bigint, p_new_failures bigint DEFAULT NULL::bigint, p_metadata jsonb DEFAULT NULL::jsonb, p_failure_reason text DEFAULT NULL::text)
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

COMMENT ON FUNCTION taskrunner.update_task(uuid, taskrunner.task_status, bigint, bigint, jsonb, text) IS
'PATCH /task/{id}: counters, metadata and the outcome of a running task. A report
acknowledges the start (started_at), so tick() does not restart the task.';

CREATE OR REPLACE FUNCTION taskrunner.claim_tasks(p_worker text, p_max integer, p_lease_seconds integer DEFAULT 60)
 RETURNS SETOF taskrunner.work_item
 LANGUAGE plpgsql
AS $$
DECLARE
    g record;
    v_left int := p_max;
    v_waited boolean := false;
    v_slots int;
    v_claimed uuid[] := '{}';
    v_batch uuid[];
    v_blocked int := 0;
BEGIN
    IF p_max <= 0 THEN
        RETURN;
    END IF;
    FOR g IN
        SELECT * FROM taskrunner._claim_groups
    LOOP
        IF NOT v_waited THEN
            PERFORM taskrunner._lock_group(g.kind, g.rules, true);
            v_waited := true;
        ELSIF NOT taskrunner._lock_group(g.kind, g.rules, false) THEN
            CONTINUE;  -- another claimer holds this group; it will take care of it
        END IF;
        v_slots := taskrunner._group_slots(g.kind, g.rules, g.metadata);
        IF v_slots <= 0 THEN
            v_blocked := v_blocked + 1;
            CONTINUE;
        END IF;
        WITH picked AS (
            SELECT id FROM taskrunner.task
            WHERE status = 'pending' AND admission_key = g.admission_key
            ORDER BY priority DESC, seq
            LIMIT least(v_slots, v_left)
            FOR NO KEY UPDATE SKIP LOCKED
        ), moved AS (
            UPDATE taskrunner.task t
            SET status = 'running', claimed_by = p_worker,
                status_reason = format('claimed by %s', p_worker)
            FROM picked WHERE t.id = picked.id AND t.status = 'pending'
            RETURNING t.id
        )
        SELECT array_agg(id) INTO v_batch FROM moved;
        IF v_batch IS NOT NULL THEN
            v_claimed := v_claimed || v_batch;
            v_left := p_max - cardinality(v_claimed);
            EXIT WHEN v_left <= 0;
        END IF;
    END LOOP;

    IF v_blocked > 0 THEN
        PERFORM taskrunner._add_stats(format('blocked>%s;', v_blocked));
    END IF;
    IF cardinality(v_claimed) = 0 THEN
        RETURN;
    END IF;

    RETURN QUERY
    WITH starts AS (
        INSERT INTO taskrunner.delivery (action_id, task_id, event, status, attempts,
                                         lease_until, worker)
        SELECT a.id, a.task_id, 'start', 'in_flight', 1,
               now() + make_interval(secs => p_lease_seconds), p_worker
        FROM taskrunner.action a
        WHERE a.task_id = ANY (v_claimed) AND a.event = 'start'
        RETURNING id, action_id, task_id
    )
    SELECT s.id, s.task_id, 'start'::taskrunner.action_event, 1, a.url, a.verb, a.body,
           a.headers, t.name, t.kind
    FROM starts s
    JOIN taskrunner.action a ON a.id = s.action_id
    JOIN taskrunner.task t ON t.id = s.task_id;
END $$;

COMMENT ON FUNCTION taskrunner.claim_tasks(text, integer, integer) IS
'Claim up to p_max ready tasks for p_worker: move them to running and return their
start deliveries, leased to the worker for p_lease_seconds.

Exactness: each admission group is claimed under advisory locks on the kinds its rules
count (see _lock_group), and its free slots are counted after the locks are held; under
READ COMMITTED every statement of the claim sees the commits of the claims that held the locks
before us. So when a task with a rule starts, that rule''s count (itself included when
it matches) is at most max_concurency, whatever the number of claimers.

Cost: groups are found with a skip scan over task_pending_claim_idx (one probe per
group with pending tasks, see _claim_groups), so pending tasks blocked behind a
saturated rule cost one check per group, not one per task.';

DROP FUNCTION taskrunner.next_wakeup();
DROP TRIGGER _090_retry ON taskrunner.task;
DROP FUNCTION taskrunner.tg_task__retry();
DROP FUNCTION taskrunner._retry_delay(int, double precision, double precision);

CREATE OR REPLACE VIEW taskrunner._claim_groups AS
WITH RECURSIVE keys(k) AS (
    (SELECT admission_key FROM taskrunner.task WHERE status = 'pending'
     ORDER BY admission_key LIMIT 1)
    UNION ALL
    SELECT (SELECT t.admission_key FROM taskrunner.task t
            WHERE t.status = 'pending' AND t.admission_key > keys.k
            ORDER BY t.admission_key LIMIT 1)
    FROM keys WHERE keys.k IS NOT NULL
)
SELECT h.* FROM keys
CROSS JOIN LATERAL (
    SELECT t.admission_key, t.kind, t.rules, t.metadata, t.priority, t.seq
    FROM taskrunner.task t
    WHERE t.status = 'pending' AND t.admission_key = keys.k
    ORDER BY t.priority DESC, t.seq LIMIT 1) h
WHERE keys.k IS NOT NULL
ORDER BY h.priority DESC, h.seq;

DROP INDEX taskrunner.task_not_before_idx;
DROP INDEX taskrunner.task_pending_claim_idx;
CREATE INDEX task_pending_claim_idx ON taskrunner.task (admission_key, priority DESC, seq)
    WHERE status = 'pending';
COMMENT ON INDEX taskrunner.task_pending_claim_idx IS
'Claims: one head per admission group (skip scan over admission_key).';

ALTER TABLE taskrunner.task
    DROP CONSTRAINT task_retry_range,
    DROP COLUMN not_before,
    DROP COLUMN backoff_max_seconds,
    DROP COLUMN backoff_seconds,
    DROP COLUMN max_attempts,
    DROP COLUMN attempt;
