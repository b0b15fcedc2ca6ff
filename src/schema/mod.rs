//! Everything `kurier migrate` creates: the Kurier schemas with `migrations/`
//! applied, and (in [`debezium`]) the capture triggers of Debezium-shape tables.
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

pub mod debezium;

use std::borrow::Cow;

use futures::future::BoxFuture;
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, Migrator};
use sqlx::{Connection, PgConnection, PgPool};

use crate::error::Error;
pub use crate::names::{validate_identifier, SchemaName, DEFAULT_SCHEMA};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Advisory lock key for migrations ("kurier" as ASCII, fits in an i64).
const MIGRATE_LOCK: i64 = 0x6b75_7269_6572;

/// Applies every pending migration to schema `kurier` and to each of
/// `schemas`. Idempotent. Runs on a connection of its own, taken out of
/// `pool` and closed afterwards, so the session lock cannot outlive it.
pub async fn migrate(pool: &PgPool, schemas: &[SchemaName]) -> Result<(), Error> {
    let mut conn = pool.acquire().await?.detach();
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

/// The tables of `schema` on which the current role lacks any of SELECT,
/// INSERT, UPDATE or DELETE (for `kurier check`).
pub async fn missing_rights(
    conn: &mut PgConnection,
    schema: &SchemaName,
    tables: &[&str],
) -> Result<Vec<String>, Error> {
    let qualified: Vec<String> = tables.iter().map(|t| format!("{schema}.{t}")).collect();
    let missing = sqlx::query_scalar(
        "SELECT t FROM unnest($1::text[]) AS t \
         WHERE NOT has_table_privilege(t, 'SELECT, INSERT, UPDATE, DELETE')",
    )
    .bind(&qualified)
    .fetch_all(conn)
    .await?;
    Ok(missing)
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
