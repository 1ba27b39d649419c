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
SCRIPT=install-haproxy CONSEQUENCE="the scaling test will skip"
here=${BASH_SOURCE[0]%/*}; [ "$here" = "${BASH_SOURCE[0]}" ] && here=.
. "$here/apt-optional.sh"
apt_optional haproxy
[ -x "$HAPROXY" ] || say "apt installed haproxy but $HAPROXY is missing"
# The package may start a service of its own (on port 80 with its default config);
# the tests start their own haproxy processes, never this one.
$SUDO service haproxy stop > /dev/null 2>&1 || true
