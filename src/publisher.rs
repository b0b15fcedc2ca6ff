//! The Kafka side of the relay: one idempotent producer, the outbox row →
//! Kafka record mapping (SPEC "Message mapping"), and what each error means.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use crate::config::{CloudEventsConfig, KafkaConfig};
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

/// A record handed to the producer: its delivery report, and the span it is
/// traced in (`Span::none()` without a `traceparent`).
pub struct Sent {
    pub report: DeliveryFuture,
    pub span: tracing::Span,
}

/// Owns the producer. Settings that the delivery guarantees depend on are
/// fixed here; everything else passes through from `kafka.properties`.
pub struct Publisher {
    producer: FutureProducer,
    cloudevents_source: Option<String>,
}

impl Publisher {
    /// A new producer, already connecting (see `warm_up`): also
    /// the one built after transient failures gets its producer ID before its
    /// first batch.
    pub fn new(cfg: &KafkaConfig, cloudevents: Option<&CloudEventsConfig>) -> Result<Self, Error> {
        let publisher = Publisher {
            producer: client_config(cfg).create()?,
            cloudevents_source: cloudevents.map(|c| c.source.clone()),
        };
        publisher.warm_up();
        Ok(publisher)
    }

    /// Hands one row to the producer. The returned future resolves with the
    /// delivery report; only that report may finish the row.
    pub fn send(&self, row: &OutboxRow) -> Result<Sent, Failure> {
        validate_topic(&row.topic).map_err(|e| Failure::Permanent(e.to_string()))?;
        let message_id = row.message_id.to_string();
        let extra = Extra {
            message_id: &message_id,
            cloudevents_source: self.cloudevents_source.as_deref(),
            topic: &row.topic,
            content_type: if row.payload_text.is_some() {
                Some("application/json")
            } else if row.payload_bytes.is_some() {
                Some("application/octet-stream")
            } else {
                None
            },
        };
        let RecordHeaders {
            headers,
            traceparent,
        } = record_headers(&row.headers, &extra)?;
        let span = crate::trace::publish_span(traceparent.as_deref(), &message_id, &row.topic);
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&row.topic).headers(headers);
        if let Some(key) = &row.key {
            record = record.key(key.as_bytes());
        }
        if let Some(value) = row.value() {
            record = record.payload(value);
        }
        let report = self
            .producer
            .send_result(record)
            .map_err(|(e, _)| classify(&e))?;
        Ok(Sent { report, span })
    }

    /// Connects to the cluster in the background. librdkafka connects lazily
    /// and the idempotent producer needs a producer ID before its first
    /// record goes out; asking for metadata now lets both happen while the
    /// relay connects to PostgreSQL instead of delaying the first batch
    /// (by ~1 s against the test broker).
    ///
    /// A plain thread, not `spawn_blocking`: a runtime waits for its blocking
    /// tasks when it shuts down, and this one may wait out its timeout when
    /// the broker is gone.
    fn warm_up(&self) {
        let producer = self.producer.clone();
        std::thread::spawn(move || {
            if let Err(e) = producer
                .client()
                .fetch_metadata(None, Duration::from_secs(5))
            {
                tracing::debug!(error = %e, "broker not reachable yet; the first batch will connect");
            }
        });
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
    c.set("linger.ms", "1").set("message.timeout.ms", "300000");
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

/// What the relay adds to a record besides the row's own headers.
#[derive(Debug, Clone, Copy)]
pub struct Extra<'a> {
    pub message_id: &'a str,
    /// CloudEvents binary mode: `ce_source`, when enabled.
    pub cloudevents_source: Option<&'a str>,
    pub topic: &'a str,
    /// `application/json` for JSON payloads, `application/octet-stream` for
    /// bytes, `None` for a tombstone.
    pub content_type: Option<&'a str>,
}

/// Kafka headers of one record, and the W3C trace context found among them.
#[derive(Debug)]
pub struct RecordHeaders {
    pub headers: OwnedHeaders,
    pub traceparent: Option<String>,
}

