//! Every projection query: the contract's functions
//! (`migrations/0007_projections.sql`) as the daemon, the Rust runner and
//! the operator call them.

use sqlx::{PgConnection, PgExecutor, PgPool};

use crate::error::Error;
use crate::schema::SchemaName;

/// What one `kurier.run_projection` call did.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Run {
    /// Handler calls (events of its categories) applied.
    pub applied: i32,
    /// Events read (its categories and others it advanced over).
    pub read_count: i32,
    pub position: i64,
    /// Probably more waiting: call again at once.
    pub more: bool,
    pub status: String,
    /// applied, idle, busy, waiting, failed, parked or stopped.
    pub outcome: String,
    /// Seconds until a failure's backoff ends (`waiting`, `failed`).
    pub retry_in_secs: Option<f64>,
}

/// Runs the next batch of SQL projection `name` on `conn` (commit it
/// afterwards whatever the outcome: a recorded failure must persist).
pub async fn run(
    conn: &mut PgConnection,
    schema: &SchemaName,
    name: &str,
    max: i32,
) -> Result<Run, Error> {
    let run = sqlx::query_as(&schema.sql(
        "SELECT applied, read_count, \"position\" AS position, more, status, outcome, \
                extract(epoch FROM retry_at - now())::float8 AS retry_in_secs \
         FROM kurier.run_projection($1, $2)",
    ))
    .bind(name)
    .bind(max)
    .fetch_one(conn)
    .await?;
    Ok(run)
}

/// The SQL projections the daemon runs (those with a handler).
pub async fn sql_projections(pool: &PgPool, schema: &SchemaName) -> Result<Vec<String>, Error> {
    let names = sqlx::query_scalar(
        &schema.sql("SELECT name FROM kurier.projections WHERE handler IS NOT NULL ORDER BY name"),
    )
    .fetch_all(pool)
    .await?;
    Ok(names)
}

/// Registers a projection run by application code (its checkpoint lives here).
pub async fn register<'e, E: PgExecutor<'e>>(
    executor: E,
    schema: &SchemaName,
    name: &str,
    categories: Option<&[String]>,
) -> Result<(), Error> {
    sqlx::query(&schema.sql("SELECT kurier.register_projection($1, $2)"))
        .bind(name)
        .bind(categories)
        .execute(executor)
        .await?;
    Ok(())
}

/// The checkpoint row as a runner sees it, locked for this transaction
/// (`None`: another runner holds it).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Checkpoint {
    pub position: i64,
    pub status: String,
    pub categories: Option<Vec<String>>,
    /// Seconds until a failure's backoff ends (negative: over).
    pub retry_in_secs: Option<f64>,
}

pub async fn lock(
    conn: &mut PgConnection,
    schema: &SchemaName,
    name: &str,
) -> Result<Option<Checkpoint>, Error> {
    let row: Option<Checkpoint> = sqlx::query_as(&schema.sql(
        "SELECT \"position\" AS position, status, categories, extract(epoch FROM retry_at - now())::float8 AS retry_in_secs \
         FROM kurier.projections WHERE name = $1 FOR UPDATE SKIP LOCKED",
    ))
    .bind(name)
    .fetch_optional(&mut *conn)
    .await?;
    if row.is_none() {
        // Unknown, or held: tell the two apart for a clear error.
        let known: bool = sqlx::query_scalar(
            &schema.sql("SELECT EXISTS (SELECT 1 FROM kurier.projections WHERE name = $1)"),
        )
        .bind(name)
        .fetch_one(conn)
        .await?;
        if !known {
            return Err(Error::Setup {
                problem: format!("projection {name} is not registered"),
                fix: "call kurier.register_projection (or define_projection) first".into(),
            });
        }
    }
    Ok(row)
}

