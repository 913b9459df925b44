-- migrate:up

-- tick(p_max_attempts): an expired lease counts as an attempt, and a delivery that used
-- up WEBHOOK_MAX_ATTEMPTS (the worker passes it; 5, the setting's default, for a DBA's
-- tick()) gives up instead of being requeued forever (issue 13, item 3).

DROP FUNCTION taskrunner.tick();

CREATE FUNCTION taskrunner.tick(p_max_attempts int DEFAULT 5) RETURNS jsonb
LANGUAGE plpgsql AS $$
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

COMMENT ON FUNCTION taskrunner.tick(int) IS
'Periodic housekeeping, one caller at a time: time out running tasks and recover
deliveries whose worker vanished. An expired lease is an attempt: a start''s task goes
back to pending (unless the start was acknowledged), another delivery is requeued, or
failed once it used p_max_attempts attempts in its round (workers pass
WEBHOOK_MAX_ATTEMPTS). Returns counts, or NULL if another tick is running.';

-- migrate:down

DROP FUNCTION taskrunner.tick(int);

CREATE FUNCTION taskrunner.tick() RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_timed_out int;
    v_expired int;
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
        UPDATE taskrunner.delivery d
        SET status = CASE WHEN d.event = 'start' THEN 'expired'::taskrunner.delivery_status
                          ELSE 'queued' END,
            lease_until = NULL, next_attempt_at = now(),
            last_error = 'lease expired (worker gone?)',
            finished_at = CASE WHEN d.event = 'start' THEN now() END
        FROM expired e WHERE d.id = e.id
        RETURNING d.task_id, d.event
    ), requeued AS (
        UPDATE taskrunner.task t
        SET status = 'pending', status_reason = 'start lease expired'
        FROM moved m
        WHERE m.event = 'start' AND t.id = m.task_id AND t.status = 'running'
          AND t.started_at IS NULL
    )
    SELECT count(*) INTO v_expired FROM moved;
    IF v_expired > 0 THEN
        PERFORM pg_notify('taskrunner_delivery', '');
    END IF;

    RETURN jsonb_build_object('timed_out', v_timed_out, 'expired_leases', v_expired);
END $$;

COMMENT ON FUNCTION taskrunner.tick() IS
'Periodic housekeeping, one caller at a time: time out running tasks and recover
deliveries whose worker vanished. Returns counts, or NULL if another tick is running.';
