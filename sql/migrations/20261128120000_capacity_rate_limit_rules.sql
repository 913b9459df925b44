-- migrate:up

-- Capacity and RateLimit rules, and a task's expected_count (issue 9, item 4).
--
-- Stored rules (task.rules) gain a "type"; a rule without one is a concurrency rule, as
-- before, so existing rows and admission keys stay as they are:
--   concurrency {"kind","status","fields","max"}
--   capacity    {"type":"capacity","kind","status":"running","fields","max"}
--   rate limit  {"type":"rate_limit","kind","fields","max","per_seconds"}
-- All three are admitted by claim_tasks under the same advisory locks (_lock_group locks
-- every rule's kind exclusively), so each is exact under any number of claimers.

ALTER TABLE taskrunner.task ADD COLUMN expected_count bigint;
ALTER TABLE taskrunner.task ADD CONSTRAINT task_expected_count_non_negative
    CHECK (expected_count >= 0);

COMMENT ON COLUMN taskrunner.task.expected_count IS
'How many items the task expects to process (ArcRun''s expected_count; NULL: not said).
Capacity rules count the remaining work of running tasks:
greatest(coalesce(expected_count, 0) - success - failures, 0).';

COMMENT ON COLUMN taskrunner.task.rules IS
'Normalised rules: concurrency {"kind","status","fields","max"}; capacity
{"type":"capacity","kind","status":"running","fields","max"}; rate limit
{"type":"rate_limit","kind","fields","max","per_seconds"}.';

-- The start ledger of rate limits. Counting starts from task_history would join every
-- start of the window with its task to compare kind and metadata (a cost that grows with
-- the throughput of unrelated kinds); here a start is one row under the key of the rule
-- that counts it, so a count is an index range scan over that key's window only.
CREATE TABLE taskrunner.rate_start (
    key uuid NOT NULL,
    at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    task_id uuid NOT NULL
);
CREATE INDEX rate_start_key_at_idx ON taskrunner.rate_start (key, at);
CREATE INDEX rate_start_expires_idx ON taskrunner.rate_start (expires_at);

COMMENT ON TABLE taskrunner.rate_start IS
'One row per start of a task under each of its RateLimit rules (key: _rate_key), written
by claim_tasks under the rule''s lock; at is the claim''s transaction time (the task''s
claimed_at). Rows past expires_at (at + per_seconds) no longer count; prune_rate_starts()
deletes them.';

CREATE FUNCTION taskrunner._rate_key(p_rule jsonb, p_metadata jsonb) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT md5(concat_ws(E'\x1f', p_rule ->> 'kind', p_rule ->> 'per_seconds',
                         taskrunner._rule_pattern(p_rule, p_metadata)::text))::uuid
$$;

COMMENT ON FUNCTION taskrunner._rate_key(jsonb, jsonb) IS
'The ledger key (rate_start) of a RateLimit rule for a task with this metadata: the kind,
the window and the values of the rule''s fields. Rules that differ only in max_starts
share it, so each counts the starts of the others.';

-- Capacity groups are claimed several at a time: each start adds the task's expected
-- count to the sum, so tasks of one group must share it. The key of a task with a
-- capacity rule includes its expected_count; any other key is unchanged.
CREATE FUNCTION taskrunner._admission_key(p_kind text, p_priority int, p_rules jsonb,
                                          p_metadata jsonb, p_expected_count bigint)
RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN p_rules @> '[{"type": "capacity"}]'
                THEN md5(concat_ws(E'\x1f',
                         taskrunner._admission_key(p_kind, p_priority, p_rules, p_metadata),
                         coalesce(p_expected_count::text, 'null')))::uuid
                ELSE taskrunner._admission_key(p_kind, p_priority, p_rules, p_metadata) END
$$;

COMMENT ON FUNCTION taskrunner._admission_key(text, int, jsonb, jsonb, bigint) IS
'The admission key of a task: _admission_key(kind, priority, rules, metadata), plus the
expected_count when a capacity rule is among the rules (capacity slots depend on it).';

-- A DBA's UPDATE of expected_count keeps the key right, as update_task's does.
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

CREATE OR REPLACE FUNCTION taskrunner._rule_count(p_rule jsonb, p_metadata jsonb)
RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_count bigint;
BEGIN
    IF p_rule ->> 'type' = 'capacity' THEN
        SELECT coalesce(sum(greatest(coalesce(t.expected_count, 0) - t.success - t.failures,
                                     0)), 0)
        INTO v_count FROM taskrunner.task t
        WHERE t.status = 'running'
          AND t.kind = p_rule ->> 'kind'
          AND t.metadata @> taskrunner._rule_pattern(p_rule, p_metadata);
    ELSIF p_rule ->> 'type' = 'rate_limit' THEN
        -- every start of the key at or after our own time counts too (see claim_tasks)
        SELECT count(*) INTO v_count FROM taskrunner.rate_start s
        WHERE s.key = taskrunner._rate_key(p_rule, p_metadata)
          AND s.at > now() - make_interval(secs => (p_rule ->> 'per_seconds')::int);
    ELSIF p_rule ->> 'status' = 'running' THEN
        SELECT count(*) INTO v_count FROM taskrunner.task t
        WHERE t.status = 'running'
          AND t.kind = p_rule ->> 'kind'
          AND t.metadata @> taskrunner._rule_pattern(p_rule, p_metadata);
    ELSE
        SELECT count(*) INTO v_count FROM taskrunner.task t
        WHERE t.kind = p_rule ->> 'kind'
          AND t.status = (p_rule ->> 'status')::taskrunner.task_status
          AND t.metadata @> taskrunner._rule_pattern(p_rule, p_metadata);
    END IF;
    RETURN v_count;
END $$;

COMMENT ON FUNCTION taskrunner._rule_count(jsonb, jsonb) IS
'A rule''s current count for a task with this metadata, compared with the rule''s max:
concurrency: matching tasks in the rule''s status; capacity: the remaining work
(greatest(coalesce(expected_count, 0) - success - failures, 0)) summed over matching
running tasks; rate limit: starts in the window (rate_start rows of the key with at >
now() - per_seconds). Running tasks are counted with the status spelled out so the
planner can use task_running_metadata_idx, which holds running tasks only; the metadata
GIN index over all tasks would read every blocked pending task of the group, and a count
would grow with the backlog.';

DROP FUNCTION taskrunner._group_slots(text, jsonb, jsonb);

CREATE FUNCTION taskrunner._group_slots(p_kind text, p_rules jsonb, p_metadata jsonb,
                                        p_expected_count bigint)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    r jsonb;
    v_count bigint;
    v_max bigint;
    v_slots bigint := 2147483647;
BEGIN
    FOR r IN SELECT value FROM jsonb_array_elements(p_rules) LOOP
        v_count := taskrunner._rule_count(r, p_metadata);
        v_max := (r ->> 'max')::bigint;
        IF v_count >= v_max THEN
            RETURN 0;
        END IF;
        CONTINUE WHEN r ->> 'kind' <> p_kind;  -- our starts do not change its count
        IF r ->> 'type' = 'capacity' THEN
            -- each start adds (at most) the group's expected count; a start is allowed
            -- while the sum is below max: ceil((max - sum) / expected) more
            IF coalesce(p_expected_count, 0) > 0 THEN
                v_slots := least(v_slots, ceil((v_max - v_count)::numeric / p_expected_count));
            END IF;
        ELSIF r ->> 'type' = 'rate_limit' OR r ->> 'status' = 'running' THEN
            v_slots := least(v_slots, v_max - v_count);
        END IF;
    END LOOP;
    RETURN v_slots;
END $$;

COMMENT ON FUNCTION taskrunner._group_slots(text, jsonb, jsonb, bigint) IS
'How many tasks of a group may start now (0 = blocked). A rule allows a start iff its
count (_rule_count) is below its max. A rule on the group''s own kind loses per start: one
slot (concurrency on running tasks, rate limit) or the group''s expected_count of capacity;
any other rule is unchanged by the start.';

-- Ledger rows for the rate limits of tasks just claimed (called by claim_tasks, which
-- holds the rules' locks).
CREATE FUNCTION taskrunner._record_starts(p_rules jsonb, p_metadata jsonb, p_ids uuid[])
RETURNS void
LANGUAGE sql AS $$
    INSERT INTO taskrunner.rate_start (key, at, expires_at, task_id)
    SELECT taskrunner._rate_key(r, p_metadata), now(),
           now() + make_interval(secs => (r ->> 'per_seconds')::int), id
    FROM jsonb_array_elements(p_rules) r, unnest(p_ids) id
    WHERE r ->> 'type' = 'rate_limit'
$$;

COMMENT ON FUNCTION taskrunner._record_starts(jsonb, jsonb, uuid[]) IS
'Record the starts of p_ids (tasks of one admission group) in rate_start, one row per
RateLimit rule of the group, at now() (the claim''s transaction time).

Exact under the rule''s lock: a claim at time x counts every row with at > x - per_seconds,
later ones included (a claim that started earlier may get the lock later). Any window of
per_seconds that holds x holds only rows with at > x - per_seconds, so each window keeps
at most max_starts rows.';

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
SELECT h.admission_key, h.kind, h.rules, h.metadata, h.priority, h.seq, h.expected_count
FROM keys
CROSS JOIN LATERAL (
    SELECT t.admission_key, t.kind, t.rules, t.metadata, t.priority, t.seq, t.expected_count
    FROM taskrunner.task t
    WHERE t.status = 'pending' AND t.not_before IS NULL AND t.admission_key = keys.k
    ORDER BY t.priority DESC, t.seq LIMIT 1) h
WHERE keys.k IS NOT NULL
ORDER BY h.priority DESC, h.seq;

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
        v_slots := taskrunner._group_slots(g.kind, g.rules, g.metadata, g.expected_count);
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
            IF g.rules @> '[{"type": "rate_limit"}]' THEN
                PERFORM taskrunner._record_starts(g.rules, g.metadata, v_batch);
            END IF;
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
                                     backoff_max_seconds, not_before, expected_count)
        SELECT i.new_id, v_batch, i.local_id, p_requester, i.t ->> 'name', i.t ->> 'kind',
               CASE WHEN coalesce(e.n, 0) > 0 THEN 'waiting' ELSE 'pending' END::taskrunner.task_status,
               coalesce((i.t ->> 'priority')::int, 0),
               coalesce((i.t ->> 'timeout')::int, 60),
               coalesce(i.t -> 'metadata', '{}'),
               coalesce(i.t -> 'rules', '[]'),
               taskrunner._admission_key(i.t ->> 'kind', coalesce((i.t ->> 'priority')::int, 0),
                                         coalesce(i.t -> 'rules', '[]'),
                                         coalesce(i.t -> 'metadata', '{}'),
                                         (i.t ->> 'expected_count')::bigint),
               coalesce(e.n, 0),
               'created',
               coalesce((i.t #>> '{retry,max_attempts}')::int, 1),
               coalesce((i.t #>> '{retry,backoff_seconds}')::float8, 5),
               coalesce((i.t #>> '{retry,backoff_max_seconds}')::float8, 300),
               CASE WHEN s.not_before > now() THEN s.not_before END,
               (i.t ->> 'expected_count')::bigint
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

COMMENT ON FUNCTION taskrunner.claim_tasks(text, integer, integer) IS
'Claim up to p_max ready tasks for p_worker: move them to running (attempt + 1) and
return their start deliveries, leased to the worker for p_lease_seconds. Scheduled tasks
that fell due (not_before <= now()) are promoted first: not_before cleared, which puts
them in task_pending_claim_idx.

Exactness: each admission group is claimed under advisory locks on the kinds its rules
count (see _lock_group), and its free slots are counted after the locks are held; under
READ COMMITTED every statement of the claim sees the commits of the claims that held the locks
before us. So when a task with a rule starts, that rule''s count before the start is below
its max: concurrency (matching tasks, itself included when it matches, at most max),
capacity (remaining work of matching running tasks) and rate limit (starts in the
window, recorded in rate_start by _record_starts under the same locks), whatever the
number of claimers.

Cost: groups are found with a skip scan over task_pending_claim_idx (one probe per
group with pending tasks, see _claim_groups), so pending tasks blocked behind a
saturated rule cost one check per group, not one per task; tasks not yet due are not in
that index at all.';

CREATE OR REPLACE FUNCTION taskrunner.set_batch_rules(p_batch uuid, p_kind text, p_rules jsonb)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_bad text;
    v_count int;
    v_pending boolean;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM taskrunner.task WHERE batch_id = p_batch) THEN
        PERFORM taskrunner._raise('TR404', format('batch %s not found', p_batch),
                                  format('id: no batch %s', p_batch));
    END IF;
    IF jsonb_typeof(p_rules) IS DISTINCT FROM 'array' THEN
        PERFORM taskrunner._raise('TR400', 'invalid rules', 'rules: must be an array');
    END IF;
    SELECT string_agg(format('rules[%s].matcher.kind: a RateLimit counts the starts of the '
                             'tasks that carry it: must be %s', ord - 1, p_kind), E'\n')
    INTO v_bad
    FROM jsonb_array_elements(p_rules) WITH ORDINALITY r(rule, ord)
    WHERE r.rule ->> 'type' = 'rate_limit' AND r.rule ->> 'kind' IS DISTINCT FROM p_kind;
    IF v_bad IS NOT NULL THEN
        PERFORM taskrunner._raise('TR400', 'invalid rules', v_bad);
    END IF;

    PERFORM 1 FROM taskrunner.task
    WHERE batch_id = p_batch AND kind = p_kind AND NOT taskrunner.is_terminal(status)
    ORDER BY id
    FOR NO KEY UPDATE;

    SELECT string_agg(format('rules[%s].matcher.fields: ''%s'' is %s in the metadata of %s '
                             'task(s) of the batch, e.g. %s', r.ord - 1, f.f, problem, n, example),
                      E'\n' ORDER BY r.ord, f.ord)
    INTO v_bad
    FROM jsonb_array_elements(p_rules) WITH ORDINALITY r(rule, ord)
    CROSS JOIN LATERAL jsonb_array_elements_text(r.rule -> 'fields') WITH ORDINALITY f(f, ord)
    CROSS JOIN LATERAL (
        SELECT CASE WHEN NOT t.metadata ? f.f THEN 'missing'
                    ELSE 'not a string, number or boolean' END AS problem,
               count(*) AS n, min(t.id::text) AS example
        FROM taskrunner.task t
        WHERE t.batch_id = p_batch AND t.kind = p_kind AND NOT taskrunner.is_terminal(t.status)
          AND coalesce(jsonb_typeof(t.metadata -> f.f), 'missing')
              NOT IN ('string', 'number', 'boolean')
        GROUP BY 1) bad;
    IF v_bad IS NOT NULL THEN
        PERFORM taskrunner._raise('TR400', 'rule fields missing from metadata', v_bad);
    END IF;

    -- a capacity rule counts expected_count: every task it goes on must have one
    SELECT string_agg(format('rules[%s]: a Capacity rule needs expected_count, which %s '
                             'task(s) of the batch do not have, e.g. %s', r.ord - 1, n, example),
                      E'\n' ORDER BY r.ord)
    INTO v_bad
    FROM jsonb_array_elements(p_rules) WITH ORDINALITY r(rule, ord)
    CROSS JOIN LATERAL (
        SELECT count(*) AS n, min(t.id::text) AS example
        FROM taskrunner.task t
        WHERE t.batch_id = p_batch AND t.kind = p_kind AND NOT taskrunner.is_terminal(t.status)
          AND t.expected_count IS NULL
        HAVING count(*) > 0) bad
    WHERE r.rule ->> 'type' = 'capacity';
    IF v_bad IS NOT NULL THEN
        PERFORM taskrunner._raise('TR400', 'tasks without expected_count', v_bad);
    END IF;

    WITH changed AS (
        UPDATE taskrunner.task
        SET rules = p_rules,
            admission_key = taskrunner._admission_key(kind, priority, p_rules, metadata,
                                                      expected_count)
        WHERE batch_id = p_batch AND kind = p_kind AND NOT taskrunner.is_terminal(status)
        RETURNING status
    )
    SELECT count(*), coalesce(bool_or(status = 'pending'), false)
    INTO v_count, v_pending
    FROM changed;
    IF v_pending THEN
        PERFORM pg_notify('taskrunner_task', '');  -- looser rules may free pending tasks
    END IF;
    RETURN v_count;
END $$;

DROP FUNCTION taskrunner.update_task(uuid, taskrunner.task_status, bigint, bigint, jsonb, text, boolean);

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

CREATE OR REPLACE FUNCTION taskrunner.add_counters(p_updates jsonb) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_count int;
    v_freed boolean;
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
        RETURNING t.status = 'running' AND t.expected_count IS NOT NULL AND u.s + u.f > 0
            AS freed
    )
    SELECT count(*), coalesce(bool_or(freed), false) INTO v_count, v_freed FROM upd;
    IF v_freed THEN
        PERFORM pg_notify('taskrunner_task', '');  -- less remaining work: capacity freed
    END IF;
    RETURN v_count;
END $$;

COMMENT ON FUNCTION taskrunner.add_counters(jsonb) IS
'PUT /task: add progress counters to many tasks at once (rows locked in id order, so
concurrent flushes cannot deadlock). Running tasks also get a heartbeat, and their
start is acknowledged (started_at), as by update_task. Progress on a running task with
an expected_count wakes the workers once (capacity rules may admit more).';

CREATE FUNCTION taskrunner._rate_limit_next_free() RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT min(nth.at + make_interval(secs => (r.rule ->> 'per_seconds')::int))
    FROM taskrunner._claim_groups g
    CROSS JOIN LATERAL jsonb_array_elements(g.rules) r(rule)
    CROSS JOIN LATERAL (
        -- the max_starts-th newest start in the window: the window frees when it leaves
        SELECT s.at FROM taskrunner.rate_start s
        WHERE s.key = taskrunner._rate_key(r.rule, g.metadata)
          AND s.at > now() - make_interval(secs => (r.rule ->> 'per_seconds')::int)
        ORDER BY s.at DESC
        OFFSET (r.rule ->> 'max')::int - 1 LIMIT 1) nth
    WHERE g.rules @> '[{"type": "rate_limit"}]' AND r.rule ->> 'type' = 'rate_limit'
$$;

COMMENT ON FUNCTION taskrunner._rate_limit_next_free() IS
'The earliest time a pending group held back by a full rate-limit window may start (its
max_starts-th newest start leaves the window); NULL when no pending group is held back by
one. Workers sleep until then (with next_wakeup()), so a task blocked by a rate window
starts when the window frees. One probe per pending group (_claim_groups).';

CREATE FUNCTION taskrunner.prune_rate_starts() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_deleted int;
BEGIN
    -- a margin: a claim counts from its transaction's start, which may be a little older
    -- than ours
    DELETE FROM taskrunner.rate_start WHERE expires_at < now() - interval '5 minutes';
    GET DIAGNOSTICS v_deleted = ROW_COUNT;
    RETURN v_deleted;
END $$;

COMMENT ON FUNCTION taskrunner.prune_rate_starts() IS
'Housekeeping (the worker''s tick): delete rate_start rows that no window counts any more
(expired more than 5 minutes ago); returns how many.';

-- next_wakeup() also names the moment a rate window frees: a task held back by one starts
-- then, not at the next poll. The rate term costs nothing while no rate_start row exists.
CREATE OR REPLACE FUNCTION taskrunner.next_wakeup() RETURNS timestamp with time zone
LANGUAGE sql STABLE AS $$
    SELECT least(
        (SELECT min(not_before) FROM taskrunner.task
         WHERE status = 'pending' AND not_before IS NOT NULL),
        (SELECT taskrunner._rate_limit_next_free()
         WHERE EXISTS (SELECT 1 FROM taskrunner.rate_start)))
$$;

COMMENT ON FUNCTION taskrunner.next_wakeup() IS
'The earliest time at which something may become claimable: a delayed start or a retry''s
backoff falls due, or a full rate-limit window frees (_rate_limit_next_free); NULL when
nothing is scheduled. Idle workers sleep until then. May be in the past: a task fell due
and no claim has promoted it yet.';

-- migrate:down

DROP FUNCTION taskrunner.prune_rate_starts();
CREATE OR REPLACE FUNCTION taskrunner.next_wakeup() RETURNS timestamp with time zone
LANGUAGE sql STABLE AS $$
    SELECT min(not_before) FROM taskrunner.task
    WHERE status = 'pending' AND not_before IS NOT NULL
$$;

COMMENT ON FUNCTION taskrunner.next_wakeup() IS
'The earliest time at which something scheduled may become claimable (a delayed start or
a retry''s backoff); NULL when nothing is scheduled. Idle workers sleep until then. May be
in the past: a task fell due and no claim has promoted it yet.';

DROP FUNCTION taskrunner._rate_limit_next_free();

CREATE OR REPLACE FUNCTION taskrunner.add_counters(p_updates jsonb) RETURNS integer
    LANGUAGE plpgsql
    AS $$
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

COMMENT ON FUNCTION taskrunner.add_counters(p_updates jsonb) IS 'PUT /task: add progress counters to many tasks at once (rows locked in id order, so
concurrent flushes cannot deadlock). Running tasks also get a heartbeat, and their
start is acknowledged (started_at), as by update_task.';


DROP FUNCTION taskrunner.update_task(uuid, taskrunner.task_status, bigint, bigint, jsonb, text, boolean, bigint);

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


CREATE OR REPLACE FUNCTION taskrunner.set_batch_rules(p_batch uuid, p_kind text, p_rules jsonb) RETURNS integer
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_bad text;
    v_count int;
    v_pending boolean;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM taskrunner.task WHERE batch_id = p_batch) THEN
        PERFORM taskrunner._raise('TR404', format('batch %s not found', p_batch),
                                  format('id: no batch %s', p_batch));
    END IF;
    IF jsonb_typeof(p_rules) IS DISTINCT FROM 'array' THEN
        PERFORM taskrunner._raise('TR400', 'invalid rules', 'rules: must be an array');
    END IF;

    PERFORM 1 FROM taskrunner.task
    WHERE batch_id = p_batch AND kind = p_kind AND NOT taskrunner.is_terminal(status)
    ORDER BY id
    FOR NO KEY UPDATE;

    SELECT string_agg(format('rules[%s].matcher.fields: ''%s'' is %s in the metadata of %s '
                             'task(s) of the batch, e.g. %s', r.ord - 1, f.f, problem, n, example),
                      E'\n' ORDER BY r.ord, f.ord)
    INTO v_bad
    FROM jsonb_array_elements(p_rules) WITH ORDINALITY r(rule, ord)
    CROSS JOIN LATERAL jsonb_array_elements_text(r.rule -> 'fields') WITH ORDINALITY f(f, ord)
    CROSS JOIN LATERAL (
        SELECT CASE WHEN NOT t.metadata ? f.f THEN 'missing'
                    ELSE 'not a string, number or boolean' END AS problem,
               count(*) AS n, min(t.id::text) AS example
        FROM taskrunner.task t
        WHERE t.batch_id = p_batch AND t.kind = p_kind AND NOT taskrunner.is_terminal(t.status)
          AND coalesce(jsonb_typeof(t.metadata -> f.f), 'missing')
              NOT IN ('string', 'number', 'boolean')
        GROUP BY 1) bad;
    IF v_bad IS NOT NULL THEN
        PERFORM taskrunner._raise('TR400', 'rule fields missing from metadata', v_bad);
    END IF;

    WITH changed AS (
        UPDATE taskrunner.task
        SET rules = p_rules,
            admission_key = taskrunner._admission_key(kind, priority, p_rules, metadata)
        WHERE batch_id = p_batch AND kind = p_kind AND NOT taskrunner.is_terminal(status)
        RETURNING status
    )
    SELECT count(*), coalesce(bool_or(status = 'pending'), false)
    INTO v_count, v_pending
    FROM changed;
    IF v_pending THEN
        PERFORM pg_notify('taskrunner_task', '');  -- looser rules may free pending tasks
    END IF;
    RETURN v_count;
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

