//! `make bench`: figures measured side by side in one run, against the same
//! PostgreSQL and the same broker, so that ratios hold on a noisy machine.
//! Needs DATABASE_URL, KAFKA_BROKERS (scripts/bench.sh provides both).
//! BENCH_N (default 200000) sets the number of drained messages; BENCH_ONLY
//! (e.g. `drain,latency`) runs some parts: drain (with the raw producer and a
//! burst into a never-analyzed outbox beside it), burst1m, sustained
//! (BENCH_SUSTAINED_N rows at 50,000/s, default 3,000,000), events, projections, sagas,
//! idle, scale, latency
//! (with the raw producer baseline), notify, inbox.

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kurier_daemon::kafka::{client_config, KafkaConfig, Role};
use kurier_test_support::{consume, drop_db, fresh_named_db, new_topic};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

type Figures = BTreeMap<&'static str, f64>;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set; run `make bench`"))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    // The support crate reads DATABASE_URL itself; fail early with the fix.
    let (_, brokers) = (env("DATABASE_URL"), env("KAFKA_BROKERS"));
    // BENCH_KURIER: another build of the daemon, to compare two versions of
    // the code alternately on one machine (the README's A/B runs).
    let kurier = std::env::var("BENCH_KURIER").map_or(env!("CARGO_BIN_EXE_kurier"), leak);
    let mut f = Figures::new();
    eprintln!("bench: N = {n}, payload ~200 bytes, 1000 keys");

    let brokers = brokers.as_str();
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let run = |part: &str| only.is_empty() || only.split(',').any(|p| p == part);

    if run("drain") {
        f.extend(
            median_of_rounds(|| async move {
                let mut r = Figures::new();
                let db = fresh_db("drain").await;
                let topic = new_topic(brokers, "bench-drain", 6).await;
                r.insert(
                    "pg_batched_insert_rows_per_s",
                    prefill(&db, &topic, n).await,
                );
                // The raw producer, the drain and the burst one right after
                // the other: each ratio's two sides are seconds apart.
                raw_producer_cpu(brokers, n, &mut r).await;
                drain(&db, brokers, kurier, n, &mut r).await;
                drop_db(&db).await;
                burst_drain(brokers, kurier, n, "burst", &mut r).await;
                // The relay's batch discipline without the database: what
                // waiting for a whole batch's reports alone costs.
                r.insert(
                    "raw_producer_batch_at_a_time_msgs_per_s",
                    raw_producer(brokers, n, Some(relay_batch_size())).await,
                );
                r.insert(
                    "burst_vs_analyzed_drain",
                    r["burst_drain_msgs_per_s"] / r["relay_drain_msgs_per_s"],
                );
                r.insert(
                    "relay_vs_raw",
                    r["relay_drain_msgs_per_s"] / r["raw_producer_msgs_per_s"],
                );
                // The same without the daemon's start (a fixed cost, not a
                // per-message one: it is `relay_start_s` at any N).
                r.insert(
                    "relay_after_start_vs_raw",
                    r["relay_drain_after_start_msgs_per_s"] / r["raw_producer_msgs_per_s"],
                );
                r.insert(
                    "burst_after_start_vs_analyzed",
                    r["burst_drain_after_start_msgs_per_s"]
                        / r["relay_drain_after_start_msgs_per_s"],
                );
                r.insert(
                    "relay_vs_raw_batch_at_a_time",
                    r["relay_drain_msgs_per_s"] / r["raw_producer_batch_at_a_time_msgs_per_s"],
                );
                r.insert(
                    "relay_vs_pg_insert",
                    r["relay_drain_msgs_per_s"] / r["pg_batched_insert_rows_per_s"],
                );
                // Both sides keep the two cores busy, so the drain cannot beat
                // the raw producer by more than their CPU per message allows.
                let drain_cpu = r["relay_cpu_s_per_100k"]
                    + r["drain_postgres_cpu_s_per_100k"]
                    + r["drain_broker_cpu_s_per_100k"];
                let raw_cpu = r["raw_producer_cpu_s_per_100k"] + r["raw_broker_cpu_s_per_100k"];
                r.insert("drain_total_cpu_s_per_100k", drain_cpu);
                r.insert("raw_total_cpu_s_per_100k", raw_cpu);
                r.insert("raw_vs_drain_cpu_per_msg", raw_cpu / drain_cpu);
                r.insert(
                    "drain_cores_busy",
                    drain_cpu * r["relay_drain_msgs_per_s"] / 1e5,
                );
                r.insert(
                    "raw_cores_busy",
                    raw_cpu * r["raw_producer_msgs_per_s"] / 1e5,
                );
                r
            })
            .await,
        );
    }
    if run("drain") {
        drain_statements(&mut f).await;
        // What PostgreSQL's two statements alone take per 100k messages,
        // beside the raw producer's whole time for them: the share of the
        // two cores the drain gives to work the raw producer does not do.
        let per_100k = (f["claim_ms_per_batch"] + f["delete_ms_per_batch"])
            * (1e5 / relay_batch_size() as f64)
            / 1e3;
        f.insert("claim_and_delete_s_per_100k", per_100k);
        f.insert(
            "raw_producer_s_per_100k",
            1e5 / f["raw_producer_msgs_per_s"],
        );
    }
    if run("burst1m") {
        // One round: a million rows is the size of an outage's backlog.
        burst_drain(brokers, kurier, 1_000_000, "burst_1m", &mut f).await;
    }
    if run("sustained") {
        sustained(brokers, kurier, &mut f).await;
    }
    if run("events") {
        events(&mut f).await;
    }
    if run("projections") {
        projection_rebuild(&mut f).await;
    }
    if run("sagas") {
        sagas(brokers, kurier, &mut f).await;
    }
    if run("idle") {
        idle_cost(brokers, kurier, &mut f).await;
    }
    if run("scale") {
        scale(brokers, kurier, n, &mut f).await;
    }
    if run("latency") {
        for notify in [false, true] {
            let db = fresh_db("latency").await;
            if notify {
                install_notify(&db).await;
            }
            latency(&db, brokers, kurier, notify, &mut f).await;
        }
        raw_latency(brokers, &mut f).await;
    }
    if run("notify") {
        notify_cost(&mut f).await;
    }
    if run("inbox") {
        f.extend(
            median_of_rounds(|| async move {
                let mut r = Figures::new();
                inbox_vs_raw_consumer(brokers, kurier, (n / 4).max(1000), &mut r).await;
                r
            })
            .await,
        );
    }
    report(&f);
}

/// Rounds of the parts whose figures are compared as ratios.
const ROUNDS: usize = 5;

/// Runs `part` ROUNDS times, one round after the other, so that each ratio is
/// taken within a round (both sides measured seconds apart), and keeps each
/// figure's median across rounds (peak RSS: the highest). Every round's
/// figures go to stderr.
async fn median_of_rounds<F, Fut>(mut part: F) -> Figures
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Figures>,
{
    let mut rounds = Vec::new();
    for i in 0..ROUNDS {
        let r = part().await;
        eprintln!("round {}: {}", i + 1, serde_json::to_string(&r).unwrap());
        rounds.push(r);
    }
    let mut out = Figures::new();
    for key in rounds[0].keys() {
        let v: Vec<f64> = rounds.iter().map(|r| r[key]).collect();
        let pick = if key.ends_with("rss_mib") {
            v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
        } else {
            median(v)
        };
        out.insert(key, pick);
    }
    out
}