/// Moves the checkpoint from `from` to `to` (compare-and-set; KU409 when
/// another runner moved it, or it was rebuilt).
pub async fn checkpoint(
    conn: &mut PgConnection,
    schema: &SchemaName,
    name: &str,
    from: i64,
    to: i64,
) -> Result<(), Error> {
    sqlx::query(&schema.sql("SELECT kurier.projection_checkpoint($1, $2, $3)"))
        .bind(name)
        .bind(from)
        .bind(to)
        .execute(conn)
        .await?;
    Ok(())
}

/// Records that the event at `position` failed; returns (status, retry in seconds).
pub async fn failed(
    conn: &mut PgConnection,
    schema: &SchemaName,
    name: &str,
    position: i64,
    error: &str,
) -> Result<(String, Option<f64>), Error> {
    let row = sqlx::query_as(&schema.sql(
        "SELECT status, extract(epoch FROM retry_at - now())::float8 FROM kurier.projection_failed($1, $2, $3)",
    ))
    .bind(name)
    .bind(position)
    .bind(error)
    .fetch_one(conn)
    .await?;
    Ok(row)
}

/// An operator action on a projection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    Rebuild,
    /// Skip the parked projection's failing event at this position (recorded).
    Skip {
        position: i64,
        reason: Option<String>,
    },
}

/// Runs `action` on projection `name` on `conn` (a transaction: a rebuild
/// of a Rust projection empties its read model in the same one).
pub async fn act(
    conn: &mut PgConnection,
    schema: &SchemaName,
    name: &str,
    action: &Action,
) -> Result<String, Error> {
    let (sql, position, reason) = match action {
        Action::Pause => ("SELECT kurier.pause_projection($1)", None, None),
        Action::Resume => ("SELECT kurier.resume_projection($1)", None, None),
        Action::Rebuild => ("SELECT kurier.rebuild_projection($1)", None, None),
        Action::Skip { position, reason } => (
            "SELECT kurier.skip_projection_event($1, $2, $3)",
            Some(*position),
            reason.clone(),
        ),
    };
    let sql = schema.sql(sql);
    let mut query = sqlx::query_scalar(&sql).bind(name);
    if let Action::Skip { .. } = action {
        query = query.bind(position).bind(reason);
    }
    let result = query.fetch_one(conn).await?;
    Ok(result)
}

/// A projection as operators see it (`kurier projections status`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct Status {
    pub name: String,
    pub status: String,
    pub position: i64,
    pub last_position: i64,
    /// Committed events of its categories after its position (capped at 1M).
    pub events_behind: i64,
    pub seconds_behind: f64,
    pub caught_up: bool,
    pub last_error: Option<String>,
    pub failed_position: Option<i64>,
    pub failed_attempts: Option<i32>,
    pub handler: Option<String>,
    pub categories: Option<Vec<String>>,
    pub events_applied: i64,
}

pub async fn status(pool: &PgPool, schema: &SchemaName) -> Result<Vec<Status>, Error> {
    let rows = sqlx::query_as(&schema.sql(
        "SELECT name, status, \"position\" AS position, last_position, events_behind, seconds_behind, caught_up, \
                last_error, failed_position, failed_attempts, handler::text AS handler, categories, events_applied \
         FROM kurier.projection_status() ORDER BY name",
    ))
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

pub async fn caught_up(pool: &PgPool, schema: &SchemaName, name: &str) -> Result<bool, Error> {
    let up = sqlx::query_scalar(&schema.sql("SELECT kurier.projection_caught_up($1)"))
        .bind(name)
        .fetch_one(pool)
        .await?;
    Ok(up)
}

/// The advisory lock key of projection `name` in `schema`: one runner per
/// projection across every process that runs it.
pub fn runner_lock(schema: &SchemaName, name: &str) -> i64 {
    // FNV-1a: stable across processes and versions (the std hasher is not).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("kurier-projection:{schema}:{name}").bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    // Positive: the event store keeps negative advisory keys for itself.
    (h >> 1) as i64
}

pub async fn try_lock_runner(conn: &mut PgConnection, key: i64) -> Result<bool, Error> {
    let got = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(key)
        .fetch_one(conn)
        .await?;
    Ok(got)
}
