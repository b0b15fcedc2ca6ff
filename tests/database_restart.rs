//! PostgreSQL restarted mid-stream. The harness starts a private cluster (the
//! installed server binaries, a temporary data directory, a free port), so
//! the shared server is never restarted.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use kurier_test_support::*;
use tokio_util::sync::CancellationToken;

struct PrivatePg {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
}

impl PrivatePg {
    fn pg_ctl(&self, args: &[&str]) {
        let mut cmd = as_postgres(self.bin.join("pg_ctl"));
        cmd.arg("-D").arg(&self.data).args(args);
        let out = cmd.output().expect("pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start(&self) {
        let opts = format!(
            "-p {} -k /tmp -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port
        );
        self.pg_ctl(&[
            "-w",
            "-l",
            &self.data.join("log").display().to_string(),
            "-o",
            &opts,
            "start",
        ]);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let _ = as_postgres(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// PostgreSQL refuses to run as root: run its tools as the postgres user then.
fn as_postgres(program: PathBuf) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

fn private_pg() -> PrivatePg {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|d| d.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).filter(|p| p.join("initdb").exists()).max())
        .unwrap_or_else(|| panic!("no PostgreSQL server binaries under /usr/lib/postgresql: install the postgresql package (this test starts its own cluster)"));
    let data = std::env::temp_dir().join(unique("kurier-pg"));
    std::fs::create_dir_all(&data).unwrap();
    if is_root() {
        assert!(Command::new("chown")
            .arg("postgres")
            .arg(&data)
            .status()
            .unwrap()
            .success());
    }
    let out = as_postgres(bin.join("initdb"))
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "--auth=trust"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let pg = PrivatePg { bin, data, port };
    pg.start();
    pg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_survives_a_postgresql_restart_mid_stream() {
    let (pg, brokers, topic) = (private_pg(), brokers(), unique("pg-restart"));
    create_topic(&brokers, &topic, 3).await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&pg.url())
        .await
        .unwrap();
    kurier::schema::migrate(&pool, &[]).await.unwrap();
    // A backlog, so the restart hits the relay while it is publishing.
    let mut committed = write_concurrently(
        &pool,
        &topic,
        4,
        2000,
        4,
        0.10,
        Duration::ZERO,
        CancellationToken::new(),
    )
    .await;
    let cfg = config(
        &pg.url(),
        &brokers,
        "http = { addr = \"127.0.0.1:0\" }\n[relay]\nbatch_size = 50\nretry_max_ms = 1000\n",
    );
    let daemon = kurier_daemon::Daemon::bind(cfg).await.unwrap();
    let http = daemon.http_addr().unwrap();
    let cancel = CancellationToken::new();
    let handle = tokio::spawn(daemon.run(cancel.clone()));
    // Stop PostgreSQL as soon as the relay has published something.
    let backlog = outbox_count(&pool).await;
    let mut before = backlog;
    let waiting = std::time::Instant::now();
    while before == backlog {
        assert!(
            waiting.elapsed() < Duration::from_secs(30),
            "the relay published nothing within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        before = outbox_count(&pool).await;
    }
    assert!(
        before > 0,
        "the relay must still have work when PostgreSQL goes down"
    );

    pg.pg_ctl(&["-m", "fast", "stop"]);
    // Readiness turns false once the relay's next statement fails, which a
    // batch waiting for its delivery reports may delay on a slow machine.
    wait_for_status(
        http,
        "/readyz",
        503,
        Duration::from_secs(30),
        "still ready 30 s after PostgreSQL went down",
    )
    .await;
    assert!(
        !handle.is_finished(),
        "the daemon keeps running while PostgreSQL is down"
    );
    pg.start();

    pool.close().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&pg.url())
        .await
        .unwrap();
    let more = write_concurrently(
        &pool,
        &topic,
        4,
        200,
        4,
        0.10,
        Duration::ZERO,
        CancellationToken::new(),
    )
    .await;
    committed.ids.extend(more.ids);
    committed.rolled_back.extend(more.rolled_back);
    for (k, v) in more.order {
        committed.order.entry(k).or_default().extend(v);
    }
    wait_drained(&pool, Duration::from_secs(60)).await;
    wait_for_status(
        http,
        "/readyz",
        200,
        Duration::from_secs(30),
        "never ready again after the restart",
    )
    .await;
    let recs = read_ids(&brokers, &topic, &committed.ids, Duration::from_secs(60));
    assert_delivered_exactly(&recs, &committed);
    cancel.cancel();
    handle.await.unwrap().unwrap();
}
