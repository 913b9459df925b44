-- migrate:up

-- Views for DBAs (docs/sql.md): what runs, what is held back, batch progress and webhook
-- trouble.

CREATE VIEW taskrunner.running_tasks AS
SELECT id, name, kind, claimed_by, claimed_at, started_at, last_updated,
       last_updated + make_interval(secs => timeout) AS timeout_at,
       success, failures, batch_id
FROM taskrunner.task
WHERE status = 'running';

COMMENT ON VIEW taskrunner.running_tasks IS
'Running tasks with worker, claim/start times and timeout deadline.';

CREATE VIEW taskrunner.blocked_tasks AS
SELECT t.id, t.name, t.kind, t.priority, t.created_at,
       r.rule, taskrunner._rule_count(r.rule, t.metadata) AS current_count,
       (r.rule ->> 'max')::int AS max_concurency
FROM taskrunner.task t
CROSS JOIN LATERAL jsonb_array_elements(t.rules) r(rule)
WHERE t.status = 'pending'
  AND taskrunner._rule_count(r.rule, t.metadata) >= (r.rule ->> 'max')::int;

COMMENT ON VIEW taskrunner.blocked_tasks IS
'Pending tasks that a rule currently holds back, with the rule, its count and limit.';

CREATE VIEW taskrunner.batch_progress AS
SELECT batch_id, min(requester) AS requester, min(created_at) AS created_at,
       count(*) AS total,
       count(*) FILTER (WHERE status = 'waiting') AS waiting,
       count(*) FILTER (WHERE status = 'pending') AS pending,
       count(*) FILTER (WHERE status = 'running') AS running,
       count(*) FILTER (WHERE status = 'paused') AS paused,
       count(*) FILTER (WHERE status = 'success') AS success,
       count(*) FILTER (WHERE status = 'failure') AS failure,
       count(*) FILTER (WHERE status = 'canceled') AS canceled,
       max(ended_at) FILTER (WHERE taskrunner.is_terminal(status)) AS last_ended_at
FROM taskrunner.task
GROUP BY batch_id;

COMMENT ON VIEW taskrunner.batch_progress IS
'Per batch: requester, created_at, total and a count per status.';

CREATE VIEW taskrunner.delivery_problems AS
SELECT d.id, d.task_id, d.event, d.status, d.attempts, d.next_attempt_at,
       d.last_status_code, d.last_error, a.url, a.verb
FROM taskrunner.delivery d
JOIN taskrunner.action a ON a.id = d.action_id
WHERE d.status = 'failed' OR (d.status IN ('queued', 'in_flight') AND d.attempts > 0
                              AND d.last_error IS NOT NULL);

COMMENT ON VIEW taskrunner.delivery_problems IS
'Deliveries that are retrying or gave up, with their last error.';

-- migrate:down

DROP VIEW taskrunner.delivery_problems;
DROP VIEW taskrunner.batch_progress;
DROP VIEW taskrunner.blocked_tasks;
DROP VIEW taskrunner.running_tasks;
