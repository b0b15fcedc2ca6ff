//! `[sagas]`: the saga orchestrator (replies through the inbox, timers).

use std::collections::BTreeMap;
use std::time::Duration;

use kurier::SchemaName;
use serde::Deserialize;

use super::kafka::refuse_enforced;
use super::value::{in_range, Keys};
use super::ConfigError;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSagas {
    enabled: Option<bool>,
    schema: Option<String>,
    consumer: Option<String>,
    batch_size: Option<u32>,
    poll_interval_ms: Option<u64>,
    topic_refresh_ms: Option<u64>,
    #[serde(default)]
    properties: BTreeMap<String, toml::Value>,
}

/// Saga orchestrator settings.
#[derive(Debug, Clone)]
pub struct SagasConfig {
    pub enabled: bool,
    /// The Kurier schema holding `sagas`, `saga_types` and the reply inbox.
    pub schema: SchemaName,
    /// The inbox consumer (and Kafka consumer group) of the reply topics.
    pub consumer: String,
    /// Replies applied per transaction.
    pub batch_size: u32,
    /// How often, at most, idle replies and timers are looked at.
    pub poll_interval: Duration,
    /// How often the defined saga types are re-read for new reply topics.
    pub topic_refresh: Duration,
    /// librdkafka properties of the reply consumer (on top of `kafka.properties`).
    pub properties: BTreeMap<String, String>,
}

pub(super) fn resolve(raw: RawSagas, k: &Keys) -> Result<SagasConfig, ConfigError> {
    let schema = match k.text("sagas.schema", raw.schema) {
        None => SchemaName::kurier(),
        Some(n) => SchemaName::new(&n).map_err(|e| {
            ConfigError::invalid(
                &Keys::label("sagas.schema"),
                e,
                "name a schema `kurier migrate` created",
            )
        })?,
    };
    let properties = k.properties("sagas.properties", raw.properties)?;
    refuse_enforced(&properties, "sagas.properties")?;
    let sagas = SagasConfig {
        enabled: k.flag("sagas.enabled", raw.enabled, true)?,
        schema,
        consumer: k
            .text("sagas.consumer", raw.consumer)
            .unwrap_or_else(|| "kurier-sagas".to_owned()),
        batch_size: in_range(
            "sagas.batch_size",
            k.num("sagas.batch_size", raw.batch_size, 100)?,
            1..=10_000,
            100,
        )?,
        poll_interval: k.millis("sagas.poll_interval_ms", raw.poll_interval_ms, 1000)?,
        topic_refresh: k.millis("sagas.topic_refresh_ms", raw.topic_refresh_ms, 5000)?,
        properties,
    };
    if sagas.consumer.trim().is_empty() {
        return Err(ConfigError::invalid(
            &Keys::label("sagas.consumer"),
            "empty",
            "name the reply consumer, e.g. kurier-sagas",
        ));
    }
    if sagas.poll_interval.is_zero() || sagas.topic_refresh.is_zero() {
        return Err(ConfigError::invalid(
            "sagas.poll_interval_ms / sagas.topic_refresh_ms",
            "0 would poll in a busy loop",
            "use at least 1",
        ));
    }
    Ok(sagas)
}
