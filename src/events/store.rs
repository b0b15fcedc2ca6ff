//! Every event-store query: the contract's functions
//! (`migrations/0005_event_store.sql`) as the library and the daemon call them.

use sqlx::{PgConnection, PgExecutor, PgPool};

use super::{EventData, Expected, NewEvent, RecordedEvent};
use crate::error::Error;
use crate::schema::SchemaName;

/// Appends `events` to `stream` on `conn`; returns the last one's version.
pub async fn append(
    conn: &mut PgConnection,
    schema: &SchemaName,
    stream: &str,
    expected: Expected,
    events: &[NewEvent],
) -> Result<i64, Error> {
    let appended = match events {
        [] => {
            return Err(Error::InvalidMessage(format!(
                "append to {stream}: no events given"
            )))
        }
        _ if events.iter().any(|e| e.event_type == super::ERASED_MARKER) => {
            return Err(Error::InvalidMessage(format!(
                "append to {stream}: the event type {} is kurier.erase_stream's marker \
                 (aggregates start anew at it); name the event otherwise",
                super::ERASED_MARKER
            )))
        }
        [one] => append_one(&mut *conn, schema, stream, expected, one).await,
        many if is_one_statement(many) => {
            append_batch(&mut *conn, schema, stream, expected, many).await
        }
        // Bytes have no batch form: the first append checks the version and
        // locks the stream for this transaction, the others follow it.
        [first, rest @ ..] => {
            let mut last = append_one(&mut *conn, schema, stream, expected, first).await;
            for e in rest {
                if last.is_err() {
                    break;
                }
                last = append_one(&mut *conn, schema, stream, Expected::Any, e).await;
            }
            last
        }
    };
    appended.map_err(|e| conflict(e, stream))
}

/// Whether [`append`] stores `events` in one statement: one event, or a
/// batch of JSON events (binary events have no batch form).
pub fn is_one_statement(events: &[NewEvent]) -> bool {
    events.len() == 1 || events.iter().all(|e| matches!(e.data, EventData::Json(_)))
}

async fn append_one(
    conn: &mut PgConnection,
    schema: &SchemaName,
    stream: &str,
    expected: Expected,
    e: &NewEvent,
) -> Result<i64, sqlx::Error> {
    let (function, json, bytes) = match &e.data {
        EventData::Json(v) => ("append_event", Some(v), None),
        EventData::Bytes(b) => ("append_event_bytes", None, Some(b.as_slice())),
    };
    let sql = format!("SELECT kurier.{function}($1, $2, $3, $4, $5, $6)");
    let sql = schema.sql(&sql);
    let query = sqlx::query_scalar(&sql).bind(stream).bind(&e.event_type);
    let query = match function {
        "append_event" => query.bind(json),
        _ => query.bind(bytes),
    };
    query
        .bind(&e.metadata)
        .bind(expected.as_sql())
        .bind(e.event_id)
        .fetch_one(conn)
        .await
}

/// A batch of JSON events as the array form of `kurier.append_events`: one
/// array per column, bound as they are (no JSON envelope to build and parse).
async fn append_batch(
    conn: &mut PgConnection,
    schema: &SchemaName,
    stream: &str,
    expected: Expected,
    events: &[NewEvent],
) -> Result<i64, sqlx::Error> {
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let data: Vec<&serde_json::Value> = events
        .iter()
        .map(|e| match &e.data {
            EventData::Json(v) => v,
            EventData::Bytes(_) => unreachable!("only JSON events are batched"),
        })
        .collect();
    // NULL as a whole when no event has metadata: the function then skips
    // its per-element metadata check.
    let metadata: Option<Vec<Option<&serde_json::Value>>> = events
        .iter()
        .any(|e| e.metadata.is_some())
        .then(|| events.iter().map(|e| e.metadata.as_ref()).collect());
    let ids: Vec<uuid::Uuid> = events.iter().map(|e| e.event_id).collect();
    sqlx::query_scalar(&schema.sql(
        "SELECT kurier.append_events($1, $2, $3::text[], $4::jsonb[], $5::jsonb[], $6::uuid[])",
    ))
    .bind(stream)
    .bind(expected.as_sql())
    .bind(types)
    .bind(data)
    .bind(metadata)
    .bind(ids)
    .fetch_one(conn)
    .await
}

