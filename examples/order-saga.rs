//! An order process as a saga: reserve stock → charge the card → ship, over
//! Kafka, with three participants that each own a schema of their own (as
//! separate services own their databases) and run Kurier in-process: their
//! inbox receives the commands, their outbox carries the replies, in the
//! same transaction as their own changes. A payment failure compensates the
//! stock reservation.
//!
//!   order-saga define    [--prefix P]                 # the saga type `P` (default `order`)
//!   order-saga start     [--prefix P] [--count N] [--rate R] [--decline-over CENTS]
//!   order-saga participant stock|payment|shipping [--prefix P]
//!
//! with DATABASE_URL and KAFKA_BROKERS set. Participants also obey the saga's
//! data, for tests: `"fail_at": "<step>"` answers that step with a failure,
//! `"silent": "<step>"` never answers it, `"compensation_failures":
//! {"<step>": n}` fails its first n compensations.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use futures::future::BoxFuture;
use kurier::inbox::{HandlerError, Processor};
use kurier::saga::participant::{CommandHandler, Participant, Reply, SagaCommand};
use kurier::saga::Step;
use kurier::SchemaName;
use kurier_daemon::config::{Config, Overrides, ProcessEnv};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Cli {
    /// The saga type, and the prefix of its topics.
    #[arg(long, default_value = "order", global = true)]
    prefix: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Define the saga type (idempotent).
    Define,
    /// Place orders: each one an order row and a saga, in one transaction.
    Start {
        #[arg(long, default_value_t = 10)]
        count: u64,
        /// Orders per second.
        #[arg(long, default_value_t = 1.0)]
        rate: f64,
        /// The payment service declines totals above this many cents.
        #[arg(long, default_value_t = 5000)]
        decline_over: i64,
    },
    /// Run one participant service until SIGTERM/SIGINT.
    Participant { role: Role },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Role {
    Stock,
    Payment,
    Shipping,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Stock => "stock",
            Role::Payment => "payment",
            Role::Shipping => "shipping",
        }
    }

    /// (command topic, compensation topic)
    fn topics(self, prefix: &str) -> (String, Option<String>) {
        let (command, undo) = match self {
            Role::Stock => ("reserve", Some("release")),
            Role::Payment => ("charge", Some("refund")),
            Role::Shipping => ("ship", None),
        };
        let topic = |verb: &str| format!("{prefix}.{}.{verb}", self.name());
        (topic(command), undo.map(topic))
    }
}

const ROLES: [Role; 3] = [Role::Stock, Role::Payment, Role::Shipping];

/// The saga type: one step per participant, in order.
fn steps(prefix: &str) -> Vec<Step> {
    ROLES
        .iter()
        .map(|r| {
            let (command, undo) = r.topics(prefix);
            let step = Step::new(r.name(), command).timeout_ms(10_000);
            match undo {
                Some(t) => step.compensate_on(t),
                None => step,
            }
        })
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let url = std::env::var("DATABASE_URL").context("set DATABASE_URL")?;
    let pool = PgPool::connect(&url).await?;
    match cli.command {
        Command::Define => define(&pool, &cli.prefix).await?,
        Command::Start {
            count,
            rate,
            decline_over,
        } => start(&pool, &cli.prefix, count, rate, decline_over).await?,
        Command::Participant { role } => participant(pool, &cli.prefix, role).await?,
    }
    Ok(())
}

/// Defines the saga type and creates its topics (where the broker lets us),
/// so that participants subscribing now find them.
async fn define(pool: &PgPool, prefix: &str) -> anyhow::Result<()> {
    let steps = steps(prefix);
    kurier::saga::define(pool, &SchemaName::kurier(), prefix, &steps, None).await?;
    let mut topics = vec![format!("saga.{prefix}.replies")];
    for s in &steps {
        topics.push(s.command_topic.clone());
        topics.extend(s.compensation_topic.clone());
    }
    let config = Config::from_toml("", &ProcessEnv, &Overrides::default())?;
    config.require_kafka()?;
    let created = kurier_daemon::kafka::cluster::ensure_topics(&config.kafka, &topics, 3)
        .await
        .map_err(anyhow::Error::msg)?;
    println!("defined saga type {prefix}; created topics {created:?}");
    Ok(())
}

/// The application's side: the order and its saga commit together.
async fn start(
    pool: &PgPool,
    prefix: &str,
    count: u64,
    rate: f64,
    decline_over: i64,
) -> anyhow::Result<()> {
    sqlx::query("CREATE TABLE IF NOT EXISTS demo_saga_orders (id uuid PRIMARY KEY, total_cents bigint NOT NULL)")
        .execute(pool)
        .await?;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
    for n in 0..count {
        tick.tick().await;
        let id = uuid::Uuid::new_v4();
        let total = ((n * 1777) % 9000) as i64 + 100;
        let mut tx = pool.begin().await?;
        sqlx::query("INSERT INTO demo_saga_orders (id, total_cents) VALUES ($1, $2)")
            .bind(id)
            .bind(total)
            .execute(&mut *tx)
            .await?;
        let data =
            serde_json::json!({"order": id, "total_cents": total, "decline_over": decline_over});
        kurier::saga::start(&mut *tx, &SchemaName::kurier(), prefix, id, &data).await?;
        tx.commit().await?;
        println!("order {id} ({total} cents): saga started");
    }
    Ok(())
}

