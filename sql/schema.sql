\restrict dbmate

-- Dumped from database version 15.20 (Debian 15.20-0+deb12u1)
-- Dumped by pg_dump version 15.20 (Debian 15.20-0+deb12u1)

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

--
-- Name: taskrunner; Type: SCHEMA; Schema: -; Owner: -
--

CREATE SCHEMA taskrunner;


--
-- Name: SCHEMA taskrunner; Type: COMMENT; Schema: -; Owner: -
--

COMMENT ON SCHEMA taskrunner IS 'taskrunner''s state machine: tables, triggers and functions. docs/sql.md documents the
public part for DBAs.';


--
-- Name: action_event; Type: TYPE; Schema: taskrunner; Owner: -
--

CREATE TYPE taskrunner.action_event AS ENUM (
    'start',
    'success',
    'failure',
    'cancel'
);


--
-- Name: TYPE action_event; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON TYPE taskrunner.action_event IS 'When an action fires. The API shows success/failure as trigger "End".';


--
-- Name: batch_change; Type: TYPE; Schema: taskrunner; Owner: -
--

CREATE TYPE taskrunner.batch_change AS (
	batch_id uuid,
	sign integer,
	bucket text,
	success bigint,
	failures bigint,
	last_updated timestamp with time zone
);


--
-- Name: delivery_status; Type: TYPE; Schema: taskrunner; Owner: -
--

CREATE TYPE taskrunner.delivery_status AS ENUM (
    'queued',
    'in_flight',
    'delivered',
    'failed',
    'canceled',
    'expired'
);


--
-- Name: TYPE delivery_status; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON TYPE taskrunner.delivery_status IS 'Where a delivery (one webhook call) stands: queued, in_flight (leased to a worker),
delivered, failed (retries exhausted), canceled (no longer needed) or expired (a start
whose lease ran out; its task went back to pending).';


--
-- Name: task_status; Type: TYPE; Schema: taskrunner; Owner: -
--

CREATE TYPE taskrunner.task_status AS ENUM (
    'waiting',
    'pending',
    'running',
    'success',
    'failure',
    'canceled',
    'paused'
);


--
-- Name: TYPE task_status; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON TYPE taskrunner.task_status IS 'The status of a task. Legal moves: transition_allowed(); terminal ones: is_terminal().';


--
-- Name: work_item; Type: TYPE; Schema: taskrunner; Owner: -
--

CREATE TYPE taskrunner.work_item AS (
	delivery_id uuid,
	task_id uuid,
	event taskrunner.action_event,
	attempt integer,
	url text,
	verb text,
	body jsonb,
	headers jsonb,
	task_name text,
	task_kind text,
	batch_id uuid,
	traceparent text,
	tracestate text
);


--
-- Name: TYPE work_item; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON TYPE taskrunner.work_item IS 'What a worker gets back from a claim: one webhook call to make.';


--
-- Name: _add_batch_deltas(taskrunner.batch_change[]); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner._add_batch_deltas(p_changes taskrunner.batch_change[]) RETURNS void
    LANGUAGE sql
    AS $$
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


--
-- Name: _add_stats(text); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner._add_stats(p_lines text) RETURNS void
    LANGUAGE sql
    AS $$
    SELECT set_config('taskrunner.stats',
        coalesce(nullif(current_setting('taskrunner.stats', true), ''), '') || p_lines, true)
$$;


--
-- Name: FUNCTION _add_stats(p_lines text); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner._add_stats(p_lines text) IS 'Transitions counted in this transaction, for Prometheus (see take_stats()).';


--
-- Name: _admission_key(text, integer, jsonb, jsonb); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner._admission_key(p_kind text, p_priority integer, p_rules jsonb, p_metadata jsonb) RETURNS uuid
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
    SELECT md5(concat_ws(E'\x1f', p_kind, p_priority::text, p_rules::text,
        (SELECT string_agg(coalesce(p_metadata -> f, 'null'::jsonb)::text, E'\x1e'
                           ORDER BY r.ord, f.ord)
         FROM jsonb_array_elements(p_rules) WITH ORDINALITY r(rule, ord),
              jsonb_array_elements_text(r.rule -> 'fields') WITH ORDINALITY f(f, ord))))::uuid
$$;


--
-- Name: FUNCTION _admission_key(p_kind text, p_priority integer, p_rules jsonb, p_metadata jsonb); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner._admission_key(p_kind text, p_priority integer, p_rules jsonb, p_metadata jsonb) IS 'The admission key: equal for tasks that any claim would treat alike.';


--
-- Name: _admission_key(text, integer, jsonb, jsonb, bigint); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner._admission_key(p_kind text, p_priority integer, p_rules jsonb, p_metadata jsonb, p_expected_count bigint) RETURNS uuid
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
    SELECT CASE WHEN p_rules @> '[{"type": "capacity"}]'
                THEN md5(concat_ws(E'\x1f',
                         taskrunner._admission_key(p_kind, p_priority, p_rules, p_metadata),
                         coalesce(p_expected_count::text, 'null')))::uuid
                ELSE taskrunner._admission_key(p_kind, p_priority, p_rules, p_metadata) END
$$;


--
-- Name: FUNCTION _admission_key(p_kind text, p_priority integer, p_rules jsonb, p_metadata jsonb, p_expected_count bigint); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner._admission_key(p_kind text, p_priority integer, p_rules jsonb, p_metadata jsonb, p_expected_count bigint) IS 'The admission key of a task: _admission_key(kind, priority, rules, metadata), plus the
expected_count when a capacity rule is among the rules (capacity slots depend on it).';


--
-- Name: _batch_bucket(taskrunner.task_status, timestamp with time zone); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner._batch_bucket(p_status taskrunner.task_status, p_started_at timestamp with time zone) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
    SELECT CASE WHEN p_status = 'running' AND p_started_at IS NULL THEN 'claimed'
                ELSE p_status::text END
$$;


--
-- Name: _batch_ended_before(uuid, timestamp with time zone); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner._batch_ended_before(p_batch uuid, p_cutoff timestamp with time zone) RETURNS boolean
    LANGUAGE sql STABLE
    AS $$
    SELECT NOT EXISTS (
        SELECT 1 FROM taskrunner.task t
        WHERE t.batch_id = p_batch
          AND (NOT taskrunner.is_terminal(t.status)
               OR coalesce(t.ended_at, t.last_updated) >= p_cutoff))
$$;


--
-- Name: FUNCTION _batch_ended_before(p_batch uuid, p_cutoff timestamp with time zone); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner._batch_ended_before(p_batch uuid, p_cutoff timestamp with time zone) IS 'Whether every task of the batch has ended before p_cutoff (purge_finished''s batch rule).';


--
-- Name: _cancel_dead_ends(uuid[], uuid[]); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner._cancel_dead_ends(p_ended uuid[], p_candidates uuid[] DEFAULT '{}'::uuid[]) RETURNS integer
    LANGUAGE plpgsql
    SET enable_seqscan TO 'off'
    SET enable_hashjoin TO 'off'
    SET enable_mergejoin TO 'off'
    AS $$
DECLARE
    v_candidates uuid[];
    v_locked uuid[];
    v_is_candidate jsonb;  -- {"<id>": true}: a set; `?` finds a key in O(log n), = ANY in O(n)
    v_alive jsonb;
    v_dead uuid[];
BEGIN
    SELECT p_candidates || coalesce(array_agg(d.parent_id), '{}') INTO v_candidates
    FROM taskrunner.dependency d WHERE d.child_id = ANY (p_ended);
    WITH RECURSIVE up(id, barrier) AS (
        SELECT p.id, p.dead_end_barrier
        FROM taskrunner.task p
        WHERE p.id = ANY (v_candidates) AND NOT taskrunner.is_terminal(p.status)
        UNION
        SELECT p.id, p.dead_end_barrier
        FROM up
        JOIN taskrunner.dependency d ON d.child_id = up.id
        JOIN taskrunner.task p ON p.id = d.parent_id
        WHERE NOT up.barrier AND NOT taskrunner.is_terminal(p.status)
    )
    SELECT array_agg(DISTINCT id) INTO v_candidates FROM up;
    IF v_candidates IS NULL THEN
        RETURN 0;
    END IF;

    SELECT array_agg(id) INTO v_locked FROM (
        SELECT t.id FROM taskrunner.task t
        WHERE t.id = ANY (v_candidates)
        ORDER BY t.id
        FOR NO KEY UPDATE SKIP LOCKED) locked;
    IF cardinality(v_locked) IS DISTINCT FROM cardinality(v_candidates) THEN
        INSERT INTO taskrunner.dead_end_recheck (task_id)
        SELECT id FROM unnest(v_candidates) id
        WHERE NOT id = ANY (coalesce(v_locked, '{}'));
    END IF;
    v_candidates := v_locked;
    IF v_candidates IS NULL THEN
        RETURN 0;
    END IF;
    SELECT jsonb_object_agg(id, true) INTO v_is_candidate FROM unnest(v_candidates) id;

    WITH RECURSIVE alive(id) AS (
        SELECT p.id
        FROM taskrunner.task p
        WHERE p.id = ANY (v_candidates)
          AND EXISTS (SELECT 1 FROM taskrunner.dependency d
                      JOIN taskrunner.task c ON c.id = d.child_id
                      WHERE d.parent_id = p.id AND NOT taskrunner.is_terminal(c.status)
                        AND NOT v_is_candidate ? c.id::text)
        UNION
        SELECT p.parent_id
        FROM alive
        CROSS JOIN LATERAL (SELECT d.parent_id FROM taskrunner.dependency d
                            WHERE d.child_id = alive.id) p
        WHERE v_is_candidate ? p.parent_id::text
    )
    SELECT coalesce(jsonb_object_agg(id, true), '{}') INTO v_alive FROM alive;

    SELECT array_agg(t.id) INTO v_dead
    FROM taskrunner.task t
    WHERE t.id = ANY (v_candidates) AND NOT taskrunner.is_terminal(t.status)
      AND NOT v_alive ? t.id::text;
    IF v_dead IS NULL THEN
        RETURN 0;
    END IF;

    PERFORM set_config('taskrunner.dead_end_walk', 'on', true);
    UPDATE taskrunner.task
    SET status = 'canceled', status_reason = 'dead end: every child task has ended'
    WHERE id = ANY (v_dead);
    PERFORM set_config('taskrunner.dead_end_walk', '', true);
    RETURN cardinality(v_dead);
END $$;


--
-- Name: FUNCTION _cancel_dead_ends(p_ended uuid[], p_candidates uuid[]); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner._cancel_dead_ends(p_ended uuid[], p_candidates uuid[]) IS 'Dead-end cancellation from tasks that just ended (p_ended: the after-update trigger calls
it when settings.dead_end_cancel is on) or from candidates to look at again
(p_candidates): cancels, in one UPDATE, every unfinished task above them whose children
all end, walking upward; a dead_end_barrier task is canceled but its parents are not
looked at. Candidates locked by another transaction are queued in dead_end_recheck.
Returns how many it canceled.';


--
-- Name: _dedupe_match(text, taskrunner.task_status, jsonb); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner._dedupe_match(p_kind text, p_status taskrunner.task_status, p_pattern jsonb) RETURNS TABLE(id uuid, seq bigint)
    LANGUAGE plpgsql STABLE
    SET enable_seqscan TO 'off'
    SET enable_indexscan TO 'off'
    AS $$
BEGIN
    IF p_pattern = '{}'::jsonb THEN
        RETURN QUERY
        SELECT x.id, x.seq FROM taskrunner.task x
        WHERE x.kind = p_kind AND x.status = p_status
        ORDER BY x.seq DESC LIMIT 1;
    ELSE
        RETURN QUERY
        SELECT x.id, x.seq FROM taskrunner.task x
        WHERE x.metadata @> p_pattern AND x.kind = p_kind AND x.status = p_status
        ORDER BY x.seq DESC LIMIT 1;
    END IF;
END $$;


--
-- Name: FUNCTION _dedupe_match(p_kind text, p_status taskrunner.task_status, p_pattern jsonb); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner._dedupe_match(p_kind text, p_status taskrunner.task_status, p_pattern jsonb) IS 'A dedupe probe of create_batch: the newest task of p_kind in p_status whose metadata
contains p_pattern. Bitmap scans only, so it reads the tasks that carry the pattern''s
values, never the table.';


--
-- Name: _failure_reason_problem(taskrunner.task_status, text); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner._failure_reason_problem(p_status taskrunner.task_status, p_reason text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
    SELECT CASE
        WHEN p_status = 'failure' AND p_reason IS NULL
            THEN 'failure_reason: is required when status is Failure'
        WHEN p_reason IS NOT NULL AND p_status IS DISTINCT FROM 'failure'
            THEN 'failure_reason: only allowed when status is Failure'
    END
$$;


--
-- Name: FUNCTION _failure_reason_problem(p_status taskrunner.task_status, p_reason text); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner._failure_reason_problem(p_status taskrunner.task_status, p_reason text) IS 'The failure_reason rule, one owner and one wording for update_task and complete_tasks (the
API shows the text as the 400''s detail): a reason iff the status is failure. NULL: no problem.';


