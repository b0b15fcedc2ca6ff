//! Every saga query: the contract's functions (`migrations/0006_sagas.sql`)
//! as the application, the daemon and the operator call them.

use sqlx::{PgConnection, PgExecutor, PgPool};
use uuid::Uuid;

use crate::error::Error;
use crate::schema::SchemaName;

/// A saga as operators see it (timestamps as RFC 3339 text, UTC).
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct Saga {
    pub id: Uuid,
    pub saga_type: String,
    /// running, compensating, completed, compensated, failed or parked.
    pub status: String,
    /// The step whose command (or, compensating, whose undo) is outstanding.
    pub current_step: i32,
    pub current_step_name: Option<String>,
    pub attempt: i32,
    pub data: serde_json::Value,
    pub version: i64,
    /// Why it compensates, is parked, or failed.
    pub reason: Option<String>,
    pub deadline: Option<String>,
    /// Seconds past its deadline (0 when not late or ended).
    pub overdue_secs: f64,
    pub created_at: String,
    pub updated_at: String,
    pub ended_at: Option<String>,
}

/// The columns of [`Saga`] from a `kurier.sagas` row `s` joined to its type `t`.
const SAGA_COLUMNS: &str = "s.id, s.saga_type, s.status, s.current_step, \
     t.steps -> s.current_step ->> 'name' AS current_step_name, s.attempt, s.data, s.version, s.reason, \
     to_char(s.deadline AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS deadline, \
     coalesce(greatest(extract(epoch FROM now() - s.deadline), 0), 0)::float8 AS overdue_secs, \
     to_char(s.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS created_at, \
     to_char(s.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS updated_at, \
     to_char(s.ended_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS ended_at";

/// One entry of a saga's history.
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct SagaEvent {
    pub id: i64,
    pub at: String,
    pub kind: String,
    pub step: Option<i32>,
    pub step_name: Option<String>,
    pub attempt: Option<i32>,
    pub message_id: Option<String>,
    pub detail: serde_json::Value,
}

pub async fn define<'e, E: PgExecutor<'e>>(
    executor: E,
    schema: &SchemaName,
    saga_type: &str,
    steps: &serde_json::Value,
    reply_topic: Option<&str>,
) -> Result<(), Error> {
    sqlx::query(&schema.sql("SELECT 1 FROM kurier.define_saga($1, $2, $3)"))
        .bind(saga_type)
        .bind(steps)
        .bind(reply_topic)
        .execute(executor)
        .await?;
    Ok(())
}

pub async fn start<'e, E: PgExecutor<'e>>(
    executor: E,
    schema: &SchemaName,
    saga_type: &str,
    id: Uuid,
    data: &serde_json::Value,
) -> Result<Saga, Error> {
    let sql = format!(
        "SELECT {SAGA_COLUMNS} FROM kurier.start_saga($1, $2, $3) s JOIN kurier.saga_types t USING (saga_type)"
    );
    let saga = sqlx::query_as(&schema.sql(&sql))
        .bind(saga_type)
        .bind(id)
        .bind(data)
        .fetch_one(executor)
        .await?;
    Ok(saga)
}

/// Applies one stored reply (the inbox row's headers, payload and message
/// ID) to its saga, in the caller's transaction; returns what happened
/// (`advanced`, `completed`, `compensating`, …, or `ignored: <why>`).
pub async fn apply_reply_message(
    conn: &mut PgConnection,
    schema: &SchemaName,
    headers: &serde_json::Value,
    payload: Option<&[u8]>,
    message_id: &str,
) -> Result<String, Error> {
    let outcome =
        sqlx::query_scalar(&schema.sql("SELECT kurier.saga_apply_reply_message($1, $2, $3)"))
            .bind(headers)
            .bind(payload)
            .bind(message_id)
            .fetch_one(conn)
            .await?;
    Ok(outcome)
}

/// Fires up to `max` due timers (timeouts, compensation retries); returns how many fired.
pub async fn fire_timers(pool: &PgPool, schema: &SchemaName, max: i32) -> Result<i32, Error> {
    let fired = sqlx::query_scalar(&schema.sql("SELECT kurier.saga_fire_timers($1)"))
        .bind(max)
        .fetch_one(pool)
        .await?;
    Ok(fired)
}

/// Seconds until the earliest timer is due (negative: overdue); `None`: no timer.
pub async fn next_timer_in(pool: &PgPool, schema: &SchemaName) -> Result<Option<f64>, Error> {
    let secs = sqlx::query_scalar(
        &schema.sql("SELECT extract(epoch FROM kurier.saga_next_timer_due() - now())::float8"),
    )
    .fetch_one(pool)
    .await?;
    Ok(secs)
}

/// The reply topics of every defined saga type (what the daemon consumes).
pub async fn reply_topics(pool: &PgPool, schema: &SchemaName) -> Result<Vec<String>, Error> {
    let topics = sqlx::query_scalar(
        &schema.sql("SELECT DISTINCT reply_topic FROM kurier.saga_types ORDER BY 1"),
    )
    .fetch_all(pool)
    .await?;
    Ok(topics)
}

/// Sagas, newest first, optionally of one status and one type.
pub async fn list(
    pool: &PgPool,
    schema: &SchemaName,
    status: Option<&str>,
    saga_type: Option<&str>,
    limit: i64,
) -> Result<Vec<Saga>, Error> {
    let sql = format!(
        "SELECT {SAGA_COLUMNS} FROM kurier.sagas s JOIN kurier.saga_types t USING (saga_type) \
         WHERE ($1::text IS NULL OR s.status = $1) AND ($2::text IS NULL OR s.saga_type = $2) \
         ORDER BY s.created_at DESC, s.id LIMIT $3"
    );
    let sagas = sqlx::query_as(&schema.sql(&sql))
        .bind(status)
        .bind(saga_type)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    Ok(sagas)
}

