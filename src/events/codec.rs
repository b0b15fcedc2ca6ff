//! Typed events. A domain event type is a serde enum written as
//! `#[serde(tag = "type", content = "data")]`: the tag is the stored event
//! type, the content its data. Each event type has a schema version (stored
//! in the event's metadata as `schema_version`), and upcasters turn the JSON
//! of an older version into the next, so events written years ago stay
//! readable after the event's shape changed: on read, the stored data is
//! upcast from its version to the current one, then deserialized.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{EventData, NewEvent, RecordedEvent};
use crate::error::Error;

/// The metadata key holding an event's schema version.
pub const SCHEMA_VERSION: &str = "schema_version";

/// A domain event: serde, adjacently tagged (`tag = "type", content = "data"`).
pub trait DomainEvent: Serialize + DeserializeOwned + Send + Sync {
    /// The current schema version of `event_type` (1 until its shape changes).
    fn schema_version(_event_type: &str) -> u32 {
        1
    }

    /// Turns the data of `event_type` at `version` into `version + 1`.
    /// Called for each version between the stored one and the current one.
    fn upcast(_event_type: &str, _version: u32, data: serde_json::Value) -> serde_json::Value {
        data
    }
}

/// The event as it is appended: its type, its data, and its schema version
/// in the metadata.
pub fn encode<E: DomainEvent>(event: &E) -> Result<NewEvent, Error> {
    let tagged = serde_json::to_value(event)
        .map_err(|e| Error::InvalidMessage(format!("event does not serialize: {e}")))?;
    let (event_type, data) = split(tagged)?;
    let version = E::schema_version(&event_type);
    let metadata = serde_json::json!({ SCHEMA_VERSION: version });
    Ok(NewEvent::json(event_type, data).metadata(metadata))
}

/// The stored event as `E`, upcast from its stored schema version.
pub fn decode<E: DomainEvent>(recorded: &RecordedEvent) -> Result<E, Error> {
    let Some(mut data) = recorded.data.clone() else {
        return Err(Error::InvalidMessage(format!(
            "event {} of {} holds bytes, not JSON: decode it yourself",
            recorded.event_id, recorded.stream
        )));
    };
    let stored = recorded
        .metadata
        .as_ref()
        .and_then(|m| m[SCHEMA_VERSION].as_u64())
        .unwrap_or(1) as u32;
    let current = E::schema_version(&recorded.event_type);
    for v in stored..current {
        data = E::upcast(&recorded.event_type, v, data);
    }
    let tagged = serde_json::json!({"type": recorded.event_type, "data": data});
    serde_json::from_value(tagged).map_err(|e| {
        Error::InvalidMessage(format!(
            "event {} ({} v{stored}) of {} does not deserialize: {e}; add an upcaster for its older shape",
            recorded.event_id, recorded.event_type, recorded.stream
        ))
    })
}

fn split(tagged: serde_json::Value) -> Result<(String, serde_json::Value), Error> {
    let serde_json::Value::Object(mut map) = tagged else {
        return Err(not_tagged());
    };
    let Some(serde_json::Value::String(event_type)) = map.remove("type") else {
        return Err(not_tagged());
    };
    let data = map.remove("data").unwrap_or(serde_json::Value::Null);
    if !map.is_empty() {
        return Err(not_tagged());
    }
    Ok((event_type, data))
}

fn not_tagged() -> Error {
    Error::InvalidMessage(
        "a DomainEvent must serialize as {\"type\": ..., \"data\": ...}: mark the enum #[serde(tag = \"type\", content = \"data\")]".into(),
    )
}

impl EventData {
    /// The JSON data, when the event holds JSON.
    pub fn as_json(&self) -> Option<&serde_json::Value> {
        match self {
            EventData::Json(v) => Some(v),
            EventData::Bytes(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    /// `Renamed` had a field `name` in version 1; version 2 calls it `title`.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "type", content = "data")]
    enum Doc {
        Created { id: u32 },
        Renamed { title: String },
        Archived,
    }

    impl DomainEvent for Doc {
        fn schema_version(t: &str) -> u32 {
            if t == "Renamed" {
                2
            } else {
                1
            }
        }
        fn upcast(t: &str, version: u32, mut data: serde_json::Value) -> serde_json::Value {
            if t == "Renamed" && version == 1 {
                data["title"] = data["name"].take();
                data.as_object_mut().unwrap().remove("name");
            }
            data
        }
    }

    fn recorded(event_type: &str, data: serde_json::Value, schema_version: u32) -> RecordedEvent {
        RecordedEvent {
            stream: "doc-1".into(),
            version: 0,
            global_position: 1,
            event_type: event_type.into(),
            data: Some(data),
            metadata: Some(serde_json::json!({ SCHEMA_VERSION: schema_version })),
            event_id: uuid::Uuid::nil(),
            recorded_at: time::OffsetDateTime::UNIX_EPOCH,
            data_bytes: None,
            category: "doc".into(),
        }
    }

    #[test]
    fn events_encode_as_type_data_and_their_schema_version() {
        let e = encode(&Doc::Renamed { title: "x".into() }).unwrap();
        assert_eq!(e.event_type, "Renamed");
        assert_eq!(e.data, EventData::Json(serde_json::json!({"title": "x"})));
        assert_eq!(e.metadata, Some(serde_json::json!({"schema_version": 2})));
        let unit = encode(&Doc::Archived).unwrap();
        assert_eq!(unit.data, EventData::Json(serde_json::Value::Null));
    }

    #[test]
    fn old_events_are_upcast_on_read() {
        let old = recorded("Renamed", serde_json::json!({"name": "draft"}), 1);
        assert_eq!(
            decode::<Doc>(&old).unwrap(),
            Doc::Renamed {
                title: "draft".into()
            }
        );
        let new = recorded("Renamed", serde_json::json!({"title": "final"}), 2);
        assert_eq!(
            decode::<Doc>(&new).unwrap(),
            Doc::Renamed {
                title: "final".into()
            }
        );
        let err = decode::<Doc>(&recorded("Deleted", serde_json::json!({}), 1)).unwrap_err();
        assert!(err.to_string().contains("does not deserialize"), "{err}");
    }
}
