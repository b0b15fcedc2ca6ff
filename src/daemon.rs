//! `kurier run`: the relay and the HTTP endpoints, under one cancellation token.
//! Runnable in-process (tests start it like this) or from `main.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::Config;
use crate::config::InboxConfig;
use crate::error::Error;
use crate::health::Health;
use crate::inbox_writer::InboxWriter;
use crate::relay::Relay;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

/// A configured daemon whose HTTP listener (if any) is already bound.
pub struct Daemon {
    config: Config,
    listener: Option<TcpListener>,
    health: Health,
}

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

    /// Runs until `cancel` fires; returns once the in-flight batch is finished
    /// (or its grace period has passed) and the HTTP server has stopped.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), Error> {
        let tracker = TaskTracker::new();
        let backlog = self.backlog()?;
        if let Some(listener) = self.listener {
            crate::http::prometheus();
            let (health, cancel) = (self.health.clone(), cancel.clone());
            tracker.spawn(async move {
                if let Err(e) = crate::http::serve(listener, health, Some(backlog), cancel).await {
                    tracing::error!(error = %e, "HTTP server failed");
                }
            });
        }
        let c = self.config;
        let mut loops: Vec<tokio::task::JoinHandle<Result<(), Error>>> = Vec::new();
        if let Some(inbox) = c.inbox.clone() {
            let pool = PgPoolOptions::new()
                .max_connections(c.database_max_connections)
                .connect_lazy(&c.database_url)?;
            let writer = InboxWriter::new(
                pool.clone(),
                c.kafka.clone(),
                inbox.clone(),
                self.health.probe("inbox"),
            );
            loops.push(tracker.spawn(stop_all_on_error(
                writer.run(cancel.clone()),
                cancel.clone(),
            )));
            tracker.spawn(prune_periodically(pool, inbox, cancel.clone()));
        }
        if c.relay.enabled {
            // One relay loop per schema: each has its own leases, connection
            // and producer, so one tenant's backlog or poison rows never
            // stall another's.
            for schema in &c.relay.schemas {
                let relay = Relay::new(
                    schema.clone(),
                    c.database_url.clone(),
                    c.kafka.clone(),
                    c.relay.clone(),
                    c.shutdown_grace,
                    self.health.probe(&format!("relay:{schema}")),
                );
                let span = tracing::info_span!("relay", schema = %schema);
                let work = relay.run(cancel.clone()).instrument(span);
                loops.push(tracker.spawn(stop_all_on_error(work, cancel.clone())));
            }
        }
        if loops.is_empty() {
            tracing::warn!("neither the relay nor the inbox writer is enabled; serving HTTP only");
            self.health.set_database(true);
        }
        tracker.close();
        let mut result = Ok(());
        for handle in loops {
            let outcome = handle.await.unwrap_or_else(|e| {
                Err(Error::Setup {
                    problem: format!("task panicked: {e}"),
                    fix: "report a bug".into(),
                })
            });
            if let Err(e) = outcome {
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        cancel.cancel();
        tracker.wait().await;
        result
    }
}

impl Daemon {
    /// One connection, opened on the first scrape, for the backlog gauges.
    fn backlog(&self) -> Result<crate::http::Backlog, Error> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(2))
            .connect_lazy(&self.config.database_url)?;
        Ok(crate::http::Backlog {
            pool,
            schemas: if self.config.relay.enabled {
                self.config.relay.schemas.clone()
            } else {
                Vec::new()
            },
            inbox: self.config.inbox.is_some(),
        })
    }
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
        match crate::inbox::prune(&pool, cfg.prune_payload_after, cfg.forget_after).await {
            Ok((0, 0)) => {}
            Ok((pruned, deleted)) => tracing::info!(pruned, deleted, "inbox retention"),
            Err(e) => tracing::warn!(error = %e, "inbox retention failed; will retry"),
        }
    }
}
