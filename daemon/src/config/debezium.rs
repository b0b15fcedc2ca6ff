//! `[[debezium]]`: Debezium-shape tables captured into a Kurier outbox.

use kurier::schema::debezium::{DebeziumTable, DEFAULT_TOPIC};
use kurier::SchemaName;
use serde::Deserialize;

use super::value::{split_list, Keys};
use super::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDebezium {
    table: String,
    topic: Option<String>,
    schema: Option<String>,
}

/// `KURIER_DEBEZIUM_TABLES=a,b` (with `KURIER_DEBEZIUM_TOPIC`) replaces the file's list.
pub(super) fn resolve(
    file: Vec<RawDebezium>,
    k: &Keys,
    schemas: &[SchemaName],
) -> Result<Vec<DebeziumTable>, ConfigError> {
    let raw: Vec<RawDebezium> = match k.text("debezium.tables", None) {
        Some(v) => split_list(v)
            .into_iter()
            .map(|table| RawDebezium {
                table,
                topic: k.text("debezium.topic", None),
                schema: None,
            })
            .collect(),
        None => file,
    };
    raw.into_iter().map(|r| table(r, schemas)).collect()
}

fn table(r: RawDebezium, schemas: &[SchemaName]) -> Result<DebeziumTable, ConfigError> {
    let key = Keys::label("debezium.tables");
    let into = r
        .schema
        .as_deref()
        .map(SchemaName::new)
        .transpose()
        .map_err(|e| ConfigError::invalid(&key, e, "name a schema listed in relay.schemas"))?
        .unwrap_or_else(SchemaName::kurier);
    if !schemas.contains(&into) {
        return Err(ConfigError::invalid(
            &key,
            format!(
                "table {} goes into schema `{into}`, which no relay serves",
                r.table
            ),
            format!("add `{into}` to relay.schemas (KURIER_RELAY_SCHEMAS)"),
        ));
    }
    let topic = r.topic.as_deref().unwrap_or(DEFAULT_TOPIC);
    DebeziumTable::new(&r.table, topic, into).map_err(|e| {
        ConfigError::invalid(
            &key,
            e,
            "use schema.table and a topic template like outbox.event.${routedByValue}",
        )
    })
}
