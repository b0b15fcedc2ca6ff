//! Configuration: a TOML file, overridden by environment variables, resolved once
//! into a validated [`Config`]. Every key is documented in `config.example.toml`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::debezium::DebeziumTable;
use crate::redact::redact_url;
use crate::schema::SchemaName;

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

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The validated configuration of the daemon.
#[derive(Clone)]
pub struct Config {
    pub database_url: String,
    pub database_max_connections: u32,
    pub kafka: KafkaConfig,
    pub relay: RelayConfig,
    /// The Kafka → inbox writer; `None` when no topics are configured.
    pub inbox: Option<InboxConfig>,
    /// Debezium-shape outbox tables captured into a Kurier outbox.
    pub debezium: Vec<DebeziumTable>,
    pub http_addr: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &redact_url(&self.database_url))
            .field("kafka", &self.kafka)
            .field("relay", &self.relay)
            .field("inbox", &self.inbox)
            .field("http_addr", &self.http_addr)
            .finish_non_exhaustive()
    }
}

/// Kafka producer settings.
#[derive(Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    /// librdkafka properties passed through as they are (after the checks in
    /// [`check_kafka_properties`]).
    pub properties: BTreeMap<String, String>,
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&String> = self.properties.keys().collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("property_keys", &keys)
            .finish()
    }
}

/// Outbox relay settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    pub enabled: bool,
    pub batch_size: u32,
    /// Payload bytes per batch (approximate, at least one row): bounds memory
    /// whatever the row sizes.
    pub max_batch_bytes: u64,
    pub poll_interval: Duration,
    pub max_attempts: u32,
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// How long a relay's partition leases last without a heartbeat; a
    /// stalled relay is fenced out after this long.
    pub lease_ttl: Duration,
    /// The schemas whose outboxes this daemon relays (one relay loop each).
    pub schemas: Vec<SchemaName>,
    /// CloudEvents binary-mode headers on every record, when set.
    pub cloudevents: Option<CloudEventsConfig>,
}

/// The CloudEvents Kafka protocol binding, binary content mode.
#[derive(Debug, Clone)]
pub struct CloudEventsConfig {
    /// `ce_source` of every event (a URI-reference naming this producer).
    pub source: String,
}

/// Kafka → inbox writer settings.
#[derive(Debug, Clone)]
pub struct InboxConfig {
    /// The consumer name: the inbox's dedup scope and the Kafka consumer group.
    pub consumer: String,
    pub topics: Vec<String>,
    /// Messages inserted per database transaction.
    pub batch_size: u32,
    /// How long to wait for a batch to fill before inserting what arrived.
    pub batch_wait: Duration,
    /// Headers tried in order for the message ID; without any of them the ID
    /// is the record's coordinates, `topic/partition/offset`.
    pub message_id_headers: Vec<String>,
    /// librdkafka consumer properties (on top of `kafka.properties`).
    pub properties: BTreeMap<String, String>,
    /// Processed rows lose their payload and headers after this long.
    pub prune_payload_after: Duration,
    /// Processed rows (the dedup keys) are deleted after this long.
    pub forget_after: Duration,
}

