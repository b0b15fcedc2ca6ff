//! Liveness and readiness, shared between the relay (which reports) and the
//! HTTP endpoints (which answer probes).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    started: Instant,
    /// Milliseconds since `started` of the last completed loop step.
    last_progress_ms: AtomicU64,
    database_ok: AtomicBool,
    /// The loop counts as stalled after this long without progress.
    stall_after: Duration,
}

impl Health {
    pub fn new(stall_after: Duration) -> Self {
        Health {
            inner: Arc::new(Inner {
                started: Instant::now(),
                last_progress_ms: AtomicU64::new(0),
                database_ok: AtomicBool::new(false),
                stall_after,
            }),
        }
    }

    /// The loop completed a step: a claim that found nothing, or a batch that
    /// was published and finished. Implies the database answered.
    pub fn progress(&self) {
        let ms = self.inner.started.elapsed().as_millis() as u64;
        self.inner.last_progress_ms.store(ms, Ordering::Relaxed);
        self.inner.database_ok.store(true, Ordering::Relaxed);
    }

    pub fn set_database(&self, ok: bool) {
        self.inner.database_ok.store(ok, Ordering::Relaxed);
    }

    /// Ready: the database answers and the loop made progress recently.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.inner.database_ok.load(Ordering::Relaxed) {
            return Err("database not reachable (or not yet connected)".into());
        }
        let last = Duration::from_millis(self.inner.last_progress_ms.load(Ordering::Relaxed));
        let idle = self.inner.started.elapsed().saturating_sub(last);
        if idle > self.inner.stall_after {
            return Err(format!(
                "no progress for {:.1}s (broker or database unavailable?)",
                idle.as_secs_f64()
            ));
        }
        Ok(())
    }
}
