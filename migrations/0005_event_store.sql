-- Kurier event store: streams of events with optimistic concurrency, a gap-safe
-- global order for catch-up readers, and publication through kurier.outbox in
-- the appending transaction. The whole API is SQL functions, so any language
-- is a client:
--   kurier.append_event / append_event_bytes / append_events   (write)
--   kurier.read_stream / stream_version / read_all              (read)
--   kurier.save_snapshot / load_snapshot                        (snapshots)
--   kurier.erase_stream, kurier.subject_key / forget_subject    (GDPR)
--   kurier.event_horizon, kurier.event_horizon_lag()            (operations)
--
-- Written against schema kurier; other schemas get this text with every
-- "kurier." replaced, so every object (and the custom setting below) is
-- schema-qualified and nothing relies on search_path.
--
-- Error codes (SQLSTATE):
--   KU409  expected version does not match the stream's version
--   KU422  an event id is already stored in another stream, or a batch's ids
--          are only partly stored already
--   KU404  erase_stream: the stream does not exist
--   KU410  subject_key: the subject was forgotten
--   22023  invalid argument (message names the argument and the problem)
--   22004  a required argument is NULL
--
-- Advisory locks taken here (all transaction-level):
--   (1802855798, <oid of kurier.event_position>)  two-int4 form, SHARED: the
--       "window" lock, held by every transaction that appended to this schema
--       (1802855798 = 0x6b756576, "kuev"; the oid makes it per schema).
--   -position  single-bigint form, SHARED: the first position a transaction
--       drew. Negative single-bigint advisory keys are reserved for this; the
--       rest of Kurier only uses positive ones.
--   (1802859371, hashtext(subject))  two-int4 form, EXCLUSIVE: serialises
--       subject_key and forget_subject for one subject (0x6b75736b, "kusk").

-- Global positions. Drawn with nextval at append, so they are assigned at
-- insert, not at commit, and rolled-back appends leave holes for ever.
-- CACHE must stay 1: read_all takes the sequence's last value as "every
-- position up to here has been drawn", which a per-session cache breaks
-- (read_all refuses to run if it was changed).
CREATE SEQUENCE kurier.event_position AS bigint MINVALUE 1 START 1 CACHE 1 NO CYCLE;

-- One row per stream: its last version. The row is the per-stream lock (every
-- append updates it, so appenders of one stream queue on it) and the version
-- check. Only the primary key is indexed, so the version update is HOT and
-- the free space left by fillfactor keeps it on its page.
CREATE TABLE kurier.streams (
    stream         text   PRIMARY KEY,
    version        bigint NOT NULL,
    -- Version of the stream's latest StreamErased marker (kurier.erase_stream);
    -- snapshots below it are refused (they hold erased state).
    erased_version bigint
);
ALTER TABLE kurier.streams SET (
    fillfactor = 70,
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_analyze_scale_factor = 0.0,
    autovacuum_analyze_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0
);

CREATE TABLE kurier.events (
    global_position bigint      NOT NULL,
    stream          text        NOT NULL,
    version         bigint      NOT NULL,
    type            text        NOT NULL,
    -- Exactly one of data (JSON events) and data_bytes (binary events) is set.
    -- JSON null is a legal JSON event body ('null'::jsonb); SQL NULL is not.
    data            jsonb,
    data_bytes      bytea,
    -- A JSON object or NULL.
    metadata        jsonb,
    event_id        uuid        NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    -- The stream name up to its first '-': order-42 -> order; a stream
    -- without '-' is its own category.
    category        text        GENERATED ALWAYS AS (split_part(stream, '-', 1)) STORED,
    -- No default on global_position: a position must be drawn by the append
    -- functions (after the window lock), never by a bare INSERT.
    CONSTRAINT events_pkey PRIMARY KEY (global_position),
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    -- read_stream, and the guarantee that versions are never stored twice.
    CONSTRAINT events_stream_version_key UNIQUE (stream, version),
    CONSTRAINT events_one_body CHECK ((data IS NULL) <> (data_bytes IS NULL))
);
ALTER SEQUENCE kurier.event_position OWNED BY kurier.events.global_position;
-- read_all by category (read_all without category uses the primary key).
CREATE INDEX events_category ON kurier.events (category, global_position);

-- What the read functions return. Field order is part of the contract.
CREATE TYPE kurier.event AS (
    stream          text,
    version         bigint,
    global_position bigint,
    type            text,
    data            jsonb,
    metadata        jsonb,
    event_id        uuid,
    recorded_at     timestamptz,
    data_bytes      bytea,
    category        text
);

