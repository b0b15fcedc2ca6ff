//! CQRS read models fed from the event store. A projection applies events
//! from `kurier.read_all` in order and moves its checkpoint
//! (`kurier.projections`) in the same transaction as its read-model writes,
//! with a compare-and-set on the old position: a crash, a second runner or a
//! retry can never apply an event twice or skip one. A failing event stops
//! its projection at that position (retried with backoff, then parked with
//! the error), never skipped silently.
//!
//! - SQL projections (`kurier.define_projection(name, handler)`) are run by
//!   the daemon; the SQL contract is in `migrations/0007_projections.sql`.
//! - Rust projections implement [`Projection`] and run in the service's own
//!   process with [`ProjectionRunner`]: the same checkpoint rule, batching,
//!   backoff, and one runner per projection across processes (an advisory
//!   lock; the compare-and-set keeps even two runners correct).
//! - [`store`]: every projection query.

pub mod store;

use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::events::{store as events, RecordedEvent};
use crate::inbox::HandlerError;
use crate::schema::SchemaName;

/// A read model written by application code.
pub trait Projection: Send + Sync {
    /// Its name in `kurier.projections` (`[a-z_][a-z0-9_]*`, at most 50).
    fn name(&self) -> &str;

    /// The event categories it reads; `None`: all.
    fn categories(&self) -> Option<Vec<String>> {
        None
    }

    /// Applies one event on the checkpointing transaction. A
    /// `StreamErased` event asks it to delete what it derived from
    /// `event.stream`. An `Err` fails the event: retried, then parked.
    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        event: &'a RecordedEvent,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;

    /// Empties the read model before a rebuild (same transaction).
    fn reset<'a>(&'a self, _conn: &'a mut PgConnection) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async { Ok(()) })
    }
}

/// What one step of a runner did.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Applied events up to `position`; `more`: probably more waiting.
    Applied {
        position: i64,
        events: usize,
        more: bool,
    },
    /// Nothing new (or another runner holds it this instant).
    Idle,
    /// A failure's backoff runs for this long.
    Waiting(Duration),
    /// Parked or paused: an operator must act.
    Stopped,
}

/// Runs one [`Projection`] in-process.
pub struct ProjectionRunner<P> {
    pool: PgPool,
    schema: SchemaName,
    projection: P,
    batch: i32,
    rebuild_batch: i32,
    poll: Duration,
}

impl<P: Projection> ProjectionRunner<P> {
    pub fn new(pool: PgPool, projection: P) -> Self {
        ProjectionRunner {
            pool,
            schema: SchemaName::kurier(),
            projection,
            batch: 500,
            rebuild_batch: 5000,
            poll: Duration::from_millis(100),
        }
    }

    pub fn schema(mut self, schema: SchemaName) -> Self {
        self.schema = schema;
        self
    }

