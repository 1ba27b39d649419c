#!/usr/bin/env bash
# Install Debian's wrk (the `wrk` package) if it is missing: the load generator of
# bench/overhead.py and bench/scaling.py (`make bench`). Like the other install scripts
# this never fails: a machine where apt cannot install it gets one line saying why,
# exit 0, and the benchmarks that need it then say how to install it.
set -uo pipefail
if command -v wrk > /dev/null 2>&1; then
    exit 0
fi
say() { echo "install-wrk: $*; the benchmarks that use wrk will say so" >&2; exit 0; }
command -v apt-get > /dev/null 2>&1 || say "no apt-get here (not Debian), wrk not installed"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo > /dev/null 2>&1 || say "not root and no sudo, cannot run apt-get"
    sudo -n true > /dev/null 2>&1 || say "not root and sudo asks for a password, cannot run apt-get"
    SUDO="sudo -n"
fi
export DEBIAN_FRONTEND=noninteractive
APT_WAIT="-o DPkg::Lock::Timeout=600"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! $SUDO apt-get $APT_WAIT update -qq > "$log" 2>&1; then
    say "apt-get update failed ($(tail -n 1 "$log"))"
fi
if ! $SUDO apt-get $APT_WAIT install -y -qq --no-install-recommends wrk > "$log" 2>&1; then
    say "apt-get install wrk failed ($(tail -n 1 "$log"))"
fi
command -v wrk > /dev/null 2>&1 || say "apt installed wrk but it is not on PATH"
