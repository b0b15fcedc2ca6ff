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

use sqlx::PgConnection;

use crate::schema::SchemaName;

/// Partitions in the schema (fixed by the migration).
pub const PARTITIONS: usize = 32;

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
    ) -> Result<Leases, sqlx::Error> {
        let me = uuid::Uuid::new_v4().to_string();
        // Positive, so that pg_locks' (classid << 32 | objid) reads it back unchanged.
        let lock = (uuid::Uuid::new_v4().as_u64_pair().0 >> 1) as i64;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(lock)
            .execute(&mut *conn)
            .await?;
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
    pub async fn heartbeat(&mut self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        self.renew(conn).await?;
        self.rebalance(conn).await
    }

    /// Extends the unexpired leases (and drops the others), without rebalancing:
    /// safe while a batch is in flight.
    pub async fn renew(&mut self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        let started = Instant::now();
        let ttl_secs = self.ttl.as_secs_f64();
        sqlx::query(&self.schema.sql("INSERT INTO kurier.relay_instances (owner, owner_lock, heartbeat_at) VALUES ($1, $2, now()) \
             ON CONFLICT (owner) DO UPDATE SET heartbeat_at = now()"))
        .bind(&self.me)
        .bind(self.lock)
        .execute(&mut *conn)
        .await?;
        let renewed: Vec<i16> = sqlx::query_scalar(&self.schema.sql(
            "UPDATE kurier.relay_leases SET expires_at = now() + make_interval(secs => $2) \
             WHERE owner = $1 AND expires_at > now() RETURNING partition",
        ))
        .bind(&self.me)
        .bind(ttl_secs)
        .fetch_all(&mut *conn)
        .await?;
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

    /// Starts the even share: drops dead instances' registrations, counts the live ones.
    async fn rebalance(&mut self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        let ttl_secs = self.ttl.as_secs_f64();
        sqlx::query(&self.schema.sql("DELETE FROM kurier.relay_instances WHERE heartbeat_at < now() - make_interval(secs => $1 * 10)"))
            .bind(ttl_secs)
            .execute(&mut *conn)
            .await?;
        let live: i64 = sqlx::query_scalar(&self.schema.sql("SELECT count(*) FROM kurier.relay_instances \
             WHERE heartbeat_at > now() - make_interval(secs => $1) AND kurier.lock_held(owner_lock)"))
        .bind(ttl_secs)
        .fetch_one(&mut *conn)
        .await?;
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

    async fn release(&mut self, conn: &mut PgConnection, n: usize) -> Result<(), sqlx::Error> {
        let extra: Vec<i16> = self.owned.iter().rev().take(n).copied().collect();
        sqlx::query(&self.schema.sql("UPDATE kurier.relay_leases SET owner = NULL, owner_lock = NULL, expires_at = NULL WHERE owner = $1 AND partition = ANY($2)"))
            .bind(&self.me)
            .bind(&extra)
            .execute(&mut *conn)
            .await?;
        for p in &extra {
            self.owned.remove(p);
        }
        tracing::info!(released = ?extra, owned = self.owned.len(), "rebalanced relay leases");
        Ok(())
    }

    async fn take(&mut self, conn: &mut PgConnection, n: usize) -> Result<(), sqlx::Error> {
        let taken: Vec<i16> = sqlx::query_scalar(&self.schema.sql(
            "UPDATE kurier.relay_leases SET owner = $1, owner_lock = $2, epoch = epoch + 1, \
                    expires_at = now() + make_interval(secs => $3) \
             WHERE partition IN (SELECT partition FROM kurier.relay_leases \
                                 WHERE owner IS NULL OR expires_at IS NULL OR expires_at <= now() \
                                    OR NOT kurier.lock_held(owner_lock) \
                                 ORDER BY partition LIMIT $4 FOR UPDATE SKIP LOCKED) \
             RETURNING partition",
        ))
        .bind(&self.me)
        .bind(self.lock)
        .bind(self.ttl.as_secs_f64())
        .bind(n as i64)
        .fetch_all(&mut *conn)
        .await?;
        if !taken.is_empty() {
            tracing::info!(taken = ?taken, owned = self.owned.len() + taken.len(), "took relay leases");
        }
        self.owned.extend(taken);
        Ok(())
    }

    /// Gives every lease back at shutdown, so others take over at once.
    pub async fn release_all(&mut self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        sqlx::query(&self.schema.sql("UPDATE kurier.relay_leases SET owner = NULL, owner_lock = NULL, expires_at = NULL WHERE owner = $1"))
            .bind(&self.me)
            .execute(&mut *conn)
            .await?;
        sqlx::query(
            &self
                .schema
                .sql("DELETE FROM kurier.relay_instances WHERE owner = $1"),
        )
        .bind(&self.me)
        .execute(&mut *conn)
        .await?;
        self.owned.clear();
        Ok(())
    }
}
