#!/usr/bin/env bash
# Install Debian's HAProxy (the `haproxy` package) if /usr/sbin/haproxy is missing: the
# scaling test (tests/test_scaling.py) and bench/scaling.py put it in front of several
# gateway processes, with a configuration they write themselves. Nothing is configured
# here, and the package's own service is stopped (the tests never use it).
#
# Like scripts/install-chromium.sh this never fails the build: a machine where apt
# cannot install it (no root and no sudo, no network, not Debian) gets one line saying
# why, exit 0, and the scaling test then skips with that reason.
set -uo pipefail
HAPROXY=/usr/sbin/haproxy
if [ -x "$HAPROXY" ]; then
    exit 0
fi
say() { echo "install-haproxy: $*; the scaling test will skip" >&2; exit 0; }
command -v apt-get > /dev/null 2>&1 || say "no apt-get here (not Debian), HAProxy not installed"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo > /dev/null 2>&1 || say "not root and no sudo, cannot run apt-get"
    sudo -n true > /dev/null 2>&1 || say "not root and sudo asks for a password, cannot run apt-get"
    SUDO="sudo -n"
fi
export DEBIAN_FRONTEND=noninteractive
# apt waits for another apt (an install already under way) rather than failing at once.
APT_WAIT="-o DPkg::Lock::Timeout=600"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! $SUDO apt-get $APT_WAIT update -qq > "$log" 2>&1; then
    say "apt-get update failed ($(tail -n 1 "$log"))"
fi
if ! $SUDO apt-get $APT_WAIT install -y -qq --no-install-recommends haproxy > "$log" 2>&1; then
    say "apt-get install haproxy failed ($(tail -n 1 "$log"))"
fi
[ -x "$HAPROXY" ] || say "apt installed haproxy but $HAPROXY is missing"
# The package may start a service of its own (on port 80 with its default config);
# the tests start their own haproxy processes, never this one.
$SUDO service haproxy stop > /dev/null 2>&1 || true
