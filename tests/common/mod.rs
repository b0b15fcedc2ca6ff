//! Test harness: a real PostgreSQL (`DATABASE_URL`) and a real Kafka-protocol
//! broker (`KAFKA_BROKERS`); `make test` provides both. Nothing is mocked.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kurier::config::{Config, Overrides};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

pub fn required_env(name: &str, what: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!("{name} is not set: these tests need {what}. Run `make test`, which starts them, or set {name} yourself."),
    }
}

pub fn database_url() -> String {
    required_env(
        "DATABASE_URL",
        "a real PostgreSQL server, e.g. postgres://postgres@127.0.0.1:5432/postgres",
    )
}

pub fn brokers() -> String {
    required_env(
        "KAFKA_BROKERS",
        "a real Kafka-protocol broker, e.g. 127.0.0.1:9092",
    )
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// A fresh database for one test, migrated, so tests never share an outbox.
pub struct TestDb {
    pub url: String,
    pub pool: PgPool,
}

pub async fn fresh_db() -> TestDb {
    let url = fresh_empty_db().await;
    kurier::schema::migrate(&url, &[]).await.expect("migrate");
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect(&url)
        .await
        .expect("connect test db");
    TestDb { url, pool }
}

pub async fn fresh_empty_db() -> String {
    let base = database_url();
    let name = format!("kurier_test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&base)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to DATABASE_URL: {e}"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create database");
    let mut url = url::Url::parse(&base).expect("DATABASE_URL is a URL");
    url.set_path(&name);
    url.to_string()
}

pub fn config(db_url: &str, brokers: &str, extra_toml: &str) -> Config {
    let env: BTreeMap<String, String> = [
        ("DATABASE_URL".to_string(), db_url.to_string()),
        ("KAFKA_BROKERS".to_string(), brokers.to_string()),
    ]
    .into();
    Config::from_toml(extra_toml, &env, &Overrides::default()).expect("test config")
}

/// The daemon, in-process.
pub struct InProcess {
    pub cancel: CancellationToken,
    pub handle: tokio::task::JoinHandle<Result<(), kurier::Error>>,
}

pub async fn start_in_process(config: Config) -> InProcess {
    let daemon = kurier::Daemon::bind(config).await.expect("bind");
    let cancel = CancellationToken::new();
    let handle = tokio::spawn(daemon.run(cancel.clone()));
    InProcess { cancel, handle }
}

impl InProcess {
    pub async fn stop(self) {
        self.cancel.cancel();
        self.handle
            .await
            .expect("daemon task")
            .expect("daemon result");
    }
}

/// The `kurier` binary as a child process (for SIGKILL / SIGTERM tests).
pub fn spawn_binary(args: &[&str], env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kurier"));
    cmd.args(args)
        .env_remove("KURIER_CONFIG")
        .env(
            "RUST_LOG",
            std::env::var("KURIER_TEST_CHILD_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn kurier")
}

pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{sig} failed");
}

pub fn admin(brokers: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client")
}

pub async fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let results = admin(brokers)
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create_topics");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
}

/// One record as read back from the broker.
#[derive(Debug, Clone)]
pub struct Rec {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Rec {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| std::str::from_utf8(v).expect("utf-8 header"))
    }
    pub fn message_id(&self) -> &str {
        self.header("message-id")
            .unwrap_or_else(|| panic!("record without message-id header: {self:?}"))
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(self.value.as_deref().expect("value")).expect("JSON value")
    }
}

/// Reads a topic from the beginning of every partition (no consumer group)
/// until `done(records)` holds; panics after `timeout` with what was read.
pub fn read_until(
    brokers: &str,
    topic: &str,
    timeout: Duration,
    mut done: impl FnMut(&[Rec]) -> bool,
) -> Vec<Rec> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("kurier-test-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let partitions = md.topics()[0].partitions().len();
    assert!(partitions > 0, "topic {topic} has no partitions");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while !done(&out) {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} reading {topic}: {} records so far",
            out.len()
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => out.push(Rec {
                partition: m.partition(),
                offset: m.offset(),
                key: m
                    .key()
                    .map(|k| String::from_utf8(k.to_vec()).expect("utf-8 key")),
                value: m.payload().map(<[u8]>::to_vec),
                headers: m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default(),
            }),
            Some(Err(e)) => panic!("consumer error on {topic}: {e}"),
            None => {}
        }
    }
    out
}

