#!/usr/bin/env bash
# Prints a DATABASE_URL for local use, creating database $1 if needed.
# Uses the PostgreSQL on 127.0.0.1:5432 if it answers; otherwise starts a private
# cluster under .state/pg (port ${KURIER_PG_PORT:-54329}) with the installed binaries.
set -euo pipefail
db=${1:-kurier}
root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${KURIER_PRIVATE_PG:-}" ] && pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  host_port=127.0.0.1:5432; user=${PGUSER:-postgres}
else
  port=${KURIER_PG_PORT:-54329}
  bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -n "$bindir" ] || { echo "database: no PostgreSQL on 127.0.0.1:5432 and no server binaries under /usr/lib/postgresql; install postgresql" >&2; exit 1; }
  data="$root/.state/pg"
  # PostgreSQL refuses to run as root; run it as the postgres system user then.
  as=(); [ "$(id -u)" = 0 ] && as=(runuser -u postgres --)
  if [ ! -f "$data/PG_VERSION" ]; then
    mkdir -p "$data"
    [ "$(id -u)" = 0 ] && chown postgres "$data" "$root/.state"
    "${as[@]}" "$bindir/initdb" -D "$data" -U postgres --auth=trust >/dev/null
  fi
  # TLS as Debian's packaged server has it (tests/security.rs verifies the certificate).
  ssl=""
  cert=/etc/ssl/certs/ssl-cert-snakeoil.pem; key=/etc/ssl/private/ssl-cert-snakeoil.key
  if [ -r "$cert" ] && "${as[@]}" test -r "$key"; then
    ssl="-c ssl=on -c ssl_cert_file=$cert -c ssl_key_file=$key"
  fi
  if ! pg_isready -q -h 127.0.0.1 -p "$port"; then
    "${as[@]}" "$bindir/pg_ctl" -D "$data" -l "$data/server.log" -o "-p $port -k /tmp -c listen_addresses=127.0.0.1 $ssl" -w start >/dev/null
    echo "database: started a private PostgreSQL on 127.0.0.1:$port (data $data)" >&2
  fi
  host_port=127.0.0.1:$port; user=postgres
fi
if ! psql -qAt "postgres://$user@$host_port/postgres" -c "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
  psql -q "postgres://$user@$host_port/postgres" -c "CREATE DATABASE \"$db\"" >&2
fi
echo "postgres://$user@$host_port/$db"
