//! Transport security, as far as this machine allows: PostgreSQL over TLS with
//! the server certificate verified (the local server's certificate is its own
//! CA), and a build of librdkafka that speaks SASL_SSL / SCRAM (the test broker
//! has no TLS listener here, so the Kafka side is checked up to the handshake).

use std::time::Duration;

use kurier::Message;
use kurier_test_support::*;

/// DATABASE_URL's database at `host` over `sslmode=verify-full`, trusting the server's own certificate.
async fn tls_url(db: &TestDb, host: &str) -> String {
    let ssl: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        ssl, "on",
        "PostgreSQL at DATABASE_URL has ssl = off; this test needs TLS on (Debian's default, with the snakeoil certificate)"
    );
    let cert: String = sqlx::query_scalar("SHOW ssl_cert_file")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let mut url = url::Url::parse(&db.url).unwrap();
    url.set_host(Some(host)).unwrap();
    url.query_pairs_mut()
        .append_pair("sslmode", "verify-full")
        .append_pair("sslrootcert", &cert);
    url.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tls_with_a_verified_server_certificate() {
    let db = fresh_db().await;
    let brokers = brokers();
    let url = tls_url(&db, "localhost").await; // the name in the certificate
    let topic = unique("tls");
    create_topic(&brokers, &topic, 1).await;
    let id = kurier::enqueue(
        &db.pool,
        &Message::json(&topic, serde_json::json!({"tls": true})),
    )
    .await
    .unwrap();
    let daemon = start_in_process(config(&url, &brokers, "")).await;
    let recs = tokio::task::spawn_blocking({
        let (brokers, topic) = (brokers.clone(), topic.clone());
        move || read_until(&brokers, &topic, Duration::from_secs(30), |r| !r.is_empty())
    })
    .await
    .unwrap();
    assert_eq!(recs[0].message_id(), id.to_string());
    // The relay's own sessions are encrypted.
    let encrypted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE s.ssl AND a.datname = current_database() AND a.pid <> pg_backend_pid()",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    daemon.stop().await;
    assert!(encrypted >= 1, "no TLS session from the relay");

    // verify-full checks the name too: the certificate names localhost, not
    // 127.0.0.1, so this is refused, and said so.
    let wrong = tls_url(&db, "127.0.0.1").await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kurier"))
        .arg("check")
        .env("DATABASE_URL", &wrong)
        .env("KAFKA_BROKERS", &brokers)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL  cannot connect to PostgreSQL"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sasl_ssl_settings_are_understood_and_failures_name_the_fix() {
    let db = fresh_db().await;
    let props = "security.protocol=SASL_SSL,sasl.mechanisms=SCRAM-SHA-512,\
                 sasl.username=kurier,sasl.password=pw-never-printed,ssl.ca.location=/etc/ssl/certs/ca-certificates.crt";
    let cfg = kurier_daemon::config::Config::from_toml(
        "",
        &[
            ("DATABASE_URL".to_string(), db.url.clone()),
            ("KAFKA_BROKERS".to_string(), brokers()),
            ("KURIER_KAFKA_PROPERTIES".to_string(), props.to_string()),
        ]
        .into_iter()
        .collect::<std::collections::BTreeMap<_, _>>(),
        &Default::default(),
    )
    .unwrap();
    // librdkafka refuses SASL_SSL at creation when built without OpenSSL/SCRAM.
    kurier_daemon::kafka::Publisher::new(&cfg.kafka, None)
        .unwrap_or_else(|e| panic!("the build lacks SASL_SSL support: {e}"));
    // Against the plaintext test broker the handshake fails: check says where to look.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kurier"))
        .arg("check")
        .env("DATABASE_URL", &db.url)
        .env("KAFKA_BROKERS", brokers())
        .env("KURIER_KAFKA_PROPERTIES", props)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL  cannot reach Kafka")
            && stdout.contains("security.protocol / sasl.* / ssl.*"),
        "{stdout}"
    );
    assert!(!stdout.contains("pw-never-printed") && !stderr.contains("pw-never-printed"));
}
