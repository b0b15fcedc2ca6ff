//! `kurier status` and `kurier dead-letters`: the outbox for operators.

use clap::Subcommand;
use kurier::outbox::store::dead_letter::{self, Selection};
use kurier::outbox::store::maintenance::TableHealth;
use kurier::outbox::store::status::{self, Status};
use kurier::SchemaName;
use sqlx::PgPool;

#[derive(Subcommand)]
pub enum DeadLetterCommand {
    /// Show dead letters with their reasons.
    List {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Move dead letters back into the outbox (same message-id).
    Retry(Which),
    /// Delete dead letters for good.
    Discard(Which),
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
pub struct Which {
    /// Dead letter ids (as listed).
    #[arg(long = "id", num_args = 1..)]
    ids: Vec<i64>,
    /// Every dead letter.
    #[arg(long)]
    all: bool,
}

impl Which {
    fn selection(&self) -> Selection {
        if self.all {
            Selection::All
        } else {
            Selection::Ids(self.ids.clone())
        }
    }
}

pub async fn status(pool: &PgPool, schema: &SchemaName, json: bool) -> anyhow::Result<()> {
    let status = status::outbox(pool, schema).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&status));
    }
    Ok(())
}

pub async fn dead_letters(
    cmd: DeadLetterCommand,
    pool: &PgPool,
    schema: &SchemaName,
) -> anyhow::Result<()> {
    match cmd {
        DeadLetterCommand::List { json, limit } => {
            let rows = dead_letter::list(pool, schema, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", render_dead_letters(rows));
            }
        }
        DeadLetterCommand::Retry(which) => println!(
            "moved {} dead letter(s) back to the outbox",
            dead_letter::retry(pool, schema, &which.selection()).await?
        ),
        DeadLetterCommand::Discard(which) => println!(
            "discarded {} dead letter(s)",
            dead_letter::discard(pool, schema, &which.selection()).await?
        ),
    }
    Ok(())
}

fn render_dead_letters(rows: Vec<dead_letter::DeadLetter>) -> String {
    let mut out = format!(
        "{:>8} {:<24} {:<16} {:>9} {:>8}  error\n",
        "id", "topic", "key", "bytes", "attempts"
    );
    for r in rows {
        let size = r
            .payload_size
            .map(|s| s.to_string())
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:>8} {:<24} {:<16} {:>9} {:>8}  {}\n",
            r.id,
            r.topic,
            r.key.unwrap_or_default(),
            size,
            r.attempts,
            r.error
        ));
    }
    out
}

/// The human table `kurier status` prints.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let oldest = s
        .oldest_pending_secs
        .map(|v| format!("{v:.1}s"))
        .unwrap_or_else(|| "-".into());
    out.push_str(&format!(
        "outbox {}: {} pending (oldest {oldest}), {} retrying; {} dead letters\n",
        s.schema, s.pending, s.retrying, s.dead_letters
    ));
    if !s.per_topic.is_empty() {
        out.push_str(&format!("{:<40} {:>10}\n", "topic", "pending"));
        for t in &s.per_topic {
            out.push_str(&format!("{:<40} {:>10}\n", t.topic, t.pending));
        }
    }
    if let Some(t) = &s.table {
        out.push_str(&render_table(t));
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

/// The outbox table's upkeep: dead rows pile up where nothing vacuums.
fn render_table(t: &TableHealth) -> String {
    let ago =
        |secs: Option<f64>| secs.map_or_else(|| "never".to_owned(), |s| format!("{s:.0}s ago"));
    format!(
        "table: {} live, {} dead rows, {:.1} MiB; last vacuum {}, last analyze {}; autovacuum {}\n",
        t.live_rows,
        t.dead_rows,
        t.total_bytes as f64 / (1 << 20) as f64,
        ago(t.since_vacuum_secs),
        ago(t.since_analyze_secs),
        if t.autovacuum_reaches {
            "reaches it"
        } else {
            "cannot reach it (kurier check)"
        }
    )
}
