//! Backlog counts of one schema's outbox, for `kurier status` and `/metrics`.

use sqlx::PgPool;

use super::maintenance::TableHealth;
use crate::error::Error;
use crate::schema::SchemaName;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub schema: String,
    /// Rows waiting to be published.
    pub pending: i64,
    /// Seconds since the oldest pending row was written.
    pub oldest_pending_secs: Option<f64>,
    /// Rows waiting for a retry after a failed attempt.
    pub retrying: i64,
    pub per_topic: Vec<TopicCount>,
    pub dead_letters: i64,
    pub leases: Vec<LeaseOwner>,
    /// Dead rows, size and vacuum state of the table (`kurier status` only).
    pub table: Option<TableHealth>,
}

#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct TopicCount {
    pub topic: String,
    pub pending: i64,
}

/// Partitions held per live relay instance.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct LeaseOwner {
    pub owner: String,
    pub partitions: i64,
    /// Seconds until the soonest of its leases expires without a heartbeat.
    pub expires_in_secs: f64,
}

/// Backlog of one schema's outbox: (pending rows, seconds since the oldest
/// was written, rows waiting for a retry).
async fn backlog(pool: &PgPool, schema: &SchemaName) -> Result<(i64, Option<f64>, i64), Error> {
    Ok(sqlx::query_as(&schema.sql(
        "SELECT count(*), extract(epoch FROM now() - min(created_at))::float8, count(*) FILTER (WHERE retry_at IS NOT NULL) FROM kurier.outbox",
    ))
    .fetch_one(pool)
    .await?)
}

/// The counts of [`Status`] without the per-topic and lease lists.
pub async fn outbox_counts(pool: &PgPool, schema: &SchemaName) -> Result<Status, Error> {
    let (pending, oldest_pending_secs, retrying) = backlog(pool, schema).await?;
    let dead_letters = sqlx::query_scalar(&schema.sql("SELECT count(*) FROM kurier.dead_letters"))
        .fetch_one(pool)
        .await?;
    Ok(Status {
        schema: schema.to_string(),
        pending,
        oldest_pending_secs,
        retrying,
        per_topic: Vec::new(),
        dead_letters,
        leases: Vec::new(),
        table: None,
    })
}

pub async fn outbox(pool: &PgPool, schema: &SchemaName) -> Result<Status, Error> {
    let counts = outbox_counts(pool, schema).await?;
    let per_topic = sqlx::query_as(&schema.sql("SELECT topic, count(*) AS pending FROM kurier.outbox GROUP BY topic ORDER BY 2 DESC, 1 LIMIT 50")).fetch_all(pool).await?;
    let leases = sqlx::query_as(&schema.sql(
        "SELECT owner, count(*) AS partitions, extract(epoch FROM min(expires_at) - now())::float8 AS expires_in_secs \
         FROM kurier.relay_leases WHERE owner IS NOT NULL AND expires_at > now() GROUP BY owner ORDER BY owner",
    ))
    .fetch_all(pool)
    .await?;
    Ok(Status {
        per_topic,
        leases,
        table: Some(super::maintenance::health(pool, schema).await?),
        ..counts
    })
}
