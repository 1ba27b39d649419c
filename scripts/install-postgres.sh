#!/usr/bin/env bash
# Install Debian's PostgreSQL server (initdb, pg_ctl) if it is missing: the test suite
# starts a throwaway cluster of its own (tests/postgres.py); nothing is configured here.
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends postgresql > /dev/null
# The package may start a cluster of its own; the tests never use it.
$SUDO service postgresql stop > /dev/null 2>&1 || true