/// KU409 as [`Error::VersionConflict`], read from the contract's message
/// `kurier: stream S is at version V, expected E`; a missing table or
/// function (a database an older Kurier migrated) as the instruction to
/// migrate ([`Error::explained`]).
fn conflict(e: sqlx::Error, stream: &str) -> Error {
    if let sqlx::Error::Database(db) = &e {
        if db.code().as_deref() == Some("KU409") {
            let msg = db.message();
            let numbers = msg.rsplit_once(" is at version ").and_then(|(_, rest)| {
                let (actual, expected) = rest.split_once(", expected ")?;
                Some((actual.trim().parse().ok()?, expected.trim().parse().ok()?))
            });
            if let Some((actual, expected)) = numbers {
                return Error::VersionConflict {
                    stream: stream.to_owned(),
                    expected,
                    actual,
                };
            }
            return Error::Database(e);
        }
        // A missing function, table or schema: a database an older Kurier
        // migrated (other codes, 42501 among them, stay as they are: the
        // appending role is the application's, not the relay's).
        if matches!(db.code().as_deref(), Some("42883" | "42P01" | "3F000")) {
            return Error::explained(e);
        }
    }
    Error::Database(e)
}

pub async fn read_stream<'e, E: PgExecutor<'e>>(
    executor: E,
    schema: &SchemaName,
    stream: &str,
    from: i64,
    max: i32,
) -> Result<Vec<RecordedEvent>, Error> {
    let events = sqlx::query_as(&schema.sql("SELECT * FROM kurier.read_stream($1, $2, $3)"))
        .bind(stream)
        .bind(from)
        .bind(max)
        .fetch_all(executor)
        .await?;
    Ok(events)
}

/// Statement 3 of `kurier.read_all` (`migrations/0005_event_store.sql`),
/// without and with a category: the events between a position and the
/// bound, in order. Kept identical to the function's two queries
/// (`tests/events.rs` compares the two paths).
const READ_ALL_PAGE: &str =
    "SELECT e.stream, e.version, e.global_position, e.type, e.data, e.metadata, \
            e.event_id, e.recorded_at, e.data_bytes, e.category \
     FROM kurier.events e \
     WHERE e.global_position > $1 AND e.global_position < $2 \
     ORDER BY e.global_position LIMIT $3";
const READ_CATEGORY_PAGE: &str =
    "SELECT e.stream, e.version, e.global_position, e.type, e.data, e.metadata, \
            e.event_id, e.recorded_at, e.data_bytes, e.category \
     FROM kurier.events e \
     WHERE e.category = $4 AND e.global_position > $1 AND e.global_position < $2 \
     ORDER BY e.global_position LIMIT $3";

/// `kurier.read_all`'s protocol run from the client, so that the page
/// streams: PL/pgSQL's `RETURN QUERY` builds the whole page before sending
/// its first row (20-25 ms per 10,000 events against 6-7 ms for the query),
/// here PostgreSQL sends rows while the client decodes them. One READ
/// COMMITTED transaction: `kurier.read_all_bound()` first, then the page in
/// a later statement (a snapshot taken after the sample, as the function
/// does), with sorting off for the transaction as the function has it, so
/// that a never-analyzed table still gets the ordered index walk.
pub async fn read_all_streamed(
    pool: &PgPool,
    schema: &SchemaName,
    after: i64,
    max: i32,
    category: Option<&str>,
) -> Result<Vec<RecordedEvent>, Error> {
    if max < 1 {
        // The function's error for it.
        return read_all(pool, schema, after, max, category).await;
    }
    let mut tx = pool
        .begin_with("BEGIN ISOLATION LEVEL READ COMMITTED")
        .await?;
    // As the function: nothing drawn after `after` (a reader at the head)
    // needs no pg_locks sample.
    let bound: Option<i64> = sqlx::query_scalar(&schema.sql(
        "SELECT CASE WHEN coalesce(pg_sequence_last_value('kurier.event_position'), 0) > $1 \
                     THEN kurier.read_all_bound() END \
         FROM set_config('enable_sort', 'off', true)",
    ))
    .bind(after)
    .fetch_one(&mut *tx)
    .await?;
    // NULL: at the head, or an appender is between drawing and advertising;
    // nothing this time, as the function answers.
    let events = match bound {
        Some(bound) if bound - 1 > after => {
            let page = if category.is_some() {
                READ_CATEGORY_PAGE
            } else {
                READ_ALL_PAGE
            };
            let sql = schema.sql(page);
            let query = sqlx::query_as(&sql)
                .bind(after)
                .bind(bound)
                .bind(i64::from(max));
            match category {
                Some(c) => query.bind(c),
                None => query,
            }
            .fetch_all(&mut *tx)
            .await?
        }
        _ => Vec::new(),
    };
    tx.commit().await?;
    Ok(events)
}

