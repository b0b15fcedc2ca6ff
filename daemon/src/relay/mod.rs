//! The relay: claim a batch of outbox rows, publish it, and finish each row
//! by its delivery report (delete when acknowledged, retry or dead-letter when
//! not). One relay loop per schema; a [`session::Session`] is one database
//! session of it (its connections, leases and batches), and this file keeps
//! reconnecting sessions until shutdown.
//!
//! Invariants enforced here and in `session` / `batch`:
//! - a row is deleted only after the broker acknowledged it (`acks=all`);
//! - rows are sent in `id` order, a batch at a time, only from partitions this
//!   instance holds unexpired leases on (see `lease`), and a key whose row
//!   failed sends nothing more from that batch;
//! - leases are renewed while a batch waits for the broker, and given up or
//!   taken only between batches, so a partition changes hands with nothing in flight;
//! - shutdown interrupts waiting, never a claimed batch: a batch in flight is
//!   given `shutdown_grace` to be acknowledged; unacknowledged rows stay in
//!   the outbox for the next run (at least once).

mod batch;
mod session;

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use kurier::SchemaName;
use tokio_util::sync::CancellationToken;

use crate::config::{DatabaseConfig, RelayConfig};
use crate::error::Error;
use crate::health::Probe;
use crate::kafka::{KafkaConfig, Publisher};
use session::Session;

/// The NOTIFY channel of the optional trigger (`migrations/0001_outbox.sql`).
pub const CHANNEL: &str = "kurier_outbox";

/// A session that ran this long without failing was healthy: the reconnect
/// backoff starts again from its minimum after it ends.
const HEALTHY_FOR: Duration = Duration::from_secs(60);

/// One schema's relay loop.
pub struct Relay {
    schema: SchemaName,
    db: DatabaseConfig,
    kafka: KafkaConfig,
    cfg: RelayConfig,
    health: Probe,
}

impl Relay {
    pub fn new(
        schema: SchemaName,
        db: DatabaseConfig,
        kafka: KafkaConfig,
        cfg: RelayConfig,
        health: Probe,
    ) -> Self {
        Relay {
            schema,
            db,
            kafka,
            cfg,
            health,
        }
    }

    /// Runs until `cancel` fires (then `Ok`) or an error that cannot heal.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), Error> {
        let mut publisher = self.publisher()?;
        let mut reconnect = self.backoff();
        while !cancel.is_cancelled() {
            let started = Instant::now();
            match self.session(&mut publisher, &cancel).await {
                Ok(()) => break,
                Err(e) if e.is_retryable() => {
                    self.health.set_database(false);
                    if started.elapsed() >= HEALTHY_FOR {
                        reconnect = self.backoff();
                    }
                    let delay = reconnect.next().unwrap_or(self.cfg.retry_max);
                    let error = self.db.scrub(&e.to_string());
                    tracing::warn!(%error, retry_in = ?delay, "relay lost its database connection; reconnecting");
                    sleep_unless_cancelled(delay, &cancel).await;
                }
                Err(e) => return Err(e),
            }
        }
        publisher.flush(Duration::from_secs(1));
        tracing::info!("relay stopped");
        Ok(())
    }

    /// One database session: register, serve, and on a clean stop hand the
    /// leases back so other instances take over at once.
    async fn session(
        &self,
        publisher: &mut Publisher,
        cancel: &CancellationToken,
    ) -> Result<(), Error> {
        let mut session = Session::open(self, publisher).await?;
        let result = session.serve(cancel).await;
        if result.is_ok() {
            session.close().await;
        }
        result
    }

    fn publisher(&self) -> Result<Publisher, Error> {
        Ok(Publisher::new(&self.kafka, self.cfg.cloudevents.as_ref())?)
    }

    fn backoff(&self) -> ExponentialBackoff {
        ExponentialBuilder::default()
            .with_min_delay(self.cfg.retry_min)
            .with_max_delay(self.cfg.retry_max)
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// The delay before a row's next attempt, after `attempts` failed ones.
    fn row_backoff(&self, attempts: i32) -> Duration {
        self.backoff()
            .nth(attempts.max(0) as usize)
            .unwrap_or(self.cfg.retry_max)
    }
}

async fn sleep_unless_cancelled(delay: Duration, cancel: &CancellationToken) {
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = tokio::time::sleep(delay) => {}
    }
}
