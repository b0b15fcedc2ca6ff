//! Event sourcing with Kurier, end to end, on PostgreSQL alone:
//! an `Account` aggregate (typed events, one upcaster), commands executed
//! with optimistic concurrency, a snapshot, a temporal load, an old-shape
//! event appended in SQL (as another language would) and upcast on read, a read model
//! built by a Rust projection, a field crypto-shredded and then forgotten,
//! and a stream erased. Every append also lands in `kurier.outbox`, so a
//! running `kurier run` publishes it to Kafka (topic `account`).
//!
//!   DATABASE_URL=postgres://... cargo run -p kurier-daemon --example bank-account
//!
//! It links only the `kurier` library (with its `crypto-shredding` feature).

use std::time::Duration;

use futures::future::BoxFuture;
use kurier::events::aggregate::stream_of;
use kurier::events::shredding::{Revealed, Shredder};
use kurier::events::{Aggregate, AsOf, DomainEvent, EventStore, RecordedEvent};
use kurier::inbox::HandlerError;
use kurier::projection::{Projection, ProjectionRunner};
use kurier::SchemaName;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
enum AccountEvent {
    /// `email` is sealed with the owner's key (crypto-shredding).
    Opened {
        owner: String,
        email: serde_json::Value,
    },
    /// Version 1 stored whole euros as `amount`; version 2 stores `cents`.
    Deposited {
        cents: i64,
    },
    Withdrawn {
        cents: i64,
    },
}

impl DomainEvent for AccountEvent {
    fn schema_version(event_type: &str) -> u32 {
        if event_type == "Deposited" {
            2
        } else {
            1
        }
    }
    fn upcast(event_type: &str, version: u32, data: serde_json::Value) -> serde_json::Value {
        match (event_type, version) {
            ("Deposited", 1) => json!({ "cents": data["amount"].as_i64().unwrap_or(0) * 100 }),
            _ => data,
        }
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Account {
    owner: Option<String>,
    balance: i64,
}

#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("the account is not open")]
    NotOpen,
    #[error("insufficient funds: {0} cents available")]
    Insufficient(i64),
}

enum Command {
    Open {
        owner: String,
        email: serde_json::Value,
    },
    Deposit(i64),
    Withdraw(i64),
}

impl Aggregate for Account {
    type Event = AccountEvent;
    type Command = Command;
    type Rejection = Refused;
    fn category() -> &'static str {
        "account"
    }
    fn apply(&mut self, e: &AccountEvent) {
        match e {
            AccountEvent::Opened { owner, .. } => self.owner = Some(owner.clone()),
            AccountEvent::Deposited { cents } => self.balance += cents,
            AccountEvent::Withdrawn { cents } => self.balance -= cents,
        }
    }
    fn decide(&self, c: &Command) -> Result<Vec<AccountEvent>, Refused> {
        match (c, &self.owner) {
            (Command::Open { owner, email }, None) => Ok(vec![AccountEvent::Opened {
                owner: owner.clone(),
                email: email.clone(),
            }]),
            (Command::Open { .. }, Some(_)) => Ok(vec![]),
            (_, None) => Err(Refused::NotOpen),
            (Command::Deposit(cents), _) => Ok(vec![AccountEvent::Deposited { cents: *cents }]),
            (Command::Withdraw(cents), _) if *cents > self.balance => {
                Err(Refused::Insufficient(self.balance))
            }
            (Command::Withdraw(cents), _) => Ok(vec![AccountEvent::Withdrawn { cents: *cents }]),
        }
    }
}

/// A read model: balances per account, kept by a Rust projection.
struct Balances;