// ---- the file's shape -------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    database: RawDatabase,
    #[serde(default)]
    kafka: RawKafka,
    #[serde(default)]
    relay: RawRelay,
    #[serde(default)]
    inbox: RawInbox,
    #[serde(default)]
    debezium: Vec<RawDebezium>,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    log: RawLog,
    shutdown_grace_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    url: Option<String>,
    max_connections: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafka {
    brokers: Option<String>,
    #[serde(default)]
    properties: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRelay {
    enabled: Option<bool>,
    batch_size: Option<u32>,
    max_batch_bytes: Option<u64>,
    poll_interval_ms: Option<u64>,
    max_attempts: Option<u32>,
    retry_min_ms: Option<u64>,
    retry_max_ms: Option<u64>,
    lease_ttl_ms: Option<u64>,
    schemas: Option<Vec<String>>,
    cloudevents: Option<bool>,
    cloudevents_source: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDebezium {
    table: String,
    topic: Option<String>,
    schema: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInbox {
    consumer: Option<String>,
    topics: Option<Vec<String>>,
    batch_size: Option<u32>,
    batch_wait_ms: Option<u64>,
    message_id_headers: Option<Vec<String>>,
    #[serde(default)]
    properties: BTreeMap<String, toml::Value>,
    prune_payload_after_secs: Option<u64>,
    forget_after_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    addr: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<LogFormat>,
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
    let database_url = env
        .get("DATABASE_URL")
        .or(raw.database.url)
        .ok_or_else(|| {
            ConfigError::invalid(
                "database.url",
                "not set",
                "set DATABASE_URL or database.url, e.g. postgres://user@127.0.0.1:5432/app",
            )
        })?;
    check_database_url(&database_url)?;
    let brokers = env
        .get("KAFKA_BROKERS")
        .or(raw.kafka.brokers)
        .unwrap_or_default();
    let properties = kafka_properties(raw.kafka.properties, env)?;
    let http_addr = overrides
        .http_addr
        .clone()
        .or_else(|| env.get("KURIER_HTTP_ADDR"))
        .or(raw.http.addr);
    let log_format = match env.get("KURIER_LOG_FORMAT") {
        Some(v) => parse_log_format(&v)?,
        None => raw.log.format.unwrap_or(LogFormat::Text),
    };
    let relay = resolve_relay(raw.relay, env)?;
    let inbox = resolve_inbox(raw.inbox, env)?;
    let debezium = resolve_debezium(raw.debezium, env, &relay.schemas)?;
    Ok(Config {
        database_url,
        database_max_connections: env_num(
            env,
            "KURIER_DATABASE_MAX_CONNECTIONS",
            "database.max_connections",
        )?
        .or(raw.database.max_connections)
        .unwrap_or(4),
        kafka: KafkaConfig {
            brokers,
            properties,
        },
        relay,
        inbox,
        debezium,
        http_addr: http_addr.map(|a| parse_addr(&a)).transpose()?,
        log_format,
        shutdown_grace: Duration::from_millis(
            env_num(env, "KURIER_SHUTDOWN_GRACE_MS", "shutdown_grace_ms")?
                .or(raw.shutdown_grace_ms)
                .unwrap_or(10_000),
        ),
    })
}

fn resolve_relay(raw: RawRelay, env: &dyn Env) -> Result<RelayConfig, ConfigError> {
    let enabled = match env.get("KURIER_RELAY_ENABLED") {
        Some(v) => parse_bool("relay.enabled (KURIER_RELAY_ENABLED)", &v)?,
        None => raw.enabled.unwrap_or(true),
    };
    let ms =
        |name: &str, key: &str, file: Option<u64>, default: u64| -> Result<Duration, ConfigError> {
            Ok(Duration::from_millis(
                env_num(env, name, key)?.or(file).unwrap_or(default),
            ))
        };
    let relay = RelayConfig {
        enabled,
        batch_size: env_num(env, "KURIER_RELAY_BATCH_SIZE", "relay.batch_size")?
            .or(raw.batch_size)
            .unwrap_or(5000),
        max_batch_bytes: env_num(env, "KURIER_RELAY_MAX_BATCH_BYTES", "relay.max_batch_bytes")?
            .or(raw.max_batch_bytes)
            .unwrap_or(16 * 1024 * 1024),
        poll_interval: ms(
            "KURIER_RELAY_POLL_INTERVAL_MS",
            "relay.poll_interval_ms",
            raw.poll_interval_ms,
            100,
        )?,
        max_attempts: env_num(env, "KURIER_RELAY_MAX_ATTEMPTS", "relay.max_attempts")?
            .or(raw.max_attempts)
            .unwrap_or(10),
        retry_min: ms(
            "KURIER_RELAY_RETRY_MIN_MS",
            "relay.retry_min_ms",
            raw.retry_min_ms,
            100,
        )?,
        retry_max: ms(
            "KURIER_RELAY_RETRY_MAX_MS",
            "relay.retry_max_ms",
            raw.retry_max_ms,
            30_000,
        )?,
        lease_ttl: ms(
            "KURIER_RELAY_LEASE_TTL_MS",
            "relay.lease_ttl_ms",
            raw.lease_ttl_ms,
            10_000,
        )?,
        schemas: resolve_schemas(raw.schemas, env)?,
        cloudevents: resolve_cloudevents(raw.cloudevents, raw.cloudevents_source, env)?,
    };
    if relay.batch_size == 0 || relay.batch_size > 50_000 {
        return Err(ConfigError::invalid(
            "relay.batch_size",
            format!("{} is out of range", relay.batch_size),
            "use a value from 1 to 50000 (default 5000)",
        ));
    }
    if relay.poll_interval.is_zero() {
        return Err(ConfigError::invalid(
            "relay.poll_interval_ms",
            "0 would poll in a busy loop",
            "use at least 1 (default 100)",
        ));
    }
    if relay.max_attempts == 0 {
        return Err(ConfigError::invalid(
            "relay.max_attempts",
            "0 leaves no attempt",
            "use at least 1 (default 10)",
        ));
    }
    if relay.lease_ttl < Duration::from_millis(300) {
        return Err(ConfigError::invalid(
            "relay.lease_ttl_ms",
            "below 300 ms: heartbeats could not keep up",
            "use at least 300 (default 10000)",
        ));
    }
    if relay.retry_min > relay.retry_max {
        return Err(ConfigError::invalid(
            "relay.retry_min_ms",
            "greater than relay.retry_max_ms",
            "make retry_min_ms <= retry_max_ms",
        ));
    }
    Ok(relay)
}

fn list(v: String) -> Vec<String> {
    v.split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

fn resolve_schemas(
    file: Option<Vec<String>>,
    env: &dyn Env,
) -> Result<Vec<SchemaName>, ConfigError> {
    let names = env
        .get("KURIER_RELAY_SCHEMAS")
        .map(list)
        .or(file)
        .unwrap_or_else(|| vec![crate::schema::DEFAULT_SCHEMA.to_owned()]);
    if names.is_empty() {
        return Err(ConfigError::invalid(
            "relay.schemas (KURIER_RELAY_SCHEMAS)",
            "empty",
            "list at least one schema (default [\"kurier\"]), or set relay.enabled = false",
        ));
    }
    let mut out: Vec<SchemaName> = Vec::new();
    for n in &names {
        let s = SchemaName::new(n).map_err(|e| {
            ConfigError::invalid(
                "relay.schemas (KURIER_RELAY_SCHEMAS)",
                e,
                "name schemas like tenant_a",
            )
        })?;
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

fn resolve_cloudevents(
    enabled: Option<bool>,
    source: Option<String>,
    env: &dyn Env,
) -> Result<Option<CloudEventsConfig>, ConfigError> {
    let enabled = match env.get("KURIER_RELAY_CLOUDEVENTS") {
        Some(v) => parse_bool("relay.cloudevents (KURIER_RELAY_CLOUDEVENTS)", &v)?,
        None => enabled.unwrap_or(false),
    };
    if !enabled {
        return Ok(None);
    }
    let source = env
        .get("KURIER_RELAY_CLOUDEVENTS_SOURCE")
        .or(source)
        .unwrap_or_else(|| "/kurier".to_owned());
    if source.is_empty() || source.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ConfigError::invalid(
            "relay.cloudevents_source (KURIER_RELAY_CLOUDEVENTS_SOURCE)",
            format!("`{}` is not a URI-reference", source.escape_debug()),
            "use a URI naming this producer, e.g. /orders-service or urn:example:orders",
        ));
    }
    Ok(Some(CloudEventsConfig { source }))
}

fn resolve_debezium(
    file: Vec<RawDebezium>,
    env: &dyn Env,
    schemas: &[SchemaName],
) -> Result<Vec<DebeziumTable>, ConfigError> {
    let key = "debezium (KURIER_DEBEZIUM_TABLES)";
    let raw: Vec<RawDebezium> = match env.get("KURIER_DEBEZIUM_TABLES") {
        Some(v) => list(v)
            .into_iter()
            .map(|table| RawDebezium {
                table,
                topic: env.get("KURIER_DEBEZIUM_TOPIC"),
                schema: None,
            })
            .collect(),
        None => file,
    };
    let mut out = Vec::new();
    for r in raw {
        let into = r
            .schema
            .as_deref()
            .map(SchemaName::new)
            .transpose()
            .map_err(|e| ConfigError::invalid(key, e, "name a schema listed in relay.schemas"))?
            .unwrap_or_else(SchemaName::kurier);
        if !schemas.contains(&into) {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "table {} goes into schema `{into}`, which no relay serves",
                    r.table
                ),
                format!("add `{into}` to relay.schemas (KURIER_RELAY_SCHEMAS)"),
            ));
        }
        let topic = r.topic.as_deref().unwrap_or(crate::debezium::DEFAULT_TOPIC);
        let t = DebeziumTable::new(&r.table, topic, into).map_err(|e| {
            ConfigError::invalid(
                key,
                e,
                "use schema.table and a topic template like outbox.event.${routedByValue}",
            )
        })?;
        out.push(t);
    }
    Ok(out)
}

fn resolve_inbox(raw: RawInbox, env: &dyn Env) -> Result<Option<InboxConfig>, ConfigError> {
    let topics = env
        .get("KURIER_INBOX_TOPICS")
        .map(list)
        .or(raw.topics)
        .unwrap_or_default();
    if topics.is_empty() {
        return Ok(None);
    }
    for t in &topics {
        crate::outbox::validate_topic(t).map_err(|e| {
            ConfigError::invalid(
                "inbox.topics (KURIER_INBOX_TOPICS)",
                e.to_string(),
                "list existing topic names",
            )
        })?;
    }
    let consumer = env.get("KURIER_INBOX_CONSUMER").or(raw.consumer).ok_or_else(|| {
        ConfigError::invalid("inbox.consumer (KURIER_INBOX_CONSUMER)", "not set while inbox topics are", "name the consuming service, e.g. billing; it is the dedup scope and the consumer group")
    })?;
    if consumer.trim().is_empty() || consumer.len() > 200 {
        return Err(ConfigError::invalid(
            "inbox.consumer (KURIER_INBOX_CONSUMER)",
            "empty or longer than 200 characters",
            "use a short service name",
        ));
    }
    let secs =
        |name: &str, key: &str, file: Option<u64>, default: u64| -> Result<Duration, ConfigError> {
            Ok(Duration::from_secs(
                env_num(env, name, key)?.or(file).unwrap_or(default),
            ))
        };
    let mut properties = BTreeMap::new();
    for (k, v) in raw.properties {
        properties.insert(
            k.clone(),
            toml_scalar(&format!("inbox.properties.\"{k}\""), v)?,
        );
    }
    properties.extend(env_properties(env, "KURIER_INBOX_PROPERTIES")?);
    let inbox = InboxConfig {
        consumer,
        topics,
        batch_size: env_num(env, "KURIER_INBOX_BATCH_SIZE", "inbox.batch_size")?
            .or(raw.batch_size)
            .unwrap_or(1000),
        batch_wait: Duration::from_millis(
            env_num(env, "KURIER_INBOX_BATCH_WAIT_MS", "inbox.batch_wait_ms")?
                .or(raw.batch_wait_ms)
                .unwrap_or(20),
        ),
        message_id_headers: env
            .get("KURIER_INBOX_MESSAGE_ID_HEADERS")
            .map(list)
            .or(raw.message_id_headers)
            .unwrap_or_else(|| vec!["message-id".into()]),
        properties,
        prune_payload_after: secs(
            "KURIER_INBOX_PRUNE_PAYLOAD_AFTER_SECS",
            "inbox.prune_payload_after_secs",
            raw.prune_payload_after_secs,
            86_400,
        )?,
        forget_after: secs(
            "KURIER_INBOX_FORGET_AFTER_SECS",
            "inbox.forget_after_secs",
            raw.forget_after_secs,
            7 * 86_400,
        )?,
    };
    if inbox.batch_size == 0 || inbox.batch_size > 50_000 {
        return Err(ConfigError::invalid(
            "inbox.batch_size",
            format!("{} is out of range", inbox.batch_size),
            "use a value from 1 to 50000 (default 1000)",
        ));
    }
    if inbox.forget_after < inbox.prune_payload_after {
        return Err(ConfigError::invalid(
            "inbox.forget_after_secs",
            "shorter than inbox.prune_payload_after_secs",
            "keep dedup keys at least as long as payloads, and longer than the topics' retention.ms",
        ));
    }
    Ok(Some(inbox))
}

fn toml_scalar(key: &str, v: toml::Value) -> Result<String, ConfigError> {
    Ok(match v {
        toml::Value::String(s) => s,
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Float(f) => f.to_string(),
        other => {
            return Err(ConfigError::invalid(
                key,
                format!("a {} cannot be a librdkafka property", other.type_str()),
                "give a string, number or boolean",
            ))
        }
    })
}

/// Keys Kurier sets itself because its guarantees depend on them.
const FIXED_PROPERTIES: &[(&str, &[&str], &str)] = &[
    (
        "enable.idempotence",
        &["true"],
        "without it producer retries reorder messages of one key",
    ),
    (
        "acks",
        &["all", "-1"],
        "anything less than acks=all can lose acknowledged messages",
    ),
    (
        "bootstrap.servers",
        &[],
        "set kafka.brokers (or KAFKA_BROKERS) instead",
    ),
];

fn kafka_properties(
    file: BTreeMap<String, toml::Value>,
    env: &dyn Env,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for (k, v) in file {
        let s = toml_scalar(&format!("kafka.properties.\"{k}\""), v)?;
        out.insert(k, s);
    }
    // KURIER_KAFKA_PROPERTIES="linger.ms=5,compression.type=lz4" adds to or overrides the file.
    out.extend(env_properties(env, "KURIER_KAFKA_PROPERTIES")?);
    check_kafka_properties(&out)?;
    Ok(out)
}

/// `NAME="key=value,key=value"` as a map.
fn env_properties(env: &dyn Env, name: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for item in env
        .get(name)
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let (k, v) = item.split_once('=').ok_or_else(|| {
            ConfigError::invalid(
                name,
                format!("`{item}` is not key=value"),
                "write comma-separated key=value pairs, e.g. linger.ms=5,compression.type=lz4",
            )
        })?;
        out.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    Ok(out)
}

/// Refuses pass-through properties that would break a delivery guarantee.
pub fn check_kafka_properties(props: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    for (key, allowed, why) in FIXED_PROPERTIES {
        if let Some(v) = props.get(*key) {
            if !allowed.iter().any(|a| a.eq_ignore_ascii_case(v.trim())) {
                let fix = if allowed.is_empty() {
                    why.to_string()
                } else {
                    format!("remove it (Kurier sets {key}={}): {why}", allowed[0])
                };
                return Err(ConfigError::invalid(
                    &format!("kafka.properties.\"{key}\""),
                    format!("value `{v}` is not allowed"),
                    fix,
                ));
            }
        }
    }
    Ok(())
}

fn check_database_url(url: &str) -> Result<(), ConfigError> {
    let ok = url::Url::parse(url)
        .map(|u| matches!(u.scheme(), "postgres" | "postgresql"))
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            "database.url",
            format!("`{}` is not a postgres:// URL", redact_url(url)),
            "use postgres://USER[:PASSWORD]@HOST:PORT/DATABASE (DATABASE_URL)",
        ))
    }
}