pub async fn get<'e, E: PgExecutor<'e>>(
    db: E,
    schema: &SchemaName,
    id: Uuid,
) -> Result<Option<Saga>, Error> {
    let sql = format!(
        "SELECT {SAGA_COLUMNS} FROM kurier.sagas s JOIN kurier.saga_types t USING (saga_type) WHERE s.id = $1"
    );
    let saga = sqlx::query_as(&schema.sql(&sql))
        .bind(id)
        .fetch_optional(db)
        .await?;
    Ok(saga)
}

/// Every recorded event of saga `id`, oldest first.
pub async fn history<'e, E: PgExecutor<'e>>(
    db: E,
    schema: &SchemaName,
    id: Uuid,
) -> Result<Vec<SagaEvent>, Error> {
    let events = sqlx::query_as(&schema.sql(
        "SELECT id, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS at, kind, step, step_name, attempt, message_id, detail \
         FROM kurier.saga_events WHERE saga_id = $1 ORDER BY id",
    ))
    .bind(id)
    .fetch_all(db)
    .await?;
    Ok(events)
}

/// Saga `id` and its history from one snapshot: a running orchestrator
/// cannot add history that the status shown does not include yet.
pub async fn get_with_history(
    pool: &PgPool,
    schema: &SchemaName,
    id: Uuid,
) -> Result<Option<(Saga, Vec<SagaEvent>)>, Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let Some(saga) = get(&mut *tx, schema, id).await? else {
        return Ok(None);
    };
    let history = history(&mut *tx, schema, id).await?;
    tx.commit().await?;
    Ok(Some((saga, history)))
}

/// An operator action on one saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Re-send the current command or compensation.
    Retry,
    /// Abort a running saga: compensate its completed steps.
    Compensate,
    /// A parked saga: send its compensation again with a fresh budget.
    Resume,
}

/// Runs `action` on saga `id`; refused (KU404 / KU409, with the action that
/// does apply) when it does not apply. Returns the saga as the action left
/// it: read before commit, because a running orchestrator may move it on
/// (e.g. resumed → compensated) the moment it commits.
pub async fn act(
    pool: &PgPool,
    schema: &SchemaName,
    id: Uuid,
    action: Action,
    reason: Option<&str>,
) -> Result<Saga, Error> {
    let call = match action {
        Action::Retry => "kurier.saga_retry($1)",
        Action::Compensate => "kurier.saga_compensate($1, $2)",
        Action::Resume => "kurier.saga_resume($1)",
    };
    let mut tx = pool.begin().await?;
    sqlx::query(&schema.sql(&format!("SELECT 1 FROM {call}")))
        .bind(id)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
    let saga = get(&mut *tx, schema, id)
        .await?
        .expect("the action found it");
    tx.commit().await?;
    Ok(saga)
}

/// Sagas per status, and those past their deadline (for `/metrics`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct Counts {
    pub running: i64,
    pub compensating: i64,
    pub completed: i64,
    pub compensated: i64,
    pub failed: i64,
    pub parked: i64,
    pub past_deadline: i64,
    /// Median seconds from a command (or compensation) sent to its reply,
    /// over the last five minutes; `None` without replies.
    pub step_latency_p50_secs: Option<f64>,
    pub step_latency_p99_secs: Option<f64>,
}

pub async fn counts(pool: &PgPool, schema: &SchemaName) -> Result<Counts, Error> {
    let counts = sqlx::query_as(&schema.sql(
        "WITH s AS (SELECT status, count(*) AS n, count(*) FILTER (WHERE deadline < now()) AS late \
                    FROM kurier.sagas GROUP BY status), \
              l AS (SELECT extract(epoch FROM r.at - c.at)::float8 AS secs \
                    FROM kurier.saga_events r \
                    JOIN LATERAL (SELECT at FROM kurier.saga_events c \
                                  WHERE c.saga_id = r.saga_id AND c.step = r.step AND c.id < r.id \
                                    AND c.kind IN ('command_sent', 'compensation_sent') \
                                  ORDER BY c.id DESC LIMIT 1) c ON true \
                    WHERE r.kind = 'reply' AND r.at > now() - interval '5 minutes') \
         SELECT coalesce(sum(n) FILTER (WHERE status = 'running'), 0)::bigint AS running, \
                coalesce(sum(n) FILTER (WHERE status = 'compensating'), 0)::bigint AS compensating, \
                coalesce(sum(n) FILTER (WHERE status = 'completed'), 0)::bigint AS completed, \
                coalesce(sum(n) FILTER (WHERE status = 'compensated'), 0)::bigint AS compensated, \
                coalesce(sum(n) FILTER (WHERE status = 'failed'), 0)::bigint AS failed, \
                coalesce(sum(n) FILTER (WHERE status = 'parked'), 0)::bigint AS parked, \
                coalesce(sum(late), 0)::bigint AS past_deadline, \
                (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY secs) FROM l) AS step_latency_p50_secs, \
                (SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY secs) FROM l) AS step_latency_p99_secs \
         FROM s",
    ))
    .fetch_one(pool)
    .await?;
    Ok(counts)
}
