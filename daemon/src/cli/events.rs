//! `kurier events`: a stream's events, tailing the global order, erasure,
//! and the store's figures (with who holds `read_all` back).

use std::time::Duration;

use clap::Subcommand;
use kurier::events::{store, RecordedEvent};
use kurier::SchemaName;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

#[derive(Subcommand)]
pub enum EventCommand {
    /// A stream's events, oldest first.
    Show {
        stream: String,
        #[arg(long, default_value_t = 0)]
        from: i64,
        #[arg(long, default_value_t = 1000)]
        limit: i32,
        #[arg(long)]
        json: bool,
    },
    /// Follow the global order from a position (gap-safe), until Ctrl-C.
    Tail {
        #[arg(long)]
        category: Option<String>,
        /// Start after this global position (default: the start).
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[arg(long)]
        json: bool,
    },
    /// GDPR erasure of a stream (events, snapshot, unpublished outbox rows;
    /// a StreamErased marker and a Kafka tombstone follow).
    Erase {
        stream: String,
        #[arg(long)]
        reason: String,
    },
    /// Streams, events, erasures, and the transactions holding read_all back.
    Stats {
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(
    cmd: EventCommand,
    pool: &PgPool,
    schema: &SchemaName,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    match cmd {
        EventCommand::Show {
            stream,
            from,
            limit,
            json,
        } => {
            let events = store::read_stream(pool, schema, &stream, from, limit).await?;
            anyhow::ensure!(
                !events.is_empty() || from > 0,
                "stream {stream} has no events"
            );
            print_events(&events, json)?;
        }
        EventCommand::Tail {
            category,
            after,
            json,
        } => tail(pool, schema, category, after, json, stop).await?,
        EventCommand::Erase { stream, reason } => {
            let n = store::erase_stream(pool, schema, &stream, &reason).await?;
            println!("erased {n} event(s) of {stream}; a StreamErased marker and a tombstone are on their way");
        }
        EventCommand::Stats { json } => stats(pool, schema, json).await?,
    }
    Ok(())
}

async fn tail(
    pool: &PgPool,
    schema: &SchemaName,
    category: Option<String>,
    mut after: i64,
    json: bool,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    while !stop.is_cancelled() {
        let events = store::read_all(pool, schema, after, 500, category.as_deref()).await?;
        if let Some(last) = events.last() {
            after = last.global_position;
            print_events(&events, json)?;
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    Ok(())
}

async fn stats(pool: &PgPool, schema: &SchemaName, json: bool) -> anyhow::Result<()> {
    let stats = store::stats(pool, schema).await?;
    let holders = store::horizon(pool, schema).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"stats": stats, "horizon": holders}))?
        );
        return Ok(());
    }
    println!(
        "{} streams, {} events (last position {}), {} erasures, {} version conflicts",
        stats.streams,
        stats.events,
        stats.last_position,
        stats.erasures,
        stats
            .version_conflicts
            .map_or("n/a (run `kurier migrate`)".to_string(), |n| n.to_string())
    );
    println!(
        "read_all held back: {} events behind {} transaction(s)",
        stats.unreadable_events, stats.horizon_holders
    );
    for h in holders {
        println!(
            "  pid {} ({}) holds position {} for {:.1}s",
            h.pid.map_or("-".into(), |p| p.to_string()),
            h.application_name.unwrap_or_default(),
            h.position.map_or("-".into(), |p| p.to_string()),
            h.transaction_age_secs.unwrap_or(0.0)
        );
    }
    Ok(())
}

fn print_events(events: &[RecordedEvent], json: bool) -> anyhow::Result<()> {
    for e in events {
        if json {
            println!("{}", serde_json::to_string(e)?);
        } else {
            let data = match (&e.data, &e.data_bytes) {
                (Some(d), _) => d.to_string(),
                (None, Some(b)) => format!("<{} bytes>", b.len()),
                _ => String::new(),
            };
            println!(
                "{:>8}  {}@{:<4} {:<20} {}",
                e.global_position, e.stream, e.version, e.event_type, data
            );
        }
    }
    Ok(())
}
