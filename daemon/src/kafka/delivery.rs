//! What the relay learns about a row from Kafka: delivered, or failed in
//! one of three ways that decide how the row is handled.

/// How a failed row is handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Can never succeed (illegal topic, too large, bad headers, not authorised):
    /// dead-letter now.
    Permanent(String),
    /// Specific to this row and possibly temporary (e.g. unknown topic while
    /// auto-creation is off): count an attempt, retry later, dead-letter when
    /// the budget is spent.
    Row(String),
    /// The broker or network, not the row (timeouts, broker down): retry the
    /// batch with backoff, count nothing against the row.
    Transient(String),
}

impl Failure {
    pub fn reason(&self) -> &str {
        match self {
            Failure::Permanent(r) | Failure::Row(r) | Failure::Transient(r) => r,
        }
    }
}

/// What a delivery report said about one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Acknowledged by the broker (`acks=all`).
    Delivered,
    Failed(Failure),
}
