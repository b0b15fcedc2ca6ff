"""End-to-end check of the relay with third-party clients only.

Writers: psycopg, plain SQL `INSERT INTO kurier.outbox` in transactions, 10% of
them rolled back. Reader: confluent-kafka (librdkafka), assigned to every
partition from the beginning. Phase 1 relays with one steady `kurier run`;
phase 2 SIGKILLs and restarts it every 1-2 seconds; phase 3 runs three relays,
one SIGKILLed and restarted and one SIGSTOPped for longer than its lease, over
and over. Checks: zero lost, zero phantom, zero per-key order violations,
`message-id` on every record.
"""
import argparse, json, os, random, signal, subprocess, sys, threading, time, uuid

import psycopg
from confluent_kafka import Consumer, TopicPartition, OFFSET_BEGINNING
from confluent_kafka.admin import AdminClient, NewTopic

INSERT = "INSERT INTO kurier.outbox (topic, key, payload) VALUES (%s, %s, %s::jsonb) RETURNING message_id::text"


def fail(msg):
    print(f"e2e: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


class Writers:
    """Concurrent writers; each owns its keys, so its commit order is the key order."""

    def __init__(self, url, topic, n, keys_per_writer):
        self.url, self.topic, self.n, self.keys = url, topic, n, keys_per_writer
        self.stop = threading.Event()
        self.committed, self.rolled_back, self.order = set(), set(), {}
        self.lock = threading.Lock()
        self.errors = []

    def run(self, seconds):
        self.stop.clear()
        threads = [threading.Thread(target=self.writer, args=(w,)) for w in range(self.n)]
        for t in threads:
            t.start()
        time.sleep(seconds)
        self.stop.set()
        for t in threads:
            t.join()
        if self.errors:
            fail(f"writer error: {self.errors[0]}")

    def writer(self, w):
        rng = random.Random()
        seq = {}
        try:
            with psycopg.connect(self.url) as conn:
                while not self.stop.is_set():
                    rows = []
                    with conn.transaction() as tx:
                        for _ in range(rng.randint(1, 3)):
                            key = f"{self.topic}-w{w}-k{rng.randrange(self.keys)}"
                            # Continue after the phase before: per writer, per key.
                            s = seq[key] = seq.get(key, self.order_len(key)) + 1
                            payload = json.dumps({"key": key, "seq": s, "pad": "x" * 100})
                            mid = conn.execute(INSERT, (self.topic, key, payload)).fetchone()[0]
                            rows.append((key, s, mid))
                        if rng.random() < 0.10:
                            with self.lock:
                                self.rolled_back.update(r[2] for r in rows)
                            raise psycopg.Rollback(tx)
                    # Reached only on commit (Rollback exits the block quietly).
                    if rows and rows[0][2] not in self.rolled_back:
                        with self.lock:
                            for key, s, mid in rows:
                                self.committed.add(mid)
                                self.order.setdefault(key, []).append((s, mid))
        except Exception as e:  # reported by run()
            self.errors.append(repr(e))

    def order_len(self, key):
        with self.lock:
            lst = self.order.get(key, [])
            return lst[-1][0] if lst else 0


class Relay:
    def __init__(self, kurier, env):
        self.kurier, self.env, self.proc = kurier, env, None

    def start(self):
        self.proc = subprocess.Popen([self.kurier, "run"], env=self.env, stdout=subprocess.DEVNULL)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def term(self):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def outbox_count(url):
    with psycopg.connect(url) as c:
        return c.execute("SELECT count(*) FROM kurier.outbox").fetchone()[0]


def read_all(brokers, topic, want, timeout):
    c = Consumer({"bootstrap.servers": brokers, "group.id": f"e2e-{uuid.uuid4()}", "enable.auto.commit": False})
    md = c.list_topics(topic, timeout=10)
    parts = list(md.topics[topic].partitions)
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    recs, missing, done_at = [], set(want), None
    deadline = time.time() + timeout
    while time.time() < deadline:
        for m in c.consume(num_messages=1000, timeout=0.5):
            if m.error():
                fail(f"consumer error: {m.error()}")
            headers = dict((k, v) for k, v in (m.headers() or []))
            recs.append((m.partition(), m.offset(), m.key(), m.value(), headers))
            mid = headers.get("message-id")
            if mid is not None:
                missing.discard(mid.decode())
        if not missing and done_at is None:
            done_at = time.time()
        if done_at and time.time() - done_at > 2:
            break
    c.close()
    return recs, missing


def check(recs, missing, w):
    if missing:
        fail(f"{len(missing)} committed messages lost, e.g. {sorted(missing)[:3]}")
    no_id = [r for r in recs if "message-id" not in r[4]]
    if no_id:
        fail(f"{len(no_id)} records without message-id")
    seen, first, dups = set(), {}, 0
    for part, off, key, value, headers in sorted(recs, key=lambda r: (r[0], r[1])):
        mid = headers["message-id"].decode()
        if mid in w.rolled_back:
            fail(f"phantom: rolled-back message {mid} published")
        if mid not in w.committed:
            fail(f"phantom: unknown message {mid} published")
        if mid in seen:
            dups += 1
            continue
        seen.add(mid)
        first.setdefault(key.decode(), []).append(mid)
    violations = 0
    for key, entries in w.order.items():
        if first.get(key, []) != [mid for _, mid in entries]:
            violations += 1
    if violations:
        fail(f"{violations} keys published out of commit order")
    return dups


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kurier", required=True)
    ap.add_argument("--seconds", type=float, default=float(os.environ.get("E2E_SECONDS", "10")))
    args = ap.parse_args()
    base, brokers = os.environ.get("DATABASE_URL"), os.environ.get("KAFKA_BROKERS")
    if not base or not brokers:
        fail("set DATABASE_URL and KAFKA_BROKERS (make test does)")
    db = f"kurier_e2e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{db}"')
    url = base.rsplit("/", 1)[0] + "/" + db
    env = dict(os.environ, DATABASE_URL=url, KAFKA_BROKERS=brokers, RUST_LOG="warn")
    env.pop("KURIER_CONFIG", None)
    subprocess.run([args.kurier, "migrate"], env=env, check=True)
    topic = f"e2e-{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": brokers})
    admin.create_topics([NewTopic(topic, 4, 1)])[topic].result(timeout=30)

    w = Writers(url, topic, n=8, keys_per_writer=4)
    relay = Relay(args.kurier, env)
    relay.start()
    w.run(args.seconds)  # phase 1: steady relay
    phase1 = len(w.committed)
    relay.kill()

    kills, stop = [0], threading.Event()

    def killer():
        relay.start()
        while not stop.is_set():
            time.sleep(random.uniform(1.0, 2.0))
            relay.kill()
            kills[0] += 1
            relay.start()

    k = threading.Thread(target=killer)
    k.start()
    w.run(args.seconds)  # phase 2: relay SIGKILLed every 1-2 s
    stop.set()
    k.join()
    phase2 = len(w.committed)

    # Phase 3: three relays; one killed, one stalled beyond its lease, repeatedly.
    env3 = dict(env, KURIER_RELAY_LEASE_TTL_MS="1500")
    trio = [Relay(args.kurier, env3) for _ in range(3)]
    relay.kill()
    for r in trio:
        r.start()
    stalls, stop3 = [0], threading.Event()

    def chaos():
        while not stop3.is_set():
            time.sleep(random.uniform(0.5, 1.0))
            trio[0].kill()
            kills[0] += 1
            trio[0].start()
            trio[1].proc.send_signal(signal.SIGSTOP)
            time.sleep(random.uniform(2.0, 3.0))
            trio[1].proc.send_signal(signal.SIGCONT)
            stalls[0] += 1

    c3 = threading.Thread(target=chaos)
    c3.start()
    w.run(args.seconds)
    stop3.set()
    c3.join()
    for r in trio[1:]:
        if r.term() != 0:
            fail("a relay did not exit 0 on SIGTERM")
    relay = trio[0]
    deadline = time.time() + 120
    while outbox_count(url) and time.time() < deadline:
        time.sleep(0.2)
    if outbox_count(url):
        fail("outbox did not drain")
    rc = relay.term()
    if rc != 0:
        fail(f"SIGTERM exit code {rc}")
    recs, missing = read_all(brokers, topic, w.committed, timeout=180)
    dups = check(recs, missing, w)
    summary = {"committed": len(w.committed), "phase1_committed": phase1, "phase2_committed": phase2 - phase1,
               "phase3_committed": len(w.committed) - phase2, "stalls": stalls[0], "rolled_back": len(w.rolled_back),
               "records": len(recs), "duplicates": dups, "sigkills": kills[0], "lost": 0, "phantom": 0, "order_violations": 0}
    print("e2e: PASS " + json.dumps(summary))
    with psycopg.connect(base, autocommit=True) as c:
        c.execute(f'DROP DATABASE "{db}" WITH (FORCE)')


if __name__ == "__main__":
    main()