/// A migrated database for one part, named `kurier_bench_<part>_<uuid>`
/// (`make bench` drops those left by earlier runs).
async fn fresh_db(what: &str) -> String {
    let url = fresh_named_db(&format!("kurier_bench_{what}")).await;
    let pool = PgPool::connect(&url).await.expect("bench database");
    kurier::schema::migrate(&pool, &[]).await.expect("migrate");
    pool.close().await;
    url
}

fn payload(i: usize) -> serde_json::Value {
    serde_json::json!({"type": "OrderPlaced", "order": i, "customer": format!("customer-{}", i % 1000), "total_cents": i % 10_000, "note": "x".repeat(100)})
}

/// Batched INSERTs from clients (1,000 rows per statement, 4 connections at
/// once): what PostgreSQL can commit into the outbox, the floor the relay must
/// not fall below.
async fn prefill(db: &str, topic: &str, n: usize) -> f64 {
    const WRITERS: usize = 4;
    let pool = PgPoolOptions::new()
        .max_connections(WRITERS as u32)
        .connect(db)
        .await
        .unwrap();
    // Statements are built before the clock starts: the figure is PostgreSQL's.
    let chunks: Vec<(Vec<String>, Vec<serde_json::Value>)> = (0..n)
        .collect::<Vec<_>>()
        .chunks(1000)
        .map(|c| {
            (
                c.iter().map(|i| format!("key-{}", i % 1000)).collect(),
                c.iter().map(|i| payload(*i)).collect(),
            )
        })
        .collect();
    let queue = Arc::new(Mutex::new(chunks));
    let t = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (pool, queue, topic) = (pool.clone(), queue.clone(), topic.to_owned());
            tokio::spawn(async move {
                loop {
                    let Some((keys, payloads)) = queue.lock().unwrap().pop() else {
                        return;
                    };
                    sqlx::query("INSERT INTO kurier.outbox (topic, key, payload) SELECT $1, k, p FROM unnest($2::text[], $3::jsonb[]) AS u(k, p)")
                        .bind(&topic)
                        .bind(&keys)
                        .bind(&payloads)
                        .execute(&pool)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let _ = self.0.wait();
    }
}

fn spawn(kurier: &str, env: &[(&str, &str)]) -> Daemon {
    let mut c = Command::new(kurier);
    c.arg("run").env("RUST_LOG", "warn").stdout(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    Daemon(c.spawn().expect("spawn kurier"))
}

/// The fields of /proc/PID/stat after the command name (field 3 is index 0).
fn stat_fields(pid: &str) -> Vec<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit(')').next().unwrap_or("");
    rest.split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect()
}

/// USER_HZ on Linux: /proc reports CPU time in these ticks.
const TICKS: f64 = 100.0;

/// (utime + stime seconds, peak RSS KiB) of a process, from /proc.
fn proc_usage(pid: u32) -> (f64, u64) {
    let f = stat_fields(&pid.to_string());
    let cpu = f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (cpu / TICKS, hwm)
}

/// CPU seconds used so far by a process and its exited children
/// (utime + stime + cutime + cstime): PostgreSQL's postmaster collects its
/// finished backends and autovacuum workers in the latter two, so a
/// difference of two readings is what the program spent in between.
fn cpu_with_children(pid: &str) -> f64 {
    stat_fields(pid)
        .get(11..15)
        .map_or(0.0, |t| t.iter().sum::<f64>())
        / TICKS
}

/// [`cpu_with_children`] summed over every process named `comm`.
fn cpu_of(comm: &str) -> f64 {
    let mut cpu = 0.0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        let named = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim_end() == comm);
        if named {
            cpu += cpu_with_children(&pid);
        }
    }
    cpu
}

/// CPU seconds spent by the broker, PostgreSQL and this bench process from
/// `start` to each `per_100k` reading, for the per-program CPU figures.
struct CpuMeter {
    at: [f64; 3],
}

