//! Which relay instance publishes which rows.
//!
//! The outbox is split into 32 lease partitions by a hash of (topic, key)
//! (`migrations/0003_relay_leases.sql`), so one key lives in one partition.
//! Each instance heartbeats; live instances share the partitions evenly
//! (`kurier.relay_leases`), and a partition has at most one unexpired owner.
//!
//! Liveness has two signals: a killed process's session advisory lock
//! vanishes with its connection (fast take-over), and a stalled process
//! (SIGSTOP, GC pause, VM freeze) stops heartbeating, so its leases expire
//! after `lease_ttl`. Fencing: the claim query only returns rows of
//! partitions whose lease row names this instance *and* has not expired by the
//! database clock, and a renewal only extends unexpired leases, so a stalled
//! owner that resumes finds its partitions gone and claims nothing more from
//! them. Rows it had claimed before stalling can only be re-sent as
//! duplicates of rows the new owner already published oldest-first.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kurier::outbox::store::lease::{self as store, PARTITIONS};
use kurier::{Error, SchemaName};
use sqlx::PgConnection;

/// This instance's view of its leases.
pub struct Leases {
    pub me: String,
    schema: SchemaName,
    lock: i64,
    ttl: Duration,
    owned: BTreeSet<i16>,
    /// Local deadline before which the leases are surely still valid.
    valid_until: Instant,
    next_heartbeat: Instant,
}

impl Leases {
    /// Registers this instance on `conn` (a session advisory lock marks it alive).
    pub async fn register(
        conn: &mut PgConnection,
        schema: SchemaName,
        ttl: Duration,
    ) -> Result<Leases, Error> {
        let me = uuid::Uuid::new_v4().to_string();
        // Positive, so that pg_locks' (classid << 32 | objid) reads it back unchanged.
        let lock = (uuid::Uuid::new_v4().as_u64_pair().0 >> 1) as i64;
        store::hold_liveness_lock(conn, lock).await?;
        let now = Instant::now();
        Ok(Leases {
            me,
            schema,
            lock,
            ttl,
            owned: BTreeSet::new(),
            valid_until: now,
            next_heartbeat: now,
        })
    }

    pub fn owned(&self) -> &BTreeSet<i16> {
        &self.owned
    }

    pub fn heartbeat_due(&self) -> bool {
        Instant::now() >= self.next_heartbeat
    }

    /// Whether a claimed batch may still be sent: our leases cannot have expired yet.
    pub fn still_valid(&self) -> bool {
        Instant::now() < self.valid_until
    }

    pub fn until_heartbeat(&self) -> Duration {
        self.next_heartbeat
            .saturating_duration_since(Instant::now())
    }

    /// Renews, then takes or gives up partitions so that live instances share
    /// them evenly. Runs between batches, so a released partition has nothing
    /// in flight.
    pub async fn heartbeat(&mut self, conn: &mut PgConnection) -> Result<(), Error> {
        self.renew(conn).await?;
        self.rebalance(conn).await
    }

    /// Extends the unexpired leases (and drops the others), without rebalancing:
    /// safe while a batch is in flight.
    pub async fn renew(&mut self, conn: &mut PgConnection) -> Result<(), Error> {
        let started = Instant::now();
        let renewed = store::renew(conn, &self.schema, &self.me, self.lock, self.ttl).await?;
        let lost: Vec<i16> = self
            .owned
            .iter()
            .copied()
            .filter(|p| !renewed.contains(p))
            .collect();
        if !lost.is_empty() {
            tracing::warn!(partitions = ?lost, "lost relay leases (expired or taken over); not publishing them");
        }
        self.owned = renewed.into_iter().collect();
        self.valid_until = started + self.ttl;
        self.next_heartbeat = Instant::now() + self.ttl / 3;
        Ok(())
    }

    /// The even share: each live instance holds at most ceil(32 / live).
    async fn rebalance(&mut self, conn: &mut PgConnection) -> Result<(), Error> {
        let live = store::live_instances(conn, &self.schema, self.ttl).await?;
        let target = PARTITIONS.div_ceil(live.max(1) as usize);
        if self.owned.len() > target {
            self.release(conn, self.owned.len() - target).await?;
        } else if self.owned.len() < target {
            self.take(conn, target - self.owned.len()).await?;
        }
        metrics::gauge!("kurier_relay_partitions_owned", "schema" => self.schema.to_string())
            .set(self.owned.len() as f64);
        Ok(())
    }

    async fn release(&mut self, conn: &mut PgConnection, n: usize) -> Result<(), Error> {
        let extra: Vec<i16> = self.owned.iter().rev().take(n).copied().collect();
        store::release(conn, &self.schema, &self.me, &extra).await?;
        for p in &extra {
            self.owned.remove(p);
        }
        tracing::info!(released = ?extra, owned = self.owned.len(), "rebalanced relay leases");
        Ok(())
    }

    async fn take(&mut self, conn: &mut PgConnection, n: usize) -> Result<(), Error> {
        let taken = store::take(conn, &self.schema, &self.me, self.lock, self.ttl, n).await?;
        if !taken.is_empty() {
            tracing::info!(taken = ?taken, owned = self.owned.len() + taken.len(), "took relay leases");
        }
        self.owned.extend(taken);
        Ok(())
    }

    /// Gives every lease back at shutdown, so others take over at once.
    pub async fn release_all(&mut self, conn: &mut PgConnection) -> Result<(), Error> {
        store::release_all(conn, &self.schema, &self.me).await?;
        self.owned.clear();
        Ok(())
    }
}
