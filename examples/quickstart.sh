#!/usr/bin/env bash
# Runs natsched against a local NATS on a fresh Debian/Ubuntu machine: installs nats-server (and a
# C compiler) from the OS packages if missing, starts it on 127.0.0.1:4222 if nothing listens
# there, then builds and runs natsched in the foreground with config/local.toml (store under
# ./data). Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
missing=()
command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
command -v cc >/dev/null || missing+=(gcc libc6-dev) # the allocator, mimalloc, is built from C
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
NATS_SERVER=$(command -v nats-server || echo /usr/sbin/nats-server)

if ! (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
  mkdir -p data
  echo "starting $NATS_SERVER on 127.0.0.1:4222 (log: data/nats-server.log)"
  "$NATS_SERVER" -a 127.0.0.1 -p 4222 >data/nats-server.log 2>&1 &
  trap 'kill $! 2>/dev/null || true' EXIT
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null && break; sleep 0.1; done
fi

cargo run --release -- run --config config/local.toml