--
-- Name: _group_slots(text, jsonb, jsonb, bigint); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner._group_slots(p_kind text, p_rules jsonb, p_metadata jsonb, p_expected_count bigint) RETURNS integer
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: FUNCTION _group_slots(p_kind text, p_rules jsonb, p_metadata jsonb, p_expected_count bigint); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner._group_slots(p_kind text, p_rules jsonb, p_metadata jsonb, p_expected_count bigint) IS 'How many tasks of a group may start now (0 = blocked). A rule allows a start iff its
count (_rule_count) is below its max. A rule on the group''s own kind loses per start: one
slot (concurrency on running tasks, rate limit) or the group''s expected_count of capacity;
any other rule is unchanged by the start.';


--
-- Name: _lock_group(text, jsonb, boolean); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner._lock_group(p_kind text, p_rules jsonb, p_wait boolean) RETURNS boolean
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: FUNCTION _lock_group(p_kind text, p_rules jsonb, p_wait boolean); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner._lock_group(p_kind text, p_rules jsonb, p_wait boolean) IS 'Take the advisory locks that make a claim of this group exact (see claim_tasks).
Kinds that a rule counts are locked exclusively; the task''s own kind (when no rule
counts it) in shared mode, so rule-less claims of one kind run in parallel but wait
for, and are waited on by, every rule-checking claim of that kind. Keys are taken in
ascending order. With p_wait = false nothing waits and false means "skip this group".';


SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: task; Type: TABLE; Schema: taskrunner; Owner: -
--

CREATE TABLE taskrunner.task (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    seq bigint NOT NULL,
    batch_id uuid NOT NULL,
    local_id text,
    requester text,
    name text NOT NULL,
    kind text NOT NULL,
    status taskrunner.task_status NOT NULL,
    previous_status taskrunner.task_status,
    priority integer DEFAULT 0 NOT NULL,
    timeout integer DEFAULT 60 NOT NULL,
    metadata jsonb DEFAULT '{}'::jsonb NOT NULL,
    rules jsonb DEFAULT '[]'::jsonb NOT NULL,
    admission_key uuid NOT NULL,
    deps_total integer DEFAULT 0 NOT NULL,
    deps_finished integer DEFAULT 0 NOT NULL,
    deps_succeeded integer DEFAULT 0 NOT NULL,
    success bigint DEFAULT 0 NOT NULL,
    failures bigint DEFAULT 0 NOT NULL,
    failure_reason text,
    status_reason text,
    claimed_by text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    claimed_at timestamp with time zone,
    started_at timestamp with time zone,
    ended_at timestamp with time zone,
    last_updated timestamp with time zone DEFAULT now() NOT NULL,
    attempt integer DEFAULT 0 NOT NULL,
    max_attempts integer DEFAULT 1 NOT NULL,
    backoff_seconds double precision DEFAULT 5 NOT NULL,
    backoff_max_seconds double precision DEFAULT 300 NOT NULL,
    not_before timestamp with time zone,
    expected_count bigint,
    dead_end_barrier boolean DEFAULT false NOT NULL,
    CONSTRAINT task_counters_non_negative CHECK (((success >= 0) AND (failures >= 0))),
    CONSTRAINT task_deps_counters CHECK ((((deps_finished >= 0) AND (deps_finished <= deps_total)) AND ((deps_succeeded >= 0) AND (deps_succeeded <= deps_finished)))),
    CONSTRAINT task_expected_count_non_negative CHECK ((expected_count >= 0)),
    CONSTRAINT task_failure_has_reason CHECK (((status <> 'failure'::taskrunner.task_status) OR (failure_reason IS NOT NULL))),
    CONSTRAINT task_metadata_is_object CHECK ((jsonb_typeof(metadata) = 'object'::text)),
    CONSTRAINT task_priority_range CHECK (((priority >= '-1000'::integer) AND (priority <= 1000))),
    CONSTRAINT task_retry_range CHECK (((attempt >= 0) AND ((max_attempts >= 1) AND (max_attempts <= 100)) AND ((backoff_seconds >= (0)::double precision) AND (backoff_seconds <= (86400)::double precision)) AND ((backoff_max_seconds >= backoff_seconds) AND (backoff_max_seconds <= (86400)::double precision)))),
    CONSTRAINT task_rules_is_array CHECK ((jsonb_typeof(rules) = 'array'::text)),
    CONSTRAINT task_timeout_range CHECK (((timeout >= 1) AND (timeout <= 86400)))
);


--
-- Name: TABLE task; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON TABLE taskrunner.task IS 'One row per task. A status change is checked, recorded and propagated by the triggers,
whoever makes it (API, worker or a DBA''s UPDATE).';


--
-- Name: COLUMN task.seq; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON COLUMN taskrunner.task.seq IS 'Creation order (input order within a batch): "oldest first" and "newest first".';


--
-- Name: COLUMN task.previous_status; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON COLUMN taskrunner.task.previous_status IS 'The status before the latest UPDATE of the row (set by a trigger): lets the
statement-level trigger see what changed without joining OLD and NEW tables.';


--
-- Name: COLUMN task.timeout; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON COLUMN taskrunner.task.timeout IS 'Seconds a running task may go without a heartbeat (last_updated) before tick() fails it.';


--
-- Name: COLUMN task.rules; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON COLUMN taskrunner.task.rules IS 'Normalised rules: concurrency {"kind","status","fields","max"}; capacity
{"type":"capacity","kind","status":"running","fields","max"}; rate limit
{"type":"rate_limit","kind","fields","max","per_seconds"}.';


--
-- Name: COLUMN task.admission_key; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON COLUMN taskrunner.task.admission_key IS 'Tasks with the same key (kind, priority, rules, rule field values) are interchangeable
for admission: claims look at one head per key.';


--
-- Name: COLUMN task.status_reason; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON COLUMN taskrunner.task.status_reason IS 'Why the latest transition happened.';


--
-- Name: COLUMN task.claimed_at; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON COLUMN taskrunner.task.claimed_at IS 'When the task entered running.';


--
-- Name: COLUMN task.started_at; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON COLUMN taskrunner.task.started_at IS 'When the target acknowledged the start webhook (NULL while the start is in flight).';


--
-- Name: COLUMN task.last_updated; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON COLUMN taskrunner.task.last_updated IS 'Heartbeat: drives timeouts.';


--
-- Name: COLUMN task.attempt; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON COLUMN taskrunner.task.attempt IS 'The current run: 1 at the first claim, n at the n-th. A start that never got going (its
lease expired, its worker shut down) does not count: the task goes back to pending with
the run it had.';


--
-- Name: COLUMN task.max_attempts; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON COLUMN taskrunner.task.max_attempts IS 'Runs in all (1 = no retry). A failed run with runs left goes back to pending after a
backoff (_090_retry). A failure reported with retryable = false sets it to attempt.';


--
-- Name: COLUMN task.backoff_seconds; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON COLUMN taskrunner.task.backoff_seconds IS 'The backoff before the first retry; doubled per retry, capped at backoff_max_seconds,
with jitter (see _retry_delay).';


--
-- Name: COLUMN task.backoff_max_seconds; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON COLUMN taskrunner.task.backoff_max_seconds IS 'The longest backoff between two runs.';


--
-- Name: COLUMN task.not_before; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON COLUMN taskrunner.task.not_before IS 'A pending task is not claimed before this time (delayed start, retry backoff). Claims
clear it once due, so NULL means "claimable now" (or never scheduled).';


--
-- Name: COLUMN task.expected_count; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON COLUMN taskrunner.task.expected_count IS 'How many items the task expects to process (ArcRun''s expected_count; NULL: not said).
Capacity rules count the remaining work of running tasks:
greatest(coalesce(expected_count, 0) - success - failures, 0).';


--
-- Name: COLUMN task.dead_end_barrier; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON COLUMN taskrunner.task.dead_end_barrier IS 'Dead-end cancellation (taskrunner.settings.dead_end_cancel) does not walk above this task.';


--
-- Name: _move_task(uuid, taskrunner.task_status[], taskrunner.task_status, text, text); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner._move_task(p_id uuid, p_allowed taskrunner.task_status[], p_to taskrunner.task_status, p_reason text, p_verb text) RETURNS taskrunner.task
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_task taskrunner.task;
BEGIN
    SELECT * INTO v_task FROM taskrunner.task WHERE id = p_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        PERFORM taskrunner._raise('TR404', format('task %s not found', p_id));
    END IF;
    IF NOT v_task.status = ANY (p_allowed) THEN
        PERFORM taskrunner._raise('TR409',
            format('cannot %s task %s: it is %s', p_verb, p_id, v_task.status),
            format('status: task is %s', v_task.status));
    END IF;
    UPDATE taskrunner.task
    SET status = coalesce(p_to, CASE WHEN deps_finished = deps_total THEN 'pending'
                                     ELSE 'waiting' END::taskrunner.task_status),
        status_reason = p_reason
    WHERE id = p_id
    RETURNING * INTO v_task;
    RETURN v_task;
END $$;


--
-- Name: FUNCTION _move_task(p_id uuid, p_allowed taskrunner.task_status[], p_to taskrunner.task_status, p_reason text, p_verb text); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner._move_task(p_id uuid, p_allowed taskrunner.task_status[], p_to taskrunner.task_status, p_reason text, p_verb text) IS 'The common shape of cancel/pause/resume: lock, check the current status, move.';


--
-- Name: _propagate(uuid[], uuid[]); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner._propagate(p_parents uuid[], p_children uuid[] DEFAULT NULL::uuid[]) RETURNS void
    LANGUAGE plpgsql
    SET enable_seqscan TO 'off'
    AS $$
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


--
-- Name: FUNCTION _propagate(p_parents uuid[], p_children uuid[]); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner._propagate(p_parents uuid[], p_children uuid[]) IS 'Propagate the end of p_parents to their children (only to p_children when given, as
when a new batch depends on tasks that had already ended). Set-based: the whole
failure cascade is computed with one recursive query and applied with one UPDATE, so
a 10,000-deep chain costs no trigger recursion.

Every join here follows an index from a small set of ended tasks; the planner cannot
know the sizes of the recursive work table and would pick hash joins over whole tables
at each recursion step, so sequential scans are discouraged for this function.';


--
-- Name: _raise(text, text, text); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner._raise(p_code text, p_message text, p_detail text DEFAULT NULL::text) RETURNS void
    LANGUAGE plpgsql
    AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = p_code, MESSAGE = p_message, DETAIL = coalesce(p_detail, '');
END $$;


--
-- Name: FUNCTION _raise(p_code text, p_message text, p_detail text); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner._raise(p_code text, p_message text, p_detail text) IS 'Raise an error with a taskrunner SQLSTATE (TR400, TR404, TR409: the API maps them to
HTTP 400, 404, 409) and a detail ("field: problem" lines).';


--
-- Name: _rate_key(jsonb, jsonb); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner._rate_key(p_rule jsonb, p_metadata jsonb) RETURNS uuid
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
    SELECT md5(concat_ws(E'\x1f', p_rule ->> 'kind', p_rule ->> 'per_seconds',
                         taskrunner._rule_pattern(p_rule, p_metadata)::text))::uuid
$$;


--
-- Name: FUNCTION _rate_key(p_rule jsonb, p_metadata jsonb); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner._rate_key(p_rule jsonb, p_metadata jsonb) IS 'The ledger key (rate_start) of a RateLimit rule for a task with this metadata: the kind,
the window and the values of the rule''s fields. Rules that differ only in max_starts
share it, so each counts the starts of the others.';


--
-- Name: _rate_limit_next_free(); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner._rate_limit_next_free() RETURNS timestamp with time zone
    LANGUAGE sql STABLE
    AS $$
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


--
-- Name: FUNCTION _rate_limit_next_free(); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner._rate_limit_next_free() IS 'The earliest time a pending group held back by a full rate-limit window may start (its
max_starts-th newest start leaves the window); NULL when no pending group is held back by
one. Workers sleep until then (with next_wakeup()), so a task blocked by a rate window
starts when the window frees. One probe per pending group (_claim_groups).';


--
-- Name: _record_starts(jsonb, jsonb, uuid[]); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner._record_starts(p_rules jsonb, p_metadata jsonb, p_ids uuid[]) RETURNS void
    LANGUAGE sql
    AS $$
    INSERT INTO taskrunner.rate_start (key, at, expires_at, task_id)
    SELECT taskrunner._rate_key(r, p_metadata), now(),
           now() + make_interval(secs => (r ->> 'per_seconds')::int), id
    FROM jsonb_array_elements(p_rules) r, unnest(p_ids) id
    WHERE r ->> 'type' = 'rate_limit'
$$;


--
-- Name: FUNCTION _record_starts(p_rules jsonb, p_metadata jsonb, p_ids uuid[]); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner._record_starts(p_rules jsonb, p_metadata jsonb, p_ids uuid[]) IS 'Record the starts of p_ids (tasks of one admission group) in rate_start, one row per
RateLimit rule of the group, at now() (the claim''s transaction time).

Exact under the rule''s lock: a claim at time x counts every row with at > x - per_seconds,
later ones included (a claim that started earlier may get the lock later). Any window of
per_seconds that holds x holds only rows with at > x - per_seconds, so each window keeps
at most max_starts rows.';


