//! Outbox upkeep where autovacuum cannot keep up or is off (as on some
//! production clusters, and on this project's test machines): the relay's
//! deletes leave a dead row per message, so every `CHECK_EVERY` the dead
//! rows are counted and, past `relay.vacuum_dead_rows`, the table is
//! vacuumed and analyzed (`VACUUM (SKIP_LOCKED, ANALYZE)`, which steps
//! aside when autovacuum is already at it). Only a role that owns the table
//! may do so; otherwise this says once what to fix.

use std::time::{Duration, Instant};

use kurier::outbox::store::maintenance;
use kurier::SchemaName;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseConfig;

/// How often the dead rows are counted (one cheap statistics query).
pub const CHECK_EVERY: Duration = Duration::from_secs(10);

/// One schema's outbox upkeep.
pub struct Maintenance {
    schema: SchemaName,
    db: DatabaseConfig,
    /// Vacuum once this many dead rows have piled up.
    dead_rows: u64,
}

impl Maintenance {
    pub fn new(schema: SchemaName, db: DatabaseConfig, dead_rows: u64) -> Self {
        Maintenance {
            schema,
            db,
            dead_rows,
        }
    }

    /// Checks every [`CHECK_EVERY`] until `cancel` fires. Failures are
    /// logged and retried at the next check: upkeep never stops the daemon.
    pub async fn run(self, cancel: CancellationToken) {
        let mut conn: Option<PgConnection> = None;
        let mut refused_logged = false;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(CHECK_EVERY) => {}
            }
            if let Err(e) = self.check(&mut conn, &mut refused_logged).await {
                tracing::warn!(schema = %self.schema, error = %self.db.scrub(&e.to_string()), "outbox upkeep failed; will retry");
                conn = None;
            }
        }
    }

    async fn check(
        &self,
        conn: &mut Option<PgConnection>,
        refused_logged: &mut bool,
    ) -> Result<(), kurier::Error> {
        if conn.is_none() {
            *conn = Some(PgConnection::connect_with(self.db.connect_options()).await?);
        }
        let c = conn.as_mut().expect("connected above");
        let dead = maintenance::dead_rows(c, &self.schema).await?;
        if (dead as u64) < self.dead_rows {
            return Ok(());
        }
        if !maintenance::health(&mut *c, &self.schema).await?.may_vacuum {
            if !std::mem::replace(refused_logged, true) {
                tracing::warn!(schema = %self.schema, dead, "the outbox has {dead} dead rows and this role may not VACUUM it; make the relay's role its owner, or let autovacuum reach it (kurier check)");
            }
            return Ok(());
        }
        let started = Instant::now();
        maintenance::vacuum(c, &self.schema).await?;
        metrics::counter!("kurier_outbox_vacuums_total", "schema" => self.schema.to_string())
            .increment(1);
        let ms = started.elapsed().as_millis() as u64;
        tracing::info!(schema = %self.schema, dead, ms, "vacuumed the outbox");
        Ok(())
    }
}