DROP VIEW taskrunner._claim_groups;

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

COMMENT ON VIEW taskrunner._claim_groups IS 'The head task of each admission group that has pending tasks, in claim order (priority,
then age): the groups claim_tasks walks. Found with a skip scan over
task_pending_claim_idx (one probe per group), so pending tasks blocked behind a
saturated rule cost one check per group, not one per task; tests/test_claim_plan.py
pins that plan.';


DROP FUNCTION taskrunner._record_starts(jsonb, jsonb, uuid[]);
DROP FUNCTION taskrunner._group_slots(text, jsonb, jsonb, bigint);

CREATE FUNCTION taskrunner._group_slots(p_kind text, p_rules jsonb, p_metadata jsonb) RETURNS integer
    LANGUAGE plpgsql
    AS $$
DECLARE
    r jsonb;
    v_count bigint;
    v_slots bigint := 2147483647;
BEGIN
    FOR r IN SELECT value FROM jsonb_array_elements(p_rules) LOOP
        v_count := taskrunner._rule_count(r, p_metadata);
        IF v_count >= (r ->> 'max')::int THEN
            RETURN 0;
        END IF;
        IF r ->> 'kind' = p_kind AND r ->> 'status' = 'running' THEN
            v_slots := least(v_slots, (r ->> 'max')::int - v_count);
        END IF;
    END LOOP;
    RETURN v_slots;
