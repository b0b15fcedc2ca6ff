//! The daemon's error: the library's ([`kurier::Error`]) plus what only the
//! daemon meets — configuration, Kafka clients, the HTTP listener.

use crate::config::ConfigError;
use crate::kafka::ClientError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A database, migration or setup problem (the library's error).
    #[error(transparent)]
    Store(#[from] kurier::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("kafka: {0}")]
    Kafka(#[from] ClientError),
    #[error("http listener: {0}")]
    Http(#[source] std::io::Error),
    /// A task of the daemon panicked.
    #[error("task panicked: {0}; fix: report a bug")]
    Panicked(String),
}

impl Error {
    /// Whether waiting and trying again may succeed (a lost connection, a
    /// restarting server, a broker blip), as opposed to a mistake that needs
    /// a human.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Store(e) => e.is_retryable(),
            Error::Kafka(_) => true,
            _ => false,
        }
    }
}
