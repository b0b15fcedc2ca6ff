//! Aggregates: state rebuilt from a stream's events (from the latest
//! snapshot on), commands decided against it, and the new events appended
//! with the version the decision was made on — retried with backoff when
//! another writer got there first.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use serde::de::DeserializeOwned;
use serde::Serialize;
use time::OffsetDateTime;

use super::codec::{decode, encode, DomainEvent};
use super::store::{self, Snapshot};
use super::{EventStore, Expected};
use crate::error::Error;

/// A consistency boundary with its own stream, `<category>-<id>`.
pub trait Aggregate: Default + Send + Sync {
    type Event: DomainEvent;
    type Command: Send + Sync;
    /// A refusal of a command (a business rule), not a storage failure.
    type Rejection: std::error::Error + Send + Sync + 'static;

    /// The stream category (`order` gives streams `order-42`).
    fn category() -> &'static str;

    fn apply(&mut self, event: &Self::Event);

    /// The events a command leads to, or why it is refused.
    fn decide(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Rejection>;

    /// The shape of the state in snapshots: a snapshot of another version is
    /// ignored (the state is rebuilt from the events), so bump it whenever the
    /// state's serialized form changes.
    const SNAPSHOT_VERSION: i32 = 1;
}

/// The stream of aggregate `id`.
pub fn stream_of<A: Aggregate>(id: &str) -> String {
    format!("{}-{id}", A::category())
}

/// Rebuilt state and the version it reflects (`None`: no stream yet).
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded<A> {
    pub state: A,
    pub version: Option<i64>,
}

impl<A> Loaded<A> {
    /// What an append decided on this state must expect.
    pub fn expected(&self) -> Expected {
        match self.version {
            None => Expected::NoStream,
            Some(v) => Expected::Exact(v as u64),
        }
    }
}

/// A point in a stream's past.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AsOf {
    /// After the event with this version.
    Version(i64),
    /// After the events recorded at or before this time: up to the stream's
    /// first event recorded later (`recorded_at` is its transaction's start,
    /// so a later version can carry an earlier time; it is not included
    /// before the events ahead of it).
    Time(OffsetDateTime),
}

/// What [`EventStore::execute`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Executed<E> {
    /// The stream's version after the append (unchanged when no events).
    pub version: Option<i64>,
    pub events: Vec<E>,
    /// Version conflicts met (and retried) on the way.
    pub conflicts: u32,
}

/// Why [`EventStore::execute`] did not append.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError<R: std::error::Error + 'static> {
    #[error("command refused: {0}")]
    Rejected(#[source] R),
    #[error(transparent)]
    Store(#[from] Error),
}

const PAGE: i32 = 1000;

impl EventStore {
    /// The aggregate's current state: its latest snapshot (when of
    /// `A::SNAPSHOT_VERSION`) plus the events after it.
    pub async fn load<A>(&self, id: &str) -> Result<Loaded<A>, Error>
    where
        A: Aggregate + DeserializeOwned,
    {
        self.load_until(&stream_of::<A>(id), i64::MAX, true).await
    }

    /// The aggregate as it was: after a version, or at a time (temporal
    /// queries). Snapshots are used only when they are not newer.
    pub async fn load_as_of<A>(&self, id: &str, as_of: AsOf) -> Result<Loaded<A>, Error>
    where
        A: Aggregate + DeserializeOwned,
    {
        let stream = stream_of::<A>(id);
        let until = match as_of {
            AsOf::Version(v) => v,
            AsOf::Time(t) => match store::version_at(self.pool(), self.schema(), &stream, t).await?
            {
                Some(v) => v,
                None => {
                    return Ok(Loaded {
                        state: A::default(),
                        version: None,
                    })
                }
            },
        };
        self.load_until(&stream, until, true).await
    }

    /// Rebuilt from every event, ignoring snapshots (to compare with [`EventStore::load`]).
    pub async fn replay<A>(&self, id: &str) -> Result<Loaded<A>, Error>
    where
        A: Aggregate + DeserializeOwned,
    {
        self.load_until(&stream_of::<A>(id), i64::MAX, false).await
    }

    async fn load_until<A>(
        &self,
        stream: &str,
        until: i64,
        snapshots: bool,
    ) -> Result<Loaded<A>, Error>
    where
        A: Aggregate + DeserializeOwned,
    {
        let mut loaded = Loaded {
            state: A::default(),
            version: None,
        };
        if snapshots {
            if let Some(s) = store::load_snapshot(self.pool(), self.schema(), stream).await? {
                let usable = s.schema_version == A::SNAPSHOT_VERSION && s.version <= until;
                if let (true, Ok(state)) = (usable, serde_json::from_value(s.state)) {
                    loaded = Loaded {
                        state,
                        version: Some(s.version),
                    };
                }
            }
        }
        loop {
            let from = loaded.version.map_or(0, |v| v + 1);
            let page = self.read_stream(stream, from, PAGE).await?;
            let full = page.len() == PAGE as usize;
            for recorded in page.iter().take_while(|e| e.version <= until) {
                // kurier.erase_stream's marker: what came before is gone, so
                // the state starts anew (it is not an event of `A`).
                if recorded.event_type == super::ERASED_MARKER {
                    loaded.state = A::default();
                } else {
                    loaded.state.apply(&decode::<A::Event>(recorded)?);
                }
                loaded.version = Some(recorded.version);
            }
            let reached_until = loaded.version.is_some_and(|v| v >= until);
            if !full || reached_until {
                return Ok(loaded);
            }
        }
    }

    /// Saves `loaded` as the stream's snapshot (an older one than stored is ignored).
    pub async fn save_snapshot<A>(&self, id: &str, loaded: &Loaded<A>) -> Result<bool, Error>
    where
        A: Aggregate + Serialize,
    {
        let Some(version) = loaded.version else {
            return Ok(false);
        };
        let state = serde_json::to_value(&loaded.state)
            .map_err(|e| Error::InvalidMessage(format!("state does not serialize: {e}")))?;
        let snapshot = Snapshot {
            stream: stream_of::<A>(id),
            version,
            state,
            schema_version: A::SNAPSHOT_VERSION,
        };
        store::save_snapshot(self.pool(), self.schema(), &snapshot).await
    }

    /// Loads, decides and appends, expecting the version it decided on; on a
    /// version conflict (another writer appended meanwhile) it loads and
    /// decides again, with capped exponential backoff, up to `attempts` times.
    pub async fn execute<A>(
        &self,
        id: &str,
        command: &A::Command,
        attempts: u32,
    ) -> Result<Executed<A::Event>, ExecuteError<A::Rejection>>
    where
        A: Aggregate + DeserializeOwned,
    {
        let stream = stream_of::<A>(id);
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(5))
            .with_max_delay(Duration::from_millis(500))
            .with_jitter()
            .without_max_times()
            .build();
        let mut conflicts = 0;
        loop {
            let loaded = self.load::<A>(id).await?;
            let events = loaded
                .state
                .decide(command)
                .map_err(ExecuteError::Rejected)?;
            if events.is_empty() {
                return Ok(Executed {
                    version: loaded.version,
                    events,
                    conflicts,
                });
            }
            let new = events.iter().map(encode).collect::<Result<Vec<_>, _>>()?;
            match self.append(&stream, loaded.expected(), &new).await {
                Ok(version) => {
                    return Ok(Executed {
                        version: Some(version),
                        events,
                        conflicts,
                    })
                }
                Err(Error::VersionConflict { .. }) if conflicts + 1 < attempts => {
                    conflicts += 1;
                    tokio::time::sleep(backoff.next().unwrap_or(Duration::from_millis(500))).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}
