#!/usr/bin/env bash
# `make run`: PostgreSQL, the Tansu broker, migrations, a demo producer and
# consumer, the order saga demo (three participant services and a stream of
# orders, some declined at payment and compensated), and the daemon in the
# foreground. Ctrl-C stops it all. `kurier sagas list` (with the same
# DATABASE_URL) shows the sagas.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export DATABASE_URL=${DATABASE_URL:-$(scripts/database.sh kurier_dev)}
port=${KAFKA_PORT:-9092}
export KAFKA_BROKERS=${KAFKA_BROKERS:-127.0.0.1:$port}
own_broker=""
if [ "$KAFKA_BROKERS" = "127.0.0.1:$port" ]; then
  scripts/broker.sh start "$port" .state/broker
  own_broker=1
fi
export KURIER_HTTP_ADDR=${KURIER_HTTP_ADDR:-127.0.0.1:9187}
bin=target/release
"$bin/kurier" migrate
pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  [ -z "$own_broker" ] || scripts/broker.sh stop .state/broker
}
trap cleanup EXIT
"$bin/examples/tail" kurier-demo &
pids+=($!)
"$bin/order-service" 2 kurier-demo &
pids+=($!)
"$bin/examples/order-saga" define
for role in stock payment shipping; do
  "$bin/examples/order-saga" participant "$role" >/dev/null &
  pids+=($!)
done
"$bin/examples/order-saga" start --count 100000 --rate 0.5 --decline-over 5000 &
pids+=($!)
echo "run: daemon starting; metrics at http://$KURIER_HTTP_ADDR/metrics; Ctrl-C to stop" >&2
"$bin/kurier" run
