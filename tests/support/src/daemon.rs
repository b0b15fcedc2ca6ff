//! The daemon under test: its configuration, in-process or as the `kurier`
//! binary (use [`crate::kurier_bin!`] for the binary's path).

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};

use kurier_daemon::config::{Config, Overrides};
use tokio_util::sync::CancellationToken;

pub fn config(db_url: &str, brokers: &str, extra_toml: &str) -> Config {
    let env: BTreeMap<String, String> = [
        ("DATABASE_URL".to_string(), db_url.to_string()),
        ("KAFKA_BROKERS".to_string(), brokers.to_string()),
    ]
    .into();
    Config::from_toml(extra_toml, &env, &Overrides::default()).expect("test config")
}

/// The daemon, in-process.
pub struct InProcess {
    pub cancel: CancellationToken,
    pub handle: tokio::task::JoinHandle<Result<(), kurier_daemon::Error>>,
}

pub async fn start_in_process(config: Config) -> InProcess {
    run(kurier_daemon::Daemon::bind(config).await.expect("bind"))
}

/// The daemon in-process with its HTTP server on a free local port.
pub async fn start_with_http(mut config: Config) -> (InProcess, std::net::SocketAddr) {
    config.http_addr = Some("127.0.0.1:0".parse().unwrap());
    let daemon = kurier_daemon::Daemon::bind(config).await.expect("bind");
    let addr = daemon.http_addr().expect("an HTTP address was configured");
    (run(daemon), addr)
}

fn run(daemon: kurier_daemon::Daemon) -> InProcess {
    let cancel = CancellationToken::new();
    let handle = tokio::spawn(daemon.run(cancel.clone()));
    InProcess { cancel, handle }
}

impl InProcess {
    pub async fn stop(self) {
        self.cancel.cancel();
        self.handle
            .await
            .expect("daemon task")
            .expect("daemon result");
    }
}

/// The `kurier` binary (`bin`: [`crate::kurier_bin!`]) as a child process
/// (for SIGKILL / SIGTERM tests).
pub fn spawn_binary(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env_remove("KURIER_CONFIG")
        .env(
            "RUST_LOG",
            std::env::var("KURIER_TEST_CHILD_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn kurier")
}

pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{sig} failed");
}

/// The path of example `name` of the package under test, as `cargo test`
/// builds it (next to the test binary's folder).
pub fn example_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --release --workspace --examples` (make test does)",
        path.display()
    );
    path
}

/// Runs `kurier ARGS` (`bin`: [`crate::kurier_bin!`]) against `database_url`;
/// returns its stdout, panicking with its stderr when it fails.
pub fn cli(bin: &str, database_url: &str, args: &[&str]) -> String {
    let out = Command::new(bin)
        .args(args)
        .env_remove("KURIER_CONFIG")
        .env("DATABASE_URL", database_url)
        .output()
        .expect("run kurier");
    assert!(
        out.status.success(),
        "kurier {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// A child process killed (SIGKILL) when dropped, also when a test panics.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
