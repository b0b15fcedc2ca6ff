//! Which relay instance may publish.
//!
//! One instance at a time holds a session-level advisory lock on a dedicated
//! connection; the others wait as standbys. The holder claims and deletes rows
//! on that same connection, which is the fence: if the holder stalls and its
//! connection is dropped, the lock is released with it, and a stale holder
//! that wakes up can no longer delete (or so finish) anything.

use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::health::Probe;

/// Advisory lock key of the active relay ("kurier-r").
const RELAY_LOCK: i64 = 0x6b75_7269_6572_2d72;

/// The active relay's lease: the connection that holds the lock.
pub struct Lease {
    pub conn: PgConnection,
}

/// Waits until this instance holds the lease, or `cancel` fires (`Ok(None)`).
/// Connection errors are retried every `interval`; setup errors are returned.
pub async fn acquire(
    database_url: &str,
    interval: Duration,
    health: &Probe,
    cancel: &CancellationToken,
) -> Result<Option<Lease>, Error> {
    let mut announced = false;
    loop {
        match try_acquire(database_url).await {
            Ok(Some(lease)) => {
                tracing::info!("relay lease acquired: this instance is the active relay");
                return Ok(Some(lease));
            }
            Ok(None) => {
                health.progress();
                if !announced {
                    tracing::info!("another instance holds the relay lease; standing by");
                    announced = true;
                }
            }
            Err(e) if e.is_retryable() => {
                health.set_database(false);
                tracing::warn!(error = %e, "cannot reach the database to take the relay lease; retrying");
            }
            Err(e) => return Err(e),
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

async fn try_acquire(database_url: &str) -> Result<Option<Lease>, Error> {
    let mut conn = PgConnection::connect(database_url).await?;
    crate::schema::ensure_migrated(&mut conn).await?;
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(RELAY_LOCK)
        .fetch_one(&mut conn)
        .await?;
    if got {
        Ok(Some(Lease { conn }))
    } else {
        let _ = conn.close().await;
        Ok(None)
    }
}
