//! The event store: streams of immutable events with per-stream versions and
//! optimistic concurrency, a gap-safe global order, snapshots and erasure —
//! every append published through the outbox in the same transaction. The
//! contract is SQL (`migrations/0005_event_store.sql`: `kurier.append_event`,
//! `kurier.read_all`, …), so any language appends and reads; this module is
//! its Rust face.
//!
//! - [`EventStore`]: append with [`Expected`], read a stream, read all;
//! - [`aggregate`]: the [`Aggregate`] trait, `load` (snapshot + replay),
//!   `load_as_of`, and `execute` (load, decide, append, retry on conflicts);
//! - [`codec`]: typed events via serde, a schema version per event type and
//!   upcasters applied on read;
//! - `shredding` (feature `crypto-shredding`): fields encrypted with a key per
//!   subject; forgetting the subject makes every copy unreadable;
//! - [`store`]: every event-store query.

pub mod aggregate;
pub mod codec;
#[cfg(feature = "crypto-shredding")]
pub mod shredding;
pub mod store;

use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::error::Error;
use crate::schema::SchemaName;

pub use aggregate::{Aggregate, AsOf, Executed, Loaded};
pub use codec::DomainEvent;

/// What the stream must look like for an append to go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    /// Whatever its version (no check).
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream's last version must be this one.
    Exact(u64),
}

impl Expected {
    /// The SQL contract's `expected_version`: NULL, -1 or N.
    pub fn as_sql(self) -> Option<i64> {
        match self {
            Expected::Any => None,
            Expected::NoStream => Some(-1),
            // Beyond i64::MAX no stream can be at it: a conflict, not -1.
            Expected::Exact(n) => Some(i64::try_from(n).unwrap_or(i64::MAX)),
        }
    }
}

/// The type of the data-free event `kurier.erase_stream` appends.
pub const ERASED_MARKER: &str = "StreamErased";

/// An event's body: JSON, or bytes (Avro, Protobuf, ...).
#[derive(Debug, Clone, PartialEq)]
pub enum EventData {
    Json(serde_json::Value),
    Bytes(Vec<u8>),
}

/// An event to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub event_type: String,
    pub data: EventData,
    pub metadata: Option<serde_json::Value>,
    /// Its identity: an append retried with the same id stores no second copy.
    pub event_id: Uuid,
}

impl NewEvent {
    pub fn json(event_type: impl Into<String>, data: serde_json::Value) -> Self {
        Self::with_data(event_type, EventData::Json(data))
    }

    pub fn bytes(event_type: impl Into<String>, data: impl Into<Vec<u8>>) -> Self {
        Self::with_data(event_type, EventData::Bytes(data.into()))
    }

    fn with_data(event_type: impl Into<String>, data: EventData) -> Self {
        NewEvent {
            event_type: event_type.into(),
            data,
            metadata: None,
            event_id: Uuid::new_v4(),
        }
    }

    /// Metadata stored beside the event (a `traceparent` here reaches the
    /// Kafka record's headers).
    pub fn metadata(mut self, metadata: serde_json::Value) -> Self {
        self.metadata = Some(metadata);
        self
    }

    /// A chosen id (e.g. derived from the command, so a retried request appends once).
    pub fn event_id(mut self, id: Uuid) -> Self {
        self.event_id = id;
        self
    }
}

/// A stored event (a row of the composite type `kurier.event`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct RecordedEvent {
    pub stream: String,
    pub version: i64,
    pub global_position: i64,
    #[sqlx(rename = "type")]
    #[serde(rename = "type")]
    pub event_type: String,
    pub data: Option<serde_json::Value>,
    pub metadata: Option<serde_json::Value>,
    pub event_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub recorded_at: OffsetDateTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_bytes: Option<Vec<u8>>,
    pub category: String,
}

/// The event store of one Kurier schema, over a pool. Appends and reads
/// have `_on` twins taking an open transaction (or connection) instead, so
/// that an append commits with the caller's other writes and a read sees
/// them.
#[derive(Debug, Clone)]
pub struct EventStore {
    pool: PgPool,
    schema: SchemaName,
}

impl EventStore {
    pub fn new(pool: PgPool) -> Self {
        EventStore {
            pool,
            schema: SchemaName::kurier(),
        }
    }

