-- migrate:up

-- A concurrency rule cannot be exceeded through a metadata change (issue 13, item 5).
--
-- A task's admission key and every rule count compare the metadata values its rules read
-- (the rules' "fields"). If those values could change while the task may still run, a
-- running task would leave (or enter) a count without a claim checking it, and a task
-- sent back to pending would keep the admission key of its old values. So the values of
-- those fields are frozen from creation until the task ends; any other metadata may
-- change. Checked on the row, after whatever merge or replace produced NEW.metadata, so
-- PATCH (update_task) and a DBA's UPDATE are held to it alike.
CREATE FUNCTION taskrunner.tg_task__freeze_rule_fields() RETURNS trigger
LANGUAGE plpgsql AS $$
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

CREATE TRIGGER _110_freeze_rule_fields
BEFORE UPDATE OF metadata ON taskrunner.task
FOR EACH ROW
WHEN (OLD.metadata IS DISTINCT FROM NEW.metadata AND OLD.rules <> '[]'::jsonb)
EXECUTE FUNCTION taskrunner.tg_task__freeze_rule_fields();

COMMENT ON FUNCTION taskrunner.tg_task__freeze_rule_fields() IS
'Trigger: the metadata values that a task''s rules read (their fields) cannot change until
the task ends (TR409 naming metadata.<field>); admission keys and rule counts compare them.';

-- migrate:down

DROP TRIGGER _110_freeze_rule_fields ON taskrunner.task;
DROP FUNCTION taskrunner.tg_task__freeze_rule_fields();
