//! The relay's claim costs about one batch whatever the planner's statistics
//! say: asserted from `EXPLAIN (ANALYZE, FORMAT JSON)` of the claim exactly as
//! the relay sends it, on a fresh outbox that was never analyzed, one analyzed
//! while empty, and one whose statistics went stale — not from a timing.

use kurier::outbox::store::claim::{explain_claim, Claim};
use kurier::SchemaName;
use kurier_test_support::*;
use serde_json::Value;
use sqlx::PgPool;

const BATCH: u32 = 5000;
/// What a claim may read: a small multiple of the batch.
const A_FEW_BATCHES: f64 = 3.0 * BATCH as f64;
/// The owner that claims; `lease` gives it partitions.
const ME: &str = "me";

/// Rows the plan read from `kurier.outbox`: for every scan node of it (the
/// retry probes included), the rows it returned plus those its filters
/// removed, times its loops. (PostgreSQL prints per-loop averages, rounded,
/// so looped nodes are off by at most half their loop count.)
fn rows_read(node: &Value) -> f64 {
    let own = if node["Relation Name"] == "outbox" {
        let n = |k: &str| node[k].as_f64().unwrap_or(0.0);
        (n("Actual Rows") + n("Rows Removed by Filter") + n("Rows Removed by Index Recheck"))
            * n("Actual Loops")
    } else {
        0.0
    };
    let children = node["Plans"]
        .as_array()
        .map_or(0.0, |plans| plans.iter().map(rows_read).sum());
    own + children
}

/// The scan nodes on `kurier.outbox` that ran: (node type, index).
fn outbox_scans(node: &Value, out: &mut Vec<(String, String)>) {
    if node["Relation Name"] == "outbox" && node["Actual Loops"].as_f64() != Some(0.0) {
        out.push((
            node["Node Type"].as_str().unwrap_or_default().to_owned(),
            node["Index Name"].as_str().unwrap_or_default().to_owned(),
        ));
    }
    for child in node["Plans"].as_array().into_iter().flatten() {
        outbox_scans(child, out);
    }
}

/// `n` rows over 1,000 keys, in ONE transaction (a burst).
async fn burst(pool: &PgPool, n: i64) {
    sqlx::query(
        "INSERT INTO kurier.outbox (topic, key, payload) \
         SELECT 'orders', 'key-' || (i % 1000), jsonb_build_object('type', 'OrderPlaced', 'order', i, \
                'customer', 'customer-' || (i % 1000), 'note', repeat('x', 100)) \
         FROM generate_series(1, $1) AS i",
    )
    .bind(n)
    .execute(pool)
    .await
    .unwrap();
}

async fn lease(pool: &PgPool, owner: &str, partitions: std::ops::Range<i16>) {
    sqlx::query(
        "UPDATE kurier.relay_leases SET owner = $1, expires_at = now() + interval '1 hour' \
         WHERE partition >= $2 AND partition < $3",
    )
    .bind(owner)
    .bind(partitions.start)
    .bind(partitions.end)
    .execute(pool)
    .await
    .unwrap();
}

/// Which index the claim walks: the primary key when the owner holds every
/// partition (the oldest rows, read in heap order), `outbox_lease_partition`
/// when it holds some (never reading other owners' rows).
const EVERY_PARTITION: &str = "outbox_pkey";
const SOME_PARTITIONS: &str = "outbox_lease_partition";

