//! The daemon's Kafka → inbox writer.
//!
//! Invariant (SPEC guarantee 5): Kafka offsets are stored only after the
//! batch's database transaction committed (`enable.auto.offset.store=false`,
//! offsets stored by hand, committed by librdkafka's auto-commit and on
//! rebalance). A crash between the two redelivers the batch, and
//! `ON CONFLICT (consumer, message_id) DO NOTHING` drops the copies.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::{InboxConfig, KafkaConfig};
use crate::error::{explain_setup, Error};
use crate::health::{metadata_ok, BrokerProbe, Probe};

/// Producer-only settings in `kafka.properties` that a consumer would warn about.
const PRODUCER_ONLY: &[&str] = &[
    "enable.idempotence",
    "acks",
    "linger.ms",
    "partitioner",
    "message.timeout.ms",
    "compression.type",
    "batch.size",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
];

/// A received record, copied out of the consumer's buffer.
#[derive(Debug)]
struct Received {
    message_id: String,
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: serde_json::Value,
}

pub struct InboxWriter {
    pool: PgPool,
    kafka: KafkaConfig,
    cfg: InboxConfig,
    health: Probe,
    /// Test failpoint: abort the process after this many database commits,
    /// before the offsets are stored (`KURIER_FAILPOINT_ABORT_AFTER_INBOX_COMMITS`).
    abort_after_commits: Option<u64>,
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
        }
    }

    /// Consumes until `cancel` fires, then commits the stored offsets.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), Error> {
        let consumer: Arc<StreamConsumer> = Arc::new(self.client_config().create()?);
        let topics: Vec<&str> = self.cfg.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        tracing::info!(consumer = %self.cfg.consumer, topics = ?self.cfg.topics, "inbox writer consuming");
        let mut commits = 0u64;
        let mut broker_probe = BrokerProbe::default();
        let mut batch = self.receive(&consumer, &mut broker_probe, &cancel).await;
        while let Some(current) = batch {
            let received: Vec<Received> = current.iter().map(|m| self.received(m)).collect();
            // The next batch is received while this one is stored: the
            // database, not the fetch, bounds ingest.
            let next = self.receive(&consumer, &mut broker_probe, &cancel);
            let store = self.store_with_retry(&received, &cancel);
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
            store_offsets(&consumer, &current);
            self.health.progress();
            batch = match got_next {
                Some(got) => got,
                None => next.await,
            };
        }
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(error = %e, "final offset commit (nothing stored?)");
        }
        tracing::info!("inbox writer stopped");
        Ok(())
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        // max.poll.interval.ms is also the rebalance timeout: the default 300 s would stall a
        // group for minutes on brokers that wait for it (Tansu does).
        c.set("session.timeout.ms", "10000")
            .set("max.poll.interval.ms", "30000")
            .set("auto.offset.reset", "earliest")
            .set("auto.commit.interval.ms", "1000")
            // librdkafka prefetches up to 64 MiB per consumer by default; the
            // database, not the fetch, bounds ingest, so a sidecar keeps 2 MiB
            // (~2 batches) and refills it after 10 ms instead of librdkafka's
            // 1 s pause once the buffer was full (`make bench`: same ingest as
            // 16 MiB, peak RSS 36-37 instead of 46-49 MiB).
            .set("queued.max.messages.kbytes", "2048")
            .set("fetch.queue.backoff.ms", "10");
        for (k, v) in self
            .kafka
            .properties
            .iter()
            .filter(|(k, _)| !PRODUCER_ONLY.contains(&k.as_str()))
        {
            c.set(k, v);
        }
        for (k, v) in &self.cfg.properties {
            c.set(k, v);
        }
        c.set("bootstrap.servers", &self.kafka.brokers)
            .set("group.id", &self.cfg.consumer)
            .set("enable.auto.commit", "true")
            .set("enable.auto.offset.store", "false");
        c
    }

    /// The next batch, or `None` once `cancel` fires.
    async fn receive<'c>(
        &self,
        consumer: &'c Arc<StreamConsumer>,
        broker_probe: &mut BrokerProbe,
        cancel: &CancellationToken,
    ) -> Option<Vec<BorrowedMessage<'c>>> {
        tokio::select! {
            _ = cancel.cancelled() => None,
            b = self.next_batch(consumer, broker_probe) => Some(b),
        }
    }

    /// Waits for one message, then takes what else arrives within `batch_wait`.
    async fn next_batch<'c>(
        &self,
        consumer: &'c Arc<StreamConsumer>,
        broker_probe: &mut BrokerProbe,
    ) -> Vec<BorrowedMessage<'c>> {
        let mut batch = Vec::new();
        while batch.is_empty() {
            match tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await {
                Ok(Ok(m)) => batch.push(m),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "inbox consumer error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                // Nothing to consume is not a stall, as long as the broker answers.
                Err(_) => {
                    let c = Arc::clone(consumer);
                    if broker_probe
                        .reachable(move || metadata_ok(c.client()))
                        .await
                    {
                        self.health.progress();
                    }
                }
            }
        }
        let deadline = tokio::time::Instant::now() + self.cfg.batch_wait;
        while batch.len() < self.cfg.batch_size as usize {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(m)) => batch.push(m),
                Ok(Err(e)) => tracing::warn!(error = %e, "inbox consumer error"),
                Err(_) => break,
            }
        }
        batch
    }

    fn received(&self, m: &BorrowedMessage<'_>) -> Received {
        let headers = m.headers();
        let from_header = self.cfg.message_id_headers.iter().find_map(|name| {
            headers
                .and_then(|h| h.iter().find(|h| h.key == name))
                .and_then(|h| h.value)
                .and_then(|v| std::str::from_utf8(v).ok())
                .map(str::to_owned)
        });
        Received {
            message_id: from_header
                .unwrap_or_else(|| format!("{}/{}/{}", m.topic(), m.partition(), m.offset())),
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers: headers_json(m),
        }
    }

    /// Retries database errors with backoff until stored; `Ok(false)` if cancelled first.
    async fn store_with_retry(
        &self,
        batch: &[Received],
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
            match self.store(batch).await {
                Ok(inserted) => {
                    let c = self.cfg.consumer.clone();
                    metrics::counter!("kurier_inbox_received_total", "consumer" => c.clone())
                        .increment(inserted);
                    metrics::counter!("kurier_inbox_duplicates_total", "consumer" => c)
                        .increment(batch.len() as u64 - inserted);
                    metrics::histogram!("kurier_inbox_batch_store_seconds")
                        .record(started.elapsed().as_secs_f64());
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
                Err(e) => return Err(e),
            }
        }
    }

    /// One transaction: the rows (duplicates dropped) and the counters. Returns rows inserted.
    async fn store(&self, batch: &[Received]) -> Result<u64, Error> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(INSERT_BATCH)
            .bind(&self.cfg.consumer)
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
            .execute(&mut *tx)
            .await
            .map_err(explain_setup)?
            .rows_affected();
        sqlx::query(
            "INSERT INTO kurier.inbox_stats AS s (consumer, received, duplicates) VALUES ($1, $2, $3) \
             ON CONFLICT (consumer) DO UPDATE SET received = s.received + $2, duplicates = s.duplicates + $3",
        )
        .bind(&self.cfg.consumer)
        .bind(inserted as i64)
        .bind((batch.len() as u64 - inserted) as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(inserted)
    }
}