-- Publication settings: exactly one row.
CREATE TABLE kurier.event_store_settings (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- The outbox topic of a stream's events: ${category} and ${stream} are
    -- replaced by the stream's category and name.
    topic_template text    NOT NULL DEFAULT '${category}',
    -- false: appends store events only, nothing goes to kurier.outbox.
    publish        boolean NOT NULL DEFAULT true
);
INSERT INTO kurier.event_store_settings DEFAULT VALUES;

-- The topic of a stream's events under a template (no validation).
CREATE FUNCTION kurier.event_topic(template text, stream text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $fn$ SELECT replace(replace($1, '${category}', split_part($2, '-', 1)), '${stream}', $2) $fn$;

-- Whether a name is a legal Kafka topic: 1-249 characters of [a-zA-Z0-9._-],
-- not "." or "..". Same rule as Kafka's Topic.validate. (length() rather than
-- a {1,249} bound: the bounded regex costs 5 us per call, this 0.2 us.)
CREATE FUNCTION kurier.is_legal_topic(topic text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $fn$ SELECT $1 ~ '^[a-zA-Z0-9._-]+$' AND length($1) <= 249 AND $1 <> '.' AND $1 <> '..' $fn$;

CREATE FUNCTION kurier.set_event_topic_template(template text) RETURNS void
    LANGUAGE plpgsql AS $fn$
DECLARE
    probe text;
BEGIN
    IF template IS NULL THEN
        RAISE EXCEPTION 'kurier: the event topic template must not be NULL'
            USING ERRCODE = '22004', HINT = 'the default is ${category}';
    END IF;
    -- Only the two placeholders exist; anything else in ${...} is a typo.
    probe := replace(replace(template, '${category}', 'c'), '${stream}', 's');
    IF probe LIKE '%${%' THEN
        RAISE EXCEPTION 'kurier: event topic template "%" has an unknown placeholder', template
            USING ERRCODE = '22023', HINT = 'the placeholders are ${category} and ${stream}';
    END IF;
    -- The literal part must be legal on its own (the placeholders are checked
    -- at each append, because they depend on the stream name).
    IF NOT kurier.is_legal_topic(probe) THEN
        RAISE EXCEPTION 'kurier: event topic template "%" cannot give a legal Kafka topic', template
            USING ERRCODE = '22023',
                  HINT = 'a topic is 1-249 characters of [a-zA-Z0-9._-], not "." or ".."';
    END IF;
    UPDATE kurier.event_store_settings SET topic_template = template;
END;
$fn$;

CREATE FUNCTION kurier.set_event_publishing(enabled boolean) RETURNS void
    LANGUAGE sql AS $fn$ UPDATE kurier.event_store_settings SET publish = coalesce($1, true) $fn$;

-- The one place that draws global positions, for all append paths.
-- Returns the first of `n` positions; the caller draws the other n-1 with
-- nextval in ascending order (its insert), after this returns.
--
-- The gap-safe protocol (see read_all_bound): on the FIRST append of a
-- transaction, (1) take the window lock shared, (2) draw the position,
-- (3) take the shared advisory lock -position. The custom setting
-- kurier.append_horizon (transaction-local, so a (sub)transaction abort
-- resets it together with the locks) marks "already done in this
-- transaction"; it holds the top-level transaction id, so a stray
-- session-level value can never make an append skip the locks. Later appends
-- of the transaction only draw (their positions are above the locked first).
CREATE FUNCTION kurier.draw_event_position() RETURNS bigint
    LANGUAGE plpgsql AS $fn$
DECLARE
    pos bigint;
    xid text := pg_current_xact_id()::text;
    ok  boolean;
BEGIN
    -- Assignments, not PERFORM: PL/pgSQL evaluates them as simple
    -- expressions, without starting the executor. CASE orders the calls.
    IF current_setting('kurier.append_horizon', true) IS DISTINCT FROM xid THEN
        -- (1) the window lock; the sequence oid as int4 (bit pattern kept),
        -- so pg_locks shows classid = 1802855798, objid = the sequence oid;
        -- (2) only then draw the position.
        pos := CASE WHEN pg_advisory_xact_lock_shared(1802855798,
                        (('kurier.event_position'::regclass::oid::bigint # 2147483648) - 2147483648)::int4) IS NOT NULL
                    THEN nextval('kurier.event_position') END;
        -- (3) advertise it.
        ok := pg_advisory_xact_lock_shared(-pos) IS NOT NULL;
        xid := set_config('kurier.append_horizon', xid, true);
        RETURN pos;
    END IF;
    RETURN nextval('kurier.event_position');
END;
$fn$;

-- The single-event append behind append_event and append_event_bytes (and
-- erase_stream's marker). Not part of the contract: call the public functions.
CREATE FUNCTION kurier.append_one(
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

-- Appends one JSON event; returns its version (the first event of a stream
-- has version 0). expected_version: NULL = any, -1 = the stream must not
-- exist, N >= 0 = the stream must be at version N (else KU409, nothing
-- stored). An event_id already stored in this stream returns that event's
-- version and stores nothing; stored in another stream: KU422.
CREATE FUNCTION kurier.append_event(
    stream text, type text, data jsonb, metadata jsonb DEFAULT NULL,
    expected_version bigint DEFAULT NULL, event_id uuid DEFAULT gen_random_uuid()
) RETURNS bigint LANGUAGE sql
    AS $fn$ SELECT kurier.append_one($1, $2, $3, NULL::bytea, $4, $5, $6) $fn$;

-- The same for a binary event body (stored in data_bytes, published as
-- payload_bytes).
CREATE FUNCTION kurier.append_event_bytes(
    stream text, type text, data bytea, metadata jsonb DEFAULT NULL,
    expected_version bigint DEFAULT NULL, event_id uuid DEFAULT gen_random_uuid()
) RETURNS bigint LANGUAGE sql
    AS $fn$ SELECT kurier.append_one($1, $2, NULL::jsonb, $3, $4, $5, $6) $fn$;

-- Appends a batch of JSON events to one stream, atomically; returns the
-- version of the last. events: a non-empty JSON array of
--   {"type": string, "data": any JSON, "metadata": object (optional),
--    "event_id": uuid string (optional)}
-- expected_version applies to the stream before the first event. If every
-- event has an event_id and all are already stored in this stream, it returns
-- the stored version of the last one and appends nothing; some stored (or any
-- stored in another stream): KU422.
CREATE FUNCTION kurier.append_events(stream text, expected_version bigint, events jsonb)
    RETURNS bigint LANGUAGE plpgsql AS $fn$
DECLARE
    p_stream   text := append_events.stream;
    p_expected bigint := append_events.expected_version;
    n          int;
    problem    text;
    ids        uuid[];
    types      text[];
    datas      jsonb[];
    metas      jsonb[];
    given      uuid[];
    v_last     bigint;
    first_pos  bigint;
    stored     int;
    stored_here int;
    last_stored bigint;
    other      text;
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
    IF jsonb_typeof(events) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'kurier: events for stream % must be a JSON array, not %', p_stream,
            coalesce('a JSON ' || jsonb_typeof(events), 'NULL') USING ERRCODE = '22023';
    END IF;
    n := jsonb_array_length(events);
    IF n = 0 THEN
        RAISE EXCEPTION 'kurier: events for stream % is an empty array', p_stream USING ERRCODE = '22023';
    END IF;

    -- Validate every element before writing anything; report the first
    -- problem with its (0-based) index.
    SELECT format('events[%s] %s', x.i - 1, x.problem) INTO problem
    FROM (
        SELECT j.i,
            -- CASE tests in order, so each test may assume the ones before passed.
            CASE
                WHEN jsonb_typeof(j.e) <> 'object' THEN format('is a JSON %s, not an object', jsonb_typeof(j.e))
                WHEN jsonb_typeof(j.e -> 'type') IS DISTINCT FROM 'string' OR j.e ->> 'type' = ''
                    THEN 'has no "type" (a non-empty string)'
                WHEN NOT j.e ? 'data' THEN 'has no "data" (any JSON value; null is allowed)'
                WHEN jsonb_typeof(j.e -> 'metadata') NOT IN ('object', 'null')
                    THEN format('has "metadata" that is a JSON %s, not an object', jsonb_typeof(j.e -> 'metadata'))
                WHEN jsonb_typeof(j.e -> 'event_id') NOT IN ('string', 'null')
                    THEN format('has "event_id" %s, not a UUID string', j.e -> 'event_id')
                WHEN j.e ->> 'event_id' !~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'
                    THEN format('has "event_id" %s, not a UUID string', j.e -> 'event_id')
                ELSE (SELECT format('has unknown key "%s" (known: type, data, metadata, event_id)', k)
                      FROM jsonb_object_keys(j.e) k
                      WHERE k NOT IN ('type', 'data', 'metadata', 'event_id') LIMIT 1)
            END AS problem
        FROM jsonb_array_elements(events) WITH ORDINALITY AS j(e, i)
    ) x
    WHERE x.problem IS NOT NULL
    ORDER BY x.i LIMIT 1;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'kurier: invalid batch for stream %: %', p_stream, problem USING ERRCODE = '22023';
    END IF;

    SELECT array_agg(coalesce((x.e ->> 'event_id')::uuid, gen_random_uuid()) ORDER BY x.i),
           array_agg(x.e ->> 'type' ORDER BY x.i),
           array_agg(x.e -> 'data' ORDER BY x.i),
           array_agg(CASE WHEN jsonb_typeof(x.e -> 'metadata') = 'object' THEN x.e -> 'metadata' END ORDER BY x.i),
           array_agg((x.e ->> 'event_id')::uuid ORDER BY x.i) FILTER (WHERE x.e ->> 'event_id' IS NOT NULL)
    INTO ids, types, datas, metas, given
    FROM jsonb_array_elements(events) WITH ORDINALITY AS x(e, i);

    SELECT format('events[%s] and events[%s] have the same event_id %s', min(x.i) - 1, max(x.i) - 1, x.id)
    INTO problem
    FROM unnest(ids) WITH ORDINALITY AS x(id, i)
    GROUP BY x.id HAVING count(*) > 1 LIMIT 1;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'kurier: invalid batch for stream %: %', p_stream, problem USING ERRCODE = '22023';
    END IF;

    -- Claim versions v_last-n+1 .. v_last; the stream row stays locked until commit.
    INSERT INTO kurier.streams AS s (stream, version) VALUES (p_stream, n - 1)
    ON CONFLICT ON CONSTRAINT streams_pkey DO UPDATE SET version = s.version + n
    RETURNING s.version INTO v_last;

    -- Idempotent retry, checked before the version check (under the lock).
    IF given IS NOT NULL THEN
        SELECT count(*), count(*) FILTER (WHERE e.stream = p_stream),
               max(e.version) FILTER (WHERE e.event_id = ids[n] AND e.stream = p_stream),
               min(e.stream) FILTER (WHERE e.stream <> p_stream)
        INTO stored, stored_here, last_stored, other
        FROM kurier.events e WHERE e.event_id = ANY (given);
        IF stored > 0 THEN
            IF stored_here = n THEN
                UPDATE kurier.streams s SET version = v_last - n WHERE s.stream = p_stream;
                RETURN last_stored;
            ELSIF other IS NOT NULL THEN
                RAISE EXCEPTION 'kurier: a batch for stream % has event ids already stored in stream %', p_stream, other
                    USING ERRCODE = 'KU422', HINT = 'an event id identifies one event; use new ids';
            END IF;
            RAISE EXCEPTION 'kurier: a batch for stream % is partly stored already (% of % event ids)', p_stream, stored, n
                USING ERRCODE = 'KU422',
                      HINT = 'a retry must repeat the original batch exactly; a new batch needs new event ids';
        END IF;
    END IF;

    IF p_expected IS NOT NULL AND p_expected <> v_last - n THEN
        RAISE EXCEPTION 'kurier: stream % is at version %, expected %', p_stream, v_last - n, p_expected
            USING ERRCODE = 'KU409', HINT = 'reload the stream and retry';
    END IF;

    first_pos := kurier.draw_event_position();
    -- Positions ascend with versions: unnest yields the rows in array order
    -- and nextval runs once per row in that order.
    INSERT INTO kurier.events (global_position, stream, version, type, data, metadata, event_id)
    SELECT CASE WHEN u.i = 1 THEN first_pos ELSE nextval('kurier.event_position') END,
           p_stream, v_last - n + u.i, u.type, u.data, u.meta, u.id
    FROM unnest(ids, types, datas, metas) WITH ORDINALITY AS u(id, type, data, meta, i)
    ON CONFLICT ON CONSTRAINT events_event_id_key DO NOTHING;
    GET DIAGNOSTICS inserted = ROW_COUNT;
    IF inserted < n THEN
        -- Only a concurrent append of one of these ids to another stream.
        RAISE EXCEPTION 'kurier: a batch for stream % has event ids that another stream stored meanwhile', p_stream
            USING ERRCODE = 'KU422', HINT = 'an event id identifies one event; use new ids';
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
        FROM unnest(ids, types, datas, metas) WITH ORDINALITY AS u(id, type, data, meta, i);
    END IF;
    RETURN v_last;
END;
$fn$;

-- A stream's events from from_version on, ascending, at most max_count
-- (NULL = no limit).
CREATE FUNCTION kurier.read_stream(stream text, from_version bigint DEFAULT 0, max_count int DEFAULT 1000)
    RETURNS SETOF kurier.event LANGUAGE sql STABLE
    AS $fn$
    SELECT e.stream, e.version, e.global_position, e.type, e.data, e.metadata,
           e.event_id, e.recorded_at, e.data_bytes, e.category
    FROM kurier.events e
    WHERE e.stream = $1 AND e.version >= $2
    ORDER BY e.version
    LIMIT $3
$fn$;

-- The stream's last version; -1 if it does not exist.
CREATE FUNCTION kurier.stream_version(stream text) RETURNS bigint LANGUAGE sql STABLE
    AS $fn$ SELECT coalesce((SELECT s.version FROM kurier.streams s WHERE s.stream = $1), -1) $fn$;

-- The gap-safe read bound: every event with global_position < the result
-- that will ever commit is visible to any statement that starts after this
-- function returns (under READ COMMITTED). NULL: an appender is between
-- drawing its first position and advertising it; ask again.
--
-- Why: S (statement 1) is the last position drawn; every position <= S was
-- drawn before the pg_locks sample (statement 2). At the sample, the
-- transaction that drew it had either ended (PostgreSQL leaves the proc array
-- before releasing locks, so a commit is visible to every later snapshot), or
-- holds the shared lock on -(its first position) <= it (so bound <= it), or
-- holds the window lock without a position lock (then we do not answer).
-- pg_locks is one consistent copy of the main lock table, and advisory locks
-- never take the fast path. Transactions that never appended hold neither
-- lock and so never hold readers back.
--
-- A transaction that appended to several Kurier schemas holds one window lock
-- per schema; positions are per schema but the lock keys are not, so such a
-- transaction counts as "between draw and advertise" while it holds fewer
-- position locks than window locks.
CREATE FUNCTION kurier.read_all_bound() RETURNS bigint LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    s         bigint;
    in_window boolean;
    p         bigint;
    tries     int := 0;
BEGIN
    IF pg_is_in_recovery() THEN
        -- A standby's pg_locks does not show the primary's appenders.
        RAISE EXCEPTION 'kurier: read_all must run on the primary, not on a standby'
            USING ERRCODE = '25006';
    END IF;
    IF (SELECT q.seqcache FROM pg_catalog.pg_sequence q
        WHERE q.seqrelid = 'kurier.event_position'::regclass) <> 1 THEN
        RAISE EXCEPTION 'kurier: sequence kurier.event_position must have CACHE 1 for read_all to be gap-safe'
            USING ERRCODE = '55000', HINT = 'ALTER SEQUENCE kurier.event_position CACHE 1';
    END IF;
    LOOP
        -- Statement 1. pg_sequence_last_value reads under the buffer lock.
        -- (A plain SELECT from the sequence reads the tuple with the buffer
        -- only pinned, and nextval briefly stores the value 32 ahead there
        -- while it writes WAL: an S too high would be a hole.)
        s := coalesce(pg_sequence_last_value('kurier.event_position'), 0);
        -- Statement 2: one sample of the lock table.
        SELECT coalesce(bool_or(t.npos < t.nwin), false), min(t.minpos)
        INTO in_window, p
        FROM (
            -- No DISTINCT needed: a backend holds a lock in one mode once.
            SELECT count(*) FILTER (WHERE l.objsubid = 2 AND l.granted) AS nwin,
                   count(*) FILTER (WHERE l.objsubid = 1) AS npos,
                   min(-((l.classid::bigint << 32) | l.objid::bigint)) FILTER (WHERE l.objsubid = 1) AS minpos
            FROM pg_catalog.pg_locks l
            WHERE l.locktype = 'advisory'
              AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = current_database())
              AND l.pid IS DISTINCT FROM pg_backend_pid()
              -- Appenders take these locks shared; an exclusive holder (an
              -- operator pausing appends) has drawn nothing.
              AND l.mode = 'ShareLock'
              AND ((l.objsubid = 2 AND l.classid = 1802855798::oid)
                   OR (l.objsubid = 1 AND l.classid >= 2147483648::bigint::oid))
            -- virtualtransaction, not pid: prepared transactions have no pid.
            GROUP BY l.virtualtransaction
            HAVING bool_or(l.objsubid = 2 AND l.granted AND l.objid = 'kurier.event_position'::regclass::oid)
        ) t;
        EXIT WHEN NOT in_window;
        tries := tries + 1;
        IF tries >= 10 THEN
            RETURN NULL;
        END IF;
        -- The window is a few microseconds unless the appender was descheduled.
        PERFORM pg_sleep(0.0002);
    END LOOP;
    RETURN least(p, s + 1);
END;
$fn$;

-- All events with global_position > after_position, ascending, at most
-- max_count, optionally of one category. Gap-safe: a reader that passes the
-- last position it got never misses a committed event and never gets one
-- twice. May return nothing while an appender holds the bound back (see
-- kurier.event_horizon); poll again. Must run under READ COMMITTED on the
-- primary. Returns the caller's own uncommitted events too.
CREATE FUNCTION kurier.read_all(after_position bigint DEFAULT 0, max_count int DEFAULT 1000, category text DEFAULT NULL)
    RETURNS SETOF kurier.event LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    b bigint;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'kurier: read_all needs READ COMMITTED, not %', current_setting('transaction_isolation')
            USING ERRCODE = '25000',
                  HINT = 'it takes a new snapshot after sampling the appenders; call it outside REPEATABLE READ/SERIALIZABLE transactions';
    END IF;
    IF read_all.after_position IS NULL OR read_all.max_count IS NULL OR read_all.max_count < 1 THEN
        RAISE EXCEPTION 'kurier: read_all(after_position %, max_count %) needs a position and max_count >= 1',
            coalesce(read_all.after_position::text, 'NULL'), coalesce(read_all.max_count::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    -- Nothing drawn after after_position: nothing to return, and no need
    -- to sample pg_locks (the common case of a reader at the head).
    IF coalesce(pg_sequence_last_value('kurier.event_position'), 0) <= read_all.after_position THEN
        RETURN;
    END IF;
    b := kurier.read_all_bound();
    IF b IS NULL OR b <= read_all.after_position + 1 THEN
        RETURN;
    END IF;
    -- Statement 3: a snapshot taken after the sample.
    IF read_all.category IS NULL THEN
        RETURN QUERY
            SELECT e.stream, e.version, e.global_position, e.type, e.data, e.metadata,
                   e.event_id, e.recorded_at, e.data_bytes, e.category
            FROM kurier.events e
            WHERE e.global_position > read_all.after_position AND e.global_position < b
            ORDER BY e.global_position
            LIMIT read_all.max_count;
    ELSE
        RETURN QUERY
            SELECT e.stream, e.version, e.global_position, e.type, e.data, e.metadata,
                   e.event_id, e.recorded_at, e.data_bytes, e.category
            FROM kurier.events e
            WHERE e.category = read_all.category
              AND e.global_position > read_all.after_position AND e.global_position < b
            ORDER BY e.global_position
            LIMIT read_all.max_count;
    END IF;
END;
$fn$;

-- Whatever the planner's statistics say (a table never analyzed, as where
-- autovacuum is off, or after a burst), the only plan for these reads is the
-- ordered index walk that stops at max_count: without statistics the planner
-- took a bitmap scan of the whole range plus a sort (32 ms against 2.4 ms for
-- 10,000 of 100,000 events). With sorting off, no plan can sort instead.
ALTER FUNCTION kurier.read_all(bigint, int, text) SET enable_sort = off;
ALTER FUNCTION kurier.read_stream(text, bigint, int) SET enable_sort = off;

-- Transactions that hold read_all back: every transaction that appended to
-- this schema and is still open. position = the lowest position it holds
-- (read_all returns nothing at or above the lowest of these; for a
-- transaction that also appended to another Kurier schema of this database
-- that may be the other schema's position); NULL = it is between drawing and
-- advertising its first position. pid NULL = a prepared transaction (see
-- pg_prepared_xacts).
CREATE VIEW kurier.event_horizon AS
SELECT h.pid,
       a.application_name,
       a.usename,
       a.client_addr,
       a.state,
       h.position,
       a.xact_start,
       now() - a.xact_start AS xact_age,
       a.backend_xid,
       h.virtualtransaction
FROM (
    SELECT l.virtualtransaction,
           min(l.pid) AS pid,
           min(-((l.classid::bigint << 32) | l.objid::bigint)) FILTER (WHERE l.objsubid = 1) AS position
    FROM pg_catalog.pg_locks l
    WHERE l.locktype = 'advisory'
      AND l.database = (SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = current_database())
      AND l.mode = 'ShareLock'
      AND ((l.objsubid = 2 AND l.classid = 1802855798::oid)
           OR (l.objsubid = 1 AND l.classid >= 2147483648::bigint::oid))
    GROUP BY l.virtualtransaction
    HAVING bool_or(l.objsubid = 2 AND l.granted AND l.objid = 'kurier.event_position'::regclass::oid)
) h
LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = h.pid;

-- One row for a metric: how far read_all is held back.
--   last_position      the last position drawn
--   held_position      the lowest position held by an open appender (NULL: none)
--   unreadable_events  committed events at or above held_position (capped at 1,000,000)
--   holders            open appending transactions
--   oldest_holder_age_seconds  age of the oldest of them (0 when none)
CREATE FUNCTION kurier.event_horizon_lag(
    OUT last_position bigint, OUT held_position bigint, OUT unreadable_events bigint,
    OUT holders int, OUT oldest_holder_age_seconds double precision)
    LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
    SELECT min(h.position), count(*), coalesce(extract(epoch FROM max(h.xact_age)), 0)
    INTO held_position, holders, oldest_holder_age_seconds
    FROM kurier.event_horizon h
    WHERE h.pid IS DISTINCT FROM pg_backend_pid();
    last_position := coalesce(pg_sequence_last_value('kurier.event_position'), 0);
    SELECT count(*) INTO unreadable_events
    FROM (SELECT 1 FROM kurier.events e WHERE e.global_position >= held_position LIMIT 1000000) x;
END;
$fn$;

-- Snapshots: the latest per stream.
CREATE TABLE kurier.snapshots (
    stream         text        PRIMARY KEY,
    version        bigint      NOT NULL,
    state          jsonb       NOT NULL,
    schema_version int         NOT NULL DEFAULT 1,
    taken_at       timestamptz NOT NULL DEFAULT now()
);

-- Stores the state of `stream` as of `version`; returns true if stored,
-- false if a snapshot of a later version is already stored (older snapshots
-- never replace newer ones; the same version replaces, e.g. for a new
-- schema_version). Refuses (22023) a version the stream has not reached, and
-- (KU410) a version below the stream's erasure marker (that state held
-- erased data; the marker's own version and later are fine).
CREATE FUNCTION kurier.save_snapshot(stream text, version bigint, state jsonb, schema_version int DEFAULT 1)
    RETURNS boolean LANGUAGE plpgsql AS $fn$
DECLARE
    p_stream  text := save_snapshot.stream;
    p_version bigint := save_snapshot.version;
    cur       bigint;
    erased    bigint;
    n         int;
BEGIN
    IF p_stream IS NULL OR p_version IS NULL OR state IS NULL OR schema_version IS NULL THEN
        RAISE EXCEPTION 'kurier: save_snapshot needs stream, version, state and schema_version (stream %)', p_stream
            USING ERRCODE = '22004';
    END IF;
    -- KEY SHARE: does not wait for appenders, does wait for erase_stream.
    SELECT s.version, s.erased_version INTO cur, erased
    FROM kurier.streams s WHERE s.stream = p_stream FOR KEY SHARE;
    IF p_version < 0 OR p_version > coalesce(cur, -1) THEN
        RAISE EXCEPTION 'kurier: cannot snapshot stream % at version %: the stream is at version %',
            p_stream, p_version, coalesce(cur, -1)
            USING ERRCODE = '22023', HINT = 'snapshot a version the stream has reached';
    END IF;
    IF p_version < erased THEN
        RAISE EXCEPTION 'kurier: cannot snapshot stream % at version %: it was erased at version %',
            p_stream, p_version, erased
            USING ERRCODE = 'KU410', HINT = 'the state before an erasure must not be stored again';
    END IF;
    INSERT INTO kurier.snapshots AS t (stream, version, state, schema_version)
    VALUES (p_stream, p_version, state, schema_version)
    ON CONFLICT ON CONSTRAINT snapshots_pkey DO UPDATE
        SET version = EXCLUDED.version, state = EXCLUDED.state,
            schema_version = EXCLUDED.schema_version, taken_at = EXCLUDED.taken_at
        WHERE t.version <= EXCLUDED.version;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n > 0;
END;
$fn$;

-- The stream's snapshot: one row, or none.
CREATE FUNCTION kurier.load_snapshot(stream text) RETURNS SETOF kurier.snapshots
    LANGUAGE sql STABLE ROWS 1
    AS $fn$ SELECT * FROM kurier.snapshots s WHERE s.stream = $1 $fn$;

-- One row per erase_stream call. No personal data (the reason is free text
-- from the operator: keep it free of personal data too).
CREATE TABLE kurier.erasures (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream         text        NOT NULL,
    erased_at      timestamptz NOT NULL DEFAULT now(),
    reason         text        NOT NULL,
    -- The stream's version before the marker (the last erased version).
    last_version   bigint      NOT NULL,
    events_erased  bigint      NOT NULL,
    -- The version of the StreamErased marker event.
    marker_version bigint      NOT NULL
);
CREATE INDEX erasures_stream ON kurier.erasures (stream);

-- GDPR erasure: deletes the stream's events, its snapshot, its outbox rows
-- not yet published and its dead letters; records the erasure; appends a
-- data-free StreamErased marker (version = last version + 1, published like
-- any event) and then a tombstone (payload NULL, key = stream) so compacted
-- topics forget the key. Returns the number of events deleted. The stream
-- keeps its version counter: later appends continue after the marker.
-- A stream that does not exist: KU404.
CREATE FUNCTION kurier.erase_stream(stream text, reason text) RETURNS bigint
    LANGUAGE plpgsql AS $fn$
DECLARE
    p_stream text := erase_stream.stream;
    v        bigint;
    ids      uuid[];
    n        bigint;
    marker   bigint;
    tmpl     text;
    pub      boolean;
BEGIN
    IF p_stream IS NULL OR reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'kurier: erase_stream needs a stream and a reason (stream %)', coalesce(p_stream, 'NULL')
            USING ERRCODE = '22023', HINT = 'the reason is kept in kurier.erasures';
    END IF;
    -- FOR UPDATE: no append and no save_snapshot runs on this stream until we commit.
    SELECT s.version INTO v FROM kurier.streams s WHERE s.stream = p_stream FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'kurier: cannot erase stream %: it does not exist', p_stream
            USING ERRCODE = 'KU404', HINT = 'check the stream name (kurier.stream_version returns -1)';
    END IF;
    WITH d AS (DELETE FROM kurier.events e WHERE e.stream = p_stream RETURNING e.event_id)
    SELECT array_agg(d.event_id) INTO ids FROM d;
    n := coalesce(cardinality(ids), 0);
    DELETE FROM kurier.snapshots s WHERE s.stream = p_stream;
    IF n > 0 THEN
        -- Outbox rows still there are not published yet (the relay deletes
        -- what it published); rows the relay holds right now are waited for.
        DELETE FROM kurier.outbox o WHERE o.message_id = ANY (ids) AND o.key = p_stream;
        DELETE FROM kurier.dead_letters dl WHERE dl.message_id = ANY (ids) AND dl.key = p_stream;
    END IF;
    marker := kurier.append_one(p_stream, 'StreamErased', '{}'::jsonb, NULL, NULL, v, gen_random_uuid());
    UPDATE kurier.streams s SET erased_version = marker WHERE s.stream = p_stream;
    INSERT INTO kurier.erasures (stream, reason, last_version, events_erased, marker_version)
    VALUES (p_stream, reason, v, n, marker);
    SELECT st.topic_template, st.publish INTO tmpl, pub FROM kurier.event_store_settings st;
    IF pub THEN
        -- After the marker (higher outbox id): the key's last record is the tombstone.
        INSERT INTO kurier.outbox (topic, key, payload, payload_bytes, headers)
        VALUES (kurier.event_topic(tmpl, p_stream), p_stream, NULL, NULL, '{}'::jsonb);
    END IF;
    RETURN n;
END;
$fn$;

-- Crypto-shredding. Rust encrypts a subject's personal data with the
-- subject's key; forgetting the subject deletes the key, so every copy of the
-- ciphertext (events, Kafka topics, backups) becomes unreadable.
CREATE TABLE kurier.subject_keys (
    subject    text        PRIMARY KEY,
    key        bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- Subjects whose key was deleted: no new key is ever created for them.
CREATE TABLE kurier.forgotten_subjects (
    subject      text        PRIMARY KEY,
    forgotten_at timestamptz NOT NULL DEFAULT now()
);

-- The subject's key: the stored one, or new_key (stored now) if it has none.
-- A forgotten subject: KU410.
CREATE FUNCTION kurier.subject_key(subject text, new_key bytea) RETURNS bytea
    LANGUAGE plpgsql AS $fn$
DECLARE
    p_subject text := subject_key.subject;
    k         bytea;
BEGIN
    IF p_subject IS NULL THEN
        RAISE EXCEPTION 'kurier: subject_key needs a subject' USING ERRCODE = '22004';
    END IF;
    -- Fast path, no lock: a key being forgotten concurrently may still be
    -- returned, and whatever it encrypts is shredded with it.
    SELECT sk.key INTO k FROM kurier.subject_keys sk WHERE sk.subject = p_subject;
    IF FOUND THEN
        RETURN k;
    END IF;
    -- Serialise with forget_subject (and other creators) for this subject.
    PERFORM pg_advisory_xact_lock(1802859371, hashtext(p_subject));
    IF EXISTS (SELECT 1 FROM kurier.forgotten_subjects f WHERE f.subject = p_subject) THEN
        RAISE EXCEPTION 'kurier: subject % was forgotten; no key will be created for it', p_subject
            USING ERRCODE = 'KU410', HINT = 'its data is crypto-shredded; do not write new personal data for it';
    END IF;
    SELECT sk.key INTO k FROM kurier.subject_keys sk WHERE sk.subject = p_subject;
    IF FOUND THEN
        RETURN k;
    END IF;
    IF new_key IS NULL OR length(new_key) = 0 THEN
        RAISE EXCEPTION 'kurier: subject % has no key and new_key is empty', p_subject USING ERRCODE = '22023';
    END IF;
    INSERT INTO kurier.subject_keys (subject, key) VALUES (p_subject, new_key);
    RETURN new_key;
END;
$fn$;

-- Deletes the subject's key and records the subject as forgotten (for good).
-- Returns whether a key was deleted. Idempotent.
CREATE FUNCTION kurier.forget_subject(subject text) RETURNS boolean
    LANGUAGE plpgsql AS $fn$
DECLARE
    p_subject text := forget_subject.subject;
    n         int;
BEGIN
    IF p_subject IS NULL THEN
        RAISE EXCEPTION 'kurier: forget_subject needs a subject' USING ERRCODE = '22004';
    END IF;
    PERFORM pg_advisory_xact_lock(1802859371, hashtext(p_subject));
    INSERT INTO kurier.forgotten_subjects (subject) VALUES (p_subject) ON CONFLICT DO NOTHING;
    DELETE FROM kurier.subject_keys sk WHERE sk.subject = p_subject;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n > 0;
END;
$fn$;
