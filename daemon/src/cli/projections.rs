//! `kurier projections`: how far each projection is, and the operator's
//! actions (pause, resume, skip a failing event, rebuild).

use clap::Subcommand;
use kurier::projection::store::{self, Action, Status};
use kurier::SchemaName;
use sqlx::PgPool;

#[derive(Subcommand)]
pub enum ProjectionCommand {
    /// Position, events and seconds behind, status and last error of each projection.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Stop running a projection (its position is kept).
    Pause { name: String },
    /// Run a paused or parked projection again (after fixing its handler).
    Resume { name: String },
    /// Move a parked projection past its failing event (recorded, with the reason).
    Skip {
        name: String,
        /// The failing event's global position, as `status` shows it.
        #[arg(long)]
        position: i64,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Reset the read model (the projection's reset function) and replay from position 0.
    Rebuild { name: String },
}

pub async fn run(cmd: ProjectionCommand, pool: &PgPool, schema: &SchemaName) -> anyhow::Result<()> {
    let (name, action) = match cmd {
        ProjectionCommand::Status { json } => {
            let rows = store::status(pool, schema).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", render(&rows));
            }
            return Ok(());
        }
        ProjectionCommand::Pause { name } => (name, Action::Pause),
        ProjectionCommand::Resume { name } => (name, Action::Resume),
        ProjectionCommand::Skip {
            name,
            position,
            reason,
        } => (name, Action::Skip { position, reason }),
        ProjectionCommand::Rebuild { name } => (name, Action::Rebuild),
    };
    let mut tx = pool.begin().await?;
    let result = store::act(&mut tx, schema, &name, &action).await?;
    tx.commit().await?;
    println!("{name}: {result}");
    Ok(())
}

fn render(rows: &[Status]) -> String {
    let mut out = format!(
        "{:<24} {:<11} {:>10} {:>10} {:>9}  last error\n",
        "projection", "status", "position", "behind", "behind_s"
    );
    for p in rows {
        let error = match (&p.last_error, p.failed_position) {
            (Some(e), Some(at)) => {
                format!("at {at} ({} attempts): {e}", p.failed_attempts.unwrap_or(0))
            }
            (Some(e), None) => e.clone(),
            _ => String::new(),
        };
        out.push_str(&format!(
            "{:<24} {:<11} {:>10} {:>10} {:>9.1}  {error}\n",
            p.name, p.status, p.position, p.events_behind, p.seconds_behind
        ));
    }
    out
}
