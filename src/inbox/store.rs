//! Every query on the inbox tables (`kurier.inbox`, `kurier.inbox_stats`),
//! written against schema `kurier` and run in the configured schema with its
//! name in place ([`SchemaName::sql`]): the daemon's batch insert, the
//! processor's claim and marks, `record_message`, and the operator's status,
//! unpark and retention.

use std::time::Duration;

use sqlx::{PgConnection, PgExecutor, PgPool};

use super::InboxMessage;
use crate::error::Error;
use crate::schema::SchemaName;

/// A record as received from Kafka, ready to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub message_id: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// Kafka headers as a JSON object (see the README's inbox columns).
    pub headers: serde_json::Value,
}

/// One statement (so one round trip, its own transaction): the batch in
/// receive order, so `id` order is partition order within a batch, IDs
/// already stored for the consumer dropped, and the consumer's counters.
/// Returns the rows inserted.
const STORE_BATCH: &str = "WITH ins AS ( \
       INSERT INTO kurier.inbox (consumer, message_id, topic, \"partition\", \"offset\", key, payload, headers) \
       SELECT $1, m, t, p, o, k, v, h FROM unnest($2::text[], $3::text[], $4::int[], $5::bigint[], $6::bytea[], $7::bytea[], $8::jsonb[]) \
         WITH ORDINALITY AS u(m, t, p, o, k, v, h, n) ORDER BY n \
       ON CONFLICT (consumer, message_id) DO NOTHING RETURNING 1) \
     INSERT INTO kurier.inbox_stats AS s (consumer, received, duplicates) \
     SELECT $1, count(*), $9 - count(*) FROM ins \
     ON CONFLICT (consumer) DO UPDATE SET received = s.received + excluded.received, duplicates = s.duplicates + excluded.duplicates \
     RETURNING (SELECT count(*) FROM ins)";

