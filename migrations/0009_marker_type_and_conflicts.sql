-- Kurier event store: (1) the event type StreamErased is reserved for the
-- marker kurier.erase_stream appends; (2) the database counts version
-- conflicts (KU409), so /metrics has them for clients in every language.
--
-- (1)
-- Aggregates start anew at that marker and read models delete what they
-- derived from the stream when they see it, so an application event of that
-- type would silently reset them. The Rust library refused it from the
-- start; from here on the SQL functions do too, for every language:
--   kurier.append_event, kurier.append_event_bytes and both forms of
--   kurier.append_events raise 22023 naming the reserved type (a batch: the
--   first such event's 0-based index, as the JSON form's events[i]), and
--   store nothing.
-- A guard against appending the marker by mistake, not a permission:
-- kurier.erase_stream appends its marker through kurier.append_one, which
-- stays unchecked and callable (erase_stream runs with its caller's rights,
-- so append_one cannot be revoked from them); neither is a direct INSERT into
-- kurier.events checked. Both are outside the contract.
-- How: one text comparison in the single-event functions (SQL wrappers),
-- one array scan in the array form of append_events (replaced here with its
-- 0008 text and the check added; the JSON form goes through it);
-- kurier.refuse_reserved_event_type runs only for a reserved type.
--
-- (2) A KU409 rolls its transaction back, and with it any row it could have
-- counted in; a sequence is not transactional, so the append bumps
-- kurier.event_conflicts just before raising, and the daemon reports
-- kurier.event_conflicts_total() as kurier_events_version_conflicts_total.
-- Both functions are SECURITY DEFINER (owned by whoever migrates) and
-- granted to PUBLIC, so roles granted before this migration need nothing
-- new: a conflict stays a KU409, never a permission error on the sequence.
-- The count is database-wide: every daemon scraping it reports the same
-- number (do not sum it over instances). kurier.append_one is replaced
-- with 0005's text and the count added; the array form of append_events
-- below has it too.
--
-- Written against schema kurier; other schemas get this text with every
-- "kurier." replaced.

-- Version conflicts of all clients since the migration (never reset; after
-- a crash PostgreSQL may skip up to 32 values of a sequence, so the count
-- can jump by that much then).
CREATE SEQUENCE kurier.event_conflicts AS bigint MINVALUE 1 START 1 CACHE 1 NO CYCLE;

CREATE FUNCTION kurier.count_event_conflict() RETURNS bigint
    LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $fn$ SELECT nextval('kurier.event_conflicts') $fn$;

-- How many KU409 the append functions raised (0 before the first).
CREATE FUNCTION kurier.event_conflicts_total() RETURNS bigint
    LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS $fn$ SELECT CASE WHEN s.is_called THEN s.last_value ELSE 0 END FROM kurier.event_conflicts s $fn$;

-- append_one runs with its caller's rights, so every appender needs EXECUTE
-- on the bump; PUBLIC gets it explicitly, also where default privileges
-- revoke it (any role can then bump the count: it is a statistic, not an
-- audit record).
GRANT EXECUTE ON FUNCTION kurier.count_event_conflict(), kurier.event_conflicts_total() TO PUBLIC;

-- Raises 22023 for the first reserved type in `types`; never returns.
-- one_event: the single-event functions' call (the message says "an
-- event"); a batch names the event as events[i], 0-based.
CREATE FUNCTION kurier.refuse_reserved_event_type(stream text, types text[], one_event boolean DEFAULT false)
    RETURNS text[] LANGUAGE plpgsql AS $fn$
DECLARE
    which text := CASE WHEN one_event THEN 'an event'
                       ELSE format('events[%s]', array_position(types, 'StreamErased') - array_lower(types, 1)) END;
BEGIN
    RAISE EXCEPTION 'kurier: % for stream % has the type StreamErased, reserved for the marker of kurier.erase_stream',
        which, coalesce(stream, 'NULL')
        USING ERRCODE = '22023',
              HINT = 'name the event otherwise; to erase a stream, call kurier.erase_stream';
