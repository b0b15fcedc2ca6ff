//! Kurier's SQL contract, as a Rust service links it: write to the outbox in
//! your own transaction, consume the inbox exactly once, apply the schema.
//! Everything here is plain SQL underneath (`migrations/`), so services in
//! other languages use the same tables; the `kurier` daemon (crate
//! `kurier-daemon`) does the Kafka side. This crate knows nothing about
//! Kafka, HTTP or config files.
//!
//! # Layout
//! - [`outbox`]: [`Message`] and [`enqueue`] on the caller's transaction;
//!   [`outbox::store`] holds every query on the outbox tables (the relay's
//!   claim and finish, leases, dead letters, backlog counts).
//! - [`events`]: the event store ([`events::EventStore`], aggregates,
//!   typed events with upcasters, snapshots, erasure, crypto-shredding);
//!   [`events::store`] holds every event-store query.
//! - [`inbox`]: [`inbox::record_message`] for services that consume Kafka
//!   themselves, [`inbox::Processor`] for rows the daemon stored;
//!   [`inbox::store`] holds every query on the inbox tables.
//! - [`projection`]: read models fed from the event store, checkpointed in
//!   the same transaction ([`projection::Projection`],
//!   [`projection::ProjectionRunner`]); [`projection::store`] holds every
//!   projection query.
//! - [`saga`]: sagas with compensation: [`saga::define`], [`saga::start`] in
//!   the application's transaction, [`saga::participant`] for the services
//!   that take part; [`saga::store`] holds every saga query.
//! - [`schema`]: validated schema names, [`schema::migrate`], and the
//!   Debezium-shape capture triggers.
//! - [`error`]: the one error type of this crate.
//!
//! See ARCHITECTURE.md for the data flow and where each guarantee is enforced.

pub mod error;
pub mod events;
pub mod inbox;
mod names;
pub mod outbox;
pub mod projection;
pub mod saga;
pub mod schema;

pub use error::Error;
pub use outbox::{enqueue, Message, Payload};
pub use schema::SchemaName;
