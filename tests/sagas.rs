//! Sagas end to end: the orchestrator is the `kurier` binary, the three
//! participants (stock, payment, shipping) are separate processes
//! (`examples/order-saga.rs`) that receive their commands through their
//! inbox and reply through their outbox, over the real broker, against the
//! real PostgreSQL. Participants obey the saga's data (`fail_at`, `silent`,
//! `compensation_failures`), so each test picks the path it wants.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kurier::saga::Step;
use kurier::SchemaName;
use kurier_test_support::*;
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

const ROLES: [&str; 3] = ["stock", "payment", "shipping"];

/// A saga type with its own topics, three participant processes and the
/// orchestrators, on a fresh database.
struct World {
    db: TestDb,
    brokers: String,
    saga_type: String,
    participants: Vec<Child>,
    orchestrators: Vec<Child>,
}

impl World {
    /// `tune` tunes each step (timeouts, attempts) of the type.
    async fn new(tune: impl Fn(&str, Step) -> Step, orchestrators: usize) -> World {
        let (db, brokers) = (fresh_db().await, brokers());
        // The saga type is also the topics' prefix (see order-saga.rs).
        let saga_type = unique("order");
        let mut steps = Vec::new();
        for role in ROLES {
            let (cmd, undo) = match role {
                "stock" => ("reserve", Some("release")),
                "payment" => ("charge", Some("refund")),
                _ => ("ship", None),
            };
            let mut step = Step::new(role, format!("{saga_type}.{role}.{cmd}"));
            create_topic(&brokers, &format!("{saga_type}.{role}.{cmd}"), 3).await;
            if let Some(undo) = undo {
                step = step.compensate_on(format!("{saga_type}.{role}.{undo}"));
                create_topic(&brokers, &format!("{saga_type}.{role}.{undo}"), 3).await;
            }
            // Steps not under test do not time out: on a loaded machine a
            // participant joining its consumer group can take longer than
            // the default 30 s, and a timeout would change the history.
            steps.push(tune(role, step.timeout_ms(120_000)));
        }
        create_topic(&brokers, &format!("saga.{saga_type}.replies"), 3).await;
        kurier::saga::define(&db.pool, &SchemaName::kurier(), &saga_type, &steps, None)
            .await
            .unwrap();
        let mut world = World {
            db,
            brokers,
            saga_type,
            participants: Vec::new(),
            orchestrators: Vec::new(),
        };
        for role in ROLES {
            world.participants.push(world.participant(role));
        }
        for _ in 0..orchestrators {
            let o = world.orchestrator();
            world.orchestrators.push(o);
        }
        world
    }

    fn participant(&self, role: &str) -> Child {
        Command::new(example_bin("order-saga"))
            .args(["--prefix", &self.saga_type, "participant", role])
            .env("DATABASE_URL", &self.db.url)
            .env("KAFKA_BROKERS", &self.brokers)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn a participant")
    }

    fn orchestrator(&self) -> Child {
        spawn_binary(
            kurier_bin!(),
            &["run"],
            &[
                ("DATABASE_URL", &self.db.url),
                ("KAFKA_BROKERS", &self.brokers),
                ("KURIER_SAGAS_POLL_INTERVAL_MS", "200"),
                ("KURIER_SAGAS_TOPIC_REFRESH_MS", "500"),
                (
                    "KURIER_SAGAS_PROPERTIES",
                    "session.timeout.ms=6000,max.poll.interval.ms=15000",
                ),
            ],
        )
    }

    /// Starts one saga per `data`, each in its own application transaction.
    async fn start(&self, data: &[Value]) -> Vec<Uuid> {
        let mut ids = Vec::new();
        for d in data {
            let id = Uuid::new_v4();
            let mut tx = self.db.pool.begin().await.unwrap();
            kurier::saga::start(&mut *tx, &SchemaName::kurier(), &self.saga_type, id, d)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            ids.push(id);
        }
        ids
    }

