//! Projections against the real PostgreSQL (and the broker for the read
//! model fed over Kafka): SQL projections run by the `kurier` binary across
//! SIGKILLs and two instances, failures parked with their position, resume
//! and skip, rebuild, blue/green, erasure; a Rust projection in-process; and
//! a read model in another service fed through outbox → Kafka → inbox.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use kurier::events::{EventStore, Expected, NewEvent, RecordedEvent};
use kurier::inbox::{Handler, HandlerError, InboxMessage, Processor};
use kurier::projection::store::{self, Action};
use kurier::projection::{Projection, ProjectionRunner};
use kurier::SchemaName;
use kurier_test_support::*;
use serde_json::json;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

const SETUP: &str = "
CREATE TABLE applied (event_id uuid PRIMARY KEY, stream text NOT NULL, n int NOT NULL);
CREATE FUNCTION count_event(e kurier.event) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF e.type = 'StreamErased' THEN
        DELETE FROM applied WHERE stream = e.stream;
        RETURN;
    END IF;
    IF e.data ->> 'poison' = 'true' THEN
        RAISE EXCEPTION 'cannot apply %: poisoned', e.event_id;
    END IF;
    IF e.data ->> 'slow' = 'true' THEN
        PERFORM pg_sleep(0.002);
    END IF;
    INSERT INTO applied (event_id, stream, n) VALUES (e.event_id, e.stream, 1)
    ON CONFLICT (event_id) DO UPDATE SET n = applied.n + 1;
END $$;
";

async fn setup(pool: &PgPool) {
    sqlx::raw_sql(SETUP).execute(pool).await.unwrap();
}

async fn append_many(
    pool: &PgPool,
    streams: usize,
    per_stream: usize,
    data: serde_json::Value,
) -> Vec<uuid::Uuid> {
    let es = EventStore::new(pool.clone());
    let mut ids = Vec::new();
    for s in 0..streams {
        let events: Vec<NewEvent> = (0..per_stream)
            .map(|_| NewEvent::json("Counted", data.clone()))
            .collect();
        ids.extend(events.iter().map(|e| e.event_id));
        es.append(&format!("order-{s}"), Expected::Any, &events)
            .await
            .unwrap();
    }
    ids
}

/// Every event of `ids` applied exactly once (and nothing else).
async fn assert_applied_once(pool: &PgPool, ids: &[uuid::Uuid]) {
    let rows: Vec<(uuid::Uuid, i32)> = sqlx::query_as("SELECT event_id, n FROM applied")
        .fetch_all(pool)
        .await
        .unwrap();
    let twice: Vec<_> = rows.iter().filter(|r| r.1 != 1).take(5).collect();
    assert!(twice.is_empty(), "applied more than once: {twice:?}");
    let applied: HashSet<uuid::Uuid> = rows.iter().map(|r| r.0).collect();
    let missing = ids.iter().filter(|id| !applied.contains(id)).count();
    assert_eq!(missing, 0, "{missing} events never applied");
    assert_eq!(
        rows.len(),
        ids.len(),
        "events applied that were not expected"
    );
}

