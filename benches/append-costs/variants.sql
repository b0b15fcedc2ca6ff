-- What a single-event append pays for, piece by piece: statements and
-- functions that build up from a bare insert of the event row to
-- kurier.append_event, run side by side by run.sh under pgbench. Only
-- run.sh's plain and plain_outbox statements and kurier.append_event itself
-- match `make bench` (its plain / with-outbox / append figures, there from
-- Rust writers); the others exist
-- here, in a scratch database, to tell where the difference goes. None of
-- them is a correct append: each adds one piece and skips the rest.

CREATE TABLE plain_events (LIKE kurier.events INCLUDING DEFAULTS INCLUDING GENERATED
                           INCLUDING INDEXES INCLUDING CONSTRAINTS);
CREATE SEQUENCE plain_position;
-- Versions for the pieces that do not claim one: unique across writers.
CREATE SEQUENCE piece_version;

-- The floor of any PL/pgSQL append: the event row and its outbox row.
CREATE FUNCTION two_inserts(p_stream text, p_data jsonb, p_id uuid) RETURNS bigint
    LANGUAGE plpgsql AS $fn$
DECLARE v bigint := nextval('piece_version');
BEGIN
    INSERT INTO kurier.events (global_position, stream, version, type, data, event_id)
    VALUES (nextval('kurier.event_position'), p_stream, v, 'Placed', p_data, p_id);
    INSERT INTO kurier.outbox (message_id, topic, key, payload, headers)
    VALUES (p_id, 'bench', p_stream, p_data,
            jsonb_build_object('event-type', 'Placed', 'stream-version', v::text));
    RETURN v;
END $fn$;

-- + the idempotent retry's ON CONFLICT on the event id.
CREATE FUNCTION on_conflict(p_stream text, p_data jsonb, p_id uuid) RETURNS bigint
    LANGUAGE plpgsql AS $fn$
DECLARE v bigint := nextval('piece_version');
BEGIN
    INSERT INTO kurier.events (global_position, stream, version, type, data, event_id)
    VALUES (nextval('kurier.event_position'), p_stream, v, 'Placed', p_data, p_id)
    ON CONFLICT ON CONSTRAINT events_event_id_key DO NOTHING;
    INSERT INTO kurier.outbox (message_id, topic, key, payload, headers)
    VALUES (p_id, 'bench', p_stream, p_data,
            jsonb_build_object('event-type', 'Placed', 'stream-version', v::text));
    RETURN v;
END $fn$;

-- + the publication settings' lookup and the topic check.
CREATE FUNCTION settings(p_stream text, p_data jsonb, p_id uuid) RETURNS bigint
    LANGUAGE plpgsql AS $fn$
DECLARE v bigint := nextval('piece_version'); tmpl text; pub boolean; topic text;
BEGIN
    INSERT INTO kurier.events (global_position, stream, version, type, data, event_id)
    VALUES (nextval('kurier.event_position'), p_stream, v, 'Placed', p_data, p_id);
    SELECT st.topic_template, st.publish INTO tmpl, pub FROM kurier.event_store_settings st;
    IF pub THEN
        topic := kurier.event_topic(tmpl, p_stream);
        IF NOT kurier.is_legal_topic(topic) THEN RAISE EXCEPTION 'illegal topic %', topic; END IF;
        INSERT INTO kurier.outbox (message_id, topic, key, payload, headers)
        VALUES (p_id, topic, p_stream, p_data,
                jsonb_build_object('event-type', 'Placed', 'stream-version', v::text));
    END IF;
    RETURN v;
END $fn$;

