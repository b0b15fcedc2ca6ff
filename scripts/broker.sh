#!/usr/bin/env bash
# Starts or stops a local Tansu broker (Kafka protocol, in-memory storage).
#   scripts/broker.sh start PORT STATE_DIR   -> waits until the port answers
#   scripts/broker.sh stop STATE_DIR
set -euo pipefail
cmd=$1
case "$cmd" in
start)
  port=$2; dir=$3
  mkdir -p "$dir"
  if [ -f "$dir/tansu.pid" ] && kill -0 "$(cat "$dir/tansu.pid")" 2>/dev/null; then
    echo "broker: already running (pid $(cat "$dir/tansu.pid")) on 127.0.0.1:$port" >&2
    exit 0
  fi
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "broker: port $port is taken by another process; set KAFKA_PORT to a free port" >&2
    exit 1
  fi
  bin=$("$(dirname "$0")/ensure-tansu.sh")
  nohup "$bin" broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine memory://tansu/ >"$dir/tansu.log" 2>&1 &
  echo $! >"$dir/tansu.pid"
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "broker: Tansu listening on 127.0.0.1:$port (log $dir/tansu.log)" >&2
      exit 0
    fi
    sleep 0.1
  done
  echo "broker: Tansu did not start; see $dir/tansu.log" >&2
  exit 1
  ;;
stop)
  dir=$2
  if [ -f "$dir/tansu.pid" ]; then
    kill "$(cat "$dir/tansu.pid")" 2>/dev/null || true
    rm -f "$dir/tansu.pid"
  fi
  ;;
*) echo "usage: $0 start PORT DIR | stop DIR" >&2; exit 2 ;;
esac