--
-- Name: _rerun(uuid[], text); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner._rerun(p_roots uuid[], p_reason text) RETURNS TABLE(task_id uuid, batch_id uuid, from_status taskrunner.task_status, to_status taskrunner.task_status, role text)
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


--
-- Name: FUNCTION _rerun(p_roots uuid[], p_reason text); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner._rerun(p_roots uuid[], p_reason text) IS 'The work of rerun_task and rerun_batch: move failed/canceled p_roots (reason p_reason) and their cascade back to run, and make the unstarted children of those wait for them again; counters recomputed from the parents'' statuses. TR409 when a root requires the success of a failed or canceled task that is not rerun with it. Call with the rerun lock held.';


--
-- Name: _retry_delay(integer, double precision, double precision); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner._retry_delay(p_attempt integer, p_base double precision, p_max double precision) RETURNS double precision
    LANGUAGE sql
    AS $$
    SELECT d * (0.5 + random() / 2)
    FROM (SELECT least(p_max, p_base * 2 ^ least(greatest(p_attempt, 1) - 1, 60)) AS d) x
$$;


--
-- Name: FUNCTION _retry_delay(p_attempt integer, p_base double precision, p_max double precision); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner._retry_delay(p_attempt integer, p_base double precision, p_max double precision) IS 'Seconds to wait before the retry that follows failed run p_attempt: the exponential delay
d = min(p_max, p_base * 2^(p_attempt - 1)), with equal jitter: uniform in [d/2, d].';


--
-- Name: _rule_count(jsonb, jsonb); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner._rule_count(p_rule jsonb, p_metadata jsonb) RETURNS bigint
    LANGUAGE plpgsql STABLE
    AS $$
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


--
-- Name: FUNCTION _rule_count(p_rule jsonb, p_metadata jsonb); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner._rule_count(p_rule jsonb, p_metadata jsonb) IS 'A rule''s current count for a task with this metadata, compared with the rule''s max:
concurrency: matching tasks in the rule''s status; capacity: the remaining work
(greatest(coalesce(expected_count, 0) - success - failures, 0)) summed over matching
running tasks; rate limit: starts in the window (rate_start rows of the key with at >
now() - per_seconds). Running tasks are counted with the status spelled out so the
planner can use task_running_metadata_idx, which holds running tasks only; the metadata
GIN index over all tasks would read every blocked pending task of the group, and a count
would grow with the backlog.';


--
-- Name: _rule_pattern(jsonb, jsonb); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner._rule_pattern(p_rule jsonb, p_metadata jsonb) RETURNS jsonb
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
    SELECT coalesce(jsonb_object_agg(f, p_metadata -> f), '{}'::jsonb)
    FROM jsonb_array_elements_text(p_rule -> 'fields') f
$$;


--
-- Name: FUNCTION _rule_pattern(p_rule jsonb, p_metadata jsonb); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner._rule_pattern(p_rule jsonb, p_metadata jsonb) IS 'The metadata values a rule compares, as a containment pattern: {"field": value, ...}.';


--
-- Name: _task_still_needed(uuid, uuid); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner._task_still_needed(p_task uuid, p_batch uuid) RETURNS boolean
    LANGUAGE sql STABLE
    AS $$
    SELECT EXISTS (
               SELECT 1 FROM taskrunner.dependency d
               JOIN taskrunner.task c ON c.id = d.child_id
               WHERE d.parent_id = p_task AND c.batch_id <> p_batch)
        OR EXISTS (
               SELECT 1 FROM taskrunner.delivery x
               WHERE x.task_id = p_task AND x.status IN ('queued', 'in_flight'))
$$;


--
-- Name: FUNCTION _task_still_needed(p_task uuid, p_batch uuid); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner._task_still_needed(p_task uuid, p_batch uuid) IS 'Whether purge_finished must keep this task of an otherwise purgeable batch: a task of
another batch depends on it, or one of its webhooks is still queued or in flight.';


--
-- Name: add_counters(jsonb); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.add_counters(p_updates jsonb) RETURNS integer
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: FUNCTION add_counters(p_updates jsonb); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.add_counters(p_updates jsonb) IS 'PUT /task: add progress counters to many tasks at once (rows locked in id order, so
concurrent flushes cannot deadlock). Running tasks also get a heartbeat, and their
start is acknowledged (started_at), as by update_task. Progress on a running task with
an expected_count wakes the workers once (capacity rules may admit more).';


--
-- Name: cancel_task(uuid); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.cancel_task(p_id uuid) RETURNS taskrunner.task
    LANGUAGE sql
    AS $$
    SELECT taskrunner._move_task(p_id, '{waiting,pending,paused,running}', 'canceled',
                                 'canceled', 'cancel')
$$;


--
-- Name: FUNCTION cancel_task(p_id uuid); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.cancel_task(p_id uuid) IS 'Cancel a waiting, pending, paused or running task (a running one fires its cancel
webhooks).';


--
-- Name: claim_deliveries(text, integer, integer); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.claim_deliveries(p_worker text, p_max integer, p_lease_seconds integer DEFAULT 60) RETURNS SETOF taskrunner.work_item
    LANGUAGE sql
    AS $$
    WITH picked AS (
        SELECT id FROM taskrunner.delivery
        WHERE status = 'queued' AND next_attempt_at <= now()
        ORDER BY next_attempt_at
        LIMIT greatest(p_max, 0)
        FOR NO KEY UPDATE SKIP LOCKED
    ), leased AS (
        UPDATE taskrunner.delivery d
        SET status = 'in_flight', attempts = d.attempts + 1, worker = p_worker,
            lease_until = now() + make_interval(secs => p_lease_seconds)
        FROM picked WHERE d.id = picked.id
        RETURNING d.id, d.action_id, d.task_id, d.event, d.attempts - d.round_base AS attempt
    )
    SELECT l.id, l.task_id, l.event, l.attempt, a.url, a.verb, a.body, a.headers,
           t.name, t.kind, t.batch_id, b.traceparent, b.tracestate
    FROM leased l
    JOIN taskrunner.action a ON a.id = l.action_id
    JOIN taskrunner.task t ON t.id = l.task_id
    LEFT JOIN taskrunner.batch b ON b.batch_id = t.batch_id
$$;


--
-- Name: FUNCTION claim_deliveries(p_worker text, p_max integer, p_lease_seconds integer); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.claim_deliveries(p_worker text, p_max integer, p_lease_seconds integer) IS 'Lease up to p_max queued deliveries that are due (end and cancel webhooks, and starts
waiting for a retry).';


--
-- Name: claim_tasks(text, integer, integer); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.claim_tasks(p_worker text, p_max integer, p_lease_seconds integer DEFAULT 60) RETURNS SETOF taskrunner.work_item
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
           a.headers, t.name, t.kind, t.batch_id, b.traceparent, b.tracestate
    FROM starts s
    JOIN taskrunner.action a ON a.id = s.action_id
    JOIN taskrunner.task t ON t.id = s.task_id
    LEFT JOIN taskrunner.batch b ON b.batch_id = t.batch_id;
END $$;


--
-- Name: FUNCTION claim_tasks(p_worker text, p_max integer, p_lease_seconds integer); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.claim_tasks(p_worker text, p_max integer, p_lease_seconds integer) IS 'Claim up to p_max ready tasks for p_worker: move them to running (attempt + 1) and
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


--
-- Name: complete_tasks(jsonb); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.complete_tasks(p_results jsonb) RETURNS TABLE(task_id uuid, completed boolean, status taskrunner.task_status)
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


--
-- Name: FUNCTION complete_tasks(p_results jsonb); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.complete_tasks(p_results jsonb) IS 'The outcome of many running tasks at once: the batch form of PATCH /task/{id} with a
status. Each element of p_results: {"task_id", "status": "success"|"failure",
"failure_reason", "retryable"} (failure_reason required for failure; retryable false: no
retry). A task that is not running is left alone (completed = false). Rows are locked in
id order; one UPDATE moves them all, so the history, outbox, propagation and wake-up run
once for the batch.';


--
-- Name: create_batch(jsonb, text); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.create_batch(p_tasks jsonb, p_requester text DEFAULT NULL::text) RETURNS SETOF taskrunner.task
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
                                     backoff_max_seconds, not_before, expected_count,
                                     dead_end_barrier)
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
               (i.t ->> 'expected_count')::bigint,
               coalesce((i.t ->> 'dead_end_barrier')::boolean, false)
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


--
-- Name: FUNCTION create_batch(p_tasks jsonb, p_requester text); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.create_batch(p_tasks jsonb, p_requester text) IS 'Create a batch of tasks atomically. Input: a JSON array already validated and
normalised by the API (format in docs/sql.md). Dependencies name a local_id of the
batch or the task_id of an existing task. A task whose dedupe matcher finds an existing
task is skipped, and dependencies on it point at that existing task instead. "retry"
({max_attempts, backoff_seconds, backoff_max_seconds}) and "not_before" or
"delay_seconds" schedule runs. Returns the created tasks in input order.';


--
-- Name: finish_deliveries(text, jsonb); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.finish_deliveries(p_worker text, p_results jsonb) RETURNS TABLE(delivery_id uuid, status text)
    LANGUAGE plpgsql
    AS $$
#variable_conflict use_column
DECLARE
    v_out jsonb;
    v_started jsonb;  -- starts that succeeded: [{task_id, cancel_actions}]
    v_failed jsonb;   -- starts that gave up: [{task_id, error}]
    v_queued int;
