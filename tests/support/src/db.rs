//! A fresh database per test (or bench part), migrated, so no two share an
//! outbox; and the outbox probes tests wait on.

use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

use crate::env::database_url;

/// A fresh database for one test, migrated, so tests never share an outbox.
pub struct TestDb {
    pub url: String,
    pub pool: PgPool,
}

pub async fn fresh_db() -> TestDb {
    let url = fresh_empty_db().await;
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect(&url)
        .await
        .expect("connect test db");
    kurier::schema::migrate(&pool, &[]).await.expect("migrate");
    TestDb { url, pool }
}

/// A new, empty database named `kurier_test_<uuid>` (`make test` drops
/// those left by earlier runs); returns its URL.
pub async fn fresh_empty_db() -> String {
    fresh_named_db("kurier_test").await
}

/// A new, empty database named `<prefix>_<uuid>`; returns its URL.
pub async fn fresh_named_db(prefix: &str) -> String {
    let base = database_url();
    let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&base)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to DATABASE_URL: {e}"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create database");
    let mut url = url::Url::parse(&base).expect("DATABASE_URL is a URL");
    url.set_path(&name);
    url.to_string()
}

/// Drops the database of `url` (also with sessions still connected).
pub async fn drop_db(url: &str) {
    let name = url::Url::parse(url)
        .expect("a database URL")
        .path()
        .trim_start_matches('/')
        .to_owned();
    let mut admin = PgConnection::connect(&database_url())
        .await
        .expect("DATABASE_URL");
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .expect("drop database");
}

pub async fn outbox_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM kurier.outbox")
        .fetch_one(pool)
        .await
        .expect("count")
}

pub async fn wait_drained(pool: &PgPool, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let n = outbox_count(pool).await;
        if n == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "outbox not drained after {timeout:?}: {n} rows left"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
