//! Metadata requests: is the cluster there, and which topics does it know.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::client::Client;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientContext;

use super::context::Context;
use super::{client_config, KafkaConfig, Role};

/// Whether the cluster answers a metadata request within 2 s (blocking).
pub fn answers<C: ClientContext>(client: &Client<C>) -> bool {
    client.fetch_metadata(None, Duration::from_secs(2)).is_ok()
}

/// What `kurier check` learns from one metadata request.
#[derive(Debug, Clone)]
pub struct Metadata {
    pub brokers: usize,
    pub topics: Vec<String>,
}

/// Asks the cluster for its brokers and topics (blocking, at most 10 s).
pub fn metadata(cfg: &KafkaConfig) -> Result<Metadata, String> {
    let probe: BaseConsumer<Context> = client_config(cfg, Role::Probe, &BTreeMap::new(), None)
        .create_with_context(Context::default())
        .map_err(|e| e.to_string())?;
    let md = probe
        .client()
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    Ok(Metadata {
        brokers: md.brokers().len(),
        topics: md.topics().iter().map(|t| t.name().to_owned()).collect(),
    })
}

/// Creates those of `topics` that do not exist yet (`partitions` each,
/// replication factor 1 where the cluster allows; its default otherwise).
/// Returns the topics created. Needs the CreateTopics right.
pub async fn ensure_topics(
    cfg: &KafkaConfig,
    topics: &[String],
    partitions: i32,
) -> Result<Vec<String>, String> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::types::RDKafkaErrorCode;
    let admin: AdminClient<Context> = client_config(cfg, Role::Probe, &BTreeMap::new(), None)
        .create_with_context(Context::default())
        .map_err(|e| e.to_string())?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(-1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(&new, &options)
        .await
        .map_err(|e| e.to_string())?;
    let mut created = Vec::new();
    for r in results {
        match r {
            Ok(topic) => created.push(topic),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(format!("cannot create topic {topic}: {code}")),
        }
    }
    Ok(created)
}
