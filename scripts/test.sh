#!/usr/bin/env bash
# Install what the test suite needs on a fresh Debian/Ubuntu machine, then run all of it.
# System packages (redis-server, prometheus) are installed with apt when missing (needs root);
# Python packages go into ./.venv. Extra arguments are passed to pytest, after the default
# `-n 2` (two xdist workers, one per core of the CI machine; `-n 0` runs in one process).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v prometheus >/dev/null || need+=(prometheus)
command -v promtool >/dev/null || need+=(prometheus)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || need+=(nginx)  # the fleet tier's load balancer
command -v openssl >/dev/null || need+=(openssl)  # certificates for the TLS store test
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  echo "installing system packages: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Prometheus' Debian package starts a service on :9090; the tests run their own on free ports.
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl stop prometheus || true
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv || { echo "python3 -m venv failed: apt-get install -y python3-venv" >&2; exit 1; }
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test,fast,otel,s3]'

export GATEWAY_REQUIRE_REDIS=1 GATEWAY_REQUIRE_PROMETHEUS=1
exec .venv/bin/python -m pytest -n 2 "$@"
