//! The `kurier` binary: parse, wire, run. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kurier::config::{Config, Overrides, ProcessEnv};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

// The relay allocates a few small buffers per message (row columns, headers,
// delivery futures); mimalloc serves them with much less CPU than glibc's
// malloc, which `make bench` profiling showed at ~30% of the relay's time.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_t` (include/mimalloc.h);
/// libmimalloc-sys leaves the numbers of such options unnamed.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// mimalloc hands freed pages back to the OS `purge_delay` ms after they were
/// freed, 1,000 ms by default: a relay that frees a batch every few dozen
/// milliseconds kept memory it no longer used. 100 ms took its peak RSS from
/// 36-40 to 32-34 MiB in drains of 200k rows, CPU within noise (0 gave 27-29
/// MiB for ~10% more CPU). `MIMALLOC_PURGE_DELAY` in the environment wins.
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // Safety: called first thing in `main`, before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 100) };
}

/// Transactional outbox relay: PostgreSQL → Kafka.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// TOML config file (see config.example.toml); environment variables override it.
    #[arg(long, global = true, env = "KURIER_CONFIG")]
    config: Option<PathBuf>,
    /// Address of /healthz, /readyz and /metrics (e.g. 127.0.0.1:9187).
    #[arg(long, global = true)]
    http_addr: Option<String>,
    /// The Kurier schema `status` and `dead-letters` look at (one of relay.schemas).
    #[arg(long, global = true, default_value = "kurier")]
    schema: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create or update the `kurier` schema, every schema in relay.schemas, and the
    /// capture triggers of Debezium-shape tables (idempotent, safe to run concurrently).
    Migrate,
    /// Run the relay until SIGTERM/SIGINT.
    Run,
    /// Validate the configuration and connectivity (database, schema, rights, Kafka).
    Check,
    /// Outbox backlog, oldest pending age, per-topic counts, relay leases, dead letters.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Inspect and manage the inbox.
    #[command(subcommand)]
    Inbox(InboxCommand),
    /// List, retry or discard outbox rows that could not be published.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLetterCommand),
}

#[derive(Subcommand)]
enum DeadLetterCommand {
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
struct Which {
    /// Dead letter ids (as listed).
    #[arg(long = "id", num_args = 1..)]
    ids: Vec<i64>,
    /// Every dead letter.
    #[arg(long)]
    all: bool,
}

impl Which {
    fn selection(&self) -> kurier::dead_letter::Selection {
        if self.all {
            kurier::dead_letter::Selection::All
        } else {
            kurier::dead_letter::Selection::Ids(self.ids.clone())
        }
    }
}

#[derive(Subcommand)]
enum InboxCommand {
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

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    let overrides = Overrides {
        http_addr: cli.http_addr.clone(),
    };
    let config = match Config::load(cli.config.as_deref(), &ProcessEnv, &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kurier: configuration refused: {e}");
            return ExitCode::from(2);
        }
    };
    if matches!(cli.command, Command::Run | Command::Check) {
        if let Err(e) = config.require_kafka() {
            eprintln!("kurier: configuration refused: {e}");
            return ExitCode::from(2);
        }
    }
    kurier::telemetry::init(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let schema = match kurier::schema::SchemaName::new(&cli.schema) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kurier: --schema refused: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(dispatch(cli.command, config, schema)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("kurier: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(
    command: Command,
    config: Config,
    schema: kurier::schema::SchemaName,
) -> anyhow::Result<()> {
    match command {
        Command::Migrate => {
            kurier::schema::migrate(&config.database_url, &config.relay.schemas)
                .await
                .context("migrate")?;
            kurier::debezium::install(&config.database_url, &config.debezium)
                .await
                .context("install Debezium-shape capture triggers")?;
            let schemas: Vec<String> = config.relay.schemas.iter().map(|s| s.to_string()).collect();
            tracing::info!(schemas = ?schemas, debezium_tables = config.debezium.len(), "schema up to date");
        }
        Command::Run => run(config).await?,
        Command::Check => check(&config).await?,
        Command::Status { json } => {
            let pool = sqlx::PgPool::connect(&config.database_url)
                .await
                .context("connect to the database")?;
            let status = kurier::status::outbox(&pool, &schema).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", kurier::status::render(&status));
            }
        }
        Command::Inbox(cmd) => inbox(cmd, &config).await?,
        Command::DeadLetters(cmd) => dead_letters(cmd, &config, &schema).await?,
    }
    Ok(())
}

async fn check(config: &Config) -> anyhow::Result<()> {
    let findings = kurier::check::run(config).await;
    for f in &findings {
        if f.ok {
            println!("ok    {}", f.what);
        } else {
            println!("FAIL  {}\n      fix: {}", f.what, f.fix);
        }
    }
    let failed = findings.iter().filter(|f| !f.ok).count();
    anyhow::ensure!(failed == 0, "{failed} check(s) failed");
    Ok(())
}

async fn dead_letters(
    cmd: DeadLetterCommand,
    config: &Config,
    schema: &kurier::schema::SchemaName,
) -> anyhow::Result<()> {
    use kurier::dead_letter;
    let pool = sqlx::PgPool::connect(&config.database_url)
        .await
        .context("connect to the database")?;
    match cmd {
        DeadLetterCommand::List { json, limit } => {
            let rows = dead_letter::list(&pool, schema, limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:>8} {:<24} {:<16} {:>9} {:>8}  error",
                    "id", "topic", "key", "bytes", "attempts"
                );
                for r in rows {
                    let size = r
                        .payload_size
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "-".into());
                    println!(
                        "{:>8} {:<24} {:<16} {:>9} {:>8}  {}",
                        r.id,
                        r.topic,
                        r.key.unwrap_or_default(),
                        size,
                        r.attempts,
                        r.error
                    );
                }
            }
        }
        DeadLetterCommand::Retry(which) => println!(
            "moved {} dead letter(s) back to the outbox",
            dead_letter::retry(&pool, schema, &which.selection()).await?
        ),
        DeadLetterCommand::Discard(which) => println!(
            "discarded {} dead letter(s)",
            dead_letter::discard(&pool, schema, &which.selection()).await?
        ),
    }
    Ok(())
}

