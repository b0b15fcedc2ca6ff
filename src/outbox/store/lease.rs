//! The lease tables' queries (`migrations/0003_relay_leases.sql`). The
//! policy — when to heartbeat, how many partitions to hold — is the
//! daemon's (`kurier_daemon::lease`); fencing is in the claim itself
//! ([`super::claim`]), which returns rows only of partitions whose lease
//! names the caller and is unexpired by the database clock.

use std::time::Duration;

use sqlx::PgConnection;

use crate::error::Error;
use crate::schema::SchemaName;

/// Lease partitions in a schema (fixed by the migration).
pub const PARTITIONS: usize = 32;

/// Takes the session advisory lock that marks an instance alive: it
/// vanishes with the connection when the process dies.
pub async fn hold_liveness_lock(conn: &mut PgConnection, lock: i64) -> Result<(), Error> {
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(lock)
        .execute(conn)
        .await?;
    Ok(())
}

/// Records a heartbeat of `owner`, then extends its unexpired leases by
/// `ttl` (expired ones are not revived). Returns the partitions renewed.
pub async fn renew(
    conn: &mut PgConnection,
    schema: &SchemaName,
    owner: &str,
    lock: i64,
    ttl: Duration,
) -> Result<Vec<i16>, Error> {
    sqlx::query(&schema.sql("INSERT INTO kurier.relay_instances (owner, owner_lock, heartbeat_at) VALUES ($1, $2, now()) \
         ON CONFLICT (owner) DO UPDATE SET heartbeat_at = now()"))
    .bind(owner)
    .bind(lock)
    .execute(&mut *conn)
    .await?;
    let renewed = sqlx::query_scalar(&schema.sql(
        "UPDATE kurier.relay_leases SET expires_at = now() + make_interval(secs => $2) \
         WHERE owner = $1 AND expires_at > now() RETURNING partition",
    ))
    .bind(owner)
    .bind(ttl.as_secs_f64())
    .fetch_all(conn)
    .await?;
    Ok(renewed)
}

/// Forgets instances silent for ten lease lifetimes, then counts the live
/// ones: heartbeat within `ttl` and their liveness lock still held.
pub async fn live_instances(
    conn: &mut PgConnection,
    schema: &SchemaName,
    ttl: Duration,
) -> Result<i64, Error> {
    let ttl_secs = ttl.as_secs_f64();
    sqlx::query(&schema.sql("DELETE FROM kurier.relay_instances WHERE heartbeat_at < now() - make_interval(secs => $1 * 10)"))
        .bind(ttl_secs)
        .execute(&mut *conn)
        .await?;
    let live = sqlx::query_scalar(&schema.sql(
        "SELECT count(*) FROM kurier.relay_instances \
         WHERE heartbeat_at > now() - make_interval(secs => $1) AND kurier.lock_held(owner_lock)",
    ))
    .bind(ttl_secs)
    .fetch_one(conn)
    .await?;
    Ok(live)
}

/// Gives up `partitions` held by `owner`.
pub async fn release(
    conn: &mut PgConnection,
    schema: &SchemaName,
    owner: &str,
    partitions: &[i16],
) -> Result<(), Error> {
    sqlx::query(&schema.sql("UPDATE kurier.relay_leases SET owner = NULL, owner_lock = NULL, expires_at = NULL WHERE owner = $1 AND partition = ANY($2)"))
        .bind(owner)
        .bind(partitions)
        .execute(conn)
        .await?;
    Ok(())
}

/// Takes up to `n` partitions that nobody holds (unowned, expired, or
/// owned by an instance whose liveness lock is gone). Returns them.
pub async fn take(
    conn: &mut PgConnection,
    schema: &SchemaName,
    owner: &str,
    lock: i64,
    ttl: Duration,
    n: usize,
) -> Result<Vec<i16>, Error> {
    let taken = sqlx::query_scalar(&schema.sql(
        "UPDATE kurier.relay_leases SET owner = $1, owner_lock = $2, epoch = epoch + 1, \
                expires_at = now() + make_interval(secs => $3) \
         WHERE partition IN (SELECT partition FROM kurier.relay_leases \
                             WHERE owner IS NULL OR expires_at IS NULL OR expires_at <= now() \
                                OR NOT kurier.lock_held(owner_lock) \
                             ORDER BY partition LIMIT $4 FOR UPDATE SKIP LOCKED) \
         RETURNING partition",
    ))
    .bind(owner)
    .bind(lock)
    .bind(ttl.as_secs_f64())
    .bind(n as i64)
    .fetch_all(conn)
    .await?;
    Ok(taken)
}

/// Gives every lease of `owner` back and forgets the instance (clean stop).
pub async fn release_all(
    conn: &mut PgConnection,
    schema: &SchemaName,
    owner: &str,
) -> Result<(), Error> {
    sqlx::query(&schema.sql("UPDATE kurier.relay_leases SET owner = NULL, owner_lock = NULL, expires_at = NULL WHERE owner = $1"))
        .bind(owner)
        .execute(&mut *conn)
        .await?;
    sqlx::query(&schema.sql("DELETE FROM kurier.relay_instances WHERE owner = $1"))
        .bind(owner)
        .execute(conn)
        .await?;
    Ok(())
}