/// Reads until every ID in `ids` has been seen, then a short extra while
/// (so that late phantoms or duplicates would show up too).
pub fn read_ids(
    brokers: &str,
    topic: &str,
    ids: &std::collections::HashSet<String>,
    timeout: Duration,
) -> Vec<Rec> {
    let mut complete_at: Option<Instant> = None;
    let mut missing = ids.clone();
    let mut processed = 0;
    read_until(brokers, topic, timeout, |recs| {
        for r in &recs[processed..] {
            missing.remove(r.message_id());
        }
        processed = recs.len();
        if complete_at.is_none() && missing.is_empty() {
            complete_at = Some(Instant::now());
        }
        complete_at.is_some_and(|t| t.elapsed() > Duration::from_secs(1))
    })
}

pub async fn outbox_count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM kurier.outbox")
        .fetch_one(pool)
        .await
        .expect("count")
}

pub async fn wait_drained(pool: &PgPool, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let n = outbox_count(pool).await;
        if n == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "outbox not drained after {timeout:?}: {n} rows left"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Kafka's Java client `Utils.murmur2`, written from its specification, for
/// checking partitions independently of librdkafka.
pub fn murmur2(data: &[u8]) -> i32 {
    let m: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(m);
        k ^= k >> 24;
        k = k.wrapping_mul(m);
        h = h.wrapping_mul(m);
        h ^= k;
    }
    if tail.len() >= 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(m);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(m);
    h ^= h >> 15;
    h as i32
}

/// The Java client's default partition for a keyed record.
pub fn java_partition(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions
}

/// Checks per-key order: for each key, the first copies of its messages
/// appear in the order given by `seq` (a field of the JSON value).
pub fn assert_per_key_order(recs: &[Rec], expected: &BTreeMap<String, Vec<i64>>) {
    let mut sorted: Vec<&Rec> = recs.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    let mut seen = std::collections::HashSet::new();
    let mut got: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in sorted {
        if seen.insert(r.message_id().to_owned()) {
            let seq = r.json()["seq"].as_i64().expect("seq");
            got.entry(r.key.clone().expect("key"))
                .or_default()
                .push(seq);
        }
    }
    for (key, want) in expected {
        let have = got.get(key).cloned().unwrap_or_default();
        assert_eq!(
            &have, want,
            "key {key}: first copies out of order or missing"
        );
    }
    assert_eq!(
        got.len(),
        expected.len(),
        "records for keys nobody committed"
    );
}

/// What concurrent writers committed: every message ID, and per key the
/// sequence numbers in commit order.
#[derive(Default, Debug)]
pub struct Committed {
    pub ids: std::collections::HashSet<String>,
    pub order: BTreeMap<String, Vec<i64>>,
    pub rolled_back: std::collections::HashSet<String>,
}

impl Committed {
    fn merge(&mut self, other: Committed) {
        self.ids.extend(other.ids);
        self.order.extend(other.order);
        self.rolled_back.extend(other.rolled_back);
    }
}

/// `writers` tasks, each owning `keys` keys, each writing `txs` transactions of
/// 1-3 rows through the library's `enqueue`; `rollback` of them roll back.
/// Stops early when `stop` fires.
/// `pace` is a pause after each transaction (zero = as fast as possible).
#[allow(clippy::too_many_arguments)]
pub async fn write_concurrently(
    pool: &PgPool,
    topic: &str,
    writers: usize,
    txs: usize,
    keys: usize,
    rollback: f64,
    pace: Duration,
    stop: CancellationToken,
) -> Committed {
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (pool, topic, stop) = (pool.clone(), topic.to_owned(), stop.clone());
        tasks.push(tokio::spawn(async move {
            writer(pool, topic, w, txs, keys, rollback, pace, stop).await
        }));
    }
    let mut all = Committed::default();
    for t in tasks {
        all.merge(t.await.expect("writer task"));
    }
    all
}

#[allow(clippy::too_many_arguments)]
async fn writer(
    pool: PgPool,
    topic: String,
    w: usize,
    txs: usize,
    keys: usize,
    rollback: f64,
    pace: Duration,
    stop: CancellationToken,
) -> Committed {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let mut out = Committed::default();
    let mut seq: BTreeMap<String, i64> = BTreeMap::new();
    for _ in 0..txs {
        if stop.is_cancelled() {
            break;
        }
        let mut tx = pool.begin().await.expect("begin");
        let mut rows = Vec::new();
        for _ in 0..rng.random_range(1..=3) {
            let key = format!("w{w}-k{}", rng.random_range(0..keys));
            let s = seq.entry(key.clone()).or_default();
            *s += 1;
            let msg = kurier::Message::json(
                &topic,
                serde_json::json!({"key": key, "seq": *s, "pad": "x".repeat(64)}),
            )
            .key(&key);
            let id = kurier::enqueue(&mut *tx, &msg).await.expect("enqueue");
            rows.push((key, *s, id.to_string()));
        }
        if rng.random_bool(rollback) {
            tx.rollback().await.expect("rollback");
            // Rolled-back sequence numbers are simply never published.
            out.rolled_back.extend(rows.into_iter().map(|r| r.2));
        } else {
            tx.commit().await.expect("commit");
            for (key, s, id) in rows {
                out.order.entry(key).or_default().push(s);
                out.ids.insert(id);
            }
        }
        if !pace.is_zero() {
            tokio::time::sleep(pace).await;
        }
    }
    out
}

