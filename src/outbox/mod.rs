//! The outbox table's face for services: the typed [`Message`] a service
//! enqueues inside its own transaction. The queries the relay and the
//! operators run on the outbox tables are in [`store`].

pub mod store;

use std::collections::BTreeMap;

use sqlx::PgExecutor;
use uuid::Uuid;

use crate::error::Error;
pub use crate::names::validate_topic;
use crate::schema::SchemaName;

/// What a Kafka record's value is made of.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// Stored in `payload jsonb`, published as its JSON text.
    Json(serde_json::Value),
    /// Stored in `payload_bytes bytea` (Avro, Protobuf, ...), published as is.
    Bytes(Vec<u8>),
    /// No value: a Kafka tombstone (deletes the key in a compacted topic).
    Tombstone,
}

/// One message to publish. Build it, then [`enqueue`] it on your transaction.
///
/// ```
/// use kurier::Message;
/// let msg = Message::json("orders", serde_json::json!({"type": "OrderPlaced"}))
///     .key("order-42")
///     .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// assert_eq!(msg.topic(), "orders");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    topic: String,
    key: Option<String>,
    payload: Payload,
    headers: BTreeMap<String, String>,
    message_id: Option<Uuid>,
}

impl Message {
    /// A message whose value is the JSON text of `value`.
    pub fn json(topic: impl Into<String>, value: serde_json::Value) -> Self {
        Self::with_payload(topic, Payload::Json(value))
    }

    /// A message whose value is `bytes`, unchanged.
    pub fn bytes(topic: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Self {
        Self::with_payload(topic, Payload::Bytes(bytes.into()))
    }

    /// A tombstone for `key`.
    pub fn tombstone(topic: impl Into<String>, key: impl Into<String>) -> Self {
        Self::with_payload(topic, Payload::Tombstone).key(key)
    }

    fn with_payload(topic: impl Into<String>, payload: Payload) -> Self {
        Message {
            topic: topic.into(),
            key: None,
            payload,
            headers: BTreeMap::new(),
            message_id: None,
        }
    }

    /// Sets the Kafka key; messages with the same topic and key keep their order.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header (string value). `message-id` is reserved for Kurier.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Uses a chosen message ID instead of a random one (e.g. to make a retried
    /// business operation produce the same ID).
    pub fn message_id(mut self, id: Uuid) -> Self {
        self.message_id = Some(id);
        self
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.headers
    }

    /// Checks what the relay would otherwise dead-letter, so that a service
    /// learns about a bad message in its own transaction.
    pub fn validate(&self) -> Result<(), Error> {
        validate_topic(&self.topic)?;
        if self.headers.contains_key(MESSAGE_ID_HEADER) {
            return Err(Error::InvalidMessage("header `message-id` is reserved: Kurier sets it from the row's message_id; use Message::message_id".into()));
        }
        Ok(())
    }
}

/// Inserts `msg` into `kurier.outbox` through any executor: a pool, a
/// connection, or (the point of the pattern) the caller's open transaction.
/// Returns the message ID that the Kafka record will carry as `message-id`.
pub async fn enqueue<'e, E: PgExecutor<'e>>(executor: E, msg: &Message) -> Result<Uuid, Error> {
    enqueue_into(executor, &SchemaName::kurier(), msg).await
}

/// [`enqueue`] into the outbox of another Kurier schema (see `relay.schemas`).
pub async fn enqueue_into<'e, E: PgExecutor<'e>>(
    executor: E,
    schema: &SchemaName,
    msg: &Message,
) -> Result<Uuid, Error> {
    msg.validate()?;
    Ok(store::insert(executor, schema, msg).await?)
}

/// The header that carries the row's `message_id` on every Kafka record.
pub const MESSAGE_ID_HEADER: &str = "message-id";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_header_is_reserved() {
        let m = Message::json("t", serde_json::json!({})).header("message-id", "x");
        assert!(m.validate().unwrap_err().to_string().contains("reserved"));
    }
}
