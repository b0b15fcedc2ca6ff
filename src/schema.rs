//! `kurier migrate`: creates the Kurier schemas and applies `migrations/`.
//!
//! One database can hold several Kurier outboxes, one per schema (e.g. a
//! schema per tenant). The migrations are written against schema `kurier`;
//! for another schema they are applied with that name in place of `kurier`,
//! each schema keeping its own migration history. Schema names come from
//! configuration, so they are validated as plain identifiers
//! ([`SchemaName`]) before they reach any SQL.
//!
//! Safe to run from several instances at once: everything happens under one
//! PostgreSQL advisory lock, so the second instance waits and then finds
//! nothing left to do.

use std::borrow::Cow;

use futures::future::BoxFuture;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, Migrator};
use sqlx::{Connection, PgConnection};

use crate::error::Error;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Advisory lock key for migrations ("kurier" as ASCII, fits in an i64).
const MIGRATE_LOCK: i64 = 0x6b75_7269_6572;

/// The schema the migrations and queries are written against.
pub const DEFAULT_SCHEMA: &str = "kurier";

/// A PostgreSQL identifier Kurier may put into SQL text: lowercase ASCII
/// letters, digits and `_`, not starting with a digit, at most 63 bytes.
/// Lowercase only, so the name means the same quoted or unquoted.
pub fn validate_identifier(what: &str, name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if first_ok && rest_ok && name.len() <= 63 {
        Ok(())
    } else {
        Err(format!(
            "{what} `{}` is not a plain PostgreSQL identifier: use 1-63 characters of [a-z0-9_], not starting with a digit",
            name.escape_debug()
        ))
    }
}

/// A validated schema name that holds (or will hold) a Kurier outbox.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SchemaName(String);

impl SchemaName {
    pub fn new(name: &str) -> Result<SchemaName, String> {
        validate_identifier("schema", name)?;
        Ok(SchemaName(name.to_owned()))
    }

    /// Schema `kurier`.
    pub fn kurier() -> SchemaName {
        SchemaName(DEFAULT_SCHEMA.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `sql` (written against `kurier.`) for this schema.
    pub fn sql<'a>(&self, sql: &'a str) -> Cow<'a, str> {
        if self.0 == DEFAULT_SCHEMA {
            Cow::Borrowed(sql)
        } else {
            Cow::Owned(sql.replace("kurier.", &format!("{}.", self.0)))
        }
    }
}

impl std::fmt::Display for SchemaName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Applies every pending migration to schema `kurier` and to each of
/// `schemas`. Idempotent.
pub async fn migrate(database_url: &str, schemas: &[SchemaName]) -> Result<(), Error> {
    let mut conn = PgConnection::connect(database_url).await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATE_LOCK)
        .execute(&mut conn)
        .await?;
    let mut all = vec![SchemaName::kurier()];
    for s in schemas {
        if !all.contains(s) {
            all.push(s.clone());
        }
    }
    let mut result = Ok(());
    for schema in &all {
        result = apply(&mut conn, schema).await;
        if result.is_err() {
            break;
        }
    }
    // Closing the connection releases the lock even if the unlock fails.
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATE_LOCK)
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
    result
}

async fn apply(conn: &mut PgConnection, schema: &SchemaName) -> Result<(), Error> {
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .execute(&mut *conn)
        .await?;
    // sqlx keeps its bookkeeping table in the first schema of the search path:
    // one history per schema, out of the application's `public` schema.
    sqlx::query(&format!("SET search_path TO {schema}, public"))
        .execute(&mut *conn)
        .await?;
    let result = migrator_for(schema).await?.run(&mut *conn).await;
    sqlx::query("RESET search_path").execute(&mut *conn).await?;
    result?;
    Ok(())
}

/// The migrations with `schema` in place of `kurier` (their checksums differ
/// per schema, and each schema keeps its own history).
#[derive(Debug)]
struct SchemaMigrations(Vec<Migration>);

impl<'s> MigrationSource<'s> for SchemaMigrations {
    fn resolve(self) -> BoxFuture<'s, Result<Vec<Migration>, BoxDynError>> {
        Box::pin(async move { Ok(self.0) })
    }
}

async fn migrator_for(schema: &SchemaName) -> Result<Migrator, Error> {
    let migrations = MIGRATOR
        .iter()
        .map(|m| {
            Migration::new(
                m.version,
                m.description.clone(),
                m.migration_type,
                Cow::Owned(schema.sql(&m.sql).into_owned()),
                m.no_tx,
            )
        })
        .collect();
    Ok(Migrator::new(SchemaMigrations(migrations)).await?)
}

/// Fails with an instruction when `schema` has not been migrated.
pub async fn ensure_migrated(conn: &mut PgConnection, schema: &SchemaName) -> Result<(), Error> {
    let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(format!("{schema}.outbox"))
        .fetch_one(&mut *conn)
        .await?;
    if found.is_none() {
        return Err(Error::Setup {
            problem: format!("table {schema}.outbox does not exist"),
            fix: if schema.as_str() == DEFAULT_SCHEMA {
                "run `kurier migrate` against this database".into()
            } else {
                format!(
                    "run `kurier migrate` with `{schema}` in relay.schemas (KURIER_RELAY_SCHEMAS)"
                )
            },
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_plain() {
        for ok in ["kurier", "tenant_a", "_x1", &"a".repeat(63)] {
            assert!(SchemaName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1a",
            "Tenant",
            "a-b",
            "a.b",
            "a\"b",
            "a;drop",
            &"a".repeat(64),
        ] {
            let err = SchemaName::new(bad).unwrap_err();
            assert!(err.contains("not a plain PostgreSQL identifier"), "{err}");
        }
    }

    #[test]
    fn sql_is_rewritten_for_other_schemas() {
        let s = SchemaName::new("tenant_a").unwrap();
        assert_eq!(
            s.sql("DELETE FROM kurier.outbox WHERE kurier.lock_held(1)"),
            "DELETE FROM tenant_a.outbox WHERE tenant_a.lock_held(1)"
        );
        assert!(matches!(SchemaName::kurier().sql("x"), Cow::Borrowed(_)));
    }
}
