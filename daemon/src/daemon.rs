//! `kurier run`: every loop and the HTTP endpoints, under one cancellation
//! token. Runnable in-process (tests start it like this) or from `main.rs`.
//! Each component gets a pool (or connection options) and its own section of
//! the configuration.

use std::net::SocketAddr;
use std::time::Duration;

use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{Config, InboxConfig};
use crate::error::Error;
use crate::health::Health;
use crate::inbox_writer::InboxWriter;
use crate::maintenance::Maintenance;
use crate::projections::ProjectionsRunner;
use crate::relay::Relay;
use crate::saga::SagaRunner;

/// A configured daemon whose HTTP listener (if any) is already bound.
pub struct Daemon {
    config: Config,
    listener: Option<TcpListener>,
    health: Health,
}

type Loop = JoinHandle<Result<(), Error>>;

impl Daemon {
    /// Binds the HTTP address, so that a port-0 address can be read back before running.
    pub async fn bind(config: Config) -> Result<Daemon, Error> {
        config.require_kafka()?;
        let listener = match config.http_addr {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(Error::Http)?),
            None => None,
        };
        // Ready means progress within a few poll intervals, but never stricter than 10 s.
        let stall_after = (config.relay.poll_interval * 20).max(Duration::from_secs(10));
        Ok(Daemon {
            config,
            listener,
            health: Health::new(stall_after),
        })
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Runs until `cancel` fires; returns once the in-flight batches are
    /// finished (or their grace period has passed) and the HTTP server has
    /// stopped. A loop that fails for good stops the others.
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), Error> {
        let tracker = TaskTracker::new();
        self.serve_http(&tracker, &cancel);
        let mut loops = Vec::new();
        if let Some(inbox) = self.config.inbox.clone() {
            loops.push(self.inbox_writer(&tracker, inbox, &cancel));
        }
        if self.config.relay.enabled {
            loops.extend(self.relays(&tracker, &cancel));
        }
        if self.config.sagas.enabled {
            self.sagas(&tracker, &cancel);
        }
        if self.config.projections.enabled {
            let cfg = &self.config;
            let runner = ProjectionsRunner::new(
                cfg.database.lazy_pool(cfg.database.max_connections),
                cfg.database.clone(),
                cfg.projections.clone(),
            );
            let span = tracing::info_span!("projections");
            tracker.spawn(runner.run(cancel.clone()).instrument(span));
        }
        if loops.is_empty() {
            tracing::warn!("neither the relay nor the inbox writer is enabled; serving HTTP only");
            self.health.set_database(true);
        }
        tracker.close();
        let result = first_error(loops).await;
        cancel.cancel();
        tracker.wait().await;
        result
    }

    fn serve_http(&mut self, tracker: &TaskTracker, cancel: &CancellationToken) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        crate::http::prometheus();
        let backlog = crate::http::Backlog {
            // One connection, opened on the first scrape, for the backlog gauges.
            pool: self.config.database.lazy_pool(1),
            schemas: if self.config.relay.enabled {
                self.config.relay.schemas.clone()
            } else {
                Vec::new()
            },
            inbox: self.config.inbox.as_ref().map(|i| i.schema.clone()),
            sagas: self
                .config
                .sagas
                .enabled
                .then(|| self.config.sagas.schema.clone()),
            events: self.config.schemas(),
            projections: self
                .config
                .projections
                .enabled
                .then(|| self.config.projections.schema.clone()),
        };
        let (health, cancel) = (self.health.clone(), cancel.clone());
        tracker.spawn(async move {
            if let Err(e) = crate::http::serve(listener, health, Some(backlog), cancel).await {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
    }

    fn inbox_writer(
        &self,
        tracker: &TaskTracker,
        inbox: InboxConfig,
        cancel: &CancellationToken,
    ) -> Loop {
        let pool = self
            .config
            .database
            .lazy_pool(self.config.database.max_connections);
        let writer = InboxWriter::new(
            pool.clone(),
            self.config.kafka.clone(),
            inbox.clone(),
            self.health.probe("inbox"),
        );
        tracker.spawn(prune_periodically(pool, inbox, cancel.clone()));
        tracker.spawn(stop_all_on_error(
            writer.run(cancel.clone()),
            cancel.clone(),
        ))
    }

    /// The saga orchestrator: reply consumer, reply applier, timers; and
    /// retention of its processed replies in the inbox.
    fn sagas(&self, tracker: &TaskTracker, cancel: &CancellationToken) {
        let cfg = &self.config;
        let pool = cfg.database.lazy_pool(cfg.database.max_connections);
        let runner = SagaRunner::new(
            pool.clone(),
            cfg.kafka.clone(),
            cfg.sagas.clone(),
            self.health.clone(),
        );
        tracker.spawn(
            runner
                .run(cancel.clone())
                .instrument(tracing::info_span!("sagas")),
        );
        let retention = InboxConfig {
            schema: cfg.sagas.schema.clone(),
            consumer: cfg.sagas.consumer.clone(),
            topics: Vec::new(),
            batch_size: 1,
            max_batch_bytes: 16 << 20,
            batch_wait: Duration::ZERO,
            message_id_headers: Vec::new(),
            properties: Default::default(),
            prune_payload_after: Duration::from_secs(86_400),
            forget_after: Duration::from_secs(7 * 86_400),
        };
        let inbox_prunes_it = cfg
            .inbox
            .as_ref()
            .is_some_and(|i| i.schema == cfg.sagas.schema);
        if !inbox_prunes_it {
            tracker.spawn(prune_periodically(pool, retention, cancel.clone()));
        }
    }

    /// One relay loop per schema: each has its own leases, connections and
    /// producer, so one tenant's backlog or poison rows never stall another's.
    /// Beside each, the outbox's upkeep (`maintenance`).
    fn relays(&self, tracker: &TaskTracker, cancel: &CancellationToken) -> Vec<Loop> {
        let c = &self.config;
        c.relay
            .schemas
            .iter()
            .map(|schema| {
                let relay = Relay::new(
                    schema.clone(),
                    c.database.clone(),
                    c.kafka.clone(),
                    c.relay.clone(),
                    self.health.probe(&format!("relay:{schema}")),
                );
                let span = tracing::info_span!("relay", schema = %schema);
                if c.relay.vacuum_dead_rows > 0 {
                    let upkeep = Maintenance::new(
                        schema.clone(),
                        c.database.clone(),
                        c.relay.vacuum_dead_rows,
                    );
                    tracker.spawn(upkeep.run(cancel.clone()).instrument(span.clone()));
                }
                let work = relay.run(cancel.clone()).instrument(span);
                tracker.spawn(stop_all_on_error(work, cancel.clone()))
            })
            .collect()
    }
}

/// Waits for every loop; the first error (or panic) is the result.
async fn first_error(loops: Vec<Loop>) -> Result<(), Error> {
    let mut result = Ok(());
    for handle in loops {
        let outcome = handle
            .await
            .unwrap_or_else(|e| Err(Error::Panicked(e.to_string())));
        if let Err(e) = outcome {
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    result
}

/// A loop that fails for good stops the daemon (and so the other loops).
async fn stop_all_on_error(
    work: impl std::future::Future<Output = Result<(), Error>>,
    cancel: CancellationToken,
) -> Result<(), Error> {
    let result = work.await;
    if let Err(e) = &result {
        tracing::error!(error = %e, "stopping: a loop failed");
        cancel.cancel();
    }
    result
}

/// Inbox retention, once a minute.
async fn prune_periodically(pool: PgPool, cfg: InboxConfig, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let pruned = kurier::inbox::store::prune(
            &pool,
            &cfg.schema,
            cfg.prune_payload_after,
            cfg.forget_after,
        )
        .await;
        match pruned {
            Ok((0, 0)) => {}
            Ok((pruned, deleted)) => tracing::info!(pruned, deleted, "inbox retention"),
            Err(e) => tracing::warn!(error = %e, "inbox retention failed; will retry"),
        }
    }
}