/// One participant service: Kurier in-process (inbox for its commands,
/// relay for its replies, both in its own schema) and its handler.
async fn participant(pool: PgPool, prefix: &str, role: Role) -> anyhow::Result<()> {
    let schema = SchemaName::new(role.name()).map_err(anyhow::Error::msg)?;
    kurier::schema::migrate(&pool, std::slice::from_ref(&schema)).await?;
    sqlx::raw_sql(&format!(
        "CREATE TABLE IF NOT EXISTS {schema}.effects (id bigserial PRIMARY KEY, saga_id uuid NOT NULL, step text NOT NULL, compensation boolean NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp()); \
         CREATE TABLE IF NOT EXISTS {schema}.compensation_failures (saga_id uuid PRIMARY KEY, failures int NOT NULL)"
    ))
    .execute(&pool)
    .await?;
    let (command, undo) = role.topics(prefix);
    let topics: Vec<String> = std::iter::once(command).chain(undo).collect();
    let toml = format!(
        "[relay]\nschemas = [\"{schema}\"]\n[inbox]\nschema = \"{schema}\"\nconsumer = \"{schema}\"\ntopics = {topics:?}\n\
         [inbox.properties]\n\"session.timeout.ms\" = 6000\n\"max.poll.interval.ms\" = 15000\n\"topic.metadata.refresh.interval.ms\" = 5000\n\"fetch.wait.max.ms\" = 20\n\
         [sagas]\nenabled = false\n"
    );
    let mut config = Config::from_toml(&toml, &ProcessEnv, &Overrides::default())?;
    // The orchestrator's sidecar serves /metrics; a participant's does not.
    config.http_addr = None;
    let cancel = CancellationToken::new();
    let daemon = kurier_daemon::Daemon::bind(config).await?;
    let sidecar = tokio::spawn(daemon.run(cancel.clone()));
    let handler = CommandHandler {
        schema: schema.clone(),
        consumer: schema.to_string(),
        participant: Service {
            role,
            schema: schema.clone(),
        },
    };
    let processor = Processor::new(pool, schema.as_str())
        .schema(schema)
        .batch_size(50)
        .poll_interval(Duration::from_millis(20));
    tokio::spawn(stop_on_signal(cancel.clone()));
    eprintln!("participant {}: handling {topics:?}", role.name());
    processor.run(&handler, &cancel).await?;
    sidecar.await??;
    Ok(())
}

async fn stop_on_signal(cancel: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    cancel.cancel();
}

/// What each participant does with a command, on the handling transaction.
struct Service {
    role: Role,
    schema: SchemaName,
}

impl Participant for Service {
    fn handle<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        cmd: &'a SagaCommand,
    ) -> BoxFuture<'a, Result<Reply, HandlerError>> {
        Box::pin(async move {
            let me = self.role.name();
            let data = &cmd.data;
            if cmd.compensation {
                let fail_first = data["compensation_failures"][me].as_i64().unwrap_or(0);
                if self.failed_compensation(conn, cmd, fail_first).await? {
                    return Ok(Reply::Failure(Some(
                        serde_json::json!({"reason": "undo failed, try again"}),
                    )));
                }
                self.record(conn, cmd).await?;
                println!("{me}: undid {} for saga {}", cmd.step, cmd.saga_id);
                return Ok(Reply::Success(None));
            }
            if data["silent"] == me {
                println!("{me}: saga {} taken on, never answered", cmd.saga_id);
                return Ok(Reply::Later);
            }
            let declined = self.role == Role::Payment
                && data["total_cents"].as_i64() > data["decline_over"].as_i64().or(Some(i64::MAX));
            if data["fail_at"] == me || declined {
                println!("{me}: refused saga {}", cmd.saga_id);
                return Ok(Reply::Failure(Some(
                    serde_json::json!({"reason": format!("{me} refused")}),
                )));
            }
            self.record(conn, cmd).await?;
            println!("{me}: done for saga {}", cmd.saga_id);
            Ok(Reply::Success(Some(
                serde_json::json!({ format!("{me}_done"): true }),
            )))
        })
    }
}

impl Service {
    /// The participant's own change (here: a row saying what it did).
    async fn record(&self, conn: &mut PgConnection, cmd: &SagaCommand) -> Result<(), HandlerError> {
        sqlx::query(&format!(
            "INSERT INTO {}.effects (saga_id, step, compensation) VALUES ($1, $2, $3)",
            self.schema
        ))
        .bind(cmd.saga_id)
        .bind(&cmd.step)
        .bind(cmd.compensation)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Counts this compensation attempt; `true` while fewer than `fail_first` failed.
    async fn failed_compensation(
        &self,
        conn: &mut PgConnection,
        cmd: &SagaCommand,
        fail_first: i64,
    ) -> Result<bool, HandlerError> {
        if fail_first == 0 {
            return Ok(false);
        }
        let failures: i32 = sqlx::query_scalar(&format!(
            "INSERT INTO {}.compensation_failures AS f (saga_id, failures) VALUES ($1, 1) \
             ON CONFLICT (saga_id) DO UPDATE SET failures = f.failures + 1 RETURNING failures",
            self.schema
        ))
        .bind(cmd.saga_id)
        .fetch_one(conn)
        .await?;
        Ok(i64::from(failures) <= fail_first)
    }
}
