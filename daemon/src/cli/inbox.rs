//! `kurier inbox`: per-consumer counts, unparking, retention.

use anyhow::Context;
use clap::Subcommand;
use kurier::inbox::store;
use kurier::SchemaName;
use sqlx::PgPool;

use crate::config::Config;

#[derive(Subcommand)]
pub enum InboxCommand {
    /// Per consumer: received, duplicates dropped, pending, processed, parked.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Put parked messages back in line (all of a consumer's, or one).
    Unpark {
        #[arg(long)]
        consumer: String,
        /// Only this inbox row id.
        #[arg(long)]
        id: Option<i64>,
    },
    /// Apply the retention settings now (the daemon also does this every minute).
    Prune,
}

pub async fn run(
    cmd: InboxCommand,
    config: &Config,
    pool: &PgPool,
    schema: &SchemaName,
) -> anyhow::Result<()> {
    match cmd {
        InboxCommand::Status { json } => {
            let rows = store::status(pool, schema).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", render(&rows));
            }
        }
        InboxCommand::Unpark { consumer, id } => {
            let n = store::unpark(pool, schema, &consumer, id).await?;
            println!("unparked {n} message(s) of consumer {consumer}");
        }
        InboxCommand::Prune => {
            let cfg = config.inbox.clone().context("no inbox configured: set inbox.topics / KURIER_INBOX_TOPICS (retention settings live there)")?;
            let (pruned, deleted) =
                store::prune(pool, schema, cfg.prune_payload_after, cfg.forget_after).await?;
            println!("payloads pruned: {pruned}; rows forgotten: {deleted}");
        }
    }
    Ok(())
}

fn render(rows: &[store::ConsumerStatus]) -> String {
    let mut out = format!(
        "{:<24} {:>10} {:>10} {:>10} {:>10} {:>8} {:>12}\n",
        "consumer", "received", "duplicates", "pending", "processed", "parked", "oldest_s"
    );
    for r in rows {
        let oldest = r
            .oldest_pending_secs
            .map(|s| format!("{s:.1}"))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<24} {:>10} {:>10} {:>10} {:>10} {:>8} {:>12}\n",
            r.consumer, r.received, r.duplicates, r.pending, r.processed, r.parked, oldest
        ));
    }
    out
}
