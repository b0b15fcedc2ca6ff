//! Configuration: a TOML file, overridden by environment variables, resolved
//! once into a validated [`Config`]. One file per section (`database`,
//! `kafka`, `relay`, `inbox`, `debezium`, `sagas`, `projections`, `http`);
//! each key is named once
//! ([`value::Keys`] derives its environment variable). Every key is
//! documented in `config.example.toml`.

mod database;
mod debezium;
mod http;
mod inbox;
mod kafka;
mod projections;
mod relay;
mod sagas;
mod value;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use kurier::schema::debezium::DebeziumTable;
use kurier::SchemaName;
use serde::Deserialize;

pub use self::database::DatabaseConfig;
pub use self::inbox::InboxConfig;
pub use self::projections::ProjectionsConfig;
pub use self::relay::RelayConfig;
pub use self::sagas::SagasConfig;
use self::value::Keys;
pub use crate::kafka::{CloudEvents, KafkaConfig};
use crate::telemetry::LogFormat;

/// A configuration problem, named by its key, with the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The file is not valid TOML for Kurier (unknown key, wrong type, ...).
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    /// A key is missing or has a value Kurier cannot use.
    #[error("config key `{key}`: {problem}; fix: {fix}")]
    Invalid {
        key: String,
        problem: String,
        fix: String,
    },
}

impl ConfigError {
    fn invalid(key: &str, problem: impl Into<String>, fix: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.to_owned(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

/// The validated configuration of the daemon.
#[derive(Debug, Clone)]
pub struct Config {
    pub database: DatabaseConfig,
    pub kafka: KafkaConfig,
    pub relay: RelayConfig,
    /// The Kafka → inbox writer; `None` when no topics are configured.
    pub inbox: Option<InboxConfig>,
    /// Debezium-shape outbox tables captured into a Kurier outbox.
    pub debezium: Vec<DebeziumTable>,
    /// The saga orchestrator.
    pub sagas: SagasConfig,
    /// The SQL projections run by the daemon.
    pub projections: ProjectionsConfig,
    pub http_addr: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
}

/// The file's shape: one table per section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    database: database::RawDatabase,
    #[serde(default)]
    kafka: kafka::RawKafka,
    #[serde(default)]
    relay: relay::RawRelay,
    #[serde(default)]
    inbox: inbox::RawInbox,
    #[serde(default)]
    debezium: Vec<debezium::RawDebezium>,
    #[serde(default)]
    sagas: sagas::RawSagas,
    #[serde(default)]
    projections: projections::RawProjections,
    #[serde(default)]
    http: http::RawHttp,
    #[serde(default)]
    log: RawLog,
    shutdown_grace_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
}

/// Where configuration values come from, besides the file.
pub trait Env {
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl Env for BTreeMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        BTreeMap::get(self, name).cloned()
    }
}

/// Command-line overrides, applied last.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub http_addr: Option<String>,
}

impl Config {
    /// Commands that talk to Kafka call this; `migrate` and the admin
    /// commands work with a database URL alone.
    pub fn require_kafka(&self) -> Result<(), ConfigError> {
        if self.kafka.brokers.trim().is_empty() {
            return Err(ConfigError::invalid(
                "kafka.brokers",
                "not set",
                "set KAFKA_BROKERS or kafka.brokers, e.g. 127.0.0.1:9092",
            ));
        }
        Ok(())
    }

    /// Loads `path` (if any), applies the environment and the overrides, validates.
    pub fn load(
        path: Option<&Path>,
        env: &dyn Env,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let raw = match path {
            Some(p) => read_file(p)?,
            None => RawConfig::default(),
        };
        resolve(raw, env, overrides)
    }

    /// Parses TOML text (as a file would hold), then environment and overrides.
    pub fn from_toml(
        text: &str,
        env: &dyn Env,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let raw = parse(text, "<inline>")?;
        resolve(raw, env, overrides)
    }

