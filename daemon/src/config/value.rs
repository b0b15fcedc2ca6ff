//! One key, one place: a file key like `relay.batch_size` is also the
//! environment variable `KURIER_RELAY_BATCH_SIZE`, derived here, so each
//! section names a key once. The environment wins over the file; an
//! unparsable value is an error naming the variable, never a silent default.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use super::{ConfigError, Env};

/// Looks keys up in the environment, falling back to the file's value.
pub(super) struct Keys<'a> {
    env: &'a dyn Env,
}

impl<'a> Keys<'a> {
    pub(super) fn new(env: &'a dyn Env) -> Self {
        Keys { env }
    }

    /// `relay.batch_size` → `KURIER_RELAY_BATCH_SIZE`.
    pub(super) fn var(key: &str) -> String {
        format!("KURIER_{}", key.replace('.', "_").to_ascii_uppercase())
    }

    /// How errors name a key: `relay.batch_size (KURIER_RELAY_BATCH_SIZE)`.
    pub(super) fn label(key: &str) -> String {
        format!("{key} ({})", Self::var(key))
    }

    /// The raw environment value of a variable that is not derived from a key.
    pub(super) fn env(&self, name: &str) -> Option<String> {
        self.env.get(name)
    }

    pub(super) fn text(&self, key: &str, file: Option<String>) -> Option<String> {
        self.env.get(&Self::var(key)).or(file)
    }

    pub(super) fn num<T: FromStr>(
        &self,
        key: &str,
        file: Option<T>,
        default: T,
    ) -> Result<T, ConfigError> {
        match self.env.get(&Self::var(key)) {
            None => Ok(file.unwrap_or(default)),
            Some(v) => v.trim().parse().map_err(|_| {
                ConfigError::invalid(
                    &Self::label(key),
                    format!("`{v}` is not a non-negative whole number"),
                    "give a number like the default in config.example.toml",
                )
            }),
        }
    }

    /// A `*_ms` key as a duration.
    pub(super) fn millis(
        &self,
        key: &str,
        file: Option<u64>,
        default: u64,
    ) -> Result<Duration, ConfigError> {
        Ok(Duration::from_millis(self.num(key, file, default)?))
    }

    /// A `*_secs` key as a duration.
    pub(super) fn secs(
        &self,
        key: &str,
        file: Option<u64>,
        default: u64,
    ) -> Result<Duration, ConfigError> {
        Ok(Duration::from_secs(self.num(key, file, default)?))
    }

    pub(super) fn flag(
        &self,
        key: &str,
        file: Option<bool>,
        default: bool,
    ) -> Result<bool, ConfigError> {
        match self.env.get(&Self::var(key)) {
            None => Ok(file.unwrap_or(default)),
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" => Ok(false),
                _ => Err(ConfigError::invalid(
                    &Self::label(key),
                    format!("`{v}` is not a boolean"),
                    "use true or false",
                )),
            },
        }
    }

    /// A list: comma-separated in the environment, an array in the file.
    pub(super) fn list(&self, key: &str, file: Option<Vec<String>>) -> Option<Vec<String>> {
        self.env.get(&Self::var(key)).map(split_list).or(file)
    }

    /// librdkafka properties: the file's table, then `key=value,...` from
    /// the environment on top.
    pub(super) fn properties(
        &self,
        key: &str,
        file: BTreeMap<String, toml::Value>,
    ) -> Result<BTreeMap<String, String>, ConfigError> {
        let mut out = BTreeMap::new();
        for (k, v) in file {
            let s = toml_scalar(&format!("{key}.\"{k}\""), v)?;
            out.insert(k, s);
        }
        let name = Self::var(key);
        for item in self
            .env
            .get(&name)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let (k, v) = item.split_once('=').ok_or_else(|| {
                ConfigError::invalid(
                    &name,
                    format!("`{item}` is not key=value"),
                    "write comma-separated key=value pairs, e.g. linger.ms=5,compression.type=lz4",
                )
            })?;
            out.insert(k.trim().to_owned(), v.trim().to_owned());
        }
        Ok(out)
    }
}

pub(super) fn split_list(v: String) -> Vec<String> {
    v.split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
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

/// A value that must lie in `range`, named by its key when it does not.
pub(super) fn in_range<T: PartialOrd + std::fmt::Display>(
    key: &str,
    value: T,
    range: std::ops::RangeInclusive<T>,
    default: T,
) -> Result<T, ConfigError> {
    if range.contains(&value) {
        return Ok(value);
    }
    Err(ConfigError::invalid(
        key,
        format!("{value} is out of range"),
        format!(
            "use a value from {} to {} (default {default})",
            range.start(),
            range.end()
        ),
    ))
}
