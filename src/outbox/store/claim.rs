//! The relay's reads and writes on `kurier.outbox`: claim a batch, delete
//! what the broker acknowledged, schedule a retry.
//!
//! Rows are claimed by state, never by an `id > last_seen` cursor: identity
//! values are assigned at insert, not at commit, so a cursor would skip rows of
//! transactions that commit late (the sequence-gap trap).

use std::time::Duration;

use sqlx::PgConnection;
use uuid::Uuid;

use crate::error::Error;
use crate::schema::SchemaName;

/// A claimed outbox row, as the publisher needs it.
#[derive(Debug, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub message_id: Uuid,
    pub topic: String,
    pub key: Option<String>,
    /// `payload::text` for JSON rows.
    pub payload_text: Option<String>,
    pub payload_bytes: Option<Vec<u8>>,
    pub headers: String,
    pub attempts: i32,
}

impl OutboxRow {
    /// The record value: JSON text, raw bytes, or `None` for a tombstone.
    pub fn value(&self) -> Option<&[u8]> {
        self.payload_text
            .as_deref()
            .map(str::as_bytes)
            .or(self.payload_bytes.as_deref())
    }
}

/// Oldest rows first, of this relay's lease partitions only. A row waiting for a retry holds back the later rows of
/// its topic and key (probing the small partial index `outbox_retrying`), so
/// a retry never lets a key's later message overtake an earlier one.
///
/// Plan: the partitions whose lease names `$3` and is unexpired by the
/// database clock (the fence) are read once into an array, so the outbox is
/// walked in primary-key order and stops after `$1` rows. (Written as
/// `IN (SELECT ...)`, the planner misjudged the lease count and sorted the
/// whole table: 137 ms instead of 13 ms for 5,000 of 200,000 rows.)
///
/// The walk covers only the id ranges `$4[i]..=$5[i]` (see [`unskipped_ranges`]):
/// the rows being sent and being deleted are not visited at all, where the
/// filter on `$6` fetches each of them from the heap and drops it (10,000
/// such rows made a 5,000-row claim take 34 instead of 24 ms, EXPLAIN
/// ANALYZE). The filter is the fallback for skipped ids too scattered to be
/// cut out as ranges.
///
/// The outer query keeps rows while the running payload size stays under
/// `$2` bytes (always at least one row), so a batch of large rows stays small.
const CLAIM: &str = "SELECT id, message_id, topic, key, payload::text AS payload_text, payload_bytes, headers::text AS headers, attempts \
     FROM (SELECT lim.*, sum(lim.size) OVER (ORDER BY lim.id ROWS UNBOUNDED PRECEDING) AS running \
           FROM (SELECT c.*, coalesce(pg_column_size(c.payload), 0) + coalesce(octet_length(c.payload_bytes), 0) AS size \
                 FROM unnest($4::bigint[], $5::bigint[]) AS r(lo, hi) \
                 CROSS JOIN LATERAL ( \
                   SELECT o.id, o.message_id, o.topic, o.key, o.payload, o.payload_bytes, o.headers, o.attempts \
                   FROM kurier.outbox o \
                   WHERE o.id BETWEEN r.lo AND r.hi \
                     AND o.lease_partition = ANY(ARRAY(SELECT partition FROM kurier.relay_leases \
                                                       WHERE owner = $3 AND expires_at > now())) \
                     AND (o.retry_at IS NULL OR o.retry_at <= now()) \
                     AND o.id NOT IN (SELECT unnest($6::bigint[])) \
                     AND NOT EXISTS (SELECT 1 FROM kurier.outbox h \
                                     WHERE h.retry_at > now() AND h.topic = o.topic \
                                       AND h.key IS NOT DISTINCT FROM o.key AND h.id < o.id) \
                   ORDER BY o.id LIMIT $1) c \
                 ORDER BY c.id LIMIT $1) lim) b \
     WHERE running - size < $2 \
     ORDER BY id";

