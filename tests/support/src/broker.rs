//! Topics on the real broker.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

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

/// Creates a topic named `<prefix>-<uuid>` and returns its name.
pub async fn new_topic(brokers: &str, prefix: &str, partitions: i32) -> String {
    let topic = crate::env::unique(prefix);
    create_topic(brokers, &topic, partitions).await;
    topic
}