/// `kurier.read_all` (must run under READ COMMITTED, as a pool's connections do).
pub async fn read_all<'e, E: PgExecutor<'e>>(
    executor: E,
    schema: &SchemaName,
    after: i64,
    max: i32,
    category: Option<&str>,
) -> Result<Vec<RecordedEvent>, Error> {
    let events = sqlx::query_as(&schema.sql("SELECT * FROM kurier.read_all($1, $2, $3)"))
        .bind(after)
        .bind(max)
        .bind(category)
        .fetch_all(executor)
        .await?;
    Ok(events)
}

pub async fn stream_version<'e, E: PgExecutor<'e>>(
    executor: E,
    schema: &SchemaName,
    stream: &str,
) -> Result<Option<i64>, Error> {
    let v: i64 = sqlx::query_scalar(&schema.sql("SELECT kurier.stream_version($1)"))
        .bind(stream)
        .fetch_one(executor)
        .await?;
    Ok((v >= 0).then_some(v))
}

pub async fn erase_stream(
    pool: &PgPool,
    schema: &SchemaName,
    stream: &str,
    reason: &str,
) -> Result<i64, Error> {
    let erased = sqlx::query_scalar(&schema.sql("SELECT kurier.erase_stream($1, $2)"))
        .bind(stream)
        .bind(reason)
        .fetch_one(pool)
        .await?;
    Ok(erased)
}

/// A stream's latest snapshot.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Snapshot {
    pub stream: String,
    pub version: i64,
    pub state: serde_json::Value,
    pub schema_version: i32,
}

pub async fn save_snapshot<'e, E: PgExecutor<'e>>(
    executor: E,
    schema: &SchemaName,
    snapshot: &Snapshot,
) -> Result<bool, Error> {
    let saved = sqlx::query_scalar(&schema.sql("SELECT kurier.save_snapshot($1, $2, $3, $4)"))
        .bind(&snapshot.stream)
        .bind(snapshot.version)
        .bind(&snapshot.state)
        .bind(snapshot.schema_version)
        .fetch_one(executor)
        .await?;
    Ok(saved)
}

pub async fn load_snapshot<'e, E: PgExecutor<'e>>(
    executor: E,
    schema: &SchemaName,
    stream: &str,
) -> Result<Option<Snapshot>, Error> {
    let snapshot = sqlx::query_as(
        &schema.sql("SELECT stream, version, state, schema_version FROM kurier.load_snapshot($1)"),
    )
    .bind(stream)
    .fetch_optional(executor)
    .await?;
    Ok(snapshot)
}

/// The version of `stream` at time `at`: the events recorded at or before
/// it up to the first one recorded later; `None` when there is none.
pub async fn version_at<'e, E: PgExecutor<'e>>(
    executor: E,
    schema: &SchemaName,
    stream: &str,
    at: time::OffsetDateTime,
) -> Result<Option<i64>, Error> {
    // The version before the first event recorded after `at` (none when
    // that is the first stored, e.g. an erased stream's marker), or the
    // last: not max(version) of those recorded by then, because recorded_at
    // is the appending transaction's start and a transaction that waited on
    // the stream lock gets the later version with the earlier time.
    let v: Option<i64> = sqlx::query_scalar(&schema.sql(
        "SELECT CASE WHEN a.first_after IS NULL THEN s.last \
                     WHEN a.first_after > s.first THEN a.first_after - 1 END \
         FROM (SELECT min(version) AS first, max(version) AS last \
               FROM kurier.events WHERE stream = $1) s, \
              (SELECT min(version) AS first_after \
               FROM kurier.events WHERE stream = $1 AND recorded_at > $2) a",
    ))
    .bind(stream)
    .bind(at)
    .fetch_one(executor)
    .await?;
    Ok(v)
}

/// A transaction holding `read_all` back (it appended events and has not
/// ended), from the view `kurier.event_horizon`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct HorizonHolder {
    pub pid: Option<i32>,
    pub application_name: Option<String>,
    pub position: Option<i64>,
    pub transaction_age_secs: Option<f64>,
}

pub async fn horizon(pool: &PgPool, schema: &SchemaName) -> Result<Vec<HorizonHolder>, Error> {
    let holders = sqlx::query_as(&schema.sql(
        "SELECT pid, application_name::text, position, extract(epoch FROM xact_age)::float8 AS transaction_age_secs \
         FROM kurier.event_horizon ORDER BY position",
    ))
    .fetch_all(pool)
    .await?;
    Ok(holders)
}

/// Store-wide figures for `kurier events stats` and `/metrics`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct Stats {
    pub streams: i64,
    pub events: i64,
    pub last_position: i64,
    /// Committed events `read_all` cannot return yet (behind a holder).
    pub unreadable_events: i64,
    pub horizon_holders: i64,
    pub oldest_holder_age_secs: Option<f64>,
    pub erasures: i64,
    /// KU409s the append functions raised, for clients in every language
    /// (`kurier.event_conflicts_total()`); None on a database not yet
    /// migrated to 0009.
    #[sqlx(skip)]
    pub version_conflicts: Option<i64>,
}

