#!/usr/bin/env bash
# Installs Debian's Prometheus server for the monitoring integration test
# (cmd/vasengine TestPrometheusScrape) when it is missing. Idempotent. Only
# the binary is used: the test runs its own server on a loopback port with a
# temporary configuration and storage; the package's own service is not
# started by this script.
set -euo pipefail
if command -v prometheus >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "prometheus-setup: need root to apt-get install prometheus" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
# policy-rc.d keeps the package's service from starting during the install.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod +x /usr/sbin/policy-rc.d
trap 'rm -f /usr/sbin/policy-rc.d' EXIT
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v prometheus >/dev/null
