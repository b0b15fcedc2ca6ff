//! `[inbox]`: the Kafka → inbox writer.

use std::collections::BTreeMap;
use std::time::Duration;

use kurier::SchemaName;
use serde::Deserialize;

use super::kafka::refuse_enforced;
use super::value::{in_range, Keys};
use super::ConfigError;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInbox {
    schema: Option<String>,
    consumer: Option<String>,
    topics: Option<Vec<String>>,
    batch_size: Option<u32>,
    max_batch_bytes: Option<u64>,
    batch_wait_ms: Option<u64>,
    message_id_headers: Option<Vec<String>>,
    #[serde(default)]
    properties: BTreeMap<String, toml::Value>,
    prune_payload_after_secs: Option<u64>,
    forget_after_secs: Option<u64>,
}

/// Kafka → inbox writer settings.
#[derive(Debug, Clone)]
pub struct InboxConfig {
    /// The Kurier schema whose `inbox` table receives the messages.
    pub schema: SchemaName,
    /// The consumer name: the inbox's dedup scope and the Kafka consumer group.
    pub consumer: String,
    pub topics: Vec<String>,
    /// Messages inserted per database transaction.
    pub batch_size: u32,
    /// Key and payload bytes per batch (approximate, at least one message):
    /// bounds memory when messages are large.
    pub max_batch_bytes: u64,
    /// How long to wait for a batch to fill before inserting what arrived.
    pub batch_wait: Duration,
    /// Headers tried in order for the message ID; without any of them the ID
    /// is the record's coordinates, `topic/partition/offset`.
    pub message_id_headers: Vec<String>,
    /// librdkafka consumer properties (on top of `kafka.properties`).
    pub properties: BTreeMap<String, String>,
    /// Processed rows lose their payload and headers after this long.
    pub prune_payload_after: Duration,
    /// Processed rows (the dedup keys) are deleted after this long.
    pub forget_after: Duration,
}

/// Messages per transaction by default, as the relay's batch: at 1,000 the
/// per-commit cost held ingest to 0.81-0.89 x PostgreSQL's batched insert,
/// at 5,000 0.96-1.03 (docs/performance.md, 2026-12-03).
const DEFAULT_BATCH_SIZE: u32 = 5000;

/// `None` when no topics are configured (no inbox writer runs).
pub(super) fn resolve(raw: RawInbox, k: &Keys) -> Result<Option<InboxConfig>, ConfigError> {
    let topics = k.list("inbox.topics", raw.topics).unwrap_or_default();
    if topics.is_empty() {
        return Ok(None);
    }
    for t in &topics {
        kurier::outbox::validate_topic(t).map_err(|e| {
            ConfigError::invalid(
                &Keys::label("inbox.topics"),
                e.to_string(),
                "list existing topic names",
            )
        })?;
    }
    let properties = k.properties("inbox.properties", raw.properties)?;
    refuse_enforced(&properties, "inbox.properties")?;
    let inbox = InboxConfig {
        schema: resolve_schema(k.text("inbox.schema", raw.schema))?,
        consumer: resolve_consumer(k.text("inbox.consumer", raw.consumer))?,
        topics,
        batch_size: in_range(
            "inbox.batch_size",
            k.num("inbox.batch_size", raw.batch_size, DEFAULT_BATCH_SIZE)?,
            1..=50_000,
            DEFAULT_BATCH_SIZE,
        )?,
        max_batch_bytes: k.num("inbox.max_batch_bytes", raw.max_batch_bytes, 16 << 20)?,
        batch_wait: k.millis("inbox.batch_wait_ms", raw.batch_wait_ms, 20)?,
        message_id_headers: k
            .list("inbox.message_id_headers", raw.message_id_headers)
            .unwrap_or_else(|| vec![kurier::outbox::MESSAGE_ID_HEADER.into()]),
        properties,
        prune_payload_after: k.secs(
            "inbox.prune_payload_after_secs",
            raw.prune_payload_after_secs,
            86_400,
        )?,
        forget_after: k.secs("inbox.forget_after_secs", raw.forget_after_secs, 7 * 86_400)?,
    };
    if inbox.forget_after < inbox.prune_payload_after {
        return Err(ConfigError::invalid(
            "inbox.forget_after_secs",
            "shorter than inbox.prune_payload_after_secs",
            "keep dedup keys at least as long as payloads, and longer than the topics' retention.ms",
        ));
    }
    Ok(Some(inbox))
}

fn resolve_schema(name: Option<String>) -> Result<SchemaName, ConfigError> {
    match name {
        None => Ok(SchemaName::kurier()),
        Some(n) => SchemaName::new(&n).map_err(|e| {
            ConfigError::invalid(
                &Keys::label("inbox.schema"),
                e,
                "name a schema that `kurier migrate` created (relay.schemas lists them)",
            )
        }),
    }
}

fn resolve_consumer(consumer: Option<String>) -> Result<String, ConfigError> {
    let key = Keys::label("inbox.consumer");
    let consumer = consumer.ok_or_else(|| {
        ConfigError::invalid(
            &key,
            "not set while inbox topics are",
            "name the consuming service, e.g. billing; it is the dedup scope and the consumer group",
        )
    })?;
    if consumer.trim().is_empty() || consumer.len() > 200 {
        return Err(ConfigError::invalid(
            &key,
            "empty or longer than 200 characters",
            "use a short service name",
        ));
    }
    Ok(consumer)
}
