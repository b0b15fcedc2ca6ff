//! The outbox row → Kafka record mapping of SPEC "Message mapping": the
//! row's `headers` object plus `message-id`, CloudEvents binary-mode
//! attributes when enabled, and the W3C trace context found among them.

use kurier::outbox::MESSAGE_ID_HEADER;
use rdkafka::message::{Header, OwnedHeaders};

use super::delivery::Failure;

/// What the relay adds to a record besides the row's own headers.
#[derive(Debug, Clone, Copy)]
pub struct Extra<'a> {
    pub message_id: &'a str,
    /// CloudEvents binary mode: `ce_source`, when enabled.
    pub cloudevents_source: Option<&'a str>,
    pub topic: &'a str,
    /// `application/json` for JSON payloads, `application/octet-stream` for
    /// bytes, `None` for a tombstone.
    pub content_type: Option<&'a str>,
}

/// Kafka headers of one record, and the W3C trace context found among them.
#[derive(Debug)]
pub struct RecordHeaders {
    pub headers: OwnedHeaders,
    pub traceparent: Option<String>,
}

/// The row's `headers` object plus `message-id` (and the CloudEvents
/// attributes when enabled). Values must be strings (or null, meaning a
/// header without value); anything else is malformed input.
pub fn record_headers(headers_json: &str, extra: &Extra<'_>) -> Result<RecordHeaders, Failure> {
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(headers_json)
        .map_err(|e| Failure::Permanent(format!("headers are not a JSON object: {e}")))?;
    let mut out = OwnedHeaders::new_with_capacity(map.len() + 6);
    let mut traceparent = None;
    for (name, value) in &map {
        if name == MESSAGE_ID_HEADER {
            return Err(Failure::Permanent(
                "header `message-id` is reserved: Kurier sets it from the message_id column".into(),
            ));
        }
        out = match value {
            serde_json::Value::String(s) => {
                if name == TRACEPARENT_HEADER {
                    traceparent = Some(s.clone());
                }
                out.insert(Header { key: name, value: Some(s.as_bytes()) })
            }
            serde_json::Value::Null => out.insert(Header { key: name, value: None::<&[u8]> }),
            other => {
                return Err(Failure::Permanent(format!(
                    "header `{name}` is {other}, not a string: outbox header values must be JSON strings"
                )))
            }
        };
    }
    out = out.insert(Header {
        key: MESSAGE_ID_HEADER,
        value: Some(extra.message_id.as_bytes()),
    });
    if let Some(source) = extra.cloudevents_source {
        for (name, value) in cloudevent_attributes(&map, extra, source) {
            out = out.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
    }
    Ok(RecordHeaders {
        headers: out,
        traceparent,
    })
}

/// The W3C Trace Context header, passed through and used to link the relay's span.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// CloudEvents 1.0 required attributes in the Kafka binding's binary mode
/// (`ce_` headers, `content-type` for datacontenttype). A header the row
/// already carries wins, so a service can set its own `ce_type`.
fn cloudevent_attributes<'a>(
    row: &'a serde_json::Map<String, serde_json::Value>,
    extra: &Extra<'a>,
    source: &'a str,
) -> Vec<(&'static str, &'a str)> {
    let row_str = |k: &str| row.get(k).and_then(|v| v.as_str());
    // Debezium-shape rows carry the event type in `type`; otherwise the topic names it.
    let ty = row_str("type").unwrap_or(extra.topic);
    let mut attrs = vec![
        ("ce_specversion", "1.0"),
        ("ce_id", extra.message_id),
        ("ce_source", source),
        ("ce_type", ty),
    ];
    if let Some(ct) = extra.content_type {
        attrs.push(("content-type", ct));
    }
    attrs.retain(|(k, _)| !row.contains_key(*k));
    attrs
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    #[test]
    fn headers_map_with_message_id_last() {
        let h = record_headers(r#"{"traceparent":"00-ab","empty":null}"#, &extra(None)).unwrap();
        assert_eq!(h.traceparent.as_deref(), Some("00-ab"));
        let got: Vec<(String, Option<Vec<u8>>)> = h
            .headers
            .iter()
            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
            .collect();
        assert_eq!(
            got,
            vec![
                ("empty".into(), None),
                ("traceparent".into(), Some(b"00-ab".to_vec())),
                ("message-id".into(), Some(b"id-1".to_vec())),
            ]
        );
    }

    fn extra(source: Option<&str>) -> Extra<'_> {
        Extra {
            message_id: "id-1",
            cloudevents_source: source,
            topic: "orders",
            content_type: Some("application/json"),
        }
    }

    #[test]
    fn cloudevents_binary_mode_headers() {
        let h =
            record_headers(r#"{"ce_type":"com.example.placed"}"#, &extra(Some("/shop"))).unwrap();
        let got: Vec<(String, String)> = h
            .headers
            .iter()
            .map(|h| {
                (
                    h.key.to_owned(),
                    String::from_utf8(h.value.unwrap().to_vec()).unwrap(),
                )
            })
            .collect();
        let expect = [
            ("ce_type", "com.example.placed"),
            ("message-id", "id-1"),
            ("ce_specversion", "1.0"),
            ("ce_id", "id-1"),
            ("ce_source", "/shop"),
            ("content-type", "application/json"),
        ];
        let expect: Vec<(String, String)> = expect
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(got, expect);
        // Without ce_type in the row, `type` (Debezium shape) or else the topic names it.
        let ty = |json| {
            let h = record_headers(json, &extra(Some("/s"))).unwrap();
            let v = h
                .headers
                .iter()
                .find(|h| h.key == "ce_type")
                .unwrap()
                .value
                .unwrap()
                .to_vec();
            String::from_utf8(v).unwrap()
        };
        assert_eq!(ty(r#"{"type":"OrderPlaced"}"#), "OrderPlaced");
        assert_eq!(ty("{}"), "orders");
    }

    #[test]
    fn non_string_header_is_permanent() {
        let err = record_headers(r#"{"n":1}"#, &extra(None)).unwrap_err();
        assert!(
            matches!(err, Failure::Permanent(ref r) if r.contains("`n`")),
            "{err:?}"
        );
    }
}