END;
$fn$;

CREATE OR REPLACE FUNCTION kurier.append_event(
    stream text, type text, data jsonb, metadata jsonb DEFAULT NULL,
    expected_version bigint DEFAULT NULL, event_id uuid DEFAULT gen_random_uuid()
) RETURNS bigint LANGUAGE sql
    AS $fn$
    SELECT kurier.append_one($1,
        CASE WHEN $2 = 'StreamErased' THEN (kurier.refuse_reserved_event_type($1, ARRAY[$2], true))[1] ELSE $2 END,
        $3, NULL::bytea, $4, $5, $6)
$fn$;

CREATE OR REPLACE FUNCTION kurier.append_event_bytes(
    stream text, type text, data bytea, metadata jsonb DEFAULT NULL,
    expected_version bigint DEFAULT NULL, event_id uuid DEFAULT gen_random_uuid()
) RETURNS bigint LANGUAGE sql
    AS $fn$
    SELECT kurier.append_one($1,
        CASE WHEN $2 = 'StreamErased' THEN (kurier.refuse_reserved_event_type($1, ARRAY[$2], true))[1] ELSE $2 END,
        NULL::jsonb, $3, $4, $5, $6)
$fn$;

-- The array form of 0008 (the JSON form calls it), with the check added
-- after the type check; otherwise 0008's text.
CREATE OR REPLACE FUNCTION kurier.append_events(
    stream text, expected_version bigint,
    types text[], data jsonb[], metadata jsonb[] DEFAULT NULL, event_ids uuid[] DEFAULT NULL
) RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
    p_stream   text := append_events.stream;
    p_expected bigint := append_events.expected_version;
    n          int := cardinality(types);
    ids        uuid[] := event_ids;
    metas      jsonb[] := metadata;
    v_last     bigint;
    first_pos  bigint;
    bad        int;
    inserted   int;
    tmpl       text;
    pub        boolean;
    topic      text;