BEGIN
    -- Locks first, each in id order (as add_counters does), so concurrent callers cannot
    -- deadlock: the deliveries, then the tasks of starts, whose status decides what a
    -- start's outcome means. The statements below see those rows as locked.
    PERFORM 1 FROM taskrunner.delivery d
    WHERE d.id IN (SELECT (r ->> 'delivery_id')::uuid FROM jsonb_array_elements(p_results) r)
    ORDER BY d.id
    FOR NO KEY UPDATE;
    PERFORM 1 FROM taskrunner.task t
    WHERE t.id IN (SELECT d.task_id FROM taskrunner.delivery d
                   WHERE d.id IN (SELECT (r ->> 'delivery_id')::uuid
                                  FROM jsonb_array_elements(p_results) r)
                     AND d.event = 'start')
    ORDER BY t.id
    FOR NO KEY UPDATE;

    WITH input AS MATERIALIZED (
        SELECT DISTINCT ON (id) * FROM (
            SELECT (r ->> 'delivery_id')::uuid AS id,
                   coalesce((r ->> 'ok')::boolean, false) AS ok,
                   (r ->> 'status_code')::int AS status_code,
                   r ->> 'error' AS error,
                   (r ->> 'retry_delay_ms')::int AS retry_delay_ms,
                   nullif(r -> 'cancel_actions', 'null') AS cancel_actions,
                   (r ->> 'started_at')::timestamptz AS started_at,
                   ord
            FROM jsonb_array_elements(p_results) WITH ORDINALITY x(r, ord)) i
        ORDER BY id, ord
    ), locked AS MATERIALIZED (
        SELECT d.id, d.task_id, d.event, d.attempts, d.status, d.worker,
               t.status AS task_status, t.started_at
        FROM taskrunner.delivery d
        LEFT JOIN taskrunner.task t ON t.id = d.task_id AND d.event = 'start'
        WHERE d.id IN (SELECT id FROM input)
    ), outcome AS MATERIALIZED (
        -- 'stale': a delivery that is no longer in flight for us: the lease ran out and
        -- it moved on without us (tick() recorded our attempt as expired; another worker
        -- may own the current one), so nothing changes.
        -- 'canceled' (dropped): a start whose answer no longer matters. Its task left
        -- running (canceled, timed out) before a 2xx came back; or the attempt failed
        -- but the task ended, or its target already reported through the handle (it has
        -- the start). Re-sending it would start an ended task, or start it twice.
        SELECT i.*, l.task_id, l.event, l.attempts,
               CASE WHEN l.id IS NULL THEN 'unknown'
                    WHEN l.status <> 'in_flight' OR l.worker IS DISTINCT FROM p_worker THEN 'stale'
                    WHEN l.event = 'start' AND i.ok AND l.started_at IS NULL
                         AND l.task_status IN ('canceled', 'failure') THEN 'canceled'
                    WHEN l.event = 'start' AND NOT i.ok
                         AND (l.task_status <> 'running' OR l.started_at IS NOT NULL)
                         THEN 'canceled'
                    WHEN i.ok THEN 'delivered'
                    WHEN i.retry_delay_ms IS NOT NULL THEN 'queued'
                    ELSE 'failed' END AS result,
               CASE WHEN l.task_status <> 'running' AND i.ok
                        THEN format('dropped: task is %s (answered after the task ended)',
                                    l.task_status)
                    WHEN l.task_status <> 'running'
                        THEN format('%s; dropped: task is %s', coalesce(i.error, 'failed'),
                                    l.task_status)
                    ELSE format('%s; dropped: the target already reported on the task',
                                coalesce(i.error, 'failed')) END AS dropped_error
        FROM input i LEFT JOIN locked l ON l.id = i.id
    ), new_attempts AS (
        INSERT INTO taskrunner.delivery_attempt (delivery_id, attempt, worker, started_at,
                                                 status_code, error)
        SELECT o.id, o.attempts, p_worker, coalesce(o.started_at, now()), o.status_code,
               CASE WHEN o.ok THEN NULL ELSE coalesce(o.error, 'failed') END
        FROM outcome o WHERE o.result NOT IN ('unknown', 'stale')
    ), moved AS (
        UPDATE taskrunner.delivery d
        SET status = o.result::taskrunner.delivery_status,
            lease_until = NULL,
            last_status_code = o.status_code,
            last_error = CASE WHEN o.result = 'canceled' THEN o.dropped_error
                              WHEN o.ok THEN NULL ELSE coalesce(o.error, 'failed') END,
            next_attempt_at = CASE WHEN o.result = 'queued'
                                   THEN now() + make_interval(secs => o.retry_delay_ms / 1000.0)
                                   ELSE d.next_attempt_at END,
            finished_at = CASE WHEN o.result = 'queued' THEN NULL ELSE now() END
        FROM outcome o
        WHERE d.id = o.id AND o.result NOT IN ('unknown', 'stale')
    )
    SELECT jsonb_agg(jsonb_build_object('delivery_id', o.id, 'status', o.result) ORDER BY o.ord),
           jsonb_agg(jsonb_build_object('task_id', o.task_id, 'cancel_actions', o.cancel_actions))
               FILTER (WHERE o.event = 'start' AND o.ok
                              AND o.result IN ('delivered', 'canceled')),
           jsonb_agg(jsonb_build_object('task_id', o.task_id,
                                        'error', coalesce(o.error, 'failed')))
               FILTER (WHERE o.event = 'start' AND o.result = 'failed')
    INTO v_out, v_started, v_failed
    FROM outcome o;

    IF v_failed IS NOT NULL THEN
        -- a start that gave up fails its task (never overriding an end reached meanwhile)
        UPDATE taskrunner.task t
        SET status = 'failure', failure_reason = format('start webhook failed: %s', f ->> 'error')
        FROM jsonb_array_elements(v_failed) f
        WHERE t.id = (f ->> 'task_id')::uuid AND t.status = 'running' AND t.started_at IS NULL;
    END IF;

    IF v_started IS NOT NULL THEN
        -- Started. Register the cancel actions the targets answered with.
        INSERT INTO taskrunner.action (task_id, event, url, verb, body, headers)
        SELECT (s ->> 'task_id')::uuid, 'cancel', a ->> 'url',
               upper(a ->> 'verb'), a -> 'body', coalesce(a -> 'headers', '{}')
        FROM jsonb_array_elements(v_started) s
        CROSS JOIN LATERAL jsonb_array_elements(
            CASE WHEN jsonb_typeof(s -> 'cancel_actions') = 'array'
                 THEN s -> 'cancel_actions' ELSE '[]' END) a;

        UPDATE taskrunner.task t SET started_at = now(), last_updated = now()
        WHERE t.id IN (SELECT (s ->> 'task_id')::uuid FROM jsonb_array_elements(v_started) s)
          AND t.status = 'running' AND t.started_at IS NULL;

        -- canceled while the start was in flight: the target did start it, so tell it
        -- to cancel with the actions it just gave us
        INSERT INTO taskrunner.delivery (action_id, task_id, event)
        SELECT a.id, a.task_id, 'cancel'
        FROM taskrunner.action a
        JOIN taskrunner.task t ON t.id = a.task_id AND t.status = 'canceled'
        WHERE a.task_id IN (SELECT (s ->> 'task_id')::uuid FROM jsonb_array_elements(v_started) s
                            WHERE CASE WHEN jsonb_typeof(s -> 'cancel_actions') = 'array'
                                       THEN jsonb_array_length(s -> 'cancel_actions') > 0 END)
          AND a.event = 'cancel'
          AND NOT EXISTS (SELECT 1 FROM taskrunner.delivery x WHERE x.action_id = a.id);
        GET DIAGNOSTICS v_queued = ROW_COUNT;
        IF v_queued > 0 THEN
            PERFORM pg_notify('taskrunner_delivery', '');
        END IF;
    END IF;

    RETURN QUERY
    SELECT (o ->> 'delivery_id')::uuid, o ->> 'status'
    FROM jsonb_array_elements(coalesce(v_out, '[]')) o;
END $$;


--
-- Name: FUNCTION finish_deliveries(p_worker text, p_results jsonb); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.finish_deliveries(p_worker text, p_results jsonb) IS 'Record the outcomes of webhook attempts, many in one call (see docs/sql.md). Each
element of p_results: {"delivery_id", "ok", "status_code", "error", "retry_delay_ms",
"cancel_actions", "started_at"}. Returns each delivery''s new status, ''stale'' when our
lease was lost, or ''unknown''. A start whose task is no longer running is dropped
(''canceled'', the reason in last_error): never requeued, never recorded as delivered. Set-based: a worker records a whole round of webhook
results with a few statements, so the per-statement trigger work is paid once.

Locks: deliveries, then the tasks of starts, each in id order (as add_counters does),
so concurrent callers cannot deadlock.';


--
-- Name: finish_delivery(uuid, text, boolean, integer, text, integer, jsonb, timestamp with time zone); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.finish_delivery(p_id uuid, p_worker text, p_ok boolean, p_status_code integer DEFAULT NULL::integer, p_error text DEFAULT NULL::text, p_retry_delay_ms integer DEFAULT NULL::integer, p_cancel_actions jsonb DEFAULT NULL::jsonb, p_started_at timestamp with time zone DEFAULT NULL::timestamp with time zone) RETURNS text
    LANGUAGE sql
    AS $$
    SELECT f.status FROM taskrunner.finish_deliveries(p_worker, jsonb_build_array(
        jsonb_build_object('delivery_id', p_id, 'ok', p_ok, 'status_code', p_status_code,
                           'error', p_error, 'retry_delay_ms', p_retry_delay_ms,
                           'cancel_actions', p_cancel_actions, 'started_at', p_started_at))) f
$$;


--
-- Name: FUNCTION finish_delivery(p_id uuid, p_worker text, p_ok boolean, p_status_code integer, p_error text, p_retry_delay_ms integer, p_cancel_actions jsonb, p_started_at timestamp with time zone); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.finish_delivery(p_id uuid, p_worker text, p_ok boolean, p_status_code integer, p_error text, p_retry_delay_ms integer, p_cancel_actions jsonb, p_started_at timestamp with time zone) IS 'Record the outcome of one webhook attempt: finish_deliveries for a single result.';


--
-- Name: fold_batch_deltas(); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.fold_batch_deltas() RETURNS integer
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: FUNCTION fold_batch_deltas(); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.fold_batch_deltas() IS 'Adds batch_delta rows into batch and deletes them; run by the workers'' tick. Returns the batches folded, NULL when another call is folding.';


--
-- Name: is_terminal(taskrunner.task_status); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.is_terminal(p_status taskrunner.task_status) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
    SELECT p_status IN ('success', 'failure', 'canceled')
$$;


--
-- Name: FUNCTION is_terminal(p_status taskrunner.task_status); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.is_terminal(p_status taskrunner.task_status) IS 'True for the statuses a task ends in: success, failure, canceled.';


--
-- Name: next_wakeup(); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.next_wakeup() RETURNS timestamp with time zone
    LANGUAGE sql STABLE
    AS $$
    SELECT least(
        (SELECT min(not_before) FROM taskrunner.task
         WHERE status = 'pending' AND not_before IS NOT NULL),
        (SELECT taskrunner._rate_limit_next_free()
         WHERE EXISTS (SELECT 1 FROM taskrunner.rate_start)))
$$;


--
-- Name: FUNCTION next_wakeup(); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.next_wakeup() IS 'The earliest time at which something may become claimable: a delayed start or a retry''s
backoff falls due, or a full rate-limit window frees (_rate_limit_next_free); NULL when
nothing is scheduled. Idle workers sleep until then. May be in the past: a task fell due
and no claim has promoted it yet.';


--
-- Name: pause_task(uuid); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.pause_task(p_id uuid) RETURNS taskrunner.task
    LANGUAGE sql
    AS $$
    SELECT taskrunner._move_task(p_id, '{waiting,pending}', 'paused', 'paused', 'pause')
$$;


--
-- Name: FUNCTION pause_task(p_id uuid); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.pause_task(p_id uuid) IS 'Pause a waiting or pending task: claims skip it until resume_task().';


--
-- Name: prune_rate_starts(); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.prune_rate_starts() RETURNS integer
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_deleted int;
BEGIN
    -- a margin: a claim counts from its transaction's start, which may be a little older
    -- than ours
    DELETE FROM taskrunner.rate_start WHERE expires_at < now() - interval '5 minutes';
    GET DIAGNOSTICS v_deleted = ROW_COUNT;
    RETURN v_deleted;
END $$;


--
-- Name: FUNCTION prune_rate_starts(); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.prune_rate_starts() IS 'Housekeeping (the worker''s tick): delete rate_start rows that no window counts any more
(expired more than 5 minutes ago); returns how many.';


--
-- Name: purge_finished(interval, integer); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.purge_finished(p_older_than interval, p_max_tasks integer DEFAULT 1000, OUT batches integer, OUT tasks integer, OUT dependencies integer, OUT actions integer, OUT deliveries integer, OUT attempts integer, OUT history integer) RETURNS record
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: FUNCTION purge_finished(p_older_than interval, p_max_tasks integer, OUT batches integer, OUT tasks integer, OUT dependencies integer, OUT actions integer, OUT deliveries integer, OUT attempts integer, OUT history integer); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.purge_finished(p_older_than interval, p_max_tasks integer, OUT batches integer, OUT tasks integer, OUT dependencies integer, OUT actions integer, OUT deliveries integer, OUT attempts integer, OUT history integer) IS 'Retention: delete one chunk (at most p_max_tasks tasks) of the batches whose tasks all
ended more than p_older_than ago, oldest batch first, with their dependencies, actions,
deliveries, delivery attempts and history; a batch left without tasks loses its batch and
batch_delta rows. Keeps a task that a task of another batch depends on (until that batch
goes) and one with a webhook still queued or in flight. Returns what it deleted (batches
counts batches removed entirely); every column NULL when another purge is running. Call
it again until tasks = 0. The workers call it each tick when RETENTION_DAYS is set.';


--
-- Name: recheck_dead_ends(integer); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.recheck_dead_ends(p_max integer DEFAULT 1000) RETURNS integer
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_ids uuid[];
BEGIN
    WITH taken AS (
        DELETE FROM taskrunner.dead_end_recheck
        WHERE id IN (SELECT id FROM taskrunner.dead_end_recheck
                     ORDER BY id LIMIT p_max FOR UPDATE SKIP LOCKED)
        RETURNING task_id
    )
    SELECT array_agg(DISTINCT task_id) INTO v_ids FROM taken;
    IF v_ids IS NULL OR NOT (SELECT dead_end_cancel FROM taskrunner.settings) THEN
        RETURN 0;
    END IF;
    RETURN taskrunner._cancel_dead_ends('{}', v_ids);
END $$;


--
-- Name: FUNCTION recheck_dead_ends(p_max integer); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.recheck_dead_ends(p_max integer) IS 'Look again at up to p_max dead-end candidates that a walk skipped (dead_end_recheck):
cancels those that are dead ends now, queues again those still locked. The workers''
housekeeping calls it; returns how many it canceled.';


--
-- Name: release_deliveries(text, uuid[]); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.release_deliveries(p_worker text, p_ids uuid[]) RETURNS integer
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_count int;
BEGIN
    WITH released AS (
        UPDATE taskrunner.delivery
        SET status = CASE WHEN event = 'start' THEN 'expired'::taskrunner.delivery_status
                          ELSE 'queued' END,
            attempts = attempts - 1,
            lease_until = NULL,
            next_attempt_at = now(),
            last_error = 'released by worker shutdown',
            finished_at = CASE WHEN event = 'start' THEN now() END
        WHERE id = ANY (p_ids) AND status = 'in_flight' AND worker = p_worker
        RETURNING task_id, event
    ), requeued AS (
        UPDATE taskrunner.task t
        SET status = 'pending', status_reason = format('released by %s', p_worker)
        FROM released r
        WHERE r.event = 'start' AND t.id = r.task_id AND t.status = 'running'
          AND t.started_at IS NULL
    )
    SELECT count(*) INTO v_count FROM released;
    IF v_count > 0 THEN
        PERFORM pg_notify('taskrunner_delivery', '');
    END IF;
    RETURN v_count;
END $$;


--
-- Name: FUNCTION release_deliveries(p_worker text, p_ids uuid[]); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.release_deliveries(p_worker text, p_ids uuid[]) IS 'Put leased deliveries back (a worker shutting down): the task of a start goes back to
pending for another worker; other deliveries are queued again, the attempt not counted.';


--
-- Name: rerun_batch(uuid); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.rerun_batch(p_batch uuid) RETURNS TABLE(task_id uuid, batch_id uuid, from_status taskrunner.task_status, to_status taskrunner.task_status, role text)
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: FUNCTION rerun_batch(p_batch uuid); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.rerun_batch(p_batch uuid) IS 'POST /batch/{id}/rerun: rerun_task for every failed or canceled task of the batch, in one transaction (their cascade in other batches too). Returns one row per task whose status changed. TR404 for an unknown batch; TR409 when no task of it failed or was canceled, or one requires the success of a failed or canceled task of another batch.';