impl Projection for Balances {
    fn name(&self) -> &str {
        "example_balances"
    }
    fn categories(&self) -> Option<Vec<String>> {
        Some(vec!["account".into()])
    }
    fn apply<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        e: &'a RecordedEvent,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let delta = match e.event_type.as_str() {
                "StreamErased" => {
                    sqlx::query("DELETE FROM example_balances WHERE stream = $1")
                        .bind(&e.stream)
                        .execute(tx)
                        .await?;
                    return Ok(());
                }
                "Deposited" => e.data.as_ref().and_then(|d| {
                    d["cents"]
                        .as_i64()
                        .or(d["amount"].as_i64().map(|a| a * 100))
                }),
                "Withdrawn" => e
                    .data
                    .as_ref()
                    .and_then(|d| d["cents"].as_i64())
                    .map(|c| -c),
                _ => Some(0),
            };
            sqlx::query("INSERT INTO example_balances VALUES ($1, $2) ON CONFLICT (stream) DO UPDATE SET cents = example_balances.cents + $2")
                .bind(&e.stream)
                .bind(delta.unwrap_or(0))
                .execute(tx)
                .await?;
            Ok(())
        })
    }
    fn reset<'a>(&'a self, tx: &'a mut PgConnection) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            sqlx::query("TRUNCATE example_balances").execute(tx).await?;
            Ok(())
        })
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let pool = PgPool::connect(&std::env::var("DATABASE_URL")?).await?;
    kurier::schema::migrate(&pool, &[]).await?;
    sqlx::query("CREATE TABLE IF NOT EXISTS example_balances (stream text PRIMARY KEY, cents bigint NOT NULL)")
        .execute(&pool)
        .await?;
    let (es, shredder) = (
        EventStore::new(pool.clone()),
        Shredder::new(pool.clone(), SchemaName::kurier()),
    );
    let id = uuid::Uuid::new_v4().simple().to_string();
    let subject = format!("customer-{id}");

    let email = shredder
        .encrypt(&subject, &json!("ada@example.com"))
        .await?;
    es.execute::<Account>(
        &id,
        &Command::Open {
            owner: "Ada".into(),
            email,
        },
        5,
    )
    .await?;
    for cents in [1000, 2500, 400] {
        es.execute::<Account>(&id, &Command::Deposit(cents), 5)
            .await?;
    }
    let refused = es
        .execute::<Account>(&id, &Command::Withdraw(1_000_000), 5)
        .await
        .unwrap_err();
    println!("withdraw 10,000.00 refused: {refused}");
    let now = es.load::<Account>(&id).await?;
    es.save_snapshot(&id, &now).await?;
    es.execute::<Account>(&id, &Command::Withdraw(900), 5)
        .await?;
    let then = es.load_as_of::<Account>(&id, AsOf::Version(2)).await?;
    let now = es.load::<Account>(&id).await?;
    println!(
        "stream {}: balance {} cents at version 2, {} now (version {:?})",
        stream_of::<Account>(&id),
        then.state.balance,
        now.state.balance,
        now.version
    );

    let runner =
        ProjectionRunner::new(pool.clone(), Balances).poll_interval(Duration::from_millis(20));
    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let cancel = cancel.clone();
        async move { runner.run(&cancel).await }
    });
    let stream = stream_of::<Account>(&id);
    // An older service, in any language, appends through SQL: a Deposited of
    // schema version 1 (whole euros as `amount`), read back upcast to cents.
    sqlx::query(
        "SELECT kurier.append_event($1, 'Deposited', '{\"amount\": 5}', '{\"schema_version\": 1}')",
    )
    .bind(&stream)
    .execute(&pool)
    .await?;
    let now = es.load::<Account>(&id).await?;
    println!(
        "after a version-1 Deposited of 5 euros appended in SQL: {} cents (version {:?})",
        now.state.balance, now.version
    );
    let balance = wait_for_balance(&pool, &stream, now.state.balance).await?;
    println!("read model: {stream} holds {balance} cents");

    let opened = es.read_stream(&stream, 0, 1).await?.remove(0);
    let sealed = opened.data.unwrap_or_default()["email"].clone();
    println!(
        "email as stored: {}",
        shredder.decrypt(&sealed).await.map(|r| format!("{r:?}"))?
    );
    shredder.forget(&subject).await?;
    match shredder.decrypt(&sealed).await? {
        Revealed::Forgotten { subject } => {
            println!("after forget_subject({subject}): the email is gone from every copy")
        }
        Revealed::Value(v) => anyhow::bail!("still readable: {v}"),
    }

    let erased = es
        .erase_stream(&stream, "customer asked to be forgotten")
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left: Option<i64> =
        sqlx::query_scalar("SELECT cents FROM example_balances WHERE stream = $1")
            .bind(&stream)
            .fetch_optional(&pool)
            .await?;
    println!("erased {erased} events; read model row after the StreamErased marker: {left:?}");
    cancel.cancel();
    run.await??;
    Ok(())
}

async fn wait_for_balance(pool: &PgPool, stream: &str, want: i64) -> anyhow::Result<i64> {
    for _ in 0..200 {
        let cents: Option<i64> =
            sqlx::query_scalar("SELECT cents FROM example_balances WHERE stream = $1")
                .bind(stream)
                .fetch_optional(pool)
                .await?;
        if cents == Some(want) {
            return Ok(want);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("the projection did not catch up")
}
