//! `kurier status`: the outbox backlog, leases and dead letters, for operators.

use sqlx::PgPool;

use crate::error::Error;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// Rows waiting to be published.
    pub pending: i64,
    /// Seconds since the oldest pending row was written.
    pub oldest_pending_secs: Option<f64>,
    /// Rows waiting for a retry after a failed attempt.
    pub retrying: i64,
    pub per_topic: Vec<TopicCount>,
    pub dead_letters: i64,
    pub leases: Vec<LeaseOwner>,
}

#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct TopicCount {
    pub topic: String,
    pub pending: i64,
}

/// Partitions held per live relay instance.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct LeaseOwner {
    pub owner: String,
    pub partitions: i64,
    /// Seconds until the soonest of its leases expires without a heartbeat.
    pub expires_in_secs: f64,
}

pub async fn outbox(pool: &PgPool) -> Result<Status, Error> {
    let (pending, oldest_pending_secs, retrying): (i64, Option<f64>, i64) = sqlx::query_as(
        "SELECT count(*), extract(epoch FROM now() - min(created_at))::float8, count(*) FILTER (WHERE retry_at IS NOT NULL) FROM kurier.outbox",
    )
    .fetch_one(pool)
    .await?;
    let per_topic = sqlx::query_as("SELECT topic, count(*) AS pending FROM kurier.outbox GROUP BY topic ORDER BY 2 DESC, 1 LIMIT 50").fetch_all(pool).await?;
    let dead_letters = sqlx::query_scalar("SELECT count(*) FROM kurier.dead_letters")
        .fetch_one(pool)
        .await?;
    let leases = sqlx::query_as(
        "SELECT owner, count(*) AS partitions, extract(epoch FROM min(expires_at) - now())::float8 AS expires_in_secs \
         FROM kurier.relay_leases WHERE owner IS NOT NULL AND expires_at > now() GROUP BY owner ORDER BY owner",
    )
    .fetch_all(pool)
    .await?;
    Ok(Status {
        pending,
        oldest_pending_secs,
        retrying,
        per_topic,
        dead_letters,
        leases,
    })
}

/// The human table `kurier status` prints.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let oldest = s
        .oldest_pending_secs
        .map(|v| format!("{v:.1}s"))
        .unwrap_or_else(|| "-".into());
    out.push_str(&format!(
        "outbox: {} pending (oldest {oldest}), {} retrying; {} dead letters\n",
        s.pending, s.retrying, s.dead_letters
    ));
    if !s.per_topic.is_empty() {
        out.push_str(&format!("{:<40} {:>10}\n", "topic", "pending"));
        for t in &s.per_topic {
            out.push_str(&format!("{:<40} {:>10}\n", t.topic, t.pending));
        }
    }
    out.push_str(&format!("relays: {} live\n", s.leases.len()));
    for l in &s.leases {
        out.push_str(&format!(
            "  {} holds {} partition(s), lease expires in {:.1}s\n",
            l.owner, l.partitions, l.expires_in_secs
        ));
    }
    out
}
