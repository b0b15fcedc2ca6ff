//! The inbox writer's consumer. SPEC guarantee 5 rests on the split here:
//! `enable.auto.offset.store=false` (enforced by [`client_config`]), so an
//! offset is stored only by [`InboxConsumer::store_offsets`], which the
//! writer calls after the batch's database transaction committed;
//! librdkafka's auto-commit and the commit on rebalance then commit only
//! stored offsets.

use std::collections::BTreeMap;
use std::sync::Arc;

use kurier::inbox::NewMessage;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::context::Context;
use super::{client_config, ClientError, KafkaConfig, Role};

/// A consumer-group member that hands out owned copies of its records.
pub struct InboxConsumer {
    consumer: Arc<StreamConsumer<Context>>,
    /// Headers tried in order for the message ID.
    id_headers: Vec<String>,
}

impl InboxConsumer {
    /// Joins consumer group `group` and subscribes to `topics`.
    pub fn subscribe(
        cfg: &KafkaConfig,
        group: &str,
        properties: &BTreeMap<String, String>,
        topics: &[String],
        id_headers: Vec<String>,
    ) -> Result<Self, ClientError> {
        let consumer: StreamConsumer<Context> =
            client_config(cfg, Role::InboxConsumer, properties, Some(group))
                .create_with_context(Context::default())?;
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(InboxConsumer {
            consumer: Arc::new(consumer),
            id_headers,
        })
    }

    /// The next record, copied out of librdkafka's buffer.
    pub async fn recv(&self) -> Result<NewMessage, ClientError> {
        let m = self.consumer.recv().await?;
        Ok(self.copy(&m))
    }

    fn copy(&self, m: &BorrowedMessage<'_>) -> NewMessage {
        let headers = m.headers();
        let from_header = self.id_headers.iter().find_map(|name| {
            headers
                .and_then(|h| h.iter().find(|h| h.key == name))
                .and_then(|h| h.value)
                .and_then(|v| std::str::from_utf8(v).ok())
                .map(str::to_owned)
        });
        NewMessage {
            message_id: from_header
                .unwrap_or_else(|| format!("{}/{}/{}", m.topic(), m.partition(), m.offset())),
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers: headers_json(m),
        }
    }

    /// Marks `batch` consumed (the next offset of each partition): call only
    /// after its database transaction committed.
    pub fn store_offsets(&self, batch: &[NewMessage]) {
        let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        for m in batch {
            let e = next.entry((m.topic.as_str(), m.partition)).or_insert(0);
            *e = (*e).max(m.offset + 1);
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in next {
            let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(offset));
        }
        // Fails for partitions revoked meanwhile; their new owner re-reads from the
        // last commit and the inbox drops the duplicates.
        if let Err(e) = self.consumer.store_offsets(&tpl) {
            tracing::debug!(error = %e, "could not store some offsets (partition revoked?)");
        }
    }

    /// Commits the stored offsets now (at shutdown).
    pub fn commit(&self) {
        if let Err(e) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(error = %e, "final offset commit (nothing stored?)");
        }
    }

    /// Whether an error with this text should be logged now (once per
    /// [`super::context::QUIET_FOR`]), like librdkafka's own.
    pub fn first_in_a_while(&self, error: &str) -> bool {
        self.consumer.context().first_in_a_while(error).is_some()
    }

    /// A blocking check that the cluster answers (for readiness while idle).
    pub fn reachability(&self) -> impl FnOnce() -> bool + Send + 'static {
        let consumer = Arc::clone(&self.consumer);
        move || super::cluster::answers(consumer.client())
    }
}

/// Kafka headers as a JSON object: UTF-8 values as strings, null as null,
/// other bytes as `{"hex": "..."}`. A repeated header name keeps its last value.
fn headers_json(m: &BorrowedMessage<'_>) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    if let Some(headers) = m.headers() {
        for h in headers.iter() {
            let v = match h.value {
                None => serde_json::Value::Null,
                Some(bytes) => match std::str::from_utf8(bytes) {
                    Ok(s) => serde_json::Value::String(s.to_owned()),
                    Err(_) => {
                        serde_json::json!({ "hex": bytes.iter().map(|b| format!("{b:02x}")).collect::<String>() })
                    }
                },
            };
            map.insert(h.key.to_owned(), v);
        }
    }
    serde_json::Value::Object(map)
}
