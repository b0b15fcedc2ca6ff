//! Names that come from configuration or callers and end up inside SQL text
//! or Kafka requests: checked once, here, before they reach either.

use std::borrow::Cow;

use crate::error::Error;

/// The schema the migrations and queries are written against.
pub const DEFAULT_SCHEMA: &str = "kurier";

/// A PostgreSQL identifier Kurier may put into SQL text: lowercase ASCII
/// letters, digits and `_`, not starting with a digit, at most 63 bytes.
/// Lowercase only, so the name means the same quoted or unquoted.
pub fn validate_identifier(what: &str, name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if first_ok && rest_ok && name.len() <= 63 {
        Ok(())
    } else {
        Err(format!(
            "{what} `{}` is not a plain PostgreSQL identifier: use 1-63 characters of [a-z0-9_], not starting with a digit",
            name.escape_debug()
        ))
    }
}

/// A validated schema name that holds (or will hold) a Kurier outbox.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SchemaName(String);

impl SchemaName {
    pub fn new(name: &str) -> Result<SchemaName, String> {
        validate_identifier("schema", name)?;
        Ok(SchemaName(name.to_owned()))
    }

    /// Schema `kurier`.
    pub fn kurier() -> SchemaName {
        SchemaName(DEFAULT_SCHEMA.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `sql` (written against `kurier.`) for this schema.
    pub fn sql<'a>(&self, sql: &'a str) -> Cow<'a, str> {
        if self.0 == DEFAULT_SCHEMA {
            Cow::Borrowed(sql)
        } else {
            Cow::Owned(sql.replace("kurier.", &format!("{}.", self.0)))
        }
    }
}

impl std::fmt::Display for SchemaName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Kafka's own rule for topic names.
pub fn validate_topic(topic: &str) -> Result<(), Error> {
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if topic.is_empty()
        || topic.len() > 249
        || topic == "."
        || topic == ".."
        || !topic.chars().all(legal)
    {
        return Err(Error::InvalidMessage(format!(
            "illegal topic name `{}`: Kafka topic names are 1-249 characters of [a-zA-Z0-9._-] and not `.` or `..`",
            topic.escape_debug()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_rules_match_kafka() {
        for ok in ["orders", "a.b_c-1", &"x".repeat(249)] {
            assert!(validate_topic(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "has space", "ü", &"x".repeat(250), "a/b"] {
            let err = validate_topic(bad).unwrap_err().to_string();
            assert!(err.contains("illegal topic name"), "{err}");
        }
    }

    #[test]
    fn identifiers_are_plain() {
        for ok in ["kurier", "tenant_a", "_x1", &"a".repeat(63)] {
            assert!(SchemaName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1a",
            "Tenant",
            "a-b",
            "a.b",
            "a\"b",
            "a;drop",
            &"a".repeat(64),
        ] {
            let err = SchemaName::new(bad).unwrap_err();
            assert!(err.contains("not a plain PostgreSQL identifier"), "{err}");
        }
    }

    #[test]
    fn sql_is_rewritten_for_other_schemas() {
        let s = SchemaName::new("tenant_a").unwrap();
        assert_eq!(
            s.sql("DELETE FROM kurier.outbox WHERE kurier.lock_held(1)"),
            "DELETE FROM tenant_a.outbox WHERE tenant_a.lock_held(1)"
        );
        assert!(matches!(SchemaName::kurier().sql("x"), Cow::Borrowed(_)));
    }
}
