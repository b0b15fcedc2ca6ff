//! Everything that talks to Kafka; the only module that imports rdkafka.
//!
//! - this file: the client settings ([`KafkaConfig`]), the one builder of a
//!   librdkafka configuration per [`Role`], and the one list of properties
//!   Kurier enforces ([`ENFORCED`]) because its guarantees depend on them;
//! - [`producer`]: the relay's producer ([`Publisher`]), which reports each
//!   row as [`Delivery::Delivered`] or [`Delivery::Failed`] ([`delivery`]);
//! - [`record`]: the outbox row → Kafka record mapping (headers, CloudEvents);
//! - [`consumer`]: the inbox writer's consumer (offsets stored only after
//!   the database commit);
//! - [`cluster`]: metadata requests for readiness and `kurier check`;
//! - [`context`]: librdkafka's log lines and errors, each logged once.

pub mod cluster;
pub mod consumer;
pub mod context;
pub mod delivery;
pub mod producer;
pub mod record;

use std::collections::BTreeMap;

use rdkafka::config::ClientConfig;

pub use consumer::InboxConsumer;
pub use delivery::{Delivery, Failure};
pub use producer::Publisher;

/// Brokers and the user's librdkafka properties (checked against [`ENFORCED`]).
#[derive(Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub properties: BTreeMap<String, String>,
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Property values may hold SASL passwords.
        let keys: Vec<&String> = self.properties.keys().collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("property_keys", &keys)
            .finish()
    }
}

/// The CloudEvents Kafka protocol binding, binary content mode.
#[derive(Debug, Clone)]
pub struct CloudEvents {
    /// `ce_source` of every event (a URI-reference naming this producer).
    pub source: String,
}

/// What a client is for; each role gets its own librdkafka configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The relay's idempotent producer.
    Producer,
    /// The inbox writer's consumer, in group `group`.
    InboxConsumer,
    /// A client that only asks for metadata (`kurier check`).
    Probe,
}

/// A property Kurier sets itself, and which values a user may also give it.
pub struct Enforced {
    pub property: &'static str,
    /// The value set; `None` when it comes from another key (the fix says which).
    pub value: Option<&'static str>,
    /// Values a user may pass too (meaning the same); empty: none.
    pub accepted: &'static [&'static str],
    pub roles: &'static [Role],
    pub why: &'static str,
}

const ALL: &[Role] = &[Role::Producer, Role::InboxConsumer, Role::Probe];

/// The properties the delivery guarantees rest on.
pub const ENFORCED: &[Enforced] = &[
    Enforced {
        property: "bootstrap.servers",
        value: None,
        accepted: &[],
        roles: ALL,
        why: "set kafka.brokers (or KAFKA_BROKERS) instead",
    },
    Enforced {
        property: "enable.idempotence",
        value: Some("true"),
        accepted: &["true"],
        roles: &[Role::Producer],
        why: "without it producer retries reorder messages of one key",
    },
    Enforced {
        property: "acks",
        value: Some("all"),
        accepted: &["all", "-1"],
        roles: &[Role::Producer],
        why: "anything less than acks=all can lose acknowledged messages",
    },
    Enforced {
        property: "group.id",
        value: None,
        accepted: &[],
        roles: &[Role::InboxConsumer],
        why: "set inbox.consumer instead: it names the consumer group and the inbox's dedup scope",
    },
    Enforced {
        property: "enable.auto.offset.store",
        value: Some("false"),
        accepted: &["false"],
        roles: &[Role::InboxConsumer],
        why: "offsets may be stored only after the inbox transaction committed",
    },
    Enforced {
        property: "enable.auto.commit",
        value: Some("true"),
        accepted: &["true"],
        roles: &[Role::InboxConsumer],
        why: "the offsets stored after each commit are committed by librdkafka's auto-commit",
    },
];

/// Producer-only properties in `kafka.properties` that a consumer would warn about.
const PRODUCER_ONLY: &[&str] = &[
    "enable.idempotence",
    "acks",
    "linger.ms",
    "partitioner",
    "message.timeout.ms",
    "compression.type",
    "batch.size",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
];

/// A pass-through property that would break a guarantee.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropertyError {
    pub property: String,
    pub value: String,
    pub fix: String,
}

