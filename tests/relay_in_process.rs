//! The relay in-process against real PostgreSQL and a real broker.

use std::collections::HashSet;
use std::time::Duration;

use kurier::Message;
use kurier_test_support::*;
use tokio_util::sync::CancellationToken;

const READ: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_transactions_never_publish() {
    let (db, brokers, topic) = (fresh_db().await, brokers(), unique("rollback"));
    create_topic(&brokers, &topic, 3).await;
    let relay = start_in_process(config(&db.url, &brokers, "")).await;

    // Library call on an open transaction, then rollback.
    let mut tx = db.pool.begin().await.unwrap();
    let ghost = kurier::enqueue(
        &mut *tx,
        &Message::json(&topic, serde_json::json!({"n": 1})).key("k"),
    )
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    // Plain SQL from "another language", rolled back.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO kurier.outbox (topic, key, payload) VALUES ($1, 'k', '{\"n\":2}')")
        .bind(&topic)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    // A committed sentinel written after both.
    let sentinel = kurier::enqueue(
        &db.pool,
        &Message::json(&topic, serde_json::json!({"n": 3})).key("k"),
    )
    .await
    .unwrap();

    let recs = read_ids(
        &brokers,
        &topic,
        &HashSet::from([sentinel.to_string()]),
        READ,
    );
    let ids: Vec<&str> = recs.iter().map(Rec::message_id).collect();
    assert_eq!(
        ids,
        vec![sentinel.to_string().as_str()],
        "only the committed row may be published (rolled back: {ghost})"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_with_rollbacks_all_delivered_in_key_order() {
    let (db, brokers, topic) = (fresh_db().await, brokers(), unique("concurrent"));
    create_topic(&brokers, &topic, 4).await;
    let relay = start_in_process(config(
        &db.url,
        &brokers,
        "[relay]\nbatch_size = 200\nmax_batch_bytes = 4096\n",
    ))
    .await;
    let committed = write_concurrently(
        &db.pool,
        &topic,
        8,
        150,
        5,
        0.10,
        Duration::ZERO,
        CancellationToken::new(),
    )
    .await;
    assert!(
        !committed.rolled_back.is_empty(),
        "the test must include rollbacks"
    );
    let recs = read_ids(&brokers, &topic, &committed.ids, READ);
    assert_delivered_exactly(&recs, &committed);
    wait_drained(&db.pool, Duration::from_secs(10)).await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_headers_and_binary_payloads_map_as_specified() {
    let (db, brokers, topic) = (fresh_db().await, brokers(), unique("mapping"));
    create_topic(&brokers, &topic, 1).await;
    let json_id: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO kurier.outbox (topic, key, payload, headers) \
         VALUES ($1, 'order-42', '{\"type\":\"OrderPlaced\"}', '{\"traceparent\":\"00-abc-def-01\",\"empty\":null}') RETURNING message_id",
    )
    .bind(&topic)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let tomb = kurier::enqueue(&db.pool, &Message::tombstone(&topic, "order-42"))
        .await
        .unwrap();
    let bin = kurier::enqueue(
        &db.pool,
        &Message::bytes(&topic, vec![0u8, 159, 146, 150, 255]).key("bin"),
    )
    .await
    .unwrap();
    let chosen = uuid::Uuid::new_v4();
    let nokey = kurier::enqueue(
        &db.pool,
        &Message::json(&topic, serde_json::json!([1, "two"])).message_id(chosen),
    )
    .await
    .unwrap();
    assert_eq!(nokey, chosen);

    let relay = start_in_process(config(&db.url, &brokers, "")).await;
    let want = HashSet::from([json_id, tomb, bin, nokey].map(|u| u.to_string()));
    let recs = read_ids(&brokers, &topic, &want, READ);
    assert_eq!(recs.len(), 4, "{recs:?}");
    let by_id = |id: uuid::Uuid| {
        recs.iter()
            .find(|r| r.message_id() == id.to_string())
            .unwrap()
    };

    let r = by_id(json_id);
    assert_eq!(r.key.as_deref(), Some("order-42"));
    assert_eq!(r.json(), serde_json::json!({"type": "OrderPlaced"}));
    assert_eq!(r.header("traceparent"), Some("00-abc-def-01"));
    assert!(
        r.headers.iter().any(|(k, v)| k == "empty" && v.is_none()),
        "null header = header without value: {r:?}"
    );
    assert_eq!(r.headers.len(), 3, "{r:?}");

    let r = by_id(tomb);
    assert_eq!(
        (r.key.as_deref(), r.value.as_deref()),
        (Some("order-42"), None),
        "NULL payload = tombstone"
    );
    let r = by_id(bin);
    assert_eq!(
        r.value.as_deref(),
        Some(&[0u8, 159, 146, 150, 255][..]),
        "bytes unchanged"
    );
    let r = by_id(nokey);
    assert_eq!(
        (r.key.as_deref(), r.json()),
        (None, serde_json::json!([1, "two"]))
    );
    // Order of one key: the JSON row was inserted before its tombstone.
    let pos = |id: uuid::Uuid| {
        recs.iter()
            .position(|r| r.message_id() == id.to_string())
            .unwrap()
    };
    assert!(pos(json_id) < pos(tomb));
    relay.stop().await;
}

#[test]
fn murmur2_matches_independent_vectors() {
    // From Apache Kafka's UtilsTest and Akka's Kafka partitioner tests.
    let vectors: &[(&str, i32)] = &[
        ("21", -973932308),
        ("foobar", -790332482),
        ("a-little-bit-long-string", -985981536),
        ("a-little-bit-longer-string", -1486304829),
        (
            "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58897971,
        ),
        ("abc", 479470107),
        ("1", -1993445489),
        ("12", 126087238),
        ("123", -267702483),
        ("1234", -1614185708),
        ("12345", -1188365604),
    ];
    for (input, want) in vectors {
        assert_eq!(murmur2(input.as_bytes()), *want, "murmur2({input:?})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_to_partition_matches_the_java_client() {
    let (db, brokers, topic) = (fresh_db().await, brokers(), unique("partitions"));
    const PARTITIONS: i32 = 6;
    create_topic(&brokers, &topic, PARTITIONS).await;
    let mut keys: Vec<String> = [
        "21",
        "foobar",
        "a-little-bit-long-string",
        "abc",
        "1",
        "12345",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    keys.extend((0..200).map(|i| format!("customer-{i}")));
    let mut ids = HashSet::new();
    for k in &keys {
        ids.insert(
            kurier::enqueue(
                &db.pool,
                &Message::json(&topic, serde_json::json!({})).key(k),
            )
            .await
            .unwrap()
            .to_string(),
        );
    }
    let relay = start_in_process(config(&db.url, &brokers, "")).await;
    let recs = read_ids(&brokers, &topic, &ids, READ);
    let mut used = HashSet::new();
    for r in &recs {
        let key = r.key.as_deref().unwrap();
        assert_eq!(
            r.partition,
            java_partition(key.as_bytes(), PARTITIONS),
            "key {key:?}"
        );
        used.insert(r.partition);
    }
    assert_eq!(
        used.len() as i32,
        PARTITIONS,
        "206 keys should spread over all partitions"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent_and_safe_concurrently() {
    let url = fresh_empty_db().await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let runs: Vec<_> = (0..4)
        .map(|_| kurier::schema::migrate(&pool, &[]))
        .collect();
    for r in futures::future::join_all(runs).await {
        r.expect("concurrent migrate");
    }
    kurier::schema::migrate(&pool, &[])
        .await
        .expect("second migrate is a no-op");
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM kurier._sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations"))
        .unwrap()
        .count() as i64;
    assert_eq!(applied, files);
    let in_public: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('public._sqlx_migrations')::text")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        in_public, None,
        "migration bookkeeping stays in schema kurier"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_rows_are_dead_lettered_and_good_rows_flow_in_order() {
    let (db, brokers, topic) = (fresh_db().await, brokers(), unique("poison"));
    create_topic(&brokers, &topic, 2).await;
    let mut good = Vec::new();
    for i in 0..30 {
        let key = format!("k{}", i % 3);
        match i {
            // Illegal topic name, and a 3 MB record (over message.max.bytes), on the same keys as good rows.
            7 => {
                sqlx::query("INSERT INTO kurier.outbox (topic, key, payload) VALUES ('bad topic!', $1, '{}')").bind(&key).execute(&db.pool).await.unwrap();
            }
            13 => {
                let big = serde_json::json!({ "blob": "x".repeat(3 * 1024 * 1024) });
                kurier::enqueue(&db.pool, &Message::json(&topic, big).key(&key))
                    .await
                    .unwrap();
            }
            14 => {
                sqlx::query("INSERT INTO kurier.outbox (topic, key, payload, headers) VALUES ($1, $2, '{}', '{\"n\": 1}')").bind(&topic).bind(&key).execute(&db.pool).await.unwrap();
            }
            _ => {
                let id = kurier::enqueue(
                    &db.pool,
                    &Message::json(&topic, serde_json::json!({ "seq": i })).key(&key),
                )
                .await
                .unwrap();
                good.push((key, i as i64, id.to_string()));
            }
        }
    }
    let relay = start_in_process(config(&db.url, &brokers, "")).await;
    let ids: HashSet<String> = good.iter().map(|g| g.2.clone()).collect();
    let recs = read_ids(&brokers, &topic, &ids, READ);
    let mut order = std::collections::BTreeMap::new();
    for (key, seq, _) in &good {
        order.entry(key.clone()).or_insert_with(Vec::new).push(*seq);
    }
    assert_eq!(recs.len(), good.len(), "only the good rows are published");
    assert_per_key_order(&recs, &order);
    wait_drained(&db.pool, Duration::from_secs(10)).await;
    let dead: Vec<(String, String)> =
        sqlx::query_as("SELECT topic, error FROM kurier.dead_letters ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(dead.len(), 3, "{dead:?}");
    assert!(
        dead[0].0 == "bad topic!" && dead[0].1.contains("illegal topic name"),
        "{dead:?}"
    );
    assert!(
        dead[1].1.contains("MessageSizeTooLarge") || dead[1].1.contains("too large"),
        "{:?}",
        dead[1].1
    );
    assert!(dead[2].1.contains("header `n`"), "{:?}", dead[2].1);
    assert!(!relay.handle.is_finished(), "the daemon stays up");

    // Operators: list, retry (the bad-header row, after fixing it), discard the rest.
    let listed = kurier::outbox::store::dead_letter::list(
        &db.pool,
        &kurier::schema::SchemaName::kurier(),
        10,
    )
    .await
    .unwrap();
    assert_eq!(listed.len(), 3);
    assert!(listed[1].payload_size.unwrap() > 3_000_000);
    sqlx::query("UPDATE kurier.dead_letters SET headers = '{\"n\": \"1\"}' WHERE id = $1")
        .bind(listed[2].id)
        .execute(&db.pool)
        .await
        .unwrap();
    let retried = kurier::outbox::store::dead_letter::retry(
        &db.pool,
        &kurier::schema::SchemaName::kurier(),
        &kurier::outbox::store::dead_letter::Selection::Ids(vec![listed[2].id]),
    )
    .await
    .unwrap();
    assert_eq!(retried, 1);
    let fixed = listed[2].message_id.to_string();
    read_ids(&brokers, &topic, &HashSet::from([fixed]), READ);
    wait_drained(&db.pool, Duration::from_secs(10)).await;
    assert_eq!(
        kurier::outbox::store::dead_letter::discard(
            &db.pool,
            &kurier::schema::SchemaName::kurier(),
            &kurier::outbox::store::dead_letter::Selection::All
        )
        .await
        .unwrap(),
        2
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_is_bounded_by_bytes_as_well_as_rows() {
    let db = fresh_db().await;
    for i in 0..10 {
        let blob = serde_json::json!({ "i": i, "blob": "y".repeat(1000) });
        kurier::enqueue(&db.pool, &Message::json("t", blob).key("k"))
            .await
            .unwrap();
    }
    let mut conn = db.pool.acquire().await.unwrap();
    let mut leases = register(&mut conn).await;
    let me = leases.me.clone();
    assert!(
        claim_ids(&mut conn, &me, 100, 1 << 30).await.is_empty(),
        "no leases, no rows"
    );
    leases.heartbeat(&mut conn).await.unwrap();
    assert_eq!(
        leases.owned().len(),
        kurier::outbox::store::lease::PARTITIONS,
        "a lone relay owns every partition"
    );
    assert_eq!(claim_ids(&mut conn, &me, 100, 1 << 30).await.len(), 10);
    assert_eq!(claim_ids(&mut conn, &me, 4, 1 << 30).await.len(), 4);
    // ~1 KB rows under a 2,500-byte budget: the rows that start below the budget, in id order.
    let some = claim_ids(&mut conn, &me, 100, 2500).await;
    assert!((2..=3).contains(&some.len()), "{some:?}");
    assert!(some.windows(2).all(|w| w[0] < w[1]));
    // A single row larger than the budget still goes out alone.
    assert_eq!(claim_ids(&mut conn, &me, 100, 1).await.len(), 1);
    // The batch in flight is left out of the next claim (prefetch while publishing).
    let first = claim_ids(&mut conn, &me, 4, 1 << 30).await;
    let next = claim_ids_except(&mut conn, &me, 4, 1 << 30, &first).await;
    let all = claim_ids(&mut conn, &me, 8, 1 << 30).await;
    assert_eq!([first, next].concat(), all);
}

/// The claim cuts skipped runs out as id ranges, or filters skipped ids when
/// they are too scattered; either way it returns exactly the other rows, in
/// id order, also those in the gaps between skipped runs and before them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_skips_exactly_the_rows_in_flight() {
    let db = fresh_db().await;
    let fill = "INSERT INTO kurier.outbox (topic, key, payload) \
                SELECT 't', 'k', jsonb_build_object('i', i) FROM generate_series(1, $1) i";
    sqlx::query(fill).bind(599).execute(&db.pool).await.unwrap();
    // An id no row has (a rolled-back insert) before the last row.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query(fill).bind(1).execute(&mut *tx).await.unwrap();
    tx.rollback().await.unwrap();
    sqlx::query(fill).bind(1).execute(&db.pool).await.unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let mut leases = register(&mut conn).await;
    leases.heartbeat(&mut conn).await.unwrap();
    let me = leases.me.clone();
    let ids = claim_ids(&mut conn, &me, 1000, 1 << 30).await;
    assert_eq!(ids.len(), 600);
    let at = |i: &[usize]| i.iter().map(|&i| ids[i]).collect::<Vec<i64>>();
    let skips = [
        at(&[10, 11, 12, 13]),                                       // one run
        at(&[0, 1, 2, 5, 6, 20, 21, 22, 599]), // runs with gaps, the first and last rows
        at(&[598, 599]).into_iter().chain([ids[599] - 1]).collect(), // the rolled-back id too
        (0..600).step_by(2).map(|i| ids[i]).collect(), // 300 runs, too many ranges: filtered
    ];
    for skip in skips {
        let expected: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|id| !skip.contains(id))
            .collect();
        assert_eq!(
            claim_ids_except(&mut conn, &me, 1000, 1 << 30, &skip).await,
            expected,
            "skipping {skip:?}"
        );
        assert_eq!(
            claim_ids_except(&mut conn, &me, 3, 1 << 30, &skip).await,
            expected[..3],
            "the first three, skipping {skip:?}"
        );
    }
}

async fn register(conn: &mut sqlx::PgConnection) -> kurier_daemon::lease::Leases {
    let schema = kurier::schema::SchemaName::kurier();
    kurier_daemon::lease::Leases::register(conn, schema, Duration::from_secs(30))
        .await
        .unwrap()
}

async fn claim_ids(conn: &mut sqlx::PgConnection, me: &str, limit: u32, bytes: u64) -> Vec<i64> {
    claim_ids_except(conn, me, limit, bytes, &[]).await
}

async fn claim_ids_except(
    conn: &mut sqlx::PgConnection,
    me: &str,
    limit: u32,
    bytes: u64,
    in_flight: &[i64],
) -> Vec<i64> {
    let what = kurier::outbox::store::claim::Claim {
        owner: me,
        limit,
        max_bytes: bytes,
        skip: in_flight,
        start: 0,
    };
    kurier::outbox::store::claim::claim(conn, &kurier::schema::SchemaName::kurier(), &what)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_privilege_role_is_enough_for_the_relay() {
    let (db, brokers, topic) = (fresh_db().await, brokers(), unique("least-privilege"));
    create_topic(&brokers, &topic, 1).await;
    let script = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/least-privilege.sql"
    ))
    .unwrap();
    sqlx::raw_sql(&script)
        .execute(&db.pool)
        .await
        .expect("deploy/least-privilege.sql runs");
    let mut as_relay = url::Url::parse(&db.url).unwrap();
    as_relay.set_username("kurier_relay").unwrap();
    let cfg = config(
        as_relay.as_str(),
        &brokers,
        "[relay]\nlease_ttl_ms = 2000\n",
    );
    let findings = kurier_daemon::check::run(&cfg).await;
    use kurier_daemon::check::Level;
    assert!(
        findings.iter().all(|f| f.level != Level::Fail),
        "{findings:?}"
    );
    // Where autovacuum is off (as on this project's machines), check says that
    // this role (not the table's owner) cannot vacuum it either.
    let autovacuum: bool = sqlx::query_scalar("SELECT current_setting('autovacuum')::bool")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let upkeep = findings
        .iter()
        .find(|f| f.what.contains("autovacuum"))
        .unwrap_or_else(|| panic!("no upkeep finding: {findings:?}"));
    if autovacuum {
        assert_eq!(upkeep.level, Level::Ok, "{upkeep:?}");
    } else {
        assert_eq!(upkeep.level, Level::Warn, "{upkeep:?}");
        assert!(upkeep.what.contains("may not VACUUM"), "{upkeep:?}");
    }
    let id = kurier::enqueue(
        &db.pool,
        &Message::json(&topic, serde_json::json!({"ok": true})).key("k"),
    )
    .await
    .unwrap();
    let relay = start_in_process(cfg).await;
    read_ids(&brokers, &topic, &HashSet::from([id.to_string()]), READ);
    wait_drained(&db.pool, Duration::from_secs(10)).await;
    relay.stop().await;
}
