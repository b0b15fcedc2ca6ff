//! `kurier migrate`: creates schema `kurier` and applies `migrations/`.
//!
//! Safe to run from several instances at once: everything happens under one
//! PostgreSQL advisory lock, so the second instance waits and then finds
//! nothing left to do.

use sqlx::{Connection, PgConnection};

use crate::error::Error;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Advisory lock key for migrations ("kurier" as ASCII, fits in an i64).
const MIGRATE_LOCK: i64 = 0x6b75_7269_6572;

/// Applies every pending migration. Idempotent.
pub async fn migrate(database_url: &str) -> Result<(), Error> {
    let mut conn = PgConnection::connect(database_url).await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATE_LOCK)
        .execute(&mut conn)
        .await?;
    let result = apply(&mut conn).await;
    // Closing the connection releases the lock even if the unlock fails.
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATE_LOCK)
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
    result
}

async fn apply(conn: &mut PgConnection) -> Result<(), Error> {
    sqlx::query("CREATE SCHEMA IF NOT EXISTS kurier")
        .execute(&mut *conn)
        .await?;
    // sqlx keeps its bookkeeping table in the first schema of the search path:
    // keep it in `kurier`, out of the application's `public` schema.
    sqlx::query("SET search_path TO kurier, public")
        .execute(&mut *conn)
        .await?;
    MIGRATOR.run(&mut *conn).await?;
    Ok(())
}

/// Fails with an instruction when the schema has not been migrated.
pub async fn ensure_migrated(conn: &mut PgConnection) -> Result<(), Error> {
    let found: Option<String> = sqlx::query_scalar("SELECT to_regclass('kurier.outbox')::text")
        .fetch_one(&mut *conn)
        .await?;
    if found.is_none() {
        return Err(Error::Setup {
            problem: "table kurier.outbox does not exist".into(),
            fix: "run `kurier migrate` against this database".into(),
        });
    }
    Ok(())
}
