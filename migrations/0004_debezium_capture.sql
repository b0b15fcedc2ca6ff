-- Debezium-shape outbox tables (id, aggregatetype, aggregateid, type, payload)
-- keep working unchanged: `kurier migrate` puts an AFTER INSERT trigger on each
-- table named in config ([[debezium]]) that copies the row into kurier.outbox
-- in the same transaction, mapped as Debezium's outbox event router maps it:
--   topic   = TG_ARGV[0] with ${routedByValue} replaced by aggregatetype
--   key     = aggregateid
--   value   = payload (jsonb/json as JSON text; text or bytea as its bytes)
--   headers = id (the event id) and type
-- The trigger fires on INSERT, so the common "insert then delete at once"
-- idiom of Debezium users is captured too.
CREATE FUNCTION kurier.debezium_capture() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    value_json  jsonb;
    value_bytes bytea;
BEGIN
    IF NEW.aggregatetype IS NULL THEN
        RAISE EXCEPTION 'kurier: row % of %.% has no aggregatetype, which names its topic',
            NEW.id, TG_TABLE_SCHEMA, TG_TABLE_NAME
            USING HINT = 'set aggregatetype; the topic is ' || TG_ARGV[0]
                         || ' with ${routedByValue} replaced by it';
    END IF;
    IF pg_typeof(NEW.payload) IN ('jsonb'::regtype, 'json'::regtype) THEN
        value_json := to_jsonb(NEW.payload);
    ELSIF pg_typeof(NEW.payload) = 'bytea'::regtype THEN
        value_bytes := NEW.payload;
    ELSIF NEW.payload IS NOT NULL THEN
        value_bytes := convert_to(NEW.payload::text, 'UTF8');
    END IF;
    INSERT INTO kurier.outbox (message_id, topic, key, payload, payload_bytes, headers)
    VALUES (
        CASE WHEN pg_typeof(NEW.id) = 'uuid'::regtype THEN NEW.id::text::uuid ELSE gen_random_uuid() END,
        replace(TG_ARGV[0], '${routedByValue}', NEW.aggregatetype::text),
        NEW.aggregateid::text,
        value_json,
        value_bytes,
        jsonb_strip_nulls(jsonb_build_object('id', NEW.id::text, 'type', NEW.type::text)));
    RETURN NULL;
END;
$$;
