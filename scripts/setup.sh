#!/usr/bin/env bash
# Installs what building and testing Kurier needs on a fresh Debian machine, once:
# cmake and C headers for rdkafka's bundled librdkafka, and the cached Tansu broker.
set -euo pipefail
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
for h in /usr/include/curl/curl.h:libcurl4-openssl-dev /usr/include/openssl/ssl.h:libssl-dev /usr/include/zlib.h:zlib1g-dev; do
  [ -e "${h%%:*}" ] || need+=("${h##*:}")
done
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >&2
fi
"$(dirname "$0")/ensure-tansu.sh" >/dev/null
