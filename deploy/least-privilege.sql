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
-- The saga orchestrator and the SQL projection runner (the daemon runs both
-- by default; [sagas] / [projections] enabled = false if this role should not).
GRANT SELECT, INSERT, UPDATE, DELETE ON kurier.sagas, kurier.saga_types, kurier.saga_events,
      kurier.saga_timers, kurier.projections, kurier.projection_events TO kurier_relay;
GRANT SELECT ON kurier.events, kurier.streams, kurier.erasures TO kurier_relay;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA kurier TO kurier_relay;
-- A SQL projection's handler runs with the daemon's rights: grant kurier_relay
-- what the handler writes (its read-model tables), or make the handler
-- SECURITY DEFINER.

-- An application that writes to the outbox and consumes its inbox.
DO $$ BEGIN CREATE ROLE kurier_app NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
GRANT USAGE ON SCHEMA kurier TO kurier_app;
GRANT INSERT ON kurier.outbox TO kurier_app;
GRANT SELECT, INSERT, UPDATE ON kurier.inbox TO kurier_app;
GRANT EXECUTE ON FUNCTION kurier.payload_json(bytea) TO kurier_app;
-- The event store and sagas, from the application's transactions.
GRANT SELECT, INSERT, UPDATE, DELETE ON kurier.events, kurier.streams, kurier.snapshots,
      kurier.erasures, kurier.subject_keys, kurier.forgotten_subjects, kurier.sagas,
      kurier.saga_events, kurier.saga_timers, kurier.projections, kurier.projection_events TO kurier_app;
GRANT SELECT ON kurier.saga_types, kurier.event_store_settings TO kurier_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA kurier TO kurier_app;
-- GRANT kurier_app TO your_service_role;

-- Debezium-shape tables: the capture trigger runs with the inserting role's
-- rights, so that role needs INSERT on the outbox (kurier_app has it) and
-- EXECUTE on kurier.debezium_capture() (PUBLIC has it unless revoked).
-- Other Kurier schemas (relay.schemas): run this file again with the schema
-- name in place of `kurier.`/`SCHEMA kurier`, e.g.
--   sed 's/kurier\./tenant_a./g; s/SCHEMA kurier/SCHEMA tenant_a/g' least-privilege.sql | psql
