//! `kurier check`: configuration and connectivity, each problem named with its fix.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use sqlx::{Connection, PgConnection};

use crate::config::Config;
use crate::redact::{redact_url, scrub};

/// One finding of `kurier check`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    pub ok: bool,
    pub what: String,
    /// Empty when ok.
    pub fix: String,
}

impl Finding {
    fn ok(what: impl Into<String>) -> Self {
        Finding {
            ok: true,
            what: what.into(),
            fix: String::new(),
        }
    }
    fn fail(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Finding {
            ok: false,
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
    let shown = redact_url(&config.database_url);
    let mut conn = match PgConnection::connect(&config.database_url).await {
        Ok(c) => c,
        Err(e) => {
            return vec![Finding::fail(
                format!("cannot connect to PostgreSQL at {shown}: {}", scrub(&e.to_string(), &config.database_url)),
                "check DATABASE_URL (database.url): host, port, user, password, database name, and that the server accepts connections",
            )]
        }
    };
    let mut out = vec![Finding::ok(format!("PostgreSQL reachable at {shown}"))];
    if let Err(e) = crate::schema::ensure_migrated(&mut conn).await {
        out.push(Finding::fail(
            e.to_string(),
            "run `kurier migrate` with the same DATABASE_URL",
        ));
        return out;
    }
    out.push(Finding::ok("schema kurier is migrated"));
    let tables = [
        "outbox",
        "dead_letters",
        "relay_leases",
        "relay_instances",
        "inbox",
        "inbox_stats",
    ];
    for t in tables {
        let q =
            format!("SELECT has_table_privilege('kurier.{t}', 'SELECT, INSERT, UPDATE, DELETE')");
        match sqlx::query_scalar::<_, bool>(&q).fetch_one(&mut conn).await {
            Ok(true) => {}
            Ok(false) => out.push(Finding::fail(
                format!("this role lacks SELECT, INSERT, UPDATE or DELETE on kurier.{t}"),
                "run deploy/least-privilege.sql or GRANT those rights to the role in DATABASE_URL",
            )),
            Err(e) => out.push(Finding::fail(
                format!("cannot check rights on kurier.{t}: {e}"),
                "run `kurier migrate`",
            )),
        }
    }
    if out.iter().all(|f| f.ok) {
        out.push(Finding::ok(
            "the role may read and write every kurier table",
        ));
    }
    out
}

async fn kafka(config: &Config) -> Vec<Finding> {
    let brokers = config.kafka.brokers.clone();
    let mut cc = ClientConfig::new();
    for (k, v) in &config.kafka.properties {
        cc.set(k, v);
    }
    cc.set("bootstrap.servers", &brokers);
    let topics: Vec<String> = config
        .inbox
        .as_ref()
        .map(|i| i.topics.clone())
        .unwrap_or_default();
    let result = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = cc.create().map_err(|e| e.to_string())?;
        let md = consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        let known: Vec<String> = md.topics().iter().map(|t| t.name().to_owned()).collect();
        Ok::<_, String>((md.brokers().len(), known))
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    match result {
        Err(e) => vec![Finding::fail(
            format!("cannot reach Kafka at {brokers}: {e}"),
            "check KAFKA_BROKERS (kafka.brokers), the network, and the security.protocol / sasl.* / ssl.* properties",
        )],
        Ok((n, known)) => {
            let mut out = vec![Finding::ok(format!("Kafka reachable at {brokers} ({n} broker(s) in metadata)"))];
            for t in topics.iter().filter(|t| !known.contains(t)) {
                out.push(Finding::fail(format!("inbox topic `{t}` does not exist"), "create it, or fix inbox.topics (KURIER_INBOX_TOPICS)"));
            }
            out
        }
    }
}
