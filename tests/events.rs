//! The event store against the real PostgreSQL (and the broker, for what
//! reaches Kafka through the outbox): versions and conflicts, idempotent
//! retries, the gap-safe global order, the horizon, publication, snapshots,
//! upcasting, temporal loads, erasure and crypto-shredding.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kurier::events::aggregate::stream_of;
use kurier::events::shredding::{Revealed, Shredder};
use kurier::events::{Aggregate, AsOf, DomainEvent, EventStore, Expected, NewEvent};
use kurier::{Error, SchemaName};
use kurier_test_support::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

fn store(pool: &PgPool) -> EventStore {
    EventStore::new(pool.clone())
}

fn ev(n: usize) -> NewEvent {
    NewEvent::json("Counted", json!({ "n": n }))
}

/// The (version, type) of every stored event of `stream`, by version.
async fn stored_rows(pool: &PgPool, stream: &str) -> Vec<(i64, String)> {
    sqlx::query_as("SELECT version, type FROM kurier.events WHERE stream = $1 ORDER BY version")
        .bind(stream)
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appenders_on_one_stream_have_one_winner_per_version() {
    let db = fresh_db().await;
    let es = store(&db.pool);
    let stream = "account-1";
    let stored: Arc<std::sync::Mutex<Vec<(Uuid, i64)>>> = Default::default();
    let conflicts = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (es, stored, conflicts) = (es.clone(), stored.clone(), conflicts.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..25 {
                let version = es.stream_version(stream).await.unwrap();
                let expected = version.map_or(Expected::NoStream, |v| Expected::Exact(v as u64));
                let e = ev(n);
                match es.append(stream, expected, std::slice::from_ref(&e)).await {
                    Ok(v) => stored.lock().unwrap().push((e.event_id, v)),
                    Err(Error::VersionConflict {
                        actual,
                        expected: exp,
                        ..
                    }) => {
                        assert_ne!(actual, exp, "a conflict names two different versions");
                        conflicts.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => panic!("append: {e}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let winners = stored.lock().unwrap().clone();
    assert!(
        conflicts.load(Ordering::Relaxed) > 0,
        "8 writers on one stream never conflicted"
    );
    let rows: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT event_id, version FROM kurier.events WHERE stream = $1 ORDER BY version",
    )
    .bind(stream)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    // No gaps, no duplicates; exactly the reported successes are stored, at their versions.
    let versions: Vec<i64> = rows.iter().map(|r| r.1).collect();
    assert_eq!(versions, (0..rows.len() as i64).collect::<Vec<_>>());
    let mut reported = winners.clone();
    reported.sort_by_key(|r| r.1);
    assert_eq!(
        rows, reported,
        "stored events differ from the successes reported"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_append_stores_one_copy_and_an_id_belongs_to_one_stream() {
    let db = fresh_db().await;
    let es = store(&db.pool);
    let e = ev(1);
    let v = es
        .append("order-1", Expected::NoStream, std::slice::from_ref(&e))
        .await
        .unwrap();
    // The commit reply was "lost": the same append again, same expectation.
    let again = es
        .append("order-1", Expected::NoStream, std::slice::from_ref(&e))
        .await
        .unwrap();
    assert_eq!((v, again), (0, 0));
    assert_eq!(es.read_stream("order-1", 0, 10).await.unwrap().len(), 1);
    let err = es.append("order-2", Expected::Any, &[e]).await.unwrap_err();
    assert_eq!(err.sqlstate().as_deref(), Some("KU422"), "{err}");
    // Expected versions: -1 on an existing stream, N on another version.
    let err = es
        .append("order-1", Expected::NoStream, &[ev(2)])
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::VersionConflict {
                expected: -1,
                actual: 0,
                ..
            }
        ),
        "{err}"
    );
    let err = es
        .append("order-1", Expected::Exact(3), &[ev(2)])
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("order-1 is at version 0, expected 3"),
        "{err}"
    );
    assert_eq!(es.stream_version("order-1").await.unwrap(), Some(0));
    assert_eq!(es.stream_version("order-3").await.unwrap(), None);
}

/// A retry racing its original (the reply lost while the original had not
/// committed yet): it waits on the stream, then finds its id stored and
/// returns the original's version; one copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_racing_its_original_returns_the_same_version() {
    let db = fresh_db().await;
    let es = store(&db.pool);
    let (first, second) = (ev(9), ev(10));
    for (stream, expected, e) in [
        ("order-1", Expected::NoStream, &first),
        ("order-2", Expected::Any, &second),
    ] {
        let mut original = db.pool.begin().await.unwrap();
        let v = es
            .append_on(&mut original, stream, expected, std::slice::from_ref(e))
            .await
            .unwrap();
        let retry = {
            let (es, e) = (es.clone(), e.clone());
            tokio::spawn(async move { es.append(stream, expected, &[e]).await })
        };
        wait_for_lock_waiter(&db.pool).await;
        original.commit().await.unwrap();
        assert_eq!(retry.await.unwrap().unwrap(), v, "{stream}");
        assert_eq!(
            es.stream_version(stream).await.unwrap(),
            Some(v),
            "{stream}"
        );
        let copies: i64 =
            sqlx::query_scalar("SELECT count(*) FROM kurier.events WHERE event_id = $1")
                .bind(e.event_id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(copies, 1, "{stream}");
    }
    // And a stored id in another stream is refused.
    let other = es.append("order-2", Expected::Any, &[first]).await;
    assert_eq!(other.unwrap_err().sqlstate().as_deref(), Some("KU422"));
}

/// The batch forms of `kurier.append_events`: a batch retried whole stores
/// one copy (recognised before the version check), a batch that reuses
/// stored ids anywhere in it or holds an id twice stores nothing, and bad
/// input is refused with the element it concerns, from Rust, from SQL with
/// the JSON form and with the array form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_stores_one_copy_and_a_refused_batch_stores_nothing() {
    let db = fresh_db().await;
    let es = store(&db.pool);
    let batch: Vec<NewEvent> = (0..3).map(ev).collect();
    let first = es.append("order-1", Expected::NoStream, &batch).await;
    let again = es.append("order-1", Expected::NoStream, &batch).await;
    assert_eq!((first.unwrap(), again.unwrap()), (2, 2));
    let code = |r: Result<i64, Error>| r.unwrap_err().sqlstate().unwrap_or_default();
    // The same ids in another stream; a stored id first or last in a new
    // batch (also with a wrong expected version: the stored id is reported,
    // as the idempotency check comes before the version check).
    assert_eq!(
        code(es.append("order-2", Expected::Any, &batch).await),
        "KU422"
    );
    let stored_first = [batch[0].clone(), ev(3)];
    assert_eq!(
        code(es.append("order-1", Expected::Any, &stored_first).await),
        "KU422"
    );
    let stored_last = [ev(3), batch[2].clone()];
    for expected in [Expected::Any, Expected::Exact(9)] {
        let err = es
            .append("order-1", expected, &stored_last)
            .await
            .unwrap_err();
        assert_eq!(err.sqlstate().as_deref(), Some("KU422"), "{err}");
        assert!(err.to_string().contains("partly stored already"), "{err}");
        // Not first, stored in another stream (found by the insert).
        let err = es
            .append("order-3", expected, &stored_last)
            .await
            .unwrap_err();
        assert_eq!(err.sqlstate().as_deref(), Some("KU422"), "{err}");
        assert!(
            err.to_string().contains("already stored in stream order-1"),
            "{err}"
        );
    }
    // One id twice: a new one, a stored one (first in the batch), and with a
    // wrong expected version: always the batch's fault, 22023.
    let dup = Uuid::new_v4();
    let twice_new = [ev(4), ev(5).event_id(dup), ev(6).event_id(dup)];
    let twice_stored = [batch[0].clone(), batch[0].clone()];
    for (stream, expected, events) in [
        ("order-3", Expected::Any, &twice_new[..]),
        ("order-3", Expected::Exact(7), &twice_new[..]),
        ("order-1", Expected::Any, &twice_stored[..]),
    ] {
        let err = es.append(stream, expected, events).await.unwrap_err();
        assert_eq!(err.sqlstate().as_deref(), Some("22023"), "{err}");
        let pair = if events.len() == 3 {
            "events[1] and events[2]"
        } else {
            "events[0] and events[1]"
        };
        assert!(
            err.to_string()
                .contains(&format!("{pair} have the same event_id")),
            "{err}"
        );
    }

    // SQL, JSON form: a retry with the same expected version; bad elements.
    let json_batch = json!([{"type": "A", "data": 1, "event_id": Uuid::new_v4()},
                            {"type": "B", "data": null, "metadata": null, "event_id": Uuid::new_v4()}]);
    let append_json = |expected: Option<i64>, events: serde_json::Value| {
        sqlx::query_scalar::<_, i64>("SELECT kurier.append_events('order-4', $1, $2)")
            .bind(expected)
            .bind(events)
            .fetch_one(&db.pool)
    };
    assert_eq!(append_json(Some(-1), json_batch.clone()).await.unwrap(), 1);
    assert_eq!(append_json(Some(-1), json_batch).await.unwrap(), 1);
    let refused = [
        (
            json!([{"type": "A", "data": 1}, 5]),
            "events[1] is a JSON number, not an object",
        ),
        (
            json!([{"type": "A", "data": 1, "event_id": "nope"}]),
            r#"events[0] has "event_id" "nope", not a UUID string"#,
        ),
        (
            json!([{"type": "A", "data": 1, "extra": 1}]),
            r#"events[0] has unknown key "extra""#,
        ),
        (json!([{"type": "A"}]), r#"events[0] has no "data""#),
        (json!([{"data": 1}]), r#"events[0] has no "type""#),
        (
            json!([{"type": "A", "data": 1, "metadata": [1]}]),
            r#"events[0] has "metadata" that is a JSON array"#,
        ),
        (json!([]), "is an empty array"),
    ];
    for (events, message) in refused {
        let err = append_json(None, events).await.unwrap_err();
        let db_err = err.as_database_error().expect("a database error");
        assert_eq!(db_err.code().as_deref(), Some("22023"), "{err}");
        assert!(
            db_err.message().contains(message),
            "{err}, expected {message}"
        );
    }
    // Any spelling PostgreSQL's uuid type reads is an event id.
    let braced =
        json!([{"type": "A", "data": 1, "event_id": "{a0eebc999c0b4ef8bb6d6bb9bd380a11}"}]);
    assert_eq!(append_json(Some(1), braced).await.unwrap(), 2);

    // SQL, array form: element i of each array is event i.
    let append_arrays = |sql: &'static str| sqlx::query_scalar::<_, i64>(sql).fetch_one(&db.pool);
    let v = append_arrays(
        "SELECT kurier.append_events('order-5', -1, ARRAY['A', 'B'], ARRAY['1', 'null']::jsonb[], \
         ARRAY['{\"k\": 1}', 'null']::jsonb[])",
    )
    .await
    .unwrap();
    assert_eq!(v, 1);
    let read = es.read_stream("order-5", 0, 10).await.unwrap();
    let shape: Vec<_> = read
        .iter()
        .map(|e| (e.event_type.as_str(), e.data.clone(), e.metadata.clone()))
        .collect();
    assert_eq!(
        shape,
        [
            ("A", Some(json!(1)), Some(json!({"k": 1}))),
            ("B", Some(json!(null)), None)
        ]
    );
    for (sql, state, message) in [
        ("SELECT kurier.append_events('order-5', NULL, ARRAY['A'], ARRAY['1', '2']::jsonb[])",
         "22023", "has 1 types but 2 data"),
        ("SELECT kurier.append_events('order-5', NULL, ARRAY['A', 'B'], ARRAY['1', NULL]::jsonb[])",
         "22004", "events[1] has NULL data"),
        ("SELECT kurier.append_events('order-5', NULL, ARRAY['A', ''], ARRAY['1', '2']::jsonb[])",
         "22023", "events[1] has no type"),
        ("SELECT kurier.append_events('order-5', NULL, ARRAY['', NULL], ARRAY['1', '2']::jsonb[])",
         "22023", "events[0] has no type"),
        ("SELECT kurier.append_events('order-5', 0, ARRAY['A'], ARRAY['1']::jsonb[])",
         "KU409", "order-5 is at version 1, expected 0"),
    ] {
        let err = append_arrays(sql).await.unwrap_err();
        let db_err = err.as_database_error().expect("a database error");
        assert_eq!(db_err.code().as_deref(), Some(state), "{err}");
        assert!(db_err.message().contains(message), "{err}, expected {message}");
    }

    // Nothing refused was stored or published: 3 + 2 + 1 + 2 events.
    let stored: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM kurier.events), (SELECT count(*) FROM kurier.outbox)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(stored, (8, 8));
    for (stream, version) in [
        ("order-1", Some(2)),
        ("order-2", None),
        ("order-3", None),
        ("order-5", Some(1)),
    ] {
        assert_eq!(
            es.stream_version(stream).await.unwrap(),
            version,
            "{stream}"
        );
    }
}

/// A database an older Kurier migrated (before 0008, the array form of
/// `kurier.append_events` the library binds): a batch append is refused
/// with the instruction to migrate, not with PostgreSQL's bare "function
/// does not exist", and stores nothing; single events (0005) still append.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_append_before_migration_0008_says_to_migrate() {
    let db = fresh_db().await;
    let es = store(&db.pool);
    sqlx::query(
        "DROP FUNCTION kurier.append_events(text, bigint, text[], jsonb[], jsonb[], uuid[])",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    match es.append("order-1", Expected::Any, &[ev(0), ev(1)]).await {
        Err(Error::Setup { problem, fix }) => {
            assert!(problem.contains("kurier.append_events"), "{problem}");
            assert!(fix.contains("kurier migrate"), "{fix}");
        }
        other => panic!("expected the instruction to migrate, got {other:?}"),
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM kurier.events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0, "the refused batch stored nothing");
    assert_eq!(
        es.append("order-1", Expected::NoStream, &[ev(0)])
            .await
            .unwrap(),
        0
    );
}

/// `EventStore::read_all` runs `kurier.read_all`'s protocol from the client
/// (so that pages stream); it returns exactly what the SQL function returns,
/// page by page and at the head, with and without a category; a max_count
/// below 1 gets the function's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_reads_all_events_as_the_sql_function_does() {
    let db = fresh_db().await;
    let es = store(&db.pool);
    for s in 0..30 {
        let stream = if s % 3 == 0 {
            format!("invoice-{s}")
        } else {
            format!("order-{s}")
        };
        let events: Vec<NewEvent> = (0..7).map(ev).collect();
        es.append(&stream, Expected::NoStream, &events)
            .await
            .unwrap();
    }
    for category in [None, Some("invoice"), Some("order"), Some("none")] {
        let (mut after, mut pages) = (0i64, 0);
        loop {
            let lib = es.read_all(after, 25, category).await.unwrap();
            let sql: Vec<kurier::events::RecordedEvent> =
                sqlx::query_as("SELECT * FROM kurier.read_all($1, $2, $3)")
                    .bind(after)
                    .bind(25)
                    .bind(category)
                    .fetch_all(&db.pool)
                    .await
                    .unwrap();
            assert_eq!(lib, sql, "{category:?} after {after}");
            let Some(last) = lib.last() else { break };
            after = last.global_position;
            pages += 1;
        }
        let expected_pages = match category {
            None => 210usize.div_ceil(25),
            Some("invoice") => 70usize.div_ceil(25),
            Some("order") => 140usize.div_ceil(25),
            _ => 0,
        };
        assert_eq!(pages, expected_pages, "{category:?}");
    }
    let err = es.read_all(0, 0, None).await.unwrap_err();
    assert_eq!(err.sqlstate().as_deref(), Some("22023"), "{err}");
}

/// Writers that hold their transactions open for a while (some roll back)
/// while readers keep only their last position — one through
/// `EventStore::read_all`, one through the SQL function `kurier.read_all`
/// (what other languages call): each sees every committed event once, in
/// ascending order, none of the rolled-back ones; and some transactions did
/// commit after others with higher positions (the case gap safety is for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_keeping_its_last_position_never_misses_a_late_commit() {
    use rand::{Rng, SeedableRng};
    let db = fresh_db().await;
    let done = tokio_util::sync::CancellationToken::new();
    let reader = |through_sql: bool| {
        let (pool, done) = (db.pool.clone(), done.clone());
        tokio::spawn(async move {
            let es = store(&pool);
            let (mut last, mut seen) = (0i64, Vec::new());
            loop {
                let finished = done.is_cancelled();
                let page = if through_sql {
                    kurier::events::store::read_all(&pool, es.schema(), last, 100, None).await
                } else {
                    es.read_all(last, 100, None).await
                }
                .unwrap();
                if let Some(e) = page.last() {
                    last = e.global_position;
                }
                seen.extend(page.iter().map(|e| (e.global_position, e.event_id)));
                if finished && page.is_empty() {
                    return seen;
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    let readers = [("library", reader(false)), ("SQL function", reader(true))];
    let mut writers = Vec::new();
    for w in 0..6 {
        let pool = db.pool.clone();
        writers.push(tokio::spawn(async move {
            let es = store(&pool);
            let mut rng = rand::rngs::StdRng::from_os_rng();
            let (mut committed, mut rolled_back) = (Vec::new(), Vec::new());
            for i in 0..40 {
                let mut tx = pool.begin().await.unwrap();
                let events: Vec<NewEvent> =
                    (0..rng.random_range(1..=3)).map(|n| ev(n + i)).collect();
                let stream = format!("w{w}-{}", rng.random_range(0..4));
                es.append_on(&mut tx, &stream, Expected::Any, &events)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..60))).await;
                let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
                if rng.random_bool(0.2) {
                    tx.rollback().await.unwrap();
                    rolled_back.extend(ids);
                } else {
                    let asked = std::time::Instant::now();
                    tx.commit().await.unwrap();
                    committed.push((asked, std::time::Instant::now(), ids));
                }
            }
            (committed, rolled_back)
        }));
    }
    let (mut commits, mut rolled_back) = (Vec::new(), HashSet::new());
    for w in writers {
        let (c, r) = w.await.unwrap();
        commits.extend(c);
        rolled_back.extend(r);
    }
    done.cancel();
    let committed: HashSet<Uuid> = commits.iter().flat_map(|c| c.2.clone()).collect();
    assert!(committed.len() > 100 && !rolled_back.is_empty());
    assert!(
        late_commits(&db.pool, &commits).await > 0,
        "no transaction committed after one with higher positions: the test proved nothing"
    );
    for (path, reader) in readers {
        let seen = reader.await.unwrap();
        let positions: Vec<i64> = seen.iter().map(|s| s.0).collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "{path}: positions not strictly ascending"
        );
        let ids: HashSet<Uuid> = seen.iter().map(|s| s.1).collect();
        assert_eq!(ids.len(), seen.len(), "{path}: an event was read twice");
        assert!(
            ids.is_disjoint(&rolled_back),
            "{path}: a rolled-back event was read"
        );
        let missed = committed.difference(&ids).count();
        assert_eq!(
            missed, 0,
            "{path}: the reader missed {missed} committed events"
        );
    }
}

/// How many of the committed transactions (commit asked, commit returned,
/// event ids) surely committed after another one whose events have higher
/// positions: their commit was asked for after the other's had returned.
async fn late_commits(
    pool: &PgPool,
    commits: &[(std::time::Instant, std::time::Instant, Vec<Uuid>)],
) -> usize {
    let positions: std::collections::HashMap<Uuid, i64> =
        sqlx::query_as::<_, (Uuid, i64)>("SELECT event_id, global_position FROM kurier.events")
            .fetch_all(pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let span = |ids: &[Uuid]| {
        let drawn = ids.iter().map(|id| positions[id]);
        (drawn.clone().min().unwrap(), drawn.max().unwrap())
    };
    commits
        .iter()
        .filter(|(asked, _, ids)| {
            let first = span(ids).0;
            commits
                .iter()
                .any(|(_, returned, other)| returned < asked && span(other).1 > first)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_holds_back_only_what_follows_it_and_idle_sessions_hold_nothing() {
    let db = fresh_db().await;
    let es = store(&db.pool);
    es.append("a-1", Expected::Any, &[ev(0)]).await.unwrap();
    // An idle transaction that never touched the event tables, here and in
    // another database: it holds the cluster's xmin, not read_all.
    let mut idle_here = PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql("BEGIN; SELECT txid_current();")
        .execute(&mut idle_here)
        .await
        .unwrap();
    let other = fresh_empty_db().await;
    let mut idle_there = PgConnection::connect(&other).await.unwrap();
    sqlx::raw_sql("BEGIN; SELECT txid_current();")
        .execute(&mut idle_there)
        .await
        .unwrap();
    // T1 appends and stays open; T2 appends after it and commits.
    let mut t1 = PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("SET application_name = 'slow-writer'")
        .execute(&mut t1)
        .await
        .unwrap();
    let mut tx1 = t1.begin().await.unwrap();
    es.append_on(&mut tx1, "a-2", Expected::Any, &[ev(1)])
        .await
        .unwrap();
    es.append("a-3", Expected::Any, &[ev(2)]).await.unwrap();
    let first = es.read_all(0, 100, None).await.unwrap();
    let streams: Vec<&str> = first.iter().map(|e| e.stream.as_str()).collect();
    assert_eq!(
        streams,
        ["a-1"],
        "read_all went past an open append (or was held by an idle session)"
    );
    let holders = kurier::events::store::horizon(&db.pool, &SchemaName::kurier())
        .await
        .unwrap();
    assert_eq!(holders.len(), 1, "{holders:?}");
    assert_eq!(holders[0].application_name.as_deref(), Some("slow-writer"));
    assert!(holders[0].pid.is_some() && holders[0].transaction_age_secs.is_some());
    tx1.commit().await.unwrap();
    let rest = es
        .read_all(first[0].global_position, 100, None)
        .await
        .unwrap();
    let streams: Vec<&str> = rest.iter().map(|e| e.stream.as_str()).collect();
    assert_eq!(
        streams,
        ["a-2", "a-3"],
        "after T1 commits, its event comes first"
    );
    drop((idle_here, idle_there));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_append_stores_and_publishes_nothing() {
    let db = fresh_db().await;
    let es = store(&db.pool);
    let mut tx = db.pool.begin().await.unwrap();
    es.append_on(&mut tx, "cart-1", Expected::NoStream, &[ev(0)])
        .await
        .unwrap();
    // The transaction reads its own append; the others do not see it.
    assert_eq!(
        es.stream_version_on(&mut tx, "cart-1").await.unwrap(),
        Some(0)
    );
    assert_eq!(
        es.read_stream_on(&mut tx, "cart-1", 0, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(es.stream_version("cart-1").await.unwrap(), None);
    // kurier.read_all leaves the reader's own appends out of the horizon.
    assert_eq!(es.read_all_on(&mut tx, 0, 10, None).await.unwrap().len(), 1);
    tx.rollback().await.unwrap();
    assert_eq!(es.stream_version("cart-1").await.unwrap(), None);
    assert!(es.read_all(0, 10, None).await.unwrap().is_empty());
    assert_eq!(outbox_count(&db.pool).await, 0);
}

/// Appended events reach Kafka through the outbox: topic = the category,
/// key = the stream, `message-id` = the event id, type and version headers,
/// a metadata `traceparent` passed through; per stream in version order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appended_events_are_published_in_version_order_with_their_headers() {
    let (db, brokers) = (fresh_db().await, brokers());
    let category = unique("orders").replace('-', "_");
    create_topic(&brokers, &category, 3).await;
    let relay = start_in_process(config(&db.url, &brokers, "")).await;
    let es = store(&db.pool);
    let stream = format!("{category}-42");
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let events: Vec<NewEvent> = (0..5)
        .map(|n| ev(n).metadata(json!({"traceparent": traceparent})))
        .collect();
    es.append(&stream, Expected::NoStream, &events)
        .await
        .unwrap();
    // Later transactions on the stream follow in version order.
    let mut events = events;
    for n in 5..8 {
        let e = ev(n).metadata(json!({"traceparent": traceparent}));
        es.append(
            &stream,
            Expected::Exact(n as u64 - 1),
            std::slice::from_ref(&e),
        )
        .await
        .unwrap();
        events.push(e);
    }
    let recs = read_until(&brokers, &category, Duration::from_secs(30), |r| {
        r.len() >= 8
    });
    relay.stop().await;
    let mut recs: Vec<&Rec> = recs.iter().collect();
    recs.sort_by_key(|r| (r.partition, r.offset));
    assert_eq!(recs.len(), 8);
    for (n, r) in recs.iter().enumerate() {
        assert_eq!(r.key.as_deref(), Some(stream.as_str()));
        assert_eq!(r.message_id(), events[n].event_id.to_string());
        assert_eq!(r.header("event-type"), Some("Counted"));
        assert_eq!(r.header("stream-version"), Some(n.to_string().as_str()));
        assert_eq!(r.header("traceparent"), Some(traceparent));
        assert_eq!(r.json(), json!({"n": n}));
    }
}

/// Binary events (Avro, Protobuf, ...): stored in `data_bytes` exactly as
/// given, from Rust (several in one append, all or none) and from SQL
/// (`kurier.append_event_bytes`), and published as those bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_events_are_stored_and_published_as_their_bytes() {
    let (db, brokers) = (fresh_db().await, brokers());
    let category = unique("blobs").replace('-', "_");
    create_topic(&brokers, &category, 1).await;
    let es = store(&db.pool);
    let stream = format!("{category}-7");
    let bodies: Vec<Vec<u8>> = vec![vec![0, 159, 146, 150], b"\xff\x00raw".to_vec(), vec![7; 3]];
    let two: Vec<NewEvent> = bodies[..2]
        .iter()
        .map(|b| NewEvent::bytes("Chunk", b.clone()))
        .collect();
    assert_eq!(
        es.append(&stream, Expected::NoStream, &two).await.unwrap(),
        1
    );

    // A batch whose second event is refused (its id belongs to another
    // stream) stores neither of them.
    let other = NewEvent::bytes("Chunk", vec![1]);
    es.append("elsewhere-1", Expected::Any, std::slice::from_ref(&other))
        .await
        .unwrap();
    let refused = [
        NewEvent::bytes("Chunk", vec![9]),
        NewEvent::bytes("Chunk", vec![9]).event_id(other.event_id),
    ];
    let err = es
        .append(&stream, Expected::Exact(1), &refused)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("already stored in stream elsewhere-1"),
        "{err}"
    );
    assert_eq!(es.stream_version(&stream).await.unwrap(), Some(1));

    let v: i64 = sqlx::query_scalar("SELECT kurier.append_event_bytes($1, 'Chunk', $2, NULL, 1)")
        .bind(&stream)
        .bind(&bodies[2])
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(v, 2);
    let stored = es.read_stream(&stream, 0, 10).await.unwrap();
    let stored_bodies: Vec<Vec<u8>> = stored.iter().filter_map(|e| e.data_bytes.clone()).collect();
    assert_eq!(stored_bodies, bodies);
    assert!(
        stored.iter().all(|e| e.data.is_none()),
        "a binary event has JSON data"
    );

    let relay = start_in_process(config(&db.url, &brokers, "")).await;
    let recs = read_until(&brokers, &category, Duration::from_secs(30), |r| {
        r.len() >= 3
    });
    relay.stop().await;
    let mut recs: Vec<&Rec> = recs.iter().collect();
    recs.sort_by_key(|r| r.offset);
    let published: Vec<Vec<u8>> = recs
        .iter()
        .map(|r| r.value.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        published, bodies,
        "Kafka values differ from the stored bytes"
    );
    assert_eq!(recs[2].header("stream-version"), Some("2"));
}

// ---- an aggregate -----------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
enum AccountEvent {
    Opened {
        owner: String,
    },
    /// Version 1 stored `amount`; version 2 `cents`.
    Deposited {
        cents: i64,
    },
}

impl DomainEvent for AccountEvent {
    fn schema_version(t: &str) -> u32 {
        if t == "Deposited" {
            2
        } else {
            1
        }
    }
    fn upcast(t: &str, version: u32, mut data: serde_json::Value) -> serde_json::Value {
        if t == "Deposited" && version == 1 {
            data = json!({ "cents": data["amount"].as_i64().unwrap_or(0) * 100 });
        }
        data
    }
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Account {
    owner: Option<String>,
    balance: i64,
    deposits: u32,
}

#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("no such account")]
    NotOpen,
}

enum AccountCommand {
    Open(String),
    Deposit(i64),
}

impl Aggregate for Account {
    type Event = AccountEvent;
    type Command = AccountCommand;
    type Rejection = Refused;
    fn category() -> &'static str {
        "account"
    }
    fn apply(&mut self, e: &AccountEvent) {
        match e {
            AccountEvent::Opened { owner } => self.owner = Some(owner.clone()),
            AccountEvent::Deposited { cents } => {
                self.balance += cents;
                self.deposits += 1;
            }
        }
    }
    fn decide(&self, c: &AccountCommand) -> Result<Vec<AccountEvent>, Refused> {
        match c {
            AccountCommand::Open(owner) if self.owner.is_none() => Ok(vec![AccountEvent::Opened {
                owner: owner.clone(),
            }]),
            AccountCommand::Open(_) => Ok(vec![]),
            AccountCommand::Deposit(_) if self.owner.is_none() => Err(Refused::NotOpen),
            AccountCommand::Deposit(cents) => Ok(vec![AccountEvent::Deposited { cents: *cents }]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_plus_replay_equals_full_replay_and_conflicts_are_retried() {
    let db = fresh_db().await;
    let es = store(&db.pool);
    let refused = es
        .execute::<Account>("7", &AccountCommand::Deposit(5), 3)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("no such account"), "{refused}");
    es.execute::<Account>("7", &AccountCommand::Open("ada".into()), 3)
        .await
        .unwrap();
    for cents in 1..=30 {
        es.execute::<Account>("7", &AccountCommand::Deposit(cents), 3)
            .await
            .unwrap();
        if cents == 17 {
            let loaded = es.load::<Account>("7").await.unwrap();
            assert!(es.save_snapshot("7", &loaded).await.unwrap());
        }
    }
    let (snap, full) = (
        es.load::<Account>("7").await.unwrap(),
        es.replay::<Account>("7").await.unwrap(),
    );
    assert_eq!(snap, full);
    assert_eq!(
        (full.state.balance, full.state.deposits, full.version),
        (465, 30, Some(30))
    );
    // The snapshot was used: breaking it shows up in load, not in replay.
    sqlx::query("UPDATE kurier.snapshots SET state = jsonb_set(state, '{balance}', '0')")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_ne!(es.load::<Account>("7").await.unwrap().state.balance, 465);
    // As of version 5: opened and four deposits (1+2+3+4).
    let past = es
        .load_as_of::<Account>("7", AsOf::Version(4))
        .await
        .unwrap();
    assert_eq!((past.state.balance, past.version), (10, Some(4)));
    // Concurrent executes on one account: each lands, conflicts are retried.
    let runs: Vec<_> = (0..6)
        .map(|_| {
            let es = es.clone();
            tokio::spawn(async move {
                es.execute::<Account>("7", &AccountCommand::Deposit(1), 20)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut conflicts = 0;
    for r in runs {
        conflicts += r.await.unwrap().conflicts;
    }
    assert_eq!(es.replay::<Account>("7").await.unwrap().state.deposits, 36);
    eprintln!("6 concurrent executes met {conflicts} conflicts");
    // A conflict for certain: an open append holds the stream while execute
    // loads (version 36), decides and appends expecting 36; it waits on the
    // stream, meets version 37 after the commit, reloads and lands at 38.
    let mut tx = db.pool.begin().await.unwrap();
    let deposit = kurier::events::codec::encode(&AccountEvent::Deposited { cents: 100 }).unwrap();
    es.append_on(&mut tx, "account-7", Expected::Exact(36), &[deposit])
        .await
        .unwrap();
    let racing = {
        let es = es.clone();
        tokio::spawn(async move {
            es.execute::<Account>("7", &AccountCommand::Deposit(1), 5)
                .await
                .unwrap()
        })
    };
    wait_for_lock_waiter(&db.pool).await;
    tx.commit().await.unwrap();
    let executed = racing.await.unwrap();
    assert_eq!(
        executed.conflicts, 1,
        "execute met the open append's version"
    );
    assert_eq!(executed.version, Some(38));
    let full = es.replay::<Account>("7").await.unwrap();
    assert_eq!((full.state.deposits, full.version), (38, Some(38)));
}

/// Until a session of this database waits on a lock (an append queued
/// behind another on its stream row).
async fn wait_for_lock_waiter(pool: &PgPool) {
    for _ in 0..500 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no append started waiting on the stream within 5 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_events_are_upcast_on_read_and_temporal_loads_see_the_past() {
    let db = fresh_db().await;
    let es = store(&db.pool);
    let stream = stream_of::<Account>("9");
    // Written by an older version of the service (any language), in SQL.
    sqlx::query("SELECT kurier.append_event($1, 'Opened', '{\"owner\": \"bob\"}', '{\"schema_version\": 1}')")
        .bind(&stream)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query(
        "SELECT kurier.append_event($1, 'Deposited', '{\"amount\": 3}', '{\"schema_version\": 1}')",
    )
    .bind(&stream)
    .execute(&db.pool)
    .await
    .unwrap();
    let before_new = time::OffsetDateTime::now_utc();
    tokio::time::sleep(Duration::from_millis(20)).await;
    es.execute::<Account>("9", &AccountCommand::Deposit(50), 3)
        .await
        .unwrap();
    let now = es.load::<Account>("9").await.unwrap();
    assert_eq!(
        (now.state.balance, now.state.deposits),
        (350, 2),
        "v1 amount 3 = 300 cents"
    );
    let stored: serde_json::Value =
        sqlx::query_scalar("SELECT metadata FROM kurier.events WHERE stream = $1 AND version = 2")
            .bind(&stream)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(stored["schema_version"], 2);
    let then = es
        .load_as_of::<Account>("9", AsOf::Time(before_new))
        .await
        .unwrap();
    assert_eq!((then.state.balance, then.version), (300, Some(1)));
    // recorded_at is the appending transaction's start: one that began
    // before `t` but appended after an event recorded later gets the later
    // version with the earlier time. As of `t`, neither is included.
    let stream = stream_of::<Account>("10");
    es.execute::<Account>("10", &AccountCommand::Open("cy".into()), 3)
        .await
        .unwrap();
    let mut early = db.pool.begin().await.unwrap();
    sqlx::query("SELECT now()")
        .execute(&mut *early)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let t: time::OffsetDateTime = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let late = kurier::events::codec::encode(&AccountEvent::Deposited { cents: 7 }).unwrap();
    es.append(&stream, Expected::Exact(0), &[late])
        .await
        .unwrap();
    let early_one = kurier::events::codec::encode(&AccountEvent::Deposited { cents: 5 }).unwrap();
    assert_eq!(
        es.append_on(&mut early, &stream, Expected::Any, &[early_one])
            .await
            .unwrap(),
        2
    );
    early.commit().await.unwrap();
    let times: Vec<bool> = sqlx::query_scalar(
        "SELECT recorded_at <= $2 FROM kurier.events WHERE stream = $1 ORDER BY version",
    )
    .bind(&stream)
    .bind(t)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        times,
        [true, false, true],
        "version 2 carries the earliest time"
    );
    let at_t = es.load_as_of::<Account>("10", AsOf::Time(t)).await.unwrap();
    assert_eq!((at_t.state.balance, at_t.version), (0, Some(0)));
}

/// The outbox rows appends write follow the topic template (`${category}`,
/// `${stream}`) and stop while publishing is off; a stream the template
/// cannot turn into a legal Kafka topic is refused with nothing stored, in
/// the single and the batch form; a template with an unknown placeholder is
/// refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_topic_template_and_the_publishing_switch_shape_the_outbox_rows() {
    let db = fresh_db().await;
    let es = store(&db.pool);
    sqlx::query("SELECT kurier.set_event_topic_template('events.${category}.${stream}')")
        .execute(&db.pool)
        .await
        .unwrap();
    es.append("order-1", Expected::NoStream, &[ev(0)])
        .await
        .unwrap();
    let topics: Vec<String> = sqlx::query_scalar("SELECT topic FROM kurier.outbox ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(topics, ["events.order.order-1"]);
    for events in [vec![ev(1)], vec![ev(1), ev(2)]] {
        let refused = es
            .append("order 2", Expected::Any, &events)
            .await
            .unwrap_err();
        assert_eq!(refused.sqlstate().as_deref(), Some("22023"), "{refused:?}");
        assert!(
            format!("{refused:?}").contains("is not a legal Kafka topic"),
            "{refused:?}"
        );
    }
    assert_eq!(es.stream_version("order 2").await.unwrap(), None);
    let typo = sqlx::query("SELECT kurier.set_event_topic_template('${categroy}')")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(typo.to_string().contains("unknown placeholder"), "{typo}");
    sqlx::query("SELECT kurier.set_event_publishing(false)")
        .execute(&db.pool)
        .await
        .unwrap();
    es.append("order-1", Expected::Exact(0), &[ev(2), ev(3)])
        .await
        .unwrap();
    es.append("order-1", Expected::Exact(2), &[ev(4)])
        .await
        .unwrap();
    assert_eq!(es.stream_version("order-1").await.unwrap(), Some(3));
    assert_eq!(
        outbox_count(&db.pool).await,
        1,
        "nothing published while off"
    );
    sqlx::query("SELECT kurier.set_event_publishing(true)")
        .execute(&db.pool)
        .await
        .unwrap();
    es.append("order-1", Expected::Exact(3), &[ev(5)])
        .await
        .unwrap();
    assert_eq!(outbox_count(&db.pool).await, 2);
}

/// After an erasure only the data-free marker is left of the stream (no
/// events, no snapshot); the aggregate loads as a new one (its state starts
/// anew at the marker) and takes commands again; the erased state cannot be
/// stored back as a snapshot (KU410), and erasing an unknown stream is KU404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_aggregate_loads_as_new_and_its_old_state_cannot_come_back() {
    let db = fresh_db().await;
    let es = store(&db.pool);
    es.execute::<Account>("8", &AccountCommand::Open("eve".into()), 3)
        .await
        .unwrap();
    es.execute::<Account>("8", &AccountCommand::Deposit(40), 3)
        .await
        .unwrap();
    let before = es.load::<Account>("8").await.unwrap();
    assert!(es.save_snapshot("8", &before).await.unwrap());
    let before_erasure: time::OffsetDateTime = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        es.erase_stream("account-8", "GDPR request 18")
            .await
            .unwrap(),
        2
    );
    let left = stored_rows(&db.pool, "account-8").await;
    assert_eq!(left, [(2, "StreamErased".to_string())]);
    let snapshots: i64 =
        sqlx::query_scalar("SELECT count(*) FROM kurier.snapshots WHERE stream = 'account-8'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(snapshots, 0);
    let loaded = es.load::<Account>("8").await.unwrap();
    assert_eq!(
        (loaded.state, loaded.version),
        (Account::default(), Some(2))
    );
    // Nothing of the stream is left from before the erasure.
    let at = kurier::events::store::version_at(&db.pool, es.schema(), "account-8", before_erasure);
    assert_eq!(at.await.unwrap(), None);
    let then = es
        .load_as_of::<Account>("8", AsOf::Time(before_erasure))
        .await
        .unwrap();
    assert_eq!((then.state, then.version), (Account::default(), None));
    // The marker's type is not for applications.
    let fake = es
        .append(
            "account-8",
            Expected::Any,
            &[NewEvent::json("StreamErased", json!({}))],
        )
        .await
        .unwrap_err();
    assert!(
        fake.to_string().contains("kurier.erase_stream's marker"),
        "{fake}"
    );
    let refused = es.save_snapshot("8", &before).await.unwrap_err();
    assert_eq!(refused.sqlstate().as_deref(), Some("KU410"), "{refused:?}");
    let not_open = es
        .execute::<Account>("8", &AccountCommand::Deposit(1), 3)
        .await
        .unwrap_err();
    assert!(
        not_open.to_string().contains("no such account"),
        "{not_open}"
    );
    es.execute::<Account>("8", &AccountCommand::Open("eve".into()), 3)
        .await
        .unwrap();
    let reopened = es.load::<Account>("8").await.unwrap();
    assert_eq!(
        (
            reopened.state.owner.as_deref(),
            reopened.state.balance,
            reopened.version
        ),
        (Some("eve"), 0, Some(3))
    );
    let unknown = es.erase_stream("account-nobody", "x").await.unwrap_err();
    assert_eq!(unknown.sqlstate().as_deref(), Some("KU404"), "{unknown:?}");
}

/// The marker's type is reserved in SQL too (migration 0009), so no client
/// in any language can reset aggregates and read models with a fake one:
/// each public append function refuses it with 22023 naming the type and
/// (for a batch, also of one) the event's 0-based index, and stores nothing;
/// erase_stream still appends its marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sql_functions_refuse_the_marker_type_to_applications() {
    let db = fresh_db().await;
    let es = store(&db.pool);
    es.append("account-9", Expected::NoStream, &[ev(0)])
        .await
        .unwrap();
    let attempts = [
        ("SELECT kurier.append_event('account-9', 'StreamErased', '{}')", "an event"),
        ("SELECT kurier.append_event_bytes('account-9', 'StreamErased', '\\x00')", "an event"),
        (
            r#"SELECT kurier.append_events('account-9', NULL, '[{"type": "Counted", "data": 1}, {"type": "StreamErased", "data": {}}]')"#,
            "events[1]",
        ),
        (
            "SELECT kurier.append_events('account-9', 0, ARRAY['Counted', 'Counted', 'StreamErased'], ARRAY['1', '2', '{}']::jsonb[])",
            "events[2]",
        ),
        // A batch of one is still a batch; an array's lower bound does not
        // shift the index.
        (
            r#"SELECT kurier.append_events('account-9', NULL, '[{"type": "StreamErased", "data": {}}]')"#,
            "events[0]",
        ),
        (
            "SELECT kurier.append_events('account-9', NULL, '[5:6]={Counted,StreamErased}'::text[], '[5:6]={1,2}'::jsonb[])",
            "events[1]",
        ),
    ];
    for (sql, which) in attempts {
        let err = sqlx::query(sql).execute(&db.pool).await.unwrap_err();
        let db_err = err.as_database_error().expect("a database error");
        assert_eq!(db_err.code().as_deref(), Some("22023"), "{sql}: {db_err}");
        let expected = format!(
            "{which} for stream account-9 has the type StreamErased, reserved for the marker of kurier.erase_stream"
        );
        assert!(db_err.message().contains(&expected), "{sql}: {db_err}");
    }
    let stored = stored_rows(&db.pool, "account-9").await;
    assert_eq!(stored, [(0, "Counted".to_string())], "nothing was appended");
    assert_eq!(outbox_count(&db.pool).await, 1, "nothing was published");
    assert_eq!(es.erase_stream("account-9", "test").await.unwrap(), 1);
    let left = stored_rows(&db.pool, "account-9").await;
    assert_eq!(left, [(1, "StreamErased".to_string())]);
}

/// `examples/bank-account.rs`, the README's event-sourcing walk-through,
/// runs against a fresh database and prints what the README shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bank_account_example_runs_as_the_readme_shows() {
    let db = fresh_db().await;
    let out = std::process::Command::new(example_bin("bank-account"))
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bank-account failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "withdraw 10,000.00 refused: command refused: insufficient funds: 3900 cents available",
        "cents at version 2, 3000 now (version Some(4))",
        "after a version-1 Deposited of 5 euros appended in SQL: 3500 cents (version Some(5))",
        "holds 3500 cents",
        "email as stored: Value(String(\"ada@example.com\"))",
        "the email is gone from every copy",
        "erased 6 events; read model row after the StreamErased marker: None",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
}

/// An append to `stream` in a transaction left open, and its backend's pid.
async fn open_append(
    es: &EventStore,
    stream: &str,
    e: NewEvent,
) -> (sqlx::Transaction<'static, sqlx::Postgres>, i32) {
    let mut tx = es.pool().begin().await.unwrap();
    es.append_on(&mut tx, stream, Expected::Any, &[e])
        .await
        .unwrap();
    let pid = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    (tx, pid)
}

/// `kurier events …` against a database: show a stream, tail a category
/// (held back by an open append, carrying on after its commit), stats with
/// the holder's pid, erase; an unknown stream is an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_cli_shows_tails_erases_and_names_the_horizon_holder() {
    use std::io::BufRead;
    let db = fresh_db().await;
    let es = store(&db.pool);
    es.append("order-1", Expected::NoStream, &[ev(0), ev(1)])
        .await
        .unwrap();
    es.append("user-1", Expected::Any, &[ev(2)]).await.unwrap();
    let (held, pid) = open_append(&es, "order-2", ev(3)).await;
    // Committed, but after the open append drew its position.
    es.append("order-3", Expected::Any, &[ev(4)]).await.unwrap();
    let events_cmd = |args: &[&str]| {
        let mut cmd = std::process::Command::new(kurier_bin!());
        cmd.args(["events"].iter().chain(args))
            .env_remove("KURIER_CONFIG")
            .env("DATABASE_URL", &db.url)
            .env("RUST_LOG", "warn");
        cmd
    };
    let cli = |args: &[&str]| events_cmd(args).output().unwrap();
    let json_lines = |out: &std::process::Output| -> Vec<serde_json::Value> {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let shown = json_lines(&cli(&["show", "order-1", "--json"]));
    let versions: Vec<i64> = shown
        .iter()
        .map(|e| e["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, [0, 1]);
    assert_eq!(shown[1]["data"], json!({"n": 1}));

    let conflict = es.append("order-1", Expected::NoStream, &[ev(9)]).await;
    assert!(
        matches!(conflict, Err(Error::VersionConflict { .. })),
        "{conflict:?}"
    );
    let text = cli(&["stats"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("0 erasures, 1 version conflicts"), "{text}");
    let stats = cli(&["stats", "--json"]);
    assert!(stats.status.success());
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(
        (
            stats["stats"]["streams"].as_i64(),
            stats["stats"]["events"].as_i64()
        ),
        (Some(3), Some(4))
    );
    assert_eq!(stats["stats"]["version_conflicts"].as_i64(), Some(1));
    assert_eq!(
        stats["horizon"][0]["pid"].as_i64(),
        Some(i64::from(pid)),
        "{stats}"
    );

    let mut tail = events_cmd(&["tail", "--category", "order", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::io::BufReader::new(tail.stdout.take().unwrap()).lines();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in lines {
            let e: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
            let _ = tx.send((
                e["stream"].as_str().unwrap().to_owned(),
                e["version"].as_i64().unwrap(),
            ));
        }
    });
    let ten_s = Duration::from_secs(10);
    let first = tokio::time::timeout(ten_s, rx.recv()).await.unwrap();
    assert_eq!(first, Some(("order-1".into(), 0)));
    let second = tokio::time::timeout(ten_s, rx.recv()).await.unwrap();
    assert_eq!(second, Some(("order-1".into(), 1)));
    // The open append holds order-3's committed event back; its commit
    // lets both through, in position order.
    assert!(tokio::time::timeout(Duration::from_millis(500), rx.recv())
        .await
        .is_err());
    held.commit().await.unwrap();
    let late = tokio::time::timeout(ten_s, rx.recv()).await.unwrap();
    assert_eq!(late, Some(("order-2".into(), 0)));
    let after_it = tokio::time::timeout(ten_s, rx.recv()).await.unwrap();
    assert_eq!(after_it, Some(("order-3".into(), 0)));
    tail.kill().unwrap();
    tail.wait().unwrap();

    let erased = cli(&["erase", "order-1", "--reason", "GDPR request 19"]);
    assert!(
        erased.status.success(),
        "{}",
        String::from_utf8_lossy(&erased.stderr)
    );
    assert!(String::from_utf8_lossy(&erased.stdout).contains("erased 2 event(s) of order-1"));
    let types: Vec<String> = json_lines(&cli(&["show", "order-1", "--json"]))
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(types, ["StreamErased"]);
    let unknown = cli(&["show", "nobody-1"]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("stream nobody-1 has no events"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
}

/// The daemon's `/metrics` names the transaction at the horizon (pid, age,
/// events it holds back) and counts the version conflicts of every client
/// (the database counts them: the library's and plain SQL's), and the
/// library's append and conflict counters reach the process's recorder
/// (here the in-process daemon's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_horizon_holder_appends_and_conflicts_are_in_metrics() {
    let (db, brokers) = (fresh_db().await, brokers());
    // A second schema relayed by the same daemon: its event store has its
    // own gauges.
    let cfg = config(
        &db.url,
        &brokers,
        "[relay]\nschemas = [\"kurier\", \"tenant_a\"]\n",
    );
    kurier::schema::migrate(&db.pool, &cfg.relay.schemas)
        .await
        .unwrap();
    let tenant = store(&db.pool).in_schema(SchemaName::new("tenant_a").unwrap());
    tenant
        .append("order-1", Expected::Any, &[ev(0), ev(1), ev(2)])
        .await
        .unwrap();
    let (daemon, addr) = start_with_http(cfg).await;
    let es = store(&db.pool);
    es.append("order-1", Expected::NoStream, &[ev(0)])
        .await
        .unwrap();
    let conflict = es.append("order-1", Expected::NoStream, &[ev(1)]).await;
    assert!(
        matches!(conflict, Err(Error::VersionConflict { .. })),
        "{conflict:?}"
    );
    // Conflicts of clients in other languages (plain SQL), a single event
    // and a batch: the database counts them, with the library's one.
    for sql in [
        "SELECT kurier.append_event('order-1', 'Counted', '{}', NULL, 5)",
        r#"SELECT kurier.append_events('order-1', -1, '[{"type": "Counted", "data": 1}]')"#,
    ] {
        let err = sqlx::query(sql).execute(&db.pool).await.unwrap_err();
        let code = err.as_database_error().and_then(|e| e.code());
        assert_eq!(code.as_deref(), Some("KU409"), "{sql}: {err}");
    }
    let (held, pid) = open_append(&es, "order-2", ev(2)).await;
    es.append("order-3", Expected::Any, &[ev(3), ev(4)])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (code, body) = http_get(addr, "/metrics").await;
    held.commit().await.unwrap();
    daemon.stop().await;
    assert_eq!(code, 200);
    let value = |name: &str| metric(&body, name);
    assert_eq!(
        value("kurier_events_horizon_holders{schema=\"kurier\"}"),
        1.0
    );
    assert_eq!(
        value("kurier_events_horizon_holder_pid{schema=\"kurier\"}"),
        f64::from(pid)
    );
    assert_eq!(
        value("kurier_events_horizon_lag_events{schema=\"kurier\"}"),
        2.0,
        "order-3's events"
    );
    assert!(value("kurier_events_horizon_age_seconds{schema=\"kurier\"}") > 0.0);
    assert_eq!(value("kurier_events_last_position{schema=\"kurier\"}"), 4.0);
    assert_eq!(
        value("kurier_events_last_position{schema=\"tenant_a\"}"),
        3.0
    );
    assert_eq!(
        value("kurier_events_horizon_holders{schema=\"tenant_a\"}"),
        0.0
    );
    // Other tests of this binary append in the same process: at least ours.
    assert!(value("kurier_events_appends_total{outcome=\"appended\"}") >= 3.0);
    assert!(value("kurier_events_appends_total{outcome=\"refused\"}") >= 1.0);
    assert!(value("kurier_events_conflicts_total") >= 1.0);
    assert_eq!(
        value("kurier_events_version_conflicts_total{schema=\"kurier\"}"),
        3.0,
        "the library's conflict and the two in SQL"
    );
    assert_eq!(
        value("kurier_events_version_conflicts_total{schema=\"tenant_a\"}"),
        0.0
    );
}

/// Erasure removes the stream for good, tells read models (a StreamErased
/// marker) and Kafka (a tombstone for the key), and readers carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_stream_is_gone_with_a_marker_a_tombstone_and_readers_unharmed() {
    let (db, brokers) = (fresh_db().await, brokers());
    let category = unique("person").replace('-', "_");
    create_topic(&brokers, &category, 1).await;
    let es = store(&db.pool);
    let (alice, bob) = (format!("{category}-alice"), format!("{category}-bob"));
    es.append(&alice, Expected::Any, &[ev(1), ev(2)])
        .await
        .unwrap();
    es.append(&bob, Expected::Any, &[ev(3)]).await.unwrap();
    let reader_at = es.read_all(0, 1, None).await.unwrap()[0].global_position;
    let erased = es.erase_stream(&alice, "GDPR request 17").await.unwrap();
    assert_eq!(erased, 2);
    es.append(&bob, Expected::Any, &[ev(4)]).await.unwrap();
    let left: Vec<(String, String)> = es
        .read_all(reader_at, 100, None)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.stream, e.event_type))
        .collect();
    assert_eq!(
        left,
        [
            (bob.clone(), "Counted".into()),
            (alice.clone(), "StreamErased".into()),
            (bob.clone(), "Counted".into())
        ],
        "a reader past the erased events carries on"
    );
    let erasures: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM kurier.erasures WHERE stream = $1 AND reason = 'GDPR request 17'",
    )
    .bind(&alice)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(erasures, 1);
    // What reaches Kafka: the erased events were never published (their
    // outbox rows went with them), then the marker, then a tombstone.
    let relay = start_in_process(config(&db.url, &brokers, "")).await;
    let recs = read_until(&brokers, &category, Duration::from_secs(30), |r| {
        r.len() >= 4
    });
    relay.stop().await;
    let for_alice: Vec<(Option<String>, bool)> = recs
        .iter()
        .filter(|r| r.key.as_deref() == Some(alice.as_str()))
        .map(|r| (r.header("event-type").map(str::to_owned), r.value.is_none()))
        .collect();
    assert_eq!(
        for_alice,
        [(Some("StreamErased".into()), false), (None, true)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_forgetting_a_subject_its_data_cannot_be_decrypted_anywhere() {
    let (db, brokers) = (fresh_db().await, brokers());
    let category = unique("customer").replace('-', "_");
    create_topic(&brokers, &category, 1).await;
    let es = store(&db.pool);
    let shredder = Shredder::new(db.pool.clone(), SchemaName::kurier());
    let email = json!("ada@example.com");
    let sealed = shredder.encrypt("customer-ada", &email).await.unwrap();
    let stream = format!("{category}-ada");
    es.append(
        &stream,
        Expected::Any,
        &[NewEvent::json("Registered", json!({"email": sealed}))],
    )
    .await
    .unwrap();
    let relay = start_in_process(config(&db.url, &brokers, "")).await;
    let recs = read_until(&brokers, &category, Duration::from_secs(30), |r| {
        !r.is_empty()
    });
    relay.stop().await;
    let in_kafka = recs[0].json()["email"].clone();
    assert!(!recs[0].json().to_string().contains("ada@example.com"));
    assert_eq!(
        shredder.decrypt(&in_kafka).await.unwrap(),
        Revealed::Value(email.clone())
    );
    // The envelope is real encryption: the key of record opens it, any
    // other key does not (so once that key is gone, nothing does).
    let key: Vec<u8> =
        sqlx::query_scalar("SELECT key FROM kurier.subject_keys WHERE subject = 'customer-ada'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        kurier::events::shredding::open(&key, &in_kafka).unwrap(),
        email
    );
    let mut other = key.clone();
    other[0] ^= 1;
    assert!(kurier::events::shredding::open(&other, &in_kafka).is_err());
    assert!(shredder.forget("customer-ada").await.unwrap());
    let keys: i64 =
        sqlx::query_scalar("SELECT count(*) FROM kurier.subject_keys WHERE subject = 'customer-ada' AND key IS NOT NULL")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(keys, 0, "the key is gone from the table");
    let in_table = es.read_stream(&stream, 0, 1).await.unwrap()[0]
        .data
        .clone()
        .unwrap()["email"]
        .clone();
    for copy in [in_table, in_kafka] {
        assert_eq!(
            shredder.decrypt(&copy).await.unwrap(),
            Revealed::Forgotten {
                subject: "customer-ada".into()
            }
        );
    }
    // No new key for a forgotten subject.
    let err = shredder.encrypt("customer-ada", &email).await.unwrap_err();
    assert_eq!(err.sqlstate().as_deref(), Some("KU410"), "{err}");
}
