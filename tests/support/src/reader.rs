//! Reading back what reached the broker, without a consumer group
//! (`assign()`), so verification never waits for a rebalance.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::env::unique;

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

/// Reads `total` records of `topic` from the beginning of every partition,
/// as fast as they come (fetch wait 5 ms), calling `seen` with each
/// record's `message-id`; returns records per second. Panics when fewer
/// arrive within 10 minutes.
pub fn consume(brokers: &str, topic: &str, total: usize, mut seen: impl FnMut(String)) -> f64 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("kurier-consume"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()
        .expect("consumer");
    let parts = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata")
        .topics()[0]
        .partitions()
        .len();
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts as i32 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("tpl");
    }
    c.assign(&tpl).expect("assign");
    let (mut n, t, deadline) = (0, Instant::now(), Instant::now() + Duration::from_secs(600));
    while n < total && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            let id = m
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "message-id"))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            seen(id);
            n += 1;
        }
    }
    assert_eq!(n, total, "consumer read {n} of {total} records of {topic}");
    n as f64 / t.elapsed().as_secs_f64()
}