    /// Waits until every saga of `ids` is in one of `statuses`.
    async fn wait_for(&self, ids: &[Uuid], statuses: &[&str], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let statuses: Vec<String> = statuses.iter().map(|s| s.to_string()).collect();
        loop {
            let done: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM kurier.sagas WHERE id = ANY($1) AND status = ANY($2)",
            )
            .bind(ids)
            .bind(&statuses)
            .fetch_one(&self.db.pool)
            .await
            .unwrap();
            if done == ids.len() as i64 {
                return;
            }
            if Instant::now() > deadline {
                let stuck: Vec<(Uuid, String, i32, Option<String>)> = sqlx::query_as(
                    "SELECT id, status, current_step, reason FROM kurier.sagas \
                     WHERE id = ANY($1) AND NOT status = ANY($2) LIMIT 5",
                )
                .bind(ids)
                .bind(&statuses)
                .fetch_all(&self.db.pool)
                .await
                .unwrap();
                panic!(
                    "{done} of {} sagas reached {statuses:?} within {timeout:?}; e.g. {stuck:?}",
                    ids.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn status(&self, id: Uuid) -> (String, i64) {
        sqlx::query_as("SELECT status, version FROM kurier.sagas WHERE id = $1")
            .bind(id)
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    /// How often each participant's effect ran for saga `id`: (step, compensation?) → count.
    async fn effects(&self, id: Uuid) -> Vec<(String, bool, i64)> {
        effects(&self.db.pool, id).await
    }

    /// The steps whose compensation was sent, in the order sent.
    async fn compensations_sent(&self, id: Uuid) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT step_name FROM kurier.saga_events WHERE saga_id = $1 AND kind = 'compensation_sent' ORDER BY id",
        )
        .bind(id)
        .fetch_all(&self.db.pool)
        .await
        .unwrap()
    }

    fn cli(&self, args: &[&str]) -> String {
        cli(kurier_bin!(), &self.db.url, args)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for c in self
            .participants
            .iter_mut()
            .chain(self.orchestrators.iter_mut())
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn effects(pool: &PgPool, id: Uuid) -> Vec<(String, bool, i64)> {
    let mut all = Vec::new();
    for role in ROLES {
        let rows: Vec<(String, bool, i64)> = sqlx::query_as(&format!(
            "SELECT step, compensation, count(*) FROM {role}.effects WHERE saga_id = $1 GROUP BY 1, 2 ORDER BY 1, 2"
        ))
        .bind(id)
        .fetch_all(pool)
        .await
        .unwrap();
        all.extend(rows);
    }
    all.sort();
    all
}

fn e(step: &str, compensation: bool) -> (String, bool, i64) {
    (step.to_owned(), compensation, 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_completes_with_each_step_run_once_and_its_history_kept() {
    let w = World::new(|_, s| s, 1).await;
    let ids = w.start(&[json!({"total_cents": 100})]).await;
    w.wait_for(&ids, &["completed"], Duration::from_secs(90))
        .await;
    let id = ids[0];
    assert_eq!(
        w.effects(id).await,
        [e("payment", false), e("shipping", false), e("stock", false)]
    );
    // Each participant's reply value was merged into the saga's data.
    let data: Value = sqlx::query_scalar("SELECT data FROM kurier.sagas WHERE id = $1")
        .bind(id)
        .fetch_one(&w.db.pool)
        .await
        .unwrap();
    for role in ROLES {
        assert_eq!(data[format!("{role}_done")], true, "{data}");
    }
    let kinds: Vec<String> =
        sqlx::query_scalar("SELECT kind FROM kurier.saga_events WHERE saga_id = $1 ORDER BY id")
            .bind(id)
            .fetch_all(&w.db.pool)
            .await
            .unwrap();
    let expected = [
        "started",
        "command_sent",
        "reply",
        "command_sent",
        "reply",
        "command_sent",
        "reply",
        "completed",
    ];
    assert_eq!(kinds, expected);
    let listed = w.cli(&["sagas", "list", "--json"]);
    let listed: Vec<Value> = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0]["id"].as_str(), listed[0]["status"].as_str()),
        (Some(id.to_string().as_str()), Some("completed"))
    );
    let shown = w.cli(&["sagas", "show", &id.to_string()]);
    assert!(
        shown.contains("completed") && shown.contains("command_sent"),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_at_each_step_compensates_the_completed_steps_in_reverse_order() {
    let w = World::new(|_, s| s, 1).await;
    let ids = w
        .start(&[
            json!({"fail_at": "stock"}),
            json!({"fail_at": "payment"}),
            json!({"fail_at": "shipping"}),
        ])
        .await;
    w.wait_for(&ids, &["compensated"], Duration::from_secs(90))
        .await;
    // Stock refused: nothing ran, nothing to undo.
    assert_eq!(w.effects(ids[0]).await, []);
    assert!(w.compensations_sent(ids[0]).await.is_empty());
    // Payment refused: the stock reservation is released.
    assert_eq!(
        w.effects(ids[1]).await,
        [e("stock", false), e("stock", true)]
    );
    assert_eq!(w.compensations_sent(ids[1]).await, ["stock"]);
    // Shipping refused: payment refunded, then stock released (reverse order).
    assert_eq!(
        w.effects(ids[2]).await,
        [
            e("payment", false),
            e("payment", true),
            e("stock", false),
            e("stock", true)
        ]
    );
    assert_eq!(w.compensations_sent(ids[2]).await, ["payment", "stock"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_replies_and_duplicate_commands_change_nothing() {
    let w = World::new(|_, s| s, 1).await;
    let ids = w.start(&[json!({"total_cents": 100})]).await;
    w.wait_for(&ids, &["completed"], Duration::from_secs(90))
        .await;
    let id = ids[0];
    let (status, version) = w.status(id).await;
    let before = w.effects(id).await;
    // Every reply and every command again: once with its own message-id (the
    // inbox drops it) and once with a new one (the saga's state, and the
    // participant's per-step record, drop it).
    let producer = plain_producer(&w.brokers);
    let replies = read_until(
        &w.brokers,
        &format!("saga.{}.replies", w.saga_type),
        Duration::from_secs(30),
        |r| r.len() >= 3,
    );
    let mut commands = Vec::new();
    for (role, verb) in [
        ("stock", "reserve"),
        ("payment", "charge"),
        ("shipping", "ship"),
    ] {
        let topic = format!("{}.{role}.{verb}", w.saga_type);
        commands.push((
            topic.clone(),
            read_until(&w.brokers, &topic, Duration::from_secs(30), |r| {
                !r.is_empty()
            }),
        ));
    }
    for r in &replies {
        let topic = format!("saga.{}.replies", w.saga_type);
        resend(&producer, &topic, r, None).await;
        resend(&producer, &topic, r, Some(&Uuid::new_v4().to_string())).await;
    }
    for (topic, recs) in &commands {
        resend(&producer, topic, &recs[0], None).await;
        resend(
            &producer,
            topic,
            &recs[0],
            Some(&Uuid::new_v4().to_string()),
        )
        .await;
    }
    // The copies with new ids reach the saga and are recorded as ignored.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ignored: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM kurier.saga_events WHERE saga_id = $1 AND kind = 'reply_ignored'",
        )
        .bind(id)
        .fetch_one(&w.db.pool)
        .await
        .unwrap();
        let handled: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM stock.inbox WHERE processed_at IS NOT NULL) \
                  + (SELECT count(*) FROM payment.inbox WHERE processed_at IS NOT NULL) \
                  + (SELECT count(*) FROM shipping.inbox WHERE processed_at IS NOT NULL)",
        )
        .fetch_one(&w.db.pool)
        .await
        .unwrap();
        // 3 commands and their per-step records, and the 3 copies with new
        // ids (the participants find the step's record and skip them).
        if ignored >= 3 && handled >= 9 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "copies not seen: {ignored} replies ignored, {handled} inbox rows handled"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        w.status(id).await,
        (status, version),
        "a duplicate changed the saga"
    );
    assert_eq!(
        w.effects(id).await,
        before,
        "a duplicate command ran a step again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_that_never_answers_times_out_and_the_saga_compensates() {
    let w = World::new(
        |role, s| {
            if role == "shipping" {
                s.timeout_ms(1500).max_attempts(2)
            } else {
                s
            }
        },
        1,
    )
    .await;
    let ids = w.start(&[json!({"silent": "shipping"})]).await;
    w.wait_for(&ids, &["compensated"], Duration::from_secs(90))
        .await;
    let id = ids[0];
    assert_eq!(
        w.effects(id).await,
        [
            e("payment", false),
            e("payment", true),
            e("stock", false),
            e("stock", true)
        ]
    );
    let timeouts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM kurier.saga_events WHERE saga_id = $1 AND kind = 'timeout'",
    )
    .bind(id)
    .fetch_one(&w.db.pool)
    .await
    .unwrap();
    assert_eq!(timeouts, 2, "two attempts, each timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_compensation_is_retried_then_parked_and_resume_finishes_it() {
    let w = World::new(
        |role, s| {
            if role == "stock" {
                s.max_attempts(2).retry_backoff_ms(200)
            } else {
                s
            }
        },
        1,
    )
    .await;
    let ids = w
        .start(&[json!({"fail_at": "shipping", "compensation_failures": {"stock": 2}})])
        .await;
    w.wait_for(&ids, &["parked"], Duration::from_secs(90)).await;
    let id = ids[0];
    let parked = w.cli(&["sagas", "list", "--status", "parked"]);
    assert!(
        parked.contains(&id.to_string()) && parked.contains("parked"),
        "{parked}"
    );
    // Undone so far: payment; stock's undo failed twice and is not recorded.
    assert_eq!(
        w.effects(id).await,
        [e("payment", false), e("payment", true), e("stock", false)]
    );
    let resumed = w.cli(&["sagas", "resume", &id.to_string()]);
    assert!(resumed.contains("compensating"), "{resumed}");
    w.wait_for(&ids, &["compensated"], Duration::from_secs(60))
        .await;
    assert_eq!(
        w.effects(id).await,
        [
            e("payment", false),
            e("payment", true),
            e("stock", false),
            e("stock", true)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sagas_end_with_two_orchestrators_killed_again_and_again() {
    let mut w = World::new(|_, s| s, 2).await;
    // One in five declined at payment: those compensate the stock reservation.
    let data: Vec<Value> = (0..1000)
        .map(|i| {
            if i % 5 == 0 {
                json!({"fail_at": "payment", "i": i})
            } else {
                json!({"i": i})
            }
        })
        .collect();
    let started = Instant::now();
    let ids = w.start(&data).await;
    let mut kills = 0;
    let mut victim = 0;
    loop {
        let ended: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM kurier.sagas WHERE status IN ('completed', 'compensated')",
        )
        .fetch_one(&w.db.pool)
        .await
        .unwrap();
        if ended == 1000 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "only {ended} of 1000 sagas ended after {kills} kills"
        );
        if kills < 8 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            signal(&w.orchestrators[victim], "KILL");
            let _ = w.orchestrators[victim].wait();
            w.orchestrators[victim] = w.orchestrator();
            kills += 1;
            victim = 1 - victim;
        } else {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    eprintln!(
        "1000 sagas ended in {:?} with {kills} SIGKILLs",
        started.elapsed()
    );
    let statuses: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM kurier.sagas GROUP BY 1 ORDER BY 1")
            .fetch_all(&w.db.pool)
            .await
            .unwrap();
    assert_eq!(
        statuses,
        [
            ("compensated".to_string(), 200),
            ("completed".to_string(), 800)
        ]
    );
    // Each participant's effect applied once per saga and step.
    for role in ROLES {
        let doubled: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM (SELECT 1 FROM {role}.effects GROUP BY saga_id, step, compensation HAVING count(*) > 1) d"
        ))
        .fetch_one(&w.db.pool)
        .await
        .unwrap();
        assert_eq!(doubled, 0, "{role} ran a step twice");
    }
    let expected: Vec<(String, bool, i64)> = vec![
        ("payment".into(), false, 800),
        ("shipping".into(), false, 800),
        ("stock".into(), false, 1000),
        ("stock".into(), true, 200),
    ];
    let mut got = Vec::new();
    for role in ROLES {
        let rows: Vec<(String, bool, i64)> = sqlx::query_as(&format!(
            "SELECT step, compensation, count(*) FROM {role}.effects GROUP BY 1, 2"
        ))
        .fetch_all(&w.db.pool)
        .await
        .unwrap();
        got.extend(rows);
    }
    got.sort();
    assert_eq!(got, expected);
    // No saga advanced twice: one applied reply per step and phase.
    let twice: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM kurier.saga_events WHERE kind = 'reply' \
         GROUP BY saga_id, step, detail ->> 'compensation' HAVING count(*) > 1) t",
    )
    .fetch_one(&w.db.pool)
    .await
    .unwrap();
    assert_eq!(twice, 0, "a saga applied two replies for one step");
    let ended: HashSet<Uuid> =
        sqlx::query_scalar("SELECT id FROM kurier.sagas WHERE ended_at IS NOT NULL")
            .fetch_all(&w.db.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert!(ids.iter().all(|id| ended.contains(id)));
}
