//! A backlog of one million rows drains with flat memory.

use std::time::{Duration, Instant};

use kurier_test_support::*;

/// Peak and current resident set of a process, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_row_backlog_drains_with_flat_memory() {
    const ROWS: i64 = 1_000_000;
    let (db, brokers, topic) = (fresh_db().await, brokers(), unique("backlog"));
    create_topic(&brokers, &topic, 6).await;
    sqlx::query(
        "INSERT INTO kurier.outbox (topic, key, payload) \
         SELECT $1, 'key-' || (i % 1000), jsonb_build_object('seq', i, 'note', repeat('x', 150)) FROM generate_series(1, $2) AS i",
    )
    .bind(&topic)
    .bind(ROWS)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("VACUUM ANALYZE kurier.outbox")
        .execute(&db.pool)
        .await
        .unwrap();
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("KAFKA_BROKERS", brokers.as_str()),
    ];
    let mut child = spawn_binary(kurier_bin!(), &["run"], &env);
    let pid = child.id();
    let started = Instant::now();
    let mut samples = Vec::new();
    loop {
        let left = outbox_count(&db.pool).await;
        samples.push((ROWS - left, rss_kib(pid).1));
        if left == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "backlog not drained: {left} rows left"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (peak, _) = rss_kib(pid);
    signal(&child, "TERM");
    assert!(child.wait().unwrap().success());
    let secs = started.elapsed().as_secs_f64();
    // Flat: memory after the first quarter of the drain grows by less than 16 MiB,
    // and the peak stays far below what holding the backlog would take (~250 MB).
    let early = samples
        .iter()
        .find(|(done, _)| *done >= ROWS / 4)
        .map(|s| s.1)
        .unwrap_or(0);
    let late = samples.iter().map(|s| s.1).max().unwrap_or(0);
    eprintln!("drained {ROWS} rows in {secs:.1}s; RSS after 1/4: {} MiB, max sampled: {} MiB, peak (VmHWM): {} MiB", early / 1024, late / 1024, peak / 1024);
    assert!(peak < 100 * 1024, "peak RSS {peak} KiB");
    if early > 0 {
        assert!(
            late < early + 16 * 1024,
            "RSS grew from {early} to {late} KiB while draining"
        );
    }
}
