//! The relay loop: claim a batch of outbox rows, publish it, and finish each row
//! by its delivery report (delete when acknowledged, retry or dead-letter when
//! not).
//!
//! Invariants enforced here:
//! - a row is deleted only after the broker acknowledged it (`acks=all`);
//! - rows are sent in `id` order, a batch at a time, only from partitions this
//!   instance holds unexpired leases on (see `lease`), and a key whose row
//!   failed sends nothing more from that batch;
//! - leases are renewed while a batch waits for the broker, and given up or
//!   taken only between batches, so a partition changes hands with nothing in flight;
//! - shutdown interrupts waiting, never a claimed batch: a batch in flight is
//!   given `shutdown_grace` to be acknowledged; unacknowledged rows stay in
//!   the outbox for the next run (at least once).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::future::{maybe_done, FutureExt};
use futures::stream::StreamExt;
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use sqlx::postgres::PgListener;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use crate::config::{KafkaConfig, RelayConfig};
use crate::dead_letter;
use crate::error::{explain_setup, Error};
use crate::health::{metadata_ok, BrokerProbe, Probe};
use crate::lease::Leases;
use crate::outbox::{self, OutboxRow};
use crate::publisher::{classify, Failure, Publisher, Sent};
use crate::schema::SchemaName;
use tracing::Instrument;

/// The NOTIFY channel of the optional trigger (`migrations/0001_outbox.sql`).
pub const CHANNEL: &str = "kurier_outbox";

/// For a second after a batch, an empty outbox is polled this often instead of
/// every `poll_interval`: rows are flowing, so the next one is likely within
/// milliseconds (commit-to-publish latency without the NOTIFY trigger's cost).
const HOT_POLL: Duration = Duration::from_millis(5);
const HOT_FOR: Duration = Duration::from_secs(1);

/// What became of one claimed row.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// Not sent or no report yet (held back behind its key, or shutdown): stays as is.
    Unknown,
    Delivered,
    Failed(Failure),
}

pub struct Relay {
    schema: SchemaName,
    database_url: String,
    kafka: KafkaConfig,
    cfg: RelayConfig,
    grace: Duration,
    health: Probe,
}

impl Relay {
    pub fn new(
        schema: SchemaName,
        database_url: String,
        kafka: KafkaConfig,
        cfg: RelayConfig,
        grace: Duration,
        health: Probe,
    ) -> Self {
        Relay {
            schema,
            database_url,
            kafka,
            cfg,
            grace,
            health,
        }
    }

