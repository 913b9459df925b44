-- migrate:up

-- Types, tables and indexes: the data the state machine keeps. The prose for each object
-- is in COMMENT ON (it survives in sql/schema.sql and shows in psql's \d+ and \dT+).

CREATE SCHEMA taskrunner;

COMMENT ON SCHEMA taskrunner IS
'taskrunner''s state machine: tables, triggers and functions. docs/sql.md documents the
public part for DBAs.';

CREATE TYPE taskrunner.task_status AS ENUM
    ('waiting', 'pending', 'running', 'success', 'failure', 'canceled', 'paused');

COMMENT ON TYPE taskrunner.task_status IS
'The status of a task. Legal moves: transition_allowed(); terminal ones: is_terminal().';

CREATE TYPE taskrunner.action_event AS ENUM ('start', 'success', 'failure', 'cancel');

COMMENT ON TYPE taskrunner.action_event IS
'When an action fires. The API shows success/failure as trigger "End".';

CREATE TYPE taskrunner.delivery_status AS ENUM
    ('queued', 'in_flight', 'delivered', 'failed', 'canceled', 'expired');

COMMENT ON TYPE taskrunner.delivery_status IS
'Where a delivery (one webhook call) stands: queued, in_flight (leased to a worker),
delivered, failed (retries exhausted), canceled (no longer needed) or expired (a start
whose lease ran out; its task went back to pending).';

CREATE TYPE taskrunner.work_item AS (
    delivery_id uuid,
    task_id uuid,
    event taskrunner.action_event,
    attempt int,
    url text,
    verb text,
    body jsonb,
    headers jsonb,
    task_name text,
    task_kind text
);

COMMENT ON TYPE taskrunner.work_item IS
'What a worker gets back from a claim: one webhook call to make.';

CREATE TABLE taskrunner.task (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    seq bigint GENERATED ALWAYS AS IDENTITY,
    batch_id uuid NOT NULL,
    local_id text,
    requester text,
    name text NOT NULL,
    kind text NOT NULL,
    status taskrunner.task_status NOT NULL,
    previous_status taskrunner.task_status,
    priority int NOT NULL DEFAULT 0,
    timeout int NOT NULL DEFAULT 60,
    metadata jsonb NOT NULL DEFAULT '{}',
    rules jsonb NOT NULL DEFAULT '[]',
    admission_key uuid NOT NULL,
    deps_total int NOT NULL DEFAULT 0,
    deps_finished int NOT NULL DEFAULT 0,
    deps_succeeded int NOT NULL DEFAULT 0,
    success bigint NOT NULL DEFAULT 0,
    failures bigint NOT NULL DEFAULT 0,
    failure_reason text,
    status_reason text,
    claimed_by text,
    created_at timestamptz NOT NULL DEFAULT now(),
    claimed_at timestamptz,
    started_at timestamptz,
    ended_at timestamptz,
    last_updated timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT task_priority_range CHECK (priority BETWEEN -1000 AND 1000),
    CONSTRAINT task_timeout_range CHECK (timeout BETWEEN 1 AND 86400),
    CONSTRAINT task_metadata_is_object CHECK (jsonb_typeof(metadata) = 'object'),
    CONSTRAINT task_rules_is_array CHECK (jsonb_typeof(rules) = 'array'),
    CONSTRAINT task_deps_counters CHECK (
        deps_finished BETWEEN 0 AND deps_total AND deps_succeeded BETWEEN 0 AND deps_finished),
    CONSTRAINT task_counters_non_negative CHECK (success >= 0 AND failures >= 0),
    CONSTRAINT task_failure_has_reason CHECK (status <> 'failure' OR failure_reason IS NOT NULL)
);

COMMENT ON TABLE taskrunner.task IS
'One row per task. A status change is checked, recorded and propagated by the triggers,
whoever makes it (API, worker or a DBA''s UPDATE).';
COMMENT ON COLUMN taskrunner.task.seq IS
'Creation order (input order within a batch): "oldest first" and "newest first".';
COMMENT ON COLUMN taskrunner.task.previous_status IS
'The status before the latest UPDATE of the row (set by a trigger): lets the
statement-level trigger see what changed without joining OLD and NEW tables.';
COMMENT ON COLUMN taskrunner.task.timeout IS
'Seconds a running task may go without a heartbeat (last_updated) before tick() fails it.';
COMMENT ON COLUMN taskrunner.task.rules IS
'Normalised concurrency rules: [{"kind","status","fields":[...],"max"}].';
COMMENT ON COLUMN taskrunner.task.admission_key IS
'Tasks with the same key (kind, priority, rules, rule field values) are interchangeable
for admission: claims look at one head per key.';
COMMENT ON COLUMN taskrunner.task.status_reason IS
'Why the latest transition happened.';
COMMENT ON COLUMN taskrunner.task.claimed_at IS
'When the task entered running.';
COMMENT ON COLUMN taskrunner.task.started_at IS
'When the target acknowledged the start webhook (NULL while the start is in flight).';
COMMENT ON COLUMN taskrunner.task.last_updated IS
'Heartbeat: drives timeouts.';

CREATE TABLE taskrunner.dependency (
    parent_id uuid NOT NULL REFERENCES taskrunner.task (id) ON DELETE CASCADE,
    child_id uuid NOT NULL REFERENCES taskrunner.task (id) ON DELETE CASCADE,
    requires_success boolean NOT NULL,
    PRIMARY KEY (parent_id, child_id),
    CONSTRAINT dependency_not_self CHECK (parent_id <> child_id)
);

COMMENT ON TABLE taskrunner.dependency IS
'Edges of the task graph: the child waits for the parent to end; with requires_success
the child fails when the parent fails or is canceled.';

CREATE TABLE taskrunner.action (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id uuid NOT NULL REFERENCES taskrunner.task (id) ON DELETE CASCADE,
    event taskrunner.action_event NOT NULL,
    url text NOT NULL,
    verb text NOT NULL,
    body jsonb,
    headers jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT action_verb_known CHECK (verb IN ('GET', 'POST', 'PUT', 'PATCH', 'DELETE')),
    CONSTRAINT action_headers_is_object CHECK (jsonb_typeof(headers) = 'object')
);

COMMENT ON TABLE taskrunner.action IS
'The webhooks of a task, per event. Cancel actions are added when a start webhook''s 2xx
response body is an action or a list of actions.';

CREATE TABLE taskrunner.delivery (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    action_id bigint NOT NULL REFERENCES taskrunner.action (id) ON DELETE CASCADE,
    task_id uuid NOT NULL REFERENCES taskrunner.task (id) ON DELETE CASCADE,
    event taskrunner.action_event NOT NULL,
    status taskrunner.delivery_status NOT NULL DEFAULT 'queued',
    attempts int NOT NULL DEFAULT 0,
    round_base int NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_until timestamptz,
    worker text,
    last_status_code int,
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);

COMMENT ON TABLE taskrunner.delivery IS
'The transactional outbox: every webhook call to make, with its retry state. The id is
sent as the Idempotency-Key header.';
COMMENT ON COLUMN taskrunner.delivery.round_base IS
'Attempts made before the latest retry_delivery(): a manual retry starts a fresh round of
attempts (work items count attempts - round_base).';

CREATE TABLE taskrunner.delivery_attempt (
    delivery_id uuid NOT NULL REFERENCES taskrunner.delivery (id) ON DELETE CASCADE,
    attempt int NOT NULL,
    worker text,
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    status_code int,
    error text,
    PRIMARY KEY (delivery_id, attempt)
);

COMMENT ON TABLE taskrunner.delivery_attempt IS
'One row per webhook attempt of a delivery, with its outcome.';

CREATE TABLE taskrunner.task_history (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id uuid NOT NULL,
    from_status taskrunner.task_status,
    to_status taskrunner.task_status NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    reason text
);

COMMENT ON TABLE taskrunner.task_history IS
'Append-only transition history, written by the statement that makes the transition.';

CREATE INDEX task_pending_claim_idx ON taskrunner.task (admission_key, priority DESC, seq)
    WHERE status = 'pending';
-- Rule counts (kind + status) and the kind filter of GET /task.
CREATE INDEX task_kind_status_idx ON taskrunner.task (kind, status);
-- Timeouts scan running tasks only.
CREATE INDEX task_running_idx ON taskrunner.task (last_updated) WHERE status = 'running';
CREATE INDEX task_batch_idx ON taskrunner.task (batch_id);
CREATE UNIQUE INDEX task_seq_idx ON taskrunner.task (seq);
CREATE INDEX task_status_seq_idx ON taskrunner.task (status, seq);
CREATE INDEX task_metadata_idx ON taskrunner.task USING gin (metadata jsonb_path_ops);
-- Rule counts of running tasks (see _rule_count): only running tasks are in it.
CREATE INDEX task_running_metadata_idx ON taskrunner.task USING gin (metadata jsonb_path_ops)
    WHERE status = 'running';

CREATE INDEX dependency_child_idx ON taskrunner.dependency (child_id);
CREATE INDEX action_task_idx ON taskrunner.action (task_id, event);

CREATE INDEX delivery_queued_idx ON taskrunner.delivery (next_attempt_at) WHERE status = 'queued';
CREATE INDEX delivery_in_flight_idx ON taskrunner.delivery (lease_until) WHERE status = 'in_flight';
CREATE INDEX delivery_task_idx ON taskrunner.delivery (task_id);

CREATE INDEX task_history_task_idx ON taskrunner.task_history (task_id, at);
CREATE INDEX task_history_at_idx ON taskrunner.task_history USING brin (at);

COMMENT ON INDEX taskrunner.task_pending_claim_idx IS
'Claims: one head per admission group (skip scan over admission_key).';
COMMENT ON INDEX taskrunner.task_kind_status_idx IS
'Rule counts (kind + status) and the kind filter of GET /task.';
COMMENT ON INDEX taskrunner.task_running_idx IS
'Timeouts scan running tasks only.';
COMMENT ON INDEX taskrunner.task_running_metadata_idx IS
'Rule counts of running tasks (see _rule_count): only running tasks are in it.';

-- migrate:down

DROP TABLE taskrunner.task_history, taskrunner.delivery_attempt, taskrunner.delivery,
    taskrunner.action, taskrunner.dependency, taskrunner.task;
DROP TYPE taskrunner.work_item, taskrunner.delivery_status, taskrunner.action_event,
    taskrunner.task_status;
DROP SCHEMA taskrunner;