--
-- Name: rerun_task(uuid); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.rerun_task(p_id uuid) RETURNS TABLE(task_id uuid, batch_id uuid, from_status taskrunner.task_status, to_status taskrunner.task_status, role text)
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: FUNCTION rerun_task(p_id uuid); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.rerun_task(p_id uuid) IS 'POST /task/{id}/rerun: a failed or canceled task runs again (pending, or waiting for unfinished parents), with the tasks downstream that failed because of it (back to waiting); children that had not started wait for it again. Returns one row per task whose status changed (role rerun, downstream or waiting_again). TR404; TR409 when the task has not failed or been canceled, or requires the success of a task that failed or was canceled (rerun that one instead).';


--
-- Name: resume_task(uuid); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.resume_task(p_id uuid) RETURNS taskrunner.task
    LANGUAGE sql
    AS $$
    SELECT taskrunner._move_task(p_id, '{paused}', NULL, 'resumed', 'resume')
$$;


--
-- Name: FUNCTION resume_task(p_id uuid); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.resume_task(p_id uuid) IS 'Resume a paused task: back to waiting or pending, per its dependency counters.';


--
-- Name: delivery; Type: TABLE; Schema: taskrunner; Owner: -
--

CREATE TABLE taskrunner.delivery (
    id uuid DEFAULT gen_random_uuid() NOT NULL,
    action_id bigint NOT NULL,
    task_id uuid NOT NULL,
    event taskrunner.action_event NOT NULL,
    status taskrunner.delivery_status DEFAULT 'queued'::taskrunner.delivery_status NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    round_base integer DEFAULT 0 NOT NULL,
    next_attempt_at timestamp with time zone DEFAULT now() NOT NULL,
    lease_until timestamp with time zone,
    worker text,
    last_status_code integer,
    last_error text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    finished_at timestamp with time zone
);


--
-- Name: TABLE delivery; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON TABLE taskrunner.delivery IS 'The transactional outbox: every webhook call to make, with its retry state. The id is
sent as the Idempotency-Key header.';


--
-- Name: COLUMN delivery.round_base; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON COLUMN taskrunner.delivery.round_base IS 'Attempts made before the latest retry_delivery(): a manual retry starts a fresh round of
attempts (work items count attempts - round_base).';


--
-- Name: retry_delivery(uuid); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.retry_delivery(p_id uuid) RETURNS taskrunner.delivery
    LANGUAGE plpgsql
    AS $$
DECLARE
    d taskrunner.delivery;
BEGIN
    SELECT * INTO d FROM taskrunner.delivery WHERE id = p_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        PERFORM taskrunner._raise('TR404', format('delivery %s not found', p_id));
    END IF;
    IF d.status <> 'failed' THEN
        PERFORM taskrunner._raise('TR409',
            format('delivery %s is %s; only failed deliveries can be retried', p_id, d.status),
            format('status: delivery is %s', d.status));
    END IF;
    IF d.event = 'start' THEN
        PERFORM taskrunner._raise('TR409',
            format('delivery %s is a start; its task already failed', p_id));
    END IF;
    UPDATE taskrunner.delivery
    SET status = 'queued', next_attempt_at = now(), finished_at = NULL, round_base = attempts
    WHERE id = p_id
    RETURNING * INTO d;
    PERFORM pg_notify('taskrunner_delivery', '');
    RETURN d;
END $$;


--
-- Name: FUNCTION retry_delivery(p_id uuid); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.retry_delivery(p_id uuid) IS 'Queue again a delivery that gave up (or was canceled), for another round of attempts.';


--
-- Name: session_actor(); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.session_actor() RETURNS text
    LANGUAGE sql STABLE
    AS $$
    SELECT CASE WHEN coalesce(current_setting('application_name', true), '') = ''
                THEN session_user::text
                ELSE format('%s (role %s)', current_setting('application_name', true),
                            session_user) END
$$;


--
-- Name: FUNCTION session_actor(); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.session_actor() IS 'Who the current session is, for history and reasons: "<application_name> (role <role>)", or the role alone when the session set no application_name. The API and workers set taskrunner-api and taskrunner-worker; psql sets psql.';


--
-- Name: set_batch_rules(uuid, text, jsonb); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.set_batch_rules(p_batch uuid, p_kind text, p_rules jsonb) RETURNS integer
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


--
-- Name: FUNCTION set_batch_rules(p_batch uuid, p_kind text, p_rules jsonb); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.set_batch_rules(p_batch uuid, p_kind text, p_rules jsonb) IS 'PATCH /batch/{id}/rules: replaces the rules of the batch''s unfinished tasks of one kind (admission keys recomputed); returns how many tasks changed. TR404, TR400.';


--
-- Name: stop_batch(uuid); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.stop_batch(p_batch uuid) RETURNS TABLE(batch_id uuid, canceled_waiting integer, canceled_pending integer, canceled_claimed integer, canceled_running integer, canceled_paused integer, already_terminal integer)
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: FUNCTION stop_batch(p_batch uuid); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.stop_batch(p_batch uuid) IS 'DELETE /batch/{id}: cancels every task of the batch that has not ended (reason "batch stopped"; running tasks fire their cancel webhooks); returns the counts per former status. TR404 for an unknown batch.';


--
-- Name: take_stats(); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.take_stats() RETURNS text
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_stats text := nullif(current_setting('taskrunner.stats', true), '');
BEGIN
    PERFORM set_config('taskrunner.stats', '', true);
    RETURN v_stats;
END $$;


--
-- Name: FUNCTION take_stats(); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.take_stats() IS 'The transitions counted by triggers in this transaction ("from>to>kind>n;" lines, plus
"created>n;", "propagation>outcome>n;" and "blocked>n;"), then forget them.';


--
-- Name: tg_task__admission_key(); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.tg_task__admission_key() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    NEW.admission_key := taskrunner._admission_key(NEW.kind, NEW.priority, NEW.rules,
                                                   NEW.metadata, NEW.expected_count);
    RETURN NEW;
END $$;


--
-- Name: FUNCTION tg_task__admission_key(); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.tg_task__admission_key() IS 'Trigger: recompute admission_key when kind, priority, rules, metadata or expected_count
change (expected_count is in the key of a task with a capacity rule, see _admission_key).';


--
-- Name: tg_task__after_insert(); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.tg_task__after_insert() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_pending boolean;
    v_lines text;
BEGIN
    WITH hist AS (
        INSERT INTO taskrunner.task_history (task_id, from_status, to_status, reason)
        SELECT id, NULL, status, 'created' FROM new_rows
    )
    SELECT bool_or(status = 'pending'), format('created>%s;', count(*))
    INTO v_pending, v_lines FROM new_rows;
    PERFORM taskrunner._add_stats(v_lines);
    IF v_pending THEN
        PERFORM pg_notify('taskrunner_task', '');
    END IF;
    RETURN NULL;
END $$;


--
-- Name: FUNCTION tg_task__after_insert(); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.tg_task__after_insert() IS 'After new tasks: history rows, and one wake-up when some are ready.';


--
-- Name: tg_task__after_update(); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.tg_task__after_update() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_ended uuid[];
    v_wake_tasks boolean;
    v_queued bigint;
    v_lines text;
BEGIN
    WITH changed AS MATERIALIZED (
        SELECT n.id, n.kind, n.previous_status AS from_status, n.status AS to_status,
               CASE WHEN n.status = 'failure' THEN n.failure_reason ELSE n.status_reason END
                   AS reason
        FROM new_rows n
        WHERE n.status <> n.previous_status
    ), hist AS (
        INSERT INTO taskrunner.task_history (task_id, from_status, to_status, reason)
        SELECT id, from_status, to_status, reason FROM changed
    ), outbox AS (
        INSERT INTO taskrunner.delivery (action_id, task_id, event)
        SELECT a.id, a.task_id, a.event
        FROM changed c
        JOIN taskrunner.action a ON a.task_id = c.id AND a.event =
            CASE c.to_status WHEN 'success' THEN 'success'::taskrunner.action_event
                             WHEN 'failure' THEN 'failure'::taskrunner.action_event
                             WHEN 'canceled' THEN 'cancel'::taskrunner.action_event END
        WHERE c.to_status IN ('success', 'failure')
           OR (c.to_status = 'canceled' AND c.from_status = 'running')
        RETURNING 1
    ), dropped_starts AS (
        -- a start still waiting for a retry is pointless once the task left running
        UPDATE taskrunner.delivery d
        SET status = 'canceled', finished_at = now(), lease_until = NULL
        FROM changed c
        WHERE d.task_id = c.id AND c.from_status = 'running' AND d.event = 'start'
          AND d.status = 'queued'
    ), stats AS (
        SELECT string_agg(format('%s>%s>%s>%s;', from_status, to_status, kind, n), '') AS lines
        FROM (SELECT from_status, to_status, kind, count(*) AS n
              FROM changed GROUP BY 1, 2, 3) s
    )
    SELECT array_agg(id) FILTER (WHERE taskrunner.is_terminal(to_status)),
           coalesce(bool_or(to_status = 'pending' OR from_status = 'running'), false),
           (SELECT count(*) FROM outbox),
           (SELECT lines FROM stats)
    INTO v_ended, v_wake_tasks, v_queued, v_lines
    FROM changed;

    IF v_lines IS NOT NULL THEN
        PERFORM taskrunner._add_stats(v_lines);
    END IF;
    IF v_ended IS NOT NULL THEN
        PERFORM taskrunner._propagate(v_ended);
        -- dead-end cancellation (off by default); not for the tasks that a walk itself
        -- cancels (it goes on from them, or stops at a barrier)
        IF current_setting('taskrunner.dead_end_walk', true) IS DISTINCT FROM 'on'
           AND (SELECT dead_end_cancel FROM taskrunner.settings) THEN
            PERFORM taskrunner._cancel_dead_ends(v_ended);
        END IF;
    END IF;
    IF v_wake_tasks THEN
        PERFORM pg_notify('taskrunner_task', '');
    END IF;
    IF v_queued > 0 THEN
        PERFORM pg_notify('taskrunner_delivery', '');
    END IF;
    RETURN NULL;
END $$;


--
-- Name: FUNCTION tg_task__after_update(); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.tg_task__after_update() IS 'After any update of tasks, once per statement: write the history, queue the webhooks
that the transitions fire (the outbox), propagate ends through the graph and wake
workers (one NOTIFY per channel at most).';


--
-- Name: tg_task__batch_delete(); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.tg_task__batch_delete() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    PERFORM taskrunner._add_batch_deltas(ARRAY(
        SELECT ROW(batch_id, -1, taskrunner._batch_bucket(status, started_at), success,
                   failures, NULL)::taskrunner.batch_change
        FROM old_rows));
    RETURN NULL;
END $$;


--
-- Name: tg_task__batch_insert(); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.tg_task__batch_insert() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: tg_task__batch_truncate(); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.tg_task__batch_truncate() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    TRUNCATE taskrunner.batch, taskrunner.batch_delta;
    RETURN NULL;
END $$;


--
-- Name: tg_task__batch_update(); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.tg_task__batch_update() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: tg_task__freeze_rule_fields(); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.tg_task__freeze_rule_fields() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_field text;
BEGIN
    IF taskrunner.is_terminal(OLD.status) THEN
        RETURN NEW;
    END IF;
    SELECT f INTO v_field
    FROM jsonb_array_elements(OLD.rules) r, jsonb_array_elements_text(r -> 'fields') f
    WHERE OLD.metadata -> f IS DISTINCT FROM NEW.metadata -> f
    ORDER BY f LIMIT 1;
    IF v_field IS NOT NULL THEN
        PERFORM taskrunner._raise('TR409',
            format('cannot change metadata field %s of task %s', v_field, OLD.id),
            format('metadata.%s: read by a concurrency rule of this task; cannot change '
                   'until the task ends (is %s)', v_field, OLD.status));
    END IF;
    RETURN NEW;
END $$;


--
-- Name: FUNCTION tg_task__freeze_rule_fields(); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.tg_task__freeze_rule_fields() IS 'Trigger: the metadata values that a task''s rules read (their fields) cannot change until
the task ends (TR409 naming metadata.<field>); admission keys and rule counts compare them.';


--
-- Name: tg_task__guard_insert(); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.tg_task__guard_insert() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF NEW.status NOT IN ('waiting', 'pending', 'paused') THEN
        PERFORM taskrunner._raise('TR400',
            format('a new task must be waiting, pending or paused, not %s', NEW.status));
    END IF;
    RETURN NEW;
END $$;


--
-- Name: FUNCTION tg_task__guard_insert(); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.tg_task__guard_insert() IS 'A new task starts waiting, pending or paused.';


--
-- Name: tg_task__guard_transition(); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.tg_task__guard_transition() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: FUNCTION tg_task__guard_transition(); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.tg_task__guard_transition() IS 'Guard every status change (API, worker or a DBA''s UPDATE) and keep timestamps right.';


--
-- Name: tg_task__retry(); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.tg_task__retry() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
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


