//! The `kurier` binary: parse, load the configuration, set up logging and
//! signals, run, map the result to an exit code. The commands are in `cli`.

use std::process::ExitCode;

use clap::Parser;
use kurier_daemon::cli::{self, Cli};
use kurier_daemon::config::{Config, Overrides, ProcessEnv};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    kurier_daemon::allocator::tune();
    let cli = Cli::parse();
    let overrides = Overrides {
        http_addr: cli.http_addr.clone(),
    };
    let config = match Config::load(cli.config.as_deref(), &ProcessEnv, &overrides)
        .and_then(|c| cli.command.check_config(c))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kurier: configuration refused: {e}");
            return ExitCode::from(2);
        }
    };
    kurier_daemon::telemetry::init(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let shutdown = CancellationToken::new();
    if cli.command.stops_on_signal() {
        runtime.spawn(on_signals(shutdown.clone()));
    }
    match runtime.block_on(cli::dispatch(cli, config, shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("kurier: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// First SIGTERM/SIGINT: graceful stop. Second: exit at once.
async fn on_signals(cancel: CancellationToken) {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!(
        "shutdown requested: finishing the in-flight batch (signal again to exit at once)"
    );
    cancel.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    eprintln!("kurier: second signal, exiting without waiting");
    std::process::exit(130);
}
