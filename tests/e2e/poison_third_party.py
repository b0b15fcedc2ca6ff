"""End-to-end check of bad rows with third-party clients only.

psycopg writes good rows for a few keys and, among them, a row with an illegal
topic name and a row with a 3 MB payload. A confluent-kafka reader checks that
all good rows arrive, in per-key order; SQL checks that the two bad rows are in
kurier.dead_letters with their reasons, the outbox drains and the daemon is
still running.
"""
import json, os, subprocess, sys, time, uuid

import psycopg
from confluent_kafka import Consumer, TopicPartition, OFFSET_BEGINNING
from confluent_kafka.admin import AdminClient, NewTopic


def fail(msg):
    print(f"e2e-poison: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    kurier = sys.argv[sys.argv.index("--kurier") + 1]
    base, brokers = os.environ.get("DATABASE_URL"), os.environ.get("KAFKA_BROKERS")
    if not base or not brokers:
        fail("set DATABASE_URL and KAFKA_BROKERS (make test does)")
    db = f"kurier_e2e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{db}"')
    url = base.rsplit("/", 1)[0] + "/" + db
    env = dict(os.environ, DATABASE_URL=url, KAFKA_BROKERS=brokers, RUST_LOG="error")
    env.pop("KURIER_CONFIG", None)
    subprocess.run([kurier, "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    topic = f"e2e-poison-{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": brokers})
    admin.create_topics([NewTopic(topic, 3, 1)])[topic].result(timeout=30)

    good, order = set(), {}
    with psycopg.connect(url) as c:
        for i in range(300):
            key = f"k{i % 5}"
            if i == 100:
                c.execute("INSERT INTO kurier.outbox (topic, key, payload) VALUES ('illegal topic/name', %s, '{}')", (key,))
            elif i == 200:
                big = json.dumps({"blob": "x" * (3 * 1024 * 1024)})
                c.execute("INSERT INTO kurier.outbox (topic, key, payload) VALUES (%s, %s, %s::jsonb)", (topic, key, big))
            else:
                mid = c.execute("INSERT INTO kurier.outbox (topic, key, payload) VALUES (%s, %s, %s::jsonb) RETURNING message_id::text",
                                (topic, key, json.dumps({"seq": i}))).fetchone()[0]
                good.add(mid)
                order.setdefault(key, []).append(mid)
            c.commit()

    relay = subprocess.Popen([kurier, "run"], env=env)
    deadline = time.time() + 60
    with psycopg.connect(url, autocommit=True) as c:
        while c.execute("SELECT count(*) FROM kurier.outbox").fetchone()[0] and time.time() < deadline:
            time.sleep(0.2)
        left = c.execute("SELECT count(*) FROM kurier.outbox").fetchone()[0]
        dead = c.execute("SELECT topic, octet_length(payload::text), error FROM kurier.dead_letters ORDER BY id").fetchall()
    if left:
        fail(f"outbox did not drain: {left} rows left")
    if relay.poll() is not None:
        fail(f"the daemon exited ({relay.returncode})")

    cons = Consumer({"bootstrap.servers": brokers, "group.id": f"e2e-{uuid.uuid4()}", "enable.auto.commit": False})
    cons.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(3)])
    recs, seen, end = [], set(), time.time() + 60
    while seen != good and time.time() < end:
        for m in cons.consume(num_messages=500, timeout=0.5):
            if m.error():
                fail(str(m.error()))
            mid = dict(m.headers() or [])[("message-id")].decode()
            recs.append((m.partition(), m.offset(), m.key().decode(), mid))
            seen.add(mid)
    cons.close()
    relay.send_signal(15)
    rc = relay.wait(timeout=60)
    if seen != good:
        fail(f"{len(good - seen)} good rows missing, {len(seen - good)} unexpected records")
    first = {}
    for _, _, key, mid in sorted(recs):
        if mid not in first.setdefault(key, []):
            first[key].append(mid)
    if first != order:
        fail("good rows out of per-key order")
    if len(dead) != 2:
        fail(f"expected 2 dead letters, got {dead}")
    (t1, _, e1), (t2, size2, e2) = dead
    if t1 != "illegal topic/name" or "illegal topic name" not in e1:
        fail(f"illegal-topic row: {dead[0]}")
    if size2 < 3_000_000 or "too large" not in e2.lower() and "MessageSizeTooLarge" not in e2:
        fail(f"3 MB row: {(t2, size2, e2)}")
    if rc != 0:
        fail(f"SIGTERM exit code {rc}")
    print("e2e-poison: PASS " + json.dumps({"good_rows": len(good), "records": len(recs), "dead_letters": [e1[:60], e2[:60]]}))
    with psycopg.connect(base, autocommit=True) as c:
        c.execute(f'DROP DATABASE "{db}" WITH (FORCE)')


if __name__ == "__main__":
    main()
