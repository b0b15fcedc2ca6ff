//! Sagas instead of two-phase commit: a business process spanning services
//! as a sequence of local transactions, each step a command through the
//! outbox and a reply through the inbox, with compensating steps run in
//! reverse order when a step fails. The state machine is SQL
//! (`migrations/0006_sagas.sql`), so a service in any language starts a saga
//! with `SELECT kurier.start_saga(...)` in its own transaction and a
//! participant in any language answers through its outbox; the `kurier`
//! daemon applies replies and fires timeouts.
//!
//! - [`define`] and [`start`]: the application's side, on any executor (start
//!   inside the transaction that makes the decision);
//! - [`participant`]: a participant's side, exactly once per step;
//! - [`store`]: every saga query, also the daemon's and the operator's.

pub mod participant;
pub mod store;

use serde::Serialize;
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::error::Error;
use crate::schema::SchemaName;

pub use store::{Saga, SagaEvent};

/// One step of a saga type, as `kurier.define_saga` takes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    pub name: String,
    pub command_topic: String,
    /// The topic of its undo; `None`: the step needs no compensation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compensation_topic: Option<String>,
    /// How long a command or compensation waits for its reply (default 30 s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Attempts before a command gives up (compensation starts) or a
    /// compensation gives up (the saga is parked); default 3.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Base of the capped exponential backoff between compensation retries
    /// (default 1 s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_backoff_ms: Option<u64>,
}

impl Step {
    pub fn new(name: impl Into<String>, command_topic: impl Into<String>) -> Self {
        Step {
            name: name.into(),
            command_topic: command_topic.into(),
            compensation_topic: None,
            timeout_ms: None,
            max_attempts: None,
            retry_backoff_ms: None,
        }
    }

    /// The topic that undoes this step.
    pub fn compensate_on(mut self, topic: impl Into<String>) -> Self {
        self.compensation_topic = Some(topic.into());
        self
    }

    pub fn timeout_ms(mut self, ms: u64) -> Self {
        self.timeout_ms = Some(ms);
        self
    }

    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    pub fn retry_backoff_ms(mut self, ms: u64) -> Self {
        self.retry_backoff_ms = Some(ms);
        self
    }
}

/// Registers (or idempotently re-registers) saga type `saga_type`; the reply
/// topic defaults to `saga.<saga_type>.replies`. Refused with a message
/// naming the problem when a step is invalid, or when the steps change while
/// sagas of the type are active.
pub async fn define<'e, E: PgExecutor<'e>>(
    executor: E,
    schema: &SchemaName,
    saga_type: &str,
    steps: &[Step],
    reply_topic: Option<&str>,
) -> Result<(), Error> {
    let steps = serde_json::to_value(steps).expect("steps serialise");
    store::define(executor, schema, saga_type, &steps, reply_topic).await
}

/// Starts saga `id` of `saga_type` with `data`, on the caller's transaction:
/// the decision and the saga's first command commit together, or not at all.
/// Starting an existing id again returns the existing saga.
pub async fn start<'e, E: PgExecutor<'e>>(
    executor: E,
    schema: &SchemaName,
    saga_type: &str,
    id: Uuid,
    data: &serde_json::Value,
) -> Result<Saga, Error> {
    store::start(executor, schema, saga_type, id, data).await
}

/// Saga headers (the contract's names).
pub mod headers {
    pub const SAGA_ID: &str = "saga-id";
    pub const SAGA_TYPE: &str = "saga-type";
    pub const SAGA_STEP: &str = "saga-step";
    pub const SAGA_REPLY_TO: &str = "saga-reply-to";
    pub const SAGA_COMPENSATION: &str = "saga-compensation";
    pub const SAGA_OUTCOME: &str = "saga-outcome";
}
