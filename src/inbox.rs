//! The inbox table: exactly-once *effects* on top of at-least-once delivery.
//!
//! A message ID is stored once per consumer (`UNIQUE (consumer, message_id)`),
//! and a handler's side effects commit in the same transaction that marks the
//! message processed. Two ways in:
//! - [`Processor`]: claims rows the daemon's inbox writer stored and runs a
//!   [`Handler`] on each, inside one transaction per batch (a savepoint per row);
//! - [`record_message`]: for services that consume Kafka themselves; records
//!   the ID in the caller's transaction and says whether it was new.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::future::BoxFuture;
use sqlx::{Acquire, PgConnection, PgExecutor, PgPool};

use tokio_util::sync::CancellationToken;

use crate::error::Error;

/// Records `message_id` as received and handled by `consumer`, inside the
/// caller's transaction. Returns `true` if this is the first time: do the work.
/// `false`: a duplicate, skip it. Concurrent callers with one ID: the second
/// waits for the first's transaction; exactly one of them sees `true` (unless
/// the first rolls back, in which case the second gets it).
pub async fn record_message<'e, E: PgExecutor<'e>>(
    executor: E,
    consumer: &str,
    message_id: &str,
) -> Result<bool, Error> {
    let inserted: Option<i64> = sqlx::query_scalar(
        "INSERT INTO kurier.inbox (consumer, message_id, processed_at, attempts) VALUES ($1, $2, now(), 1) \
         ON CONFLICT (consumer, message_id) DO NOTHING RETURNING id",
    )
    .bind(consumer)
    .bind(message_id)
    .fetch_optional(executor)
    .await?;
    Ok(inserted.is_some())
}

/// One stored message, as a handler sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InboxMessage {
    pub id: i64,
    pub message_id: String,
    pub topic: Option<String>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: serde_json::Value,
    /// Failed attempts so far.
    pub attempts: i32,
}

impl InboxMessage {
    /// The payload parsed as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(self.payload.as_deref().unwrap_or(b"null"))
    }

    pub fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
    }
}

/// An error a handler returns; the message is retried, then parked.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// Application code run once per message, on the transaction that will mark
/// it processed. Whatever it writes through `conn` commits or rolls back with
/// that mark.
pub trait Handler: Send + Sync {
    fn handle<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        msg: &'a InboxMessage,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

/// What one [`Processor::process_batch`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchReport {
    pub processed: usize,
    pub retried: usize,
    pub parked: usize,
}

impl BatchReport {
    pub fn claimed(&self) -> usize {
        self.processed + self.retried + self.parked
    }
}

/// Claims pending inbox rows of one consumer and runs a handler on each.
/// Several processors (threads, processes, languages) can share a consumer:
/// rows are claimed with `FOR UPDATE SKIP LOCKED`.
#[derive(Debug, Clone)]
pub struct Processor {
    pool: PgPool,
    consumer: String,
    batch_size: i64,
    max_attempts: i32,
    retry_min: Duration,
    retry_max: Duration,
    ordered: bool,
    poll_interval: Duration,
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

impl Processor {
    pub fn new(pool: PgPool, consumer: impl Into<String>) -> Self {
        Processor {
            pool,
            consumer: consumer.into(),
            batch_size: 20,
            max_attempts: 5,
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(60),
            ordered: false,
            poll_interval: Duration::from_millis(200),
        }
    }

    pub fn batch_size(mut self, n: u32) -> Self {
        self.batch_size = i64::from(n.max(1));
        self
    }

    /// Attempts before a message is parked (set aside for an operator).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1) as i32;
        self
    }

    /// Capped exponential backoff (with jitter) between attempts.
    pub fn retry(mut self, min: Duration, max: Duration) -> Self {
        (self.retry_min, self.retry_max) = (min, max.max(min));
        self
    }