END $$;

COMMENT ON FUNCTION taskrunner._group_slots(p_kind text, p_rules jsonb, p_metadata jsonb) IS 'How many tasks of a group may start now (0 = blocked). A rule allows a start iff fewer
than max tasks match it; a rule that counts running tasks of the group''s own kind loses
one slot per start, any other rule is unchanged by the start.';


CREATE OR REPLACE FUNCTION taskrunner._rule_count(p_rule jsonb, p_metadata jsonb) RETURNS bigint
    LANGUAGE plpgsql STABLE
    AS $$
DECLARE
    v_count bigint;
BEGIN
    IF p_rule ->> 'status' = 'running' THEN
        SELECT count(*) INTO v_count FROM taskrunner.task t
        WHERE t.status = 'running'
          AND t.kind = p_rule ->> 'kind'
          AND t.metadata @> taskrunner._rule_pattern(p_rule, p_metadata);
    ELSE
        SELECT count(*) INTO v_count FROM taskrunner.task t
        WHERE t.kind = p_rule ->> 'kind'
          AND t.status = (p_rule ->> 'status')::taskrunner.task_status
          AND t.metadata @> taskrunner._rule_pattern(p_rule, p_metadata);
    END IF;
    RETURN v_count;
END $$;

COMMENT ON FUNCTION taskrunner._rule_count(p_rule jsonb, p_metadata jsonb) IS 'How many tasks a rule counts right now for a task with this metadata. Rules nearly
always count running tasks: that case has its own query, with the status spelled out so
the planner can use task_running_metadata_idx, which holds running tasks only; the
metadata GIN index over all tasks would read every blocked pending task of the group,
and a count would grow with the backlog.';


DROP TRIGGER _120_capacity_key ON taskrunner.task;
DROP FUNCTION taskrunner.tg_task__capacity_key();
DROP FUNCTION taskrunner._admission_key(text, int, jsonb, jsonb, bigint);
DROP FUNCTION taskrunner._rate_key(jsonb, jsonb);
DROP TABLE taskrunner.rate_start;

COMMENT ON COLUMN taskrunner.task.rules IS 'Normalised concurrency rules: [{"kind","status","fields":[...],"max"}].';
ALTER TABLE taskrunner.task DROP COLUMN expected_count;
