-- Kurier outbox schema. Applications write here inside their own transaction:
--   INSERT INTO kurier.outbox (topic, key, payload, headers) VALUES (...);
-- Everything the relay needs beyond those four columns has a default.

CREATE TABLE kurier.outbox (
    -- Insert order, used only to order rows whose transactions did not overlap.
    -- It is never used as a cursor: identity values are assigned at insert,
    -- not at commit (the "sequence gap" trap); rows are claimed by state.
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id    uuid        NOT NULL DEFAULT gen_random_uuid(),
    topic         text        NOT NULL,
    key           text,
    -- JSON payload; published as its JSON text. NULL (with payload_bytes NULL) = tombstone.
    payload       jsonb,
    -- Binary payload (Avro, Protobuf, ...), published as raw bytes.
    payload_bytes bytea,
    headers       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- Per-row failure bookkeeping, written only by the relay.
    attempts      integer     NOT NULL DEFAULT 0,
    last_error    text,
    retry_at      timestamptz,
    CONSTRAINT outbox_one_payload CHECK (payload IS NULL OR payload_bytes IS NULL),
    CONSTRAINT outbox_headers_object CHECK (jsonb_typeof(headers) = 'object'),
    CONSTRAINT outbox_topic_not_empty CHECK (topic <> '')
);

-- A queue table: every row is inserted once and deleted once, so dead tuples
-- pile up fast. Vacuum after a fixed number of dead rows instead of a fraction
-- of the table, and do not throttle it.
ALTER TABLE kurier.outbox SET (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0.0,
    autovacuum_vacuum_insert_threshold = 5000,
    autovacuum_analyze_scale_factor = 0.0,
    autovacuum_analyze_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0,
    fillfactor = 90
);

-- Rows waiting for a retry hold back later rows of the same topic and key.
-- The relay's claim query probes this (usually empty) index.
CREATE INDEX outbox_retrying ON kurier.outbox (topic, key, id) WHERE retry_at IS NOT NULL;

-- Rows that could not be published: a permanent error, or the retry budget spent.
CREATE TABLE kurier.dead_letters (
    id            bigint      PRIMARY KEY,
    message_id    uuid        NOT NULL,
    topic         text        NOT NULL,
    key           text,
    payload       jsonb,
    payload_bytes bytea,
    headers       jsonb       NOT NULL,
    created_at    timestamptz NOT NULL,
    attempts      integer     NOT NULL,
    error         text        NOT NULL,
    failed_at     timestamptz NOT NULL DEFAULT now()
);

-- Optional wake-up. The relay LISTENs on channel kurier_outbox and also polls,
-- so this trigger is never required. It is not installed by default because a
-- transaction that ran NOTIFY takes a cluster-wide lock at commit (see README,
-- "Wake-up"). Opt in with:
--   CREATE TRIGGER outbox_notify AFTER INSERT ON kurier.outbox
--     FOR EACH STATEMENT EXECUTE FUNCTION kurier.notify_outbox();
CREATE FUNCTION kurier.notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('kurier_outbox', '');
    RETURN NULL;
END;
$$;
