#!/usr/bin/env bash
# Install the benchmark's peers, load tools and Python extras (idempotent; run as root).
# Only the benchmark needs these: they are not runtime or test dependencies of goma-pt.
set -euo pipefail

PACKAGES=(socat haproxy nginx libnginx-mod-stream iperf3 redis-server redis-tools
          nsd dnsperf dnsutils pypy3 pypy3-venv)

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

# goma-pt on PyPy (the goma-pt-pypy peer): a PyPy venv holding goma-pt's runtime dependencies
# only (pyproject.toml's [project] dependencies); the bench runs the checkout's own code on it
# through PYTHONPATH, as for goma-pt. One venv outside the repository serves every checkout
# and worktree (it has no goma-pt code in it), and pytest, ruff and mypy never walk into it.
# `bench/run.py --pypy PATH` points at another one; GOMA_PT_PYPY moves this one.
PYPY_VENV=${GOMA_PT_PYPY:-/opt/goma-pt-pypy}
if [[ ! -x "$PYPY_VENV/bin/python" ]]; then
    pypy3 -m venv "$PYPY_VENV"
fi
mapfile -t RUNTIME_DEPS < <(python3 -c '
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
' "$(dirname "$0")/../pyproject.toml")
"$PYPY_VENV/bin/python" -m pip install --quiet --root-user-action=ignore "${RUNTIME_DEPS[@]}"