/// The row's `headers` object plus `message-id` (and the CloudEvents
/// attributes when enabled). Values must be strings (or null, meaning a
/// header without value); anything else is malformed input.
pub fn record_headers(headers_json: &str, extra: &Extra<'_>) -> Result<RecordHeaders, Failure> {
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(headers_json)
        .map_err(|e| Failure::Permanent(format!("headers are not a JSON object: {e}")))?;
    let mut out = OwnedHeaders::new_with_capacity(map.len() + 6);
    let mut traceparent = None;
    for (name, value) in &map {
        if name == MESSAGE_ID_HEADER {
            return Err(Failure::Permanent(
                "header `message-id` is reserved: Kurier sets it from the message_id column".into(),
            ));
        }
        out = match value {
            serde_json::Value::String(s) => {
                if name == TRACEPARENT_HEADER {
                    traceparent = Some(s.clone());
                }
                out.insert(Header { key: name, value: Some(s.as_bytes()) })
            }
            serde_json::Value::Null => out.insert(Header { key: name, value: None::<&[u8]> }),
            other => {
                return Err(Failure::Permanent(format!(
                    "header `{name}` is {other}, not a string: outbox header values must be JSON strings"
                )))
            }
        };
    }
    out = out.insert(Header {
        key: MESSAGE_ID_HEADER,
        value: Some(extra.message_id.as_bytes()),
    });
    if let Some(source) = extra.cloudevents_source {
        for (name, value) in cloudevent_attributes(&map, extra, source) {
            out = out.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
    }
    Ok(RecordHeaders {
        headers: out,
        traceparent,
    })
}

/// The W3C Trace Context header, passed through and used to link the relay's span.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// CloudEvents 1.0 required attributes in the Kafka binding's binary mode
/// (`ce_` headers, `content-type` for datacontenttype). A header the row
/// already carries wins, so a service can set its own `ce_type`.
fn cloudevent_attributes<'a>(
    row: &'a serde_json::Map<String, serde_json::Value>,
    extra: &Extra<'a>,
    source: &'a str,
) -> Vec<(&'static str, &'a str)> {
    let row_str = |k: &str| row.get(k).and_then(|v| v.as_str());
    // Debezium-shape rows carry the event type in `type`; otherwise the topic names it.
    let ty = row_str("type").unwrap_or(extra.topic);
    let mut attrs = vec![
        ("ce_specversion", "1.0"),
        ("ce_id", extra.message_id),
        ("ce_source", source),
        ("ce_type", ty),
    ];
    if let Some(ct) = extra.content_type {
        attrs.push(("content-type", ct));
    }
    attrs.retain(|(k, _)| !row.contains_key(*k));
    attrs
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
        let h = record_headers(r#"{"traceparent":"00-ab","empty":null}"#, &extra(None)).unwrap();
        assert_eq!(h.traceparent.as_deref(), Some("00-ab"));
        let got: Vec<(String, Option<Vec<u8>>)> = h
            .headers
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

    fn extra(source: Option<&str>) -> Extra<'_> {
        Extra {
            message_id: "id-1",
            cloudevents_source: source,
            topic: "orders",
            content_type: Some("application/json"),
        }
    }

    #[test]
    fn cloudevents_binary_mode_headers() {
        let h =
            record_headers(r#"{"ce_type":"com.example.placed"}"#, &extra(Some("/shop"))).unwrap();
        let got: Vec<(String, String)> = h
            .headers
            .iter()
            .map(|h| {
                (
                    h.key.to_owned(),
                    String::from_utf8(h.value.unwrap().to_vec()).unwrap(),
                )
            })
            .collect();
        let expect = [
            ("ce_type", "com.example.placed"),
            ("message-id", "id-1"),
            ("ce_specversion", "1.0"),
            ("ce_id", "id-1"),
            ("ce_source", "/shop"),
            ("content-type", "application/json"),
        ];
        let expect: Vec<(String, String)> = expect
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(got, expect);
        // Without ce_type in the row, `type` (Debezium shape) or else the topic names it.
        let ty = |json| {
            let h = record_headers(json, &extra(Some("/s"))).unwrap();
            let v = h
                .headers
                .iter()
                .find(|h| h.key == "ce_type")
                .unwrap()
                .value
                .unwrap()
                .to_vec();
            String::from_utf8(v).unwrap()
        };
        assert_eq!(ty(r#"{"type":"OrderPlaced"}"#), "OrderPlaced");
        assert_eq!(ty("{}"), "orders");
    }

    #[test]
    fn non_string_header_is_permanent() {
        let err = record_headers(r#"{"n":1}"#, &extra(None)).unwrap_err();
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
