//! The Kafka side of the relay: one idempotent producer, the outbox row →
//! Kafka record mapping (SPEC "Message mapping"), and what each error means.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use crate::config::KafkaConfig;
use crate::error::Error;
use crate::outbox::{validate_topic, OutboxRow};

/// The header that carries the row's `message_id` on every record.
pub const MESSAGE_ID_HEADER: &str = "message-id";

/// How a failed row is handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Can never succeed (illegal topic, too large, bad headers, not authorised):
    /// dead-letter now.
    Permanent(String),
    /// Specific to this row and possibly temporary (e.g. unknown topic while
    /// auto-creation is off): count an attempt, retry later, dead-letter when
    /// the budget is spent.
    Row(String),
    /// The broker or network, not the row (timeouts, broker down): retry the
    /// batch with backoff, count nothing against the row.
    Transient(String),
}

impl Failure {
    pub fn reason(&self) -> &str {
        match self {
            Failure::Permanent(r) | Failure::Row(r) | Failure::Transient(r) => r,
        }
    }
}

/// Owns the producer. Settings that the delivery guarantees depend on are
/// fixed here; everything else passes through from `kafka.properties`.
pub struct Publisher {
    producer: FutureProducer,
}

impl Publisher {
    pub fn new(cfg: &KafkaConfig) -> Result<Self, Error> {
        Ok(Publisher {
            producer: client_config(cfg).create()?,
        })
    }

    /// Hands one row to the producer. The returned future resolves with the
    /// delivery report; only that report may finish the row.
    pub fn send(&self, row: &OutboxRow) -> Result<DeliveryFuture, Failure> {
        validate_topic(&row.topic).map_err(|e| Failure::Permanent(e.to_string()))?;
        let headers = record_headers(&row.headers, &row.message_id.to_string())?;
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&row.topic).headers(headers);
        if let Some(key) = &row.key {
            record = record.key(key.as_bytes());
        }
        if let Some(value) = row.value() {
            record = record.payload(value);
        }
        self.producer
            .send_result(record)
            .map_err(|(e, _)| classify(&e))
    }

    /// Waits for everything handed to the producer (used at shutdown).
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(timeout);
    }

    /// A fatal idempotent-producer error means this producer instance is done:
    /// the relay drops it and builds a new one.
    pub fn fatal_error(&self) -> Option<String> {
        self.producer
            .client()
            .fatal_error()
            .map(|(code, msg)| format!("{code:?}: {msg}"))
    }

    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }
}

/// The producer's librdkafka configuration.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    // Defaults a user may override.
    c.set("linger.ms", "5").set("message.timeout.ms", "300000");
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    // Fixed: ordering and no-loss depend on these (config.rs refuses other values).
    c.set("bootstrap.servers", &cfg.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set(
            "partitioner",
            cfg.properties
                .get("partitioner")
                .map(String::as_str)
                .unwrap_or("murmur2_random"),
        );
    c
}

/// The row's `headers` object plus `message-id`. Values must be strings (or
/// null, meaning a header without value); anything else is malformed input.
pub fn record_headers(headers_json: &str, message_id: &str) -> Result<OwnedHeaders, Failure> {
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(headers_json)
        .map_err(|e| Failure::Permanent(format!("headers are not a JSON object: {e}")))?;
    let mut out = OwnedHeaders::new_with_capacity(map.len() + 1);
    for (name, value) in &map {
        if name == MESSAGE_ID_HEADER {
            return Err(Failure::Permanent(
                "header `message-id` is reserved: Kurier sets it from the message_id column".into(),
            ));
        }
        out = match value {
            serde_json::Value::String(s) => out.insert(Header { key: name, value: Some(s.as_bytes()) }),
            serde_json::Value::Null => out.insert(Header { key: name, value: None::<&[u8]> }),
            other => {
                return Err(Failure::Permanent(format!(
                    "header `{name}` is {other}, not a string: outbox header values must be JSON strings"
                )))
            }
        };
    }
    Ok(out.insert(Header {
        key: MESSAGE_ID_HEADER,
        value: Some(message_id.as_bytes()),
    }))
}

/// Sorts a producer error into the three ways of handling it.
pub fn classify(e: &KafkaError) -> Failure {
    use RDKafkaErrorCode as C;
    let text = e.to_string();
    let code = match e {
        KafkaError::MessageProduction(c) => *c,
        _ => return Failure::Transient(text),
    };
    match code {
        C::MessageSizeTooLarge
        | C::InvalidMessageSize
        | C::MessageBatchTooLarge
        | C::InvalidRecord
        | C::InvalidMessage => Failure::Permanent(format!(
            "{text} (the record exceeds or violates the broker's limits, e.g. message.max.bytes)"
        )),
        C::InvalidTopic
        | C::TopicAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::InvalidArgument => Failure::Permanent(text),
        C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition => Failure::Row(
            format!("{text} (create the topic or enable auto.create.topics.enable on the broker)"),
        ),
        _ => Failure::Transient(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    #[test]
    fn headers_map_with_message_id_last() {
        let h = record_headers(r#"{"traceparent":"00-ab","empty":null}"#, "id-1").unwrap();
        let got: Vec<(String, Option<Vec<u8>>)> = h
            .iter()
            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
            .collect();
        assert_eq!(
            got,
            vec![
                ("empty".into(), None),
                ("traceparent".into(), Some(b"00-ab".to_vec())),
                ("message-id".into(), Some(b"id-1".to_vec())),
            ]
        );
    }

    #[test]
    fn non_string_header_is_permanent() {
        let err = record_headers(r#"{"n":1}"#, "x").unwrap_err();
        assert!(
            matches!(err, Failure::Permanent(ref r) if r.contains("`n`")),
            "{err:?}"
        );
    }

    #[test]
    fn classification() {
        let p = |c| classify(&KafkaError::MessageProduction(c));
        assert!(matches!(
            p(RDKafkaErrorCode::MessageSizeTooLarge),
            Failure::Permanent(_)
        ));
        assert!(matches!(
            p(RDKafkaErrorCode::UnknownTopicOrPartition),
            Failure::Row(_)
        ));
        assert!(matches!(
            p(RDKafkaErrorCode::MessageTimedOut),
            Failure::Transient(_)
        ));
        assert!(matches!(
            p(RDKafkaErrorCode::AllBrokersDown),
            Failure::Transient(_)
        ));
    }
}
