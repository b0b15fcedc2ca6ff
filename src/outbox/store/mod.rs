//! Every query on the outbox tables (`kurier.outbox`, `dead_letters`,
//! `relay_leases`, `relay_instances`), written against schema `kurier` and
//! run in another schema with its name in place ([`SchemaName::sql`]).
//!
//! - [`claim`]: what the relay reads and how it finishes rows;
//! - [`lease`]: which relay instance may publish which partitions;
//! - [`dead_letter`]: rows set aside, and the operator's list / retry / discard;
//! - [`status`]: backlog counts for `kurier status` and `/metrics`;
//! - [`maintenance`]: dead rows, and VACUUM where autovacuum cannot reach.

pub mod claim;
pub mod dead_letter;
pub mod lease;
pub mod maintenance;
pub mod status;

use sqlx::PgExecutor;
use uuid::Uuid;

use super::{Message, Payload};
use crate::schema::SchemaName;

pub use claim::OutboxRow;

const INSERT: &str =
    "INSERT INTO kurier.outbox (message_id, topic, key, payload, payload_bytes, headers) \
     VALUES (COALESCE($1, gen_random_uuid()), $2, $3, $4, $5, $6) RETURNING message_id";

/// Inserts a validated message; returns its message ID.
pub(super) async fn insert<'e, E: PgExecutor<'e>>(
    executor: E,
    schema: &SchemaName,
    msg: &Message,
) -> Result<Uuid, sqlx::Error> {
    let (json, bytes) = match &msg.payload {
        Payload::Json(v) => (Some(v), None),
        Payload::Bytes(b) => (None, Some(b.as_slice())),
        Payload::Tombstone => (None, None),
    };
    let headers = serde_json::to_value(&msg.headers).expect("string map serialises");
    sqlx::query_scalar(&schema.sql(INSERT))
        .bind(msg.message_id)
        .bind(&msg.topic)
        .bind(&msg.key)
        .bind(json)
        .bind(bytes)
        .bind(headers)
        .fetch_one(executor)
        .await
}
