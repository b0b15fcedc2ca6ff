"""End-to-end check of the inbox writer with a third-party producer.

A confluent-kafka (librdkafka) producer sends thousands of messages with a
`message-id` header, one in five of them twice, while `kurier run` (inbox
writer only) is SIGKILLed and restarted every 3-6 seconds (time to rejoin the group). Then one last run
drains the topic. Check: exactly one kurier.inbox row per message ID for the
consumer, none missing, none extra.
"""
import argparse, json, os, random, signal, subprocess, sys, threading, time, uuid

import psycopg
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic


def fail(msg):
    print(f"e2e-inbox: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kurier", required=True)
    ap.add_argument("--messages", type=int, default=int(os.environ.get("E2E_INBOX_MESSAGES", "5000")))
    args = ap.parse_args()
    base, brokers = os.environ.get("DATABASE_URL"), os.environ.get("KAFKA_BROKERS")
    if not base or not brokers:
        fail("set DATABASE_URL and KAFKA_BROKERS (make test does)")
    db = f"kurier_e2e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{db}"')
    url = base.rsplit("/", 1)[0] + "/" + db
    topic, consumer = f"e2e-inbox-{uuid.uuid4().hex[:12]}", f"e2e-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, DATABASE_URL=url, KAFKA_BROKERS=brokers, RUST_LOG="error",
               KURIER_RELAY_ENABLED="false", KURIER_INBOX_TOPICS=topic, KURIER_INBOX_CONSUMER=consumer,
               KURIER_INBOX_PROPERTIES="session.timeout.ms=6000,max.poll.interval.ms=15000")
    env.pop("KURIER_CONFIG", None)
    subprocess.run([args.kurier, "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    admin = AdminClient({"bootstrap.servers": brokers})
    admin.create_topics([NewTopic(topic, 4, 1)])[topic].result(timeout=30)

    proc = [subprocess.Popen([args.kurier, "run"], env=env)]
    kills, stop = [0], threading.Event()

    def killer():
        while not stop.is_set():
            # Long enough for a restarted member to rejoin the group and consume.
            time.sleep(random.uniform(3.0, 6.0))
            proc[0].send_signal(signal.SIGKILL)
            proc[0].wait()
            kills[0] += 1
            proc[0] = subprocess.Popen([args.kurier, "run"], env=env)

    k = threading.Thread(target=killer)
    k.start()
    p = Producer({"bootstrap.servers": brokers, "linger.ms": 5})
    ids, sent = set(), 0
    for i in range(args.messages):
        mid = str(uuid.uuid4())
        copies = 2 if i % 5 == 0 else 1
        for _ in range(copies):
            p.produce(topic, key=f"k{i % 50}", value=json.dumps({"i": i}).encode(), headers=[("message-id", mid)])
            sent += 1
        ids.add(mid)
        if i % 200 == 0:
            p.flush()
            time.sleep(1.0)  # spread the sends over several kill cycles
    p.flush()
    time.sleep(4)  # keep killing while the writer catches up
    stop.set()
    k.join()
    with psycopg.connect(url) as c:
        during = c.execute("SELECT count(*) FROM kurier.inbox WHERE consumer = %s", (consumer,)).fetchone()[0]
    if during == 0:
        fail("nothing was stored while the writer was being killed; the check would prove nothing")

    deadline = time.time() + 180
    with psycopg.connect(url, autocommit=True) as c:
        while time.time() < deadline:
            n = c.execute("SELECT count(*) FROM kurier.inbox WHERE consumer = %s", (consumer,)).fetchone()[0]
            if n >= len(ids):
                break
            time.sleep(0.5)
        time.sleep(3)  # late duplicates would show up now
        rows = [r[0] for r in c.execute("SELECT message_id FROM kurier.inbox WHERE consumer = %s", (consumer,))]
        stats = c.execute("SELECT received, duplicates FROM kurier.inbox_stats WHERE consumer = %s", (consumer,)).fetchone()
    proc[0].send_signal(signal.SIGTERM)
    rc = proc[0].wait(timeout=60)
    if len(rows) != len(set(rows)):
        fail("a message ID is stored twice")
    missing, extra = ids - set(rows), set(rows) - ids
    if missing:
        fail(f"{len(missing)} message IDs missing from the inbox")
    if extra:
        fail(f"{len(extra)} unexpected rows")
    if kills[0] < 4:
        fail(f"only {kills[0]} SIGKILLs happened; the check needs several")
    if rc != 0:
        fail(f"SIGTERM exit code {rc}")
    summary = {"unique_ids": len(ids), "records_sent": sent, "inbox_rows": len(rows), "sigkills": kills[0], "stored_during_kills": during,
               "duplicates_dropped": stats[1] if stats else None, "missing": 0, "double_rows": 0}
    print("e2e-inbox: PASS " + json.dumps(summary))
    with psycopg.connect(base, autocommit=True) as c:
        c.execute(f'DROP DATABASE "{db}" WITH (FORCE)')


if __name__ == "__main__":
    main()
