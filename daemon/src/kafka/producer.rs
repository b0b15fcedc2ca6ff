//! The relay's producer: one idempotent producer per relay loop, and what
//! each of its errors means. The relay sees only [`Delivery`]: a row is
//! finished only after its delivery report said so.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use kurier::outbox::store::OutboxRow;
use kurier::outbox::validate_topic;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use super::context::Context;
use super::delivery::{Delivery, Failure};
use super::record::{record_headers, Extra, RecordHeaders};
use super::{client_config, ClientError, CloudEvents, KafkaConfig, Role};

/// The delivery report of one record, still to come.
pub struct DeliveryReport(DeliveryFuture);

impl Future for DeliveryReport {
    type Output = Delivery;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Delivery> {
        Pin::new(&mut self.0).poll(cx).map(|report| match report {
            Ok(Ok(_)) => Delivery::Delivered,
            Ok(Err((e, _))) => Delivery::Failed(classify(&e)),
            Err(_) => Delivery::Failed(Failure::Transient(
                "producer dropped before the delivery report".into(),
            )),
        })
    }
}

/// A record handed to the producer: its delivery report, and the span it is
/// traced in (`Span::none()` without a `traceparent`).
pub struct Sent {
    pub report: DeliveryReport,
    pub span: tracing::Span,
}

/// Owns the producer. Settings that the delivery guarantees depend on are
/// enforced by [`client_config`]; everything else passes through from
/// `kafka.properties`.
pub struct Publisher {
    producer: FutureProducer<Context>,
    cloudevents_source: Option<String>,
}

impl Publisher {
    /// A new producer, already connecting (see `warm_up`): also
    /// the one built after transient failures gets its producer ID before its
    /// first batch.
    pub fn new(cfg: &KafkaConfig, cloudevents: Option<&CloudEvents>) -> Result<Self, ClientError> {
        let config = client_config(cfg, Role::Producer, &Default::default(), None);
        let publisher = Publisher {
            producer: config.create_with_context(Context::default())?,
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
        Ok(Sent {
            report: DeliveryReport(report),
            span,
        })
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

    /// A blocking check that the cluster answers (for readiness while idle).
    pub fn reachability(&self) -> impl FnOnce() -> bool + Send + 'static {
        let producer = self.producer.clone();
        move || super::cluster::answers(producer.client())
    }
}

/// Sorts a producer error into the three ways of handling it.
fn classify(e: &KafkaError) -> Failure {
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