/// Each range is one more index scan. In EXPLAIN ANALYZE of a 5,000-row
/// claim skipping 10,000 ids, 2 to 130 ranges took 24–28 ms and 514 ranges
/// 29 ms, against 32–40 ms for the filter; 5,000 ranges took 520 ms. Rolled-back
/// inserts leave id gaps among the skipped rows, so a run often breaks in
/// several; beyond this many ranges the claim filters instead.
const MAX_RANGES: usize = 256;

/// The id ranges a claim walks: everything but the `skip`ped ids, which are
/// usually one run (the batch on the wire and the one being deleted) or a
/// few. `None` when that takes more than [`MAX_RANGES`] ranges.
fn unskipped_ranges(skip: &[i64]) -> Option<Vec<(i64, i64)>> {
    let mut ids = skip.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut ranges = Vec::new();
    let mut from = Some(i64::MIN);
    for run in ids.chunk_by(|a, b| a.checked_add(1) == Some(*b)) {
        let (first, last) = (run[0], run[run.len() - 1]);
        if let Some(lo) = from.filter(|lo| *lo < first) {
            ranges.push((lo, first - 1));
        }
        from = last.checked_add(1);
    }
    if let Some(lo) = from {
        ranges.push((lo, i64::MAX));
    }
    (ranges.len() <= MAX_RANGES).then_some(ranges)
}

/// Reads the next batch of the partitions `owner` holds unexpired leases on
/// (checked by the database clock in the same statement: the fence), leaving
/// out the rows `in_flight`.
pub async fn claim(
    conn: &mut PgConnection,
    schema: &SchemaName,
    owner: &str,
    limit: u32,
    max_bytes: u64,
    in_flight: &[i64],
) -> Result<Vec<OutboxRow>, Error> {
    let (ranges, filtered) = match unskipped_ranges(in_flight) {
        Some(ranges) => (ranges, &[][..]),
        None => (vec![(i64::MIN, i64::MAX)], in_flight),
    };
    let (lo, hi): (Vec<i64>, Vec<i64>) = ranges.into_iter().unzip();
    sqlx::query_as(&schema.sql(CLAIM))
        .bind(i64::from(limit))
        .bind(max_bytes as i64)
        .bind(owner)
        .bind(lo)
        .bind(hi)
        .bind(filtered)
        .fetch_all(conn)
        .await
        .map_err(Error::explained)
}

/// Removes rows whose delivery report said "acknowledged".
pub async fn delete_published(
    conn: &mut PgConnection,
    schema: &SchemaName,
    ids: &[i64],
) -> Result<u64, Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    let done = sqlx::query(&schema.sql("DELETE FROM kurier.outbox WHERE id = ANY($1)"))
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(done.rows_affected())
}

/// Records a failed attempt and when to try again.
pub async fn schedule_retry(
    conn: &mut PgConnection,
    schema: &SchemaName,
    id: i64,
    error: &str,
    delay: Duration,
) -> Result<(), Error> {
    sqlx::query(&schema.sql(
        "UPDATE kurier.outbox SET attempts = attempts + 1, last_error = $2, \
         retry_at = now() + make_interval(secs => $3) WHERE id = $1",
    ))
    .bind(id)
    .bind(error)
    .bind(delay.as_secs_f64())
    .execute(conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_walks_around_the_skipped_runs() {
        let all = Some(vec![(i64::MIN, i64::MAX)]);
        assert_eq!(unskipped_ranges(&[]), all);
        assert_eq!(
            unskipped_ranges(&[12, 10, 11, 11]),
            Some(vec![(i64::MIN, 9), (13, i64::MAX)])
        );
        assert_eq!(
            unskipped_ranges(&[1, 2, 5, 9, 10]),
            Some(vec![(i64::MIN, 0), (3, 4), (6, 8), (11, i64::MAX)])
        );
        assert_eq!(
            unskipped_ranges(&[i64::MIN, 0, i64::MAX]),
            Some(vec![(i64::MIN + 1, -1), (1, i64::MAX - 1)])
        );
        let scattered: Vec<i64> = (0..MAX_RANGES as i64).map(|i| i * 2).collect();
        assert_eq!(unskipped_ranges(&scattered), None);
        let most = &scattered[..MAX_RANGES - 1];
        assert_eq!(unskipped_ranges(most).map(|r| r.len()), Some(MAX_RANGES));
    }
}
