//! The saga orchestrator: the SQL state machine (`kurier::saga`) does the
//! deciding; this runs its three loops.
//!
//! - **replies in**: an inbox writer (consumer `sagas.consumer`) on the reply
//!   topics of every defined saga type, restarted when the set of topics
//!   changes (types are defined at run time, by SQL);
//! - **replies applied**: an inbox processor that calls
//!   `kurier.saga_apply_reply_message` for each stored reply in the
//!   transaction that marks it processed (one reply applied once, guarded by
//!   the saga's row lock and state, so two daemons never advance a saga twice);
//! - **timers**: `kurier.saga_fire_timers` whenever the earliest timer is due
//!   (durable: the timers are rows, so a restart loses none).
//!
//! Commands go out through the outbox, written by those SQL functions in the
//! transaction that records the step as started; the relay publishes them.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use kurier::inbox::{Handler, HandlerError, InboxMessage, Processor};
use kurier::saga::store;
use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{InboxConfig, SagasConfig};
use crate::health::Health;
use crate::inbox_writer::InboxWriter;
use crate::kafka::{cluster, KafkaConfig};

/// Timers are looked at least this often; a timer due sooner is fired when due.
const TIMER_BATCH: i32 = 100;

pub struct SagaRunner {
    pool: PgPool,
    kafka: KafkaConfig,
    cfg: SagasConfig,
    health: Health,
}

impl SagaRunner {
    pub fn new(pool: PgPool, kafka: KafkaConfig, cfg: SagasConfig, health: Health) -> Self {
        SagaRunner {
            pool,
            kafka,
            cfg,
            health,
        }
    }

    /// Runs the three loops until `cancel` fires. Database and broker errors
    /// are logged and retried: sagas wait, they are never dropped.
    pub async fn run(self, cancel: CancellationToken) {
        let stored = Arc::new(Notify::new());
        tokio::join!(
            self.receive_replies(stored.clone(), &cancel),
            self.apply_replies(stored, &cancel),
            self.fire_timers(&cancel),
        );
        tracing::info!("saga orchestrator stopped");
    }

