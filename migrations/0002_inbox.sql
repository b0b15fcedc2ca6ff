-- Kurier inbox: messages received from Kafka, deduplicated per consumer by message ID.
-- The daemon's inbox writer fills it; applications claim rows with
-- FOR UPDATE SKIP LOCKED and mark them processed in their own transaction.

CREATE TABLE kurier.inbox (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer     text        NOT NULL,
    -- From the `message-id` header; from other producers it need not be a UUID.
    message_id   text        NOT NULL,
    -- Where it came from. NULL for IDs recorded by kurier::inbox::record_message.
    topic        text,
    "partition"  integer,
    "offset"     bigint,
    key          bytea,
    -- The record value, bytes as received (NULL: tombstone, or pruned after processing).
    -- JSON: kurier.payload_json(payload), computed on read, not stored twice.
    payload      bytea,
    headers      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    received_at  timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz,
    attempts     integer     NOT NULL DEFAULT 0,
    last_error   text,
    retry_at     timestamptz,
    -- Set when a handler kept failing; a parked row is not claimed again until unparked.
    parked_at    timestamptz,
    CONSTRAINT inbox_dedup UNIQUE (consumer, message_id)
);

-- Claims: pending rows of one consumer, oldest first.
CREATE INDEX inbox_pending ON kurier.inbox (consumer, id)
    WHERE processed_at IS NULL AND parked_at IS NULL;
-- Retention: processed rows by age.
CREATE INDEX inbox_processed ON kurier.inbox (processed_at)
    WHERE processed_at IS NOT NULL;

ALTER TABLE kurier.inbox SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_analyze_scale_factor = 0.01,
    autovacuum_vacuum_cost_delay = 0,
    fillfactor = 80
);

-- Per-consumer counters kept by the inbox writer, for the operator view.
CREATE TABLE kurier.inbox_stats (
    consumer   text   PRIMARY KEY,
    received   bigint NOT NULL DEFAULT 0,
    duplicates bigint NOT NULL DEFAULT 0
);

-- The payload as jsonb, for JSON messages (errors if the bytes are not JSON).
CREATE FUNCTION kurier.payload_json(payload bytea) RETURNS jsonb
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT convert_from(payload, 'UTF8')::jsonb $$;