BEGIN
    IF p_stream IS NULL OR p_stream = '' THEN
        RAISE EXCEPTION 'kurier: stream must be a non-empty name' USING ERRCODE = '22023';
    END IF;
    IF p_expected < -1 THEN
        RAISE EXCEPTION 'kurier: expected_version % for stream % is invalid', p_expected, p_stream
            USING ERRCODE = '22023', HINT = 'NULL = any, -1 = no stream yet, N >= 0 = at version N';
    END IF;
    IF coalesce(n, 0) = 0 THEN
        RAISE EXCEPTION 'kurier: a batch for stream % has no events (types is %)', p_stream,
            CASE WHEN types IS NULL THEN 'NULL' ELSE 'empty' END USING ERRCODE = '22023';
    END IF;
    IF array_ndims(types) > 1 OR array_ndims(data) > 1 OR array_ndims(metas) > 1 OR array_ndims(ids) > 1 THEN
        RAISE EXCEPTION 'kurier: a batch for stream % must be given as one-dimensional arrays', p_stream
            USING ERRCODE = '22023';
    END IF;
    IF cardinality(data) IS DISTINCT FROM n OR cardinality(metas) <> n OR cardinality(ids) <> n THEN
        RAISE EXCEPTION 'kurier: a batch for stream % has % types but % data, % metadata and % event_ids',
            p_stream, n, coalesce(cardinality(data)::text, 'NULL'), coalesce(cardinality(metas)::text, 'NULL'),
            coalesce(cardinality(ids)::text, 'NULL')
            USING ERRCODE = '22023', HINT = 'element i of each array describes event i; metadata and event_ids may be NULL';
    END IF;
    bad := least(kurier.first_null_index(types), array_position(types, '') - array_lower(types, 1));
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'kurier: invalid batch for stream %: events[%] has no type (a non-empty string)', p_stream, bad
            USING ERRCODE = '22023';
    END IF;
    -- New in 0009 (the rest is 0008's text).
    IF 'StreamErased' = ANY (types) THEN
        PERFORM kurier.refuse_reserved_event_type(p_stream, types);
    END IF;
    bad := kurier.first_null_index(data);
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'kurier: invalid batch for stream %: events[%] has NULL data', p_stream, bad
            USING ERRCODE = '22004', HINT = 'use ''null''::jsonb for a JSON null, or ''{}''';
    END IF;
    IF metas IS NOT NULL THEN
        SELECT min(m.i) - 1 INTO bad FROM unnest(metas) WITH ORDINALITY AS m(m, i)
        WHERE jsonb_typeof(m.m) NOT IN ('object', 'null');
        IF bad IS NOT NULL THEN
            RAISE EXCEPTION 'kurier: invalid batch for stream %: events[%] has metadata that is a JSON %, not an object',
                p_stream, bad, jsonb_typeof(metas[array_lower(metas, 1) + bad]) USING ERRCODE = '22023';
        END IF;
        -- JSON null metadata is stored as SQL NULL, as append_event does.
        IF EXISTS (SELECT FROM unnest(metas) m WHERE jsonb_typeof(m) = 'null') THEN
            metas := ARRAY(SELECT CASE WHEN jsonb_typeof(m.m) = 'object' THEN m.m END
                           FROM unnest(metas) WITH ORDINALITY AS m(m, i) ORDER BY m.i);
        END IF;
    END IF;
    IF ids IS NULL OR array_position(ids, NULL) IS NOT NULL THEN
        ids := ARRAY(SELECT coalesce(u.id, gen_random_uuid())
                     FROM unnest(coalesce(event_ids, array_fill(NULL::uuid, ARRAY[n]))) WITH ORDINALITY AS u(id, i)
                     ORDER BY u.i);
    END IF;

    -- Claim versions v_last-n+1 .. v_last; the stream row stays locked until commit.
    INSERT INTO kurier.streams AS s (stream, version) VALUES (p_stream, n - 1)
    ON CONFLICT ON CONSTRAINT streams_pkey DO UPDATE SET version = s.version + n
    RETURNING s.version INTO v_last;

    -- Idempotent retry, checked before the version check (under the lock):
    -- a stored batch has its first event stored, so one probe tells.
    IF event_ids[array_lower(event_ids, 1)] IS NOT NULL
       AND EXISTS (SELECT FROM kurier.events e WHERE e.event_id = event_ids[array_lower(event_ids, 1)]) THEN
        RETURN kurier.event_batch_stored_ids(p_stream, event_ids, v_last, n);
    END IF;

    IF p_expected IS NOT NULL AND p_expected <> v_last - n THEN
        -- Before the conflict, what 0005 checked first: an id twice (22023),
        -- ids stored before (KU422, from the retry path).
        PERFORM kurier.event_batch_duplicates(p_stream, event_ids);
        IF EXISTS (SELECT FROM kurier.events e WHERE e.event_id = ANY (event_ids)) THEN
            RETURN kurier.event_batch_stored_ids(p_stream, event_ids, v_last, n);
        END IF;
        -- New in 0009.
        PERFORM kurier.count_event_conflict();
        RAISE EXCEPTION 'kurier: stream % is at version %, expected %', p_stream, v_last - n, p_expected
            USING ERRCODE = 'KU409', HINT = 'reload the stream and retry';
    END IF;

    first_pos := kurier.draw_event_position();
    -- Positions ascend with versions: unnest yields the rows in array order
    -- and nextval runs once per row in that order.
    INSERT INTO kurier.events (global_position, stream, version, type, data, metadata, event_id)
    SELECT CASE WHEN u.i = 1 THEN first_pos ELSE nextval('kurier.event_position') END,
           p_stream, v_last - n + u.i, u.type, u.data, u.meta, u.id
    FROM unnest(ids, types, data, metas) WITH ORDINALITY AS u(id, type, data, meta, i)
    ON CONFLICT ON CONSTRAINT events_event_id_key DO NOTHING;
    GET DIAGNOSTICS inserted = ROW_COUNT;
    IF inserted < n THEN
        -- Ids stored before (by a transaction that committed while this
        -- one waited on them), or one id twice: the same answer as above.
        RETURN kurier.event_batch_stored_ids(p_stream, event_ids, v_last, n);
    END IF;

    SELECT st.topic_template, st.publish INTO tmpl, pub FROM kurier.event_store_settings st;
    IF pub THEN
        topic := kurier.event_topic(tmpl, p_stream);
        IF NOT kurier.is_legal_topic(topic) THEN
            RAISE EXCEPTION 'kurier: stream % would publish to "%", which is not a legal Kafka topic', p_stream, topic
                USING ERRCODE = '22023',
                      HINT = 'a topic is 1-249 characters of [a-zA-Z0-9._-], not "." or "..": rename the stream '
                             'or change the template with kurier.set_event_topic_template (now "' || tmpl || '")';
        END IF;
        -- Outbox ids ascend with versions (rows arrive in array order).
        INSERT INTO kurier.outbox (message_id, topic, key, payload, headers)
        SELECT u.id, topic, p_stream, u.data,
               CASE WHEN jsonb_typeof(u.meta -> 'traceparent') = 'string'
                    THEN jsonb_build_object('event-type', u.type, 'stream-version', (v_last - n + u.i)::text,
                                            'traceparent', u.meta -> 'traceparent')
                    ELSE jsonb_build_object('event-type', u.type, 'stream-version', (v_last - n + u.i)::text) END
        FROM unnest(ids, types, data, metas) WITH ORDINALITY AS u(id, type, data, meta, i);
    END IF;
    RETURN v_last;
END;
$fn$;

-- The single-event append behind append_event and append_event_bytes (and
-- erase_stream's marker). Not part of the contract: call the public functions.
CREATE OR REPLACE FUNCTION kurier.append_one(
    p_stream text, p_type text, p_data jsonb, p_bytes bytea,
    p_metadata jsonb, p_expected bigint, p_event_id uuid
) RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
    v          bigint;
    pos        bigint;
    had_stream text;
    had_version bigint;
    tmpl       text;
    pub        boolean;
    topic      text;
BEGIN
    IF p_stream IS NULL OR p_stream = '' THEN
        RAISE EXCEPTION 'kurier: stream must be a non-empty name' USING ERRCODE = '22023';
    END IF;
    IF p_type IS NULL OR p_type = '' THEN
        RAISE EXCEPTION 'kurier: event type must be non-empty (stream %)', p_stream USING ERRCODE = '22023';
    END IF;
    IF p_data IS NULL AND p_bytes IS NULL THEN
        RAISE EXCEPTION 'kurier: event data must not be NULL (stream %)', p_stream
            USING ERRCODE = '22004', HINT = 'use ''null''::jsonb for a JSON null, or ''{}''';
    END IF;
    IF p_event_id IS NULL THEN
        RAISE EXCEPTION 'kurier: event_id must not be NULL (stream %)', p_stream
            USING ERRCODE = '22004', HINT = 'omit it to get gen_random_uuid()';
    END IF;
    IF p_expected < -1 THEN
        RAISE EXCEPTION 'kurier: expected_version % for stream % is invalid', p_expected, p_stream
            USING ERRCODE = '22023', HINT = 'NULL = any, -1 = no stream yet, N >= 0 = at version N';
    END IF;
    IF jsonb_typeof(p_metadata) IS DISTINCT FROM 'object' THEN
        IF jsonb_typeof(p_metadata) = 'null' THEN
            p_metadata := NULL;
        ELSIF p_metadata IS NOT NULL THEN
            RAISE EXCEPTION 'kurier: metadata of an event in stream % is a JSON %, not an object',
                p_stream, jsonb_typeof(p_metadata) USING ERRCODE = '22023';
        END IF;
    END IF;

    -- Claim the next version. The row lock this takes (also for a new
    -- stream: the inserted row) is held until commit, so appenders of one
    -- stream run one after the other and each sees its predecessor's commit
    -- (READ COMMITTED re-reads the row after the wait). UPDATE first: the
    -- common case, and cheaper than the upsert; the upsert creates a stream
    -- (and settles a race between two creators).
    UPDATE kurier.streams s SET version = s.version + 1 WHERE s.stream = p_stream
    RETURNING s.version INTO v;
    IF NOT FOUND THEN
        INSERT INTO kurier.streams AS s (stream, version) VALUES (p_stream, 0)
        ON CONFLICT ON CONSTRAINT streams_pkey DO UPDATE SET version = s.version + 1
        RETURNING s.version INTO v;
    END IF;

    IF p_expected IS NOT NULL AND p_expected <> v - 1 THEN
        -- Before reporting a conflict: is this the retry of an append that
        -- already committed? (Checked under the stream lock, so a retry that
        -- raced its original is seen too.)
        SELECT e.stream, e.version INTO had_stream, had_version
        FROM kurier.events e WHERE e.event_id = p_event_id;
        IF had_stream = p_stream THEN
            UPDATE kurier.streams s SET version = v - 1 WHERE s.stream = p_stream;
            RETURN had_version;
        ELSIF had_stream IS NOT NULL THEN
            RAISE EXCEPTION 'kurier: event % is already stored in stream %, not %', p_event_id, had_stream, p_stream
                USING ERRCODE = 'KU422', HINT = 'an event id identifies one event; use a new id';
        END IF;
        -- New in 0009 (the rest is 0005's text).
        PERFORM kurier.count_event_conflict();
        RAISE EXCEPTION 'kurier: stream % is at version %, expected %', p_stream, v - 1, p_expected
            USING ERRCODE = 'KU409', HINT = 'reload the stream and retry';
    END IF;

    pos := kurier.draw_event_position();
    -- ON CONFLICT (event_id): the id is already stored (a retry with no
    -- expected version, or the same id in another stream).
    INSERT INTO kurier.events (global_position, stream, version, type, data, data_bytes, metadata, event_id)
    VALUES (pos, p_stream, v, p_type, p_data, p_bytes, p_metadata, p_event_id)
    ON CONFLICT ON CONSTRAINT events_event_id_key DO NOTHING;
    IF NOT FOUND THEN
        SELECT e.stream, e.version INTO had_stream, had_version
        FROM kurier.events e WHERE e.event_id = p_event_id;
        IF had_stream = p_stream THEN
            UPDATE kurier.streams s SET version = v - 1 WHERE s.stream = p_stream;
            RETURN had_version;
        END IF;
        RAISE EXCEPTION 'kurier: event % is already stored in stream %, not %', p_event_id, had_stream, p_stream
            USING ERRCODE = 'KU422', HINT = 'an event id identifies one event; use a new id';
    END IF;

    SELECT st.topic_template, st.publish INTO tmpl, pub FROM kurier.event_store_settings st;
    IF pub THEN
        topic := kurier.event_topic(tmpl, p_stream);
        IF NOT kurier.is_legal_topic(topic) THEN
            RAISE EXCEPTION 'kurier: stream % would publish to "%", which is not a legal Kafka topic', p_stream, topic
                USING ERRCODE = '22023',
                      HINT = 'a topic is 1-249 characters of [a-zA-Z0-9._-], not "." or "..": rename the stream '
                             'or change the template with kurier.set_event_topic_template (now "' || tmpl || '")';
        END IF;
        INSERT INTO kurier.outbox (message_id, topic, key, payload, payload_bytes, headers)
        VALUES (p_event_id, topic, p_stream, p_data, p_bytes,
                CASE WHEN jsonb_typeof(p_metadata -> 'traceparent') = 'string'
                     THEN jsonb_build_object('event-type', p_type, 'stream-version', v::text,
                                             'traceparent', p_metadata -> 'traceparent')
                     ELSE jsonb_build_object('event-type', p_type, 'stream-version', v::text) END);
    END IF;
    RETURN v;
END;
$fn$;
