#!/usr/bin/env bash
# NATS server for the event stream's tests (events/natsink) and for trying
# `vasengine run -nats`: Debian's nats-server (2.9, with JetStream).
#
#   scripts/nats.sh install          apt-get install nats-server when missing (idempotent)
#   scripts/nats.sh run PORT DIR     install, then run it in the foreground on
#                                    127.0.0.1:PORT with JetStream stored in DIR
#
# The package's own service is not started. The tests run `run` as a child
# process, so that they can kill and restart the server.
set -euo pipefail
install() {
  if command -v nats-server >/dev/null 2>&1; then
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "nats.sh: need root to apt-get install nats-server" >&2
    return 1
  fi
  # One install at a time (test packages run in parallel); the lock's file
  # descriptor is the subshell's only.
  (
    flock 9
    command -v nats-server >/dev/null 2>&1 && exit 0
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    # policy-rc.d keeps the package's service from starting during the install.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    apt-get install -y -qq --no-install-recommends nats-server >/dev/null
  ) 9>"${TMPDIR:-/tmp}/vasengine-nats-install.lock"
  command -v nats-server >/dev/null
}
case "${1:-}" in
install)
  install
  ;;
run)
  [ $# -eq 3 ] || { echo "usage: nats.sh run PORT DIR" >&2; exit 2; }
  install
  mkdir -p "$3"
  exec nats-server -a 127.0.0.1 -p "$2" -js -sd "$3"
  ;;
*)
  echo "usage: nats.sh install | run PORT DIR" >&2
  exit 2
  ;;
esac