    /// Every schema `kurier migrate` must create: `kurier`, the relayed
    /// ones, and the inbox's.
    pub fn schemas(&self) -> Vec<SchemaName> {
        let mut all = vec![SchemaName::kurier()];
        let inbox = self.inbox.iter().map(|i| &i.schema);
        let sagas = std::iter::once(&self.sagas.schema);
        let projections = std::iter::once(&self.projections.schema);
        for s in self
            .relay
            .schemas
            .iter()
            .chain(inbox)
            .chain(sagas)
            .chain(projections)
        {
            if !all.contains(s) {
                all.push(s.clone());
            }
        }
        all
    }
}

fn read_file(path: &Path) -> Result<RawConfig, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    parse(&text, &shown)
}

fn parse(text: &str, path: &str) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: format!(
            "{}; see config.example.toml for every key",
            e.to_string().trim_end()
        ),
    })
}

fn resolve(raw: RawConfig, env: &dyn Env, overrides: &Overrides) -> Result<Config, ConfigError> {
    let k = Keys::new(env);
    let shutdown_grace = k.millis("shutdown_grace_ms", raw.shutdown_grace_ms, 10_000)?;
    let relay = relay::resolve(raw.relay, &k, shutdown_grace)?;
    Ok(Config {
        database: database::resolve(raw.database, &k)?,
        kafka: kafka::resolve(raw.kafka, &k)?,
        inbox: inbox::resolve(raw.inbox, &k)?,
        debezium: debezium::resolve(raw.debezium, &k, &relay.schemas)?,
        sagas: sagas::resolve(raw.sagas, &k)?,
        projections: projections::resolve(raw.projections, &k)?,
        relay,
        http_addr: http::resolve(raw.http, &k, overrides.http_addr.clone())?,
        log_format: resolve_log_format(k.text("log.format", raw.log.format))?,
        shutdown_grace,
    })
}

