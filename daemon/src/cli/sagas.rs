//! `kurier sagas`: list, show (the history), and the operator's actions.

use clap::Subcommand;
use kurier::saga::store::{self, Action, Saga};
use kurier::SchemaName;
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Subcommand)]
pub enum SagaCommand {
    /// Sagas, newest first.
    List {
        /// Only sagas in this status (running, compensating, completed, compensated, failed, parked).
        #[arg(long)]
        status: Option<String>,
        /// Only sagas of this type.
        #[arg(long = "type")]
        saga_type: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// One saga and its whole history (commands, replies, timeouts, operator actions).
    Show {
        id: Uuid,
        #[arg(long)]
        json: bool,
    },
    /// Send the current step's command (or compensation) again.
    Retry { id: Uuid },
    /// Abort a running saga: compensate the steps it completed, in reverse order.
    Compensate {
        id: Uuid,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Send a parked saga's compensation again, with a fresh retry budget.
    Resume { id: Uuid },
}

pub async fn run(cmd: SagaCommand, pool: &PgPool, schema: &SchemaName) -> anyhow::Result<()> {
    match cmd {
        SagaCommand::List {
            status,
            saga_type,
            limit,
            json,
        } => {
            let sagas =
                store::list(pool, schema, status.as_deref(), saga_type.as_deref(), limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sagas)?);
            } else {
                print!("{}", render_list(&sagas));
            }
        }
        SagaCommand::Show { id, json } => show(pool, schema, id, json).await?,
        SagaCommand::Retry { id } => act(pool, schema, id, Action::Retry, None).await?,
        SagaCommand::Compensate { id, reason } => {
            act(pool, schema, id, Action::Compensate, reason.as_deref()).await?
        }
        SagaCommand::Resume { id } => act(pool, schema, id, Action::Resume, None).await?,
    }
    Ok(())
}

async fn show(pool: &PgPool, schema: &SchemaName, id: Uuid, json: bool) -> anyhow::Result<()> {
    let (saga, history) = store::get_with_history(pool, schema, id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no saga {id} in schema {schema}"))?;
    if json {
        let both = serde_json::json!({ "saga": saga, "history": history });
        println!("{}", serde_json::to_string_pretty(&both)?);
        return Ok(());
    }
    print!("{}", render_list(std::slice::from_ref(&saga)));
    println!("data: {}", saga.data);
    for e in history {
        let step = e.step_name.unwrap_or_default();
        let attempt = e.attempt.map(|a| format!("#{a}")).unwrap_or_default();
        println!("  {}  {:<18} {step} {attempt}  {}", e.at, e.kind, e.detail);
    }
    Ok(())
}

async fn act(
    pool: &PgPool,
    schema: &SchemaName,
    id: Uuid,
    action: Action,
    reason: Option<&str>,
) -> anyhow::Result<()> {
    let saga = store::act(pool, schema, id, action, reason).await?;
    print!("{}", render_list(std::slice::from_ref(&saga)));
    Ok(())
}

fn render_list(sagas: &[Saga]) -> String {
    let mut out = format!(
        "{:<36}  {:<16} {:<12} {:<14} {:>7} {:>7}  reason\n",
        "id", "type", "status", "step", "attempt", "version"
    );
    for s in sagas {
        out.push_str(&format!(
            "{:<36}  {:<16} {:<12} {:<14} {:>7} {:>7}  {}\n",
            s.id,
            s.saga_type,
            s.status,
            s.current_step_name.as_deref().unwrap_or("-"),
            s.attempt,
            s.version,
            s.reason.as_deref().unwrap_or("")
        ));
    }
    out
}
