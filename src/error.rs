//! The library's error type: what a caller of `enqueue`, the inbox or
//! `migrate` can see. Kafka, HTTP and configuration errors belong to the
//! daemon, which wraps this type.

/// Everything that can go wrong in Kurier's library calls.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database refused or lost the statement.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Applying the migrations failed.
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A message that can never be published (bad topic name, bad headers, ...).
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// The database lacks Kurier's schema or rights; retrying cannot help.
    #[error("{problem}; fix: {fix}")]
    Setup { problem: String, fix: String },
    /// An append's expected version did not match the stream's (SQLSTATE
    /// KU409): nothing was stored; reload the stream and decide again.
    #[error("version conflict: stream {stream} is at version {actual}, expected {expected}")]
    VersionConflict {
        stream: String,
        /// As the append said it: -1 = no stream.
        expected: i64,
        /// -1 = the stream does not exist.
        actual: i64,
    },
}

impl Error {
    /// Whether waiting and trying again may succeed (a lost connection, a
    /// restarting server), as opposed to a mistake that needs a human.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Database(e) => database_error_is_retryable(e),
            _ => false,
        }
    }

    /// The SQLSTATE of a database error (`KU409`, `23505`, ...), if any.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            Error::Database(sqlx::Error::Database(db)) => db.code().map(|c| c.into_owned()),
            Error::VersionConflict { .. } => Some("KU409".into()),
            _ => None,
        }
    }

    /// A database error, turned into an instruction when it means that
    /// Kurier's tables or functions are missing or the role lacks rights.
    pub fn explained(e: sqlx::Error) -> Error {
        if let sqlx::Error::Database(db) = &e {
            match db.code().as_deref() {
                Some("42P01") | Some("3F000") => {
                    return Error::Setup {
                        problem: format!("Kurier's tables are missing ({})", db.message()),
                        fix: "run `kurier migrate` against this database".into(),
                    }
                }
                // A function of a later migration (0008's array form of
                // kurier.append_events, say) on a database an older Kurier
                // migrated.
                Some("42883") if db.message().starts_with("function ") => {
                    return Error::Setup {
                        problem: format!(
                            "a Kurier function is missing ({}); the database was migrated by an older Kurier",
                            db.message()
                        ),
                        fix: "run `kurier migrate` against this database".into(),
                    }
                }
                Some("42501") => {
                    return Error::Setup {
                        problem: format!("permission denied ({})", db.message()),
                        fix: "grant the relay's role USAGE on schema kurier and SELECT, INSERT, UPDATE, DELETE on its tables".into(),
                    }
                }
                _ => {}
            }
        }
        Error::Database(e)
    }
}

fn database_error_is_retryable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            // Class 42 (syntax / undefined object / insufficient privilege) and
            // 28 (authorization) do not heal by themselves; the rest
            // (57P01 admin shutdown, 40001 serialization, 53xxx resources...) may.
            let code = db.code().unwrap_or_default();
            !(code.starts_with("42") || code.starts_with("28") || code.starts_with("3D"))
        }
        sqlx::Error::Configuration(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_) => false,
        _ => true,
    }
}
