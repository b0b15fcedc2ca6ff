//! What the integration tests (`tests/*.rs`) and the bench
//! (`benches/kurier.rs`) share, by concern. Everything talks to a real
//! PostgreSQL (`DATABASE_URL`) and a real Kafka-protocol broker
//! (`KAFKA_BROKERS`); `make test` provides both. Nothing is mocked.

pub mod broker;
pub mod daemon;
pub mod db;
pub mod delivery;
pub mod env;
pub mod http;
pub mod inbox;
pub mod reader;
pub mod writer;

pub use broker::*;
pub use daemon::*;
pub use db::*;
pub use delivery::*;
pub use env::*;
pub use http::*;
pub use inbox::*;
pub use reader::*;
pub use writer::*;

/// The path of the `kurier` binary, in a test or bench of `kurier-daemon`
/// (Cargo tells only that package's targets where its binary is).
#[macro_export]
macro_rules! kurier_bin {
    () => {
        env!("CARGO_BIN_EXE_kurier")
    };
}
