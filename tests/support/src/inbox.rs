//! Probes of the inbox tables.

use std::time::{Duration, Instant};

use sqlx::PgPool;

pub async fn inbox_count(pool: &PgPool, consumer: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM kurier.inbox WHERE consumer = $1")
        .bind(consumer)
        .fetch_one(pool)
        .await
        .expect("count")
}

/// Waits until the inbox writer has seen `total` records (stored + dropped duplicates).
pub async fn wait_inbox_seen(
    pool: &PgPool,
    consumer: &str,
    total: i64,
    timeout: Duration,
) -> (i64, i64) {
    let deadline = Instant::now() + timeout;
    loop {
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT received, duplicates FROM kurier.inbox_stats WHERE consumer = $1",
        )
        .bind(consumer)
        .fetch_optional(pool)
        .await
        .expect("stats");
        let (r, d) = row.unwrap_or((0, 0));
        if r + d >= total {
            return (r, d);
        }
        assert!(
            Instant::now() < deadline,
            "inbox writer saw {} of {total} records within {timeout:?}",
            r + d
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts one row per expected ID for `consumer`, none missing, none extra.
pub async fn assert_inbox_exactly(
    pool: &PgPool,
    consumer: &str,
    ids: &std::collections::HashSet<String>,
) {
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT message_id FROM kurier.inbox WHERE consumer = $1")
            .bind(consumer)
            .fetch_all(pool)
            .await
            .expect("ids");
    let unique: std::collections::HashSet<&String> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len(), "an ID is stored twice");
    let missing = ids.iter().filter(|id| !unique.contains(id)).count();
    assert_eq!(missing, 0, "{missing} message IDs missing from the inbox");
    assert_eq!(
        stored.len(),
        ids.len(),
        "unexpected extra rows in the inbox"
    );
}