fn resolve_log_format(v: Option<String>) -> Result<LogFormat, ConfigError> {
    match v.map(|v| v.to_ascii_lowercase()).as_deref() {
        None | Some("text") => Ok(LogFormat::Text),
        Some("json") => Ok(LogFormat::Json),
        Some(other) => Err(ConfigError::invalid(
            &Keys::label("log.format"),
            format!("`{other}` is unknown"),
            "use text or json",
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const BASE: &[(&str, &str)] = &[
        ("DATABASE_URL", "postgres://u:secret@h/db"),
        ("KAFKA_BROKERS", "b:9092"),
    ];

    #[test]
    fn environment_alone_is_enough() {
        let c = Config::from_toml("", &env(BASE), &Overrides::default()).unwrap();
        assert_eq!(c.kafka.brokers, "b:9092");
        assert_eq!(c.relay.batch_size, 5000);
        assert!(c.http_addr.is_none());
    }

    #[test]
    fn environment_overrides_file() {
        let toml = "[kafka]\nbrokers = \"file:1\"\n[relay]\nbatch_size = 10\n";
        let mut e = env(BASE);
        e.insert("KURIER_RELAY_BATCH_SIZE".into(), "20".into());
        let c = Config::from_toml(toml, &e, &Overrides::default()).unwrap();
        assert_eq!(c.kafka.brokers, "b:9092");
        assert_eq!(c.relay.batch_size, 20);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml(
            "[relay]\nbatch_sise = 5\n",
            &env(BASE),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("batch_sise"), "{err}");
    }

    #[test]
    fn unparsable_env_is_an_error_naming_the_variable() {
        let mut e = env(BASE);
        e.insert("KURIER_RELAY_POLL_INTERVAL_MS".into(), "fast".into());
        let err = Config::from_toml("", &e, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("KURIER_RELAY_POLL_INTERVAL_MS") && err.contains("fast"),
            "{err}"
        );
    }

    #[test]
    fn out_of_range_names_key_and_range() {
        let err = Config::from_toml(
            "[relay]\nbatch_size = 0\n",
            &env(BASE),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "config key `relay.batch_size`: 0 is out of range; fix: use a value from 1 to 50000 (default 5000)"
        );
    }

    #[test]
    fn idempotence_cannot_be_turned_off() {
        let toml = "[kafka.properties]\n\"enable.idempotence\" = false\n";
        let err = Config::from_toml(toml, &env(BASE), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("enable.idempotence"), "{err}");
    }

    #[test]
    fn inbox_offsets_cannot_be_stored_automatically() {
        let mut e = env(BASE);
        e.insert("KURIER_INBOX_TOPICS".into(), "orders".into());
        e.insert("KURIER_INBOX_CONSUMER".into(), "billing".into());
        e.insert(
            "KURIER_INBOX_PROPERTIES".into(),
            "enable.auto.offset.store=true".into(),
        );
        let err = Config::from_toml("", &e, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("inbox.properties.\"enable.auto.offset.store\"")
                && err.contains("after the inbox transaction committed"),
            "{err}"
        );
    }

    #[test]
    fn password_never_in_error_or_debug() {
        let e = env(&[
            ("DATABASE_URL", "mysql://u:hunter2@h/db"),
            ("KAFKA_BROKERS", "b"),
        ]);
        let err = Config::from_toml("", &e, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("database.url") && !err.contains("hunter2"),
            "{err}"
        );
        let c = Config::from_toml("", &env(BASE), &Overrides::default()).unwrap();
        assert!(!format!("{c:?}").contains("secret"));
    }

    #[test]
    fn missing_database_url_names_the_fix() {
        let err = Config::from_toml("", &env(&[("KAFKA_BROKERS", "b")]), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("DATABASE_URL"), "{err}");
    }

    #[test]
    fn inbox_from_environment_alone() {
        let mut e = env(BASE);
        e.insert("KURIER_INBOX_TOPICS".into(), "orders, payments".into());
        let err = Config::from_toml("", &e, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("KURIER_INBOX_CONSUMER"), "{err}");
        e.insert("KURIER_INBOX_CONSUMER".into(), "billing".into());
        e.insert("KURIER_INBOX_SCHEMA".into(), "tenant_a".into());
        let c = Config::from_toml("", &e, &Overrides::default()).unwrap();
        let inbox = c.inbox.clone().unwrap();
        assert_eq!(
            (inbox.consumer.as_str(), inbox.topics.len()),
            ("billing", 2)
        );
        assert_eq!(inbox.message_id_headers, vec!["message-id".to_string()]);
        assert_eq!(inbox.schema.as_str(), "tenant_a");
        let schemas: Vec<String> = c.schemas().iter().map(|s| s.to_string()).collect();
        assert_eq!(schemas, ["kurier", "tenant_a"]);
    }

    /// Records every environment variable the resolution asks for.
    struct Recording {
        values: BTreeMap<String, String>,
        asked: RefCell<Vec<String>>,
    }

    impl Env for Recording {
        fn get(&self, name: &str) -> Option<String> {
            self.asked.borrow_mut().push(name.to_owned());
            self.values.get(name).cloned()
        }
    }

    #[test]
    fn example_file_parses_and_documents_every_variable() {
        let example = include_str!("../../../config.example.toml");
        let c = Config::from_toml(example, &BTreeMap::new(), &Overrides::default()).unwrap();
        assert_eq!(c.relay.batch_size, 5000);
        // Turn on every optional section, so that each of its keys is looked up.
        let recording = Recording {
            values: env(&[
                ("DATABASE_URL", "postgres://u@h/db"),
                ("KURIER_INBOX_TOPICS", "orders"),
                ("KURIER_INBOX_CONSUMER", "billing"),
                ("KURIER_RELAY_CLOUDEVENTS", "true"),
                ("KURIER_DEBEZIUM_TABLES", "public.outbox"),
            ]),
            asked: RefCell::new(Vec::new()),
        };
        Config::from_toml("", &recording, &Overrides::default()).unwrap();
        let asked = recording.asked.into_inner();
        // 29 when this was written; fewer means a section was not turned on.
        assert!(
            asked.len() >= 29,
            "only {} variables looked up",
            asked.len()
        );
        for name in asked {
            assert!(
                example.contains(&name),
                "{name} is read but not documented in config.example.toml"
            );
        }
    }
}
