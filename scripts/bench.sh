#!/usr/bin/env bash
# `make bench`: starts PostgreSQL (or uses 127.0.0.1:5432) and a fresh Tansu,
# then `cargo bench` builds (in release mode, the daemon binary included, so
# nothing is compiled twice) and runs benches/kurier.rs, which prints a table
# and a BENCH_JSON line. BENCH_N sets the drained message count (default 200000);
# BENCH_ONLY=drain,latency (etc., see benches/kurier.rs) runs some parts.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh
# A sidecar talks to a database on the same host or network without TLS; the
# TLS handshake (OpenSSL, ~45 ms per connection here) and encryption would
# otherwise be part of every figure. Set DATABASE_URL to measure with TLS.
export DATABASE_URL=${DATABASE_URL:-$(scripts/database.sh postgres)?sslmode=disable}
port=${KAFKA_BENCH_PORT:-19093}
if [ -z "${KAFKA_BROKERS:-}" ]; then
  scripts/broker.sh stop .state/bench-broker
  scripts/broker.sh start "$port" .state/bench-broker
  export BENCH_BROKER_PID=$(cat .state/bench-broker/tansu.pid)
  export KAFKA_BROKERS=127.0.0.1:$port
  trap 'scripts/broker.sh stop .state/bench-broker' EXIT
fi
psql -qAt "$DATABASE_URL" -c "SELECT datname FROM pg_database WHERE datname LIKE 'kurier\_bench\_%'" |
  while read -r db; do psql -q "$DATABASE_URL" -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)"; done
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
# The saga part runs the participants of examples/order-saga.rs.
cargo build --release -p kurier-daemon --example order-saga
cargo bench -p kurier-daemon --bench kurier