impl CpuMeter {
    fn start() -> Self {
        CpuMeter { at: Self::read() }
    }
    fn read() -> [f64; 3] {
        // scripts/bench.sh names the broker it started; otherwise every Tansu counts.
        let broker = match std::env::var("BENCH_BROKER_PID") {
            Ok(pid) => cpu_with_children(&pid),
            Err(_) => cpu_of("tansu"),
        };
        [broker, cpu_of("postgres"), proc_usage(std::process::id()).0]
    }
    /// (broker, postgres, bench process) CPU seconds per 100k messages.
    fn per_100k(&self, n: usize) -> [f64; 3] {
        let now = Self::read();
        let k = 100_000.0 / n as f64;
        [0, 1, 2].map(|i| (now[i] - self.at[i]) * k)
    }
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// The relay drains N pre-filled rows: time until the outbox is empty, i.e.
/// until every row's delivery report came back and its row was deleted.
async fn drain(db: &str, brokers: &str, kurier: &str, n: usize, f: &mut Figures) {
    let pool = PgPool::connect(db).await.unwrap();
    sqlx::query("VACUUM ANALYZE kurier.outbox")
        .execute(&pool)
        .await
        .unwrap();
    let first = first_id(&pool).await;
    let t = Instant::now();
    let meter = CpuMeter::start();
    let d = spawn(kurier, &[("DATABASE_URL", db), ("KAFKA_BROKERS", brokers)]);
    let times = time_drain(&pool, first, t).await;
    let (cpu, rss_kib) = proc_usage(d.0.id());
    let [broker, postgres, _] = meter.per_100k(n);
    times.insert("relay", n, f);
    f.insert("relay_cpu_s_per_100k", cpu * 100_000.0 / n as f64);
    f.insert("drain_broker_cpu_s_per_100k", broker);
    f.insert("drain_postgres_cpu_s_per_100k", postgres);
    f.insert("relay_peak_rss_mib", rss_kib as f64 / 1024.0);
    drop(d);
}

/// The relay's own statements on their own, one after the other, nothing
/// else running: the claim (as the relay sends it, every partition leased)
/// and the delete of what it claimed, over a 100k-row outbox; the median of
/// each per batch, and the claim's time spent converting `payload` to text
/// (the same rows read with and without `payload::text`).
async fn drain_statements(f: &mut Figures) {
    use kurier::outbox::store::claim;
    const ROWS: usize = 100_000;
    let relay = relay_config();
    let db = fresh_db("statements").await;
    prefill(&db, "bench", ROWS).await;
    let pool = PgPool::connect(&db).await.unwrap();
    for sql in [
        "VACUUM ANALYZE kurier.outbox",
        "UPDATE kurier.relay_leases SET owner = 'bench', expires_at = now() + interval '1 hour'",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    let schema = kurier::SchemaName::kurier();
    let mut conn = pool.acquire().await.unwrap();
    let (mut claims, mut deletes, mut texts) = (Vec::new(), Vec::new(), Vec::new());
    loop {
        let what = claim::Claim {
            owner: "bench",
            limit: relay.batch_size,
            max_bytes: relay.max_batch_bytes,
            skip: &[],
            start: 0,
        };
        let t = Instant::now();
        let rows = claim::claim(&mut conn, &schema, &what).await.unwrap();
        claims.push(t.elapsed().as_secs_f64() * 1e3);
        let Some(last) = rows.last() else { break };
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        texts.push(payload_text_ms(&mut conn, ids[0], last.id).await);
        let t = Instant::now();
        claim::delete_published(&mut conn, &schema, &ids)
            .await
            .unwrap();
        deletes.push(t.elapsed().as_secs_f64() * 1e3);
    }
    claims.pop(); // the empty claim at the end
    f.insert("claim_ms_per_batch", median(claims));
    f.insert("delete_ms_per_batch", median(deletes));
    f.insert("claim_payload_text_ms_per_batch", median(texts));
    drop(conn);
    pool.close().await;
    drop_db(&db).await;
}

/// Milliseconds that `payload::text` adds to reading the rows `lo..=hi`:
/// the same read with the column converted and without it.
async fn payload_text_ms(conn: &mut sqlx::PgConnection, lo: i64, hi: i64) -> f64 {
    let with = timed_read(
        conn,
        "SELECT id, payload::text FROM kurier.outbox WHERE id BETWEEN $1 AND $2 ORDER BY id",
        lo,
        hi,
    )
    .await;
    let without = timed_read(
        conn,
        "SELECT id FROM kurier.outbox WHERE id BETWEEN $1 AND $2 ORDER BY id",
        lo,
        hi,
    )
    .await;
    with - without
}

async fn timed_read(conn: &mut sqlx::PgConnection, sql: &str, lo: i64, hi: i64) -> f64 {
    let t = Instant::now();
    sqlx::query(sql)
        .bind(lo)
        .bind(hi)
        .fetch_all(conn)
        .await
        .unwrap();
    t.elapsed().as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A burst as a new user meets it: `n` rows inserted in ONE transaction
/// into a freshly migrated outbox whose statistics were never gathered (no
/// ANALYZE, and autovacuum may be off or not have run yet), then `kurier
/// run` with default settings, timed until the outbox is empty. Figures are
/// named `<name>_drain_msgs_per_s` and `<name>_insert_s`.
async fn burst_drain(brokers: &str, kurier: &str, n: usize, name: &str, f: &mut Figures) {
    let db = fresh_db(name).await;
    let topic = new_topic(brokers, "bench-burst", 6).await;
    let pool = PgPool::connect(&db).await.unwrap();
    let t = Instant::now();
    burst_insert(&pool, &topic, n).await;
    let insert = t.elapsed().as_secs_f64();
    let first = first_id(&pool).await;
    let t = Instant::now();
    let d = spawn(kurier, &[("DATABASE_URL", &db), ("KAFKA_BROKERS", brokers)]);
    let times = time_drain(&pool, first, t).await;
    drop(d);
    pool.close().await;
    drop_db(&db).await;
    times.insert(name, n, f);
    f.insert(leak(format!("{name}_insert_s")), insert);
}

/// The bench's rows (the keys and payloads of [`payload`]), written by one
/// statement in one transaction.
async fn burst_insert(pool: &PgPool, topic: &str, n: usize) {
    sqlx::query(
        "INSERT INTO kurier.outbox (topic, key, payload) \
         SELECT $1, 'key-' || (i % 1000), jsonb_build_object('type', 'OrderPlaced', 'order', i, \
                'customer', 'customer-' || (i % 1000), 'total_cents', i % 10000, 'note', repeat('x', 100)) \
         FROM generate_series(0, $2 - 1) AS i",
    )
    .bind(topic)
    .bind(n as i64)
    .execute(pool)
    .await
    .unwrap();
}

/// Figure names built at run time live as long as the bench.
fn leak(name: String) -> &'static str {
    Box::leak(name.into_boxed_str())
}

/// Millions of rows through the outbox at a steady rate while the relay
/// drains them, with autovacuum as the server has it (off on this project's
/// machines): the table's size and dead rows, sampled every second, with the
/// relay's own VACUUM on (the default) and off
/// (`KURIER_RELAY_VACUUM_DEAD_ROWS=0`). BENCH_SUSTAINED_N rows (default 3M).
async fn sustained(brokers: &str, kurier: &str, f: &mut Figures) {
    let n: usize = std::env::var("BENCH_SUSTAINED_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000_000);
    // Writers at a steady 50,000 rows/s (10,000 per transaction every 200 ms),
    // a rate the relay keeps up with, so the dead rows are the table's only growth.
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    for (name, threshold) in [("sustained", None), ("sustained_no_vacuum", Some("0"))] {
        let db = fresh_db(name).await;
        let topic = new_topic(brokers, "bench-sustained", 6).await;
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(&db)
            .await
            .unwrap();
        let mut env = vec![("DATABASE_URL", db.as_str()), ("KAFKA_BROKERS", brokers)];
        if let Some(t) = threshold {
            env.push(("KURIER_RELAY_VACUUM_DEAD_ROWS", t));
        }
        checkpoint(&pool).await;
        let d = spawn(kurier, &env);
        let t = Instant::now();
        let stop = tokio_util::sync::CancellationToken::new();
        let sampler = tokio::spawn(largest_table(pool.clone(), stop.clone()));
        for chunk in (0..n).step_by(10_000) {
            tick.tick().await;
            burst_insert(&pool, &topic, 10_000.min(n - chunk)).await;
        }
        wait_drained(&pool).await;
        let secs = t.elapsed().as_secs_f64();
        stop.cancel();
        let (max_mib, max_dead) = sampler.await.unwrap();
        let (final_mib, vacuums): (f64, i64) = sqlx::query_as(
            "SELECT pg_total_relation_size('kurier.outbox')::float8 / 1048576, \
                    coalesce((SELECT vacuum_count FROM pg_stat_user_tables WHERE relid = 'kurier.outbox'::regclass), 0)",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        drop(d);
        pool.close().await;
        drop_db(&db).await;
        f.insert(leak(format!("{name}_msgs_per_s")), n as f64 / secs);
        f.insert(leak(format!("{name}_max_table_mib")), max_mib);
        f.insert(leak(format!("{name}_final_table_mib")), final_mib);
        f.insert(leak(format!("{name}_max_dead_rows")), max_dead);
        f.insert(leak(format!("{name}_vacuums")), vacuums as f64);
    }
}

/// Writes out the dirty buffers the parts before left (the 1M-row burst's,
/// say), so that each variant of a long run starts from the same state and
/// its own first writes after a checkpoint (full-page images) are its own.
/// Needs a superuser or `pg_checkpoint`; without, says so and goes on.
async fn checkpoint(pool: &PgPool) {
    if let Err(e) = sqlx::query("CHECKPOINT").execute(pool).await {
        eprintln!("bench: CHECKPOINT refused ({e}); the sustained variants may start unequal");
    }
}

/// The outbox's largest size (MiB, heap and indexes) and most dead rows,
/// sampled every second until `stop`.
async fn largest_table(pool: PgPool, stop: tokio_util::sync::CancellationToken) -> (f64, f64) {
    let (mut mib, mut dead) = (0.0f64, 0.0f64);
    while !stop.is_cancelled() {
        let (m, d): (f64, f64) = sqlx::query_as(
            "SELECT pg_total_relation_size('kurier.outbox')::float8 / 1048576, \
                    coalesce((SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'kurier.outbox'::regclass), 0)::float8",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        (mib, dead) = (mib.max(m), dead.max(d));
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    (mib, dead)
}

/// Event-store appends against plain inserts of the same rows into a table
/// of the events' shape (no outbox row, no version check, no locks), and
/// beside plain inserts of those rows and their outbox rows, side by side:
/// 8 writers, each appending to its own stream, one transaction per event
/// for `APPEND_SECS` seconds; then with batches of 100 per transaction. The
/// three run back to back in each of ROUNDS rounds (the ratios are taken
/// within a round, medians kept: this shared machine's speed drifts by more
/// than the difference measured). And `read_all` catch-up in rounds too
/// ([`catch_up_round`]).
async fn events(f: &mut Figures) {
    let db = fresh_db("events").await;
    let pool = PgPoolOptions::new()
        .max_connections(9)
        .connect(&db)
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE TABLE plain_events (LIKE kurier.events INCLUDING DEFAULTS INCLUDING GENERATED INCLUDING INDEXES INCLUDING CONSTRAINTS); \
         CREATE SEQUENCE plain_position;",
    )
    .execute(&pool)
    .await
    .unwrap();
    f.extend(median_of_rounds(|| appends_round(&pool)).await);
    let total: i64 = count(&pool, "SELECT count(*) FROM kurier.events").await;
    f.extend(median_of_rounds(|| catch_up_round(&pool, total)).await);
    pool.close().await;
    drop_db(&db).await;
}

/// One round of [`events`]' catch-up: every event from position 0 in pages
/// of 10,000 through `EventStore::read_all` (the figure), then through
/// `SELECT * FROM kurier.read_all(...)` (information: the SQL function, which
/// builds each page before sending it).
async fn catch_up_round(pool: &PgPool, total: i64) -> Figures {
    let es = kurier::events::EventStore::new(pool.clone());
    let library = catch_up(total, |after| {
        let es = es.clone();
        async move { es.read_all(after, 10_000, None).await.unwrap() }
    })
    .await;
    let sql = catch_up(total, |after| async move {
        sqlx::query_as("SELECT * FROM kurier.read_all($1, 10000)")
            .bind(after)
            .fetch_all(pool)
            .await
            .unwrap()
    })
    .await;
    let mut f = Figures::new();
    f.insert("read_all_catch_up_events", total as f64);
    f.insert("read_all_catch_up_events_per_s", library);
    f.insert("read_all_sql_function_catch_up_events_per_s", sql);
    f.insert("read_all_library_vs_sql_function", library / sql);
    f
}

/// Events per second of reading all `total` events page by page, each page
/// after the last position of the one before.
async fn catch_up<F, Fut>(total: i64, mut page_after: F) -> f64
where
    F: FnMut(i64) -> Fut,
    Fut: std::future::Future<Output = Vec<kurier::events::RecordedEvent>>,
{
    let t = Instant::now();
    let (mut after, mut read) = (0i64, 0i64);
    loop {
        let page = page_after(after).await;
        let Some(last) = page.last() else { break };
        after = last.global_position;
        read += page.len() as i64;
    }
    assert_eq!(read, total, "catch-up read every event");
    read as f64 / t.elapsed().as_secs_f64()
}

/// One round of [`events`]' appends: plain, plain with outbox rows, append,
/// for single events and for batches of 100.
async fn appends_round(pool: &PgPool) -> Figures {
    const APPEND_SECS: f64 = 2.0;
    let mut f = Figures::new();
    for batch in [1usize, 100] {
        let plain = eight_writers(pool, batch, APPEND_SECS, Writes::Plain).await;
        let with_outbox = eight_writers(pool, batch, APPEND_SECS, Writes::PlainWithOutbox).await;
        let appends = eight_writers(pool, batch, APPEND_SECS, Writes::Append).await;
        let name = if batch == 1 { "single" } else { "batch100" };
        f.insert(leak(format!("plain_insert_{name}_events_per_s")), plain);
        f.insert(
            leak(format!("plain_insert_with_outbox_{name}_events_per_s")),
            with_outbox,
        );
        f.insert(leak(format!("append_{name}_events_per_s")), appends);
        f.insert(leak(format!("append_vs_plain_{name}")), appends / plain);
        // Information: the append against plain inserts of both rows it
        // writes (plain vs with_outbox shows what the outbox row costs).
        f.insert(
            leak(format!("append_vs_plain_with_outbox_{name}")),
            appends / with_outbox,
        );
        f.insert(
            leak(format!("plain_with_outbox_vs_plain_{name}")),
            with_outbox / plain,
        );
    }
    f
}

/// What [`eight_writers`] writes.
#[derive(Clone, Copy)]
enum Writes {
    /// The event rows into `plain_events`.
    Plain,
    /// The event rows and their outbox rows, one statement, no checks.
    PlainWithOutbox,
    /// `kurier.append_events` / `kurier.append_event`.
    Append,
}

/// Events per second of 8 writers for `secs`, each on its own streams,
/// `batch` events per transaction, written as `writes` says.
async fn eight_writers(pool: &PgPool, batch: usize, secs: f64, writes: Writes) -> f64 {
    let stop = Instant::now() + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = (0..8)
        .map(|w| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let es = kurier::events::EventStore::new(pool.clone());
                let stream = format!("bench-{}", uuid::Uuid::new_v4().simple());
                let mut version: Option<u64> = None;
                let mut n = 0usize;
                while Instant::now() < stop {
                    let events: Vec<kurier::events::NewEvent> = (0..batch)
                        .map(|i| kurier::events::NewEvent::json("Placed", payload(n + i)))
                        .collect();
                    let first = version.map_or(0, |v| v + 1);
                    match writes {
                        Writes::Plain => plain_insert(&pool, &stream, first, &events, false).await,
                        Writes::PlainWithOutbox => {
                            plain_insert(&pool, &stream, first, &events, true).await
                        }
                        Writes::Append => {
                            let expected = version.map_or(
                                kurier::events::Expected::NoStream,
                                kurier::events::Expected::Exact,
                            );
                            es.append(&stream, expected, &events).await.unwrap();
                        }
                    }
                    version = Some(version.map_or(batch as u64 - 1, |v| v + batch as u64));
                    n += batch;
                }
                let _ = w;
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / secs
}

/// The same rows as an append, inserted as they are into `plain_events`,
/// and with `outbox` each event's outbox row too (in the same statement).
async fn plain_insert(
    pool: &PgPool,
    stream: &str,
    first_version: u64,
    events: &[kurier::events::NewEvent],
    outbox: bool,
) {
    let data: Vec<serde_json::Value> = events
        .iter()
        .map(|e| e.data.as_json().cloned().unwrap_or_default())
        .collect();
    let ids: Vec<uuid::Uuid> = events.iter().map(|e| e.event_id).collect();
    let events_insert =
        "INSERT INTO plain_events (global_position, stream, version, type, data, event_id) \
         SELECT nextval('plain_position'), $1, $2 + n - 1, 'Placed', d, i \
         FROM unnest($3::jsonb[], $4::uuid[]) WITH ORDINALITY AS u(d, i, n)";
    let sql = if outbox {
        format!(
            "WITH e AS ({events_insert} RETURNING stream, version, data, event_id) \
             INSERT INTO kurier.outbox (message_id, topic, key, payload, headers) \
             SELECT event_id, 'bench', stream, data, \
                    jsonb_build_object('event-type', 'Placed', 'stream-version', version::text) \
             FROM e"
        )
    } else {
        events_insert.to_string()
    };
    sqlx::query(&sql)
        .bind(stream)
        .bind(first_version as i64)
        .bind(&data)
        .bind(&ids)
        .execute(pool)
        .await
        .unwrap();
}

/// A rebuild of a one-row-upsert SQL projection (`kurier.run_projection`,
/// batches of 10,000) against a plain `read_all` scan of the same events in
/// the same batches.
async fn projection_rebuild(f: &mut Figures) {
    let n: i64 = 200_000;
    let db = fresh_db("projections").await;
    let pool = PgPool::connect(&db).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE per_stream (stream text PRIMARY KEY, events bigint NOT NULL); \
         CREATE FUNCTION count_per_stream(e kurier.event) RETURNS void LANGUAGE sql AS $$ \
           INSERT INTO per_stream VALUES (e.stream, 1) ON CONFLICT (stream) DO UPDATE SET events = per_stream.events + 1 $$; \
         SELECT kurier.set_event_publishing(false);",
    )
    .execute(&pool)
    .await
    .unwrap();
    // 200k events over 1,000 streams, appended in batches.
    let es = kurier::events::EventStore::new(pool.clone());
    for s in 0..1000 {
        let events: Vec<kurier::events::NewEvent> = (0..n / 1000)
            .map(|i| kurier::events::NewEvent::json("Placed", serde_json::json!({"i": i})))
            .collect();
        es.append(
            &format!("order-{s}"),
            kurier::events::Expected::Any,
            &events,
        )
        .await
        .unwrap();
    }
    let t = Instant::now();
    let (mut after, mut scanned) = (0i64, 0i64);
    loop {
        let (rows, last): (i64, Option<i64>) =
            sqlx::query_as("SELECT count(*), max(global_position) FROM kurier.read_all($1, 10000)")
                .bind(after)
                .fetch_one(&pool)
                .await
                .unwrap();
        let Some(last) = last else { break };
        (after, scanned) = (last, scanned + rows);
    }
    let scan_rate = scanned as f64 / t.elapsed().as_secs_f64();
    sqlx::query("SELECT kurier.define_projection('per_stream', 'count_per_stream(kurier.event)')")
        .execute(&pool)
        .await
        .unwrap();
    let t = Instant::now();
    let mut applied = 0i64;
    loop {
        let mut tx = pool.begin().await.unwrap();
        let run = kurier::projection::store::run(
            &mut tx,
            &kurier::SchemaName::kurier(),
            "per_stream",
            10_000,
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        applied += i64::from(run.applied);
        if !run.more {
            break;
        }
    }
    let rebuild_rate = applied as f64 / t.elapsed().as_secs_f64();
    assert_eq!(applied, n, "the rebuild applied every event");
    f.insert("read_all_scan_events_per_s", scan_rate);
    f.insert("projection_rebuild_events_per_s", rebuild_rate);
    f.insert("projection_rebuild_vs_scan", rebuild_rate / scan_rate);
    pool.close().await;
    drop_db(&db).await;
}

/// Three-step sagas end to end with instant participants (examples/order-saga.rs,
/// one process each, their own inbox and relay in-process), the orchestrator
/// the `kurier` binary: sagas per second with 500 started at once, and per
/// step, at one saga at a time, the time from the command's outbox row to
/// its reply applied, and the orchestrator's own share of it (reply stored in
/// its inbox → applied, next command written).
async fn sagas(brokers: &str, kurier: &str, f: &mut Figures) {
    use kurier::saga::Step;
    let db = fresh_db("sagas").await;
    let pool = PgPool::connect(&db).await.unwrap();
    let saga_type = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let mut steps = Vec::new();
    for (role, verb, undo) in [
        ("stock", "reserve", Some("release")),
        ("payment", "charge", Some("refund")),
        ("shipping", "ship", None),
    ] {
        let topic = format!("{saga_type}.{role}.{verb}");
        kurier_test_support::create_topic(brokers, &topic, 3).await;
        let mut step = Step::new(role, topic);
        if let Some(undo) = undo {
            let t = format!("{saga_type}.{role}.{undo}");
            kurier_test_support::create_topic(brokers, &t, 3).await;
            step = step.compensate_on(t);
        }
        steps.push(step);
    }
    kurier_test_support::create_topic(brokers, &format!("saga.{saga_type}.replies"), 3).await;
    kurier::saga::define(
        &pool,
        &kurier::SchemaName::kurier(),
        &saga_type,
        &steps,
        None,
    )
    .await
    .unwrap();
    let participants: Vec<Daemon> = ["stock", "payment", "shipping"]
        .iter()
        .map(|role| {
            let mut c = Command::new(kurier_test_support::example_bin("order-saga"));
            c.args(["--prefix", &saga_type, "participant", role])
                .env("DATABASE_URL", &db)
                .env("KAFKA_BROKERS", brokers)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null());
            Daemon(c.spawn().expect("spawn a participant"))
        })
        .collect();
    let orchestrator = spawn(
        kurier,
        &[
            ("DATABASE_URL", &db),
            ("KAFKA_BROKERS", brokers),
            ("KURIER_SAGAS_POLL_INTERVAL_MS", "200"),
            (
                "KURIER_SAGAS_PROPERTIES",
                "session.timeout.ms=6000,max.poll.interval.ms=15000",
            ),
        ],
    );
    // Warm up: the consumer groups join before anything is measured.
    run_sagas(&pool, &saga_type, 3, 1).await;
    let (n, secs) = (500, run_sagas(&pool, &saga_type, 500, 500).await);
    f.insert("sagas_per_s", n as f64 / secs);
    let since: f64 = count_f64(&pool, "SELECT extract(epoch FROM now())::float8").await;
    run_sagas(&pool, &saga_type, 50, 1).await;
    let (p50, p99) = step_latency(&pool, since).await;
    f.insert("saga_step_p50_ms", p50);
    f.insert("saga_step_p99_ms", p99);
    let (a50, a99) = orchestrator_share(&pool, since).await;
    f.insert("saga_orchestrator_apply_p50_ms", a50);
    f.insert("saga_orchestrator_apply_p99_ms", a99);
    drop(orchestrator);
    drop(participants);
    pool.close().await;
    drop_db(&db).await;
}

/// Starts `n` sagas, at most `concurrent` running at once; returns seconds
/// until the last one completed.
async fn run_sagas(pool: &PgPool, saga_type: &str, n: usize, concurrent: usize) -> f64 {
    let t = Instant::now();
    let mut pending: Vec<uuid::Uuid> = Vec::new();
    let mut started = 0;
    while started < n || !pending.is_empty() {
        while started < n && pending.len() < concurrent {
            let id = uuid::Uuid::new_v4();
            kurier::saga::start(
                pool,
                &kurier::SchemaName::kurier(),
                saga_type,
                id,
                &serde_json::json!({"n": started}),
            )
            .await
            .unwrap();
            pending.push(id);
            started += 1;
        }
        let done: Vec<uuid::Uuid> = sqlx::query_scalar(
            "SELECT id FROM kurier.sagas WHERE id = ANY($1) AND status = 'completed'",
        )
        .bind(&pending)
        .fetch_all(pool)
        .await
        .unwrap();
        pending.retain(|id| !done.contains(id));
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "sagas stalled: {} pending",
            pending.len()
        );
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(if concurrent == 1 { 2 } else { 50 })).await;
        }
    }
    t.elapsed().as_secs_f64()
}

async fn count_f64(pool: &PgPool, sql: &str) -> f64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// p50 / p99 ms from a step's command (its outbox row written) to its reply
/// applied, for sagas started after `since` (epoch seconds).
async fn step_latency(pool: &PgPool, since: f64) -> (f64, f64) {
    sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) \
         FROM (SELECT extract(epoch FROM r.at - c.at) * 1000 AS ms \
               FROM kurier.saga_events r JOIN kurier.saga_events c \
                 ON c.saga_id = r.saga_id AND c.step = r.step AND c.kind = 'command_sent' \
               WHERE r.kind = 'reply' AND r.at > to_timestamp($1)) t",
    )
    .bind(since)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// p50 / p99 ms from a reply stored in the orchestrator's inbox to the reply
/// applied (the next command written in the same transaction).
async fn orchestrator_share(pool: &PgPool, since: f64) -> (f64, f64) {
    sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) \
         FROM (SELECT extract(epoch FROM r.at - i.received_at) * 1000 AS ms \
               FROM kurier.saga_events r JOIN kurier.inbox i \
                 ON i.consumer = 'kurier-sagas' AND i.message_id = r.message_id \
               WHERE r.kind = 'reply' AND r.at > to_timestamp($1)) t",
    )
    .bind(since)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Transactions per second a relay runs with nothing to do, on a fresh