    /// Keeps an inbox writer on the current set of reply topics.
    async fn receive_replies(&self, stored: Arc<Notify>, cancel: &CancellationToken) {
        let mut topics: Vec<String> = Vec::new();
        let mut writer: Option<(CancellationToken, tokio::task::JoinHandle<()>)> = None;
        loop {
            match store::reply_topics(&self.pool, &self.cfg.schema).await {
                Ok(now) if now != topics => {
                    if let Some((stop, task)) = writer.take() {
                        stop.cancel();
                        let _ = task.await;
                    }
                    if !now.is_empty() {
                        self.create_missing(&now).await;
                        writer = Some(self.start_writer(&now, stored.clone(), cancel));
                    }
                    tracing::info!(topics = ?now, "saga reply topics");
                    topics = now;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read the saga types; will retry"),
            }
            if sleep_or_cancel(self.cfg.topic_refresh, cancel).await {
                break;
            }
        }
        if let Some((stop, task)) = writer {
            stop.cancel();
            let _ = task.await;
        }
    }

    /// Reply topics are the orchestrator's own: it creates those missing
    /// (where its role may), so that replies are not produced into nothing.
    async fn create_missing(&self, topics: &[String]) {
        match cluster::ensure_topics(&self.kafka, topics, 1).await {
            Ok(created) if !created.is_empty() => {
                tracing::info!(?created, "created saga reply topics")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot create saga reply topics; create them, or let producers auto-create them")
            }
        }
    }

    fn start_writer(
        &self,
        topics: &[String],
        stored: Arc<Notify>,
        cancel: &CancellationToken,
    ) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let mut properties = self.cfg.properties.clone();
        // A reply topic created after the subscription is seen within seconds
        // (librdkafka's default refresh is 5 minutes).
        properties
            .entry("topic.metadata.refresh.interval.ms".into())
            .or_insert_with(|| "2000".into());
        // A step waits for its reply: the broker answers a fetch within
        // 20 ms instead of librdkafka's 500 (saga step latency, `make bench`).
        properties
            .entry("fetch.wait.max.ms".into())
            .or_insert_with(|| "20".into());
        let inbox = InboxConfig {
            schema: self.cfg.schema.clone(),
            consumer: self.cfg.consumer.clone(),
            topics: topics.to_vec(),
            batch_size: 1000,
            max_batch_bytes: 16 << 20,
            batch_wait: Duration::from_millis(5),
            message_id_headers: vec![kurier::outbox::MESSAGE_ID_HEADER.into()],
            properties,
            prune_payload_after: Duration::from_secs(86_400),
            forget_after: Duration::from_secs(7 * 86_400),
        };
        let writer = InboxWriter::new(
            self.pool.clone(),
            self.kafka.clone(),
            inbox,
            self.health.probe("sagas:replies"),
        )
        .notify(stored);
        let stop = cancel.child_token();
        let run = writer.run(stop.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = run.await {
                tracing::error!(error = %e, "saga reply consumer stopped");
            }
        });
        (stop, task)
    }

    /// Applies stored replies, a saga's replies in the order received.
    async fn apply_replies(&self, stored: Arc<Notify>, cancel: &CancellationToken) {
        let processor = Processor::new(self.pool.clone(), self.cfg.consumer.clone())
            .schema(self.cfg.schema.clone())
            .batch_size(self.cfg.batch_size)
            .ordered(true)
            .retry(Duration::from_millis(100), Duration::from_secs(10));
        let handler = ApplyReply {
            schema: self.cfg.schema.clone(),
        };
        while !cancel.is_cancelled() {
            let idle = match processor.process_batch(&handler).await {
                Ok(report) => report.claimed() == 0,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot apply saga replies; will retry");
                    true
                }
            };
            if idle {
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = stored.notified() => {}
                    _ = tokio::time::sleep(self.cfg.poll_interval) => {}
                }
            }
        }
    }

    /// Fires due timers; sleeps until the next one is due (at most a poll interval).
    async fn fire_timers(&self, cancel: &CancellationToken) {
        let probe = self.health.probe("sagas");
        loop {
            let wait = match self.fire_due().await {
                Ok(wait) => {
                    probe.progress();
                    wait
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot fire saga timers; will retry");
                    self.cfg.poll_interval
                }
            };
            if sleep_or_cancel(wait, cancel).await {
                return;
            }
        }
    }

    /// Fires every due timer; returns how long to wait for the next one.
    async fn fire_due(&self) -> Result<Duration, kurier::Error> {
        loop {
            let fired = store::fire_timers(&self.pool, &self.cfg.schema, TIMER_BATCH).await?;
            if fired > 0 {
                metrics::counter!("kurier_saga_timers_fired_total").increment(fired as u64);
            }
            if fired < TIMER_BATCH {
                break;
            }
        }
        let next = store::next_timer_in(&self.pool, &self.cfg.schema).await?;
        let poll = self.cfg.poll_interval;
        Ok(next.map_or(poll, |secs| {
            Duration::from_secs_f64(secs.max(0.0)).min(poll)
        }))
    }
}

/// `true` when cancelled.
async fn sleep_or_cancel(wait: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => true,
        _ = tokio::time::sleep(wait) => false,
    }
}

/// One stored reply applied to its saga, in the inbox transaction.
struct ApplyReply {
    schema: kurier::SchemaName,
}

impl Handler for ApplyReply {
    fn handle<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        msg: &'a InboxMessage,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let outcome = store::apply_reply_message(
                conn,
                &self.schema,
                &msg.headers,
                msg.payload.as_deref(),
                &msg.message_id,
            )
            .await?;
            let kind = outcome.split(':').next().unwrap_or_default().to_owned();
            metrics::counter!("kurier_saga_replies_total", "outcome" => kind.clone()).increment(1);
            if kind == "ignored" {
                tracing::info!(message_id = %msg.message_id, %outcome, "saga reply recorded and ignored");
            } else {
                tracing::debug!(message_id = %msg.message_id, %outcome, "saga reply applied");
            }
            Ok(())
        })
    }
}