async fn wait_caught_up(pool: &PgPool, name: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !store::caught_up(pool, &SchemaName::kurier(), name)
        .await
        .unwrap()
    {
        let st = store::status(pool, &SchemaName::kurier()).await.unwrap();
        assert!(
            Instant::now() < deadline,
            "{name} not caught up within {timeout:?}: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn status_of(pool: &PgPool, name: &str) -> store::Status {
    store::status(pool, &SchemaName::kurier())
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no projection {name}"))
}

fn daemon(db: &TestDb, app: &str) -> Killed {
    let mut url = url::Url::parse(&db.url).unwrap();
    url.query_pairs_mut().append_pair("application_name", app);
    Killed(spawn_binary(
        kurier_bin!(),
        &["run"],
        &[
            ("DATABASE_URL", url.as_str()),
            ("KAFKA_BROKERS", &brokers()),
            ("KURIER_PROJECTIONS_REFRESH_MS", "300"),
            ("KURIER_PROJECTIONS_POLL_INTERVAL_MS", "20"),
            ("KURIER_PROJECTIONS_BATCH_SIZE", "500"),
        ],
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_mid_batch_again_and_again_applies_every_event_once() {
    let db = fresh_db().await;
    setup(&db.pool).await;
    define_counts(&db.pool).await;
    // Slow events (2 ms each): a kill lands inside a 500-event batch.
    let ids = append_many(&db.pool, 10, 300, json!({"slow": "true"})).await;
    let mut child = daemon(&db, "counts-a");
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(1300)).await;
        signal(&child.0, "KILL");
        let _ = child.0.wait();
        child = daemon(&db, "counts-a");
    }
    wait_caught_up(&db.pool, "counts", Duration::from_secs(120)).await;
    drop(child);
    assert_applied_once(&db.pool, &ids).await;
    let st = status_of(&db.pool, "counts").await;
    assert_eq!((st.status.as_str(), st.events_behind), ("running", 0));
}

/// The holder of a projection's runner lock, by its connection's application name.
async fn runner_of(pool: &PgPool, name: &str) -> Option<String> {
    let key = store::runner_lock(&SchemaName::kurier(), name);
    sqlx::query_scalar(
        "SELECT a.application_name::text FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND ((l.classid::bigint << 32) | l.objid::bigint) = $1",
    )
    .bind(key)
    .fetch_optional(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_run_a_projection_once_and_the_other_takes_over_after_a_kill() {
    let db = fresh_db().await;
    setup(&db.pool).await;
    define_counts(&db.pool).await;
    let mut ids = append_many(&db.pool, 5, 200, json!({})).await;
    let (mut a, mut b) = (daemon(&db, "daemon-a"), daemon(&db, "daemon-b"));
    wait_caught_up(&db.pool, "counts", Duration::from_secs(60)).await;
    let first = runner_of(&db.pool, "counts")
        .await
        .expect("one daemon holds the lock");
    // Exactly one holder while both run.
    let holders: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND ((classid::bigint << 32) | objid::bigint) = $1",
    )
    .bind(store::runner_lock(&SchemaName::kurier(), "counts"))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(holders, 1);
    let (victim, survivor) = if first == "daemon-a" {
        (&mut a, "daemon-b")
    } else {
        (&mut b, "daemon-a")
    };
    signal(&victim.0, "KILL");
    let _ = victim.0.wait();
    ids.extend(append_many(&db.pool, 5, 100, json!({})).await);
    wait_caught_up(&db.pool, "counts", Duration::from_secs(60)).await;
    assert_eq!(
        runner_of(&db.pool, "counts").await.as_deref(),
        Some(survivor)
    );
    drop((a, b));
    assert_applied_once(&db.pool, &ids).await;
}

fn cli(db: &TestDb, args: &[&str]) -> String {
    kurier_test_support::cli(kurier_bin!(), &db.url, args)
}

async fn define_counts(pool: &PgPool) {
    sqlx::query("SELECT kurier.define_projection('counts', 'count_event(kurier.event)')")
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_parks_the_projection_and_resume_or_skip_move_on() {
    let db = fresh_db().await;
    setup(&db.pool).await;
    sqlx::query("SELECT kurier.define_projection('counts', 'count_event(kurier.event)', retry_base_ms => 50, max_attempts => 2)")
        .execute(&db.pool)
        .await
        .unwrap();
    let es = EventStore::new(db.pool.clone());
    let good = NewEvent::json("Counted", json!({}));
    let poison = NewEvent::json("Counted", json!({"poison": "true"}));
    let after = NewEvent::json("Counted", json!({}));
    es.append(
        "order-1",
        Expected::Any,
        &[good.clone(), poison.clone(), after.clone()],
    )
    .await
    .unwrap();
    let poison_at: i64 =
        sqlx::query_scalar("SELECT global_position FROM kurier.events WHERE event_id = $1")
            .bind(poison.event_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let child = daemon(&db, "poison");
    let deadline = Instant::now() + Duration::from_secs(60);
    while status_of(&db.pool, "counts").await.status != "parked" {
        assert!(Instant::now() < deadline, "never parked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let st = status_of(&db.pool, "counts").await;
    assert_eq!(st.failed_position, Some(poison_at));
    assert!(
        st.last_error
            .as_deref()
            .unwrap_or_default()
            .contains("poisoned"),
        "{st:?}"
    );
    assert_eq!(
        st.position,
        poison_at - 1,
        "stopped right before the failing event"
    );
    let shown: serde_json::Value =
        serde_json::from_str(&cli(&db, &["projections", "status", "--json"])).unwrap();
    assert_eq!(shown[0]["status"], "parked");
    assert_eq!(shown[0]["failed_position"], poison_at);
    // Fixed handler, then resume: the event is applied, nothing skipped.
    sqlx::raw_sql(&SETUP.replace("RAISE EXCEPTION 'cannot apply %: poisoned', e.event_id;", "NULL;").replace("CREATE TABLE applied (event_id uuid PRIMARY KEY, stream text NOT NULL, n int NOT NULL);", "").replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION"))
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(cli(&db, &["projections", "resume", "counts"]).contains("counts"));
    wait_caught_up(&db.pool, "counts", Duration::from_secs(30)).await;
    assert_applied_once(&db.pool, &[good.event_id, poison.event_id, after.event_id]).await;
    // The handler breaks again on a new poison event: this time skip it, explicitly.
    sqlx::raw_sql(&SETUP.replace("CREATE TABLE applied (event_id uuid PRIMARY KEY, stream text NOT NULL, n int NOT NULL);", "").replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION"))
        .execute(&db.pool)
        .await
        .unwrap();
    let poison2 = NewEvent::json("Counted", json!({"poison": "true"}));
    let last = NewEvent::json("Counted", json!({}));
    es.append("order-2", Expected::Any, &[poison2.clone(), last.clone()])
        .await
        .unwrap();
    let parks_by = Instant::now() + Duration::from_secs(60);
    while status_of(&db.pool, "counts").await.status != "parked" {
        assert!(Instant::now() < parks_by, "never parked again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let at = status_of(&db.pool, "counts").await.failed_position.unwrap();
    cli(
        &db,
        &[
            "projections",
            "skip",
            "counts",
            "--position",
            &at.to_string(),
            "--reason",
            "bad data, ticket 9",
        ],
    );
    wait_caught_up(&db.pool, "counts", Duration::from_secs(30)).await;
    assert_applied_once(
        &db.pool,
        &[
            good.event_id,
            poison.event_id,
            after.event_id,
            last.event_id,
        ],
    )
    .await;
    let skipped: i64 = sqlx::query_scalar("SELECT count(*) FROM kurier.projection_events WHERE name = 'counts' AND kind = 'skipped' AND position = $1")
        .bind(at)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(skipped, 1, "the skip is recorded");
    drop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_equals_the_incremental_model_blue_green_builds_beside_and_erasure_reaches_it() {
    let db = fresh_db().await;
    setup(&db.pool).await;
    sqlx::raw_sql(
        "CREATE TABLE totals_v1 (stream text PRIMARY KEY, events int NOT NULL);
         CREATE TABLE totals_v2 (stream text PRIMARY KEY, events int NOT NULL, last_version bigint NOT NULL);
         CREATE FUNCTION total_v1(e kurier.event) RETURNS void LANGUAGE sql AS $$
           DELETE FROM totals_v1 WHERE e.type = 'StreamErased' AND stream = e.stream;
           INSERT INTO totals_v1 SELECT e.stream, 1 WHERE e.type <> 'StreamErased'
           ON CONFLICT (stream) DO UPDATE SET events = totals_v1.events + 1 $$;
         CREATE FUNCTION reset_v1() RETURNS void LANGUAGE sql AS $$ TRUNCATE totals_v1 $$;
         CREATE FUNCTION total_v2(e kurier.event) RETURNS void LANGUAGE sql AS $$
           DELETE FROM totals_v2 WHERE e.type = 'StreamErased' AND stream = e.stream;
           INSERT INTO totals_v2 SELECT e.stream, 1, e.version WHERE e.type <> 'StreamErased'
           ON CONFLICT (stream) DO UPDATE SET events = totals_v2.events + 1, last_version = e.version $$;",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("SELECT kurier.define_projection('totals_v1', 'total_v1(kurier.event)', ARRAY['order'], 'reset_v1()')")
        .execute(&db.pool)
        .await
        .unwrap();
    let child = daemon(&db, "rebuild");
    append_many(&db.pool, 20, 50, json!({})).await;
    wait_caught_up(&db.pool, "totals_v1", Duration::from_secs(60)).await;
    let model = |t: &'static str| {
        let pool = db.pool.clone();
        async move {
            let rows: Vec<(String, i32)> =
                sqlx::query_as(&format!("SELECT stream, events FROM {t} ORDER BY 1"))
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            rows
        }
    };
    let incremental = model("totals_v1").await;
    assert_eq!(incremental.len(), 20);
    // Blue/green: v2 builds from position 0 beside v1 while events keep coming.
    sqlx::query(
        "SELECT kurier.define_projection('totals_v2', 'total_v2(kurier.event)', ARRAY['order'])",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    append_many(&db.pool, 20, 5, json!({})).await;
    wait_caught_up(&db.pool, "totals_v2", Duration::from_secs(60)).await;
    wait_caught_up(&db.pool, "totals_v1", Duration::from_secs(60)).await;
    assert_eq!(model("totals_v1").await, model("totals_v2").await);
    // Rebuild v1: reset, replay from 0, the same model again.
    let before = model("totals_v1").await;
    assert!(cli(&db, &["projections", "rebuild", "totals_v1"]).contains("totals_v1"));
    wait_caught_up(&db.pool, "totals_v1", Duration::from_secs(60)).await;
    assert_eq!(model("totals_v1").await, before);
    // Erasure: the StreamErased marker removes what the models derived.
    EventStore::new(db.pool.clone())
        .erase_stream("order-3", "GDPR")
        .await
        .unwrap();
    wait_caught_up(&db.pool, "totals_v1", Duration::from_secs(30)).await;
    wait_caught_up(&db.pool, "totals_v2", Duration::from_secs(30)).await;
    for t in ["totals_v1", "totals_v2"] {
        assert!(
            !model(t).await.iter().any(|r| r.0 == "order-3"),
            "{t} still holds order-3"
        );
    }
    drop(child);
}

/// A Rust projection in the service's process: per stream, the events seen.
struct PerStream {
    fail: Arc<AtomicBool>,
}

impl Projection for PerStream {
    fn name(&self) -> &str {
        "per_stream"
    }
    fn categories(&self) -> Option<Vec<String>> {
        Some(vec!["order".into()])
    }
    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        e: &'a RecordedEvent,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            if e.data.as_ref().is_some_and(|d| d["poison"] == "true")
                && self.fail.load(Ordering::Relaxed)
            {
                return Err("poisoned".into());
            }
            sqlx::query("INSERT INTO applied (event_id, stream, n) VALUES ($1, $2, 1) ON CONFLICT (event_id) DO UPDATE SET n = applied.n + 1")
                .bind(e.event_id)
                .bind(&e.stream)
                .execute(conn)
                .await?;
            Ok(())
        })
    }
    fn reset<'a>(&'a self, conn: &'a mut PgConnection) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            sqlx::query("TRUNCATE applied").execute(conn).await?;
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_projection_runs_once_per_event_with_two_runners_parks_and_rebuilds() {
    let db = fresh_db().await;
    setup(&db.pool).await;
    let fail = Arc::new(AtomicBool::new(true));
    let runner = |fail: &Arc<AtomicBool>| {
        ProjectionRunner::new(db.pool.clone(), PerStream { fail: fail.clone() })
            .batch_size(100, 1000)
            .poll_interval(Duration::from_millis(20))
    };
    let cancel = CancellationToken::new();
    let (r1, r2) = (runner(&fail), runner(&fail));
    let tasks = [
        tokio::spawn({
            let c = cancel.clone();
            async move { r1.run(&c).await }
        }),
        tokio::spawn({
            let c = cancel.clone();
            async move { r2.run(&c).await }
        }),
    ];
    let mut ids = append_many(&db.pool, 10, 100, json!({})).await;
    // Another category is advanced over, never applied.
    EventStore::new(db.pool.clone())
        .append(
            "invoice-1",
            Expected::Any,
            &[NewEvent::json("Counted", json!({}))],
        )
        .await
        .unwrap();
    wait_caught_up(&db.pool, "per_stream", Duration::from_secs(60)).await;
    assert_applied_once(&db.pool, &ids).await;
    // A poison event: retried, then parked at its position.
    sqlx::query("UPDATE kurier.projections SET retry_base_ms = 20, max_attempts = 2 WHERE name = 'per_stream'")
        .execute(&db.pool)
        .await
        .unwrap();
    let poison = NewEvent::json("Counted", json!({"poison": "true"}));
    EventStore::new(db.pool.clone())
        .append("order-99", Expected::Any, std::slice::from_ref(&poison))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_of(&db.pool, "per_stream").await.status != "parked" {
        assert!(Instant::now() < deadline, "never parked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fail.store(false, Ordering::Relaxed);
    let mut tx = db.pool.begin().await.unwrap();
    store::act(
        &mut tx,
        &SchemaName::kurier(),
        "per_stream",
        &Action::Resume,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    wait_caught_up(&db.pool, "per_stream", Duration::from_secs(30)).await;
    ids.push(poison.event_id);
    assert_applied_once(&db.pool, &ids).await;
    // Rebuild: reset and replay give the same model.
    runner(&fail).rebuild().await.unwrap();
    wait_caught_up(&db.pool, "per_stream", Duration::from_secs(30)).await;
    assert_applied_once(&db.pool, &ids).await;
    cancel.cancel();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}

/// The read side of another service: events reach Kafka through the outbox
/// and its inbox; its handler updates the read model in the inbox transaction.
struct ReadSide;

impl Handler for ReadSide {
    fn handle<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        msg: &'a InboxMessage,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let id: uuid::Uuid = msg.message_id.parse()?;
            sqlx::query("INSERT INTO applied (event_id, stream, n) VALUES ($1, $2, 1) ON CONFLICT (event_id) DO UPDATE SET n = applied.n + 1")
                .bind(id)
                .bind(msg.key_str().unwrap_or_default())
                .execute(conn)
                .await?;
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_model_in_another_service_is_fed_over_kafka_and_its_inbox() {
    let (writer, reader, brokers) = (fresh_db().await, fresh_db().await, brokers());
    setup(&reader.pool).await;
    let category = unique("shipment").replace('-', "_");
    create_topic(&brokers, &category, 3).await;
    // The writing service's relay, and the reading service's inbox writer.
    let relay = start_in_process(config(&writer.url, &brokers, "")).await;
    let inbox = start_in_process(config(
        &reader.url,
        &brokers,
        &format!("[relay]\nenabled = false\n[inbox]\ntopics = [\"{category}\"]\nconsumer = \"read-side\"\n[inbox.properties]\n\"session.timeout.ms\" = 6000\n\"max.poll.interval.ms\" = 15000\n"),
    ))
    .await;
    let es = EventStore::new(writer.pool.clone());
    let mut ids = Vec::new();
    for s in 0..10 {
        let events: Vec<NewEvent> = (0..20)
            .map(|_| NewEvent::json("Shipped", json!({})))
            .collect();
        ids.extend(events.iter().map(|e| e.event_id));
        es.append(&format!("{category}-{s}"), Expected::Any, &events)
            .await
            .unwrap();
    }
    let processor = Processor::new(reader.pool.clone(), "read-side")
        .ordered(true)
        .batch_size(50);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        processor.process_batch(&ReadSide).await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM applied")
            .fetch_one(&reader.pool)
            .await
            .unwrap();
        if n == ids.len() as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "read model has {n} of {} events",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.stop().await;
    inbox.stop().await;
    assert_applied_once(&reader.pool, &ids).await;
}
