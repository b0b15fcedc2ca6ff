//! HTTP endpoints: `/healthz` (alive), `/readyz` (making progress), `/metrics`.

use std::sync::OnceLock;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use kurier::outbox::store::{maintenance, status};
use kurier::SchemaName;
use sqlx::PgPool;

use crate::health::Health;

/// The process-wide Prometheus recorder, installed on first use (a process has
/// one global `metrics` recorder; tests may start several daemons).
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .set_buckets(&[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ])
            .expect("static buckets are valid")
            .set_buckets_for_metric(
                Matcher::Full("kurier_relay_batch_size".into()),
                &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0],
            )
            .expect("static buckets are valid")
            .install_recorder()
            .expect("no other metrics recorder is installed")
    })
}

/// The paths served (the deploy/ examples' probes are checked against these).
pub const PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// What `/metrics` reads from the database on each scrape.
#[derive(Clone)]
pub struct Backlog {
    pub pool: PgPool,
    pub schemas: Vec<SchemaName>,
    /// The inbox's schema, when the inbox writer runs.
    pub inbox: Option<SchemaName>,
    /// The sagas' schema, when the orchestrator runs.
    pub sagas: Option<SchemaName>,
    /// The schemas whose event stores get horizon gauges (every migrated one).
    pub events: Vec<SchemaName>,
    /// The projections' schema, when the daemon runs them (lag gauges).
    pub projections: Option<SchemaName>,
}

#[derive(Clone)]
struct AppState {
    health: Health,
    backlog: Option<Backlog>,
}

pub fn router(health: Health, backlog: Option<Backlog>) -> Router {
    Router::new()
        .route(PATHS[0], get(|| async { "ok\n" }))
        .route(PATHS[1], get(readyz))
        .route(PATHS[2], get(metrics))
        .with_state(AppState { health, backlog })
}

/// Backlog gauges are read at scrape time, so an idle daemon that nobody
/// scrapes runs no extra queries. `kurier_backlog_up` says whether they are fresh.
async fn metrics(State(state): State<AppState>) -> String {
    if let Some(b) = &state.backlog {
        let fresh = tokio::time::timeout(Duration::from_secs(3), refresh_backlog(b)).await;
        let up = match fresh {
            Ok(Ok(())) => 1.0,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "backlog gauges not refreshed");
                0.0
            }
            Err(_) => {
                tracing::warn!("backlog gauges not refreshed: database query timed out");
                0.0
            }
        };
        metrics::gauge!("kurier_backlog_up").set(up);
    }
    prometheus().render()
}

async fn refresh_backlog(b: &Backlog) -> Result<(), kurier::Error> {
    for schema in &b.schemas {
        let st = status::outbox_counts(&b.pool, schema).await?;
        let label = schema.to_string();
        metrics::gauge!("kurier_outbox_pending_rows", "schema" => label.clone())
            .set(st.pending as f64);
        metrics::gauge!("kurier_outbox_oldest_pending_age_seconds", "schema" => label.clone())
            .set(st.oldest_pending_secs.unwrap_or(0.0));
        metrics::gauge!("kurier_outbox_retrying_rows", "schema" => label.clone())
            .set(st.retrying as f64);
        metrics::gauge!("kurier_outbox_dead_letter_rows", "schema" => label.clone())
            .set(st.dead_letters as f64);
        let table = maintenance::health(&b.pool, schema).await?;
        metrics::gauge!("kurier_outbox_dead_rows", "schema" => label.clone())
            .set(table.dead_rows as f64);
        metrics::gauge!("kurier_outbox_table_bytes", "schema" => label.clone())
            .set(table.total_bytes as f64);
        metrics::gauge!("kurier_outbox_autovacuum_reaches", "schema" => label)
            .set(if table.autovacuum_reaches { 1.0 } else { 0.0 });
    }
    if let Some(schema) = &b.sagas {
        refresh_sagas(&b.pool, schema).await?;
    }
    if let Some(schema) = &b.projections {
        for p in kurier::projection::store::status(&b.pool, schema).await? {
            let name = p.name.clone();
            metrics::gauge!("kurier_projection_lag_events", "projection" => name.clone())
                .set(p.events_behind as f64);
            metrics::gauge!("kurier_projection_lag_seconds", "projection" => name.clone())
                .set(p.seconds_behind);
            metrics::gauge!("kurier_projection_parked", "projection" => name)
                .set(if p.status == "parked" { 1.0 } else { 0.0 });
        }
    }
    for schema in &b.events {
        let lag = kurier::events::store::horizon_lag(&b.pool, schema).await?;
        let label = schema.to_string();
        metrics::gauge!("kurier_events_last_position", "schema" => label.clone())
            .set(lag.last_position as f64);
        metrics::gauge!("kurier_events_horizon_lag_events", "schema" => label.clone())
            .set(lag.unreadable_events as f64);
        metrics::gauge!("kurier_events_horizon_holders", "schema" => label.clone())
            .set(lag.holders as f64);
        metrics::gauge!("kurier_events_horizon_age_seconds", "schema" => label.clone())
            .set(lag.oldest_holder_age_secs);
        // Who: a number, so no label per pid (series would pile up); 0 = nobody.
        metrics::gauge!("kurier_events_horizon_holder_pid", "schema" => label.clone())
            .set(f64::from(lag.holder_pid.unwrap_or(0)));
        // Counted by the database: SQL clients of any language included.
        // No series before `kurier migrate` has brought 0009.
        if let Some(n) = kurier::events::store::version_conflicts(&b.pool, schema).await? {
            metrics::counter!("kurier_events_version_conflicts_total", "schema" => label)
                .absolute(n.max(0) as u64);
        }
    }
    if let Some(schema) = &b.inbox {
        for c in kurier::inbox::store::status(&b.pool, schema).await? {
            let consumer = c.consumer.clone();
            metrics::gauge!("kurier_inbox_pending_rows", "consumer" => consumer.clone())
                .set(c.pending as f64);
            metrics::gauge!("kurier_inbox_parked_rows", "consumer" => consumer.clone())
                .set(c.parked as f64);
            metrics::gauge!("kurier_inbox_oldest_pending_age_seconds", "consumer" => consumer)
                .set(c.oldest_pending_secs.unwrap_or(0.0));
        }
    }
    Ok(())
}

async fn refresh_sagas(pool: &PgPool, schema: &SchemaName) -> Result<(), kurier::Error> {
    let c = kurier::saga::store::counts(pool, schema).await?;
    for (status, n) in [
        ("running", c.running),
        ("compensating", c.compensating),
        ("completed", c.completed),
        ("compensated", c.compensated),
        ("failed", c.failed),
        ("parked", c.parked),
    ] {
        metrics::gauge!("kurier_sagas", "status" => status).set(n as f64);
    }
    metrics::gauge!("kurier_sagas_past_deadline").set(c.past_deadline as f64);
    for (q, v) in [
        ("0.5", c.step_latency_p50_secs),
        ("0.99", c.step_latency_p99_secs),
    ] {
        metrics::gauge!("kurier_saga_step_latency_seconds", "quantile" => q).set(v.unwrap_or(0.0));
    }
    Ok(())
}

async fn readyz(State(AppState { health, .. }): State<AppState>) -> (StatusCode, String) {
    match health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// Serves until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    health: Health,
    backlog: Option<Backlog>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(health, backlog))
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
}
