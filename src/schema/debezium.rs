//! Debezium-shape outbox tables: services migrating off Debezium keep their
//! table (`id uuid, aggregatetype, aggregateid, type, payload jsonb`) and their
//! consumers. `kurier migrate` installs a capture trigger
//! (`migrations/0004_debezium_capture.sql`) on each configured table that
//! copies every inserted row into a Kurier outbox in the same transaction, so
//! the relay's guarantees (order per key, at least once, fencing, dead
//! letters) apply unchanged.

use sqlx::{PgConnection, PgPool};

use super::{validate_identifier, SchemaName};
use crate::error::Error;

/// Debezium's default `route.topic.replacement`.
pub const DEFAULT_TOPIC: &str = "outbox.event.${routedByValue}";
/// The placeholder for the row's `aggregatetype`, as Debezium spells it.
pub const ROUTED_BY: &str = "${routedByValue}";
/// The columns of Debezium's default outbox shape.
pub const COLUMNS: [&str; 5] = ["id", "aggregatetype", "aggregateid", "type", "payload"];
const TRIGGER: &str = "kurier_capture";

/// One Debezium-shape table and where its rows go.
#[derive(Debug, Clone, PartialEq)]
pub struct DebeziumTable {
    pub table_schema: String,
    pub table: String,
    /// Topic template; [`ROUTED_BY`] is replaced by `aggregatetype`.
    pub topic: String,
    /// The Kurier schema whose outbox receives the rows.
    pub into: SchemaName,
}

impl DebeziumTable {
    /// `table` is `schema.table` or `table` (schema `public`).
    pub fn new(table: &str, topic: &str, into: SchemaName) -> Result<DebeziumTable, String> {
        let (table_schema, name) = table.split_once('.').unwrap_or(("public", table));
        validate_identifier("table schema", table_schema)?;
        validate_identifier("table", name)?;
        validate_template(topic)?;
        Ok(DebeziumTable {
            table_schema: table_schema.to_owned(),
            table: name.to_owned(),
            topic: topic.to_owned(),
            into,
        })
    }

    pub fn qualified(&self) -> String {
        format!("{}.{}", self.table_schema, self.table)
    }

    /// The topic of a row with this `aggregatetype` (what the trigger computes).
    pub fn topic_for(&self, aggregatetype: &str) -> String {
        self.topic.replace(ROUTED_BY, aggregatetype)
    }
}

/// A template must give a legal topic once the placeholder is filled in.
/// (Only Kafka's topic characters, so it is also safe inside an SQL literal.)
pub fn validate_template(topic: &str) -> Result<(), String> {
    crate::names::validate_topic(&topic.replace(ROUTED_BY, "x"))
        .map_err(|e| format!("topic template `{topic}`: {e} (besides {ROUTED_BY})"))
}

/// Creates or replaces the capture trigger on every table. Idempotent.
pub async fn install(pool: &PgPool, tables: &[DebeziumTable]) -> Result<(), Error> {
    if tables.is_empty() {
        return Ok(());
    }
    let mut conn = pool.acquire().await?;
    for t in tables {
        check_shape(&mut conn, t).await?;
        super::ensure_migrated(&mut conn, &t.into).await?;
        sqlx::query(&format!(
            "CREATE OR REPLACE TRIGGER {TRIGGER} AFTER INSERT ON {}.{} FOR EACH ROW \
             EXECUTE FUNCTION {}.debezium_capture('{}')",
            t.table_schema,
            t.table,
            t.into,
            t.topic.replace('\'', "''")
        ))
        .execute(&mut *conn)
        .await?;
        tracing::info!(table = %t.qualified(), into = %t.into, topic = %t.topic, "Debezium-shape table captured");
    }
    Ok(())
}

/// Fails naming the missing table or columns.
async fn check_shape(conn: &mut PgConnection, t: &DebeziumTable) -> Result<(), Error> {
    let present: Vec<String> = sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2",
    )
    .bind(&t.table_schema)
    .bind(&t.table)
    .fetch_all(&mut *conn)
    .await?;
    if present.is_empty() {
        return Err(Error::Setup {
            problem: format!("Debezium-shape table {} does not exist", t.qualified()),
            fix: "create it (id uuid, aggregatetype text, aggregateid text, type text, payload jsonb) or fix debezium.table".into(),
        });
    }
    let missing: Vec<&str> = COLUMNS
        .iter()
        .copied()
        .filter(|c| !present.iter().any(|p| p == c))
        .collect();
    if !missing.is_empty() {
        return Err(Error::Setup {
            problem: format!("table {} lacks column(s) {}", t.qualified(), missing.join(", ")),
            fix: "Kurier relays Debezium's default outbox shape: id, aggregatetype, aggregateid, type, payload".into(),
        });
    }
    Ok(())
}

/// Whether the capture trigger is on `t` (for `kurier check`).
pub async fn is_installed(conn: &mut PgConnection, t: &DebeziumTable) -> Result<bool, Error> {
    let installed = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = $1 AND NOT tgisinternal \
           AND tgrelid = to_regclass($2))",
    )
    .bind(TRIGGER)
    .bind(t.qualified())
    .fetch_one(conn)
    .await?;
    Ok(installed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debezium_defaults() {
        let t = DebeziumTable::new("outbox", DEFAULT_TOPIC, SchemaName::kurier()).unwrap();
        assert_eq!(t.qualified(), "public.outbox");
        assert_eq!(t.topic_for("Order"), "outbox.event.Order");
    }

    #[test]
    fn bad_names_and_templates_are_refused() {
        let k = SchemaName::kurier;
        assert!(DebeziumTable::new("public.out box", DEFAULT_TOPIC, k()).is_err());
        assert!(DebeziumTable::new("a.b.c", DEFAULT_TOPIC, k()).is_err());
        let err = DebeziumTable::new("outbox", "events'; drop", k()).unwrap_err();
        assert!(err.contains("illegal topic name"), "{err}");
        assert!(DebeziumTable::new("outbox", "${routedByValue}.events", k()).is_ok());
    }
}
