-- migrate:up

-- Propagation: when tasks end, their children count the end, become pending when all
-- their parents have finished, or fail (transitively) when a required parent failed.
-- Called by the after-update trigger and by create_batch.

CREATE FUNCTION taskrunner._propagate(p_parents uuid[], p_children uuid[] DEFAULT NULL)
RETURNS void LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    v_ids uuid[];
    v_reasons text[];
    v_lines text;
BEGIN
    -- Children are locked in id order before they are updated, so two transactions
    -- propagating into shared children (parents ending at the same time) cannot deadlock.

    -- 1. Children that must fail: they require success of a parent that failed or was
    --    canceled, transitively through their own requires_success children.
    WITH RECURSIVE doomed(id) AS (
        SELECT d.child_id
        FROM taskrunner.task p
        JOIN taskrunner.dependency d ON d.parent_id = p.id AND d.requires_success
        JOIN taskrunner.task c ON c.id = d.child_id
        WHERE p.id = ANY (p_parents)
          AND p.status IN ('failure', 'canceled')
          AND (p_children IS NULL OR d.child_id = ANY (p_children))
          AND c.status IN ('waiting', 'pending', 'paused')
        UNION
        SELECT d.child_id
        FROM doomed
        JOIN taskrunner.dependency d ON d.parent_id = doomed.id AND d.requires_success
        JOIN taskrunner.task c ON c.id = d.child_id
        WHERE c.status IN ('waiting', 'pending', 'paused')
    ), reasons AS (
        -- name one failed (or doomed) required parent of each doomed child
        SELECT DISTINCT ON (dm.id) dm.id,
               format('dependency %s %s', d.parent_id,
                      CASE WHEN p.status = 'canceled' THEN 'was canceled' ELSE 'failed' END)
                   AS reason
        FROM doomed dm
        JOIN taskrunner.dependency d ON d.child_id = dm.id AND d.requires_success
        JOIN taskrunner.task p ON p.id = d.parent_id
        LEFT JOIN doomed x ON x.id = d.parent_id
        WHERE p.status IN ('failure', 'canceled') OR x.id IS NOT NULL
        ORDER BY dm.id, (p.status IN ('failure', 'canceled')) DESC, d.parent_id
    )
    SELECT array_agg(id ORDER BY id), array_agg(reason ORDER BY id)
    INTO v_ids, v_reasons
    FROM reasons;
    IF v_ids IS NOT NULL THEN
        PERFORM 1 FROM taskrunner.task WHERE id = ANY (v_ids) ORDER BY id FOR NO KEY UPDATE;
        UPDATE taskrunner.task t
        SET status = 'failure', failure_reason = r.reason, status_reason = r.reason
        FROM unnest(v_ids, v_reasons) r(id, reason)
        WHERE t.id = r.id AND t.status IN ('waiting', 'pending', 'paused');
    END IF;

    -- 2. Every other unfinished child counts its ended parents; a waiting child whose
    --    parents have all finished becomes pending.
    SELECT array_agg(id) INTO v_ids FROM (
        SELECT c.id
        FROM taskrunner.task c
        WHERE c.id IN (SELECT d.child_id FROM taskrunner.dependency d
                       WHERE d.parent_id = ANY (p_parents)
                         AND (p_children IS NULL OR d.child_id = ANY (p_children)))
          AND c.status IN ('waiting', 'paused')
        ORDER BY c.id
        FOR NO KEY UPDATE
    ) locked;
    IF v_ids IS NOT NULL THEN
        WITH ended AS (
            SELECT d.child_id, count(*) AS n, count(*) FILTER (WHERE p.status = 'success') AS ok
            FROM taskrunner.task p
            JOIN taskrunner.dependency d ON d.parent_id = p.id
            WHERE p.id = ANY (p_parents) AND d.child_id = ANY (v_ids)
            GROUP BY d.child_id
        )
        UPDATE taskrunner.task c
        SET deps_finished = c.deps_finished + e.n,
            deps_succeeded = c.deps_succeeded + e.ok,
            status = CASE WHEN c.status = 'waiting' AND c.deps_finished + e.n = c.deps_total
                          THEN 'pending'::taskrunner.task_status ELSE c.status END,
            status_reason = CASE WHEN c.status = 'waiting' AND c.deps_finished + e.n = c.deps_total
                                 THEN 'dependencies finished' ELSE c.status_reason END
        FROM ended e
        WHERE c.id = e.child_id AND c.status IN ('waiting', 'paused');
    END IF;

    SELECT string_agg(format('propagation>%s>%s;', parent_status, n), '')
    INTO v_lines
    FROM (SELECT p.status AS parent_status, count(*) AS n
          FROM taskrunner.task p
          JOIN taskrunner.dependency d ON d.parent_id = p.id
          WHERE p.id = ANY (p_parents)
            AND (p_children IS NULL OR d.child_id = ANY (p_children))
          GROUP BY 1) s;
    IF v_lines IS NOT NULL THEN
        PERFORM taskrunner._add_stats(v_lines);
    END IF;
END $$;

COMMENT ON FUNCTION taskrunner._propagate(uuid[], uuid[]) IS
'Propagate the end of p_parents to their children (only to p_children when given, as
when a new batch depends on tasks that had already ended). Set-based: the whole
failure cascade is computed with one recursive query and applied with one UPDATE, so
a 10,000-deep chain costs no trigger recursion.

Every join here follows an index from a small set of ended tasks; the planner cannot
know the sizes of the recursive work table and would pick hash joins over whole tables
at each recursion step, so sequential scans are discouraged for this function.';

-- migrate:down

DROP FUNCTION taskrunner._propagate(uuid[], uuid[]);
