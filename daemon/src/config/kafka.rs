//! `[kafka]`: brokers and librdkafka properties passed through.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::value::Keys;
use super::ConfigError;
use crate::kafka::{self, KafkaConfig};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKafka {
    brokers: Option<String>,
    #[serde(default)]
    properties: BTreeMap<String, toml::Value>,
}

pub(super) fn resolve(raw: RawKafka, k: &Keys) -> Result<KafkaConfig, ConfigError> {
    // KAFKA_BROKERS is the conventional name; `migrate` and the admin
    // commands work without it (see Config::require_kafka).
    let brokers = k.env("KAFKA_BROKERS").or(raw.brokers).unwrap_or_default();
    // KURIER_KAFKA_PROPERTIES="linger.ms=5,compression.type=lz4" adds to or overrides the file.
    let properties = k.properties("kafka.properties", raw.properties)?;
    refuse_enforced(&properties, "kafka.properties")?;
    Ok(KafkaConfig {
        brokers,
        properties,
    })
}

/// Pass-through properties may not change what the guarantees rest on.
pub(super) fn refuse_enforced(
    properties: &BTreeMap<String, String>,
    key: &str,
) -> Result<(), ConfigError> {
    kafka::check_properties(properties).map_err(|e| {
        ConfigError::invalid(
            &format!("{key}.\"{}\"", e.property),
            format!("value `{}` is not allowed", e.value),
            e.fix,
        )
    })
}
