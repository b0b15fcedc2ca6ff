//! W3C Trace Context. A `traceparent` in an outbox row's headers reaches the
//! Kafka record unchanged (`publisher`); the relay's span for that record
//! carries the same trace and parent span IDs (`link.trace_id`,
//! `link.span_id`), so the writer's trace and the relay's publish can be
//! joined in a log search or by a tracing layer that turns them into span links.

use tracing::Span;

/// A parsed `traceparent` (version 00).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: String,
    pub span_id: String,
    pub sampled: bool,
}

impl TraceContext {
    /// `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`; `None` for
    /// anything else (the header is still passed through unchanged).
    pub fn parse(header: &str) -> Option<TraceContext> {
        let mut parts = header.trim().split('-');
        let (version, trace_id, span_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, n: usize| {
            s.len() == n
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        let all_zero = |s: &str| s.bytes().all(|b| b == b'0');
        if parts.next().is_some()
            || version != "00"
            || !hex(trace_id, 32)
            || !hex(span_id, 16)
            || !hex(flags, 2)
            || all_zero(trace_id)
            || all_zero(span_id)
        {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(TraceContext {
            trace_id: trace_id.to_owned(),
            span_id: span_id.to_owned(),
            sampled: flags & 1 == 1,
        })
    }
}

/// The log target of the spans below, kept from before the daemon had a
/// crate of its own: `RUST_LOG=info,kurier::trace=debug` turns them on.
pub const TARGET: &str = "kurier::trace";

/// The relay's span for publishing one traced record (debug level, so it
/// costs nothing unless enabled, e.g. `RUST_LOG=info,kurier::trace=debug`).
pub fn publish_span(traceparent: Option<&str>, message_id: &str, topic: &str) -> Span {
    let Some(ctx) = traceparent.and_then(TraceContext::parse) else {
        return Span::none();
    };
    tracing::debug_span!(
        target: TARGET,
        "publish",
        message_id,
        topic,
        link.trace_id = %ctx.trace_id,
        link.span_id = %ctx.span_id,
        link.sampled = ctx.sampled
    )
}

/// Records the delivery report inside the record's span.
pub fn delivered(ok: bool) {
    tracing::debug!(target: TARGET, acknowledged = ok, "delivery report");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_w3c_examples() {
        let c =
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(c.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.span_id, "00f067aa0ba902b7");
        assert!(c.sampled);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad}");
        }
    }
}
