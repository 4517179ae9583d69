#!/usr/bin/env bash
# Install the benchmark's peers, load tools and Python extras (idempotent; run as root).
# Only the benchmark needs these: they are not runtime or test dependencies of goma-pt.
set -euo pipefail

PACKAGES=(socat haproxy nginx libnginx-mod-stream iperf3 redis-server redis-tools
          nsd dnsperf dnsutils)

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if ((${#missing[@]})); then
    apt-get update
    # the packaged services are not wanted running: the benchmark starts its own instances
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
for svc in nginx haproxy redis-server nsd; do
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
        systemctl stop "$svc" || true
    fi
done

# the `bench` extra of pyproject.toml, installed on its own (not the project itself)
python -m pip install --quiet 'matplotlib>=3.8' 'py-spy>=0.3.14'
