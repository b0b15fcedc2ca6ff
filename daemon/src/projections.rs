//! The SQL projections the daemon runs (`kurier.define_projection`): one
//! task per projection, each the only runner of it across daemon instances
//! (a session advisory lock on a connection of its own: a killed daemon's
//! lock vanishes with it, and another takes over), calling
//! `kurier.run_projection` in a transaction per batch. That function applies
//! the batch and moves the checkpoint (compare-and-set) in the same
//! transaction, and records a failing event itself (backoff, then parked),
//! so the rule is enforced in SQL; this only decides when to call it.

use std::collections::BTreeMap;
use std::time::Duration;

use kurier::projection::store;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{DatabaseConfig, ProjectionsConfig};

pub struct ProjectionsRunner {
    pool: PgPool,
    db: DatabaseConfig,
    cfg: ProjectionsConfig,
}

impl ProjectionsRunner {
    pub fn new(pool: PgPool, db: DatabaseConfig, cfg: ProjectionsConfig) -> Self {
        ProjectionsRunner { pool, db, cfg }
    }

    /// Keeps one task per defined SQL projection until `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) {
        let mut running: BTreeMap<String, (CancellationToken, JoinHandle<()>)> = BTreeMap::new();
        while !cancel.is_cancelled() {
            match store::sql_projections(&self.pool, &self.cfg.schema).await {
                Ok(names) => {
                    let gone: Vec<String> = running
                        .keys()
                        .filter(|n| !names.contains(n))
                        .cloned()
                        .collect();
                    for name in gone {
                        let (stop, task) = running.remove(&name).expect("listed above");
                        stop.cancel();
                        let _ = task.await;
                    }
                    let new: Vec<String> = names
                        .into_iter()
                        .filter(|n| !running.contains_key(n))
                        .collect();
                    for name in new {
                        let stop = cancel.child_token();
                        let one = One {
                            name: name.clone(),
                            pool: self.pool.clone(),
                            db: self.db.clone(),
                            cfg: self.cfg.clone(),
                        };
                        running.insert(name, (stop.clone(), tokio::spawn(one.run(stop))));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the projections; will retry"),
            }
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(self.cfg.refresh) => {}
            }
        }
        for (_, (_, task)) in running {
            let _ = task.await;
        }
    }
}

/// One projection's runner.
struct One {
    name: String,
    pool: PgPool,
    db: DatabaseConfig,
    cfg: ProjectionsConfig,
}

impl One {
    async fn run(self, stop: CancellationToken) {
        let key = store::runner_lock(&self.cfg.schema, &self.name);
        while !stop.is_cancelled() {
            // The lock's connection: while it lives, this daemon runs the projection.
            let mut lock = match PgConnection::connect_with(self.db.connect_options()).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(projection = %self.name, error = %self.db.scrub(&e.to_string()), "cannot connect; will retry");
                    self.pause(self.cfg.refresh, &stop).await;
                    continue;
                }
            };
            match store::try_lock_runner(&mut lock, key).await {
                Ok(true) => {
                    tracing::info!(projection = %self.name, "running the projection");
                    self.serve(&mut lock, &stop).await;
                    let _ = lock.close().await;
                }
                // Another daemon runs it: stand by and try again.
                Ok(false) => {
                    self.pause(self.cfg.refresh, &stop).await;
                }
                Err(e) => {
                    tracing::warn!(projection = %self.name, error = %e, "cannot take the projection's lock; will retry");
                    self.pause(self.cfg.refresh, &stop).await;
                }
            }
        }
    }

    /// Runs batches while the lock's connection lives.
    async fn serve(&self, lock: &mut PgConnection, stop: &CancellationToken) {
        let mut batch = self.cfg.batch_size;
        while !stop.is_cancelled() {
            let wait = match self.batch(batch).await {
                Ok(run) => {
                    self.observe(&run);
                    batch = if run.status == "rebuilding" {
                        self.cfg.rebuild_batch_size
                    } else {
                        self.cfg.batch_size
                    };
                    match run.outcome.as_str() {
                        "applied" if run.more => continue,
                        "waiting" | "failed" => Duration::from_secs_f64(
                            run.retry_in_secs.unwrap_or(1.0).clamp(0.0, 60.0),
                        ),
                        "stopped" | "parked" => self.cfg.refresh,
                        _ => self.cfg.poll_interval,
                    }
                }
                Err(e) => {
                    tracing::warn!(projection = %self.name, error = %e, "projection batch failed (not the event's fault); will retry");
                    self.cfg.refresh
                }
            };
            if self.pause(wait, stop).await {
                return;
            }
            // A lost lock connection means another daemon may take over now.
            if lock.ping().await.is_err() {
                tracing::warn!(projection = %self.name, "lost the projection's lock connection");
                return;
            }
        }
    }

    /// One transaction: the batch and its checkpoint, or a recorded failure.
    async fn batch(&self, max: i32) -> Result<store::Run, kurier::Error> {
        let mut tx = self.pool.begin().await?;
        let run = store::run(&mut tx, &self.cfg.schema, &self.name, max).await?;
        tx.commit().await?;
        Ok(run)
    }

    fn observe(&self, run: &store::Run) {
        if run.applied > 0 {
            metrics::counter!("kurier_projection_events_applied_total", "projection" => self.name.clone())
                .increment(run.applied as u64);
        }
        match run.outcome.as_str() {
            "failed" => {
                tracing::warn!(projection = %self.name, position = run.position, "projection event failed; will retry (kurier projections status)")
            }
            "parked" => {
                tracing::error!(projection = %self.name, position = run.position, "projection parked at a failing event: fix the handler, then `kurier projections resume` (or `skip`)")
            }
            _ => {}
        }
    }

    /// `true` when stopped.
    async fn pause(&self, d: Duration, stop: &CancellationToken) -> bool {
        tokio::select! {
            _ = stop.cancelled() => true,
            _ = tokio::time::sleep(d) => false,
        }
    }
}
