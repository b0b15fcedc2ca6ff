//! One database session of a relay loop: its two connections, its leases,
//! the batch claimed ahead and the rows acknowledged but not yet deleted.
//! Each method is one step of a round: heartbeat → claim → publish → finish.

use std::time::{Duration, Instant};

use backon::ExponentialBackoff;
use futures::future::{maybe_done, FutureExt};
use futures::stream::StreamExt;
use kurier::outbox::store::{claim, dead_letter, OutboxRow};
use kurier::Error as StoreError;
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use super::batch::{self, Outcome};
use super::{sleep_unless_cancelled, Relay, CHANNEL};
use crate::error::Error;
use crate::health::BrokerProbe;
use crate::kafka::{Failure, Publisher};
use crate::lease::Leases;

/// For a second after a batch, an empty outbox is polled this often instead of
/// every `poll_interval`: rows are flowing, so the next one is likely within
/// milliseconds (commit-to-publish latency without the NOTIFY trigger's cost).
const HOT_POLL: Duration = Duration::from_millis(5);
const HOT_FOR: Duration = Duration::from_secs(1);

pub(super) struct Session<'r> {
    relay: &'r Relay,
    publisher: &'r mut Publisher,
    /// Claims, heartbeats, retries and dead letters.
    conn: PgConnection,
    /// Deletes acknowledged rows while `conn` claims the next batch.
    deleter: PgConnection,
    leases: Leases,
    listener: Option<PgListener>,
    /// Rows of the last batch, acknowledged but not yet deleted.
    acknowledged: Vec<i64>,
    /// The next batch, claimed while the current one was on the wire.
    prefetched: Vec<OutboxRow>,
    last_batch: Option<Instant>,
    broker_probe: BrokerProbe,
    /// Between batches that the broker did not acknowledge.
    pause: ExponentialBackoff,
    /// The partition the next claim starts at (rotated for fairness).
    start: i16,
}

impl<'r> Session<'r> {
    /// Connects, checks the schema, registers this instance.
    pub(super) async fn open(
        relay: &'r Relay,
        publisher: &'r mut Publisher,
    ) -> Result<Self, Error> {
        // JIT compiling added 10-22 ms to claims whose estimated cost was high.
        let options = relay.db.connect_options().clone().options([("jit", "off")]);
        let mut conn = PgConnection::connect_with(&options)
            .await
            .map_err(StoreError::from)?;
        kurier::schema::ensure_migrated(&mut conn, &relay.schema).await?;
        // The delete by primary key, planned once: a custom plan on a 100k-row
        // table without statistics scanned the whole table (15-24 ms, 3-11 generic).
        let deleter = options.options([("plan_cache_mode", "force_generic_plan")]);
        let deleter = PgConnection::connect_with(&deleter)
            .await
            .map_err(StoreError::from)?;
        let leases = Leases::register(&mut conn, relay.schema.clone(), relay.cfg.lease_ttl).await?;
        Ok(Session {
            relay,
            publisher,
            conn,
            deleter,
            leases,
            listener: listen(relay).await,
            acknowledged: Vec::new(),
            prefetched: Vec::new(),
            last_batch: None,
            broker_probe: BrokerProbe::default(),
            pause: relay.backoff(),
            start: 0,
        })
    }

    /// Rounds until cancelled; a clean stop leaves nothing acknowledged
    /// behind (it would be re-sent).
    pub(super) async fn serve(&mut self, cancel: &CancellationToken) -> Result<(), Error> {
        while !cancel.is_cancelled() {
            self.round(cancel).await?;
        }
        delete_acknowledged(&self.relay.schema, &mut self.conn, &mut self.acknowledged).await
    }

    /// Hands the leases back, so other instances take over at once.
    pub(super) async fn close(mut self) {
        if let Err(e) = self.leases.release_all(&mut self.conn).await {
            tracing::warn!(error = %e, "could not hand back relay leases; they expire by themselves");
        }
    }

