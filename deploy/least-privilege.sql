-- Least-privilege roles for Kurier. Run as the schema owner after `kurier migrate`,
-- in each database Kurier uses (roles are created once per cluster).
-- Passwords are set separately (ALTER ROLE ... PASSWORD) or use your usual auth.

-- The daemon: relay (outbox -> Kafka) and inbox writer (Kafka -> inbox).
DO $$ BEGIN CREATE ROLE kurier_relay LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
GRANT USAGE ON SCHEMA kurier TO kurier_relay;
GRANT SELECT, INSERT, UPDATE, DELETE ON kurier.outbox, kurier.dead_letters,
      kurier.relay_leases, kurier.relay_instances, kurier.inbox, kurier.inbox_stats TO kurier_relay;
GRANT SELECT ON kurier._sqlx_migrations TO kurier_relay;
GRANT EXECUTE ON FUNCTION kurier.lock_held(bigint), kurier.payload_json(bytea) TO kurier_relay;
-- lock_held reads pg_locks, which every role may read.

-- An application that writes to the outbox and consumes its inbox.
DO $$ BEGIN CREATE ROLE kurier_app NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
GRANT USAGE ON SCHEMA kurier TO kurier_app;
GRANT INSERT ON kurier.outbox TO kurier_app;
GRANT SELECT, INSERT, UPDATE ON kurier.inbox TO kurier_app;
GRANT EXECUTE ON FUNCTION kurier.payload_json(bytea) TO kurier_app;
-- GRANT kurier_app TO your_service_role;

-- Debezium-shape tables: the capture trigger runs with the inserting role's
-- rights, so that role needs INSERT on the outbox (kurier_app has it) and
-- EXECUTE on kurier.debezium_capture() (PUBLIC has it unless revoked).
-- Other Kurier schemas (relay.schemas): run this file again with the schema
-- name in place of `kurier.`/`SCHEMA kurier`, e.g.
--   sed 's/kurier\./tenant_a./g; s/SCHEMA kurier/SCHEMA tenant_a/g' least-privilege.sql | psql
