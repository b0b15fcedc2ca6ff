//! The `kurier` binary as a process: SIGKILL at random instants, SIGTERM, bad config.

use std::time::{Duration, Instant};

use kurier_test_support::*;
use rand::Rng;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_and_restart_loses_nothing() {
    let (db, brokers, topic) = (fresh_db().await, brokers(), unique("sigkill"));
    create_topic(&brokers, &topic, 3).await;
    // Small batches and a slow linger keep a batch in flight most of the time.
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("KAFKA_BROKERS", brokers.as_str()),
        ("KURIER_RELAY_BATCH_SIZE", "50"),
        ("KURIER_KAFKA_PROPERTIES", "linger.ms=20"),
    ];
    let stop = CancellationToken::new();
    let writers = {
        let (pool, topic, stop) = (db.pool.clone(), topic.clone(), stop.clone());
        tokio::spawn(async move {
            write_concurrently(
                &pool,
                &topic,
                4,
                100_000,
                4,
                0.10,
                Duration::from_millis(10),
                stop,
            )
            .await
        })
    };
    let started = Instant::now();
    let mut kills = 0;
    // Killing for 8 s, and on a machine too slow for the relays to publish
    // in that time, until their deletes show up (for at most a minute).
    let deleted = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT coalesce(n_tup_del, 0) FROM pg_stat_user_tables WHERE relid = 'kurier.outbox'::regclass",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    while started.elapsed() < Duration::from_secs(8)
        || (deleted().await < 300 && started.elapsed() < Duration::from_secs(60))
    {
        let mut child = spawn_binary(kurier_bin!(), &["run"], &env);
        let lifetime = rand::rng().random_range(500..1500);
        tokio::time::sleep(Duration::from_millis(lifetime)).await;
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        kills += 1;
    }
    stop.cancel();
    let committed = writers.await.unwrap();
    let left_after_kills = outbox_count(&db.pool).await;
    let published_while_killed = committed.ids.len() as i64 - left_after_kills;
    // At least a few batches of 50 went out while relays were being killed.
    assert!(published_while_killed >= 250, "the killed relays must have been publishing: only {published_while_killed} of {} rows left the outbox", committed.ids.len());
    assert!(
        committed.ids.len() > 500,
        "writers committed too little to mean anything: {}",
        committed.ids.len()
    );

    // A last run drains the rest, then stops gracefully on SIGTERM with exit 0.
    let mut child = spawn_binary(kurier_bin!(), &["run"], &env);
    wait_drained(&db.pool, Duration::from_secs(60)).await;
    signal(&child, "TERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM must exit 0, got {status}");

    let recs = read_ids(&brokers, &topic, &committed.ids, Duration::from_secs(120));
    eprintln!("{kills} SIGKILLs during writes; {published_while_killed} rows published before the final run");
    assert_delivered_exactly(&recs, &committed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_in_flight_batch_and_exits_zero() {
    let (db, brokers, topic) = (fresh_db().await, brokers(), unique("sigterm"));
    create_topic(&brokers, &topic, 1).await;
    let committed = write_concurrently(
        &db.pool,
        &topic,
        2,
        2000,
        2,
        0.0,
        Duration::ZERO,
        CancellationToken::new(),
    )
    .await;
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("KAFKA_BROKERS", brokers.as_str()),
        ("KURIER_RELAY_BATCH_SIZE", "500"),
    ];
    let mut child = spawn_binary(kurier_bin!(), &["run"], &env);
    // Stop as soon as the first batch is finished, while later ones are in flight.
    let total = outbox_count(&db.pool).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while outbox_count(&db.pool).await == total {
        assert!(Instant::now() < deadline, "relay never finished a batch");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    signal(&child, "TERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM must exit 0, got {status}");
    let left = outbox_count(&db.pool).await;
    // Whatever was deleted was acknowledged: everything missing from the outbox is on the topic.
    let published: std::collections::HashSet<String> =
        sqlx::query_scalar::<_, uuid::Uuid>("SELECT message_id FROM kurier.outbox")
            .fetch_all(&db.pool)
            .await
            .unwrap()
            .into_iter()
            .map(|u| u.to_string())
            .collect();
    let gone: std::collections::HashSet<String> =
        committed.ids.difference(&published).cloned().collect();
    assert_eq!(gone.len() as i64, total - left);
    let recs = read_ids(&brokers, &topic, &gone, Duration::from_secs(60));
    assert!(recs.len() >= gone.len());
    eprintln!(
        "SIGTERM after first batch: {} of {total} rows published, {left} left for the next run",
        gone.len()
    );
}

#[test]
fn malformed_config_is_refused_naming_the_key() {
    let dir = std::env::temp_dir().join(unique("kurier-config"));
    std::fs::create_dir_all(&dir).unwrap();
    // (file contents, extra environment, what the error must name)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        ("[relay]\nbatch_sise = 10\n", &[], "batch_sise"),
        ("[relay]\nbatch_size = \"many\"\n", &[], "batch_size"),
        (
            "[database]\nurl = \"mysql://u:hunter2@h/db\"\n[kafka]\nbrokers = \"b:9092\"\n",
            &[],
            "database.url",
        ),
        ("[kafka.properties]\nacks = \"1\"\n", &[], "acks"),
        (
            "",
            &[("KURIER_RELAY_POLL_INTERVAL_MS", "soon")],
            "KURIER_RELAY_POLL_INTERVAL_MS",
        ),
    ];
    for (i, (toml, extra_env, key)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.toml"));
        std::fs::write(&path, toml).unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kurier"));
        cmd.arg("--config")
            .arg(&path)
            .arg("run")
            .env("DATABASE_URL", "postgres://u@127.0.0.1:1/x")
            .env("KAFKA_BROKERS", "127.0.0.1:1");
        if i == 2 {
            cmd.env_remove("DATABASE_URL");
        }
        for (k, v) in *extra_env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "case {i}: {stderr}");
        assert!(
            stderr.contains(key),
            "case {i}: error must name `{key}`: {stderr}"
        );
        assert!(!stderr.contains("hunter2"), "password leaked: {stderr}");
    }
}

