#!/usr/bin/env bash
# Installs what building and testing Kurier needs on a fresh Debian machine, once:
# cmake and C headers for rdkafka's bundled librdkafka, and the cached Tansu broker.
set -euo pipefail
need=()
for pkg in cmake pkg-config libcurl4-openssl-dev libssl-dev openssl zlib1g-dev postgresql-client python3-venv; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >&2
fi
"$(dirname "$0")/ensure-tansu.sh" >/dev/null
