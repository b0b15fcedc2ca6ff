//! Liveness and readiness, shared between the loops (which report) and the
//! HTTP endpoints (which answer probes).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    started: Instant,
    /// Each loop's last progress, in milliseconds since `started`.
    components: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    database_ok: AtomicBool,
    /// A loop counts as stalled after this long without progress.
    stall_after: Duration,
}

/// One loop's progress reporter.
#[derive(Clone)]
pub struct Probe {
    last: Arc<AtomicU64>,
    health: Health,
}

impl Health {
    pub fn new(stall_after: Duration) -> Self {
        Health {
            inner: Arc::new(Inner {
                started: Instant::now(),
                components: Mutex::new(BTreeMap::new()),
                database_ok: AtomicBool::new(false),
                stall_after,
            }),
        }
    }

    /// Registers a loop; readiness requires every registered loop to progress.
    pub fn probe(&self, name: &str) -> Probe {
        // A loop (re)started now has not stalled yet.
        let last = Arc::new(AtomicU64::new(self.now_ms()));
        self.inner
            .components
            .lock()
            .expect("health lock")
            .insert(name.to_owned(), last.clone());
        Probe {
            last,
            health: self.clone(),
        }
    }

    pub fn set_database(&self, ok: bool) {
        self.inner.database_ok.store(ok, Ordering::Relaxed);
    }

    fn now_ms(&self) -> u64 {
        self.inner.started.elapsed().as_millis() as u64
    }

    /// Ready: the database answers and every loop made progress recently.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.inner.database_ok.load(Ordering::Relaxed) {
            return Err("database not reachable (or not yet connected)".into());
        }
        let now = self.now_ms();
        for (name, last) in self.inner.components.lock().expect("health lock").iter() {
            let idle = Duration::from_millis(now.saturating_sub(last.load(Ordering::Relaxed)));
            if idle > self.inner.stall_after {
                return Err(format!(
                    "{name}: no progress for {:.1}s (broker or database unavailable?)",
                    idle.as_secs_f64()
                ));
            }
        }
        Ok(())
    }
}

impl Probe {
    /// The loop completed a step (work done, or found nothing to do while
    /// healthy). Implies the database answered.
    pub fn progress(&self) {
        self.last.store(self.health.now_ms(), Ordering::Relaxed);
        self.health.set_database(true);
    }

    pub fn set_database(&self, ok: bool) {
        self.health.set_database(ok);
    }
}

/// Asks the broker for metadata at most every few seconds while a loop is
/// idle, so that readiness turns false when the broker is gone even with
/// nothing to do.
#[derive(Default)]
pub struct BrokerProbe {
    last: Option<(Instant, bool)>,
}

impl BrokerProbe {
    const EVERY: Duration = Duration::from_secs(5);

    /// `check` runs on a blocking thread (a metadata request blocks).
    pub async fn reachable(&mut self, check: impl FnOnce() -> bool + Send + 'static) -> bool {
        if let Some((at, ok)) = self.last {
            if at.elapsed() < Self::EVERY {
                return ok;
            }
        }
        let ok = tokio::task::spawn_blocking(check).await.unwrap_or(false);
        // Said once per outage, not on every probe.
        let was_ok = self.last.is_none_or(|(_, was)| was);
        if was_ok && !ok {
            tracing::warn!("broker unreachable (metadata request failed) while idle");
        } else if !was_ok && ok {
            tracing::info!("broker reachable again");
        }
        self.last = Some((Instant::now(), ok));
        ok
    }
}