async fn inbox(cmd: InboxCommand, config: &Config) -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect(&config.database_url)
        .await
        .context("connect to the database")?;
    match cmd {
        InboxCommand::Status { json } => {
            let rows = kurier::inbox::status(&pool).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<24} {:>10} {:>10} {:>10} {:>10} {:>8} {:>12}",
                    "consumer",
                    "received",
                    "duplicates",
                    "pending",
                    "processed",
                    "parked",
                    "oldest_s"
                );
                for r in rows {
                    let oldest = r
                        .oldest_pending_secs
                        .map(|s| format!("{s:.1}"))
                        .unwrap_or_else(|| "-".into());
                    println!(
                        "{:<24} {:>10} {:>10} {:>10} {:>10} {:>8} {:>12}",
                        r.consumer,
                        r.received,
                        r.duplicates,
                        r.pending,
                        r.processed,
                        r.parked,
                        oldest
                    );
                }
            }
        }
        InboxCommand::Unpark { consumer, id } => {
            let n = kurier::inbox::unpark(&pool, &consumer, id).await?;
            println!("unparked {n} message(s) of consumer {consumer}");
        }
        InboxCommand::Prune => {
            let cfg = config.inbox.clone().context("no inbox configured: set inbox.topics / KURIER_INBOX_TOPICS (retention settings live there)")?;
            let (pruned, deleted) =
                kurier::inbox::prune(&pool, cfg.prune_payload_after, cfg.forget_after).await?;
            println!("payloads pruned: {pruned}; rows forgotten: {deleted}");
        }
    }
    Ok(())
}

async fn run(config: Config) -> anyhow::Result<()> {
    let daemon = kurier::Daemon::bind(config).await?;
    if let Some(addr) = daemon.http_addr() {
        tracing::info!(%addr, "HTTP endpoints: /healthz /readyz /metrics");
    }
    let cancel = CancellationToken::new();
    tokio::spawn(on_signals(cancel.clone()));
    daemon.run(cancel).await?;
    Ok(())
}

/// First SIGTERM/SIGINT: graceful stop. Second: exit at once.
async fn on_signals(cancel: CancellationToken) {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!(
        "shutdown requested: finishing the in-flight batch (signal again to exit at once)"
    );
    cancel.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    eprintln!("kurier: second signal, exiting without waiting");
    std::process::exit(130);
}

#[cfg(test)]
mod tests {
    /// Option 15 (`PURGE_DELAY`) is the purge delay: its v3 default is 1,000 ms, which no
    /// other mimalloc option has. Catches a mimalloc update renumbering it.
    #[test]
    fn option_15_is_mimallocs_purge_delay() {
        assert!(
            std::env::var_os("MIMALLOC_PURGE_DELAY").is_none(),
            "unset MIMALLOC_PURGE_DELAY to run this test"
        );
        assert_eq!(
            unsafe { libmimalloc_sys::mi_option_get(super::PURGE_DELAY) },
            1000
        );
    }
}
