//! `[http]`: where `/healthz`, `/readyz` and `/metrics` listen.

use std::net::SocketAddr;

use serde::Deserialize;

use super::value::Keys;
use super::ConfigError;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp {
    addr: Option<String>,
}

/// `--http-addr` wins over the environment and the file; none = no listener.
pub(super) fn resolve(
    raw: RawHttp,
    k: &Keys,
    flag: Option<String>,
) -> Result<Option<SocketAddr>, ConfigError> {
    let Some(addr) = flag.or_else(|| k.text("http.addr", raw.addr)) else {
        return Ok(None);
    };
    addr.parse().map(Some).map_err(|_| {
        ConfigError::invalid(
            "http.addr",
            format!("`{addr}` is not a socket address"),
            "use HOST:PORT, e.g. 127.0.0.1:9187 (--http-addr / KURIER_HTTP_ADDR)",
        )
    })
}