    async fn round(&mut self, cancel: &CancellationToken) -> Result<(), Error> {
        if self.leases.heartbeat_due() || !self.leases.still_valid() {
            // Acknowledged rows go first: a partition given up now may be
            // claimed by another instance at once, which must not find them.
            delete_acknowledged(&self.relay.schema, &mut self.conn, &mut self.acknowledged).await?;
            self.leases
                .heartbeat(&mut self.conn)
                .await
                .map_err(explained)?;
            self.prefetched.clear(); // claimed under the previous share of partitions
        }
        let rows = if self.prefetched.is_empty() {
            delete_acknowledged(&self.relay.schema, &mut self.conn, &mut self.acknowledged).await?;
            claim_batch(
                self.relay,
                &mut self.conn,
                &self.leases,
                &[],
                &mut self.start,
            )
            .await?
        } else {
            std::mem::take(&mut self.prefetched)
        };
        if rows.is_empty() {
            self.idle_round(cancel).await;
            return Ok(());
        }
        if !self.leases.still_valid() {
            return Ok(()); // stalled between claim and send: renew (or lose) the leases first
        }
        self.publish_and_finish(rows, cancel).await
    }

    async fn publish_and_finish(
        &mut self,
        rows: Vec<OutboxRow>,
        cancel: &CancellationToken,
    ) -> Result<(), Error> {
        let started = Instant::now();
        self.last_batch = Some(started);
        let (outcomes, next) = self.publish(&rows, cancel).await?;
        let published = started.elapsed();
        metrics::histogram!("kurier_relay_batch_publish_seconds").record(published.as_secs_f64());
        metrics::histogram!("kurier_relay_batch_size").record(rows.len() as f64);
        let transient = self.finish(&rows, &outcomes).await?;
        tracing::debug!(
            rows = rows.len(),
            publish_ms = published.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            prefetched = next.len(),
            "batch done"
        );
        self.prefetched = batch::without_unfinished_keys(next, &rows, &outcomes);
        if let Some(fatal) = self.publisher.fatal_error() {
            tracing::error!(error = %fatal, "producer hit a fatal error; building a new one");
            *self.publisher = self.relay.publisher()?;
        }
        if transient == 0 {
            self.pause = self.relay.backoff();
            self.relay.health.progress();
            return Ok(());
        }
        self.prefetched.clear();
        let delay = self.pause.next().unwrap_or(self.relay.cfg.retry_max);
        tracing::warn!(rows = transient, retry_in = ?delay, "broker did not acknowledge; retrying the batch with a new producer");
        // Nothing is in flight now. A fresh producer (new producer id) avoids
        // an idempotent producer left waiting to recover its sequence
        // numbers after timed-out messages, which some brokers never allow.
        *self.publisher = self.relay.publisher()?;
        sleep_unless_cancelled(delay, cancel).await;
        Ok(())
    }