    /// The event store of another Kurier schema.
    pub fn in_schema(mut self, schema: SchemaName) -> Self {
        self.schema = schema;
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn schema(&self) -> &SchemaName {
        &self.schema
    }

    /// Appends `events` to `stream` (one transaction); returns the last
    /// event's version. A mismatch with `expected` stores nothing and is
    /// [`Error::VersionConflict`].
    pub async fn append(
        &self,
        stream: &str,
        expected: Expected,
        events: &[NewEvent],
    ) -> Result<i64, Error> {
        // One statement is its own transaction: no BEGIN and COMMIT round
        // trips around it.
        if store::is_one_statement(events) {
            let mut conn = self.pool.acquire().await?;
            return self.append_on(&mut conn, stream, expected, events).await;
        }
        let mut tx = self.pool.begin().await?;
        let version = self.append_on(&mut tx, stream, expected, events).await?;
        tx.commit().await?;
        Ok(version)
    }

    /// [`EventStore::append`] on the caller's transaction.
    pub async fn append_on(
        &self,
        conn: &mut PgConnection,
        stream: &str,
        expected: Expected,
        events: &[NewEvent],
    ) -> Result<i64, Error> {
        let appended = store::append(conn, &self.schema, stream, expected, events).await;
        let label = if appended.is_ok() {
            "appended"
        } else {
            "refused"
        };
        if let Err(Error::VersionConflict { .. }) = &appended {
            metrics::counter!("kurier_events_conflicts_total").increment(1);
        }
        metrics::counter!("kurier_events_appends_total", "outcome" => label).increment(1);
        appended
    }

    /// Events of `stream` from version `from`, at most `max`, in version order.
    pub async fn read_stream(
        &self,
        stream: &str,
        from: i64,
        max: i32,
    ) -> Result<Vec<RecordedEvent>, Error> {
        store::read_stream(&self.pool, &self.schema, stream, from, max).await
    }

    /// [`EventStore::read_stream`] on the caller's transaction (its own
    /// appends included).
    pub async fn read_stream_on(
        &self,
        conn: &mut PgConnection,
        stream: &str,
        from: i64,
        max: i32,
    ) -> Result<Vec<RecordedEvent>, Error> {
        store::read_stream(conn, &self.schema, stream, from, max).await
    }

    /// [`EventStore::stream_version`] on the caller's transaction.
    pub async fn stream_version_on(
        &self,
        conn: &mut PgConnection,
        stream: &str,
    ) -> Result<Option<i64>, Error> {
        store::stream_version(conn, &self.schema, stream).await
    }

    /// `kurier.read_all` on the caller's transaction, which must be READ
    /// COMMITTED (the function refuses others: it needs a new snapshot after
    /// sampling the appenders). [`EventStore::read_all`] streams its pages
    /// and is faster.
    pub async fn read_all_on(
        &self,
        conn: &mut PgConnection,
        after: i64,
        max: i32,
        category: Option<&str>,
    ) -> Result<Vec<RecordedEvent>, Error> {
        store::read_all(conn, &self.schema, after, max, category).await
    }

    /// Events after global position `after`, at most `max`, in position
    /// order, optionally of one category: a reader that keeps the last
    /// position it saw never misses an event (see `kurier.read_all`).
    pub async fn read_all(
        &self,
        after: i64,
        max: i32,
        category: Option<&str>,
    ) -> Result<Vec<RecordedEvent>, Error> {
        store::read_all_streamed(&self.pool, &self.schema, after, max, category).await
    }

    /// The stream's last version; `None` when it does not exist.
    pub async fn stream_version(&self, stream: &str) -> Result<Option<i64>, Error> {
        store::stream_version(&self.pool, &self.schema, stream).await
    }

    /// GDPR erasure: deletes the stream's events, snapshot and unpublished
    /// outbox rows, records the erasure (no personal data), appends a
    /// data-free `StreamErased` marker and publishes a tombstone for the
    /// stream's key. Returns the events deleted.
    pub async fn erase_stream(&self, stream: &str, reason: &str) -> Result<i64, Error> {
        store::erase_stream(&self.pool, &self.schema, stream, reason).await
    }
}