/// Stores a batch atomically: the new rows (IDs already stored for
/// `consumer` are dropped) and the consumer's counters. Returns rows inserted.
pub async fn insert_batch(
    pool: &PgPool,
    schema: &SchemaName,
    consumer: &str,
    batch: &[NewMessage],
) -> Result<u64, Error> {
    let inserted: i64 = sqlx::query_scalar(&schema.sql(STORE_BATCH))
        .bind(consumer)
        .bind(
            batch
                .iter()
                .map(|r| r.message_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(batch.iter().map(|r| r.topic.as_str()).collect::<Vec<_>>())
        .bind(batch.iter().map(|r| r.partition).collect::<Vec<_>>())
        .bind(batch.iter().map(|r| r.offset).collect::<Vec<_>>())
        .bind(batch.iter().map(|r| r.key.as_deref()).collect::<Vec<_>>())
        .bind(
            batch
                .iter()
                .map(|r| r.payload.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(batch.iter().map(|r| &r.headers).collect::<Vec<_>>())
        .bind(batch.len() as i64)
        .fetch_one(pool)
        .await
        .map_err(Error::explained)?;
    Ok(inserted as u64)
}

/// Records `message_id` as received and handled by `consumer`; `true` if new.
pub async fn record<'e, E: PgExecutor<'e>>(
    executor: E,
    schema: &SchemaName,
    consumer: &str,
    message_id: &str,
) -> Result<bool, Error> {
    let inserted: Option<i64> = sqlx::query_scalar(&schema.sql(
        "INSERT INTO kurier.inbox (consumer, message_id, processed_at, attempts) VALUES ($1, $2, now(), 1) \
         ON CONFLICT (consumer, message_id) DO NOTHING RETURNING id",
    ))
    .bind(consumer)
    .bind(message_id)
    .fetch_optional(executor)
    .await?;
    Ok(inserted.is_some())
}

/// Removes what [`record`] stored, in the same transaction (a handled
/// message that turned out to change nothing may be handled again).
pub async fn forget<'e, E: PgExecutor<'e>>(
    executor: E,
    schema: &SchemaName,
    consumer: &str,
    message_id: &str,
) -> Result<(), Error> {
    sqlx::query(&schema.sql("DELETE FROM kurier.inbox WHERE consumer = $1 AND message_id = $2"))
        .bind(consumer)
        .bind(message_id)
        .execute(executor)
        .await?;
    Ok(())
}

/// Oldest pending rows first, skipping rows other processors hold.
pub const CLAIM: &str = "SELECT id, message_id, topic, \"partition\" AS partition, \"offset\" AS offset, key, payload, headers, attempts \
     FROM kurier.inbox i \
     WHERE consumer = $1 AND processed_at IS NULL AND parked_at IS NULL \
       AND (retry_at IS NULL OR retry_at <= now()) \
     ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED";

/// Per-key order: a row is claimable only when no older row of its key is
/// still pending (being handled, or waiting for a retry). Rows without a key
/// carry no order and never wait. A parked row stops holding its key back.
pub const CLAIM_ORDERED: &str = "SELECT id, message_id, topic, \"partition\" AS partition, \"offset\" AS offset, key, payload, headers, attempts \
     FROM kurier.inbox i \
     WHERE consumer = $1 AND processed_at IS NULL AND parked_at IS NULL \
       AND (retry_at IS NULL OR retry_at <= now()) \
       AND NOT EXISTS (SELECT 1 FROM kurier.inbox e WHERE e.consumer = i.consumer AND e.key = i.key \
                       AND e.processed_at IS NULL AND e.parked_at IS NULL AND e.id < i.id) \
     ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED";

/// Claims up to `limit` pending rows of `consumer` on `conn` (a transaction).
pub async fn claim(
    conn: &mut PgConnection,
    schema: &SchemaName,
    consumer: &str,
    limit: i64,
    ordered: bool,
) -> Result<Vec<InboxMessage>, Error> {
    let sql = schema.sql(if ordered { CLAIM_ORDERED } else { CLAIM });
    let rows = sqlx::query_as(&sql)
        .bind(consumer)
        .bind(limit)
        .fetch_all(conn)
        .await?;
    Ok(rows)
}

/// Marks row `id` handled (in the handler's transaction).
pub async fn mark_processed(
    conn: &mut PgConnection,
    schema: &SchemaName,
    id: i64,
) -> Result<(), Error> {
    sqlx::query(&schema.sql("UPDATE kurier.inbox SET processed_at = now(), attempts = attempts + 1, last_error = NULL, retry_at = NULL WHERE id = $1"))
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Records a failed attempt; the row is claimable again after `delay`.
pub async fn schedule_retry(
    conn: &mut PgConnection,
    schema: &SchemaName,
    id: i64,
    attempts: i32,
    error: &str,
    delay: Duration,
) -> Result<(), Error> {
    sqlx::query(&schema.sql("UPDATE kurier.inbox SET attempts = $2, last_error = $3, retry_at = now() + make_interval(secs => $4) WHERE id = $1"))
        .bind(id)
        .bind(attempts)
        .bind(error)
        .bind(delay.as_secs_f64())
        .execute(conn)
        .await?;
    Ok(())
}

/// Sets a row aside for an operator (it is not claimed until unparked).
pub async fn park(
    conn: &mut PgConnection,
    schema: &SchemaName,
    id: i64,
    attempts: i32,
    error: &str,
) -> Result<(), Error> {
    sqlx::query(&schema.sql("UPDATE kurier.inbox SET attempts = $2, last_error = $3, parked_at = now(), retry_at = NULL WHERE id = $1"))
        .bind(id)
        .bind(attempts)
        .bind(error)
        .execute(conn)
        .await?;
    Ok(())
}

/// Puts parked messages of `consumer` back in line (all, or one by `id`).
pub async fn unpark(
    pool: &PgPool,
    schema: &SchemaName,
    consumer: &str,
    id: Option<i64>,
) -> Result<u64, Error> {
    let done = sqlx::query(&schema.sql(
        "UPDATE kurier.inbox SET parked_at = NULL, attempts = 0, retry_at = NULL \
         WHERE consumer = $1 AND parked_at IS NOT NULL AND ($2::bigint IS NULL OR id = $2)",
    ))
    .bind(consumer)
    .bind(id)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Per-consumer counts for operators (`kurier inbox status`).
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct ConsumerStatus {
    pub consumer: String,
    /// Messages the inbox writer inserted (new IDs).
    pub received: i64,
    /// Messages the inbox writer dropped as already stored.
    pub duplicates: i64,
    pub pending: i64,
    pub processed: i64,
    pub parked: i64,
    /// Seconds since the oldest pending message arrived.
    pub oldest_pending_secs: Option<f64>,
}

pub async fn status(pool: &PgPool, schema: &SchemaName) -> Result<Vec<ConsumerStatus>, Error> {
    let rows = sqlx::query_as(&schema.sql(
        "WITH t AS (SELECT consumer, \
                count(*) FILTER (WHERE processed_at IS NULL AND parked_at IS NULL) AS pending, \
                count(*) FILTER (WHERE processed_at IS NOT NULL) AS processed, \
                count(*) FILTER (WHERE parked_at IS NOT NULL) AS parked, \
                extract(epoch FROM now() - min(received_at) FILTER (WHERE processed_at IS NULL AND parked_at IS NULL))::float8 AS oldest_pending_secs \
              FROM kurier.inbox GROUP BY consumer) \
         SELECT coalesce(t.consumer, s.consumer) AS consumer, coalesce(s.received, 0) AS received, coalesce(s.duplicates, 0) AS duplicates, \
                coalesce(t.pending, 0) AS pending, coalesce(t.processed, 0) AS processed, coalesce(t.parked, 0) AS parked, t.oldest_pending_secs \
         FROM t FULL JOIN kurier.inbox_stats s ON s.consumer = t.consumer ORDER BY 1",
    ))
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// Retention: payloads of processed rows go after `prune_payload_after`, the
/// rows themselves (the dedup keys) after `forget_after`. Returns (pruned, deleted).
pub async fn prune(
    pool: &PgPool,
    schema: &SchemaName,
    prune_payload_after: Duration,
    forget_after: Duration,
) -> Result<(u64, u64), Error> {
    let deleted = sqlx::query(&schema.sql(
        "DELETE FROM kurier.inbox WHERE id IN (SELECT id FROM kurier.inbox \
         WHERE processed_at < now() - make_interval(secs => $1) LIMIT 10000)",
    ))
    .bind(forget_after.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected();
    let pruned = sqlx::query(&schema.sql(
        "UPDATE kurier.inbox SET payload = NULL, headers = '{}' WHERE id IN (SELECT id FROM kurier.inbox \
         WHERE processed_at < now() - make_interval(secs => $1) AND (payload IS NOT NULL OR headers <> '{}') LIMIT 10000)",
    ))
    .bind(prune_payload_after.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected();
    Ok((pruned, deleted))
}