fn parse_addr(v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse().map_err(|_| {
        ConfigError::invalid(
            "http.addr",
            format!("`{v}` is not a socket address"),
            "use HOST:PORT, e.g. 127.0.0.1:9187 (--http-addr / KURIER_HTTP_ADDR)",
        )
    })
}

fn parse_log_format(v: &str) -> Result<LogFormat, ConfigError> {
    match v.to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(ConfigError::invalid(
            "log.format (KURIER_LOG_FORMAT)",
            format!("`{v}` is unknown"),
            "use text or json",
        )),
    }
}

fn parse_bool(key: &str, v: &str) -> Result<bool, ConfigError> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(ConfigError::invalid(
            key,
            format!("`{v}` is not a boolean"),
            "use true or false",
        )),
    }
}

/// A numeric environment variable; an unparsable value is an error, never a silent default.
fn env_num<T: std::str::FromStr>(
    env: &dyn Env,
    name: &str,
    key: &str,
) -> Result<Option<T>, ConfigError> {
    match env.get(name) {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| {
            ConfigError::invalid(
                &format!("{key} ({name})"),
                format!("`{v}` is not a non-negative whole number"),
                "give a number like the default in config.example.toml",
            )
        }),
    }
}

#[cfg(test)]
mod tests {
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
    fn idempotence_cannot_be_turned_off() {
        let toml = "[kafka.properties]\n\"enable.idempotence\" = false\n";
        let err = Config::from_toml(toml, &env(BASE), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("enable.idempotence"), "{err}");
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
        let inbox = Config::from_toml("", &e, &Overrides::default())
            .unwrap()
            .inbox
            .unwrap();
        assert_eq!(
            (inbox.consumer.as_str(), inbox.topics.len()),
            ("billing", 2)
        );
        assert_eq!(inbox.message_id_headers, vec!["message-id".to_string()]);
    }

    #[test]
    fn example_file_parses_and_documents_every_variable() {
        let example = include_str!("../config.example.toml");
        let c = Config::from_toml(example, &BTreeMap::new(), &Overrides::default()).unwrap();
        assert_eq!(c.relay.batch_size, 5000);
        let source = include_str!("config.rs");
        for name in source.split('"').filter(|s| {
            s.starts_with("KURIER_") && s.chars().all(|c| c.is_ascii_uppercase() || c == '_')
        }) {
            assert!(
                example.contains(name),
                "{name} is read but not documented in config.example.toml"
            );
        }
    }
}
