//! A saga participant's side: handle a command exactly once and answer
//! through the outbox in the same transaction as the participant's own
//! changes.
//!
//! A participant's daemon stores commands in its inbox (deduplicated by
//! message ID, which is the same on every resend of one attempt). A command
//! that timed out is sent again as a new attempt with a new message ID, so
//! the inbox alone would run a slow participant's step twice; this module
//! also records the step itself — `saga:<saga-id>:<step>:<command|compensation>`
//! in the inbox's dedup key — and runs the effect only the first time. The
//! reply of that first time is in the outbox and reaches the saga (at least
//! once), so a later attempt is not answered again. A refusal
//! ([`Reply::Failure`]) changed nothing, so its record is removed again and a
//! later attempt (a compensation retried after a failure) runs anew.
//!
//! Other languages do the same in SQL, in the transaction that handles the
//! command (see README "Sagas"):
//! `INSERT INTO kurier.inbox (consumer, message_id, processed_at, attempts)
//!  VALUES ($consumer, 'saga:' || $saga_id || ':' || $step || ':' || $phase, now(), 1)
//!  ON CONFLICT DO NOTHING RETURNING id` — no row: done before, skip — then the
//! effect (on a refusal, `DELETE` that record again), then `INSERT INTO
//! kurier.outbox` of the reply.

use futures::future::BoxFuture;
use sqlx::PgConnection;
use uuid::Uuid;

use super::headers as h;
use crate::error::Error;
use crate::inbox::{store as inbox_store, Handler, HandlerError, InboxMessage};
use crate::outbox::{enqueue_into, Message};
use crate::schema::SchemaName;

/// A saga command as the participant received it.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaCommand {
    pub saga_id: Uuid,
    pub saga_type: String,
    /// The step's name.
    pub step: String,
    /// Where the reply goes.
    pub reply_to: String,
    /// An undo of the step, not the step itself.
    pub compensation: bool,
    /// The saga's data (the record's value).
    pub data: serde_json::Value,
}

impl SagaCommand {
    /// Reads the saga headers and the JSON value of an inbox row.
    pub fn from_inbox(msg: &InboxMessage) -> Result<SagaCommand, Error> {
        let header = |name: &str| {
            msg.headers[name]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| {
                    Error::InvalidMessage(format!(
                    "inbox row {} (message {}) is not a saga command: header `{name}` is missing",
                    msg.id, msg.message_id
                ))
                })
        };
        let saga_id = header(h::SAGA_ID)?;
        let saga_id = Uuid::parse_str(&saga_id).map_err(|e| {
            Error::InvalidMessage(format!("header `saga-id` `{saga_id}` is not a UUID: {e}"))
        })?;
        let data = msg.json().map_err(|e| {
            Error::InvalidMessage(format!(
                "saga {saga_id}: the command's value is not JSON: {e}"
            ))
        })?;
        Ok(SagaCommand {
            saga_id,
            saga_type: header(h::SAGA_TYPE)?,
            step: header(h::SAGA_STEP)?,
            reply_to: header(h::SAGA_REPLY_TO)?,
            compensation: msg.headers[h::SAGA_COMPENSATION].as_str() == Some("true"),
            data,
        })
    }

    /// The inbox dedup key of this step (the same for every attempt).
    pub fn step_key(&self) -> String {
        let phase = if self.compensation {
            "compensation"
        } else {
            "command"
        };
        format!("saga:{}:{}:{phase}", self.saga_id, self.step)
    }

    /// The reply message (to `saga-reply-to`, keyed by the saga id). A
    /// [`Reply::Later`] gives a message the saga ignores: reply with a
    /// success or failure instead.
    pub fn reply(&self, reply: &Reply) -> Message {
        let (outcome, value) = match reply {
            Reply::Success(v) => ("success", v),
            Reply::Failure(v) => ("failure", v),
            Reply::Later => ("later", &None),
        };
        let value = value.clone().unwrap_or_else(|| serde_json::json!({}));
        let mut msg = Message::json(&self.reply_to, value)
            .key(self.saga_id.to_string())
            .header(h::SAGA_ID, self.saga_id.to_string())
            .header(h::SAGA_TYPE, &self.saga_type)
            .header(h::SAGA_STEP, &self.step)
            .header(h::SAGA_OUTCOME, outcome);
        if self.compensation {
            msg = msg.header(h::SAGA_COMPENSATION, "true");
        }
        msg
    }
}