/// Waits (on a slow machine too) until a relay holds its leases, then a
/// little longer: with rows waiting it has claimed them and sent the batch.
async fn batch_in_flight(pool: &sqlx::PgPool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let leased: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM kurier.relay_leases WHERE owner IS NOT NULL AND expires_at > now()",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if leased > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the relay took no lease in 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
}

/// With the broker unreachable a batch waits for delivery reports: SIGTERM
/// waits `shutdown_grace` then exits 0 leaving the rows; a second signal exits at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_broker_down_respects_grace_and_second_signal() {
    let db = fresh_db().await;
    for i in 0..10 {
        kurier::enqueue(
            &db.pool,
            &kurier::Message::json("t", serde_json::json!({ "i": i })).key("k"),
        )
        .await
        .unwrap();
    }
    // Nothing listens on port 1: every batch waits for the broker.
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("KAFKA_BROKERS", "127.0.0.1:1"),
        ("KURIER_SHUTDOWN_GRACE_MS", "1500"),
    ];

    let mut child = spawn_binary(kurier_bin!(), &["run"], &env);
    batch_in_flight(&db.pool).await;
    let t = Instant::now();
    signal(&child, "TERM");
    let status = child.wait().unwrap();
    let took = t.elapsed();
    assert!(status.success(), "graceful exit must be 0: {status}");
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(6),
        "waited {took:?} for a 1.5 s grace"
    );
    assert_eq!(
        outbox_count(&db.pool).await,
        10,
        "unacknowledged rows stay in the outbox"
    );

    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("KAFKA_BROKERS", "127.0.0.1:1"),
        ("KURIER_SHUTDOWN_GRACE_MS", "60000"),
    ];
    let mut child = spawn_binary(kurier_bin!(), &["run"], &env);
    batch_in_flight(&db.pool).await;
    signal(&child, "TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    signal(&child, "INT");
    let status = child.wait().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "second signal must exit at once, took {:?}",
        t.elapsed()
    );
    assert_eq!(status.code(), Some(130), "{status}");
    assert_eq!(outbox_count(&db.pool).await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_cli_lists_retries_and_discards() {
    let db = fresh_db().await;
    for i in 0..3 {
        sqlx::query("INSERT INTO kurier.dead_letters (id, message_id, topic, key, payload, headers, created_at, attempts, error) VALUES ($1, gen_random_uuid(), 'orders', 'k', '{}', '{}', now(), 1, 'illegal topic name')")
            .bind(100 + i)
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kurier"))
            .args(args)
            .env("DATABASE_URL", &db.url)
            .env_remove("KAFKA_BROKERS")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let listed: serde_json::Value =
        serde_json::from_str(&cli(&["dead-letters", "list", "--json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 3);
    assert_eq!(listed[0]["error"], "illegal topic name");
    assert!(cli(&["dead-letters", "retry", "--id", "100"]).contains("moved 1"));
    assert_eq!(
        outbox_count(&db.pool).await,
        1,
        "retried row is back in the outbox"
    );
    assert!(cli(&["dead-letters", "discard", "--all"]).contains("discarded 2"));
    assert!(
        cli(&["dead-letters", "list"]).lines().count() == 1,
        "only the header line is left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmigrated_database_is_reported_once_and_exits_non_zero() {
    let url = fresh_empty_db().await;
    let brokers = brokers();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kurier"))
        .arg("run")
        .env("DATABASE_URL", &url)
        .env("KAFKA_BROKERS", &brokers)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("kurier migrate"),
        "the error must name the fix: {stderr}"
    );
    assert_eq!(
        stderr.matches("kurier migrate").count(),
        1,
        "reported once: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_status_report_problems_with_their_fixes() {
    let db = fresh_db().await;
    let brokers = brokers();
    let run = |args: &[&str], db_url: &str, brokers: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kurier"))
            .args(args)
            .env("DATABASE_URL", db_url)
            .env("KAFKA_BROKERS", brokers)
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = run(&["check"], &db.url, &brokers);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("ok    PostgreSQL reachable") && out.contains("ok    Kafka reachable"),
        "{out}"
    );

    let mut bad_db = url::Url::parse(&db.url).unwrap();
    bad_db.set_port(Some(1)).unwrap();
    bad_db.set_password(Some("s3cret")).unwrap();
    let (code, out) = run(&["check"], bad_db.as_str(), "127.0.0.1:1");
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("FAIL  cannot connect to PostgreSQL")
            && out.contains("fix: check DATABASE_URL"),
        "{out}"
    );
    assert!(
        out.contains("FAIL  cannot reach Kafka at 127.0.0.1:1")
            && out.contains("fix: check KAFKA_BROKERS"),
        "{out}"
    );
    assert!(!out.contains("s3cret"), "password leaked: {out}");

    let unmigrated = fresh_empty_db().await;
    let (code, out) = run(&["check"], &unmigrated, &brokers);
    assert_eq!(code, Some(1));
    assert!(out.contains("fix: run `kurier migrate`"), "{out}");

    for i in 0..3 {
        kurier::enqueue(
            &db.pool,
            &kurier::Message::json(if i == 0 { "a" } else { "b" }, serde_json::json!({})),
        )
        .await
        .unwrap();
    }
    let (code, out) = run(&["status", "--json"], &db.url, &brokers);
    assert_eq!(code, Some(0), "{out}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["pending"], 3);
    assert_eq!(
        s["per_topic"][0],
        serde_json::json!({"topic": "b", "pending": 2})
    );
    assert_eq!(s["dead_letters"], 0);
    let (_, table) = run(&["status"], &db.url, &brokers);
    assert!(table.starts_with("outbox kurier: 3 pending"), "{table}");
}
