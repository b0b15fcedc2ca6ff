-- Several relays on one outbox: rows are split into 32 lease partitions by a
-- hash of (topic, key), so all rows of one key are in one partition, and each
-- partition is owned by at most one relay at a time (kurier.relay_leases).

ALTER TABLE kurier.outbox ADD COLUMN lease_partition smallint
    GENERATED ALWAYS AS (((hashtextextended(topic || E'\x1f' || coalesce(key, ''), 0) % 32 + 32) % 32)::smallint) STORED;
CREATE INDEX outbox_lease_partition ON kurier.outbox (lease_partition, id);

-- A relay instance: alive while it heartbeats AND its session holds the
-- advisory lock `owner_lock` (a killed process's lock vanishes with its connection).
CREATE TABLE kurier.relay_instances (
    owner        text        PRIMARY KEY,
    owner_lock   bigint      NOT NULL,
    heartbeat_at timestamptz NOT NULL
);

CREATE TABLE kurier.relay_leases (
    partition   smallint    PRIMARY KEY,
    owner       text,
    owner_lock  bigint,
    -- Bumped on every change of owner.
    epoch       bigint      NOT NULL DEFAULT 0,
    expires_at  timestamptz
);
INSERT INTO kurier.relay_leases (partition) SELECT generate_series(0, 31);

-- Is the session that took advisory lock `lock` (in this database) still connected?
CREATE FUNCTION kurier.lock_held(lock bigint) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND ((l.classid::bigint << 32) | l.objid::bigint) = lock)
$$;
