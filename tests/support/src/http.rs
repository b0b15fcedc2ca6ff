//! Plain HTTP/1.1 requests to the daemon's listener.

/// The status code of `GET path` on the daemon's HTTP listener.
pub async fn http_status(addr: std::net::SocketAddr, path: &str) -> u16 {
    http_get(addr, path).await.0
}

/// Polls `GET path` until it answers `code`; fails with `why` after `within`.
pub async fn wait_for_status(
    addr: std::net::SocketAddr,
    path: &str,
    code: u16,
    within: std::time::Duration,
    why: &str,
) {
    let deadline = std::time::Instant::now() + within;
    while http_status(addr, path).await != code {
        assert!(std::time::Instant::now() < deadline, "{why}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Status code and body of a GET.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the daemon's HTTP port");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// The value of the `/metrics` series `name` (with its labels, exactly as
/// exposed) in `body`; fails naming it when it is missing.
pub fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{body}"))
}
