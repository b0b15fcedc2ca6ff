//! Kurier: a transactional outbox for PostgreSQL and Kafka.
//!
//! # Layout
//! - [`outbox`]: the outbox table's Rust face: [`outbox::Message`], [`outbox::enqueue`]
//!   for services, and the relay's claim / finish queries.
//! - [`relay`]: the loop that moves outbox rows to Kafka (claim → publish →
//!   delivery report → delete), with retries and dead letters.
//! - [`dead_letter`]: rows that cannot be published: moved aside with their reason;
//!   listed, retried or discarded by operators (`kurier dead-letters`).
//! - [`publisher`]: the Kafka producer, the row → record mapping and error classes.
//! - [`lease`]: which relay instance may publish (one active owner, fenced by its connection).
//! - [`inbox`]: the inbox table: [`inbox::Processor`] runs handlers exactly once per
//!   message ID, [`inbox::record_message`] dedups for services that consume Kafka themselves.
//! - [`inbox_writer`]: the daemon's Kafka → inbox consumer (offsets after the DB commit).
//! - [`schema`]: `kurier migrate`.
//! - [`daemon`]: wires relay, HTTP endpoints and shutdown; runnable in-process.
//! - [`check`], [`status`]: `kurier check` and `kurier status`.
//! - [`http`], [`health`], [`telemetry`], [`config`], [`redact`], [`error`]: the edges.
//!
//! See ARCHITECTURE.md for the data flow and where each guarantee is enforced.

pub mod check;
pub mod config;
pub mod daemon;
pub mod dead_letter;
pub mod debezium;
pub mod error;
pub mod health;
pub mod http;
pub mod inbox;
pub mod inbox_writer;
pub mod lease;
pub mod outbox;
pub mod publisher;
pub mod redact;
pub mod relay;
pub mod schema;
pub mod status;
pub mod telemetry;
pub mod trace;

pub use config::Config;
pub use daemon::Daemon;
pub use error::Error;
pub use outbox::{enqueue, Message, Payload};
