//! `[projections]`: the SQL projections the daemon runs.

use std::time::Duration;

use kurier::SchemaName;
use serde::Deserialize;

use super::value::{in_range, Keys};
use super::ConfigError;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProjections {
    enabled: Option<bool>,
    schema: Option<String>,
    batch_size: Option<i32>,
    rebuild_batch_size: Option<i32>,
    poll_interval_ms: Option<u64>,
    refresh_ms: Option<u64>,
}

/// Settings of the SQL projection runner.
#[derive(Debug, Clone)]
pub struct ProjectionsConfig {
    pub enabled: bool,
    /// The schema holding `kurier.projections` and the event store.
    pub schema: SchemaName,
    /// Events per transaction while running, and while rebuilding.
    pub batch_size: i32,
    pub rebuild_batch_size: i32,
    /// How often an idle projection looks for new events.
    pub poll_interval: Duration,
    /// How often the defined projections are re-read.
    pub refresh: Duration,
}

pub(super) fn resolve(raw: RawProjections, k: &Keys) -> Result<ProjectionsConfig, ConfigError> {
    let schema = match k.text("projections.schema", raw.schema) {
        None => SchemaName::kurier(),
        Some(n) => SchemaName::new(&n).map_err(|e| {
            ConfigError::invalid(
                &Keys::label("projections.schema"),
                e,
                "name a schema `kurier migrate` created",
            )
        })?,
    };
    let cfg = ProjectionsConfig {
        enabled: k.flag("projections.enabled", raw.enabled, true)?,
        schema,
        batch_size: in_range(
            "projections.batch_size",
            k.num("projections.batch_size", raw.batch_size, 1000)?,
            1..=100_000,
            1000,
        )?,
        rebuild_batch_size: in_range(
            "projections.rebuild_batch_size",
            k.num(
                "projections.rebuild_batch_size",
                raw.rebuild_batch_size,
                10_000,
            )?,
            1..=100_000,
            10_000,
        )?,
        poll_interval: k.millis("projections.poll_interval_ms", raw.poll_interval_ms, 100)?,
        refresh: k.millis("projections.refresh_ms", raw.refresh_ms, 5000)?,
    };
    if cfg.poll_interval.is_zero() || cfg.refresh.is_zero() {
        return Err(ConfigError::invalid(
            "projections.poll_interval_ms / projections.refresh_ms",
            "0 would poll in a busy loop",
            "use at least 1",
        ));
    }
    Ok(cfg)
}
