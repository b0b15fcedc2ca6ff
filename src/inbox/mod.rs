//! The inbox table: exactly-once *effects* on top of at-least-once delivery.
//!
//! A message ID is stored once per consumer (`UNIQUE (consumer, message_id)`),
//! and a handler's side effects commit in the same transaction that marks the
//! message processed. Two ways in:
//! - [`Processor`]: claims rows the daemon's inbox writer stored and runs a
//!   [`Handler`] on each, inside one transaction per batch (a savepoint per row);
//! - [`record_message`]: for services that consume Kafka themselves; records
//!   the ID in the caller's transaction and says whether it was new.
//!
//! The SQL (also for the daemon's inbox writer and the operator commands) is
//! in [`store`].

pub mod store;

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::future::BoxFuture;
use sqlx::{Acquire, PgConnection, PgExecutor, PgPool};

use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::schema::SchemaName;

pub use store::{ConsumerStatus, NewMessage, CLAIM, CLAIM_ORDERED};

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
    store::record(executor, &SchemaName::kurier(), consumer, message_id).await
}

/// [`record_message`] in the inbox of another Kurier schema.
pub async fn record_message_in<'e, E: PgExecutor<'e>>(
    executor: E,
    schema: &SchemaName,
    consumer: &str,
    message_id: &str,
) -> Result<bool, Error> {
    store::record(executor, schema, consumer, message_id).await
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
    schema: SchemaName,
    consumer: String,
    batch_size: i64,
    max_attempts: i32,
    retry_min: Duration,
    retry_max: Duration,
    ordered: bool,
    poll_interval: Duration,
}

impl Processor {
    pub fn new(pool: PgPool, consumer: impl Into<String>) -> Self {
        Processor {
            pool,
            schema: SchemaName::kurier(),
            consumer: consumer.into(),
            batch_size: 20,
            max_attempts: 5,
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(60),
            ordered: false,
            poll_interval: Duration::from_millis(200),
        }
    }

    /// The Kurier schema whose inbox to consume (default `kurier`).
    pub fn schema(mut self, schema: SchemaName) -> Self {
        self.schema = schema;
        self
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
        let rows = store::claim(
            &mut tx,
            &self.schema,
            &self.consumer,
            self.batch_size,
            self.ordered,
        )
        .await?;
        let mut report = BatchReport::default();
        for msg in &rows {
            let mut savepoint = tx.begin().await?;
            match handler.handle(&mut savepoint, msg).await {
                Ok(()) => {
                    store::mark_processed(&mut savepoint, &self.schema, msg.id).await?;
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
            store::park(conn, &self.schema, msg.id, attempts, error).await?;
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
        store::schedule_retry(conn, &self.schema, msg.id, attempts, error, delay).await?;
        Ok(false)
    }
}