    /// Events per transaction while running, and while rebuilding.
    pub fn batch_size(mut self, running: i32, rebuilding: i32) -> Self {
        (self.batch, self.rebuild_batch) = (running.max(1), rebuilding.max(1));
        self
    }

    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll = d;
        self
    }

    /// Registers the projection (idempotent).
    pub async fn register(&self) -> Result<(), Error> {
        let categories = self.projection.categories();
        store::register(
            &self.pool,
            &self.schema,
            self.projection.name(),
            categories.as_deref(),
        )
        .await
    }

    /// Runs until `cancel` fires, as the only runner of this projection
    /// (waiting for the lock while another process holds it).
    pub async fn run(&self, cancel: &CancellationToken) -> Result<(), Error> {
        self.register().await?;
        let mut lock = self.pool.acquire().await?.detach();
        let key = store::runner_lock(&self.schema, self.projection.name());
        while !store::try_lock_runner(&mut lock, key).await? {
            if sleep(self.poll * 10, cancel).await {
                return Ok(());
            }
        }
        while !cancel.is_cancelled() {
            let wait = match self.step().await? {
                Step::Applied { more: true, .. } => continue,
                Step::Applied { .. } | Step::Idle => self.poll,
                Step::Waiting(d) => d.min(self.poll * 10),
                Step::Stopped => self.poll * 10,
            };
            sleep(wait, cancel).await;
        }
        Ok(())
    }

    /// One batch in one transaction (or, after a failure, one event at a
    /// time until the failing one is found and recorded).
    pub async fn step(&self) -> Result<Step, Error> {
        let mut tx = self.pool.begin().await?;
        let name = self.projection.name();
        let Some(cp) = store::lock(&mut tx, &self.schema, name).await? else {
            return Ok(Step::Idle);
        };
        if !matches!(cp.status.as_str(), "running" | "rebuilding") {
            return Ok(Step::Stopped);
        }
        if let Some(secs) = cp.retry_in_secs.filter(|s| *s > 0.0) {
            return Ok(Step::Waiting(Duration::from_secs_f64(secs)));
        }
        let max = if cp.status == "rebuilding" {
            self.rebuild_batch
        } else {
            self.batch
        };
        let single = cp
            .categories
            .as_ref()
            .filter(|c| c.len() == 1)
            .map(|c| c[0].clone());
        let batch =
            events::read_all(&mut *tx, &self.schema, cp.position, max, single.as_deref()).await?;
        let Some(last) = batch.last().map(|e| e.global_position) else {
            return Ok(Step::Idle);
        };
        let mine = |e: &RecordedEvent| {
            cp.categories
                .as_ref()
                .is_none_or(|c| c.contains(&e.category))
        };
        for e in batch.iter().filter(|e| mine(e)) {
            if let Err(error) = self.projection.apply(&mut tx, e).await {
                drop(tx); // rolled back: find the failing event one at a time
                tracing::warn!(projection = name, position = e.global_position, %error, "projection batch failed; retrying it event by event");
                return self.one_at_a_time(cp.position, &batch).await;
            }
        }
        store::checkpoint(&mut tx, &self.schema, name, cp.position, last).await?;
        tx.commit().await?;
        let events = batch.len();
        Ok(Step::Applied {
            position: last,
            events,
            more: events == max as usize,
        })
    }

    /// Applies `batch` one event per transaction from `from`; records the
    /// first failure (backoff, or parked after the attempts) and stops there.
    async fn one_at_a_time(&self, mut from: i64, batch: &[RecordedEvent]) -> Result<Step, Error> {
        let name = self.projection.name();
        let categories = self.projection.categories();
        for e in batch {
            let mut tx = self.pool.begin().await?;
            if store::lock(&mut tx, &self.schema, name)
                .await?
                .is_none_or(|cp| cp.position != from)
            {
                return Ok(Step::Idle); // someone else moved it: start over
            }
            let mine = categories.as_ref().is_none_or(|c| c.contains(&e.category));
            if mine {
                if let Err(error) = self.projection.apply(&mut tx, e).await {
                    drop(tx);
                    return self.record_failure(e, &error.to_string()).await;
                }
            }
            store::checkpoint(&mut tx, &self.schema, name, from, e.global_position).await?;
            tx.commit().await?;
            from = e.global_position;
        }
        Ok(Step::Applied {
            position: from,
            events: batch.len(),
            more: true,
        })
    }

    async fn record_failure(&self, e: &RecordedEvent, error: &str) -> Result<Step, Error> {
        let mut tx = self.pool.begin().await?;
        let name = self.projection.name();
        let (status, retry_in) =
            store::failed(&mut tx, &self.schema, name, e.global_position, error).await?;
        tx.commit().await?;
        if status == "parked" {
            tracing::error!(projection = name, position = e.global_position, event_id = %e.event_id, error, "projection parked at a failing event; resume or skip it");
            return Ok(Step::Stopped);
        }
        tracing::warn!(projection = name, position = e.global_position, error, retry_in_secs = ?retry_in, "projection event failed; will retry");
        Ok(Step::Waiting(Duration::from_secs_f64(
            retry_in.unwrap_or(1.0).max(0.0),
        )))
    }

    /// Rebuilds from position 0: empties the read model ([`Projection::reset`])
    /// and resets the checkpoint in one transaction; the runner replays.
    pub async fn rebuild(&self) -> Result<(), Error> {
        let mut tx = self.pool.begin().await?;
        self.projection.reset(&mut tx).await.map_err(|e| {
            Error::InvalidMessage(format!("reset of {}: {e}", self.projection.name()))
        })?;
        store::act(
            &mut tx,
            &self.schema,
            self.projection.name(),
            &store::Action::Rebuild,
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// `true` when cancelled.
async fn sleep(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}
