-- Kurier sagas: a saga is a sequence of steps, each a command sent through
-- kurier.outbox to a participant, which answers on the saga type's reply topic.
-- The whole state machine lives in these SQL functions so that the daemon only
--   (a) calls kurier.saga_apply_reply[_message](...) for each reply, in the
--       transaction that marks the reply's inbox row processed, and
--   (b) calls kurier.saga_fire_timers() periodically (and when
--       kurier.saga_next_timer_due() says a timer is due),
-- and a service in any language starts sagas with kurier.start_saga(...) inside
-- its own transaction. See NOTES.md for the state machine table.
--
-- Concurrency: the saga row lock (SELECT ... FOR UPDATE) is the one lock that
-- serialises everything about a saga: its state, its timer row and the messages
-- it sends. Every function takes it before touching the saga's timer, so there
-- is one lock order (saga, then timer) and no deadlock between a reply and a
-- timer. The functions expect READ COMMITTED (PostgreSQL's default): they rely
-- on each statement seeing what committed before it took its lock.
--
-- Internal helpers are named kurier._saga_*; they are not part of the contract.
-- Errors: SQLSTATE 22023 for an invalid definition or argument, KU404 for an
-- unknown saga or saga type, KU409 for an action that conflicts with the
-- current state (a redefinition under active sagas, an operator action that
-- does not apply).

-- A name usable as (part of) a Kafka topic name: Kafka's own rule.
CREATE FUNCTION kurier._saga_legal_name(topic text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT topic ~ '^[a-zA-Z0-9._-]{1,249}$' AND topic NOT IN ('.', '..') $$;

CREATE TABLE kurier.saga_types (
    saga_type   text        PRIMARY KEY,
    -- Normalised by kurier.define_saga: every key present, defaults filled in,
    -- so that comparing two definitions is comparing two jsonb values.
    steps       jsonb       NOT NULL,
    reply_topic text        NOT NULL,
    defined_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT saga_types_name CHECK (kurier._saga_legal_name(saga_type)),
    CONSTRAINT saga_types_reply_topic CHECK (kurier._saga_legal_name(reply_topic)),
    CONSTRAINT saga_types_steps CHECK (jsonb_typeof(steps) = 'array' AND jsonb_array_length(steps) > 0)
);

CREATE TABLE kurier.sagas (
    id                  uuid        PRIMARY KEY,
    saga_type           text        NOT NULL REFERENCES kurier.saga_types (saga_type),
    status              text        NOT NULL,
    -- Running: the step whose command is outstanding. Compensating or parked:
    -- the step whose compensation is outstanding. Ended: where it ended.
    current_step        integer     NOT NULL,
    -- Attempt number of the outstanding command or compensation (1-based).
    attempt             integer     NOT NULL,
    -- First attempt of the current retry budget: 1, except after
    -- kurier.saga_resume, which grants a fresh budget of max_attempts without
    -- reusing attempt numbers (a reused number would reuse a message ID, which
    -- the participant's inbox would drop as a duplicate).
    first_attempt       integer     NOT NULL DEFAULT 1,
    data                jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- Steps whose command succeeded, in order.
    completed_steps     integer[]   NOT NULL DEFAULT '{}',
    -- Set when compensation starts: the steps to compensate, in the order
    -- they are compensated (reverse order of completion).
    compensation_plan   integer[],
    -- Steps whose compensation succeeded, in order.
    compensated_steps   integer[]   NOT NULL DEFAULT '{}',
    -- Bumped by trigger sagas_version on every update, whoever makes it.
    version             bigint      NOT NULL DEFAULT 1,
    -- When the saga's only timer (kurier.saga_timers) is due: the outstanding
    -- command or compensation times out, or a compensation retry is sent.
    deadline            timestamptz,
    -- Why the saga is off the happy path: why it compensates, or while parked
    -- why it is parked, or why an operator marked it failed.
    reason              text,
    -- Why compensation started (kept when a park replaces `reason`).
    compensation_reason text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    ended_at            timestamptz,
    CONSTRAINT sagas_status CHECK (status IN ('running', 'compensating', 'completed', 'compensated', 'failed', 'parked')),
    CONSTRAINT sagas_data_object CHECK (jsonb_typeof(data) = 'object'),
    -- These two catch a bug in the state machine instead of storing it.
    CONSTRAINT sagas_ended CHECK ((status IN ('completed', 'compensated', 'failed')) = (ended_at IS NOT NULL)),
    CONSTRAINT sagas_deadline CHECK ((status IN ('running', 'compensating')) = (deadline IS NOT NULL))
);
-- define_saga counts the active sagas of a type; operators list parked ones.
CREATE INDEX sagas_active ON kurier.sagas (saga_type, status)
    WHERE status IN ('running', 'compensating', 'parked');
-- A saga row is updated a few times per step: leave room for HOT updates.
ALTER TABLE kurier.sagas SET (fillfactor = 80);

CREATE FUNCTION kurier._saga_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- A trigger rather than each UPDATE doing it, so that a hand-made fix by an
    -- operator is visible to whoever compares versions, too.
    NEW.version := OLD.version + 1;
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;
CREATE TRIGGER sagas_version BEFORE UPDATE ON kurier.sagas
    FOR EACH ROW EXECUTE FUNCTION kurier._saga_touch();

-- The history of every saga: commands, replies (also ignored ones, also for
-- unknown sagas, hence no foreign key), timeouts, retries, compensations and
-- operator actions. Never deleted by Kurier. `id` orders events; it is not a
-- cursor for tailing (identity values are assigned at insert, not at commit).
CREATE TABLE kurier.saga_events (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    saga_id    uuid,
    at         timestamptz NOT NULL DEFAULT now(),
    kind       text        NOT NULL,
    step       integer,
    step_name  text,
    attempt    integer,
    -- command_sent / compensation_sent: the outbox message ID; reply and
    -- reply_ignored: the reply's message ID.
    message_id text,
    detail     jsonb       NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX saga_events_saga ON kurier.saga_events (saga_id, id);
-- The step latency metric reads the last minutes' replies; the table itself
-- only grows.
CREATE INDEX saga_events_replies ON kurier.saga_events (at) WHERE kind = 'reply';

-- Durable timers: at most one per saga (the outstanding command, compensation,
-- or compensation retry). Written only by holders of the saga's row lock and
-- replaced or deleted on every transition, and still re-checked when fired.
CREATE TABLE kurier.saga_timers (
    saga_id uuid        PRIMARY KEY REFERENCES kurier.sagas (id) ON DELETE CASCADE,
    step    integer     NOT NULL,
    kind    text        NOT NULL CHECK (kind IN ('command', 'compensation', 'retry')),
    -- command/compensation: the attempt that times out; retry: the attempt to send.
    attempt integer     NOT NULL,
    due_at  timestamptz NOT NULL
);
-- (due_at, saga_id) is the scan order of saga_fire_timers: with the tie-breaker
-- in the index the scan streams and stops at its LIMIT instead of sorting the
-- whole backlog of due timers (74 ms against 1.4 ms for a backlog of 100k).
CREATE INDEX saga_timers_due ON kurier.saga_timers (due_at, saga_id);
-- Every step inserts or updates a timer and deletes it at the end: queue-like churn.
ALTER TABLE kurier.saga_timers SET (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.0,
    autovacuum_analyze_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0
);

-- The message ID of a command or compensation: the same for every resend of
-- one attempt (participants deduplicate with their inbox), new for each attempt.
-- phase is 'command' or 'compensation'.
CREATE FUNCTION kurier.saga_message_id(saga_id uuid, step integer, phase text, attempt integer) RETURNS uuid
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT md5(saga_id::text || ':' || step || ':' || phase || ':' || attempt)::uuid $$;

-- ---------------------------------------------------------------------------
-- Definitions
-- ---------------------------------------------------------------------------

-- Reads optional integer key p_key of a step; refuses anything but an integer
-- in [p_min, 2147483647] (the range of the Rust side's i32).
CREATE FUNCTION kurier._saga_int_key(p_step jsonb, p_key text, p_default integer, p_min integer, p_what text)
    RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v jsonb := p_step -> p_key;
BEGIN
    IF v IS NULL OR jsonb_typeof(v) = 'null' THEN
        RETURN p_default;
    END IF;
    -- Nested IFs: an OR would not guarantee that the cast runs on numbers only.
    IF jsonb_typeof(v) = 'number' THEN
        IF v::numeric = trunc(v::numeric) AND v::numeric BETWEEN p_min AND 2147483647 THEN
            RETURN v::numeric::integer;
        END IF;
    END IF;
    RAISE EXCEPTION '%: % must be an integer from % to 2147483647, got %', p_what, p_key, p_min, v::text
        USING ERRCODE = '22023',
              HINT = format('write e.g. "%s": %s (milliseconds for *_ms keys), or leave it out for the default %s',
                            p_key, p_default, p_default);
END;
$$;

-- Validates a steps array and returns it normalised (every key present).
CREATE FUNCTION kurier._saga_normalize_steps(p_steps jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    c_keys constant text[] := ARRAY['name', 'command_topic', 'compensation_topic', 'timeout_ms', 'max_attempts',
                                    'retry_backoff_ms', 'retry_backoff_max_ms', 'compensate_unanswered'];
    c_hint_topic constant text := 'a Kafka topic name is 1-249 characters of [a-zA-Z0-9._-], and not "." or ".."';
    v_elem     jsonb;
    v_i        integer;
    v_what     text;
    v_name     text;
    v_names    text[] := '{}';
    v_unknown  text;
    v_command  text;
    v_comp     text;
    v_backoff  integer;
    v_max      integer;
    v_unanswered boolean;
    v_out      jsonb := '[]'::jsonb;
BEGIN
    IF p_steps IS NULL OR jsonb_typeof(p_steps) <> 'array' THEN
        RAISE EXCEPTION 'kurier.define_saga: steps must be a JSON array of step objects, got %',
                coalesce(jsonb_typeof(p_steps), 'NULL')
            USING ERRCODE = '22023',
                  HINT = 'pass e.g. ''[{"name": "reserve", "command_topic": "stock.commands", "compensation_topic": "stock.compensations"}]''';
    END IF;
    IF jsonb_array_length(p_steps) = 0 THEN
        RAISE EXCEPTION 'kurier.define_saga: steps is an empty array; a saga needs at least one step'
            USING ERRCODE = '22023',
                  HINT = 'pass e.g. ''[{"name": "reserve", "command_topic": "stock.commands"}]''';
    END IF;

    FOR v_elem, v_i IN SELECT e, o - 1 FROM jsonb_array_elements(p_steps) WITH ORDINALITY AS x(e, o) LOOP
        v_what := format('kurier.define_saga: steps[%s]', v_i);
        IF jsonb_typeof(v_elem) <> 'object' THEN
            RAISE EXCEPTION '%: a step must be a JSON object, got %', v_what, jsonb_typeof(v_elem)
                USING ERRCODE = '22023',
                      HINT = 'write each step as {"name": ..., "command_topic": ..., ...}';
        END IF;
        IF jsonb_typeof(v_elem -> 'name') = 'string' THEN
            v_what := format('%s (%s)', v_what, v_elem -> 'name');
        END IF;

        SELECT string_agg(to_jsonb(k)::text, ', ' ORDER BY k) INTO v_unknown
          FROM jsonb_object_keys(v_elem) AS k WHERE k <> ALL (c_keys);
        IF v_unknown IS NOT NULL THEN
            RAISE EXCEPTION '%: unknown key(s) %', v_what, v_unknown
                USING ERRCODE = '22023',
                      HINT = 'the keys of a step are ' || array_to_string(c_keys, ', ') || ' (names are case-sensitive)';
        END IF;

        IF jsonb_typeof(v_elem -> 'name') IS DISTINCT FROM 'string' OR btrim(v_elem ->> 'name') = '' THEN
            RAISE EXCEPTION '%: name must be a non-empty string, got %', v_what, coalesce((v_elem -> 'name')::text, 'nothing')
                USING ERRCODE = '22023',
                      HINT = 'give every step a name, unique within the saga: replies name the step they answer';
        END IF;
        v_name := v_elem ->> 'name';
        IF v_name = ANY (v_names) THEN
            RAISE EXCEPTION '%: name % is already used by steps[%]', v_what, to_jsonb(v_name), array_position(v_names, v_name) - 1
                USING ERRCODE = '22023',
                      HINT = 'step names must be unique within a saga: replies name the step they answer';
        END IF;
        v_names := v_names || v_name;

        IF jsonb_typeof(v_elem -> 'command_topic') IS DISTINCT FROM 'string' THEN
            RAISE EXCEPTION '%: command_topic must be a string (a Kafka topic name), got %',
                    v_what, coalesce((v_elem -> 'command_topic')::text, 'nothing')
                USING ERRCODE = '22023', HINT = 'name the topic the participant consumes commands from';
        END IF;
        v_command := v_elem ->> 'command_topic';
        IF NOT kurier._saga_legal_name(v_command) THEN
            RAISE EXCEPTION '%: command_topic % is not a legal Kafka topic name', v_what, to_jsonb(v_command)
                USING ERRCODE = '22023', HINT = c_hint_topic;
        END IF;

        v_comp := NULL;
        IF jsonb_typeof(v_elem -> 'compensation_topic') = 'string' THEN
            v_comp := v_elem ->> 'compensation_topic';
            IF NOT kurier._saga_legal_name(v_comp) THEN
                RAISE EXCEPTION '%: compensation_topic % is not a legal Kafka topic name', v_what, to_jsonb(v_comp)
                    USING ERRCODE = '22023', HINT = c_hint_topic;
            END IF;
        ELSIF coalesce(jsonb_typeof(v_elem -> 'compensation_topic'), 'null') <> 'null' THEN
            RAISE EXCEPTION '%: compensation_topic must be a string (a Kafka topic name) or null, got %',
                    v_what, v_elem -> 'compensation_topic'
                USING ERRCODE = '22023', HINT = 'leave compensation_topic out (or null) for a step that needs no undo';
        END IF;

        v_backoff := kurier._saga_int_key(v_elem, 'retry_backoff_ms', 1000, 1, v_what);
        v_max := kurier._saga_int_key(v_elem, 'retry_backoff_max_ms', greatest(60000, v_backoff), 1, v_what);
        IF v_max < v_backoff THEN
            RAISE EXCEPTION '%: retry_backoff_max_ms (%) is below retry_backoff_ms (%)', v_what, v_max, v_backoff
                USING ERRCODE = '22023', HINT = 'the cap of the backoff must be at least its base';
        END IF;

        IF coalesce(jsonb_typeof(v_elem -> 'compensate_unanswered'), 'null') NOT IN ('null', 'boolean') THEN
            RAISE EXCEPTION '%: compensate_unanswered must be true or false, got %', v_what, v_elem -> 'compensate_unanswered'
                USING ERRCODE = '22023', HINT = 'write "compensate_unanswered": true, or leave it out (false)';
        END IF;
        v_unanswered := coalesce((v_elem ->> 'compensate_unanswered')::boolean, false);

        v_out := v_out || jsonb_build_array(jsonb_build_object(
            'name', v_name,
            'command_topic', v_command,
            'compensation_topic', v_comp,
            'timeout_ms', kurier._saga_int_key(v_elem, 'timeout_ms', 30000, 1, v_what),
            'max_attempts', kurier._saga_int_key(v_elem, 'max_attempts', 3, 1, v_what),
            'retry_backoff_ms', v_backoff,
            'retry_backoff_max_ms', v_max,
            'compensate_unanswered', v_unanswered));
    END LOOP;
    RETURN v_out;
END;
$$;

-- Defines (or redefines) a saga type. The same definition again is a no-op.
-- A different one is refused (KU409) while sagas of the type are running,
-- compensating or parked: they were started against the stored steps.
CREATE FUNCTION kurier.define_saga(saga_type text, steps jsonb, reply_topic text DEFAULT NULL)
    RETURNS kurier.saga_types LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    v_steps   jsonb;
    v_reply   text;
    v_old     kurier.saga_types;
    v_new     kurier.saga_types;
    v_clash   text;
    v_counts  text;
    v_active  bigint;
    v_change  text;
BEGIN
    IF saga_type IS NULL OR NOT kurier._saga_legal_name(saga_type) THEN
        RAISE EXCEPTION 'kurier.define_saga: saga type % is not usable in a topic name', coalesce(to_jsonb(saga_type)::text, 'NULL')
            USING ERRCODE = '22023',
                  HINT = 'use 1-236 characters of [a-zA-Z0-9._-] (the reply topic defaults to saga.<saga_type>.replies), e.g. order or order_v2';
    END IF;
    IF reply_topic IS NULL THEN
        v_reply := 'saga.' || saga_type || '.replies';
        IF NOT kurier._saga_legal_name(v_reply) THEN
            RAISE EXCEPTION 'kurier.define_saga: saga type % is too long for the default reply topic saga.<saga_type>.replies (% characters, Kafka allows 249)',
                    to_jsonb(saga_type), length(v_reply)
                USING ERRCODE = '22023', HINT = 'use a saga type of at most 236 characters, or pass reply_topic';
        END IF;
    ELSE
        v_reply := reply_topic;
        IF NOT kurier._saga_legal_name(v_reply) THEN
            RAISE EXCEPTION 'kurier.define_saga: reply_topic % is not a legal Kafka topic name', to_jsonb(v_reply)
                USING ERRCODE = '22023',
                      HINT = 'a Kafka topic name is 1-249 characters of [a-zA-Z0-9._-], and not "." or ".."; or pass NULL for saga.<saga_type>.replies';
        END IF;
    END IF;
    v_steps := kurier._saga_normalize_steps(steps);

    -- The daemon consumes the reply topic: a command or compensation topic
    -- there would be read as (ignored) replies, and the participant would
    -- receive replies as commands.
    SELECT format('steps[%s] (%s) uses it as %s', o - 1, e -> 'name', k) INTO v_clash
      FROM jsonb_array_elements(v_steps) WITH ORDINALITY AS x(e, o),
           unnest(ARRAY['command_topic', 'compensation_topic']) AS k
     WHERE e ->> k = v_reply ORDER BY o, k LIMIT 1;
    IF v_clash IS NOT NULL THEN
        RAISE EXCEPTION 'kurier.define_saga: reply topic % is also a participant''s topic: %', to_jsonb(v_reply), v_clash
            USING ERRCODE = '22023', HINT = 'replies need a topic of their own; the default is saga.<saga_type>.replies';
    END IF;

    -- FOR UPDATE here and FOR SHARE in start_saga: a saga cannot start between
    -- the count of active sagas below and the replacement of the steps.
    SELECT * INTO v_old FROM kurier.saga_types t WHERE t.saga_type = saga_type FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO kurier.saga_types (saga_type, steps, reply_topic) VALUES (saga_type, v_steps, v_reply)
            ON CONFLICT ON CONSTRAINT saga_types_pkey DO NOTHING
            RETURNING * INTO v_new;
        IF FOUND THEN
            RETURN v_new;
        END IF;
        -- A concurrent define_saga created it first: compare with that one.
        SELECT * INTO v_old FROM kurier.saga_types t WHERE t.saga_type = saga_type FOR UPDATE;
    END IF;

    IF v_old.steps = v_steps AND v_old.reply_topic = v_reply THEN
        RETURN v_old;
    END IF;

    SELECT coalesce(sum(c.n), 0), string_agg(format('%s %s', c.n, c.st), ', ' ORDER BY c.st)
      INTO v_active, v_counts
      FROM (SELECT x.status AS st, count(*) AS n FROM kurier.sagas x
             WHERE x.saga_type = saga_type AND x.status IN ('running', 'compensating', 'parked')
             GROUP BY x.status) c;
    IF v_active > 0 THEN
        v_change := concat_ws(' and ',
            CASE WHEN v_old.steps <> v_steps THEN 'its steps' END,
            CASE WHEN v_old.reply_topic <> v_reply THEN format('its reply topic (%s -> %s)', v_old.reply_topic, v_reply) END);
        RAISE EXCEPTION 'kurier.define_saga: saga type % has % active saga(s) (%), so % cannot change', to_jsonb(saga_type), v_active, v_counts, v_change
            USING ERRCODE = 'KU409',
                  DETAIL = 'running, compensating and parked sagas go on with the definition they started with',
                  HINT = format('define the new version under a new saga type, e.g. %s, and start new sagas with it; or redefine once the active sagas have ended',
                                to_jsonb(saga_type || '_v2'));
    END IF;

    UPDATE kurier.saga_types t SET steps = v_steps, reply_topic = v_reply, updated_at = now()
     WHERE t.saga_type = saga_type
    RETURNING * INTO v_new;
    RETURN v_new;
END;
$$;

-- ---------------------------------------------------------------------------
-- Internal helpers of the state machine. They take the saga row (locked by the
-- caller) as a value and return it changed; the caller stores it once with
-- _saga_save, so each reply, timer or operator action is one version bump.
-- ---------------------------------------------------------------------------

CREATE FUNCTION kurier._saga_event(p_saga uuid, p_kind text, p_step integer, p_step_name text,
                                   p_attempt integer, p_message_id text, p_detail jsonb)
    RETURNS void LANGUAGE sql AS $$
    INSERT INTO kurier.saga_events (saga_id, kind, step, step_name, attempt, message_id, detail)
    VALUES (p_saga, p_kind, p_step, p_step_name, p_attempt, p_message_id, coalesce(p_detail, '{}'::jsonb))
$$;

CREATE FUNCTION kurier._saga_save(p_s kurier.sagas) RETURNS kurier.sagas LANGUAGE sql AS $$
    UPDATE kurier.sagas x
       SET status = p_s.status, current_step = p_s.current_step, attempt = p_s.attempt,
           first_attempt = p_s.first_attempt, data = p_s.data, completed_steps = p_s.completed_steps,
           compensation_plan = p_s.compensation_plan, compensated_steps = p_s.compensated_steps,
           deadline = p_s.deadline, reason = p_s.reason, compensation_reason = p_s.compensation_reason,
           ended_at = p_s.ended_at
     WHERE x.id = p_s.id
    RETURNING x.*
$$;

-- Sets the saga's one timer (and its deadline).
CREATE FUNCTION kurier._saga_arm(p_s kurier.sagas, p_kind text, p_attempt integer, p_due timestamptz)
    RETURNS kurier.sagas LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO kurier.saga_timers (saga_id, step, kind, attempt, due_at)
    VALUES (p_s.id, p_s.current_step, p_kind, p_attempt, p_due)
    ON CONFLICT ON CONSTRAINT saga_timers_pkey
        DO UPDATE SET step = EXCLUDED.step, kind = EXCLUDED.kind, attempt = EXCLUDED.attempt, due_at = EXCLUDED.due_at;
    p_s.deadline := p_due;
    RETURN p_s;
END;
$$;

CREATE FUNCTION kurier._saga_disarm(p_s kurier.sagas) RETURNS kurier.sagas LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM kurier.saga_timers t WHERE t.saga_id = p_s.id;
    p_s.deadline := NULL;
    RETURN p_s;
END;
$$;

CREATE FUNCTION kurier._saga_ms(p_ms numeric) RETURNS interval LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT make_interval(secs => p_ms / 1000.0) $$;

-- Sends the current step's command or compensation (attempt p_s.attempt) and
-- arms its timeout. p_phase: 'command' or 'compensation'; p_cause says why it
-- is sent (start, advance, timeout, compensate, retry, resume, operator_retry).
CREATE FUNCTION kurier._saga_send(p_s kurier.sagas, p_def kurier.saga_types, p_phase text, p_cause text)
    RETURNS kurier.sagas LANGUAGE plpgsql AS $$
DECLARE
    v_step    jsonb := p_def.steps -> p_s.current_step;
    v_topic   text;
    v_id      uuid := kurier.saga_message_id(p_s.id, p_s.current_step, p_phase, p_s.attempt);
    v_headers jsonb := jsonb_build_object('saga-id', p_s.id::text, 'saga-type', p_s.saga_type,
                                          'saga-step', v_step ->> 'name', 'saga-reply-to', p_def.reply_topic);
BEGIN
    IF p_phase = 'command' THEN
        v_topic := v_step ->> 'command_topic';
    ELSE
        v_topic := v_step ->> 'compensation_topic';
        v_headers := v_headers || '{"saga-compensation": "true"}'::jsonb;
    END IF;
    INSERT INTO kurier.outbox (message_id, topic, key, payload, headers)
    VALUES (v_id, v_topic, p_s.id::text, p_s.data, v_headers);
    PERFORM kurier._saga_event(p_s.id, CASE p_phase WHEN 'command' THEN 'command_sent' ELSE 'compensation_sent' END,
                               p_s.current_step, v_step ->> 'name', p_s.attempt, v_id::text,
                               jsonb_build_object('topic', v_topic, 'cause', p_cause));
    RETURN kurier._saga_arm(p_s, p_phase, p_s.attempt, now() + kurier._saga_ms((v_step ->> 'timeout_ms')::numeric));
END;
$$;

-- Sends the next compensation of the plan, or ends the saga compensated.
CREATE FUNCTION kurier._saga_compensate_next(p_s kurier.sagas, p_def kurier.saga_types)
    RETURNS kurier.sagas LANGUAGE plpgsql AS $$
DECLARE
    v_done integer := cardinality(p_s.compensated_steps);
BEGIN
    IF v_done >= cardinality(p_s.compensation_plan) THEN
        p_s := kurier._saga_disarm(p_s);
        p_s.status := 'compensated';
        p_s.ended_at := now();
        PERFORM kurier._saga_event(p_s.id, 'compensated', p_s.current_step, p_def.steps -> p_s.current_step ->> 'name',
                                   p_s.attempt, NULL,
                                   jsonb_strip_nulls(jsonb_build_object(
                                       'reason', p_s.compensation_reason, 'compensated_steps', to_jsonb(p_s.compensated_steps),
                                       'note', CASE WHEN v_done = 0 THEN 'nothing to compensate: no completed step has a compensation_topic' END)));
        RETURN p_s;
    END IF;
    p_s.current_step := p_s.compensation_plan[v_done + 1];
    p_s.attempt := 1;
    p_s.first_attempt := 1;
    RETURN kurier._saga_send(p_s, p_def, 'compensation', 'compensate');
END;
$$;

-- Leaves the happy path: plans the compensation of the completed steps that
-- have a compensation_topic, in reverse order, and starts it. p_unanswered is
-- the step whose command is outstanding when the saga gives up on it (timeouts
-- exhausted, operator abort): it is compensated too if its definition says
-- compensate_unanswered, because its command may have taken effect.
CREATE FUNCTION kurier._saga_begin_compensation(p_s kurier.sagas, p_def kurier.saga_types, p_reason text, p_unanswered integer)
    RETURNS kurier.sagas LANGUAGE plpgsql AS $$
DECLARE
    v_candidates integer[] := p_s.completed_steps;
    v_plan       integer[];
BEGIN
    IF p_unanswered IS NOT NULL AND (p_def.steps -> p_unanswered ->> 'compensate_unanswered')::boolean THEN
        v_candidates := v_candidates || p_unanswered;
    END IF;
    SELECT coalesce(array_agg(i ORDER BY i DESC), '{}') INTO v_plan
      FROM unnest(v_candidates) AS i
     WHERE p_def.steps -> i ->> 'compensation_topic' IS NOT NULL;
    p_s.status := 'compensating';
    p_s.compensation_plan := v_plan;
    p_s.compensated_steps := '{}';
    p_s.reason := p_reason;
    p_s.compensation_reason := p_reason;
    PERFORM kurier._saga_event(p_s.id, 'compensating', p_s.current_step, p_def.steps -> p_s.current_step ->> 'name',
                               p_s.attempt, NULL,
                               jsonb_build_object('reason', p_reason, 'plan', to_jsonb(v_plan),
                                                  'plan_names', (SELECT coalesce(jsonb_agg(p_def.steps -> i -> 'name' ORDER BY o), '[]')
                                                                   FROM unnest(v_plan) WITH ORDINALITY AS u(i, o))));
    RETURN kurier._saga_compensate_next(p_s, p_def);
END;
$$;

-- The outstanding compensation failed (failure reply or timeout): retry it
-- after a capped exponential backoff, or park the saga once the step's
-- max_attempts are spent. A saga is never dropped and never left waiting.
CREATE FUNCTION kurier._saga_compensation_failed(p_s kurier.sagas, p_def kurier.saga_types, p_why text)
    RETURNS kurier.sagas LANGUAGE plpgsql AS $$
DECLARE
    v_step  jsonb := p_def.steps -> p_s.current_step;
    v_used  integer := p_s.attempt - p_s.first_attempt + 1;
    v_delay numeric;
    v_due   timestamptz;
BEGIN
    IF v_used >= (v_step ->> 'max_attempts')::integer THEN
        p_s := kurier._saga_disarm(p_s);
        p_s.status := 'parked';
        p_s.reason := format('compensation of step %s (%s) failed %s time(s), last: %s; compensating because: %s',
                             p_s.current_step, v_step ->> 'name', v_used, p_why, p_s.compensation_reason);
        PERFORM kurier._saga_event(p_s.id, 'parked', p_s.current_step, v_step ->> 'name', p_s.attempt, NULL,
                                   jsonb_build_object('reason', p_s.reason));
        RETURN p_s;
    END IF;
    -- least() before the power overflows anything: 2^40 ms is 35 years.
    v_delay := least((v_step ->> 'retry_backoff_ms')::numeric * power(2::numeric, least(v_used - 1, 40)),
                     (v_step ->> 'retry_backoff_max_ms')::numeric);
    v_due := now() + kurier._saga_ms(v_delay);
    p_s := kurier._saga_arm(p_s, 'retry', p_s.attempt + 1, v_due);
    PERFORM kurier._saga_event(p_s.id, 'retry_scheduled', p_s.current_step, v_step ->> 'name', p_s.attempt + 1, NULL,
                               jsonb_build_object('after', p_why, 'failed_attempt', p_s.attempt,
                                                  'delay_ms', v_delay::bigint, 'due_at', v_due));
    RETURN p_s;
END;
$$;

CREATE FUNCTION kurier._saga_ignore(p_saga uuid, p_step integer, p_step_name text, p_message_id text,
                                    p_detail jsonb, p_reason text)
    RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    PERFORM kurier._saga_event(p_saga, 'reply_ignored', p_step, p_step_name, NULL, p_message_id,
                               coalesce(p_detail, '{}'::jsonb) || jsonb_build_object('reason', p_reason));
    RETURN 'ignored: ' || p_reason;
END;
$$;

-- ---------------------------------------------------------------------------
-- Starting
-- ---------------------------------------------------------------------------

-- Starts a saga inside the caller's transaction: the saga row, step 0's command
-- (an outbox row) and its timer commit together with the caller's decision or
-- not at all. Starting an existing saga ID again returns the existing row.
CREATE FUNCTION kurier.start_saga(saga_type text, saga_id uuid, data jsonb DEFAULT '{}'::jsonb)
    RETURNS kurier.sagas LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    v_def   kurier.saga_types;
    v_saga  kurier.sagas;
    v_known text;
BEGIN
    IF saga_id IS NULL THEN
        RAISE EXCEPTION 'kurier.start_saga: saga_id is NULL'
            USING ERRCODE = '22023', HINT = 'pass the saga''s UUID, e.g. gen_random_uuid() or an ID derived from the business key';
    END IF;
    IF data IS NOT NULL AND jsonb_typeof(data) <> 'object' THEN
        RAISE EXCEPTION 'kurier.start_saga: data must be a JSON object, got %', jsonb_typeof(data)
            USING ERRCODE = '22023', HINT = 'wrap the value in an object, e.g. {"order": ...}: replies are merged into it key by key';
    END IF;
    -- FOR SHARE from this read on (the foreign key's KEY SHARE would come only
    -- at the insert, after the read): define_saga cannot replace the steps
    -- between this read and the insert; it waits for this start to commit and
    -- then counts this saga as active, or this start waits and reads its steps.
    SELECT * INTO v_def FROM kurier.saga_types t WHERE t.saga_type = saga_type FOR SHARE;
    IF NOT FOUND THEN
        SELECT string_agg(t.saga_type, ', ' ORDER BY t.saga_type) INTO v_known
          FROM (SELECT t.saga_type FROM kurier.saga_types t ORDER BY t.saga_type LIMIT 20) t;
        RAISE EXCEPTION 'kurier.start_saga: unknown saga type %', coalesce(to_jsonb(saga_type)::text, 'NULL')
            USING ERRCODE = 'KU404',
                  HINT = 'define it first with kurier.define_saga(saga_type, steps); defined types: ' || coalesce(v_known, 'none');
    END IF;

    -- ON CONFLICT: a concurrent start of the same ID waits for the first one
    -- and then returns its row instead of failing on the primary key.
    INSERT INTO kurier.sagas (id, saga_type, status, current_step, attempt, data, deadline)
    VALUES (saga_id, saga_type, 'running', 0, 1, coalesce(data, '{}'::jsonb),
            now() + kurier._saga_ms((v_def.steps -> 0 ->> 'timeout_ms')::numeric))
    ON CONFLICT ON CONSTRAINT sagas_pkey DO NOTHING
    RETURNING * INTO v_saga;
    IF NOT FOUND THEN
        SELECT * INTO v_saga FROM kurier.sagas x WHERE x.id = saga_id;
        IF v_saga.saga_type <> saga_type THEN
            RAISE EXCEPTION 'kurier.start_saga: saga % already exists with type %, not %', saga_id, to_jsonb(v_saga.saga_type), to_jsonb(saga_type)
                USING ERRCODE = 'KU409', HINT = 'use a new saga ID for a saga of another type';
        END IF;
        RETURN v_saga;
    END IF;

    PERFORM kurier._saga_event(saga_id, 'started', 0, v_def.steps -> 0 ->> 'name', 1, NULL,
                               jsonb_build_object('saga_type', saga_type, 'data', v_saga.data));
    -- _saga_send arms the timer with the same deadline as inserted above (now() is fixed in a transaction).
    v_saga := kurier._saga_send(v_saga, v_def, 'command', 'start');
    RETURN v_saga;
END;
$$;

-- ---------------------------------------------------------------------------
-- Replies
-- ---------------------------------------------------------------------------

-- The state machine for one reply. p_extra is merged into the detail of the
-- event recorded (e.g. a note that the payload was not JSON).
CREATE FUNCTION kurier._saga_apply_reply(p_saga uuid, p_step_name text, p_outcome text, p_compensation boolean,
                                         p_message_id text, p_reply jsonb, p_extra jsonb)
    RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    v_s      kurier.sagas;
    v_def    kurier.saga_types;
    v_comp   boolean := coalesce(p_compensation, false);
    v_idx    integer;
    v_timer  kurier.saga_timers;
    v_prev   bigint;
    v_merged boolean := false;
    v_detail jsonb := jsonb_build_object('outcome', p_outcome, 'compensation', v_comp, 'value', p_reply)
                      || coalesce(p_extra, '{}'::jsonb);
BEGIN
    IF p_saga IS NULL THEN
        RETURN kurier._saga_ignore(NULL, NULL, p_step_name, p_message_id, v_detail, 'no saga id');
    END IF;
    -- The lock serialises daemons applying replies to one saga; every check
    -- below reads the state as the previous holder left it.
    SELECT * INTO v_s FROM kurier.sagas x WHERE x.id = p_saga FOR UPDATE;
    IF NOT FOUND THEN
        RETURN kurier._saga_ignore(p_saga, NULL, p_step_name, p_message_id, v_detail, 'unknown saga');
    END IF;
    SELECT * INTO v_def FROM kurier.saga_types t WHERE t.saga_type = v_s.saga_type;
    SELECT o - 1 INTO v_idx FROM jsonb_array_elements(v_def.steps) WITH ORDINALITY AS x(e, o) WHERE e ->> 'name' = p_step_name;

    -- The inbox deduplicates by message ID already; this also covers a caller
    -- without an inbox, and states where the state alone would accept it again.
    IF p_message_id IS NOT NULL THEN
        SELECT e.id INTO v_prev FROM kurier.saga_events e
         WHERE e.saga_id = p_saga AND e.kind = 'reply' AND e.message_id = p_message_id LIMIT 1;
        IF FOUND THEN
            RETURN kurier._saga_ignore(p_saga, v_idx, p_step_name, p_message_id, v_detail,
                                       format('duplicate: reply %s was already applied (event %s)', p_message_id, v_prev));
        END IF;
    END IF;
    IF p_outcome IS NULL OR p_outcome NOT IN ('success', 'failure') THEN
        RETURN kurier._saga_ignore(p_saga, v_idx, p_step_name, p_message_id, v_detail,
                                   format('unknown outcome %s (expected success or failure)', coalesce(to_jsonb(p_outcome)::text, 'NULL')));
    END IF;
    IF v_s.ended_at IS NOT NULL THEN
        RETURN kurier._saga_ignore(p_saga, v_idx, p_step_name, p_message_id, v_detail, 'saga already ' || v_s.status);
    END IF;
    IF v_s.status = 'parked' THEN
        RETURN kurier._saga_ignore(p_saga, v_idx, p_step_name, p_message_id, v_detail,
                                   'saga is parked; an operator continues it with saga_resume');
    END IF;
    IF v_idx IS NULL THEN
        RETURN kurier._saga_ignore(p_saga, NULL, p_step_name, p_message_id, v_detail,
                                   format('saga type %s has no step named %s', v_s.saga_type, coalesce(to_jsonb(p_step_name)::text, 'NULL')));
    END IF;

    IF v_s.status = 'running' THEN
        IF v_comp THEN
            RETURN kurier._saga_ignore(p_saga, v_idx, p_step_name, p_message_id, v_detail,
                                       'compensation reply while the saga is running');
        END IF;
        IF v_idx <> v_s.current_step THEN
            RETURN kurier._saga_ignore(p_saga, v_idx, p_step_name, p_message_id, v_detail,
                                       format('reply for step %s (%s) but the saga is running step %s (%s)',
                                              v_idx, p_step_name, v_s.current_step, v_def.steps -> v_s.current_step ->> 'name'));
        END IF;
        IF p_outcome = 'success' THEN
            IF jsonb_typeof(p_reply) = 'object' THEN
                v_s.data := v_s.data || p_reply;
                v_merged := true;
            END IF;
            PERFORM kurier._saga_event(p_saga, 'reply', v_idx, p_step_name, v_s.attempt, p_message_id,
                                       v_detail || jsonb_build_object('merged', v_merged));
            v_s.completed_steps := v_s.completed_steps || v_idx;
            IF v_idx = jsonb_array_length(v_def.steps) - 1 THEN
                v_s := kurier._saga_disarm(v_s);
                v_s.status := 'completed';
                v_s.ended_at := now();
                PERFORM kurier._saga_event(p_saga, 'completed', v_idx, p_step_name, v_s.attempt, NULL, '{}');
                PERFORM kurier._saga_save(v_s);
                RETURN 'completed';
            END IF;
            v_s.current_step := v_idx + 1;
            v_s.attempt := 1;
            v_s.first_attempt := 1;
            v_s := kurier._saga_send(v_s, v_def, 'command', 'advance');
            PERFORM kurier._saga_save(v_s);
            RETURN 'advanced';
        END IF;
        -- A business failure: the step did nothing, so it is not compensated.
        PERFORM kurier._saga_event(p_saga, 'reply', v_idx, p_step_name, v_s.attempt, p_message_id, v_detail);
        v_s := kurier._saga_begin_compensation(v_s, v_def, format('step %s (%s) failed', v_idx, p_step_name), NULL);
        PERFORM kurier._saga_save(v_s);
        RETURN v_s.status;
    END IF;

    -- Compensating.
    IF NOT v_comp THEN
        RETURN kurier._saga_ignore(p_saga, v_idx, p_step_name, p_message_id, v_detail,
            'command reply while the saga is compensating'
            || CASE WHEN p_outcome = 'success' AND v_idx <> ALL (v_s.completed_steps) AND v_idx <> ALL (v_s.compensation_plan)
                    THEN format('; step %s (%s) answered success after the saga gave up on it, and its effect is not compensated', v_idx, p_step_name)
                    ELSE '' END);
    END IF;
    IF v_idx <> v_s.current_step THEN
        RETURN kurier._saga_ignore(p_saga, v_idx, p_step_name, p_message_id, v_detail,
                                   format('compensation reply for step %s (%s) but the saga is compensating step %s (%s)',
                                          v_idx, p_step_name, v_s.current_step, v_def.steps -> v_s.current_step ->> 'name'));
    END IF;
    SELECT * INTO v_timer FROM kurier.saga_timers t WHERE t.saga_id = p_saga;
    IF p_outcome = 'success' THEN
        -- Also while a retry is pending: an undo that succeeded late is done.
        PERFORM kurier._saga_event(p_saga, 'reply', v_idx, p_step_name, v_s.attempt, p_message_id, v_detail);
        v_s.compensated_steps := v_s.compensated_steps || v_idx;
        v_s := kurier._saga_compensate_next(v_s, v_def);
        PERFORM kurier._saga_save(v_s);
        RETURN v_s.status;
    END IF;
    IF v_timer.kind = 'retry' THEN
        -- The attempt already counted as failed (by a timeout or an earlier
        -- failure reply): counting it twice would spend the budget faster.
        RETURN kurier._saga_ignore(p_saga, v_idx, p_step_name, p_message_id, v_detail,
                                   format('compensation of step %s (%s) attempt %s already failed; attempt %s is due at %s',
                                          v_idx, p_step_name, v_s.attempt, v_timer.attempt, v_timer.due_at));
    END IF;
    PERFORM kurier._saga_event(p_saga, 'reply', v_idx, p_step_name, v_s.attempt, p_message_id, v_detail);
    v_s := kurier._saga_compensation_failed(v_s, v_def, 'failure reply');
    PERFORM kurier._saga_save(v_s);
    RETURN CASE v_s.status WHEN 'parked' THEN 'parked' ELSE 'retry_scheduled' END;
END;
$$;

-- Applies one reply. Never raises for a bad reply (the daemon must not get
-- stuck on one): a reply that does not apply is recorded as reply_ignored and
-- the result is 'ignored: <why>'. Otherwise the result is advanced, completed,
-- compensating, compensated, retry_scheduled or parked. A JSON object `reply`
-- of a successful command step is merged into the saga's data (data || reply);
-- any other value is recorded only.
CREATE FUNCTION kurier.saga_apply_reply(saga_id uuid, step_name text, outcome text, compensation boolean DEFAULT false,
                                        reply_message_id text DEFAULT NULL, reply jsonb DEFAULT NULL)
    RETURNS text LANGUAGE sql
    AS $$ SELECT kurier._saga_apply_reply($1, $2, $3, $4, $5, $6, NULL) $$;

-- Applies a reply as the inbox stored it: headers saga-id, saga-step,
-- saga-outcome, saga-compensation ("true"/"false", absent = false) and the
-- record value. A missing or invalid saga-id is recorded with saga_id NULL.
-- A value that is not UTF-8 JSON is treated as no value (noted in the event):
-- refusing the reply would let the step time out and run again.
CREATE FUNCTION kurier.saga_apply_reply_message(headers jsonb, payload bytea, message_id text)
    RETURNS text LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    v_h     jsonb := coalesce(headers, '{}'::jsonb);
    v_id    uuid;
    v_comp  boolean := false;
    v_reply jsonb;
    v_extra jsonb := '{}'::jsonb;
    v_step  text;
    v_out   text;
    v_bad   boolean := false;
BEGIN
    IF jsonb_typeof(v_h) <> 'object' THEN
        RETURN kurier._saga_ignore(NULL, NULL, NULL, message_id, jsonb_build_object('headers', v_h), 'headers are not a JSON object');
    END IF;
    -- Header values are JSON strings when they were UTF-8 ({"hex": ...} otherwise).
    v_step := CASE WHEN jsonb_typeof(v_h -> 'saga-step') = 'string' THEN v_h ->> 'saga-step' END;
    v_out  := CASE WHEN jsonb_typeof(v_h -> 'saga-outcome') = 'string' THEN v_h ->> 'saga-outcome' END;
    IF jsonb_typeof(v_h -> 'saga-id') IS DISTINCT FROM 'string' THEN
        RETURN kurier._saga_ignore(NULL, NULL, v_step, message_id, jsonb_build_object('headers', v_h),
                                   CASE WHEN v_h ? 'saga-id' THEN 'saga-id header is not a UTF-8 string' ELSE 'no saga-id header' END);
    END IF;
    -- Parsing only, no writes in the block: it gets no subtransaction ID.
    BEGIN
        v_id := (v_h ->> 'saga-id')::uuid;
    EXCEPTION WHEN invalid_text_representation THEN
        v_bad := true;
    END;
    IF v_bad THEN
        RETURN kurier._saga_ignore(NULL, NULL, v_step, message_id, jsonb_build_object('headers', v_h),
                                   format('saga-id header %s is not a UUID', v_h -> 'saga-id'));
    END IF;
    IF v_h ? 'saga-compensation' THEN
        IF jsonb_typeof(v_h -> 'saga-compensation') = 'string' AND lower(v_h ->> 'saga-compensation') IN ('true', 'false') THEN
            v_comp := lower(v_h ->> 'saga-compensation') = 'true';
        ELSE
            RETURN kurier._saga_ignore(v_id, NULL, v_step, message_id, jsonb_build_object('headers', v_h),
                                       format('saga-compensation header %s is neither "true" nor "false"', v_h -> 'saga-compensation'));
        END IF;
    END IF;
    IF payload IS NOT NULL AND length(payload) > 0 THEN
        BEGIN
            v_reply := convert_from(payload, 'UTF8')::jsonb;
        EXCEPTION WHEN data_exception THEN
            v_extra := jsonb_build_object('note', format('value of %s bytes is not UTF-8 JSON; treated as no value', length(payload)));
        END;
    END IF;
    RETURN kurier._saga_apply_reply(v_id, v_step, v_out, v_comp, message_id, v_reply, v_extra);
END;
$$;

-- ---------------------------------------------------------------------------
-- Timers
-- ---------------------------------------------------------------------------

-- Fires one due timer of a saga locked by the caller. Returns false for a
-- stale timer (it does not match the saga's current step, phase and attempt),
-- which is deleted and recorded as timer_ignored.
CREATE FUNCTION kurier._saga_fire(p_s kurier.sagas, p_t kurier.saga_timers) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    v_def  kurier.saga_types;
    v_step jsonb;
    v_name text;
BEGIN
    SELECT * INTO v_def FROM kurier.saga_types t WHERE t.saga_type = p_s.saga_type;
    v_step := v_def.steps -> p_s.current_step;
    v_name := v_step ->> 'name';
    IF p_s.status = 'running' AND p_t.kind = 'command' AND p_t.step = p_s.current_step AND p_t.attempt = p_s.attempt THEN
        PERFORM kurier._saga_event(p_s.id, 'timeout', p_s.current_step, v_name, p_s.attempt, NULL,
                                   jsonb_build_object('phase', 'command', 'due_at', p_t.due_at));
        IF p_s.attempt - p_s.first_attempt + 1 < (v_step ->> 'max_attempts')::integer THEN
            p_s.attempt := p_s.attempt + 1;
            p_s := kurier._saga_send(p_s, v_def, 'command', 'timeout');
        ELSE
            p_s := kurier._saga_begin_compensation(p_s, v_def,
                       format('step %s (%s) timed out %s time(s)', p_s.current_step, v_name, p_s.attempt - p_s.first_attempt + 1),
                       p_s.current_step);
        END IF;
    ELSIF p_s.status = 'compensating' AND p_t.kind = 'compensation' AND p_t.step = p_s.current_step AND p_t.attempt = p_s.attempt THEN
        PERFORM kurier._saga_event(p_s.id, 'timeout', p_s.current_step, v_name, p_s.attempt, NULL,
                                   jsonb_build_object('phase', 'compensation', 'due_at', p_t.due_at));
        p_s := kurier._saga_compensation_failed(p_s, v_def, 'timed out');
    ELSIF p_s.status = 'compensating' AND p_t.kind = 'retry' AND p_t.step = p_s.current_step AND p_t.attempt = p_s.attempt + 1 THEN
        p_s.attempt := p_t.attempt;
        p_s := kurier._saga_send(p_s, v_def, 'compensation', 'retry');
    ELSE
        DELETE FROM kurier.saga_timers t WHERE t.saga_id = p_s.id;
        PERFORM kurier._saga_event(p_s.id, 'timer_ignored', p_t.step, v_def.steps -> p_t.step ->> 'name', p_t.attempt, NULL,
                                   jsonb_build_object('timer', to_jsonb(p_t), 'status', p_s.status,
                                                      'current_step', p_s.current_step, 'attempt', p_s.attempt));
        RETURN false;
    END IF;
    PERFORM kurier._saga_save(p_s);
    RETURN true;
END;
$$;

-- Fires up to max_count due timers, oldest first, and returns how many fired.
-- Two daemons may call it at once: each locks the sagas it fires with SKIP
-- LOCKED, so no timer fires twice and neither waits for the other. Call it
-- again at once while it returns max_count (or saga_next_timer_due() is past).
CREATE FUNCTION kurier.saga_fire_timers(max_count integer DEFAULT 100) RETURNS integer LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    v_ids   uuid[];
    v_id    uuid;
    v_s     kurier.sagas;
    v_t     kurier.saga_timers;
    v_fired integer := 0;
BEGIN
    IF max_count IS NULL OR max_count < 1 THEN
        RAISE EXCEPTION 'kurier.saga_fire_timers: max_count must be at least 1, got %', coalesce(max_count::text, 'NULL')
            USING ERRCODE = '22023', HINT = 'pass the batch size, e.g. 100';
    END IF;
    -- Lock the sagas, not the timers: the saga row is the lock every writer
    -- of a timer holds, so this keeps the one lock order (saga, then timer).
    SELECT array_agg(q.id ORDER BY q.due_at, q.id) INTO v_ids
      FROM (SELECT x.id, t.due_at
              FROM kurier.saga_timers t JOIN kurier.sagas x ON x.id = t.saga_id
             WHERE t.due_at <= now()
             ORDER BY t.due_at, t.saga_id
             LIMIT max_count
               FOR UPDATE OF x SKIP LOCKED) q;
    FOREACH v_id IN ARRAY coalesce(v_ids, '{}') LOOP
        SELECT * INTO v_s FROM kurier.sagas x WHERE x.id = v_id;
        -- Re-read under the lock: another daemon may have fired and replaced
        -- it between the scan's snapshot and our lock.
        SELECT * INTO v_t FROM kurier.saga_timers t WHERE t.saga_id = v_id;
        CONTINUE WHEN NOT FOUND OR v_t.due_at > now();
        IF kurier._saga_fire(v_s, v_t) THEN
            v_fired := v_fired + 1;
        END IF;
    END LOOP;
    RETURN v_fired;
END;
$$;

-- The earliest due time of any timer (NULL: none), for the daemon's sleep.
CREATE FUNCTION kurier.saga_next_timer_due() RETURNS timestamptz LANGUAGE sql STABLE
    AS $$ SELECT min(t.due_at) FROM kurier.saga_timers t $$;

-- ---------------------------------------------------------------------------
-- Operator actions. Each is recorded in saga_events with the role that ran it,
-- and refuses (KU404 / KU409) when it does not apply.
-- ---------------------------------------------------------------------------

CREATE FUNCTION kurier._saga_lock_for(p_saga uuid, p_fn text) RETURNS kurier.sagas LANGUAGE plpgsql AS $$
DECLARE
    v_s kurier.sagas;
BEGIN
    SELECT * INTO v_s FROM kurier.sagas x WHERE x.id = p_saga FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'kurier.%: no saga with id %', p_fn, coalesce(p_saga::text, 'NULL')
            USING ERRCODE = 'KU404', HINT = 'check the ID in kurier.sagas (SELECT id, saga_type, status FROM kurier.sagas ...)';
    END IF;
    RETURN v_s;
END;
$$;

CREATE FUNCTION kurier._saga_refuse(p_fn text, p_s kurier.sagas, p_applies text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'kurier.%: saga % is %; % applies only to a % saga', p_fn, p_s.id, p_s.status, p_fn, p_applies
        USING ERRCODE = 'KU409',
              HINT = CASE
                  WHEN p_s.status = 'parked' THEN 'a parked saga continues with kurier.saga_resume(id), or is closed with kurier.saga_fail(id, reason)'
                  WHEN p_s.ended_at IS NOT NULL THEN 'the saga has ended; nothing is left to do'
                  WHEN p_s.status = 'compensating' THEN 'the saga is already compensating; kurier.saga_retry(id) re-sends its current compensation'
                  ELSE 'the saga is running; kurier.saga_retry(id) re-sends its current command, kurier.saga_compensate(id, reason) aborts it'
              END;
END;
$$;

-- Re-sends the current command or compensation with the same attempt (same
-- message ID) and re-arms its timeout. While a compensation retry is waiting
-- for its backoff, it sends that retry now instead (the failed attempt's
-- message ID would be dropped by the participant's inbox).
CREATE FUNCTION kurier.saga_retry(saga_id uuid) RETURNS kurier.sagas LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    v_s   kurier.sagas := kurier._saga_lock_for(saga_id, 'saga_retry');
    v_def kurier.saga_types;
    v_t   kurier.saga_timers;
BEGIN
    IF v_s.status NOT IN ('running', 'compensating') THEN
        PERFORM kurier._saga_refuse('saga_retry', v_s, 'running or compensating');
    END IF;
    SELECT * INTO v_def FROM kurier.saga_types t WHERE t.saga_type = v_s.saga_type;
    SELECT * INTO v_t FROM kurier.saga_timers t WHERE t.saga_id = saga_id;
    PERFORM kurier._saga_event(v_s.id, 'operator_retry', v_s.current_step, v_def.steps -> v_s.current_step ->> 'name', v_s.attempt, NULL,
                               jsonb_build_object('by', current_user, 'status', v_s.status, 'timer', to_jsonb(v_t)));
    IF v_s.status = 'running' THEN
        v_s := kurier._saga_send(v_s, v_def, 'command', 'operator_retry');
    ELSE
        IF v_t.kind = 'retry' THEN
            v_s.attempt := v_t.attempt;
        END IF;
        v_s := kurier._saga_send(v_s, v_def, 'compensation', 'operator_retry');
    END IF;
    RETURN kurier._saga_save(v_s);
END;
$$;

-- Aborts a running saga: compensates its completed steps (and the outstanding
-- one if its step says compensate_unanswered). A late reply to the outstanding
-- command is then ignored.
CREATE FUNCTION kurier.saga_compensate(saga_id uuid, reason text DEFAULT NULL) RETURNS kurier.sagas LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    v_s   kurier.sagas := kurier._saga_lock_for(saga_id, 'saga_compensate');
    v_def kurier.saga_types;
BEGIN
    IF v_s.status <> 'running' THEN
        PERFORM kurier._saga_refuse('saga_compensate', v_s, 'running');
    END IF;
    SELECT * INTO v_def FROM kurier.saga_types t WHERE t.saga_type = v_s.saga_type;
    PERFORM kurier._saga_event(v_s.id, 'operator_compensate', v_s.current_step, v_def.steps -> v_s.current_step ->> 'name', v_s.attempt, NULL,
                               jsonb_build_object('by', current_user, 'reason', reason));
    v_s := kurier._saga_begin_compensation(v_s, v_def, 'aborted by operator' || coalesce(': ' || reason, ''), v_s.current_step);
    RETURN kurier._saga_save(v_s);
END;
$$;

-- Continues a parked saga: a fresh budget of max_attempts for its current
-- compensation, starting at the next attempt number (so with a new message
-- ID). Only compensation parks: a running saga that runs out of attempts
-- compensates instead.
CREATE FUNCTION kurier.saga_resume(saga_id uuid) RETURNS kurier.sagas LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    v_s   kurier.sagas := kurier._saga_lock_for(saga_id, 'saga_resume');
    v_def kurier.saga_types;
BEGIN
    IF v_s.status <> 'parked' THEN
        PERFORM kurier._saga_refuse('saga_resume', v_s, 'parked');
    END IF;
    SELECT * INTO v_def FROM kurier.saga_types t WHERE t.saga_type = v_s.saga_type;
    PERFORM kurier._saga_event(v_s.id, 'resumed', v_s.current_step, v_def.steps -> v_s.current_step ->> 'name', v_s.attempt + 1, NULL,
                               jsonb_build_object('by', current_user, 'parked_reason', v_s.reason));
    v_s.status := 'compensating';
    v_s.reason := v_s.compensation_reason;
    v_s.attempt := v_s.attempt + 1;
    v_s.first_attempt := v_s.attempt;
    v_s := kurier._saga_send(v_s, v_def, 'compensation', 'resume');
    RETURN kurier._saga_save(v_s);
END;
$$;

-- Closes a parked saga as failed, after an operator resolved it by hand.
CREATE FUNCTION kurier.saga_fail(saga_id uuid, reason text) RETURNS kurier.sagas LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    v_s kurier.sagas := kurier._saga_lock_for(saga_id, 'saga_fail');
BEGIN
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'kurier.saga_fail: a reason is required'
            USING ERRCODE = '22023', HINT = 'say what was done by hand, e.g. ''refunded manually, ticket OPS-123''';
    END IF;
    IF v_s.status <> 'parked' THEN
        PERFORM kurier._saga_refuse('saga_fail', v_s, 'parked');
    END IF;
    PERFORM kurier._saga_event(v_s.id, 'operator_fail', v_s.current_step, NULL, v_s.attempt, NULL,
                               jsonb_build_object('by', current_user, 'reason', reason, 'parked_reason', v_s.reason));
    v_s.status := 'failed';
    v_s.ended_at := now();
    v_s.reason := 'marked failed by operator: ' || reason;
    RETURN kurier._saga_save(v_s);
END;
$$;

-- Due timers are found by walking saga_timers_due in order, whatever the
-- statistics say (without them the planner may sort the whole backlog).
ALTER FUNCTION kurier.saga_fire_timers(integer) SET enable_sort = off;