--
-- Name: FUNCTION tg_task__retry(); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.tg_task__retry() IS 'Trigger, before the transition guard, on running -> failure and running -> pending. A
failed run with runs left (attempt < max_attempts) goes back to pending instead, not
before a backoff (_retry_delay; status_reason "retry n of m in Xs: <reason>"), so no end
webhook fires and nothing cascades. A running task put back to pending without failing
(an expired or released start) gives its run back.';


--
-- Name: tick(integer); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.tick(p_max_attempts integer DEFAULT 5) RETURNS jsonb
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_timed_out int;
    v_expired int;
    v_gave_up int;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtextextended('taskrunner.tick', 0)) THEN
        RETURN NULL;
    END IF;

    UPDATE taskrunner.task
    SET status = 'failure', failure_reason = 'Timeout', status_reason = 'Timeout'
    WHERE status = 'running'
      AND last_updated < now() - make_interval(secs => timeout);
    GET DIAGNOSTICS v_timed_out = ROW_COUNT;

    WITH expired AS (
        SELECT id FROM taskrunner.delivery
        WHERE status = 'in_flight' AND lease_until < now()
        FOR NO KEY UPDATE SKIP LOCKED
    ), attempts AS (
        INSERT INTO taskrunner.delivery_attempt (delivery_id, attempt, worker, error)
        SELECT d.id, d.attempts, d.worker, 'lease expired (worker gone?)'
        FROM taskrunner.delivery d JOIN expired e ON e.id = d.id
        ON CONFLICT DO NOTHING
    ), moved AS (
        -- an expired lease was an attempt (its row is written above): a delivery that
        -- used up p_max_attempts in this round gives up like one whose target failed
        UPDATE taskrunner.delivery d
        SET status = CASE WHEN d.event = 'start' THEN 'expired'::taskrunner.delivery_status
                          WHEN d.attempts - d.round_base >= p_max_attempts THEN 'failed'
                          ELSE 'queued' END,
            lease_until = NULL, next_attempt_at = now(),
            last_error = 'lease expired (worker gone?)',
            finished_at = CASE WHEN d.event = 'start'
                                 OR d.attempts - d.round_base >= p_max_attempts THEN now() END
        FROM expired e WHERE d.id = e.id
        RETURNING d.task_id, d.event, d.status
    ), requeued AS (
        UPDATE taskrunner.task t
        SET status = 'pending', status_reason = 'start lease expired'
        FROM moved m
        WHERE m.event = 'start' AND t.id = m.task_id AND t.status = 'running'
          AND t.started_at IS NULL
    )
    SELECT count(*), count(*) FILTER (WHERE status = 'failed') INTO v_expired, v_gave_up
    FROM moved;
    IF v_expired > v_gave_up THEN
        PERFORM pg_notify('taskrunner_delivery', '');
    END IF;

    RETURN jsonb_build_object('timed_out', v_timed_out, 'expired_leases', v_expired,
                              'gave_up', v_gave_up);
END $$;


--
-- Name: FUNCTION tick(p_max_attempts integer); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.tick(p_max_attempts integer) IS 'Periodic housekeeping, one caller at a time: time out running tasks and recover
deliveries whose worker vanished. An expired lease is an attempt: a start''s task goes
back to pending (unless the start was acknowledged), another delivery is requeued, or
failed once it used p_max_attempts attempts in its round (workers pass
WEBHOOK_MAX_ATTEMPTS). Returns counts, or NULL if another tick is running.';


--
-- Name: transition_allowed(taskrunner.task_status, taskrunner.task_status); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.transition_allowed(p_from taskrunner.task_status, p_to taskrunner.task_status) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
    SELECT CASE p_from
        WHEN 'waiting' THEN p_to IN ('pending', 'paused', 'canceled', 'failure')
        WHEN 'pending' THEN p_to IN ('running', 'paused', 'canceled', 'failure')
        WHEN 'running' THEN p_to IN ('success', 'failure', 'canceled', 'pending')
        WHEN 'paused'  THEN p_to IN ('waiting', 'pending', 'canceled', 'failure')
        ELSE false
    END
$$;


--
-- Name: FUNCTION transition_allowed(p_from taskrunner.task_status, p_to taskrunner.task_status); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.transition_allowed(p_from taskrunner.task_status, p_to taskrunner.task_status) IS 'The legal transitions (table in docs/sql.md); the transition guard raises TR409 for the
others.';


--
-- Name: update_task(uuid, taskrunner.task_status, bigint, bigint, jsonb, text, boolean, bigint, integer); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.update_task(p_id uuid, p_status taskrunner.task_status DEFAULT NULL::taskrunner.task_status, p_new_success bigint DEFAULT NULL::bigint, p_new_failures bigint DEFAULT NULL::bigint, p_metadata jsonb DEFAULT NULL::jsonb, p_failure_reason text DEFAULT NULL::text, p_retryable boolean DEFAULT NULL::boolean, p_expected_count bigint DEFAULT NULL::bigint, p_priority integer DEFAULT NULL::integer) RETURNS taskrunner.task
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
        -- merged, as ArcRun does: the keys given replace theirs, the others stay
        metadata = metadata || coalesce(p_metadata, '{}'),
        expected_count = coalesce(p_expected_count, expected_count),
        priority = coalesce(p_priority, priority),
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


--
-- Name: FUNCTION update_task(p_id uuid, p_status taskrunner.task_status, p_new_success bigint, p_new_failures bigint, p_metadata jsonb, p_failure_reason text, p_retryable boolean, p_expected_count bigint, p_priority integer); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.update_task(p_id uuid, p_status taskrunner.task_status, p_new_success bigint, p_new_failures bigint, p_metadata jsonb, p_failure_reason text, p_retryable boolean, p_expected_count bigint, p_priority integer) IS 'PATCH /task/{id}: counters, metadata (merged into the task''s: the keys given replace
theirs), priority, expected_count (>= 0) and the outcome of a running task. A report
acknowledges the start (started_at), so tick() does not restart the task. A failure with
runs left is retried (see tg_task__retry) unless p_retryable is false. Progress on a task
with an expected_count wakes the workers (capacity rules may admit more).';


--
-- Name: why_not_running(uuid); Type: FUNCTION; Schema: taskrunner; Owner: -
--

CREATE FUNCTION taskrunner.why_not_running(p_id uuid) RETURNS jsonb
    LANGUAGE sql STABLE
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


--
-- Name: FUNCTION why_not_running(p_id uuid); Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON FUNCTION taskrunner.why_not_running(p_id uuid) IS 'Why a waiting/pending task is not running: its unfinished parents, or its start is scheduled later (not_before: a delayed start or a retry''s backoff), or the rules at their limit (blocked_tasks: count and max), or ready; NULL once it ran.';


--
-- Name: schema_migrations; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.schema_migrations (
    version character varying NOT NULL
);


--
-- Name: _claim_groups; Type: VIEW; Schema: taskrunner; Owner: -
--

CREATE VIEW taskrunner._claim_groups AS
 WITH RECURSIVE keys(k) AS (
        ( SELECT task.admission_key
           FROM taskrunner.task
          WHERE ((task.status = 'pending'::taskrunner.task_status) AND (task.not_before IS NULL))
          ORDER BY task.admission_key
         LIMIT 1)
        UNION ALL
         SELECT ( SELECT t.admission_key
                   FROM taskrunner.task t
                  WHERE ((t.status = 'pending'::taskrunner.task_status) AND (t.not_before IS NULL) AND (t.admission_key > keys_1.k))
                  ORDER BY t.admission_key
                 LIMIT 1) AS admission_key
           FROM keys keys_1
          WHERE (keys_1.k IS NOT NULL)
        )
 SELECT h.admission_key,
    h.kind,
    h.rules,
    h.metadata,
    h.priority,
    h.seq,
    h.expected_count
   FROM (keys
     CROSS JOIN LATERAL ( SELECT t.admission_key,
            t.kind,
            t.rules,
            t.metadata,
            t.priority,
            t.seq,
            t.expected_count
           FROM taskrunner.task t
          WHERE ((t.status = 'pending'::taskrunner.task_status) AND (t.not_before IS NULL) AND (t.admission_key = keys.k))
          ORDER BY t.priority DESC, t.seq
         LIMIT 1) h)
  WHERE (keys.k IS NOT NULL)
  ORDER BY h.priority DESC, h.seq;


--
-- Name: VIEW _claim_groups; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON VIEW taskrunner._claim_groups IS 'The head task of each admission group that has pending tasks, in claim order (priority,
then age): the groups claim_tasks walks. Found with a skip scan over
task_pending_claim_idx (one probe per group), so pending tasks blocked behind a
saturated rule cost one check per group, not one per task; tests/test_claim_plan.py
pins that plan.';


--
-- Name: action; Type: TABLE; Schema: taskrunner; Owner: -
--

CREATE TABLE taskrunner.action (
    id bigint NOT NULL,
    task_id uuid NOT NULL,
    event taskrunner.action_event NOT NULL,
    url text NOT NULL,
    verb text NOT NULL,
    body jsonb,
    headers jsonb DEFAULT '{}'::jsonb NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT action_headers_is_object CHECK ((jsonb_typeof(headers) = 'object'::text)),
    CONSTRAINT action_verb_known CHECK ((verb = ANY (ARRAY['GET'::text, 'POST'::text, 'PUT'::text, 'PATCH'::text, 'DELETE'::text])))
);


--
-- Name: TABLE action; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON TABLE taskrunner.action IS 'The webhooks of a task, per event. Cancel actions are added when a start webhook''s 2xx
response body is an action or a list of actions.';


--
-- Name: action_id_seq; Type: SEQUENCE; Schema: taskrunner; Owner: -
--

ALTER TABLE taskrunner.action ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME taskrunner.action_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);


--
-- Name: batch; Type: TABLE; Schema: taskrunner; Owner: -
--

