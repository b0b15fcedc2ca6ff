//! One batch on its way to the broker: sending it in id order, and what
//! became of each row.

use std::collections::{HashMap, HashSet};

use futures::Future;
use kurier::outbox::store::OutboxRow;
use tracing::Instrument;

use crate::kafka::{Delivery, Failure, Publisher};

/// What became of one claimed row.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Outcome {
    /// Not sent or no report yet (held back behind its key, or shutdown): stays as is.
    Unknown,
    Delivered,
    Failed(Failure),
}

impl From<Delivery> for Outcome {
    fn from(d: Delivery) -> Self {
        match d {
            Delivery::Delivered => Outcome::Delivered,
            Delivery::Failed(f) => Outcome::Failed(f),
        }
    }
}

/// Hands `rows` to the producer in id order. Returns each row's outcome so far
/// and the delivery reports still to come (tagged with the row's index).
pub(super) fn send(
    publisher: &Publisher,
    rows: &[OutboxRow],
) -> (Vec<Outcome>, Vec<impl Future<Output = (usize, Delivery)>>) {
    let mut outcomes = vec![Outcome::Unknown; rows.len()];
    let mut pending = Vec::with_capacity(rows.len());
    // A key whose row failed to send sends nothing more from this batch,
    // so its later rows cannot overtake the failed one.
    let mut blocked: HashSet<(&str, Option<&str>)> = HashSet::new();
    for (i, row) in rows.iter().enumerate() {
        let key = (row.topic.as_str(), row.key.as_deref());
        if blocked.contains(&key) {
            continue;
        }
        match publisher.send(row) {
            Ok(sent) => pending.push(
                async move {
                    let delivery = sent.report.await;
                    crate::trace::delivered(delivery == Delivery::Delivered);
                    (i, delivery)
                }
                .instrument(sent.span),
            ),
            Err(Failure::Transient(why)) => {
                // Queue full or broker gone: keep the rest for the next round, in order.
                outcomes[i] = Outcome::Failed(Failure::Transient(why));
                break;
            }
            Err(failure) => {
                blocked.insert(key);
                outcomes[i] = Outcome::Failed(failure);
            }
        }
    }
    (outcomes, pending)
}

/// Whether any row failed for a reason that is the broker's, not the row's.
pub(super) fn any_transient(outcomes: &[Outcome]) -> bool {
    outcomes
        .iter()
        .any(|o| matches!(o, Outcome::Failed(Failure::Transient(_))))
}

/// The prefetched batch minus the keys whose rows in `rows` were not
/// delivered (failed, held back, or unanswered at shutdown): their later rows
/// must wait until those are settled, and are claimed again then.
pub(super) fn without_unfinished_keys(
    next: Vec<OutboxRow>,
    rows: &[OutboxRow],
    outcomes: &[Outcome],
) -> Vec<OutboxRow> {
    let unfinished: HashSet<(&str, Option<&str>)> = rows
        .iter()
        .zip(outcomes)
        .filter(|(_, o)| **o != Outcome::Delivered)
        .map(|(r, _)| (r.topic.as_str(), r.key.as_deref()))
        .collect();
    if unfinished.is_empty() {
        return next;
    }
    next.into_iter()
        .filter(|r| !unfinished.contains(&(r.topic.as_str(), r.key.as_deref())))
        .collect()
}

pub(super) fn count_per_topic<'a>(name: &'static str, rows: impl Iterator<Item = &'a OutboxRow>) {
    let mut per_topic: HashMap<&str, u64> = HashMap::new();
    for r in rows {
        *per_topic.entry(&r.topic).or_default() += 1;
    }
    for (topic, n) in per_topic {
        metrics::counter!(name, "topic" => topic.to_owned()).increment(n);
    }
}
