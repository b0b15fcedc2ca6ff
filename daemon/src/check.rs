//! `kurier check`: configuration and connectivity, each problem named with its fix.

use kurier::outbox::store::maintenance;
use kurier::schema::debezium;
use kurier::SchemaName;
use sqlx::{Connection, PgConnection};

use crate::config::Config;

/// How bad a finding is: a failure makes `kurier check` exit non-zero, a
/// warning is printed and does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

/// One finding of `kurier check`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    pub level: Level,
    pub what: String,
    /// Empty when ok.
    pub fix: String,
}

impl Finding {
    fn ok(what: impl Into<String>) -> Self {
        Self::new(Level::Ok, what, "")
    }
    fn warn(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(Level::Warn, what, fix)
    }
    fn fail(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(Level::Fail, what, fix)
    }
    fn new(level: Level, what: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding {
            level,
            what: what.into(),
            fix: fix.into(),
        }
    }
}

/// Runs every check; never stops at the first failure.
pub async fn run(config: &Config) -> Vec<Finding> {
    let mut out = vec![Finding::ok("configuration is valid")];
    out.extend(database(config).await);
    out.extend(kafka(config).await);
    out
}

async fn database(config: &Config) -> Vec<Finding> {
    let db = &config.database;
    let shown = db.shown();
    let mut conn = match PgConnection::connect_with(db.connect_options()).await {
        Ok(c) => c,
        Err(e) => {
            return vec![Finding::fail(
                format!("cannot connect to PostgreSQL at {shown}: {}", db.scrub(&e.to_string())),
                "check DATABASE_URL (database.url): host, port, user, password, database name, and that the server accepts connections",
            )]
        }
    };
    let mut out = vec![Finding::ok(format!("PostgreSQL reachable at {shown}"))];
    for schema in &config.schemas() {
        out.extend(schema_rights(&mut conn, config, schema).await);
    }
    for t in &config.debezium {
        out.push(match debezium::is_installed(&mut conn, t).await {
            Ok(true) => Finding::ok(format!(
                "Debezium-shape table {} is captured into {}.outbox",
                t.qualified(),
                t.into
            )),
            Ok(false) => Finding::fail(
                format!(
                    "Debezium-shape table {} has no capture trigger (or does not exist)",
                    t.qualified()
                ),
                "run `kurier migrate` with this configuration; it installs the trigger",
            ),
            Err(e) => Finding::fail(
                format!("cannot check the trigger on {}: {e}", t.qualified()),
                "check the role's rights",
            ),
        });
    }
    out
}

/// Whether `schema` is migrated and the role may use the tables the daemon touches there.
async fn schema_rights(
    conn: &mut PgConnection,
    config: &Config,
    schema: &SchemaName,
) -> Vec<Finding> {
    if let Err(e) = kurier::schema::ensure_migrated(conn, schema).await {
        return vec![Finding::fail(
            e.to_string(),
            "run `kurier migrate` with the same DATABASE_URL and configuration",
        )];
    }
    let mut out = vec![Finding::ok(format!("schema {schema} is migrated"))];
    let mut tables = Vec::new();
    if config.relay.enabled && config.relay.schemas.contains(schema) {
        tables.extend(["outbox", "dead_letters", "relay_leases", "relay_instances"]);
    }
    if config.inbox.as_ref().is_some_and(|i| &i.schema == schema) {
        tables.extend(["inbox", "inbox_stats"]);
    }
    if config.sagas.enabled && &config.sagas.schema == schema {
        tables.extend([
            "sagas",
            "saga_types",
            "saga_events",
            "saga_timers",
            "inbox",
            "outbox",
        ]);
    }
    if config.projections.enabled && &config.projections.schema == schema {
        tables.extend(["projections", "projection_events"]);
    }
    tables.sort_unstable();
    tables.dedup();
    match kurier::schema::missing_rights(conn, schema, &tables).await {
        Ok(missing) => out.extend(missing.into_iter().map(|t| {
            Finding::fail(
                format!("this role lacks SELECT, INSERT, UPDATE or DELETE on {t}"),
                "run deploy/least-privilege.sql or GRANT those rights to the role in DATABASE_URL",
            )
        })),
        Err(e) => out.push(Finding::fail(
            format!("cannot check rights on the {schema} tables: {e}"),
            "run `kurier migrate`",
        )),
    }
    if out.iter().all(|f| f.level == Level::Ok) {
        out.push(Finding::ok(format!(
            "the role may read and write the {schema} tables it needs"
        )));
    }
    if config.relay.enabled && config.relay.schemas.contains(schema) {
        out.push(upkeep(conn, config, schema).await);
    }
    out
}

/// Whether anything keeps the outbox from growing without bound: autovacuum,
/// or the relay's own VACUUM (`relay.vacuum_dead_rows`, needs the owner's role).
async fn upkeep(conn: &mut PgConnection, config: &Config, schema: &SchemaName) -> Finding {
    let health = match maintenance::health(&mut *conn, schema).await {
        Ok(h) => h,
        Err(e) => {
            return Finding::fail(
                format!("cannot read {schema}.outbox's statistics: {e}"),
                "run `kurier migrate`",
            )
        }
    };
    let dead = health.dead_rows;
    if health.autovacuum_reaches {
        return Finding::ok(format!(
            "autovacuum reaches {schema}.outbox ({dead} dead rows)"
        ));
    }
    let why = format!("autovacuum cannot reach {schema}.outbox (autovacuum or track_counts is off, or the table's autovacuum_enabled is false; {dead} dead rows)");
    let relay_vacuums = config.relay.vacuum_dead_rows > 0;
    match (relay_vacuums, health.may_vacuum) {
        (true, true) => Finding::warn(
            format!("{why}: the relay vacuums it itself past {} dead rows", config.relay.vacuum_dead_rows),
            "turn autovacuum on (autovacuum = on in postgresql.conf) where you can; until then the relay keeps the table in shape",
        ),
        (true, false) => Finding::warn(
            format!("{why}, and this role may not VACUUM it: the outbox will grow without bound"),
            "make the relay's role the owner of the outbox (ALTER TABLE ... OWNER TO), or turn autovacuum on",
        ),
        (false, _) => Finding::warn(
            format!("{why}, and relay.vacuum_dead_rows = 0: the outbox will grow without bound"),
            "turn autovacuum on, or set relay.vacuum_dead_rows (default 100000)",
        ),
    }
}

async fn kafka(config: &Config) -> Vec<Finding> {
    let brokers = config.kafka.brokers.clone();
    let kafka = config.kafka.clone();
    let topics: Vec<String> = config
        .inbox
        .as_ref()
        .map(|i| i.topics.clone())
        .unwrap_or_default();
    let result = tokio::task::spawn_blocking(move || crate::kafka::cluster::metadata(&kafka))
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    match result {
        Err(e) => vec![Finding::fail(
            format!("cannot reach Kafka at {brokers}: {e}"),
            "check KAFKA_BROKERS (kafka.brokers), the network, and the security.protocol / sasl.* / ssl.* properties",
        )],
        Ok(md) => {
            let mut out = vec![Finding::ok(format!("Kafka reachable at {brokers} ({} broker(s) in metadata)", md.brokers))];
            for t in topics.iter().filter(|t| !md.topics.contains(t)) {
                out.push(Finding::fail(format!("inbox topic `{t}` does not exist"), "create it, or fix inbox.topics (KURIER_INBOX_TOPICS)"));
            }
            out
        }
    }
}
