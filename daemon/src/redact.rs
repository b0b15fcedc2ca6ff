//! Keeps secrets out of logs and error messages.

/// Returns `url` with its password (if any) replaced by `***`.
/// Text that is not a URL is returned with everything between `://` and `@` hidden,
/// so that a malformed URL with credentials is not echoed either.
pub fn redact_url(url: &str) -> String {
    if let Ok(mut u) = url::Url::parse(url) {
        if u.password().is_some() {
            let _ = u.set_password(Some("***"));
        }
        return u.to_string();
    }
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***{}", &url[..s], &url[at..]),
        _ => url.to_owned(),
    }
}

/// Removes every occurrence of the password of `url` from `text` (for driver
/// errors that might quote the connection string).
pub fn scrub(text: &str, url: &str) -> String {
    match url::Url::parse(url)
        .ok()
        .and_then(|u| u.password().map(str::to_owned))
    {
        Some(p) if !p.is_empty() => text.replace(&p, "***"),
        _ => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hides_password_keeps_the_rest() {
        let r = redact_url("postgres://app:s3cret@db:5432/orders?sslmode=require");
        assert_eq!(r, "postgres://app:***@db:5432/orders?sslmode=require");
    }

    #[test]
    fn url_without_password_is_unchanged() {
        assert_eq!(redact_url("postgres://app@db/x"), "postgres://app@db/x");
    }

    #[test]
    fn unparsable_url_with_credentials_is_hidden() {
        let r = redact_url("postgres://app:pa ss@[bad/x");
        assert!(!r.contains("pa ss"), "{r}");
    }

    #[test]
    fn scrub_removes_password_from_text() {
        assert_eq!(
            scrub("failed for app:pw1@db", "postgres://app:pw1@db/x"),
            "failed for app:***@db"
        );
    }
}