CREATE TABLE taskrunner.batch (
    batch_id uuid NOT NULL,
    first_seq bigint NOT NULL,
    requester text,
    first_created_at timestamp with time zone NOT NULL,
    latest_updated_at timestamp with time zone NOT NULL,
    kinds text[] NOT NULL,
    total bigint DEFAULT 0 NOT NULL,
    waiting bigint DEFAULT 0 NOT NULL,
    pending bigint DEFAULT 0 NOT NULL,
    claimed bigint DEFAULT 0 NOT NULL,
    running bigint DEFAULT 0 NOT NULL,
    success bigint DEFAULT 0 NOT NULL,
    failure bigint DEFAULT 0 NOT NULL,
    paused bigint DEFAULT 0 NOT NULL,
    canceled bigint DEFAULT 0 NOT NULL,
    sum_success numeric DEFAULT 0 NOT NULL,
    sum_failures numeric DEFAULT 0 NOT NULL,
    traceparent text DEFAULT NULLIF(current_setting('taskrunner.traceparent'::text, true), ''::text),
    tracestate text DEFAULT NULLIF(current_setting('taskrunner.tracestate'::text, true), ''::text),
    CONSTRAINT batch_traceparent_check CHECK ((traceparent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'::text)),
    CONSTRAINT batch_tracestate_check CHECK ((length(tracestate) <= 512))
);


--
-- Name: TABLE batch; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON TABLE taskrunner.batch IS 'One row per batch: creation facts and counts as of the last fold_batch_deltas(); read batch_summary for exact figures.';


--
-- Name: COLUMN batch.traceparent; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON COLUMN taskrunner.batch.traceparent IS 'W3C traceparent of the request that created the batch (version 00 form), or NULL; the
worker sends a child of it on every webhook of the batch''s tasks. Defaults to the
setting taskrunner.traceparent (SET LOCAL it before create_batch).';


--
-- Name: COLUMN batch.tracestate; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON COLUMN taskrunner.batch.tracestate IS 'W3C tracestate sent with traceparent, passed on as it came (setting taskrunner.tracestate).';


--
-- Name: batch_delta; Type: TABLE; Schema: taskrunner; Owner: -
--

CREATE TABLE taskrunner.batch_delta (
    id bigint NOT NULL,
    batch_id uuid NOT NULL,
    latest_updated_at timestamp with time zone,
    total bigint DEFAULT 0 NOT NULL,
    waiting bigint DEFAULT 0 NOT NULL,
    pending bigint DEFAULT 0 NOT NULL,
    claimed bigint DEFAULT 0 NOT NULL,
    running bigint DEFAULT 0 NOT NULL,
    success bigint DEFAULT 0 NOT NULL,
    failure bigint DEFAULT 0 NOT NULL,
    paused bigint DEFAULT 0 NOT NULL,
    canceled bigint DEFAULT 0 NOT NULL,
    sum_success numeric DEFAULT 0 NOT NULL,
    sum_failures numeric DEFAULT 0 NOT NULL
);


--
-- Name: TABLE batch_delta; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON TABLE taskrunner.batch_delta IS 'Append-only changes of batch counts, one row per statement and batch; folded into batch by fold_batch_deltas().';


--
-- Name: batch_delta_id_seq; Type: SEQUENCE; Schema: taskrunner; Owner: -
--

ALTER TABLE taskrunner.batch_delta ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME taskrunner.batch_delta_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);


--
-- Name: dependency; Type: TABLE; Schema: taskrunner; Owner: -
--

CREATE TABLE taskrunner.dependency (
    parent_id uuid NOT NULL,
    child_id uuid NOT NULL,
    requires_success boolean NOT NULL,
    CONSTRAINT dependency_not_self CHECK ((parent_id <> child_id))
);


--
-- Name: TABLE dependency; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON TABLE taskrunner.dependency IS 'Edges of the task graph: the child waits for the parent to end; with requires_success
the child fails when the parent fails or is canceled.';


--
-- Name: batch_links; Type: VIEW; Schema: taskrunner; Owner: -
--

CREATE VIEW taskrunner.batch_links AS
 SELECT c.batch_id,
    d.parent_id,
    d.child_id,
    d.requires_success,
    c.seq AS child_seq
   FROM (taskrunner.dependency d
     JOIN taskrunner.task c ON ((c.id = d.child_id)));


--
-- Name: VIEW batch_links; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON VIEW taskrunner.batch_links IS 'GET /dag/{id}: the links into each batch''s tasks, by the child''s batch; a parent may belong to an earlier batch.';


--
-- Name: batch_progress; Type: VIEW; Schema: taskrunner; Owner: -
--

CREATE VIEW taskrunner.batch_progress AS
 SELECT task.batch_id,
    min(task.requester) AS requester,
    min(task.created_at) AS created_at,
    count(*) AS total,
    count(*) FILTER (WHERE (task.status = 'waiting'::taskrunner.task_status)) AS waiting,
    count(*) FILTER (WHERE (task.status = 'pending'::taskrunner.task_status)) AS pending,
    count(*) FILTER (WHERE (task.status = 'running'::taskrunner.task_status)) AS running,
    count(*) FILTER (WHERE (task.status = 'paused'::taskrunner.task_status)) AS paused,
    count(*) FILTER (WHERE (task.status = 'success'::taskrunner.task_status)) AS success,
    count(*) FILTER (WHERE (task.status = 'failure'::taskrunner.task_status)) AS failure,
    count(*) FILTER (WHERE (task.status = 'canceled'::taskrunner.task_status)) AS canceled,
    max(task.ended_at) FILTER (WHERE taskrunner.is_terminal(task.status)) AS last_ended_at
   FROM taskrunner.task
  GROUP BY task.batch_id;


--
-- Name: VIEW batch_progress; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON VIEW taskrunner.batch_progress IS 'Per batch: requester, created_at, total and a count per status.';


--
-- Name: batch_summary; Type: VIEW; Schema: taskrunner; Owner: -
--

CREATE VIEW taskrunner.batch_summary AS
 SELECT b.batch_id,
    b.requester,
    b.first_seq,
    b.first_created_at,
    GREATEST(b.latest_updated_at, d.latest_updated_at) AS latest_updated_at,
    b.kinds,
    (b.total + d.total) AS total_tasks,
    (b.waiting + d.waiting) AS waiting,
    (b.pending + d.pending) AS pending,
    (b.claimed + d.claimed) AS claimed,
    (b.running + d.running) AS running,
    (b.success + d.success) AS success,
    (b.failure + d.failure) AS failure,
    (b.paused + d.paused) AS paused,
    (b.canceled + d.canceled) AS canceled,
    ((b.sum_success + d.sum_success))::bigint AS total_success,
    ((b.sum_failures + d.sum_failures))::bigint AS total_failures
   FROM (taskrunner.batch b
     CROSS JOIN LATERAL ( SELECT max(x.latest_updated_at) AS latest_updated_at,
            (COALESCE(sum(x.total), (0)::numeric))::bigint AS total,
            (COALESCE(sum(x.waiting), (0)::numeric))::bigint AS waiting,
            (COALESCE(sum(x.pending), (0)::numeric))::bigint AS pending,
            (COALESCE(sum(x.claimed), (0)::numeric))::bigint AS claimed,
            (COALESCE(sum(x.running), (0)::numeric))::bigint AS running,
            (COALESCE(sum(x.success), (0)::numeric))::bigint AS success,
            (COALESCE(sum(x.failure), (0)::numeric))::bigint AS failure,
            (COALESCE(sum(x.paused), (0)::numeric))::bigint AS paused,
            (COALESCE(sum(x.canceled), (0)::numeric))::bigint AS canceled,
            COALESCE(sum(x.sum_success), (0)::numeric) AS sum_success,
            COALESCE(sum(x.sum_failures), (0)::numeric) AS sum_failures
           FROM taskrunner.batch_delta x
          WHERE (x.batch_id = b.batch_id)) d)
  WHERE ((b.total + d.total) > 0);


--
-- Name: VIEW batch_summary; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON VIEW taskrunner.batch_summary IS 'Every batch with exact counts per status (claimed = running, start not yet acknowledged), counter sums, kinds, first creation and latest update; GET /batches and GET /batch/{id} read it.';


--
-- Name: blocked_tasks; Type: VIEW; Schema: taskrunner; Owner: -
--

CREATE VIEW taskrunner.blocked_tasks AS
 SELECT t.id,
    t.name,
    t.kind,
    t.priority,
    t.created_at,
    r.rule,
    taskrunner._rule_count(r.rule, t.metadata) AS current_count,
    ((r.rule ->> 'max'::text))::integer AS max_concurency
   FROM (taskrunner.task t
     CROSS JOIN LATERAL jsonb_array_elements(t.rules) r(rule))
  WHERE ((t.status = 'pending'::taskrunner.task_status) AND (taskrunner._rule_count(r.rule, t.metadata) >= ((r.rule ->> 'max'::text))::integer));


--
-- Name: VIEW blocked_tasks; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON VIEW taskrunner.blocked_tasks IS 'Pending tasks that a rule currently holds back, with the rule, its count and limit.';


--
-- Name: dead_end_recheck; Type: TABLE; Schema: taskrunner; Owner: -
--

CREATE TABLE taskrunner.dead_end_recheck (
    id bigint NOT NULL,
    task_id uuid NOT NULL
);


--
-- Name: TABLE dead_end_recheck; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON TABLE taskrunner.dead_end_recheck IS 'Dead-end candidates that a walk skipped because another transaction held them; the
workers'' housekeeping rechecks them (recheck_dead_ends).';


--
-- Name: dead_end_recheck_id_seq; Type: SEQUENCE; Schema: taskrunner; Owner: -
--

ALTER TABLE taskrunner.dead_end_recheck ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME taskrunner.dead_end_recheck_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);


--
-- Name: delivery_attempt; Type: TABLE; Schema: taskrunner; Owner: -
--

CREATE TABLE taskrunner.delivery_attempt (
    delivery_id uuid NOT NULL,
    attempt integer NOT NULL,
    worker text,
    started_at timestamp with time zone DEFAULT now() NOT NULL,
    finished_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    status_code integer,
    error text
);


--
-- Name: TABLE delivery_attempt; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON TABLE taskrunner.delivery_attempt IS 'One row per webhook attempt of a delivery, with its outcome.';


--
-- Name: delivery_problems; Type: VIEW; Schema: taskrunner; Owner: -
--

CREATE VIEW taskrunner.delivery_problems AS
 SELECT d.id,
    d.task_id,
    d.event,
    d.status,
    d.attempts,
    d.next_attempt_at,
    d.last_status_code,
    d.last_error,
    a.url,
    a.verb
   FROM (taskrunner.delivery d
     JOIN taskrunner.action a ON ((a.id = d.action_id)))
  WHERE ((d.status = 'failed'::taskrunner.delivery_status) OR ((d.status = ANY (ARRAY['queued'::taskrunner.delivery_status, 'in_flight'::taskrunner.delivery_status])) AND (d.attempts > 0) AND (d.last_error IS NOT NULL)));


--
-- Name: VIEW delivery_problems; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON VIEW taskrunner.delivery_problems IS 'Deliveries that are retrying or gave up, with their last error.';


--
-- Name: rate_start; Type: TABLE; Schema: taskrunner; Owner: -
--

CREATE TABLE taskrunner.rate_start (
    key uuid NOT NULL,
    at timestamp with time zone NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    task_id uuid NOT NULL
);


--
-- Name: TABLE rate_start; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON TABLE taskrunner.rate_start IS 'One row per start of a task under each of its RateLimit rules (key: _rate_key), written
by claim_tasks under the rule''s lock; at is the claim''s transaction time (the task''s
claimed_at). Rows past expires_at (at + per_seconds) no longer count; prune_rate_starts()
deletes them.';


--
-- Name: running_tasks; Type: VIEW; Schema: taskrunner; Owner: -
--

CREATE VIEW taskrunner.running_tasks AS
 SELECT task.id,
    task.name,
    task.kind,
    task.claimed_by,
    task.claimed_at,
    task.started_at,
    task.last_updated,
    (task.last_updated + make_interval(secs => (task.timeout)::double precision)) AS timeout_at,
    task.success,
    task.failures,
    task.batch_id
   FROM taskrunner.task
  WHERE (task.status = 'running'::taskrunner.task_status);


--
-- Name: VIEW running_tasks; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON VIEW taskrunner.running_tasks IS 'Running tasks with worker, claim/start times and timeout deadline.';


--
-- Name: settings; Type: TABLE; Schema: taskrunner; Owner: -
--

CREATE TABLE taskrunner.settings (
    id boolean DEFAULT true NOT NULL,
    dead_end_cancel boolean DEFAULT false NOT NULL,
    CONSTRAINT settings_one_row CHECK (id)
);


--
-- Name: TABLE settings; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON TABLE taskrunner.settings IS 'Settings read by the SQL state machine: one row (UPDATE it; taskrunner migrate writes the
environment''s DEAD_END_CANCEL into it when that is set).';


--
-- Name: COLUMN settings.dead_end_cancel; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON COLUMN taskrunner.settings.dead_end_cancel IS 'On: a task whose children have all ended is canceled, walking upward (see _cancel_dead_ends).';


--
-- Name: task_history; Type: TABLE; Schema: taskrunner; Owner: -
--

CREATE TABLE taskrunner.task_history (
    id bigint NOT NULL,
    task_id uuid NOT NULL,
    from_status taskrunner.task_status,
    to_status taskrunner.task_status NOT NULL,
    at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    reason text,
    actor text DEFAULT taskrunner.session_actor()
);


--
-- Name: TABLE task_history; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON TABLE taskrunner.task_history IS 'Append-only transition history, written by the statement that makes the transition.';


--
-- Name: COLUMN task_history.actor; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON COLUMN taskrunner.task_history.actor IS 'Who made the transition (taskrunner.session_actor() of the session that made it); NULL for rows written before this column existed.';


--
-- Name: task_history_id_seq; Type: SEQUENCE; Schema: taskrunner; Owner: -
--

ALTER TABLE taskrunner.task_history ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME taskrunner.task_history_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);


--
-- Name: task_seq_seq; Type: SEQUENCE; Schema: taskrunner; Owner: -
--

ALTER TABLE taskrunner.task ALTER COLUMN seq ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME taskrunner.task_seq_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);


--
-- Name: schema_migrations schema_migrations_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.schema_migrations
    ADD CONSTRAINT schema_migrations_pkey PRIMARY KEY (version);


--
-- Name: action action_pkey; Type: CONSTRAINT; Schema: taskrunner; Owner: -
--

ALTER TABLE ONLY taskrunner.action
    ADD CONSTRAINT action_pkey PRIMARY KEY (id);


--
-- Name: batch_delta batch_delta_pkey; Type: CONSTRAINT; Schema: taskrunner; Owner: -
--

ALTER TABLE ONLY taskrunner.batch_delta
    ADD CONSTRAINT batch_delta_pkey PRIMARY KEY (id);


--
-- Name: batch batch_pkey; Type: CONSTRAINT; Schema: taskrunner; Owner: -
--

ALTER TABLE ONLY taskrunner.batch
    ADD CONSTRAINT batch_pkey PRIMARY KEY (batch_id);


--
-- Name: dead_end_recheck dead_end_recheck_pkey; Type: CONSTRAINT; Schema: taskrunner; Owner: -
--

ALTER TABLE ONLY taskrunner.dead_end_recheck
    ADD CONSTRAINT dead_end_recheck_pkey PRIMARY KEY (id);


--
-- Name: delivery_attempt delivery_attempt_pkey; Type: CONSTRAINT; Schema: taskrunner; Owner: -
--

ALTER TABLE ONLY taskrunner.delivery_attempt
    ADD CONSTRAINT delivery_attempt_pkey PRIMARY KEY (delivery_id, attempt);


--
-- Name: delivery delivery_pkey; Type: CONSTRAINT; Schema: taskrunner; Owner: -
--

ALTER TABLE ONLY taskrunner.delivery
    ADD CONSTRAINT delivery_pkey PRIMARY KEY (id);


--
-- Name: dependency dependency_pkey; Type: CONSTRAINT; Schema: taskrunner; Owner: -
--

ALTER TABLE ONLY taskrunner.dependency
    ADD CONSTRAINT dependency_pkey PRIMARY KEY (parent_id, child_id);


--
-- Name: settings settings_pkey; Type: CONSTRAINT; Schema: taskrunner; Owner: -
--

ALTER TABLE ONLY taskrunner.settings
    ADD CONSTRAINT settings_pkey PRIMARY KEY (id);