/// Inserts in receive order, so `id` order is partition order within a batch.
const INSERT_BATCH: &str = "INSERT INTO kurier.inbox (consumer, message_id, topic, \"partition\", \"offset\", key, payload, headers) \
     SELECT $1, m, t, p, o, k, v, h FROM unnest($2::text[], $3::text[], $4::int[], $5::bigint[], $6::bytea[], $7::bytea[], $8::jsonb[]) \
       WITH ORDINALITY AS u(m, t, p, o, k, v, h, n) ORDER BY n \
     ON CONFLICT (consumer, message_id) DO NOTHING";

/// Kafka headers as a JSON object: UTF-8 values as strings, null as null,
/// other bytes as `{"hex": "..."}`. A repeated header name keeps its last value.
fn headers_json(m: &BorrowedMessage<'_>) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    if let Some(headers) = m.headers() {
        for h in headers.iter() {
            let v = match h.value {
                None => serde_json::Value::Null,
                Some(bytes) => match std::str::from_utf8(bytes) {
                    Ok(s) => serde_json::Value::String(s.to_owned()),
                    Err(_) => {
                        serde_json::json!({ "hex": bytes.iter().map(|b| format!("{b:02x}")).collect::<String>() })
                    }
                },
            };
            map.insert(h.key.to_owned(), v);
        }
    }
    serde_json::Value::Object(map)
}

/// Marks the batch consumed: the next offset of each partition.
fn store_offsets(consumer: &StreamConsumer, batch: &[BorrowedMessage<'_>]) {
    let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for m in batch {
        let e = next.entry((m.topic(), m.partition())).or_insert(0);
        *e = (*e).max(m.offset() + 1);
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in next {
        let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(offset));
    }
    // Fails for partitions revoked meanwhile; their new owner re-reads from the
    // last commit and the inbox drops the duplicates.
    if let Err(e) = consumer.store_offsets(&tpl) {
        tracing::debug!(error = %e, "could not store some offsets (partition revoked?)");
    }
}
