//! `[relay]`: the outbox → Kafka relay.

use std::time::Duration;

use kurier::SchemaName;
use serde::Deserialize;

use super::value::{in_range, Keys};
use super::ConfigError;
use crate::kafka::CloudEvents;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRelay {
    enabled: Option<bool>,
    batch_size: Option<u32>,
    max_batch_bytes: Option<u64>,
    poll_interval_ms: Option<u64>,
    max_attempts: Option<u32>,
    retry_min_ms: Option<u64>,
    retry_max_ms: Option<u64>,
    lease_ttl_ms: Option<u64>,
    schemas: Option<Vec<String>>,
    cloudevents: Option<bool>,
    cloudevents_source: Option<String>,
    vacuum_dead_rows: Option<u64>,
}

/// Outbox relay settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub enabled: bool,
    pub batch_size: u32,
    /// Payload bytes per batch (approximate, at least one row): bounds memory
    /// whatever the row sizes.
    pub max_batch_bytes: u64,
    pub poll_interval: Duration,
    pub max_attempts: u32,
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// How long a relay's partition leases last without a heartbeat; a
    /// stalled relay is fenced out after this long.
    pub lease_ttl: Duration,
    /// The schemas whose outboxes this daemon relays (one relay loop each).
    pub schemas: Vec<SchemaName>,
    /// CloudEvents binary-mode headers on every record, when set.
    pub cloudevents: Option<CloudEvents>,
    /// How long a batch in flight may wait for its reports after shutdown was asked for.
    pub shutdown_grace: Duration,
    /// The relay vacuums its outbox once this many dead rows piled up (0: never).
    pub vacuum_dead_rows: u64,
}

pub(super) fn resolve(
    raw: RawRelay,
    k: &Keys,
    shutdown_grace: Duration,
) -> Result<RelayConfig, ConfigError> {
    let relay = RelayConfig {
        enabled: k.flag("relay.enabled", raw.enabled, true)?,
        batch_size: in_range(
            "relay.batch_size",
            k.num("relay.batch_size", raw.batch_size, 5000)?,
            1..=50_000,
            5000,
        )?,
        max_batch_bytes: k.num("relay.max_batch_bytes", raw.max_batch_bytes, 16 << 20)?,
        poll_interval: k.millis("relay.poll_interval_ms", raw.poll_interval_ms, 100)?,
        max_attempts: k.num("relay.max_attempts", raw.max_attempts, 10)?,
        retry_min: k.millis("relay.retry_min_ms", raw.retry_min_ms, 100)?,
        retry_max: k.millis("relay.retry_max_ms", raw.retry_max_ms, 30_000)?,
        lease_ttl: k.millis("relay.lease_ttl_ms", raw.lease_ttl_ms, 10_000)?,
        schemas: resolve_schemas(k.list("relay.schemas", raw.schemas))?,
        cloudevents: resolve_cloudevents(k, raw.cloudevents, raw.cloudevents_source)?,
        shutdown_grace,
        vacuum_dead_rows: k.num("relay.vacuum_dead_rows", raw.vacuum_dead_rows, 100_000)?,
    };
    check(&relay)?;
    Ok(relay)
}

fn check(relay: &RelayConfig) -> Result<(), ConfigError> {
    if relay.poll_interval.is_zero() {
        return Err(ConfigError::invalid(
            "relay.poll_interval_ms",
            "0 would poll in a busy loop",
            "use at least 1 (default 100)",
        ));
    }
    if relay.max_attempts == 0 {
        return Err(ConfigError::invalid(
            "relay.max_attempts",
            "0 leaves no attempt",
            "use at least 1 (default 10)",
        ));
    }
    if relay.lease_ttl < Duration::from_millis(300) {
        return Err(ConfigError::invalid(
            "relay.lease_ttl_ms",
            "below 300 ms: heartbeats could not keep up",
            "use at least 300 (default 10000)",
        ));
    }
    if relay.retry_min > relay.retry_max {
        return Err(ConfigError::invalid(
            "relay.retry_min_ms",
            "greater than relay.retry_max_ms",
            "make retry_min_ms <= retry_max_ms",
        ));
    }
    Ok(())
}

fn resolve_schemas(names: Option<Vec<String>>) -> Result<Vec<SchemaName>, ConfigError> {
    let key = Keys::label("relay.schemas");
    let names = names.unwrap_or_else(|| vec![kurier::schema::DEFAULT_SCHEMA.to_owned()]);
    if names.is_empty() {
        return Err(ConfigError::invalid(
            &key,
            "empty",
            "list at least one schema (default [\"kurier\"]), or set relay.enabled = false",
        ));
    }
    let mut out: Vec<SchemaName> = Vec::new();
    for n in &names {
        let s = SchemaName::new(n)
            .map_err(|e| ConfigError::invalid(&key, e, "name schemas like tenant_a"))?;
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

fn resolve_cloudevents(
    k: &Keys,
    enabled: Option<bool>,
    source: Option<String>,
) -> Result<Option<CloudEvents>, ConfigError> {
    if !k.flag("relay.cloudevents", enabled, false)? {
        return Ok(None);
    }
    let key = "relay.cloudevents_source";
    let source = k.text(key, source).unwrap_or_else(|| "/kurier".to_owned());
    if source.is_empty() || source.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ConfigError::invalid(
            &Keys::label(key),
            format!("`{}` is not a URI-reference", source.escape_debug()),
            "use a URI naming this producer, e.g. /orders-service or urn:example:orders",
        ));
    }
    Ok(Some(CloudEvents { source }))
}
