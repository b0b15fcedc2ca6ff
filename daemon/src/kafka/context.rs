//! What librdkafka reports about its connections, logged once. librdkafka
//! calls back twice per failed connection attempt (a `FAIL` log line and a
//! global error) and again on every reconnect; during a broker outage that
//! is a line or two a second. Here each distinct error is logged once (at
//! WARN: a broker blip is not an operator's emergency), repeats go to DEBUG,
//! and the next occurrence after [`QUIET_FOR`] says how many were held back.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;

/// How long an error stays "already logged".
pub const QUIET_FOR: Duration = Duration::from_secs(300);

/// The context every Kurier client is created with.
#[derive(Default)]
pub struct Context {
    seen: Mutex<HashMap<String, Seen>>,
}

struct Seen {
    logged_at: Instant,
    held_back: u64,
}

impl Context {
    /// `Some(held back since the last time)` when `message` should be logged now.
    pub fn first_in_a_while(&self, message: &str) -> Option<u64> {
        let key = normalized(message);
        let mut seen = self.seen.lock().expect("librdkafka log state");
        let now = Instant::now();
        match seen.get_mut(&key) {
            Some(s) if now.duration_since(s.logged_at) < QUIET_FOR => {
                s.held_back += 1;
                None
            }
            Some(s) => {
                let held_back = std::mem::take(&mut s.held_back);
                s.logged_at = now;
                Some(held_back)
            }
            None => {
                seen.insert(
                    key,
                    Seen {
                        logged_at: now,
                        held_back: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

/// One key per error, whatever the attempt: librdkafka appends a
/// parenthesised "(after 0ms in state CONNECT, 3 identical error(s)
/// suppressed)" that changes from one attempt to the next.
fn normalized(message: &str) -> String {
    match message.find(" (after ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        use RDKafkaLogLevel as L;
        // A failed connection is reported again through `error` below.
        let connection = fac == "FAIL";
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error | L::Warning if !connection => {
                tracing::warn!(target: "librdkafka", facility = fac, "{message}")
            }
            L::Notice | L::Info if !connection => {
                tracing::info!(target: "librdkafka", facility = fac, "{message}")
            }
            _ => tracing::debug!(target: "librdkafka", facility = fac, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let message = format!("{error}: {reason}");
        match self.first_in_a_while(&message) {
            Some(0) => tracing::warn!(target: "librdkafka", "{message}"),
            Some(held_back) => {
                tracing::warn!(target: "librdkafka", held_back, "{message} (again; not logged {held_back} time(s) since)")
            }
            None => tracing::debug!(target: "librdkafka", "{message}"),
        }
    }
}

impl ConsumerContext for Context {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_is_logged_once_whatever_its_attempt_details() {
        let c = Context::default();
        let first = "BrokerTransportFailure: 127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused (after 0ms in state CONNECT)";
        let again = "BrokerTransportFailure: 127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused (after 1ms in state CONNECT, 3 identical error(s) suppressed)";
        assert_eq!(c.first_in_a_while(first), Some(0));
        assert_eq!(c.first_in_a_while(again), None);
        assert_eq!(c.first_in_a_while(first), None);
        assert_eq!(
            c.first_in_a_while("AllBrokersDown: 1/1 brokers are down"),
            Some(0)
        );
        // After the quiet period the next one is logged, with the count held back.
        c.seen
            .lock()
            .unwrap()
            .values_mut()
            .for_each(|s| s.logged_at -= QUIET_FOR);
        assert_eq!(c.first_in_a_while(again), Some(2));
    }
}
