#!/usr/bin/env bash
# Where a single-event append's time goes: pgbench, 8 clients each on its own
# stream, one event (~200 bytes of JSON) per transaction, for each piece of
# variants.sql, kurier.append_event and the two plain baselines of `make
# bench`, alternating, ROUNDS rounds of SECS seconds; prints each one's median
# tps and its ratio to the plain insert. Needs target/release/kurier (cargo
# build --release), psql, python3 and pgbench (Debian ships it with the
# server, under /usr/lib/postgresql/*/bin). Takes the 2 cores: run nothing
# else beside it. Usage: benches/append-costs/run.sh [ROUNDS=7] [SECS=4]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); root=$(cd "$here/../.." && pwd)
rounds=${1:-7}; secs=${2:-4}
pgbench=$(command -v pgbench || ls /usr/lib/postgresql/*/bin/pgbench 2>/dev/null | sort -V | tail -1) || true
[ -n "$pgbench" ] && [ -x "$pgbench" ] ||
  { echo "append-costs: no pgbench on PATH or under /usr/lib/postgresql/*/bin; install the PostgreSQL server package" >&2; exit 1; }
[ -x "$root/target/release/kurier" ] || { echo "append-costs: build first: cargo build --release" >&2; exit 1; }
url=$("$root/scripts/database.sh" postgres)
db=kurier_append_costs
psql -q "$url" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
url=${url%/*}/$db
scripts=$(mktemp -d)
trap 'rm -rf "$scripts"; psql -q "${url%/*}/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"' EXIT
DATABASE_URL="$url?sslmode=disable" "$root/target/release/kurier" migrate >/dev/null
psql -q -v ON_ERROR_STOP=1 "$url" -f "$here/variants.sql"
payload='{"type": "OrderPlaced", "order": 12345, "customer": "customer-345", "total_cents": 2345, "note": "'$(printf 'x%.0s' $(seq 100))'"}'
ins="INSERT INTO plain_events (global_position, stream, version, type, data, event_id) VALUES (nextval('plain_position'), 'plain-' || :client_id, nextval('piece_version'), 'Placed', '$payload'::jsonb, gen_random_uuid())"
echo "$ins;" > "$scripts/plain"
echo "WITH e AS ($ins RETURNING stream, version, data, event_id) INSERT INTO kurier.outbox (message_id, topic, key, payload, headers) SELECT event_id, 'bench', stream, data, jsonb_build_object('event-type', 'Placed', 'stream-version', version::text) FROM e;" > "$scripts/plain_outbox"
pieces="two_inserts on_conflict settings gap_safe stream_update stream_lock advisory_max unique_index"
for p in $pieces; do
  echo "SELECT $p('$p-' || :client_id, '$payload'::jsonb, gen_random_uuid());" > "$scripts/$p"
done
echo "SELECT kurier.append_event('append-' || :client_id, 'Placed', '$payload'::jsonb);" > "$scripts/append_event"
# The function behind append_event, called directly (without the SQL wrapper).
echo "SELECT kurier.append_one('one-' || :client_id, 'Placed', '$payload'::jsonb, NULL, NULL, NULL, gen_random_uuid());" > "$scripts/append_one"
all="plain plain_outbox $pieces append_one append_event"
for r in $(seq "$rounds"); do
  for s in $all; do
    out=$("$pgbench" -n -M prepared -c 8 -j 2 -T "$secs" -f "$scripts/$s" "$url" 2>&1) ||
      { echo "append-costs: pgbench failed on $s:" >&2; echo "$out" >&2; exit 1; }
    echo "$s $(echo "$out" | awk '/^tps/ {print $3; exit}')" >> "$scripts/results"
  done
done
echo "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), $rounds rounds of ${secs}s, median tps and ÷ plain"
python3 - "$scripts/results" $all <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
med = {k: statistics.median(float(v) for n, v in rows if n == k) for k in sys.argv[2:]}
for k in sys.argv[2:]:
    print(f"{k:14} {med[k]:8.0f}  {med[k] / med['plain']:.2f}")
PY
