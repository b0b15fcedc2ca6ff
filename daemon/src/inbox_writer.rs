//! The daemon's Kafka → inbox writer.
//!
//! Invariant (SPEC guarantee 5): Kafka offsets are stored only after the
//! batch's database transaction committed (see `kafka::consumer`). A crash
//! between the two redelivers the batch, and the inbox's
//! `ON CONFLICT (consumer, message_id) DO NOTHING` drops the copies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use kurier::inbox::{store, NewMessage};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::InboxConfig;
use crate::error::Error;
use crate::health::{BrokerProbe, Probe};
use crate::kafka::{InboxConsumer, KafkaConfig};

pub struct InboxWriter {
    pool: PgPool,
    kafka: KafkaConfig,
    cfg: InboxConfig,
    health: Probe,
    /// Test failpoint: abort the process after this many database commits,
    /// before the offsets are stored (`KURIER_FAILPOINT_ABORT_AFTER_INBOX_COMMITS`).
    abort_after_commits: Option<u64>,
    /// Told after every stored batch (a processor in the same daemon wakes up).
    stored: Option<Arc<Notify>>,
}

impl InboxWriter {
    pub fn new(pool: PgPool, kafka: KafkaConfig, cfg: InboxConfig, health: Probe) -> Self {
        let abort_after_commits = std::env::var("KURIER_FAILPOINT_ABORT_AFTER_INBOX_COMMITS")
            .ok()
            .and_then(|v| v.parse().ok());
        InboxWriter {
            pool,
            kafka,
            cfg,
            health,
            abort_after_commits,
            stored: None,
        }
    }

    /// Notifies `stored` after every batch committed.
    pub fn notify(mut self, stored: Arc<Notify>) -> Self {
        self.stored = Some(stored);
        self
    }

    /// Consumes until `cancel` fires, then commits the stored offsets.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), Error> {
        let consumer = InboxConsumer::subscribe(
            &self.kafka,
            &self.cfg.consumer,
            &self.cfg.properties,
            &self.cfg.topics,
            self.cfg.message_id_headers.clone(),
        )?;
        tracing::info!(consumer = %self.cfg.consumer, topics = ?self.cfg.topics, "inbox writer consuming");
        let mut commits = 0u64;
        let mut broker_probe = BrokerProbe::default();
        let mut batch = self.receive(&consumer, &mut broker_probe, &cancel).await;
        while let Some(current) = batch {
            // The next batch is received while this one is stored: the
            // database, not the fetch, bounds ingest.
            let next = self.receive(&consumer, &mut broker_probe, &cancel);
            let store = self.store_with_retry(&current, &cancel);
            tokio::pin!(next, store);
            let mut got_next = None;
            let stored = loop {
                tokio::select! {
                    stored = &mut store => break stored?,
                    got = &mut next, if got_next.is_none() => got_next = Some(got),
                }
            };
            if !stored {
                break; // cancelled before the batch was stored: it will be redelivered
            }
            commits += 1;
            if self.abort_after_commits == Some(commits) {
                eprintln!("kurier: failpoint: aborting after inbox commit {commits}, before storing offsets");
                std::process::abort();
            }
            consumer.store_offsets(&current);
            if let Some(stored) = &self.stored {
                stored.notify_one();
            }
            self.health.progress();
            batch = match got_next {
                Some(got) => got,
                None => next.await,
            };
        }
        consumer.commit();
        tracing::info!("inbox writer stopped");
        Ok(())
    }

    /// The next batch, or `None` once `cancel` fires.
    async fn receive(
        &self,
        consumer: &InboxConsumer,
        broker_probe: &mut BrokerProbe,
        cancel: &CancellationToken,
    ) -> Option<Vec<NewMessage>> {
        tokio::select! {
            _ = cancel.cancelled() => None,
            b = self.next_batch(consumer, broker_probe) => Some(b),
        }
    }

    /// Waits for one message, then takes what else arrives within `batch_wait`.
    async fn next_batch(
        &self,
        consumer: &InboxConsumer,
        broker_probe: &mut BrokerProbe,
    ) -> Vec<NewMessage> {
        let mut batch = Vec::new();
        while batch.is_empty() {
            match tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await {
                Ok(Ok(m)) => batch.push(m),
                Ok(Err(e)) => {
                    // e.g. a subscribed topic that does not exist yet: said once.
                    if consumer.first_in_a_while(&e.to_string()) {
                        tracing::warn!(error = %e, "inbox consumer error");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                // Nothing to consume is not a stall, as long as the broker answers.
                Err(_) => {
                    if broker_probe.reachable(consumer.reachability()).await {
                        self.health.progress();
                    }
                }
            }
        }
        let deadline = tokio::time::Instant::now() + self.cfg.batch_wait;
        let mut bytes = batch.iter().map(size).sum::<u64>();
        while batch.len() < self.cfg.batch_size as usize && bytes < self.cfg.max_batch_bytes {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(m)) => {
                    bytes += size(&m);
                    batch.push(m);
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "inbox consumer error"),
                Err(_) => break,
            }
        }
        batch
    }

    /// Retries database errors with backoff until stored; `Ok(false)` if cancelled first.
    async fn store_with_retry(
        &self,
        batch: &[NewMessage],
        cancel: &CancellationToken,
    ) -> Result<bool, Error> {
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(10))
            .with_jitter()
            .without_max_times()
            .build();
        loop {
            let started = Instant::now();
            let stored =
                store::insert_batch(&self.pool, &self.cfg.schema, &self.cfg.consumer, batch).await;
            match stored {
                Ok(inserted) => {
                    self.count(batch.len() as u64, inserted, started);
                    return Ok(true);
                }
                Err(e) if e.is_retryable() => {
                    self.health.set_database(false);
                    let delay = backoff.next().unwrap_or(Duration::from_secs(10));
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot store inbox batch; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(false),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn count(&self, received: u64, inserted: u64, started: Instant) {
        let c = self.cfg.consumer.clone();
        metrics::counter!("kurier_inbox_received_total", "consumer" => c.clone())
            .increment(inserted);
        metrics::counter!("kurier_inbox_duplicates_total", "consumer" => c)
            .increment(received - inserted);
        metrics::histogram!("kurier_inbox_batch_store_seconds")
            .record(started.elapsed().as_secs_f64());
    }
}

/// What a message adds to a batch's byte bound: its key and payload.
fn size(m: &NewMessage) -> u64 {
    (m.key.as_ref().map_or(0, Vec::len) + m.payload.as_ref().map_or(0, Vec::len)) as u64
}
