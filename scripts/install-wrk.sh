#!/usr/bin/env bash
# Install Debian's wrk (the `wrk` package) if it is missing: the load generator of
# bench/overhead.py and bench/scaling.py (`make bench`). Like the other install scripts
# this never fails: a machine where apt cannot install it gets one line saying why,
# exit 0, and the benchmarks that need it then say how to install it.
set -uo pipefail
if command -v wrk > /dev/null 2>&1; then
    exit 0
fi
SCRIPT=install-wrk CONSEQUENCE="the benchmarks that use wrk will say so"
here=${BASH_SOURCE[0]%/*}; [ "$here" = "${BASH_SOURCE[0]}" ] && here=.
. "$here/apt-optional.sh"
apt_optional wrk
command -v wrk > /dev/null 2>&1 || say "apt installed wrk but it is not on PATH"
