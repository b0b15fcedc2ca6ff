//! Where the real services are: `DATABASE_URL` and `KAFKA_BROKERS`. A
//! missing one fails the test with what to set; nothing is skipped.

pub fn required_env(name: &str, what: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!("{name} is not set: these tests need {what}. Run `make test`, which starts them, or set {name} yourself."),
    }
}

pub fn database_url() -> String {
    required_env(
        "DATABASE_URL",
        "a real PostgreSQL server, e.g. postgres://postgres@127.0.0.1:5432/postgres",
    )
}

pub fn brokers() -> String {
    required_env(
        "KAFKA_BROKERS",
        "a real Kafka-protocol broker, e.g. 127.0.0.1:9092",
    )
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}
