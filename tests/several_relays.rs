//! Three relays on one outbox while one is SIGKILLed and one is SIGSTOPped
//! longer than its lease, repeatedly, during concurrent writes.

use std::process::Child;
use std::time::{Duration, Instant};

use kurier_test_support::*;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_with_kills_and_stalls_lose_nothing_and_keep_key_order() {
    let (db, brokers, topic) = (fresh_db().await, brokers(), unique("three-relays"));
    create_topic(&brokers, &topic, 4).await;
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("KAFKA_BROKERS", brokers.as_str()),
        ("KURIER_RELAY_LEASE_TTL_MS", "1500"),
        ("KURIER_RELAY_BATCH_SIZE", "100"),
    ];
    let mut relays: Vec<Child> = (0..3)
        .map(|_| spawn_binary(kurier_bin!(), &["run"], &env))
        .collect();
    let stop = CancellationToken::new();
    let writers = {
        let (pool, topic, stop) = (db.pool.clone(), topic.clone(), stop.clone());
        tokio::spawn(async move {
            write_concurrently(
                &pool,
                &topic,
                4,
                1_000_000,
                8,
                0.10,
                Duration::from_millis(5),
                stop,
            )
            .await
        })
    };
    let (started, mut kills, mut stalls, mut most_owners) = (Instant::now(), 0, 0, 0i64);
    while started.elapsed() < Duration::from_secs(14) {
        tokio::time::sleep(Duration::from_millis(800)).await;
        most_owners = most_owners.max(live_owners(&db.pool).await);
        // Relay 0: killed and restarted.
        relays[0].kill().unwrap();
        relays[0].wait().unwrap();
        relays[0] = spawn_binary(kurier_bin!(), &["run"], &env);
        kills += 1;
        // Relay 1: stalled longer than its lease, then resumed.
        signal(&relays[1], "STOP");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        most_owners = most_owners.max(live_owners(&db.pool).await);
        signal(&relays[1], "CONT");
        stalls += 1;
    }
    stop.cancel();
    let committed = writers.await.unwrap();
    wait_drained(&db.pool, Duration::from_secs(60)).await;
    for r in &relays {
        signal(r, "TERM");
    }
    for mut r in relays {
        let status = r.wait().unwrap();
        assert!(status.success(), "SIGTERM must exit 0: {status}");
    }
    assert!(
        most_owners >= 2,
        "the work must be split between relays (at most {most_owners} owner seen)"
    );
    let recs = read_ids(&brokers, &topic, &committed.ids, Duration::from_secs(120));
    eprintln!("{kills} SIGKILLs, {stalls} SIGSTOPs of 2.5 s (lease 1.5 s); up to {most_owners} relays owned partitions at once");
    assert_delivered_exactly(&recs, &committed);
}

async fn live_owners(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(DISTINCT owner) FROM kurier.relay_leases WHERE expires_at > now()",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}