-- + the gap-safe position (kurier.draw_event_position: the window lock, the
-- position, the position's lock, the once-per-transaction mark).
CREATE FUNCTION gap_safe(p_stream text, p_data jsonb, p_id uuid) RETURNS bigint
    LANGUAGE plpgsql AS $fn$
DECLARE v bigint := nextval('piece_version');
BEGIN
    INSERT INTO kurier.events (global_position, stream, version, type, data, event_id)
    VALUES (kurier.draw_event_position(), p_stream, v, 'Placed', p_data, p_id);
    INSERT INTO kurier.outbox (message_id, topic, key, payload, headers)
    VALUES (p_id, 'bench', p_stream, p_data,
            jsonb_build_object('event-type', 'Placed', 'stream-version', v::text));
    RETURN v;
END $fn$;

-- + the version claim as kurier.append_one makes it: the stream row's update.
CREATE FUNCTION stream_update(p_stream text, p_data jsonb, p_id uuid) RETURNS bigint
    LANGUAGE plpgsql AS $fn$
DECLARE v bigint;
BEGIN
    UPDATE kurier.streams s SET version = s.version + 1 WHERE s.stream = p_stream
    RETURNING s.version INTO v;
    IF NOT FOUND THEN
        INSERT INTO kurier.streams AS s (stream, version) VALUES (p_stream, 0)
        ON CONFLICT ON CONSTRAINT streams_pkey DO UPDATE SET version = s.version + 1
        RETURNING s.version INTO v;
    END IF;
    INSERT INTO kurier.events (global_position, stream, version, type, data, event_id)
    VALUES (nextval('kurier.event_position'), p_stream, v, 'Placed', p_data, p_id);
    INSERT INTO kurier.outbox (message_id, topic, key, payload, headers)
    VALUES (p_id, 'bench', p_stream, p_data,
            jsonb_build_object('event-type', 'Placed', 'stream-version', v::text));
    RETURN v;
END $fn$;

-- Instead of the update, only the stream row's lock (SELECT ... FOR UPDATE):
-- the lock without the new row version; the version itself is not kept.
CREATE FUNCTION stream_lock(p_stream text, p_data jsonb, p_id uuid) RETURNS bigint
    LANGUAGE plpgsql AS $fn$
DECLARE v bigint;
BEGIN
    v := coalesce((SELECT s.version FROM kurier.streams s WHERE s.stream = p_stream FOR UPDATE), -1);
    IF v = -1 THEN INSERT INTO kurier.streams (stream, version) VALUES (p_stream, 0); END IF;
    v := nextval('piece_version');
    INSERT INTO kurier.events (global_position, stream, version, type, data, event_id)
    VALUES (nextval('kurier.event_position'), p_stream, v, 'Placed', p_data, p_id);
    INSERT INTO kurier.outbox (message_id, topic, key, payload, headers)
    VALUES (p_id, 'bench', p_stream, p_data,
            jsonb_build_object('event-type', 'Placed', 'stream-version', v::text));
    RETURN v;
END $fn$;

-- Instead of the update, a per-stream advisory lock and the last version
-- read from the events' (stream, version) index.
CREATE FUNCTION advisory_max(p_stream text, p_data jsonb, p_id uuid) RETURNS bigint
    LANGUAGE plpgsql AS $fn$
DECLARE v bigint; ok boolean;
BEGIN
    ok := pg_advisory_xact_lock(hashtextextended(p_stream, 0)) IS NOT NULL;
    v := coalesce((SELECT e.version FROM kurier.events e WHERE e.stream = p_stream
                   ORDER BY e.version DESC LIMIT 1), -1) + 1;
    INSERT INTO kurier.events (global_position, stream, version, type, data, event_id)
    VALUES (nextval('kurier.event_position'), p_stream, v, 'Placed', p_data, p_id);
    INSERT INTO kurier.outbox (message_id, topic, key, payload, headers)
    VALUES (p_id, 'bench', p_stream, p_data,
            jsonb_build_object('event-type', 'Placed', 'stream-version', v::text));
    RETURN v;
END $fn$;

-- Instead of the update, no lock at all: the last version from the index,
-- and the (stream, version) unique index settles races (ON CONFLICT DO
-- NOTHING on every unique index, then try the next version; an event id
-- stored twice would loop for ever here, which random ids never do).
CREATE FUNCTION unique_index(p_stream text, p_data jsonb, p_id uuid) RETURNS bigint
    LANGUAGE plpgsql AS $fn$
DECLARE v bigint;
BEGIN
    LOOP
        v := coalesce((SELECT e.version FROM kurier.events e WHERE e.stream = p_stream
                       ORDER BY e.version DESC LIMIT 1), -1) + 1;
        INSERT INTO kurier.events (global_position, stream, version, type, data, event_id)
        VALUES (nextval('kurier.event_position'), p_stream, v, 'Placed', p_data, p_id)
        ON CONFLICT DO NOTHING;
        EXIT WHEN FOUND;
    END LOOP;
    INSERT INTO kurier.outbox (message_id, topic, key, payload, headers)
    VALUES (p_id, 'bench', p_stream, p_data,
            jsonb_build_object('event-type', 'Placed', 'stream-version', v::text));
    RETURN v;
END $fn$;
