//! Operating Kurier: Debezium-shape tables, several schemas in one daemon,
//! CloudEvents headers, trace context, and the backlog metrics. Real
//! PostgreSQL and a real Kafka-protocol broker, as everywhere.

use std::collections::HashSet;
use std::time::Duration;

use kurier::schema::SchemaName;
use kurier::Message;
use kurier_test_support::*;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

async fn debezium_table(pool: &sqlx::PgPool, table: &str) {
    sqlx::query(&format!(
        "CREATE TABLE {table} (id uuid PRIMARY KEY, aggregatetype varchar(255) NOT NULL, \
         aggregateid varchar(255) NOT NULL, type varchar(255) NOT NULL, payload jsonb)"
    ))
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_shape_table_is_relayed_like_the_outbox_event_router() {
    let db = fresh_db().await;
    let brokers = brokers();
    debezium_table(&db.pool, "public.outbox").await;
    // Debezium's default route: outbox.event.<aggregatetype>.
    let aggregate = unique("Order").replace('-', "_");
    let topic = format!("outbox.event.{aggregate}");
    create_topic(&brokers, &topic, 3).await;
    let cfg = config(
        &db.url,
        &brokers,
        "[[debezium]]\ntable = \"public.outbox\"\n",
    );
    kurier::schema::debezium::install(&db.pool, &cfg.debezium)
        .await
        .unwrap();
    // Installing twice is harmless (kurier migrate runs it on every deploy).
    kurier::schema::debezium::install(&db.pool, &cfg.debezium)
        .await
        .unwrap();

    let mut ids = Vec::new();
    let mut tx = db.pool.begin().await.unwrap();
    for i in 0..20 {
        let id = uuid::Uuid::new_v4();
        ids.push(id);
        sqlx::query("INSERT INTO public.outbox VALUES ($1, $2, $3, $4, $5)")
            .bind(id)
            .bind(&aggregate)
            .bind(format!("order-{}", i % 4))
            .bind(if i % 2 == 0 {
                "OrderCreated"
            } else {
                "OrderShipped"
            })
            .bind(serde_json::json!({"n": i}))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    // The usual Debezium idiom: delete right after insert; the event still goes out.
    sqlx::query("DELETE FROM public.outbox")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // A row without aggregatetype has no topic: the application's insert fails, clearly.
    sqlx::query("ALTER TABLE public.outbox ALTER aggregatetype DROP NOT NULL")
        .execute(&db.pool)
        .await
        .unwrap();
    let err =
        sqlx::query("INSERT INTO public.outbox VALUES (gen_random_uuid(), NULL, 'x', 'T', '{}')")
            .execute(&db.pool)
            .await
            .unwrap_err()
            .to_string();
    assert!(err.contains("has no aggregatetype"), "{err}");

    let daemon = start_in_process(cfg).await;
    let want: HashSet<String> = ids.iter().map(|u| u.to_string()).collect();
    let recs = tokio::task::spawn_blocking({
        let (brokers, topic, want) = (brokers.clone(), topic.clone(), want.clone());
        move || read_ids(&brokers, &topic, &want, Duration::from_secs(30))
    })
    .await
    .unwrap();
    daemon.stop().await;
    assert_eq!(recs.len(), 20, "exactly the 20 events: {recs:?}");
    for (i, id) in ids.iter().enumerate() {
        let r = recs
            .iter()
            .find(|r| r.header("id") == Some(&id.to_string()))
            .unwrap_or_else(|| panic!("no record with header id={id}"));
        assert_eq!(r.key.as_deref(), Some(format!("order-{}", i % 4).as_str()));
        assert_eq!(r.json(), serde_json::json!({"n": i}));
        let ty = if i % 2 == 0 {
            "OrderCreated"
        } else {
            "OrderShipped"
        };
        assert_eq!(r.header("type"), Some(ty));
        assert_eq!(r.message_id(), id.to_string(), "message-id is the event id");
        // Same key, same partition (the Java client's mapping).
        let expected = java_partition(r.key.as_deref().unwrap().as_bytes(), 3);
        assert_eq!(r.partition, expected);
    }
    // Per key, events arrive in insert order.
    for key in 0..4 {
        let ns: Vec<i64> = recs
            .iter()
            .filter(|r| r.key.as_deref() == Some(&format!("order-{key}")))
            .map(|r| r.json()["n"].as_i64().unwrap())
            .collect();
        assert!(
            ns.windows(2).all(|w| w[0] < w[1]),
            "key order-{key}: {ns:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_table_of_the_wrong_shape_is_refused_naming_the_columns() {
    let db = fresh_db().await;
    sqlx::query("CREATE TABLE events (id uuid, aggregatetype text, payload jsonb)")
        .execute(&db.pool)
        .await
        .unwrap();
    let cfg = config(&db.url, &brokers(), "[[debezium]]\ntable = \"events\"\n");
    let err = kurier::schema::debezium::install(&db.pool, &cfg.debezium)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("public.events lacks column(s) aggregateid, type"),
        "{err}"
    );
    let missing = config(&db.url, &brokers(), "[[debezium]]\ntable = \"nope\"\n");
    let err = kurier::schema::debezium::install(&db.pool, &missing.debezium)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("public.nope does not exist"), "{err}");
    // Names from config never reach SQL unchecked.
    let bad = kurier_daemon::config::Config::from_toml(
        "[[debezium]]\ntable = \"public.x; DROP TABLE y\"\n",
        &[("DATABASE_URL".to_string(), db.url.clone())]
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>(),
        &Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(bad.contains("not a plain PostgreSQL identifier"), "{bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_daemon_relays_several_schemas_each_with_its_own_dead_letters() {
    let db = fresh_db().await;
    let brokers = brokers();
    let cfg = config(
        &db.url,
        &brokers,
        "[relay]\nschemas = [\"kurier\", \"tenant_a\", \"tenant_b\"]\nmax_attempts = 1\n",
    );
    kurier::schema::migrate(&db.pool, &cfg.relay.schemas)
        .await
        .unwrap();
    let topic = unique("tenants");
    create_topic(&brokers, &topic, 2).await;
    let mut want = HashSet::new();
    for schema in &cfg.relay.schemas {
        for i in 0..10 {
            let msg = Message::json(
                &topic,
                serde_json::json!({"tenant": schema.as_str(), "i": i}),
            )
            .key(format!("{schema}-{}", i % 3));
            let id = kurier::outbox::enqueue_into(&db.pool, schema, &msg)
                .await
                .unwrap();
            want.insert(id.to_string());
        }
    }
    // A poison row in tenant_b stays in tenant_b.
    sqlx::query("INSERT INTO tenant_b.outbox (topic, payload) VALUES ('bad topic', '{}')")
        .execute(&db.pool)
        .await
        .unwrap();
    let daemon = start_in_process(cfg.clone()).await;
    let recs = tokio::task::spawn_blocking({
        let (brokers, topic, want) = (brokers.clone(), topic.clone(), want.clone());
        move || read_ids(&brokers, &topic, &want, Duration::from_secs(30))
    })
    .await
    .unwrap();
    assert_eq!(recs.len(), 30, "each of the 30 messages once");
    let tenant_b = SchemaName::new("tenant_b").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let st = kurier::outbox::store::status::outbox(&db.pool, &tenant_b)
            .await
            .unwrap();
        if st.dead_letters == 1 && st.pending == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "tenant_b: {st:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.stop().await;
    for schema in ["kurier", "tenant_a"] {
        let st = kurier::outbox::store::status::outbox(&db.pool, &SchemaName::new(schema).unwrap())
            .await
            .unwrap();
        assert_eq!((st.pending, st.dead_letters), (0, 0), "{schema}: {st:?}");
    }
    let dead = kurier::outbox::store::dead_letter::list(&db.pool, &tenant_b, 10)
        .await
        .unwrap();
    assert!(dead[0].error.contains("illegal topic name"), "{dead:?}");
    // Each schema keeps its own leases: all 32 partitions of each were taken.
    for schema in &cfg.relay.schemas {
        let epochs: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {schema}.relay_leases WHERE epoch > 0"
        ))
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(epochs, 32, "{schema}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_binary_mode_headers_are_added() {
    let db = fresh_db().await;
    let brokers = brokers();
    let topic = unique("ce");
    create_topic(&brokers, &topic, 1).await;
    let cfg = config(
        &db.url,
        &brokers,
        "[relay]\ncloudevents = true\ncloudevents_source = \"/orders-service\"\n",
    );
    let json_id = kurier::enqueue(
        &db.pool,
        &Message::json(&topic, serde_json::json!({"a": 1})).header("type", "OrderPlaced"),
    )
    .await
    .unwrap();
    let bytes_id = kurier::enqueue(
        &db.pool,
        &Message::bytes(&topic, b"\x00\x01".to_vec()).header("ce_type", "com.example.blob"),
    )
    .await
    .unwrap();
    let daemon = start_in_process(cfg).await;
    let recs = tokio::task::spawn_blocking({
        let (brokers, topic) = (brokers.clone(), topic.clone());
        move || read_until(&brokers, &topic, Duration::from_secs(30), |r| r.len() >= 2)
    })
    .await
    .unwrap();
    daemon.stop().await;
    let json = recs
        .iter()
        .find(|r| r.message_id() == json_id.to_string())
        .unwrap();
    assert_eq!(json.header("ce_specversion"), Some("1.0"));
    assert_eq!(json.header("ce_id"), Some(json_id.to_string().as_str()));
    assert_eq!(json.header("ce_source"), Some("/orders-service"));
    assert_eq!(json.header("ce_type"), Some("OrderPlaced"));
    assert_eq!(json.header("content-type"), Some("application/json"));
    assert_eq!(
        json.json(),
        serde_json::json!({"a": 1}),
        "binary mode: the value is the data"
    );
    let bin = recs
        .iter()
        .find(|r| r.message_id() == bytes_id.to_string())
        .unwrap();
    assert_eq!(
        bin.header("ce_type"),
        Some("com.example.blob"),
        "the row's own ce_type wins"
    );
    assert_eq!(
        bin.headers.iter().filter(|(k, _)| k == "ce_type").count(),
        1
    );
    assert_eq!(bin.header("content-type"), Some("application/octet-stream"));
    assert_eq!(bin.value.as_deref(), Some(&b"\x00\x01"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_reaches_the_record_and_the_relays_span() {
    let db = fresh_db().await;
    let brokers = brokers();
    let topic = unique("traced");
    create_topic(&brokers, &topic, 1).await;
    let id = kurier::enqueue(
        &db.pool,
        &Message::json(&topic, serde_json::json!({})).header("traceparent", TRACEPARENT),
    )
    .await
    .unwrap();
    let mut secret_url = url::Url::parse(&db.url).unwrap();
    secret_url.set_password(Some("pw-never-logged")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kurier"))
        .arg("run")
        .env_remove("KURIER_CONFIG")
        .env("DATABASE_URL", secret_url.as_str())
        .env("KAFKA_BROKERS", &brokers)
        .env("KURIER_LOG_FORMAT", "json")
        .env("RUST_LOG", "info,kurier::trace=debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let recs = tokio::task::spawn_blocking({
        let (brokers, topic) = (brokers.clone(), topic.clone());
        move || read_until(&brokers, &topic, Duration::from_secs(30), |r| !r.is_empty())
    })
    .await
    .unwrap();
    assert_eq!(recs[0].header("traceparent"), Some(TRACEPARENT));
    signal(&child, "TERM");
    let status = child.wait().unwrap();
    let mut logs = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut logs).unwrap();
    assert!(status.success(), "{logs}");
    let linked = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "delivery report")
        .unwrap_or_else(|| panic!("no delivery report event in the JSON logs:\n{logs}"));
    let span = &linked["span"];
    assert_eq!(
        span["link.trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
        "{linked}"
    );
    assert_eq!(span["link.span_id"], "00f067aa0ba902b7", "{linked}");
    assert_eq!(span["message_id"], id.to_string(), "{linked}");
    assert_eq!(linked["acknowledged"], true, "{linked}");
    // The password is in DATABASE_URL; it appears nowhere in the logs.
    assert!(!logs.contains("pw-never-logged"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_backlog_throughput_and_leases() {
    let db = fresh_db().await;
    let brokers = brokers();
    let topic = unique("metered");
    create_topic(&brokers, &topic, 1).await;
    // One row held back by a retry in an hour, written 30 s ago: pending, retrying, old.
    sqlx::query(
        "INSERT INTO kurier.outbox (topic, key, payload, created_at, retry_at, attempts) \
         VALUES ($1, 'held', '{}', now() - interval '30 seconds', now() + interval '1 hour', 1)",
    )
    .bind(&topic)
    .execute(&db.pool)
    .await
    .unwrap();
    for i in 0..5 {
        kurier::enqueue(
            &db.pool,
            &Message::json(&topic, serde_json::json!({"i": i})).key("k"),
        )
        .await
        .unwrap();
    }
    let (daemon, addr) = start_with_http(config(&db.url, &brokers, "")).await;
    tokio::task::spawn_blocking({
        let (brokers, topic) = (brokers.clone(), topic.clone());
        move || read_until(&brokers, &topic, Duration::from_secs(30), |r| r.len() >= 5)
    })
    .await
    .unwrap();
    // Rows are deleted after their reports; wait for that, then scrape.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while outbox_count(&db.pool).await > 1 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, body) = http_get(addr, "/metrics").await;
    daemon.stop().await;
    assert_eq!(code, 200);
    let value = |name: &str| metric(&body, name);
    assert_eq!(value("kurier_backlog_up"), 1.0);
    assert_eq!(value("kurier_outbox_pending_rows{schema=\"kurier\"}"), 1.0);
    assert_eq!(value("kurier_outbox_retrying_rows{schema=\"kurier\"}"), 1.0);
    let age = value("kurier_outbox_oldest_pending_age_seconds{schema=\"kurier\"}");
    assert!((30.0..120.0).contains(&age), "oldest age {age}");
    assert_eq!(
        value("kurier_outbox_dead_letter_rows{schema=\"kurier\"}"),
        0.0
    );
    assert!(
        value(&format!(
            "kurier_outbox_published_total{{topic=\"{topic}\"}}"
        )) >= 5.0
    );
    assert_eq!(
        value("kurier_relay_partitions_owned{schema=\"kurier\"}"),
        32.0
    );
    for family in [
        "# TYPE kurier_relay_batch_size histogram",
        "# TYPE kurier_relay_batch_publish_seconds histogram",
        "# TYPE kurier_outbox_published_total counter",
    ] {
        assert!(body.contains(family), "{family} missing:\n{body}");
    }
}
