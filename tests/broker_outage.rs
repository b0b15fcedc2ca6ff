//! The broker becomes unreachable mid-stream for two minutes and comes back.
//!
//! The test starts its own Tansu (`TANSU_BIN`) behind a TCP proxy that it can
//! cut: every connection is dropped and new ones are refused for several
//! seconds, as when a broker process stops, then it listens again. A real
//! Tansu restart cannot be used to check for loss, because the test broker
//! keeps topics in memory (its `memory://` storage) and a restart empties it.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kurier_test_support::*;
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Tansu listening on `port`, telling clients to connect to `advertised`.
#[allow(clippy::zombie_processes)] // Broker's Drop kills and waits
async fn start_tansu(port: u16, advertised: u16) -> Broker {
    let bin = required_env(
        "TANSU_BIN",
        "the Tansu broker binary (scripts/ensure-tansu.sh prints its path)",
    );
    let child = Command::new(bin)
        .args([
            "broker",
            "--listener-url",
            &format!("tcp://127.0.0.1:{port}"),
        ])
        .args([
            "--advertised-listener-url",
            &format!("tcp://127.0.0.1:{advertised}"),
        ])
        .args(["--storage-engine", "memory://tansu/"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tansu");
    for _ in 0..100 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Broker(child);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("tansu did not listen on {port}");
}

/// A TCP proxy that can be switched off (all connections cut, port closed) and on.
struct Proxy {
    port: u16,
    upstream: SocketAddr,
    up: Mutex<Option<CancellationToken>>,
}

impl Proxy {
    fn up(self: &Arc<Self>) {
        let token = CancellationToken::new();
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket
            .bind(([127, 0, 0, 1], self.port).into())
            .expect("proxy bind");
        let listener = socket.listen(128).unwrap();
        let (upstream, t) = (self.upstream, token.clone());
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    _ = t.cancelled() => return,
                    a = listener.accept() => a.unwrap(),
                };
                let t = t.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = t.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        *self.up.lock().unwrap() = Some(token);
    }

    fn down(&self) {
        if let Some(t) = self.up.lock().unwrap().take() {
            t.cancel();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_unreachable_then_back_loses_nothing() {
    let (tansu_port, proxy_port) = (free_port(), free_port());
    let _broker = start_tansu(tansu_port, proxy_port).await;
    let proxy = Arc::new(Proxy {
        port: proxy_port,
        upstream: ([127, 0, 0, 1], tansu_port).into(),
        up: Mutex::new(None),
    });
    proxy.up();
    let brokers = format!("127.0.0.1:{proxy_port}");
    let (db, topic) = (fresh_db().await, unique("outage"));
    create_topic(&brokers, &topic, 3).await;
    // A short message.timeout.ms makes batches time out during the outage, so
    // the retry path (not only librdkafka's own queueing) is exercised.
    let cfg = config(
        &db.url,
        &brokers,
        "http = { addr = \"127.0.0.1:0\" }\n[relay]\nbatch_size = 100\nretry_max_ms = 1000\n[kafka.properties]\n\"reconnect.backoff.max.ms\" = 500\n\"message.timeout.ms\" = 4000\n",
    );
    let daemon = kurier_daemon::Daemon::bind(cfg).await.unwrap();
    let http = daemon.http_addr().unwrap();
    let cancel = CancellationToken::new();
    let handle = tokio::spawn(daemon.run(cancel.clone()));

    let stop = CancellationToken::new();
    let writers = {
        let (pool, topic, stop) = (db.pool.clone(), topic.clone(), stop.clone());
        tokio::spawn(async move {
            write_concurrently(
                &pool,
                &topic,
                2,
                1_000_000,
                4,
                0.10,
                Duration::from_millis(10),
                stop,
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.down();
    let before = outbox_count(&db.pool).await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    let during = outbox_count(&db.pool).await;
    assert!(
        during > before,
        "rows keep arriving while the broker is away ({before} -> {during})"
    );
    assert_eq!(
        http_status(http, "/readyz").await,
        503,
        "not ready while the broker is unreachable"
    );
    assert!(
        !handle.is_finished(),
        "the daemon keeps running through the outage"
    );
    proxy.up();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let committed = writers.await.unwrap();
    wait_drained(&db.pool, Duration::from_secs(90)).await;
    let recs = read_ids(&brokers, &topic, &committed.ids, Duration::from_secs(120));
    assert_delivered_exactly(&recs, &committed);
    wait_for_status(
        http,
        "/readyz",
        200,
        Duration::from_secs(30),
        "not ready again 30 s after the broker came back and the outbox drained",
    )
    .await;
    // Idle (nothing to publish) with the broker gone: not ready either.
    proxy.down();
    wait_for_status(
        http,
        "/readyz",
        503,
        Duration::from_secs(30),
        "an idle relay must report not-ready when the broker is gone",
    )
    .await;
    proxy.up();
    cancel.cancel();
    handle.await.unwrap().unwrap();
}

/// The inbox writer with nothing to consume: ready while the broker answers,
/// not ready when it is gone, ready again when it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_inbox_writer_is_not_ready_while_the_broker_is_gone() {
    let (tansu_port, proxy_port) = (free_port(), free_port());
    let _broker = start_tansu(tansu_port, proxy_port).await;
    let proxy = Arc::new(Proxy {
        port: proxy_port,
        upstream: ([127, 0, 0, 1], tansu_port).into(),
        up: Mutex::new(None),
    });
    proxy.up();
    let brokers = format!("127.0.0.1:{proxy_port}");
    let (db, topic) = (fresh_db().await, unique("inbox-outage"));
    create_topic(&brokers, &topic, 1).await;
    let cfg = config(
        &db.url,
        &brokers,
        &format!(
            "http = {{ addr = \"127.0.0.1:0\" }}\n[relay]\nenabled = false\n[inbox]\nconsumer = \"{}\"\ntopics = [\"{topic}\"]\n\
             [inbox.properties]\n\"session.timeout.ms\" = 6000\n\"max.poll.interval.ms\" = 15000\n\"reconnect.backoff.max.ms\" = 500\n",
            unique("svc")
        ),
    );
    let daemon = kurier_daemon::Daemon::bind(cfg).await.unwrap();
    let http = daemon.http_addr().unwrap();
    let cancel = CancellationToken::new();
    let handle = tokio::spawn(daemon.run(cancel.clone()));
    let wait_for = |code, within, why| wait_for_status(http, "/readyz", code, within, why);
    wait_for(
        200,
        Duration::from_secs(30),
        "an idle inbox writer with the broker up is ready",
    )
    .await;
    proxy.down();
    wait_for(
        503,
        Duration::from_secs(30),
        "not ready while the broker is gone",
    )
    .await;
    proxy.up();
    wait_for(
        200,
        Duration::from_secs(60),
        "ready again once the broker is back",
    )
    .await;
    cancel.cancel();
    handle.await.unwrap().unwrap();
}
