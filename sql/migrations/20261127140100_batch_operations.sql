-- migrate:up

-- Operations on a whole batch (stop it, replace the rules of one kind), the batch's DAG
-- links, and why a task is not running. The routes of taskrunner/api/batches.py call
-- these; docs/sql.md documents them for DBAs.

-- Stop a batch: every task of it that has not ended is canceled (reason "batch stopped")
-- in one UPDATE, so the history, the outbox (cancel webhooks of running tasks) and the
-- propagation to dependents in other batches run as for any cancel.
--
-- Safe while workers claim from the batch: the tasks are locked in id order (as every
-- locker of several tasks does) and waiting is allowed, so a claim in flight finishes
-- first and its task is then canceled as running (counted as claimed: its start is not
-- acknowledged). Claims skip locked rows, so none starts a task of the batch meanwhile.
CREATE FUNCTION taskrunner.stop_batch(p_batch uuid)
RETURNS TABLE (batch_id uuid, canceled_waiting int, canceled_pending int,
               canceled_claimed int, canceled_running int, canceled_paused int,
               already_terminal int)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_from text[];
    v_total int;
BEGIN
    WITH locked AS MATERIALIZED (
        SELECT t.id FROM taskrunner.task t
        WHERE t.batch_id = p_batch AND NOT taskrunner.is_terminal(t.status)
        ORDER BY t.id
        FOR NO KEY UPDATE
    ), stopped AS (
        UPDATE taskrunner.task t
        SET status = 'canceled', status_reason = 'batch stopped'
        FROM locked l
        WHERE t.id = l.id AND NOT taskrunner.is_terminal(t.status)
        RETURNING taskrunner._batch_bucket(t.previous_status, t.started_at) AS bucket
    )
    SELECT coalesce(array_agg(bucket), '{}') INTO v_from FROM stopped;

    SELECT count(*) INTO v_total FROM taskrunner.task t WHERE t.batch_id = p_batch;
    IF v_total = 0 THEN
        PERFORM taskrunner._raise('TR404', format('batch %s not found', p_batch),
                                  format('id: no batch %s', p_batch));
    END IF;

    RETURN QUERY
    SELECT p_batch,
           cardinality(array_positions(v_from, 'waiting')),
           cardinality(array_positions(v_from, 'pending')),
           cardinality(array_positions(v_from, 'claimed')),
           cardinality(array_positions(v_from, 'running')),
           cardinality(array_positions(v_from, 'paused')),
           v_total - cardinality(v_from);
END $$;
COMMENT ON FUNCTION taskrunner.stop_batch(uuid) IS
    'DELETE /batch/{id}: cancels every task of the batch that has not ended (reason '
    '"batch stopped"; running tasks fire their cancel webhooks); returns the counts per '
    'former status. TR404 for an unknown batch.';

-- Replace the rules of the batch's tasks of one kind that have not ended (an empty array
-- removes them). p_rules is normalised like create_batch's rules:
-- [{"kind","status","fields":[...],"max"}]. As at creation, every field a rule compares
-- must be a string, number or boolean in each task's metadata (TR400 otherwise).
--
-- Exact under concurrent claims: the rows are locked in id order and the rules and the
-- admission key change in one UPDATE. A claim in flight keeps the group (old key) it
-- counted for under its locks; once this commits, a claim finds the tasks in their new
-- group and counts the new rules under the locks of the kinds they count.
CREATE FUNCTION taskrunner.set_batch_rules(p_batch uuid, p_kind text, p_rules jsonb)
RETURNS int
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
COMMENT ON FUNCTION taskrunner.set_batch_rules(uuid, text, jsonb) IS
    'PATCH /batch/{id}/rules: replaces the rules of the batch''s unfinished tasks of one '
    'kind (admission keys recomputed); returns how many tasks changed. TR404, TR400.';

-- The dependency links of each batch's tasks (parent_id may name a task of another batch).
CREATE VIEW taskrunner.batch_links AS
SELECT c.batch_id, d.parent_id, d.child_id, d.requires_success, c.seq AS child_seq
FROM taskrunner.dependency d
JOIN taskrunner.task c ON c.id = d.child_id;
COMMENT ON VIEW taskrunner.batch_links IS
    'GET /dag/{id}: the links into each batch''s tasks, by the child''s batch; a parent may '
    'belong to an earlier batch.';

-- Why a waiting or pending task is not running (NULL for other statuses):
-- {"reason": "unfinished_parents", "parents": [{id, name, status, requires_success}]},
-- {"reason": "rule", "rules": [{rule, count, max}]} (the rules the blocked_tasks view
-- finds at their limit: the same counts claims use), {"reason": "ready"} (no rule holds
-- it: the next claim may start it), or {"reason": "paused"}.
CREATE FUNCTION taskrunner.why_not_running(p_id uuid) RETURNS jsonb
LANGUAGE sql STABLE AS $$
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
    'Why a waiting/pending task is not running: its unfinished parents, or the rules at '
    'their limit (blocked_tasks: count and max), or ready; NULL once it ran.';

-- migrate:down

DROP FUNCTION taskrunner.why_not_running(uuid);
DROP VIEW taskrunner.batch_links;
DROP FUNCTION taskrunner.set_batch_rules(uuid, text, jsonb);
DROP FUNCTION taskrunner.stop_batch(uuid);