/// Claims as [`ME`] (skipping `skip`) and asserts the plan read at most
/// `max_read` rows, walking index `walk` (and probing `outbox_retrying`)
/// and nothing else; returns (rows read, rows claimed).
async fn assert_bounded(
    pool: &PgPool,
    skip: &[i64],
    walk: &str,
    max_read: f64,
    what: &str,
) -> (f64, f64) {
    let mut conn = pool.acquire().await.unwrap();
    let claim = Claim {
        owner: ME,
        limit: BATCH,
        max_bytes: 16 << 20,
        skip,
        start: 7,
    };
    let plan = explain_claim(&mut conn, &SchemaName::kurier(), &claim)
        .await
        .unwrap();
    let root = &plan[0]["Plan"];
    let read = rows_read(root);
    let claimed = root["Actual Rows"].as_f64().unwrap();
    assert!(
        read <= max_read,
        "{what}: the claim read {read} rows (at most {max_read} allowed)\n{plan:#}"
    );
    let mut scans = Vec::new();
    outbox_scans(root, &mut scans);
    for (node, index) in &scans {
        let walked = node == "Index Scan" && index == walk;
        let probe = index == "outbox_retrying";
        assert!(
            walked || probe,
            "{what}: unexpected scan {node} {index} (expected a walk of {walk})\n{plan:#}"
        );
    }
    // An empty walk is still a walk (one probe): it must be there.
    assert!(
        scans.iter().any(|(_, index)| index == walk),
        "{what}: no walk of {walk}\n{plan:#}"
    );
    eprintln!("{what}: {claimed} rows claimed, {read} read");
    (read, claimed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_into_a_never_analyzed_outbox_is_claimed_a_batch_at_a_time() {
    let db = fresh_db().await;
    burst(&db.pool, 100_000).await;
    lease(&db.pool, ME, 0..32).await;
    let (_, claimed) = assert_bounded(
        &db.pool,
        &[],
        EVERY_PARTITION,
        A_FEW_BATCHES,
        "never analyzed",
    )
    .await;
    assert_eq!(claimed, BATCH as f64);
    // With the first 10,000 rows in flight (two runs, as while the relay
    // publishes one batch and deletes the previous one), they are walked around.
    let first: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM kurier.outbox ORDER BY id LIMIT 10000")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let (_, claimed) = assert_bounded(
        &db.pool,
        &first,
        EVERY_PARTITION,
        A_FEW_BATCHES,
        "never analyzed, 10k in flight",
    )
    .await;
    assert_eq!(claimed, BATCH as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_after_an_analyze_of_the_empty_outbox_is_claimed_a_batch_at_a_time() {
    let db = fresh_db().await;
    sqlx::query("ANALYZE kurier.outbox")
        .execute(&db.pool)
        .await
        .unwrap();
    burst(&db.pool, 100_000).await;
    lease(&db.pool, ME, 0..32).await;
    assert_bounded(
        &db.pool,
        &[],
        EVERY_PARTITION,
        A_FEW_BATCHES,
        "analyzed while empty",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_statistics_and_a_second_owner_keep_the_claim_bounded() {
    let db = fresh_db().await;
    burst(&db.pool, 100_000).await;
    sqlx::query("ANALYZE kurier.outbox")
        .execute(&db.pool)
        .await
        .unwrap();
    burst(&db.pool, 400_000).await;
    lease(&db.pool, ME, 0..32).await;
    assert_bounded(
        &db.pool,
        &[],
        EVERY_PARTITION,
        A_FEW_BATCHES,
        "stale statistics, every partition",
    )
    .await;
    // A retry pending: every row is probed for an earlier retrying row of
    // its key (one index probe each), and the batch still costs one batch.
    sqlx::query(
        "UPDATE kurier.outbox SET retry_at = now() + interval '1 hour', attempts = 1 \
         WHERE id = (SELECT min(id) + 10 FROM kurier.outbox)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let (_, claimed) = assert_bounded(
        &db.pool,
        &[],
        EVERY_PARTITION,
        A_FEW_BATCHES,
        "stale statistics, a retry pending",
    )
    .await;
    assert_eq!(claimed, BATCH as f64);
    lease(&db.pool, ME, 0..16).await;
    lease(&db.pool, "other", 16..32).await;
    assert_bounded(
        &db.pool,
        &[],
        SOME_PARTITIONS,
        A_FEW_BATCHES,
        "stale statistics, half the partitions",
    )
    .await;
    // The other owner's partitions hold the whole backlog, ours nothing:
    // the claim must not walk the other's rows to find that out.
    sqlx::query("DELETE FROM kurier.outbox WHERE lease_partition < 16")
        .execute(&db.pool)
        .await
        .unwrap();
    let (read, claimed) = assert_bounded(
        &db.pool,
        &[],
        SOME_PARTITIONS,
        100.0,
        "own partitions empty",
    )
    .await;
    assert_eq!((read, claimed), (0.0, 0.0));
}