/// database (right after a drain, autovacuum's transactions would count too).
async fn idle_cost(brokers: &str, kurier: &str, f: &mut Figures) {
    let db = fresh_db("idle").await;
    let pool = PgPool::connect(&db).await.unwrap();
    let d = spawn(kurier, &[("DATABASE_URL", &db), ("KAFKA_BROKERS", brokers)]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let xacts = |pool: PgPool| async move {
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(&pool)
            .await
            .unwrap();
        count(&pool, "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = current_database()").await
    };
    let before = xacts(pool.clone()).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = xacts(pool.clone()).await;
    // Two of our own statements fall between the two counts (the first
    // count's and the second reading's pg_stat_clear_snapshot); subtract them.
    f.insert(
        "relay_idle_db_xacts_per_s",
        ((after - before - 2).max(0)) as f64 / 5.0,
    );
    drop(d);
}

/// Drain rates with 1, 2 and 3 relay instances.
async fn scale(brokers: &str, kurier: &str, n: usize, f: &mut Figures) {
    let names = [
        "relay_1_instance_msgs_per_s",
        "relay_2_instances_msgs_per_s",
        "relay_3_instances_msgs_per_s",
    ];
    for (i, name) in names.into_iter().enumerate() {
        let db = fresh_db("scale").await;
        f.insert(name, drain_instances(&db, brokers, kurier, n, i + 1).await);
        drop_db(&db).await;
    }
}

/// N rows written by one SQL statement, drained by `instances` relays at once.
async fn drain_instances(db: &str, brokers: &str, kurier: &str, n: usize, instances: usize) -> f64 {
    let pool = PgPool::connect(db).await.unwrap();
    let topic = new_topic(brokers, "bench-scale", 6).await;
    sqlx::query(
        "INSERT INTO kurier.outbox (topic, key, payload) SELECT $1, 'key-' || (i % 1000), \
         jsonb_build_object('type', 'OrderPlaced', 'order', i, 'note', repeat('x', 100)) FROM generate_series(1, $2) AS i",
    )
    .bind(&topic)
    .bind(n as i64)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("VACUUM ANALYZE kurier.outbox")
        .execute(&pool)
        .await
        .unwrap();
    let t = Instant::now();
    let daemons: Vec<Daemon> = (0..instances)
        .map(|_| spawn(kurier, &[("DATABASE_URL", db), ("KAFKA_BROKERS", brokers)]))
        .collect();
    wait_drained(&pool).await;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    drop(daemons);
    rate
}

/// The outbox's lowest id (0 when empty), read before a drain starts.
async fn first_id(pool: &PgPool) -> i64 {
    count(pool, "SELECT coalesce(min(id), 0) FROM kurier.outbox").await
}

/// A drain's clock: from the daemon's spawn until the row with the lowest id
/// (`first`) is gone, i.e. the first batch was claimed, delivered and
/// deleted (process start, connections, leases, Kafka connection and that
/// batch), and from then until the outbox is empty.
struct DrainTimes {
    start_s: f64,
    total_s: f64,
    /// Rows still in the outbox when the start ended.
    rows_after_start: i64,
}

impl DrainTimes {
    /// `<name>_drain_msgs_per_s` (the whole drain, start included),
    /// `<name>_drain_after_start_msgs_per_s` and `<name>_start_s`.
    fn insert(&self, name: &str, n: usize, f: &mut Figures) {
        f.insert(
            leak(format!("{name}_drain_msgs_per_s")),
            n as f64 / self.total_s,
        );
        f.insert(
            leak(format!("{name}_drain_after_start_msgs_per_s")),
            self.rows_after_start as f64 / (self.total_s - self.start_s),
        );
        f.insert(leak(format!("{name}_start_s")), self.start_s);
    }
}

/// Times the drain of an outbox whose lowest id was `first`, begun at `t`.
async fn time_drain(pool: &PgPool, first: i64, t: Instant) -> DrainTimes {
    let probe = "SELECT count(*) FROM kurier.outbox WHERE id = $1";
    loop {
        let left: i64 = sqlx::query_scalar(probe)
            .bind(first)
            .fetch_one(pool)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let start_s = t.elapsed().as_secs_f64();
    // The snapshot of this count is taken as it starts, right after the clock.
    let rows_after_start = count(pool, "SELECT count(*) FROM kurier.outbox").await;
    wait_drained(pool).await;
    DrainTimes {
        start_s,
        total_s: t.elapsed().as_secs_f64(),
        rows_after_start,
    }
}

/// Returns once every outbox row was acknowledged and deleted. The probe walks
/// the primary key (`count(*)` here would start a parallel scan every time and
/// take CPU from the relay being measured).
async fn wait_drained(pool: &PgPool) {
    let probe = "SELECT count(*) FROM (SELECT 1 FROM kurier.outbox ORDER BY id LIMIT 1) AS t";
    while count(pool, probe).await > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The same N messages from memory through a plain producer with the relay's settings.
async fn raw_producer(brokers: &str, n: usize, lockstep: Option<usize>) -> f64 {
    let topic = new_topic(brokers, "bench-raw", 6).await;
    raw_producer_to(brokers, &topic, n, lockstep).await
}

/// The raw producer's rate, with its own and the broker's CPU per 100k messages.
async fn raw_producer_cpu(brokers: &str, n: usize, f: &mut Figures) {
    let meter = CpuMeter::start();
    f.insert(
        "raw_producer_msgs_per_s",
        raw_producer(brokers, n, None).await,
    );
    let [broker, _, producer] = meter.per_100k(n);
    f.insert("raw_broker_cpu_s_per_100k", broker);
    f.insert("raw_producer_cpu_s_per_100k", producer);
}

async fn install_notify(db: &str) {
    let pool = PgPool::connect(db).await.unwrap();
    sqlx::query("CREATE TRIGGER outbox_notify AFTER INSERT ON kurier.outbox FOR EACH STATEMENT EXECUTE FUNCTION kurier.notify_outbox()").execute(&pool).await.unwrap();
}

/// Single-row transactions at 200/s for 10 s; commit-to-consume latency.
async fn latency(db: &str, brokers: &str, kurier: &str, notify: bool, f: &mut Figures) {
    let topic = new_topic(brokers, "bench-latency", 1).await;
    let d = spawn(kurier, &[("DATABASE_URL", db), ("KAFKA_BROKERS", brokers)]);
    let pool = PgPool::connect(db).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (p50, p99) = send_to_consume(brokers, &topic, |i| {
        let (pool, topic) = (pool.clone(), topic.clone());
        async move {
            let mut tx = pool.begin().await.unwrap();
            let m = kurier::Message::json(&topic, payload(i)).key(format!("key-{}", i % 1000));
            let id = kurier::enqueue(&mut *tx, &m).await.unwrap();
            tx.commit().await.unwrap();
            id.to_string()
        }
    })
    .await;
    let (k50, k99) = if notify {
        ("latency_notify_p50_ms", "latency_notify_p99_ms")
    } else {
        ("latency_poll_p50_ms", "latency_poll_p99_ms")
    };
    f.insert(k50, p50);
    f.insert(k99, p99);
    drop(d);
}

/// The floor under the relay's latency: the same messages at the same rate,
/// handed straight to a producer with the relay's settings and read by the
/// same consumer (broker, producer linger and consumer fetch wait included).
async fn raw_latency(brokers: &str, f: &mut Figures) {
    let topic = new_topic(brokers, "bench-latency-raw", 1).await;
    let producer = raw_client(brokers);
    let (p50, p99) = send_to_consume(brokers, &topic, |i| {
        let (producer, topic) = (producer.clone(), topic.clone());
        async move {
            let m = RawMessage::new(i);
            // Not awaited: the clock starts when the producer has the message.
            drop(
                producer
                    .send_result(m.record(&topic))
                    .map_err(|(e, _)| e)
                    .unwrap(),
            );
            m.id
        }
    })
    .await;
    f.insert("latency_raw_producer_p50_ms", p50);
    f.insert("latency_raw_producer_p99_ms", p99);
}

/// Sends 2,000 messages at 200/s with `send(i)` (which returns the message
/// ID once the message is committed or handed over) while a consumer reads
/// the topic; p50 and p99 of send-to-consume, in ms.
async fn send_to_consume<F, Fut>(brokers: &str, topic: &str, mut send: F) -> (f64, f64)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let total = 2000;
    let received: Arc<Mutex<HashMap<String, Instant>>> = Default::default();
    let reader = {
        let (brokers, topic, received) = (brokers.to_owned(), topic.to_owned(), received.clone());
        std::thread::spawn(move || {
            consume(&brokers, &topic, total, |id| {
                received.lock().unwrap().insert(id, Instant::now());
            })
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await; // the reader is assigned
    let mut sent = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    for i in 0..total {
        tick.tick().await;
        let id = send(i).await;
        sent.insert(id, Instant::now());
    }
    reader.join().unwrap();
    let r = received.lock().unwrap();
    let mut lat: Vec<f64> = sent
        .iter()
        .filter_map(|(id, t)| {
            r.get(id)
                .map(|rt| rt.saturating_duration_since(*t).as_secs_f64() * 1000.0)
        })
        .collect();
    assert_eq!(lat.len(), total, "every sent message was consumed");
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p) as usize];
    (pct(0.50), pct(0.99))
}

/// 8 concurrent writers of single-row transactions, with and without the NOTIFY trigger.
async fn notify_cost(f: &mut Figures) {
    let mut tps = [0.0; 2];
    for (i, notify) in [false, true].into_iter().enumerate() {
        let db = fresh_db("notify").await;
        if notify {
            install_notify(&db).await;
        }
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect(&db)
            .await
            .unwrap();
        let stop = Instant::now() + Duration::from_secs(5);
        let mut tasks = Vec::new();
        for w in 0..8 {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < stop {
                    let mut tx = pool.begin().await.unwrap();
                    kurier::enqueue(
                        &mut *tx,
                        &kurier::Message::json("t", payload(n as usize)).key(format!("w{w}")),
                    )
                    .await
                    .unwrap();
                    tx.commit().await.unwrap();
                    n += 1;
                }
                n
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        tps[i] = total as f64 / 5.0;
    }
    f.insert("writers8_tps_without_notify", tps[0]);
    f.insert("writers8_tps_with_notify", tps[1]);
    f.insert("notify_cost_ratio", tps[1] / tps[0]);
}

/// A raw consumer and the inbox writer read the same topic.
async fn inbox_vs_raw_consumer(brokers: &str, kurier: &str, n: usize, f: &mut Figures) {
    let topic = new_topic(brokers, "bench-inbox", 4).await;
    raw_producer_to(brokers, &topic, n, None).await;
    let (b, t) = (brokers.to_owned(), topic.clone());
    let meter = CpuMeter::start();
    let raw_rate = tokio::task::spawn_blocking(move || consume(&b, &t, n, |_| {}))
        .await
        .unwrap();
    let [raw_broker, _, raw_consumer] = meter.per_100k(n);
    let db = fresh_db("inbox").await;
    let pool = PgPool::connect(&db).await.unwrap();
    let start = Instant::now();
    let meter = CpuMeter::start();
    let d = spawn(
        kurier,
        &[
            ("DATABASE_URL", &db),
            ("KAFKA_BROKERS", brokers),
            ("KURIER_RELAY_ENABLED", "false"),
            ("KURIER_INBOX_TOPICS", &topic),
            ("KURIER_INBOX_CONSUMER", "bench"),
        ],
    );
    // The raw reader uses assign(); the inbox writer first joins a consumer
    // group. Time the ingest from its first stored row, and the join apart.
    // The probe reads the writer's own counter row (updated in each batch's
    // transaction): `count(*)` over the growing inbox would scan it every
    // 10 ms and take CPU from the writer being measured.
    let probe = "SELECT coalesce(sum(received), 0)::bigint FROM kurier.inbox_stats";
    let mut first: Option<Instant> = None;
    loop {
        let stored = count(&pool, probe).await;
        if stored > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if stored >= n as i64 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "inbox ingest stalled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first = first.expect("rows were stored");
    let inbox_rate = n as f64 / first.elapsed().as_secs_f64();
    let rows = count(&pool, "SELECT count(*) FROM kurier.inbox").await;
    assert_eq!(rows, n as i64, "inbox rows vs messages produced");
    f.insert(
        "inbox_group_join_s",
        first.duration_since(start).as_secs_f64(),
    );
    let (cpu, rss) = proc_usage(d.0.id());
    let [broker, postgres, _] = meter.per_100k(n);
    drop(d);
    f.insert("raw_consumer_cpu_s_per_100k", raw_consumer);
    f.insert("raw_consumer_broker_cpu_s_per_100k", raw_broker);
    f.insert("inbox_broker_cpu_s_per_100k", broker);
    f.insert("inbox_postgres_cpu_s_per_100k", postgres);
    f.insert("raw_consumer_msgs_per_s", raw_rate);
    f.insert("inbox_ingest_msgs_per_s", inbox_rate);
    f.insert("inbox_vs_raw", inbox_rate / raw_rate);
    let pg_rate = pg_inbox_insert(&pool, &topic, n, 1000).await;
    f.insert("pg_inbox_insert_rows_per_s", pg_rate);
    f.insert("inbox_vs_pg_insert", inbox_rate / pg_rate);
    // Information: PostgreSQL's insert in batches of the writer's size.
    let same_batch = pg_inbox_insert(&pool, &topic, n, inbox_batch_size()).await;
    f.insert("pg_inbox_insert_writer_batch_rows_per_s", same_batch);
    f.insert("inbox_vs_pg_insert_writer_batch", inbox_rate / same_batch);
    f.insert("inbox_cpu_s_per_100k", cpu * 100_000.0 / n as f64);
    f.insert("inbox_peak_rss_mib", rss as f64 / 1024.0);
    pool.close().await;
    drop_db(&db).await;
}

/// The inbox writer's batch size as the spawned daemon resolves it (this
/// environment, which it inherits, plus the topic and consumer the bench
/// gives it).
fn inbox_batch_size() -> usize {
    use kurier_daemon::config::{Config, Env, Overrides, ProcessEnv};
    struct AsSpawned;
    impl Env for AsSpawned {
        fn get(&self, name: &str) -> Option<String> {
            match name {
                "KURIER_INBOX_TOPICS" => Some("bench-inbox".into()),
                "KURIER_INBOX_CONSUMER" => Some("bench".into()),
                _ => ProcessEnv.get(name),
            }
        }
    }
    let cfg = Config::load(None, &AsSpawned, &Overrides::default()).expect("daemon config");
    cfg.inbox.expect("topics given").batch_size as usize
}

/// PostgreSQL's own batched insert rate into a fresh table of the inbox's
/// shape with its dedup index: the same rows as the bench's messages, `rows`
/// per statement and transaction, from one connection (as the writer
/// stores), built before the clock starts.
async fn pg_inbox_insert(pool: &PgPool, topic: &str, n: usize, rows: usize) -> f64 {
    sqlx::raw_sql(
        "DROP TABLE IF EXISTS bench_inbox; CREATE TABLE bench_inbox (LIKE kurier.inbox INCLUDING ALL)",
    )
    .execute(pool)
    .await
    .unwrap();
    type Batch = (
        Vec<String>,
        Vec<i32>,
        Vec<i64>,
        Vec<Vec<u8>>,
        Vec<Vec<u8>>,
        Vec<serde_json::Value>,
    );
    let batches: Vec<Batch> = (0..n)
        .collect::<Vec<_>>()
        .chunks(rows)
        .map(|c| {
            let ids: Vec<String> = c.iter().map(|_| uuid::Uuid::new_v4().to_string()).collect();
            let headers = ids
                .iter()
                .map(|id| serde_json::json!({"message-id": id}))
                .collect();
            (
                ids,
                c.iter().map(|i| (*i % 4) as i32).collect(),
                c.iter().map(|i| *i as i64).collect(),
                c.iter()
                    .map(|i| format!("key-{}", i % 1000).into_bytes())
                    .collect(),
                c.iter()
                    .map(|i| payload(*i).to_string().into_bytes())
                    .collect(),
                headers,
            )
        })
        .collect();
    let mut conn = pool.acquire().await.unwrap();
    let t = Instant::now();
    for (ids, parts, offsets, keys, values, headers) in batches {
        sqlx::query(
            "INSERT INTO bench_inbox (consumer, message_id, topic, \"partition\", \"offset\", key, payload, headers) \
             SELECT 'bench', m, $1, p, o, k, v, h FROM unnest($2::text[], $3::int[], $4::bigint[], $5::bytea[], $6::bytea[], $7::jsonb[]) \
               AS u(m, p, o, k, v, h) ON CONFLICT (consumer, message_id) DO NOTHING",
        )
        .bind(topic)
        .bind(ids)
        .bind(parts)
        .bind(offsets)
        .bind(keys)
        .bind(values)
        .bind(headers)
        .execute(&mut *conn)
        .await
        .unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// The relay's settings as the spawned daemons resolve them (they inherit
/// this environment, e.g. `KURIER_RELAY_BATCH_SIZE`).
fn relay_config() -> kurier_daemon::config::RelayConfig {
    use kurier_daemon::config::{Config, Overrides, ProcessEnv};
    let cfg = Config::load(None, &ProcessEnv, &Overrides::default()).expect("daemon config");
    cfg.relay
}

/// `relay.batch_size` as the spawned daemons resolve it.
fn relay_batch_size() -> usize {
    relay_config().batch_size as usize
}

/// Sends n messages (the bench's payloads and keys, a message-id header each)
/// as fast as the producer takes them, and waits for every ack. At most
/// `WINDOW` reports are outstanding, so memory stays bounded as in the relay.
/// With `lockstep`, sends that many and waits for all their reports before
/// the next ones, as the relay does with a batch.
async fn raw_producer_to(brokers: &str, topic: &str, n: usize, lockstep: Option<usize>) -> f64 {
    const WINDOW: usize = 10_000;
    let producer = raw_client(brokers);
    let mut reports: std::collections::VecDeque<rdkafka::producer::DeliveryFuture> =
        std::collections::VecDeque::with_capacity(WINDOW);
    let t = Instant::now();
    for i in 0..n {
        let m = RawMessage::new(i);
        if lockstep.is_some_and(|b| i % b == 0) {
            while let Some(r) = reports.pop_front() {
                r.await.unwrap().map_err(|(e, _)| e).unwrap();
            }
        }
        if reports.len() == WINDOW {
            let r = reports.pop_front().unwrap();
            r.await.unwrap().map_err(|(e, _)| e).unwrap();
        }
        reports.push_back(
            producer
                .send_result(m.record(topic))
                .map_err(|(e, _)| e)
                .unwrap(),
        );
    }
    for r in reports {
        r.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// A plain producer with the relay's settings.
fn raw_client(brokers: &str) -> FutureProducer {
    let kafka = KafkaConfig {
        brokers: brokers.to_owned(),
        properties: Default::default(),
    };
    client_config(&kafka, Role::Producer, &Default::default(), None)
        .create()
        .unwrap()
}

/// The bench's message `i` as the raw producer sends it: the relay's key,
/// payload and `message-id` header.
struct RawMessage {
    id: String,
    key: String,
    value: String,
}

impl RawMessage {
    fn new(i: usize) -> Self {
        RawMessage {
            id: uuid::Uuid::new_v4().to_string(),
            key: format!("key-{}", i % 1000),
            value: payload(i).to_string(),
        }
    }

    fn record<'a>(&'a self, topic: &'a str) -> FutureRecord<'a, String, String> {
        let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: "message-id",
            value: Some(&self.id),
        });
        FutureRecord::to(topic)
            .key(&self.key)
            .payload(&self.value)
            .headers(headers)
    }
}

fn report(f: &Figures) {
    println!("\n{:<32} {:>14}", "figure", "value");
    for (k, v) in f {
        println!("{k:<32} {v:>14.2}");
    }
    let json: serde_json::Map<String, serde_json::Value> = f
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                serde_json::json!((v * 100.0).round() / 100.0),
            )
        })
        .collect();
    println!("BENCH_JSON {}", serde_json::Value::Object(json));
}
