//! Keeping the outbox table in shape where autovacuum cannot (it is off, as
//! on some production clusters, or it lags): every row is inserted once and
//! deleted once, so without VACUUM the table only grows and every claim
//! walks more dead index entries.

use sqlx::{PgConnection, PgExecutor};

use crate::error::Error;
use crate::schema::SchemaName;

/// What PostgreSQL knows about the outbox table's upkeep.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct TableHealth {
    /// Live and dead rows as counted by the statistics system (`pg_stat_user_tables`).
    pub live_rows: i64,
    pub dead_rows: i64,
    /// Heap and index bytes.
    pub total_bytes: i64,
    /// Seconds since the last VACUUM (by anyone, autovacuum included); `None`: never.
    pub since_vacuum_secs: Option<f64>,
    /// Seconds since the last ANALYZE (by anyone); `None`: never.
    pub since_analyze_secs: Option<f64>,
    pub vacuum_count: i64,
    pub autovacuum_count: i64,
    /// Whether autovacuum can reach this table: `autovacuum` and
    /// `track_counts` on, and the table's `autovacuum_enabled` not false.
    pub autovacuum_reaches: bool,
    /// Whether the current role may VACUUM it (owner or superuser).
    pub may_vacuum: bool,
}

const HEALTH: &str = "SELECT coalesce(s.n_live_tup, 0) AS live_rows, coalesce(s.n_dead_tup, 0) AS dead_rows, \
       pg_total_relation_size(c.oid) AS total_bytes, \
       extract(epoch FROM now() - greatest(s.last_vacuum, s.last_autovacuum))::float8 AS since_vacuum_secs, \
       extract(epoch FROM now() - greatest(s.last_analyze, s.last_autoanalyze))::float8 AS since_analyze_secs, \
       coalesce(s.vacuum_count, 0) AS vacuum_count, coalesce(s.autovacuum_count, 0) AS autovacuum_count, \
       (current_setting('autovacuum')::bool AND current_setting('track_counts')::bool \
        AND NOT coalesce('autovacuum_enabled=false' = ANY(c.reloptions), false)) AS autovacuum_reaches, \
       (pg_has_role(current_user, c.relowner, 'USAGE') \
        OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)) AS may_vacuum \
     FROM pg_class c LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid \
     WHERE c.oid = 'kurier.outbox'::regclass";

/// The outbox table's upkeep figures.
pub async fn health<'e, E: PgExecutor<'e>>(
    executor: E,
    schema: &SchemaName,
) -> Result<TableHealth, Error> {
    let health = sqlx::query_as(&schema.sql(HEALTH))
        .fetch_one(executor)
        .await
        .map_err(Error::explained)?;
    Ok(health)
}

/// Dead rows of the outbox, as the statistics system counts them.
pub async fn dead_rows(conn: &mut PgConnection, schema: &SchemaName) -> Result<i64, Error> {
    let dead = sqlx::query_scalar(&schema.sql(
        "SELECT coalesce(n_dead_tup, 0) FROM pg_stat_user_tables WHERE relid = 'kurier.outbox'::regclass",
    ))
    .fetch_optional(conn)
    .await?;
    Ok(dead.unwrap_or(0))
}

/// `VACUUM (SKIP_LOCKED, ANALYZE)` of the outbox: frees the dead rows'
/// space for new inserts and refreshes the planner's statistics; skipped
/// (without waiting) while another vacuum holds the table. A role that may
/// not vacuum it (see [`TableHealth::may_vacuum`]) only gets a warning from
/// PostgreSQL, so check first. Must run outside
/// a transaction, on a connection of its own (it takes seconds on millions
/// of dead rows).
pub async fn vacuum(conn: &mut PgConnection, schema: &SchemaName) -> Result<(), Error> {
    sqlx::query(&schema.sql("VACUUM (SKIP_LOCKED, ANALYZE) kurier.outbox"))
        .execute(conn)
        .await?;
    Ok(())
}