    /// Handle each key's messages one at a time, in the order received.
    pub fn ordered(mut self, ordered: bool) -> Self {
        self.ordered = ordered;
        self
    }

    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = d;
        self
    }

    /// Claims one batch and handles it in one transaction, a savepoint per
    /// message: a failing handler's writes are undone and the failure recorded,
    /// the others commit with their processed marks.
    pub async fn process_batch<H: Handler + ?Sized>(
        &self,
        handler: &H,
    ) -> Result<BatchReport, Error> {
        let mut tx = self.pool.begin().await?;
        let claim = if self.ordered { CLAIM_ORDERED } else { CLAIM };
        let rows: Vec<InboxMessage> = sqlx::query_as(claim)
            .bind(&self.consumer)
            .bind(self.batch_size)
            .fetch_all(&mut *tx)
            .await?;
        let mut report = BatchReport::default();
        for msg in &rows {
            let mut savepoint = tx.begin().await?;
            match handler.handle(&mut savepoint, msg).await {
                Ok(()) => {
                    mark_processed(&mut savepoint, msg.id).await?;
                    savepoint.commit().await?;
                    report.processed += 1;
                }
                Err(e) => {
                    savepoint.rollback().await?;
                    let parked = self.record_failure(&mut tx, msg, &e.to_string()).await?;
                    if parked {
                        report.parked += 1;
                    } else {
                        report.retried += 1;
                    }
                }
            }
        }
        tx.commit().await?;
        metrics::counter!("kurier_inbox_processed_total", "consumer" => self.consumer.clone())
            .increment(report.processed as u64);
        metrics::counter!("kurier_inbox_parked_total", "consumer" => self.consumer.clone())
            .increment(report.parked as u64);
        Ok(report)
    }

    /// Processes until `cancel` fires; waits `poll_interval` when idle.
    pub async fn run<H: Handler + ?Sized>(
        &self,
        handler: &H,
        cancel: &CancellationToken,
    ) -> Result<(), Error> {
        while !cancel.is_cancelled() {
            let report = self.process_batch(handler).await?;
            if report.claimed() == 0 {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = tokio::time::sleep(self.poll_interval) => {}
                }
            }
        }
        Ok(())
    }

    /// Returns whether the message was parked.
    async fn record_failure(
        &self,
        conn: &mut PgConnection,
        msg: &InboxMessage,
        error: &str,
    ) -> Result<bool, Error> {
        let attempts = msg.attempts + 1;
        if attempts >= self.max_attempts {
            tracing::error!(consumer = %self.consumer, message_id = %msg.message_id, attempts, error, "handler keeps failing; message parked");
            sqlx::query("UPDATE kurier.inbox SET attempts = $2, last_error = $3, parked_at = now(), retry_at = NULL WHERE id = $1")
                .bind(msg.id)
                .bind(attempts)
                .bind(error)
                .execute(conn)
                .await?;
            return Ok(true);
        }
        let delay = ExponentialBuilder::default()
            .with_min_delay(self.retry_min)
            .with_max_delay(self.retry_max)
            .with_jitter()
            .without_max_times()
            .build()
            .nth(msg.attempts.max(0) as usize)
            .unwrap_or(self.retry_max);
        tracing::warn!(consumer = %self.consumer, message_id = %msg.message_id, attempts, retry_in = ?delay, error, "handler failed; will retry");
        sqlx::query("UPDATE kurier.inbox SET attempts = $2, last_error = $3, retry_at = now() + make_interval(secs => $4) WHERE id = $1")
            .bind(msg.id)
            .bind(attempts)
            .bind(error)
            .bind(delay.as_secs_f64())
            .execute(conn)
            .await?;
        Ok(false)
    }
}

async fn mark_processed(conn: &mut PgConnection, id: i64) -> Result<(), Error> {
    sqlx::query("UPDATE kurier.inbox SET processed_at = now(), attempts = attempts + 1, last_error = NULL, retry_at = NULL WHERE id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Puts parked messages of `consumer` back in line (all, or one by `id`).
pub async fn unpark(pool: &PgPool, consumer: &str, id: Option<i64>) -> Result<u64, Error> {
    let done = sqlx::query(
        "UPDATE kurier.inbox SET parked_at = NULL, attempts = 0, retry_at = NULL \
         WHERE consumer = $1 AND parked_at IS NOT NULL AND ($2::bigint IS NULL OR id = $2)",
    )
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

pub async fn status(pool: &PgPool) -> Result<Vec<ConsumerStatus>, Error> {
    let rows = sqlx::query_as(
        "WITH t AS (SELECT consumer, \
                count(*) FILTER (WHERE processed_at IS NULL AND parked_at IS NULL) AS pending, \
                count(*) FILTER (WHERE processed_at IS NOT NULL) AS processed, \
                count(*) FILTER (WHERE parked_at IS NOT NULL) AS parked, \
                extract(epoch FROM now() - min(received_at) FILTER (WHERE processed_at IS NULL AND parked_at IS NULL))::float8 AS oldest_pending_secs \
              FROM kurier.inbox GROUP BY consumer) \
         SELECT coalesce(t.consumer, s.consumer) AS consumer, coalesce(s.received, 0) AS received, coalesce(s.duplicates, 0) AS duplicates, \
                coalesce(t.pending, 0) AS pending, coalesce(t.processed, 0) AS processed, coalesce(t.parked, 0) AS parked, t.oldest_pending_secs \
         FROM t FULL JOIN kurier.inbox_stats s ON s.consumer = t.consumer ORDER BY 1",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// Retention: payloads of processed rows go after `prune_payload_after`, the
/// rows themselves (the dedup keys) after `forget_after`. Returns (pruned, deleted).
pub async fn prune(
    pool: &PgPool,
    prune_payload_after: Duration,
    forget_after: Duration,
) -> Result<(u64, u64), Error> {
    let deleted = sqlx::query(
        "DELETE FROM kurier.inbox WHERE id IN (SELECT id FROM kurier.inbox \
         WHERE processed_at < now() - make_interval(secs => $1) LIMIT 10000)",
    )
    .bind(forget_after.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected();
    let pruned = sqlx::query(
        "UPDATE kurier.inbox SET payload = NULL, headers = '{}' WHERE id IN (SELECT id FROM kurier.inbox \
         WHERE processed_at < now() - make_interval(secs => $1) AND (payload IS NOT NULL OR headers <> '{}') LIMIT 10000)",
    )
    .bind(prune_payload_after.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected();
    Ok((pruned, deleted))
}
