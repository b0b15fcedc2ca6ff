//! `kurier.dead_letters`: outbox rows that cannot be published (a permanent
//! error, or the retry budget spent), kept with their reason until an
//! operator retries or discards them.

use sqlx::{PgConnection, PgPool};

use crate::error::Error;
use crate::schema::SchemaName;

/// Moves outbox row `id` aside with `error`, in one statement (so it is in
/// exactly one of the two tables at any instant).
pub async fn bury(
    conn: &mut PgConnection,
    schema: &SchemaName,
    id: i64,
    error: &str,
) -> Result<(), Error> {
    sqlx::query(&schema.sql(
        "WITH gone AS (DELETE FROM kurier.outbox WHERE id = $1 RETURNING *) \
         INSERT INTO kurier.dead_letters \
           (id, message_id, topic, key, payload, payload_bytes, headers, created_at, attempts, error) \
         SELECT id, message_id, topic, key, payload, payload_bytes, headers, created_at, attempts + 1, $2 FROM gone",
    ))
    .bind(id)
    .bind(error)
    .execute(conn)
    .await?;
    Ok(())
}

/// A dead letter as operators see it.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct DeadLetter {
    pub id: i64,
    pub message_id: uuid::Uuid,
    pub topic: String,
    pub key: Option<String>,
    /// Payload size in bytes (JSON text or binary).
    pub payload_size: Option<i32>,
    pub attempts: i32,
    pub error: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub failed_at: String,
}

pub async fn list(
    pool: &PgPool,
    schema: &SchemaName,
    limit: i64,
) -> Result<Vec<DeadLetter>, Error> {
    let rows = sqlx::query_as(&schema.sql(
        "SELECT id, message_id, topic, key, coalesce(octet_length(payload::text), octet_length(payload_bytes)) AS payload_size, \
                attempts, error, \
                to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS created_at, \
                to_char(failed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS failed_at \
         FROM kurier.dead_letters ORDER BY id LIMIT $1",
    ))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// Which dead letters an operation applies to.
#[derive(Debug, Clone)]
pub enum Selection {
    All,
    Ids(Vec<i64>),
}

impl Selection {
    fn ids(&self) -> Option<Vec<i64>> {
        match self {
            Selection::All => None,
            Selection::Ids(ids) => Some(ids.clone()),
        }
    }
}

/// Puts dead letters back into the outbox with their message ID (consumers
/// that dedup by `message-id` stay safe). They get new outbox ids, so they are
/// published after rows of their key that were written meanwhile.
pub async fn retry(pool: &PgPool, schema: &SchemaName, which: &Selection) -> Result<u64, Error> {
    let moved = sqlx::query(&schema.sql(
        "WITH gone AS (DELETE FROM kurier.dead_letters WHERE $1::bigint[] IS NULL OR id = ANY($1) RETURNING *) \
         INSERT INTO kurier.outbox (message_id, topic, key, payload, payload_bytes, headers, created_at) \
         SELECT message_id, topic, key, payload, payload_bytes, headers, created_at FROM gone ORDER BY id",
    ))
    .bind(which.ids())
    .execute(pool)
    .await?;
    Ok(moved.rows_affected())
}

/// Deletes dead letters for good.
pub async fn discard(pool: &PgPool, schema: &SchemaName, which: &Selection) -> Result<u64, Error> {
    let sql =
        schema.sql("DELETE FROM kurier.dead_letters WHERE $1::bigint[] IS NULL OR id = ANY($1)");
    let gone = sqlx::query(&sql).bind(which.ids()).execute(pool).await?;
    Ok(gone.rows_affected())
}
