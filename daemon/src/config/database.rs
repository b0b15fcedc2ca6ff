//! `[database]`: where Kurier's tables live.

use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

use super::value::Keys;
use super::ConfigError;
use crate::redact::{redact_url, scrub};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDatabase {
    url: Option<String>,
    max_connections: Option<u32>,
}

/// The database section, validated. Its `Debug` hides the password.
#[derive(Clone)]
pub struct DatabaseConfig {
    url: String,
    options: PgConnectOptions,
    /// Connections of the daemon's shared pool (inbox writer, retention).
    pub max_connections: u32,
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &self.shown())
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

impl DatabaseConfig {
    /// Connection options for components that hold their own connections.
    pub fn connect_options(&self) -> &PgConnectOptions {
        &self.options
    }

    /// A pool of `connections` that connects on first use.
    pub fn lazy_pool(&self, connections: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(connections)
            .connect_lazy_with(self.options.clone())
    }

    /// The URL with its password replaced, for messages.
    pub fn shown(&self) -> String {
        redact_url(&self.url)
    }

    /// `text` without the password, for driver errors that might quote it.
    pub fn scrub(&self, text: &str) -> String {
        scrub(text, &self.url)
    }
}

pub(super) fn resolve(raw: RawDatabase, k: &Keys) -> Result<DatabaseConfig, ConfigError> {
    // DATABASE_URL is the name every PostgreSQL tool honours.
    let url = k.env("DATABASE_URL").or(raw.url).ok_or_else(|| {
        ConfigError::invalid(
            "database.url",
            "not set",
            "set DATABASE_URL or database.url, e.g. postgres://user@127.0.0.1:5432/app",
        )
    })?;
    let invalid = || {
        ConfigError::invalid(
            "database.url",
            format!("`{}` is not a postgres:// URL", redact_url(&url)),
            "use postgres://USER[:PASSWORD]@HOST:PORT/DATABASE (DATABASE_URL)",
        )
    };
    let scheme_ok = url::Url::parse(&url)
        .map(|u| matches!(u.scheme(), "postgres" | "postgresql"))
        .unwrap_or(false);
    if !scheme_ok {
        return Err(invalid());
    }
    let options: PgConnectOptions = url.parse().map_err(|_| invalid())?;
    // A VACUUM or a rebuild batch may take seconds: not a warning.
    let options =
        options.log_slow_statements(log::LevelFilter::Debug, std::time::Duration::from_secs(1));
    Ok(DatabaseConfig {
        max_connections: k.num("database.max_connections", raw.max_connections, 4)?,
        url,
        options,
    })
}