/// Every committed ID present, no rolled-back or unknown ID, copies identical,
/// per-key order kept.
pub fn assert_delivered_exactly(recs: &[Rec], committed: &Committed) {
    let mut copies: BTreeMap<&str, &Rec> = BTreeMap::new();
    let mut duplicates = 0;
    for r in recs {
        let id = r.message_id();
        assert!(
            !committed.rolled_back.contains(id),
            "phantom: rolled-back message {id} was published"
        );
        assert!(
            committed.ids.contains(id),
            "phantom: unknown message {id} was published: {r:?}"
        );
        if let Some(first) = copies.insert(id, r) {
            duplicates += 1;
            assert_eq!(
                (&first.key, &first.value),
                (&r.key, &r.value),
                "duplicate of {id} differs"
            );
        }
    }
    let missing: Vec<&String> = committed
        .ids
        .iter()
        .filter(|id| !copies.contains_key(id.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "lost {} committed messages, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_per_key_order(recs, &committed.order);
    eprintln!(
        "checked {} committed messages: {} records read, {duplicates} duplicates (same message-id)",
        committed.ids.len(),
        recs.len()
    );
}

/// A plain producer, standing in for another service (no Kurier involved).
pub fn plain_producer(brokers: &str) -> rdkafka::producer::FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

/// Sends `value` with an optional `message-id` header and waits for the ack.
pub async fn send_plain(
    p: &rdkafka::producer::FutureProducer,
    topic: &str,
    key: &str,
    value: &[u8],
    message_id: Option<&str>,
) {
    use rdkafka::message::{Header, OwnedHeaders};
    let mut rec = rdkafka::producer::FutureRecord::to(topic)
        .key(key)
        .payload(value);
    if let Some(id) = message_id {
        rec = rec.headers(OwnedHeaders::new().insert(Header {
            key: "message-id",
            value: Some(id),
        }));
    }
    p.send(rec, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
}

pub async fn inbox_count(pool: &PgPool, consumer: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM kurier.inbox WHERE consumer = $1")
        .bind(consumer)
        .fetch_one(pool)
        .await
        .expect("count")
}

/// Waits until the inbox writer has seen `total` records (stored + dropped duplicates).
pub async fn wait_inbox_seen(
    pool: &PgPool,
    consumer: &str,
    total: i64,
    timeout: Duration,
) -> (i64, i64) {
    let deadline = Instant::now() + timeout;
    loop {
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT received, duplicates FROM kurier.inbox_stats WHERE consumer = $1",
        )
        .bind(consumer)
        .fetch_optional(pool)
        .await
        .expect("stats");
        let (r, d) = row.unwrap_or((0, 0));
        if r + d >= total {
            return (r, d);
        }
        assert!(
            Instant::now() < deadline,
            "inbox writer saw {} of {total} records within {timeout:?}",
            r + d
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts one row per expected ID for `consumer`, none missing, none extra.
pub async fn assert_inbox_exactly(
    pool: &PgPool,
    consumer: &str,
    ids: &std::collections::HashSet<String>,
) {
    let stored: Vec<String> =
        sqlx::query_scalar("SELECT message_id FROM kurier.inbox WHERE consumer = $1")
            .bind(consumer)
            .fetch_all(pool)
            .await
            .expect("ids");
    let unique: std::collections::HashSet<&String> = stored.iter().collect();
    assert_eq!(unique.len(), stored.len(), "an ID is stored twice");
    let missing = ids.iter().filter(|id| !unique.contains(id)).count();
    assert_eq!(missing, 0, "{missing} message IDs missing from the inbox");
    assert_eq!(
        stored.len(),
        ids.len(),
        "unexpected extra rows in the inbox"
    );
}

/// The status code of `GET path` on the daemon's HTTP listener.
pub async fn http_status(addr: std::net::SocketAddr, path: &str) -> u16 {
    http_get(addr, path).await.0
}

/// Status code and body of a GET.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the daemon's HTTP port");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}
