//! Prints what arrives on a topic, with partition, offset, key and headers.
//!
//!   KAFKA_BROKERS=127.0.0.1:9092 cargo run --example tail -- [TOPIC]

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::ClientConfig;

fn main() -> anyhow::Result<()> {
    let brokers =
        std::env::var("KAFKA_BROKERS").map_err(|_| anyhow::anyhow!("set KAFKA_BROKERS"))?;
    let topic = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "kurier-demo".into());
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "kurier-demo-tail")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()?;
    consumer.subscribe(&[&topic])?;
    eprintln!("tail: waiting for records on {topic} at {brokers}");
    loop {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                let headers: Vec<String> = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                format!(
                                    "{}={}",
                                    h.key,
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                println!(
                    "received {}[{}]@{} key={} value={} headers=[{}]",
                    m.topic(),
                    m.partition(),
                    m.offset(),
                    String::from_utf8_lossy(m.key().unwrap_or_default()),
                    m.payload()
                        .map(String::from_utf8_lossy)
                        .unwrap_or("<tombstone>".into()),
                    headers.join(", ")
                );
            }
            Some(Err(e)) => eprintln!("tail: {e}"),
            None => {}
        }
    }
}
