//! The `kurier` daemon: the outbox → Kafka relay, the Kafka → inbox writer,
//! the HTTP endpoints and the CLI, built on the `kurier` library (which holds
//! the schema and every query).
//!
//! # Layout
//! - [`daemon`]: [`Daemon::bind`] / [`Daemon::run`]: every loop and the HTTP
//!   server under one cancellation token; tests start it in-process.
//! - [`relay`]: one loop per schema (claim → publish → delivery report →
//!   delete), its [`lease`]s, batches and sessions.
//! - [`maintenance`]: VACUUM of the outbox where autovacuum cannot keep up.
//! - [`inbox_writer`]: Kafka → `kurier.inbox`, offsets after the commit.
//! - [`saga`]: the saga orchestrator's loops (replies in, replies applied, timers).
//! - [`projections`]: the SQL projections' runners (one per projection across instances).
//! - [`kafka`]: the only module that imports rdkafka: client settings per
//!   role, enforced properties, producer, consumer, record mapping.
//! - [`config`]: TOML + environment → a validated [`Config`], one file per section.
//! - [`http`], [`health`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`cli`], [`check`]: the command line and `kurier check`.
//! - [`error`], [`telemetry`], [`redact`], [`trace`], [`allocator`]: the edges.
//!
//! See ARCHITECTURE.md for the data flow and where each guarantee is enforced.

pub mod allocator;
pub mod check;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod error;
pub mod health;
pub mod http;
pub mod inbox_writer;
pub mod kafka;
pub mod lease;
pub mod maintenance;
pub mod projections;
pub mod redact;
pub mod relay;
pub mod saga;
pub mod telemetry;
pub mod trace;

pub use config::Config;
pub use daemon::Daemon;
pub use error::Error;
