//! Writers standing in for services: concurrent transactions through
//! `kurier::enqueue` (some rolled back), and plain producers.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

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

/// Sends a copy of `rec` to `topic` (its key, value and headers), with
/// `message-id` replaced when `new_id` is given; waits for the ack.
pub async fn resend(
    p: &rdkafka::producer::FutureProducer,
    topic: &str,
    rec: &crate::reader::Rec,
    new_id: Option<&str>,
) {
    use rdkafka::message::{Header, OwnedHeaders};
    let mut headers = OwnedHeaders::new();
    for (k, v) in &rec.headers {
        let value = match (k.as_str(), new_id) {
            ("message-id", Some(id)) => Some(id.as_bytes()),
            _ => v.as_deref(),
        };
        headers = headers.insert(Header { key: k, value });
    }
    let mut out: rdkafka::producer::FutureRecord<'_, str, [u8]> =
        rdkafka::producer::FutureRecord::to(topic).headers(headers);
    if let Some(k) = &rec.key {
        out = out.key(k.as_str());
    }
    if let Some(v) = &rec.value {
        out = out.payload(v.as_slice());
    }
    p.send(out, Duration::from_secs(30))
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
}