/// A participant's answer. A success's JSON object is merged into the
/// saga's data for the later steps (ignored for compensations).
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Success(Option<serde_json::Value>),
    Failure(Option<serde_json::Value>),
    /// The step is taken on and will be answered later (enqueue
    /// [`SagaCommand::reply`] then); until then the saga waits, and times out.
    Later,
}

/// What a participant does for a command, on the transaction that will also
/// hold the dedup record and the reply. An `Err` rolls all three back and
/// the command is retried (it is not a business failure: answer those with
/// [`Reply::Failure`]).
pub trait Participant: Send + Sync {
    fn handle<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        command: &'a SagaCommand,
    ) -> BoxFuture<'a, Result<Reply, HandlerError>>;
}

/// Whether [`handle_once`] ran the step or had already done so.
#[derive(Debug, Clone, PartialEq)]
pub enum Handled {
    /// The effect ran and this reply was enqueued.
    Ran(Reply),
    /// An earlier attempt of this step was handled (its reply is on its way).
    Duplicate,
}

/// Handles `command` once per (saga, step, phase) for `consumer`: records the
/// step, runs `participant`, and enqueues its reply into the outbox of
/// `schema`, all on `conn` (the caller's transaction).
pub async fn handle_once<P: Participant + ?Sized>(
    conn: &mut PgConnection,
    schema: &SchemaName,
    consumer: &str,
    command: &SagaCommand,
    participant: &P,
) -> Result<Handled, HandlerError> {
    let key = command.step_key();
    // A concurrent attempt of the same step waits here for this transaction.
    if !inbox_store::record(&mut *conn, schema, consumer, &key).await? {
        return Ok(Handled::Duplicate);
    }
    let reply = participant.handle(&mut *conn, command).await?;
    if let Reply::Failure(_) = reply {
        // A refusal changed nothing: a later attempt (a compensation retried
        // after a failure) must run again.
        inbox_store::forget(&mut *conn, schema, consumer, &key).await?;
    }
    if reply != Reply::Later {
        enqueue_into(&mut *conn, schema, &command.reply(&reply)).await?;
    }
    Ok(Handled::Ran(reply))
}

/// An inbox [`Handler`] for [`crate::inbox::Processor`]: each claimed inbox
/// row is a saga command handled with [`handle_once`] in the processor's
/// transaction (which also marks the row processed).
pub struct CommandHandler<P> {
    pub schema: SchemaName,
    /// The inbox consumer name (the dedup scope).
    pub consumer: String,
    pub participant: P,
}

impl<P: Participant> Handler for CommandHandler<P> {
    fn handle<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        msg: &'a InboxMessage,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let command = SagaCommand::from_inbox(msg)?;
            handle_once(
                conn,
                &self.schema,
                &self.consumer,
                &command,
                &self.participant,
            )
            .await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(compensation: bool) -> SagaCommand {
        SagaCommand {
            saga_id: Uuid::nil(),
            saga_type: "order".into(),
            step: "payment".into(),
            reply_to: "saga.order.replies".into(),
            compensation,
            data: serde_json::json!({}),
        }
    }

    #[test]
    fn one_dedup_key_per_step_and_phase() {
        let id = "00000000-0000-0000-0000-000000000000";
        assert_eq!(
            command(false).step_key(),
            format!("saga:{id}:payment:command")
        );
        assert_eq!(
            command(true).step_key(),
            format!("saga:{id}:payment:compensation")
        );
    }

    #[test]
    fn a_reply_carries_the_saga_headers() {
        let reply = command(true).reply(&Reply::Failure(None));
        assert_eq!(reply.topic(), "saga.order.replies");
        let headers = reply.headers();
        assert_eq!(headers["saga-outcome"], "failure");
        assert_eq!(headers["saga-compensation"], "true");
        assert_eq!(headers["saga-step"], "payment");
    }
}