/// Refuses properties listed in [`ENFORCED`] with a value not accepted.
pub fn check_properties(props: &BTreeMap<String, String>) -> Result<(), PropertyError> {
    for e in ENFORCED {
        let Some(v) = props.get(e.property) else {
            continue;
        };
        if e.accepted.iter().any(|a| a.eq_ignore_ascii_case(v.trim())) {
            continue;
        }
        let fix = match e.value {
            Some(set) => format!("remove it (Kurier sets {}={set}): {}", e.property, e.why),
            None => e.why.to_owned(),
        };
        return Err(PropertyError {
            property: e.property.to_owned(),
            value: v.clone(),
            fix,
        });
    }
    Ok(())
}

/// The librdkafka configuration of a client in `role`: Kurier's defaults,
/// then the user's properties, then the enforced ones. `extra` are the
/// role's own user properties (the inbox's `inbox.properties`), applied
/// after `kafka.properties`; `group` names the consumer group.
pub fn client_config(
    cfg: &KafkaConfig,
    role: Role,
    extra: &BTreeMap<String, String>,
    group: Option<&str>,
) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in defaults(role) {
        c.set(*k, *v);
    }
    let shared = cfg
        .properties
        .iter()
        .filter(|(k, _)| role == Role::Producer || !PRODUCER_ONLY.contains(&k.as_str()));
    for (k, v) in shared.chain(extra) {
        c.set(k, v);
    }
    c.set("bootstrap.servers", &cfg.brokers);
    for e in ENFORCED.iter().filter(|e| e.roles.contains(&role)) {
        if let Some(v) = e.value {
            c.set(e.property, v);
        }
    }
    if let Some(group) = group {
        c.set("group.id", group);
    }
    c
}

/// Defaults a user may override, per role.
fn defaults(role: Role) -> &'static [(&'static str, &'static str)] {
    match role {
        // murmur2_random: the Java client's key -> partition mapping (SPEC).
        Role::Producer => &[
            ("linger.ms", "1"),
            ("message.timeout.ms", "300000"),
            ("partitioner", "murmur2_random"),
        ],
        // max.poll.interval.ms is also the rebalance timeout: the default 300 s
        // would stall a group for minutes on brokers that wait for it (Tansu
        // does). librdkafka prefetches up to 64 MiB per consumer by default;
        // the database, not the fetch, bounds ingest, so a sidecar keeps 2 MiB
        // (~2 batches) and refills it after 10 ms instead of librdkafka's 1 s
        // pause once the buffer was full (`make bench`: same ingest as 16 MiB,
        // peak RSS 36-37 instead of 46-49 MiB).
        Role::InboxConsumer => &[
            ("session.timeout.ms", "10000"),
            ("max.poll.interval.ms", "30000"),
            ("auto.offset.reset", "earliest"),
            ("auto.commit.interval.ms", "1000"),
            ("queued.max.messages.kbytes", "2048"),
            ("fetch.queue.backoff.ms", "10"),
        ],
        Role::Probe => &[],
    }
}

/// A Kafka client error (creating a client, subscribing, a metadata request).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ClientError(#[from] rdkafka::error::KafkaError);

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(props: &[(&str, &str)]) -> KafkaConfig {
        KafkaConfig {
            brokers: "b:9092".into(),
            properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn enforced_properties_win_and_defaults_yield() {
        let user = cfg(&[
            ("acks", "all"),
            ("linger.ms", "7"),
            ("bootstrap.servers", "x"),
        ]);
        let p = client_config(&user, Role::Producer, &BTreeMap::new(), None);
        assert_eq!(p.get("enable.idempotence"), Some("true"));
        assert_eq!(p.get("acks"), Some("all"));
        assert_eq!(p.get("linger.ms"), Some("7"));
        assert_eq!(p.get("partitioner"), Some("murmur2_random"));
        assert_eq!(p.get("bootstrap.servers"), Some("b:9092"));
        let c = client_config(
            &user,
            Role::InboxConsumer,
            &BTreeMap::new(),
            Some("billing"),
        );
        assert_eq!(c.get("linger.ms"), None, "producer-only property left out");
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.get("group.id"), Some("billing"));
        assert_eq!(c.get("enable.idempotence"), None);
    }

    #[test]
    fn breaking_values_are_refused_with_the_fix() {
        let err = check_properties(&cfg(&[("acks", "1")]).properties).unwrap_err();
        assert_eq!((err.property.as_str(), err.value.as_str()), ("acks", "1"));
        assert!(err.fix.contains("Kurier sets acks=all"), "{}", err.fix);
        assert!(check_properties(&cfg(&[("acks", "-1"), ("linger.ms", "5")]).properties).is_ok());
        let err = check_properties(&cfg(&[("group.id", "g")]).properties).unwrap_err();
        assert!(err.fix.contains("inbox.consumer"), "{}", err.fix);
    }
}
