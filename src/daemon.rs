//! `kurier run`: the relay and the HTTP endpoints, under one cancellation token.
//! Runnable in-process (tests start it like this) or from `main.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::error::Error;
use crate::health::Health;
use crate::relay::Relay;

/// A configured daemon whose HTTP listener (if any) is already bound.
pub struct Daemon {
    config: Config,
    listener: Option<TcpListener>,
    health: Health,
}

impl Daemon {
    /// Binds the HTTP address, so that a port-0 address can be read back before running.
    pub async fn bind(config: Config) -> Result<Daemon, Error> {
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
        if let Some(listener) = self.listener {
            crate::http::prometheus();
            let (health, cancel) = (self.health.clone(), cancel.clone());
            tracker.spawn(async move {
                if let Err(e) = crate::http::serve(listener, health, cancel).await {
                    tracing::error!(error = %e, "HTTP server failed");
                }
            });
        }
        tracker.close();
        let result = if self.config.relay.enabled {
            let c = self.config;
            Relay::new(
                c.database_url,
                c.kafka,
                c.relay,
                c.shutdown_grace,
                self.health,
            )
            .run(cancel.clone())
            .await
        } else {
            tracing::info!("relay disabled (relay.enabled = false)");
            self.health.progress();
            cancel.cancelled().await;
            Ok(())
        };
        // A fatal error stops the HTTP server too.
        cancel.cancel();
        tracker.wait().await;
        result
    }
}
