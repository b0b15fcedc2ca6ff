#!/usr/bin/env bash
# `make test`: sets up the tools, starts a fresh test broker, points the tests
# at PostgreSQL and the broker, runs the Rust suite and the third-party e2e check.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh
export TANSU_BIN=$(scripts/ensure-tansu.sh)
export DATABASE_URL=${DATABASE_URL:-$(scripts/database.sh postgres)}
port=${KAFKA_TEST_PORT:-19092}
if [ -z "${KAFKA_BROKERS:-}" ]; then
  # A fresh broker per run: its storage is in memory, so it never grows across runs.
  scripts/broker.sh stop .state/test-broker
  scripts/broker.sh start "$port" .state/test-broker
  export KAFKA_BROKERS=127.0.0.1:$port
  trap 'scripts/broker.sh stop .state/test-broker' EXIT
fi
# Databases left by earlier runs (each test creates its own).
psql -qAt "$DATABASE_URL" -c "SELECT datname FROM pg_database WHERE datname LIKE 'kurier\_test\_%'" |
  while read -r db; do psql -q "$DATABASE_URL" -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)"; done
cargo build --release --workspace --bins --examples
cargo test --release --workspace --no-fail-fast
scripts/e2e.sh