    /// Runs until `cancel` fires (then `Ok`) or an error that cannot heal.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), Error> {
        let mut publisher = Publisher::new(&self.kafka, self.cfg.cloudevents.as_ref())?;
        let mut reconnect = self.backoff();
        while !cancel.is_cancelled() {
            match self.connect_and_serve(&mut publisher, &cancel).await {
                Ok(()) => break,
                Err(e) if e.is_retryable() => {
                    self.health.set_database(false);
                    let delay = reconnect.next().unwrap_or(self.cfg.retry_max);
                    let error = crate::redact::scrub(&e.to_string(), &self.database_url);
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
    async fn connect_and_serve(
        &self,
        publisher: &mut Publisher,
        cancel: &CancellationToken,
    ) -> Result<(), Error> {
        let mut conn = PgConnection::connect(&self.database_url).await?;
        crate::schema::ensure_migrated(&mut conn, &self.schema).await?;
        // Deletes acknowledged rows while `conn` claims the next batch.
        let mut deleter = PgConnection::connect(&self.database_url).await?;
        let mut leases =
            Leases::register(&mut conn, self.schema.clone(), self.cfg.lease_ttl).await?;
        let result = self
            .serve(&mut conn, &mut deleter, &mut leases, publisher, cancel)
            .await;
        if result.is_ok() {
            if let Err(e) = leases.release_all(&mut conn).await {
                tracing::warn!(error = %e, "could not hand back relay leases; they expire by themselves");
            }
        }
        result
    }

    async fn serve(
        &self,
        conn: &mut PgConnection,
        deleter: &mut PgConnection,
        leases: &mut Leases,
        publisher: &mut Publisher,
        cancel: &CancellationToken,
    ) -> Result<(), Error> {
        // Rows of the last batch, acknowledged but not yet deleted.
        let mut acknowledged: Vec<i64> = Vec::new();
        let result = self
            .rounds(conn, deleter, leases, publisher, cancel, &mut acknowledged)
            .await;
        if result.is_ok() {
            // A clean stop leaves nothing acknowledged behind (it would be re-sent).
            self.delete_acknowledged(conn, &mut acknowledged).await?;
        }
        result
    }

    /// Claim, publish, finish, until cancelled.
    async fn rounds(
        &self,
        conn: &mut PgConnection,
        deleter: &mut PgConnection,
        leases: &mut Leases,
        publisher: &mut Publisher,
        cancel: &CancellationToken,
        acknowledged: &mut Vec<i64>,
    ) -> Result<(), Error> {
        let mut listener = self.listen().await;
        // The next batch, claimed while the current one was on the wire.
        let mut prefetched: Vec<OutboxRow> = Vec::new();
        let mut last_batch: Option<Instant> = None;
        let mut broker_probe = BrokerProbe::default();
        let mut pause = self.backoff();
        while !cancel.is_cancelled() {
            if leases.heartbeat_due() || !leases.still_valid() {
                // Acknowledged rows go first: a partition given up now may be
                // claimed by another instance at once, which must not find them.
                self.delete_acknowledged(conn, acknowledged).await?;
                leases.heartbeat(conn).await.map_err(explain_setup)?;
                prefetched.clear(); // claimed under the previous share of partitions
            }
            let rows = if prefetched.is_empty() {
                self.delete_acknowledged(conn, acknowledged).await?;
                self.claim(conn, leases, &[]).await?
            } else {
                std::mem::take(&mut prefetched)
            };
            if rows.is_empty() {
                let hot = last_batch.is_some_and(|t| t.elapsed() < HOT_FOR);
                let wait = if hot {
                    self.cfg.poll_interval.min(HOT_POLL)
                } else {
                    self.cfg.poll_interval
                };
                self.idle_round(
                    publisher,
                    &mut broker_probe,
                    &mut listener,
                    leases,
                    wait,
                    cancel,
                )
                .await;
                continue;
            }
            if !leases.still_valid() {
                continue; // stalled between claim and send: renew (or lose) the leases first
            }
            let started = Instant::now();
            last_batch = Some(started);
            let (outcomes, next) = self
                .publish(
                    conn,
                    deleter,
                    leases,
                    publisher,
                    &rows,
                    acknowledged,
                    cancel,
                )
                .await?;
            let published = started.elapsed();
            metrics::histogram!("kurier_relay_batch_publish_seconds")
                .record(published.as_secs_f64());
            metrics::histogram!("kurier_relay_batch_size").record(rows.len() as f64);
            let transient = self.finish(conn, &rows, &outcomes, acknowledged).await?;
            tracing::debug!(
                rows = rows.len(),
                publish_ms = published.as_millis() as u64,
                total_ms = started.elapsed().as_millis() as u64,
                prefetched = next.len(),
                "batch done"
            );
            prefetched = without_unfinished_keys(next, &rows, &outcomes);
            if let Some(fatal) = publisher.fatal_error() {
                tracing::error!(error = %fatal, "producer hit a fatal error; building a new one");
                *publisher = Publisher::new(&self.kafka, self.cfg.cloudevents.as_ref())?;
            }
            if transient == 0 {
                pause = self.backoff();
                self.health.progress();
            } else {
                prefetched.clear();
                let delay = pause.next().unwrap_or(self.cfg.retry_max);
                tracing::warn!(rows = transient, retry_in = ?delay, "broker did not acknowledge; retrying the batch with a new producer");
                // Nothing is in flight now. A fresh producer (new producer id) avoids
                // an idempotent producer left waiting to recover its sequence
                // numbers after timed-out messages, which some brokers never allow.
                *publisher = Publisher::new(&self.kafka, self.cfg.cloudevents.as_ref())?;
                sleep_unless_cancelled(delay, cancel).await;
            }
        }
        Ok(())
    }

    /// The next batch of this instance's partitions, leaving out `in_flight` rows.
    async fn claim(
        &self,
        conn: &mut PgConnection,
        leases: &Leases,
        in_flight: &[i64],
    ) -> Result<Vec<OutboxRow>, Error> {
        if leases.owned().is_empty() {
            return Ok(Vec::new());
        }
        let started = Instant::now();
        let rows = outbox::claim(
            conn,
            &self.schema,
            &leases.me,
            self.cfg.batch_size,
            self.cfg.max_batch_bytes,
            in_flight,
        )
        .await
        .map_err(explain_setup)?;
        metrics::histogram!("kurier_relay_claim_seconds").record(started.elapsed().as_secs_f64());
        Ok(rows)
    }

    /// Nothing to publish: wait for a wake-up, the poll interval or shutdown.
    /// Idle counts as progress only while the broker answers, so readiness
    /// turns false when it is gone even with nothing to publish.
    async fn idle_round(
        &self,
        publisher: &Publisher,
        broker_probe: &mut BrokerProbe,
        listener: &mut Option<PgListener>,
        leases: &Leases,
        wait: Duration,
        cancel: &CancellationToken,
    ) {
        let producer = publisher.producer().clone();
        let reachable = broker_probe.reachable(move || {
            use rdkafka::producer::Producer;
            metadata_ok(producer.client())
        });
        if reachable.await {
            self.health.progress();
        }
        self.idle(listener, cancel, wait.min(leases.until_heartbeat()))
            .await;
    }

    /// Sends rows in id order and collects their delivery reports. The
    /// previous batch's `acknowledged` rows are deleted (on `deleter`) and the
    /// next batch is claimed (on `conn`) while this one is sent and on the
    /// wire: both statements are handed to PostgreSQL before the send, so the
    /// database, the broker and this process work at the same time. The next
    /// batch (returned second) is sent only after this one is finished, so a
    /// failure here can still hold its keys back.
    #[allow(clippy::too_many_arguments)]
    async fn publish(
        &self,
        conn: &mut PgConnection,
        deleter: &mut PgConnection,
        leases: &mut Leases,
        publisher: &Publisher,
        rows: &[OutboxRow],
        acknowledged: &mut Vec<i64>,
        cancel: &CancellationToken,
    ) -> Result<(Vec<Outcome>, Vec<OutboxRow>), Error> {
        // The claim runs beside the delete, so it skips the rows being
        // deleted as well as those in flight.
        let skip: Vec<i64> = acknowledged
            .iter()
            .copied()
            .chain(rows.iter().map(|r| r.id))
            .collect();
        let (mut outcomes, pending, next) = {
            let claiming = maybe_done(async {
                if cancel.is_cancelled() {
                    return Ok(Vec::new());
                }
                self.claim(conn, leases, &skip).await
            });
            let deleting = maybe_done(self.delete_acknowledged(deleter, acknowledged));
            tokio::pin!(claiming, deleting);
            // One poll each writes the statements to their connections, so
            // PostgreSQL works on them while the batch is sent.
            let _ = claiming.as_mut().now_or_never();
            let _ = deleting.as_mut().now_or_never();
            let (outcomes, pending) = send_batch(publisher, rows);
            tokio::join!(claiming.as_mut(), deleting.as_mut());
            deleting.as_mut().take_output().expect("joined above")?;
            let next = claiming.as_mut().take_output().expect("joined above")?;
            (outcomes, pending, next)
        };
        let sent_all = !outcomes
            .iter()
            .any(|o| matches!(o, Outcome::Failed(Failure::Transient(_))));
        // Rows after a transient send failure are claimed again next round, in order.
        let next = if sent_all { next } else { Vec::new() };
        let grace = async {
            cancel.cancelled().await;
            tokio::time::sleep(self.grace).await;
        };
        tokio::pin!(grace);
        // Reports are awaited in send order, one at a time: those already in
        // when their turn comes cost no wake-up (one future polled per report
        // woke this task once per report, ~10% of the relay's CPU samples).
        let mut unacknowledged = pending.len();
        let reports = futures::stream::iter(pending).then(|report| report);
        tokio::pin!(reports);
        loop {
            let renew_in = leases.until_heartbeat();
            tokio::select! {
                next = reports.next() => match next {
                    Some((i, report)) => {
                        outcomes[i] = delivery_outcome(report);
                        unacknowledged -= 1;
                    }
                    None => break,
                },
                _ = &mut grace => {
                    tracing::warn!(unacknowledged, "shutdown grace elapsed; unacknowledged rows stay in the outbox");
                    break;
                }
                // A slow broker must not cost us the leases of the batch in flight.
                _ = tokio::time::sleep(renew_in) => leases.renew(conn).await.map_err(explain_setup)?,
            }
        }
        Ok((outcomes, next))
    }

    /// Deletes delivered rows, schedules retries, dead-letters what cannot be
    /// published. Returns how many rows failed transiently.
    ///
    /// When every row was delivered, the delete is left in `acknowledged` for
    /// the next round to run while its batch is on the wire; otherwise it runs
    /// now, before the failed rows are rescheduled.
    async fn finish(
        &self,
        conn: &mut PgConnection,
        rows: &[OutboxRow],
        outcomes: &[Outcome],
        acknowledged: &mut Vec<i64>,
    ) -> Result<usize, Error> {
        let delivered: Vec<&OutboxRow> = rows
            .iter()
            .zip(outcomes)
            .filter(|(_, o)| **o == Outcome::Delivered)
            .map(|(r, _)| r)
            .collect();
        acknowledged.extend(delivered.iter().map(|r| r.id));
        let all_delivered = delivered.len() == rows.len();
        count_per_topic("kurier_outbox_published_total", delivered.into_iter());
        if all_delivered {
            return Ok(0);
        }
        self.delete_acknowledged(conn, acknowledged).await?;
        let mut transient = 0;
        for (row, outcome) in rows.iter().zip(outcomes) {
            let Outcome::Failed(failure) = outcome else {
                continue;
            };
            metrics::counter!("kurier_outbox_failed_total", "topic" => row.topic.clone())
                .increment(1);
            match failure {
                Failure::Transient(_) => transient += 1,
                Failure::Row(why) if (row.attempts as u32) + 1 < self.cfg.max_attempts => {
                    let delay = self.row_backoff(row.attempts);
                    tracing::warn!(id = row.id, message_id = %row.message_id, attempts = row.attempts + 1, retry_in = ?delay, error = %why, "row failed; will retry");
                    outbox::schedule_retry(conn, &self.schema, row.id, why, delay).await?;
                }
                Failure::Row(why) | Failure::Permanent(why) => {
                    tracing::error!(id = row.id, message_id = %row.message_id, topic = %row.topic, error = %why, "row cannot be published; moved to dead_letters");
                    dead_letter::bury(conn, &self.schema, row.id, why).await?;
                    metrics::counter!("kurier_outbox_dead_lettered_total", "topic" => row.topic.clone()).increment(1);
                }
            }
        }
        Ok(transient)
    }

    /// Deletes the rows whose delivery reports said "acknowledged".
    async fn delete_acknowledged(
        &self,
        conn: &mut PgConnection,
        acknowledged: &mut Vec<i64>,
    ) -> Result<(), Error> {
        if !acknowledged.is_empty() {
            outbox::delete_published(conn, &self.schema, acknowledged).await?;
            acknowledged.clear();
        }
        Ok(())
    }

    async fn listen(&self) -> Option<PgListener> {
        let result = async {
            let mut l = PgListener::connect(&self.database_url).await?;
            l.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        }
        .await;
        match result {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "cannot LISTEN for wake-ups; polling only");
                None
            }
        }
    }

    /// Waits for a notification, `wait`, or shutdown, whichever is first.
    async fn idle(
        &self,
        listener: &mut Option<PgListener>,
        cancel: &CancellationToken,
        wait: Duration,
    ) {
        let notified = async {
            match listener {
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

type Report = Result<OwnedDeliveryResult, futures::channel::oneshot::Canceled>;

/// Hands `rows` to the producer in id order. Returns each row's outcome so far
/// and the delivery reports still to come (tagged with the row's index).
fn send_batch(
    publisher: &Publisher,
    rows: &[OutboxRow],
) -> (
    Vec<Outcome>,
    Vec<impl std::future::Future<Output = (usize, Report)>>,
) {
    let mut outcomes = vec![Outcome::Unknown; rows.len()];
    let mut pending = Vec::with_capacity(rows.len());
    // A key whose row failed to send sends nothing more from this batch,
    // so its later rows cannot overtake the failed one.
    let mut blocked: HashSet<(&str, Option<&str>)> = HashSet::new();
    for (i, row) in rows.iter().enumerate() {
        let key = (row.topic.as_str(), row.key.as_deref());
        if blocked.contains(&key) {
            continue;
        }
        match publisher.send(row) {
            Ok(Sent { report, span }) => pending.push(
                async move {
                    let report = report.await;
                    crate::trace::delivered(matches!(report, Ok(Ok(_))));
                    (i, report)
                }
                .instrument(span),
            ),
            Err(Failure::Transient(why)) => {
                // Queue full or broker gone: keep the rest for the next round, in order.
                outcomes[i] = Outcome::Failed(Failure::Transient(why));
                break;
            }
            Err(failure) => {
                blocked.insert(key);
                outcomes[i] = Outcome::Failed(failure);
            }
        }
    }
    (outcomes, pending)
}

fn delivery_outcome(report: Report) -> Outcome {
    match report {
        Ok(Ok(_)) => Outcome::Delivered,
        Ok(Err((e, _))) => Outcome::Failed(classify(&e)),
        Err(_) => Outcome::Failed(Failure::Transient(
            "producer dropped before the delivery report".into(),
        )),
    }
}

/// The prefetched batch minus the keys whose rows in `rows` were not
/// delivered (failed, held back, or unanswered at shutdown): their later rows
/// must wait until those are settled, and are claimed again then.
fn without_unfinished_keys(
    next: Vec<OutboxRow>,
    rows: &[OutboxRow],
    outcomes: &[Outcome],
) -> Vec<OutboxRow> {
    let unfinished: HashSet<(&str, Option<&str>)> = rows
        .iter()
        .zip(outcomes)
        .filter(|(_, o)| **o != Outcome::Delivered)
        .map(|(r, _)| (r.topic.as_str(), r.key.as_deref()))
        .collect();
    if unfinished.is_empty() {
        return next;
    }
    next.into_iter()
        .filter(|r| !unfinished.contains(&(r.topic.as_str(), r.key.as_deref())))
        .collect()
}

fn count_per_topic<'a>(name: &'static str, rows: impl Iterator<Item = &'a OutboxRow>) {
    let mut per_topic: HashMap<&str, u64> = HashMap::new();
    for r in rows {
        *per_topic.entry(&r.topic).or_default() += 1;
    }
    for (topic, n) in per_topic {
        metrics::counter!(name, "topic" => topic.to_owned()).increment(n);
    }
}

async fn sleep_unless_cancelled(delay: Duration, cancel: &CancellationToken) {
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = tokio::time::sleep(delay) => {}
    }
}