pub async fn stats(pool: &PgPool, schema: &SchemaName) -> Result<Stats, Error> {
    let stats = sqlx::query_as(&schema.sql(
        "SELECT (SELECT count(*) FROM kurier.streams) AS streams, \
                (SELECT count(*) FROM kurier.events) AS events, \
                coalesce(h.last_position, 0) AS last_position, coalesce(h.unreadable_events, 0) AS unreadable_events, \
                coalesce(h.holders, 0)::bigint AS horizon_holders, h.oldest_holder_age_seconds::float8 AS oldest_holder_age_secs, \
                (SELECT count(*) FROM kurier.erasures) AS erasures \
         FROM kurier.event_horizon_lag() h",
    ))
    .fetch_one(pool)
    .await?;
    Ok(Stats {
        version_conflicts: version_conflicts(pool, schema).await?,
        ..stats
    })
}

/// KU409s the append functions raised since migration 0009, from every
/// client (the database counts them; for `/metrics`). None when the
/// database lacks 0009: the daemon does not migrate at start, so a new
/// binary may scrape a database `kurier migrate` has not reached yet.
pub async fn version_conflicts(pool: &PgPool, schema: &SchemaName) -> Result<Option<i64>, Error> {
    let n = sqlx::query_scalar(&schema.sql("SELECT kurier.event_conflicts_total()"))
        .fetch_one(pool)
        .await;
    match n {
        Ok(n) => Ok(Some(n)),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42883") => Ok(None),
        Err(e) => Err(Error::explained(e)),
    }
}

/// How far `read_all` is held back, cheaply (for `/metrics`).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct HorizonLag {
    /// The last position drawn.
    pub last_position: i64,
    /// Committed events not readable yet (capped at 1M).
    pub unreadable_events: i64,
    /// Open appending transactions (other than the caller's).
    pub holders: i64,
    /// The oldest holder's transaction age in seconds (0 when none).
    pub oldest_holder_age_secs: f64,
    /// The pid of the transaction at the horizon (holding the lowest
    /// position); `None` when nobody holds it or a prepared transaction does.
    pub holder_pid: Option<i32>,
}

pub async fn horizon_lag(pool: &PgPool, schema: &SchemaName) -> Result<HorizonLag, Error> {
    let lag = sqlx::query_as(&schema.sql(
        "SELECT coalesce(l.last_position, 0) AS last_position, \
                coalesce(l.unreadable_events, 0) AS unreadable_events, \
                coalesce(l.holders, 0)::bigint AS holders, \
                coalesce(l.oldest_holder_age_seconds, 0)::float8 AS oldest_holder_age_secs, \
                (SELECT h.pid FROM kurier.event_horizon h WHERE h.pid IS DISTINCT FROM pg_backend_pid() \
                 ORDER BY h.position LIMIT 1) AS holder_pid \
         FROM kurier.event_horizon_lag() l",
    ))
    .fetch_one(pool)
    .await?;
    Ok(lag)
}

/// `subject`'s key, storing `new_key` when it has none; `KU410` for a
/// forgotten subject (crypto-shredding, `events::shredding`).
pub async fn subject_key(
    pool: &PgPool,
    schema: &SchemaName,
    subject: &str,
    new_key: &[u8],
) -> Result<Vec<u8>, Error> {
    let key = sqlx::query_scalar(&schema.sql("SELECT kurier.subject_key($1, $2)"))
        .bind(subject)
        .bind(new_key)
        .fetch_one(pool)
        .await?;
    Ok(key)
}

/// `subject`'s key, if it has one (none: never used, or forgotten).
pub async fn key_of(
    pool: &PgPool,
    schema: &SchemaName,
    subject: &str,
) -> Result<Option<Vec<u8>>, Error> {
    let key =
        sqlx::query_scalar(&schema.sql("SELECT key FROM kurier.subject_keys WHERE subject = $1"))
            .bind(subject)
            .fetch_optional(pool)
            .await?;
    Ok(key)
}

/// Deletes `subject`'s key for good; `true` if there was one.
pub async fn forget_subject(
    pool: &PgPool,
    schema: &SchemaName,
    subject: &str,
) -> Result<bool, Error> {
    let forgotten = sqlx::query_scalar(&schema.sql("SELECT kurier.forget_subject($1)"))
        .bind(subject)
        .fetch_one(pool)
        .await?;
    Ok(forgotten)
}