--
-- Name: task_history task_history_pkey; Type: CONSTRAINT; Schema: taskrunner; Owner: -
--

ALTER TABLE ONLY taskrunner.task_history
    ADD CONSTRAINT task_history_pkey PRIMARY KEY (id);


--
-- Name: task task_pkey; Type: CONSTRAINT; Schema: taskrunner; Owner: -
--

ALTER TABLE ONLY taskrunner.task
    ADD CONSTRAINT task_pkey PRIMARY KEY (id);


--
-- Name: action_task_idx; Type: INDEX; Schema: taskrunner; Owner: -
--

CREATE INDEX action_task_idx ON taskrunner.action USING btree (task_id, event);


--
-- Name: batch_delta_batch_idx; Type: INDEX; Schema: taskrunner; Owner: -
--

CREATE INDEX batch_delta_batch_idx ON taskrunner.batch_delta USING btree (batch_id);


--
-- Name: batch_first_created_idx; Type: INDEX; Schema: taskrunner; Owner: -
--

CREATE INDEX batch_first_created_idx ON taskrunner.batch USING btree (first_created_at DESC);


--
-- Name: batch_first_seq_idx; Type: INDEX; Schema: taskrunner; Owner: -
--

CREATE INDEX batch_first_seq_idx ON taskrunner.batch USING btree (first_seq DESC);


--
-- Name: delivery_action_idx; Type: INDEX; Schema: taskrunner; Owner: -
--

CREATE INDEX delivery_action_idx ON taskrunner.delivery USING btree (action_id);


--
-- Name: delivery_in_flight_idx; Type: INDEX; Schema: taskrunner; Owner: -
--

CREATE INDEX delivery_in_flight_idx ON taskrunner.delivery USING btree (lease_until) WHERE (status = 'in_flight'::taskrunner.delivery_status);


--
-- Name: delivery_queued_idx; Type: INDEX; Schema: taskrunner; Owner: -
--

CREATE INDEX delivery_queued_idx ON taskrunner.delivery USING btree (next_attempt_at) WHERE (status = 'queued'::taskrunner.delivery_status);


--
-- Name: delivery_task_idx; Type: INDEX; Schema: taskrunner; Owner: -
--

CREATE INDEX delivery_task_idx ON taskrunner.delivery USING btree (task_id);


--
-- Name: dependency_child_idx; Type: INDEX; Schema: taskrunner; Owner: -
--

CREATE INDEX dependency_child_idx ON taskrunner.dependency USING btree (child_id);


--
-- Name: rate_start_expires_idx; Type: INDEX; Schema: taskrunner; Owner: -
--

CREATE INDEX rate_start_expires_idx ON taskrunner.rate_start USING btree (expires_at);


--
-- Name: rate_start_key_at_idx; Type: INDEX; Schema: taskrunner; Owner: -
--

CREATE INDEX rate_start_key_at_idx ON taskrunner.rate_start USING btree (key, at);


--
-- Name: task_batch_idx; Type: INDEX; Schema: taskrunner; Owner: -
--

CREATE INDEX task_batch_idx ON taskrunner.task USING btree (batch_id);


--
-- Name: task_history_at_idx; Type: INDEX; Schema: taskrunner; Owner: -
--

CREATE INDEX task_history_at_idx ON taskrunner.task_history USING brin (at);


--
-- Name: task_history_task_idx; Type: INDEX; Schema: taskrunner; Owner: -
--

CREATE INDEX task_history_task_idx ON taskrunner.task_history USING btree (task_id, at);


--
-- Name: task_kind_status_idx; Type: INDEX; Schema: taskrunner; Owner: -
--

CREATE INDEX task_kind_status_idx ON taskrunner.task USING btree (kind, status);


--
-- Name: INDEX task_kind_status_idx; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON INDEX taskrunner.task_kind_status_idx IS 'Rule counts (kind + status) and the kind filter of GET /task.';


--
-- Name: task_metadata_idx; Type: INDEX; Schema: taskrunner; Owner: -
--

CREATE INDEX task_metadata_idx ON taskrunner.task USING gin (metadata jsonb_path_ops);


--
-- Name: task_not_before_idx; Type: INDEX; Schema: taskrunner; Owner: -
--

CREATE INDEX task_not_before_idx ON taskrunner.task USING btree (not_before) WHERE ((status = 'pending'::taskrunner.task_status) AND (not_before IS NOT NULL));


--
-- Name: INDEX task_not_before_idx; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON INDEX taskrunner.task_not_before_idx IS 'Scheduled pending tasks by due time: claims promote the due ones, next_wakeup() reads the
earliest.';


--
-- Name: task_pending_claim_idx; Type: INDEX; Schema: taskrunner; Owner: -
--

CREATE INDEX task_pending_claim_idx ON taskrunner.task USING btree (admission_key, priority DESC, seq) WHERE ((status = 'pending'::taskrunner.task_status) AND (not_before IS NULL));


--
-- Name: INDEX task_pending_claim_idx; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON INDEX taskrunner.task_pending_claim_idx IS 'Claims: one head per admission group (skip scan over admission_key). Scheduled tasks
(not_before set) stay out until due.';


--
-- Name: task_running_idx; Type: INDEX; Schema: taskrunner; Owner: -
--

CREATE INDEX task_running_idx ON taskrunner.task USING btree (last_updated) WHERE (status = 'running'::taskrunner.task_status);


--
-- Name: INDEX task_running_idx; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON INDEX taskrunner.task_running_idx IS 'Timeouts scan running tasks only.';


--
-- Name: task_running_metadata_idx; Type: INDEX; Schema: taskrunner; Owner: -
--

CREATE INDEX task_running_metadata_idx ON taskrunner.task USING gin (metadata jsonb_path_ops) WHERE (status = 'running'::taskrunner.task_status);


--
-- Name: INDEX task_running_metadata_idx; Type: COMMENT; Schema: taskrunner; Owner: -
--

COMMENT ON INDEX taskrunner.task_running_metadata_idx IS 'Rule counts of running tasks (see _rule_count): only running tasks are in it.';


--
-- Name: task_seq_idx; Type: INDEX; Schema: taskrunner; Owner: -
--

CREATE UNIQUE INDEX task_seq_idx ON taskrunner.task USING btree (seq);


--
-- Name: task_status_seq_idx; Type: INDEX; Schema: taskrunner; Owner: -
--

CREATE INDEX task_status_seq_idx ON taskrunner.task USING btree (status, seq);


--
-- Name: task _090_retry; Type: TRIGGER; Schema: taskrunner; Owner: -
--

CREATE TRIGGER _090_retry BEFORE UPDATE OF status ON taskrunner.task FOR EACH ROW WHEN (((old.status = 'running'::taskrunner.task_status) AND (new.status = ANY (ARRAY['failure'::taskrunner.task_status, 'pending'::taskrunner.task_status])))) EXECUTE FUNCTION taskrunner.tg_task__retry();


--
-- Name: task _100_guard_insert; Type: TRIGGER; Schema: taskrunner; Owner: -
--

CREATE TRIGGER _100_guard_insert BEFORE INSERT ON taskrunner.task FOR EACH ROW EXECUTE FUNCTION taskrunner.tg_task__guard_insert();


--
-- Name: task _100_guard_transition; Type: TRIGGER; Schema: taskrunner; Owner: -
--

CREATE TRIGGER _100_guard_transition BEFORE UPDATE ON taskrunner.task FOR EACH ROW EXECUTE FUNCTION taskrunner.tg_task__guard_transition();


--
-- Name: task _110_freeze_rule_fields; Type: TRIGGER; Schema: taskrunner; Owner: -
--

CREATE TRIGGER _110_freeze_rule_fields BEFORE UPDATE OF metadata ON taskrunner.task FOR EACH ROW WHEN (((old.metadata IS DISTINCT FROM new.metadata) AND (old.rules <> '[]'::jsonb))) EXECUTE FUNCTION taskrunner.tg_task__freeze_rule_fields();


--
-- Name: task _120_admission_key; Type: TRIGGER; Schema: taskrunner; Owner: -
--

CREATE TRIGGER _120_admission_key BEFORE UPDATE OF kind, priority, rules, metadata, expected_count ON taskrunner.task FOR EACH ROW WHEN (((old.kind IS DISTINCT FROM new.kind) OR (old.priority IS DISTINCT FROM new.priority) OR (old.rules IS DISTINCT FROM new.rules) OR (old.metadata IS DISTINCT FROM new.metadata) OR (old.expected_count IS DISTINCT FROM new.expected_count))) EXECUTE FUNCTION taskrunner.tg_task__admission_key();


--
-- Name: task _500_batch_counts_delete; Type: TRIGGER; Schema: taskrunner; Owner: -
--

CREATE TRIGGER _500_batch_counts_delete AFTER DELETE ON taskrunner.task REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION taskrunner.tg_task__batch_delete();


--
-- Name: task _500_batch_counts_insert; Type: TRIGGER; Schema: taskrunner; Owner: -
--

CREATE TRIGGER _500_batch_counts_insert AFTER INSERT ON taskrunner.task REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION taskrunner.tg_task__batch_insert();


--
-- Name: task _500_batch_counts_truncate; Type: TRIGGER; Schema: taskrunner; Owner: -
--

CREATE TRIGGER _500_batch_counts_truncate AFTER TRUNCATE ON taskrunner.task FOR EACH STATEMENT EXECUTE FUNCTION taskrunner.tg_task__batch_truncate();


--
-- Name: task _500_batch_counts_update; Type: TRIGGER; Schema: taskrunner; Owner: -
--

CREATE TRIGGER _500_batch_counts_update AFTER UPDATE ON taskrunner.task REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION taskrunner.tg_task__batch_update();


--
-- Name: task _900_after_insert; Type: TRIGGER; Schema: taskrunner; Owner: -
--

CREATE TRIGGER _900_after_insert AFTER INSERT ON taskrunner.task REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION taskrunner.tg_task__after_insert();


--
-- Name: task _900_after_update; Type: TRIGGER; Schema: taskrunner; Owner: -
--

CREATE TRIGGER _900_after_update AFTER UPDATE ON taskrunner.task REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION taskrunner.tg_task__after_update();


--
-- Name: action action_task_id_fkey; Type: FK CONSTRAINT; Schema: taskrunner; Owner: -
--

ALTER TABLE ONLY taskrunner.action
    ADD CONSTRAINT action_task_id_fkey FOREIGN KEY (task_id) REFERENCES taskrunner.task(id) ON DELETE CASCADE;


--
-- Name: delivery delivery_action_id_fkey; Type: FK CONSTRAINT; Schema: taskrunner; Owner: -
--

ALTER TABLE ONLY taskrunner.delivery
    ADD CONSTRAINT delivery_action_id_fkey FOREIGN KEY (action_id) REFERENCES taskrunner.action(id) ON DELETE CASCADE;


--
-- Name: delivery_attempt delivery_attempt_delivery_id_fkey; Type: FK CONSTRAINT; Schema: taskrunner; Owner: -
--

ALTER TABLE ONLY taskrunner.delivery_attempt
    ADD CONSTRAINT delivery_attempt_delivery_id_fkey FOREIGN KEY (delivery_id) REFERENCES taskrunner.delivery(id) ON DELETE CASCADE;


--
-- Name: delivery delivery_task_id_fkey; Type: FK CONSTRAINT; Schema: taskrunner; Owner: -
--

ALTER TABLE ONLY taskrunner.delivery
    ADD CONSTRAINT delivery_task_id_fkey FOREIGN KEY (task_id) REFERENCES taskrunner.task(id) ON DELETE CASCADE;


--
-- Name: dependency dependency_child_id_fkey; Type: FK CONSTRAINT; Schema: taskrunner; Owner: -
--

ALTER TABLE ONLY taskrunner.dependency
    ADD CONSTRAINT dependency_child_id_fkey FOREIGN KEY (child_id) REFERENCES taskrunner.task(id) ON DELETE CASCADE;


--
-- Name: dependency dependency_parent_id_fkey; Type: FK CONSTRAINT; Schema: taskrunner; Owner: -
--

ALTER TABLE ONLY taskrunner.dependency
    ADD CONSTRAINT dependency_parent_id_fkey FOREIGN KEY (parent_id) REFERENCES taskrunner.task(id) ON DELETE CASCADE;


--
-- PostgreSQL database dump complete
--

\unrestrict dbmate


--
-- Dbmate schema migrations
--

INSERT INTO public.schema_migrations (version) VALUES
    ('20261127000100'),
    ('20261127000200'),
    ('20261127000300'),
    ('20261127000400'),
    ('20261127000500'),
    ('20261127000600'),
    ('20261127000700'),
    ('20261127000800'),
    ('20261127110000'),
    ('20261127120000'),
    ('20261127120100'),
    ('20261127120200'),
    ('20261127120300'),
    ('20261127120400'),
    ('20261127120500'),
    ('20261127130000'),
    ('20261127140000'),
    ('20261127140100'),
    ('20261128100000'),
    ('20261128110000'),
    ('20261128120000'),
    ('20261128130000'),
    ('20261128130100'),
    ('20261128140000'),
    ('20261128150000');
