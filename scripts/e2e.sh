#!/usr/bin/env bash
# The third-party end-to-end check: SQL writes with psycopg, reads with
# confluent-kafka (librdkafka), the kurier binary relaying and being SIGKILLed.
# Also: bad rows among good ones (dead letters), and
# a second check: a confluent-kafka producer with duplicates, the inbox writer SIGKILLed.
# Needs DATABASE_URL and KAFKA_BROKERS (scripts/test.sh sets both).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="${KURIER_CACHE_DIR:-$HOME/.cache/kurier}/venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import psycopg, confluent_kafka" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/tests/e2e/requirements.txt"
fi
"$venv/bin/python" "$root/tests/e2e/third_party.py" --kurier "$root/target/release/kurier"
"$venv/bin/python" "$root/tests/e2e/poison_third_party.py" --kurier "$root/target/release/kurier"
"$venv/bin/python" "$root/tests/e2e/inbox_third_party.py" --kurier "$root/target/release/kurier"
