//! The command line: what `kurier` accepts, and each command's run and
//! output. `main.rs` parses, loads the configuration and calls [`dispatch`].

mod events;
mod inbox;
mod outbox;
mod projections;
mod sagas;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kurier::SchemaName;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::check::Level;
use crate::config::{Config, ConfigError};

/// Transactional outbox relay: PostgreSQL → Kafka.
#[derive(Parser)]
#[command(version, about)]
pub struct Cli {
    /// TOML config file (see config.example.toml); environment variables override it.
    #[arg(long, global = true, env = "KURIER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address of /healthz, /readyz and /metrics (e.g. 127.0.0.1:9187).
    #[arg(long, global = true)]
    pub http_addr: Option<String>,
    /// The Kurier schema `status`, `dead-letters` and `inbox` look at.
    #[arg(long, global = true, default_value = "kurier", value_parser = schema_name)]
    pub schema: SchemaName,
    #[command(subcommand)]
    pub command: Command,
}

fn schema_name(s: &str) -> Result<SchemaName, String> {
    SchemaName::new(s)
}

#[derive(Subcommand)]
pub enum Command {
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
    Inbox(inbox::InboxCommand),
    /// List, retry or discard outbox rows that could not be published.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(outbox::DeadLetterCommand),
    /// List sagas, show one's history, retry, compensate or resume one.
    #[command(subcommand)]
    Sagas(sagas::SagaCommand),
    /// Show a stream, tail the global order, erase a stream, store figures.
    #[command(subcommand)]
    Events(events::EventCommand),
    /// Projections: status, pause, resume, skip a failing event, rebuild.
    #[command(subcommand)]
    Projections(projections::ProjectionCommand),
}

impl Command {
    /// Commands that talk to Kafka refuse a configuration without brokers;
    /// the others need only the database.
    pub fn check_config(&self, config: Config) -> Result<Config, ConfigError> {
        if matches!(self, Command::Run | Command::Check) {
            config.require_kafka()?;
        }
        Ok(config)
    }

    /// `run` stops gracefully on SIGTERM/SIGINT; the other commands keep
    /// the default (exit at once).
    pub fn stops_on_signal(&self) -> bool {
        matches!(
            self,
            Command::Run | Command::Events(events::EventCommand::Tail { .. })
        )
    }
}

/// Runs `cli.command`; `shutdown` stops `run` (the caller wires it to signals).
pub async fn dispatch(cli: Cli, config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    match cli.command {
        Command::Migrate => migrate(&config).await,
        Command::Run => run(config, shutdown).await,
        Command::Check => check(&config).await,
        Command::Status { json } => {
            outbox::status(&connect(&config).await?, &cli.schema, json).await
        }
        Command::Inbox(cmd) => {
            inbox::run(cmd, &config, &connect(&config).await?, &cli.schema).await
        }
        Command::DeadLetters(cmd) => {
            outbox::dead_letters(cmd, &connect(&config).await?, &cli.schema).await
        }
        Command::Sagas(cmd) => {
            sagas::run(cmd, &connect(&config).await?, &config.sagas.schema).await
        }
        Command::Events(cmd) => {
            events::run(cmd, &connect(&config).await?, &cli.schema, shutdown).await
        }
        Command::Projections(cmd) => {
            let schema = &config.projections.schema;
            projections::run(cmd, &connect(&config).await?, schema).await
        }
    }
}

async fn connect(config: &Config) -> anyhow::Result<PgPool> {
    PgPool::connect_with(config.database.connect_options().clone())
        .await
        .context("connect to the database")
}

async fn migrate(config: &Config) -> anyhow::Result<()> {
    let pool = connect(config).await?;
    let schemas = config.schemas();
    kurier::schema::migrate(&pool, &schemas)
        .await
        .context("migrate")?;
    kurier::schema::debezium::install(&pool, &config.debezium)
        .await
        .context("install Debezium-shape capture triggers")?;
    let names: Vec<String> = schemas.iter().map(|s| s.to_string()).collect();
    tracing::info!(schemas = ?names, debezium_tables = config.debezium.len(), "schema up to date");
    Ok(())
}

async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let daemon = crate::Daemon::bind(config).await?;
    if let Some(addr) = daemon.http_addr() {
        tracing::info!(%addr, "HTTP endpoints: /healthz /readyz /metrics");
    }
    daemon.run(shutdown).await?;
    Ok(())
}

async fn check(config: &Config) -> anyhow::Result<()> {
    let findings = crate::check::run(config).await;
    for f in &findings {
        match f.level {
            Level::Ok => println!("ok    {}", f.what),
            Level::Warn => println!("WARN  {}\n      fix: {}", f.what, f.fix),
            Level::Fail => println!("FAIL  {}\n      fix: {}", f.what, f.fix),
        }
    }
    let failed = findings.iter().filter(|f| f.level == Level::Fail).count();
    anyhow::ensure!(failed == 0, "{failed} check(s) failed");
    Ok(())
}
