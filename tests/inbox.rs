//! The inbox: the daemon's Kafka → inbox writer, the processor, and
//! `record_message`, against real PostgreSQL and a real broker.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use kurier::inbox::{self, Handler, HandlerError, InboxMessage, Processor};
use kurier_test_support::*;
use sqlx::PgConnection;

fn inbox_toml(topic: &str, consumer: &str) -> String {
    format!("[relay]\nenabled = false\n[inbox]\ntopics = [\"{topic}\"]\nconsumer = \"{consumer}\"\n[inbox.properties]\n\"session.timeout.ms\" = 6000\n\"max.poll.interval.ms\" = 15000\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_stored_once_and_records_map_to_rows() {
    let (db, brokers, topic) = (fresh_db().await, brokers(), unique("inbox-dups"));
    create_topic(&brokers, &topic, 3).await;
    let daemon = start_in_process(config(&db.url, &brokers, &inbox_toml(&topic, "billing"))).await;
    let producer = plain_producer(&brokers);
    let mut ids = HashSet::new();
    let mut sent = 0;
    for i in 0..300 {
        let id = format!("id-{i}");
        let value = format!("{{\"n\":{i}}}");
        send_plain(
            &producer,
            &topic,
            &format!("k{}", i % 7),
            value.as_bytes(),
            Some(&id),
        )
        .await;
        sent += 1;
        if i % 5 == 0 {
            // The same message again, once even under another key (another partition).
            let key = if i == 0 {
                "elsewhere".to_string()
            } else {
                format!("k{}", i % 7)
            };
            send_plain(&producer, &topic, &key, value.as_bytes(), Some(&id)).await;
            sent += 1;
        }
        ids.insert(id);
    }
    // A record from a producer that sets no message-id: its coordinates are its ID.
    send_plain(&producer, &topic, "anon", b"\x00\x01binary", None).await;
    sent += 1;
    let (received, duplicates) =
        wait_inbox_seen(&db.pool, "billing", sent, Duration::from_secs(60)).await;
    assert_eq!((received, duplicates), (301, 60));

    let anon: (String, String, i32, i64, Option<Vec<u8>>) =
        sqlx::query_as("SELECT message_id, topic, \"partition\", \"offset\", payload FROM kurier.inbox WHERE key = 'anon'::bytea").fetch_one(&db.pool).await.unwrap();
    assert_eq!(
        anon.0,
        format!("{}/{}/{}", anon.1, anon.2, anon.3),
        "fallback ID = topic/partition/offset"
    );
    assert_eq!(
        anon.4.as_deref(),
        Some(&b"\x00\x01binary"[..]),
        "bytes as received"
    );
    ids.insert(anon.0);
    assert_inbox_exactly(&db.pool, "billing", &ids).await;

    let (n, header): (serde_json::Value, String) =
        sqlx::query_as("SELECT kurier.payload_json(payload) -> 'n', headers ->> 'message-id' FROM kurier.inbox WHERE message_id = 'id-42'").fetch_one(&db.pool).await.unwrap();
    assert_eq!((n, header.as_str()), (serde_json::json!(42), "id-42"));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_between_db_commit_and_offset_commit_loses_nothing_and_stores_once() {
    let (db, brokers, topic) = (fresh_db().await, brokers(), unique("inbox-abort"));
    create_topic(&brokers, &topic, 2).await;
    let producer = plain_producer(&brokers);
    let mut ids = HashSet::new();
    for i in 0..1000 {
        let id = uuid::Uuid::new_v4().to_string();
        send_plain(&producer, &topic, &format!("k{}", i % 10), b"{}", Some(&id)).await;
        ids.insert(id);
    }
    let mut env = vec![
        ("DATABASE_URL", db.url.clone()),
        ("KAFKA_BROKERS", brokers.clone()),
        ("KURIER_RELAY_ENABLED", "false".into()),
        ("KURIER_INBOX_TOPICS", topic.clone()),
        ("KURIER_INBOX_CONSUMER", "ledger".into()),
        ("KURIER_INBOX_BATCH_SIZE", "50".into()),
        ("KURIER_INBOX_BATCH_WAIT_MS", "200".into()),
        (
            "KURIER_INBOX_PROPERTIES",
            "session.timeout.ms=6000,max.poll.interval.ms=15000".into(),
        ),
    ];
    let as_refs = |env: &Vec<(&'static str, String)>| {
        env.iter().map(|(k, v)| (*k, v.clone())).collect::<Vec<_>>()
    };
    // Three runs that each abort right after their 3rd database commit, before storing offsets.
    for run in 0..3 {
        let mut e = as_refs(&env);
        e.push(("KURIER_FAILPOINT_ABORT_AFTER_INBOX_COMMITS", "3".into()));
        // Full batches of 50 (the topic holds 1,000), however slow the
        // first fetch after joining the group: 3 commits store 150 rows.
        e.push(("KURIER_INBOX_BATCH_WAIT_MS", "5000".into()));
        let pairs: Vec<(&str, &str)> = e.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run_to_failpoint(&pairs, &format!("run {run}")).await;
    }
    let after_aborts = inbox_count(&db.pool, "ledger").await;
    assert!(
        after_aborts >= 150,
        "each aborted run committed batches first: {after_aborts} rows"
    );
    env.push(("RUST_LOG", "warn".into()));
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut child = spawn_binary(kurier_bin!(), &["run"], &pairs);
    let deadline = Instant::now() + Duration::from_secs(90);
    while inbox_count(&db.pool, "ledger").await < 1000 {
        assert!(
            Instant::now() < deadline,
            "inbox incomplete: {}",
            inbox_count(&db.pool, "ledger").await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    signal(&child, "TERM");
    assert!(child.wait().unwrap().success());
    assert_inbox_exactly(&db.pool, "ledger", &ids).await;
    let dups: i64 =
        sqlx::query_scalar("SELECT duplicates FROM kurier.inbox_stats WHERE consumer = 'ledger'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(
        dups >= 50,
        "batches committed before each abort must come back as duplicates, got {dups}"
    );
    eprintln!("3 aborts after DB commit: {dups} redelivered records dropped as duplicates");
}

/// `kurier run` with `env` (which sets a failpoint) until it exits, which
/// must be the failpoint's abort, not a clean stop.
async fn run_to_failpoint(env: &[(&str, &str)], what: &str) {
    let mut child = spawn_binary(kurier_bin!(), &["run"], env);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(
        !status.success(),
        "{what} should have aborted at the failpoint"
    );
}

/// `inbox.max_batch_bytes` closes a batch before `inbox.batch_size` does
/// when messages are large: with 1,000-byte payloads, a 50-message batch
/// size and a 10,000-byte bound, each transaction holds at most 10 messages,
/// so the writer aborted at its 3rd commit has stored at most 30 (without
/// the bound: 150, as in the test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_stop_at_the_byte_bound() {
    let (db, brokers, topic) = (fresh_db().await, brokers(), unique("inbox-bytes"));
    create_topic(&brokers, &topic, 1).await;
    let producer = plain_producer(&brokers);
    let payload = vec![b'x'; 1000];
    for i in 0..200 {
        let id = format!("bytes-{i}");
        send_plain(
            &producer,
            &topic,
            &format!("k{}", i % 10),
            &payload,
            Some(&id),
        )
        .await;
    }
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("KAFKA_BROKERS", brokers.as_str()),
        ("KURIER_RELAY_ENABLED", "false"),
        ("KURIER_INBOX_TOPICS", topic.as_str()),
        ("KURIER_INBOX_CONSUMER", "bytes"),
        ("KURIER_INBOX_BATCH_SIZE", "50"),
        ("KURIER_INBOX_MAX_BATCH_BYTES", "10000"),
        // Long enough that only the bounds close a batch.
        ("KURIER_INBOX_BATCH_WAIT_MS", "5000"),
        ("KURIER_FAILPOINT_ABORT_AFTER_INBOX_COMMITS", "3"),
    ];
    run_to_failpoint(&env, "the writer").await;
    let stored = inbox_count(&db.pool, "bytes").await;
    assert!(
        (3..=30).contains(&stored),
        "3 commits of at most 10 messages (10 x 1,002 bytes reach the 10,000-byte bound): {stored} rows"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_in_one_group_through_rebalances_store_each_id_once() {
    let (db, brokers, topic) = (fresh_db().await, brokers(), unique("inbox-rebalance"));
    create_topic(&brokers, &topic, 4).await;
    let consumer = unique("shipping");
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("KAFKA_BROKERS", brokers.as_str()),
        ("KURIER_RELAY_ENABLED", "false"),
        ("KURIER_INBOX_TOPICS", topic.as_str()),
        ("KURIER_INBOX_CONSUMER", consumer.as_str()),
        ("KURIER_INBOX_BATCH_SIZE", "20"),
        // Short group timeouts, as the SPEC advises for tests: Tansu holds a
        // rebalance until every member rejoined or the rebalance timeout passed.
        (
            "KURIER_INBOX_PROPERTIES",
            "session.timeout.ms=6000,max.poll.interval.ms=15000",
        ),
    ];
    let mut a = spawn_binary(kurier_bin!(), &["run"], &env);
    let producer = plain_producer(&brokers);
    let mut ids = HashSet::new();
    let mut b = None;
    let started = Instant::now();
    for i in 0..3000 {
        let id = uuid::Uuid::new_v4().to_string();
        send_plain(&producer, &topic, &format!("k{}", i % 16), b"{}", Some(&id)).await;
        ids.insert(id);
        if i == 1000 {
            b = Some(spawn_binary(kurier_bin!(), &["run"], &env)); // joins: rebalance
        }
        if i == 2000 {
            signal(&a, "TERM"); // leaves: rebalance
        }
        if i % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(a.wait().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(90);
    while inbox_count(&db.pool, &consumer).await < 3000 {
        assert!(
            Instant::now() < deadline,
            "inbox incomplete: {}",
            inbox_count(&db.pool, &consumer).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut b = b.unwrap();
    signal(&b, "TERM");
    assert!(b.wait().unwrap().success());
    assert_inbox_exactly(&db.pool, &consumer, &ids).await;
    eprintln!("rebalance test produced for {:?}", started.elapsed());
}

/// Inserts pending rows the way the inbox writer does.
async fn seed(pool: &sqlx::PgPool, consumer: &str, rows: &[(&str, &str)]) {
    for (id, key) in rows {
        sqlx::query("INSERT INTO kurier.inbox (consumer, message_id, topic, \"partition\", \"offset\", key, payload) VALUES ($1, $2, 't', 0, 0, $3::bytea, '{}'::bytea)")
            .bind(consumer)
            .bind(id)
            .bind(key)
            .execute(pool)
            .await
            .unwrap();
    }
}

/// Writes a side effect per message; fails for IDs starting with "poison";
/// kills its own connection (a crash before commit) on "crash".
struct Effects {
    calls: AtomicUsize,
}

impl Handler for Effects {
    fn handle<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        msg: &'a InboxMessage,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            sqlx::query("INSERT INTO effects (message_id) VALUES ($1)")
                .bind(&msg.message_id)
                .execute(&mut *conn)
                .await?;
            if msg.message_id.starts_with("poison") {
                return Err("cannot handle this one".into());
            }
            if msg.message_id == "crash" {
                sqlx::query("SELECT pg_terminate_backend(pg_backend_pid())")
                    .execute(&mut *conn)
                    .await?;
            }
            Ok(())
        })
    }
}

async fn effects(pool: &sqlx::PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT message_id FROM effects ORDER BY message_id")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_handler_is_retried_then_parked_while_others_proceed() {
    let db = fresh_db().await;
    sqlx::query("CREATE TABLE effects (message_id text NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    seed(
        &db.pool,
        "c",
        &[("a", "k1"), ("poison-1", "k1"), ("b", "k1"), ("c", "k2")],
    )
    .await;
    let handler = Effects {
        calls: AtomicUsize::new(0),
    };
    let p = Processor::new(db.pool.clone(), "c")
        .max_attempts(3)
        .retry(Duration::from_millis(10), Duration::from_millis(40));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        p.process_batch(&handler).await.unwrap();
        let s = &inbox::store::status(&db.pool, &kurier::SchemaName::kurier())
            .await
            .unwrap()[0];
        if s.pending == 0 {
            assert_eq!((s.processed, s.parked), (3, 1));
            break;
        }
        assert!(Instant::now() < deadline, "still pending: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Side effects of the failed attempts rolled back with them.
    assert_eq!(effects(&db.pool).await, vec!["a", "b", "c"]);
    let (attempts, error, parked): (i32, String, bool) =
        sqlx::query_as("SELECT attempts, last_error, parked_at IS NOT NULL FROM kurier.inbox WHERE message_id = 'poison-1'").fetch_one(&db.pool).await.unwrap();
    assert_eq!(
        (attempts, error.as_str(), parked),
        (3, "cannot handle this one", true)
    );
    assert_eq!(
        handler.calls.load(Ordering::SeqCst),
        6,
        "3 good + 3 attempts of the poison message"
    );
    // An operator puts it back in line.
    assert_eq!(
        inbox::store::unpark(&db.pool, &kurier::SchemaName::kurier(), "c", None)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        inbox::store::status(&db.pool, &kurier::SchemaName::kurier())
            .await
            .unwrap()[0]
            .pending,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn side_effects_and_processed_mark_commit_or_roll_back_together() {
    let db = fresh_db().await;
    sqlx::query("CREATE TABLE effects (message_id text NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    seed(&db.pool, "c", &[("first", "k1"), ("crash", "k2")]).await;
    let handler = Effects {
        calls: AtomicUsize::new(0),
    };
    let p = Processor::new(db.pool.clone(), "c").batch_size(10);
    // The connection dies before the batch commits: neither effects nor marks survive.
    assert!(p.process_batch(&handler).await.is_err());
    assert!(
        effects(&db.pool).await.is_empty(),
        "side effects of an uncommitted batch leaked"
    );
    let processed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM kurier.inbox WHERE processed_at IS NOT NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(processed, 0);
    // Once it can commit, both effects and marks are there, together.
    sqlx::query("UPDATE kurier.inbox SET message_id = 'second' WHERE message_id = 'crash'")
        .execute(&db.pool)
        .await
        .unwrap();
    let report = p.process_batch(&handler).await.unwrap();
    assert_eq!(report.processed, 2);
    assert_eq!(effects(&db.pool).await, vec!["first", "second"]);
    assert_eq!(
        p.process_batch(&handler).await.unwrap().claimed(),
        0,
        "processed messages are never handled again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn record_message_under_concurrent_callers_exactly_one_sees_new() {
    let db = fresh_db().await;
    sqlx::query("CREATE TABLE effects (message_id text NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    let news = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (pool, news) = (db.pool.clone(), news.clone());
        tasks.push(tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            if inbox::record_message(&mut *tx, "svc", "order-7")
                .await
                .unwrap()
            {
                news.fetch_add(1, Ordering::SeqCst);
                sqlx::query("INSERT INTO effects VALUES ('order-7')")
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await; // others now wait on the unique key
            }
            // Every fourth caller rolls back; if the winner did, a later caller wins.
            if i % 4 == 3 {
                tx.rollback().await.unwrap();
            } else {
                tx.commit().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        effects(&db.pool).await,
        vec!["order-7"],
        "exactly one committed effect"
    );
    assert!(news.load(Ordering::SeqCst) >= 1);
    let mut tx = db.pool.begin().await.unwrap();
    assert!(
        !inbox::record_message(&mut *tx, "svc", "order-7")
            .await
            .unwrap(),
        "a later copy is a duplicate"
    );
    assert!(
        inbox::record_message(&mut *tx, "other-svc", "order-7")
            .await
            .unwrap(),
        "dedup is per consumer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_sql_claims_skip_locked_rows_and_ordered_claims_keep_key_order() {
    let db = fresh_db().await;
    seed(
        &db.pool,
        "c",
        &[
            ("k1-1", "k1"),
            ("k1-2", "k1"),
            ("k2-1", "k2"),
            ("k1-3", "k1"),
            ("k2-2", "k2"),
        ],
    )
    .await;
    let ids = |rows: &[InboxMessage]| {
        rows.iter()
            .map(|m| m.message_id.clone())
            .collect::<Vec<_>>()
    };

    // Unordered: two concurrent transactions get disjoint rows.
    let mut t1 = db.pool.begin().await.unwrap();
    let mut t2 = db.pool.begin().await.unwrap();
    let a: Vec<InboxMessage> = sqlx::query_as(inbox::CLAIM)
        .bind("c")
        .bind(3i64)
        .fetch_all(&mut *t1)
        .await
        .unwrap();
    let b: Vec<InboxMessage> = sqlx::query_as(inbox::CLAIM)
        .bind("c")
        .bind(3i64)
        .fetch_all(&mut *t2)
        .await
        .unwrap();
    assert_eq!(
        (ids(&a), ids(&b)),
        (
            vec!["k1-1".to_string(), "k1-2".into(), "k2-1".into()],
            vec!["k1-3".to_string(), "k2-2".into()]
        )
    );
    drop((t1, t2));

    // Ordered: one row per key, the oldest; a key's next row waits until it is processed.
    let mut t1 = db.pool.begin().await.unwrap();
    let a: Vec<InboxMessage> = sqlx::query_as(inbox::CLAIM_ORDERED)
        .bind("c")
        .bind(10i64)
        .fetch_all(&mut *t1)
        .await
        .unwrap();
    assert_eq!(ids(&a), vec!["k1-1", "k2-1"]);
    let mut t2 = db.pool.begin().await.unwrap();
    let b: Vec<InboxMessage> = sqlx::query_as(inbox::CLAIM_ORDERED)
        .bind("c")
        .bind(10i64)
        .fetch_all(&mut *t2)
        .await
        .unwrap();
    assert!(
        b.is_empty(),
        "a concurrent ordered claim must not take k1-2 while k1-1 is in progress: {:?}",
        ids(&b)
    );
    t2.rollback().await.unwrap();
    sqlx::query("UPDATE kurier.inbox SET processed_at = now() WHERE id = ANY($1)")
        .bind(a.iter().map(|m| m.id).collect::<Vec<_>>())
        .execute(&mut *t1)
        .await
        .unwrap();
    t1.commit().await.unwrap();
    let next: Vec<InboxMessage> = sqlx::query_as(inbox::CLAIM_ORDERED)
        .bind("c")
        .bind(10i64)
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(ids(&next), vec!["k1-2", "k2-2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_payloads_then_forgets_dedup_keys() {
    let db = fresh_db().await;
    seed(
        &db.pool,
        "c",
        &[("old", "k"), ("recent", "k"), ("pending", "k")],
    )
    .await;
    sqlx::query("UPDATE kurier.inbox SET processed_at = now() - interval '10 days' WHERE message_id = 'old'").execute(&db.pool).await.unwrap();
    sqlx::query("UPDATE kurier.inbox SET processed_at = now() - interval '2 days' WHERE message_id = 'recent'").execute(&db.pool).await.unwrap();
    let (pruned, deleted) = inbox::store::prune(
        &db.pool,
        &kurier::SchemaName::kurier(),
        Duration::from_secs(86_400),
        Duration::from_secs(7 * 86_400),
    )
    .await
    .unwrap();
    assert_eq!((pruned, deleted), (1, 1));
    let rows: Vec<(String, bool)> =
        sqlx::query_as("SELECT message_id, payload IS NULL FROM kurier.inbox ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        vec![("recent".to_string(), true), ("pending".to_string(), false)],
        "payload pruned, dedup key kept; pending untouched"
    );
    // The pruned row still deduplicates; the forgotten one no longer does (the documented trade-off).
    let mut tx = db.pool.begin().await.unwrap();
    assert!(!inbox::record_message(&mut *tx, "c", "recent")
        .await
        .unwrap());
    assert!(inbox::record_message(&mut *tx, "c", "old").await.unwrap());
}