    /// Nothing to publish: wait for a wake-up, the poll interval or shutdown.
    /// Idle counts as progress only while the broker answers, so readiness
    /// turns false when it is gone even with nothing to publish.
    async fn idle_round(&mut self, cancel: &CancellationToken) {
        let hot = self.last_batch.is_some_and(|t| t.elapsed() < HOT_FOR);
        let poll = self.relay.cfg.poll_interval;
        let wait = if hot { poll.min(HOT_POLL) } else { poll };
        if self
            .broker_probe
            .reachable(self.publisher.reachability())
            .await
        {
            self.relay.health.progress();
        }
        let wait = wait.min(self.leases.until_heartbeat());
        let notified = async {
            match &mut self.listener {
                Some(l) => {
                    if let Err(e) = l.recv().await {
                        tracing::debug!(error = %e, "LISTEN connection interrupted; it reconnects on next use");
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = notified => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }

    /// Sends rows in id order and collects their delivery reports. The
    /// previous batch's acknowledged rows are deleted (on `deleter`) and the
    /// next batch is claimed (on `conn`) while this one is sent and on the
    /// wire: both statements are handed to PostgreSQL before the send, so the
    /// database, the broker and this process work at the same time. The next
    /// batch (returned second) is sent only after this one is finished, so a
    /// failure here can still hold its keys back.
    async fn publish(
        &mut self,
        rows: &[OutboxRow],
        cancel: &CancellationToken,
    ) -> Result<(Vec<Outcome>, Vec<OutboxRow>), Error> {
        let relay = self.relay;
        // The claim runs beside the delete, so it skips the rows being
        // deleted as well as those in flight.
        let skip: Vec<i64> = (self.acknowledged.iter().copied())
            .chain(rows.iter().map(|r| r.id))
            .collect();
        let (mut outcomes, pending, next) = {
            let claiming = maybe_done(async {
                if cancel.is_cancelled() {
                    return Ok(Vec::new());
                }
                claim_batch(relay, &mut self.conn, &self.leases, &skip, &mut self.start).await
            });
            let deleting = maybe_done(delete_acknowledged(
                &relay.schema,
                &mut self.deleter,
                &mut self.acknowledged,
            ));
            tokio::pin!(claiming, deleting);
            // One poll each writes the statements to their connections, so
            // PostgreSQL works on them while the batch is sent.
            let _ = claiming.as_mut().now_or_never();
            let _ = deleting.as_mut().now_or_never();
            let (outcomes, pending) = batch::send(self.publisher, rows);
            tokio::join!(claiming.as_mut(), deleting.as_mut());
            deleting.as_mut().take_output().expect("joined above")?;
            let next = claiming.as_mut().take_output().expect("joined above")?;
            (outcomes, pending, next)
        };
        // Rows after a transient send failure are claimed again next round, in order.
        let next = if batch::any_transient(&outcomes) {
            Vec::new()
        } else {
            next
        };
        self.await_reports(&mut outcomes, pending, cancel).await?;
        Ok((outcomes, next))
    }

    /// Reports are awaited in send order, one at a time: those already in
    /// when their turn comes cost no wake-up (one future polled per report
    /// woke this task once per report, ~10% of the relay's CPU samples).
    /// Renews the leases meanwhile; gives up `shutdown_grace` after cancel.
    async fn await_reports(
        &mut self,
        outcomes: &mut [Outcome],
        pending: Vec<impl std::future::Future<Output = (usize, crate::kafka::Delivery)>>,
        cancel: &CancellationToken,
    ) -> Result<(), Error> {
        let grace = async {
            cancel.cancelled().await;
            tokio::time::sleep(self.relay.cfg.shutdown_grace).await;
        };
        tokio::pin!(grace);
        let mut unacknowledged = pending.len();
        let reports = futures::stream::iter(pending).then(|report| report);
        tokio::pin!(reports);
        loop {
            let renew_in = self.leases.until_heartbeat();
            tokio::select! {
                next = reports.next() => match next {
                    Some((i, delivery)) => {
                        outcomes[i] = delivery.into();
                        unacknowledged -= 1;
                    }
                    None => return Ok(()),
                },
                _ = &mut grace => {
                    tracing::warn!(unacknowledged, "shutdown grace elapsed; unacknowledged rows stay in the outbox");
                    return Ok(());
                }
                // A slow broker must not cost us the leases of the batch in flight.
                _ = tokio::time::sleep(renew_in) => {
                    self.leases.renew(&mut self.conn).await.map_err(explained)?
                }
            }
        }
    }

    /// Deletes delivered rows, schedules retries, dead-letters what cannot be
    /// published. Returns how many rows failed transiently.
    ///
    /// When every row was delivered, the delete is left in `acknowledged` for
    /// the next round to run while its batch is on the wire; otherwise it runs
    /// now, before the failed rows are rescheduled.
    async fn finish(&mut self, rows: &[OutboxRow], outcomes: &[Outcome]) -> Result<usize, Error> {
        let delivered: Vec<&OutboxRow> = rows
            .iter()
            .zip(outcomes)
            .filter(|(_, o)| **o == Outcome::Delivered)
            .map(|(r, _)| r)
            .collect();
        self.acknowledged.extend(delivered.iter().map(|r| r.id));
        let all_delivered = delivered.len() == rows.len();
        batch::count_per_topic("kurier_outbox_published_total", delivered.into_iter());
        if all_delivered {
            return Ok(0);
        }
        let schema = &self.relay.schema;
        delete_acknowledged(schema, &mut self.conn, &mut self.acknowledged).await?;
        let mut transient = 0;
        for (row, outcome) in rows.iter().zip(outcomes) {
            if let Outcome::Failed(failure) = outcome {
                transient += self.settle_failed(row, failure).await?;
            }
        }
        Ok(transient)
    }

    /// Retry later or dead-letter one failed row; 1 if the failure was transient.
    async fn settle_failed(&mut self, row: &OutboxRow, failure: &Failure) -> Result<usize, Error> {
        let (relay, conn) = (self.relay, &mut self.conn);
        metrics::counter!("kurier_outbox_failed_total", "topic" => row.topic.clone()).increment(1);
        match failure {
            Failure::Transient(_) => return Ok(1),
            Failure::Row(why) if (row.attempts as u32) + 1 < relay.cfg.max_attempts => {
                let delay = relay.row_backoff(row.attempts);
                tracing::warn!(id = row.id, message_id = %row.message_id, attempts = row.attempts + 1, retry_in = ?delay, error = %why, "row failed; will retry");
                claim::schedule_retry(conn, &relay.schema, row.id, why, delay).await?;
            }
            Failure::Row(why) | Failure::Permanent(why) => {
                tracing::error!(id = row.id, message_id = %row.message_id, topic = %row.topic, error = %why, "row cannot be published; moved to dead_letters");
                dead_letter::bury(conn, &relay.schema, row.id, why).await?;
                metrics::counter!("kurier_outbox_dead_lettered_total", "topic" => row.topic.clone())
                    .increment(1);
            }
        }
        Ok(0)
    }
}

/// The next batch of this instance's partitions, leaving out `skip` rows,
/// from partition `start` on; moves `start` past the partitions it served.
async fn claim_batch(
    relay: &Relay,
    conn: &mut PgConnection,
    leases: &Leases,
    skip: &[i64],
    start: &mut i16,
) -> Result<Vec<OutboxRow>, Error> {
    if leases.owned().is_empty() {
        return Ok(Vec::new());
    }
    let started = Instant::now();
    let what = claim::Claim {
        owner: &leases.me,
        limit: relay.cfg.batch_size,
        max_bytes: relay.cfg.max_batch_bytes,
        skip,
        start: *start,
    };
    let rows = claim::claim(conn, &relay.schema, &what).await?;
    *start = claim::next_start(*start, &rows);
    metrics::histogram!("kurier_relay_claim_seconds").record(started.elapsed().as_secs_f64());
    Ok(rows)
}

/// Deletes the rows whose delivery reports said "acknowledged".
async fn delete_acknowledged(
    schema: &kurier::SchemaName,
    conn: &mut PgConnection,
    acknowledged: &mut Vec<i64>,
) -> Result<(), Error> {
    if !acknowledged.is_empty() {
        claim::delete_published(conn, schema, acknowledged).await?;
        acknowledged.clear();
    }
    Ok(())
}

async fn listen(relay: &Relay) -> Option<PgListener> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(relay.db.connect_options().clone());
    let result = async {
        let mut l = PgListener::connect_with(&pool).await?;
        l.listen(CHANNEL).await?;
        Ok::<_, sqlx::Error>(l)
    }
    .await;
    match result {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %relay.db.scrub(&e.to_string()), "cannot LISTEN for wake-ups; polling only");
            None
        }
    }
}

/// A lease statement that failed because the schema or rights are missing
/// says so.
fn explained(e: StoreError) -> Error {
    match e {
        StoreError::Database(db) => StoreError::explained(db).into(),
        other => other.into(),
    }
}
