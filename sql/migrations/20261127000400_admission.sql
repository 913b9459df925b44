-- migrate:up

-- Claims and admission: which pending tasks may start now. Tasks are grouped by
-- admission key; a claim walks the groups (_claim_groups), locks each group's kinds
-- (_lock_group), counts its free slots under its concurrency rules (_group_slots) and moves
-- that many tasks to running, returning their start deliveries.

CREATE FUNCTION taskrunner._admission_key(p_kind text, p_priority int, p_rules jsonb,
                                          p_metadata jsonb)
RETURNS uuid LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT md5(concat_ws(E'\x1f', p_kind, p_priority::text, p_rules::text,
        (SELECT string_agg(coalesce(p_metadata -> f, 'null'::jsonb)::text, E'\x1e'
                           ORDER BY r.ord, f.ord)
         FROM jsonb_array_elements(p_rules) WITH ORDINALITY r(rule, ord),
              jsonb_array_elements_text(r.rule -> 'fields') WITH ORDINALITY f(f, ord))))::uuid
$$;

COMMENT ON FUNCTION taskrunner._admission_key(text, int, jsonb, jsonb) IS
'The admission key: equal for tasks that any claim would treat alike.';

CREATE FUNCTION taskrunner._rule_pattern(p_rule jsonb, p_metadata jsonb)
RETURNS jsonb LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(jsonb_object_agg(f, p_metadata -> f), '{}'::jsonb)
    FROM jsonb_array_elements_text(p_rule -> 'fields') f
$$;

COMMENT ON FUNCTION taskrunner._rule_pattern(jsonb, jsonb) IS
'The metadata values a rule compares, as a containment pattern: {"field": value, ...}.';

CREATE FUNCTION taskrunner._rule_count(p_rule jsonb, p_metadata jsonb)
RETURNS bigint LANGUAGE plpgsql STABLE AS $$
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

COMMENT ON FUNCTION taskrunner._rule_count(jsonb, jsonb) IS
'How many tasks a rule counts right now for a task with this metadata. Rules nearly
always count running tasks: that case has its own query, with the status spelled out so
the planner can use task_running_metadata_idx, which holds running tasks only; the
metadata GIN index over all tasks would read every blocked pending task of the group,
and a count would grow with the backlog.';

CREATE FUNCTION taskrunner._lock_group(p_kind text, p_rules jsonb, p_wait boolean)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    k record;
BEGIN
    FOR k IN
        SELECT key, bool_or(exclusive) AS exclusive
        FROM (SELECT hashtextextended('taskrunner.kind:' || p_kind, 0) AS key, false AS exclusive
              UNION ALL
              SELECT hashtextextended('taskrunner.kind:' || (r ->> 'kind'), 0), true
              FROM jsonb_array_elements(p_rules) r) keys
        GROUP BY key ORDER BY key
    LOOP
        IF p_wait THEN
            IF k.exclusive THEN
                PERFORM pg_advisory_xact_lock(k.key);
            ELSE
                PERFORM pg_advisory_xact_lock_shared(k.key);
            END IF;
        ELSIF NOT (CASE WHEN k.exclusive THEN pg_try_advisory_xact_lock(k.key)
                        ELSE pg_try_advisory_xact_lock_shared(k.key) END) THEN
            RETURN false;
        END IF;
    END LOOP;
    RETURN true;
END $$;

COMMENT ON FUNCTION taskrunner._lock_group(text, jsonb, boolean) IS
'Take the advisory locks that make a claim of this group exact (see claim_tasks).
Kinds that a rule counts are locked exclusively; the task''s own kind (when no rule
counts it) in shared mode, so rule-less claims of one kind run in parallel but wait
for, and are waited on by, every rule-checking claim of that kind. Keys are taken in
ascending order. With p_wait = false nothing waits and false means "skip this group".';

CREATE FUNCTION taskrunner._group_slots(p_kind text, p_rules jsonb, p_metadata jsonb)
RETURNS int LANGUAGE plpgsql AS $$
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

COMMENT ON FUNCTION taskrunner._group_slots(text, jsonb, jsonb) IS
'How many tasks of a group may start now (0 = blocked). A rule allows a start iff fewer
than max tasks match it; a rule that counts running tasks of the group''s own kind loses
one slot per start, any other rule is unchanged by the start.';

CREATE VIEW taskrunner._claim_groups AS
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

COMMENT ON VIEW taskrunner._claim_groups IS
'The head task of each admission group that has pending tasks, in claim order (priority,
then age): the groups claim_tasks walks. Found with a skip scan over
task_pending_claim_idx (one probe per group), so pending tasks blocked behind a
saturated rule cost one check per group, not one per task; tests/test_claim_plan.py
pins that plan.';

CREATE FUNCTION taskrunner.claim_tasks(p_worker text, p_max int, p_lease_seconds int DEFAULT 60)
RETURNS SETOF taskrunner.work_item
LANGUAGE plpgsql AS $$
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

COMMENT ON FUNCTION taskrunner.claim_tasks(text, int, int) IS
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

-- migrate:down

DROP FUNCTION taskrunner.claim_tasks(text, int, int);
DROP VIEW taskrunner._claim_groups;
DROP FUNCTION taskrunner._group_slots(text, jsonb, jsonb);
DROP FUNCTION taskrunner._lock_group(text, jsonb, boolean);
DROP FUNCTION taskrunner._rule_count(jsonb, jsonb);
DROP FUNCTION taskrunner._rule_pattern(jsonb, jsonb);
DROP FUNCTION taskrunner._admission_key(text, int, jsonb, jsonb);
