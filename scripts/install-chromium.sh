#!/usr/bin/env bash
# Install Debian's Chromium and its WebDriver (the `chromium` and `chromium-driver`
# packages) if /usr/bin/chromium or /usr/bin/chromedriver is missing: the console's
# real-browser tests (tests/browser.py) drive them headless through selenium, offline.
# Nothing is configured here.
#
# Unlike scripts/install-postgres.sh this never fails the build (scripts/apt-optional.sh):
# the browser tests then skip with the reason.
set -uo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
SCRIPT=install-chromium CONSEQUENCE="the browser tests will skip"
here=${BASH_SOURCE[0]%/*}; [ "$here" = "${BASH_SOURCE[0]}" ] && here=.
. "$here/apt-optional.sh"
apt_optional chromium chromium-driver
[ -x /usr/bin/chromium ] || say "apt installed chromium but /usr/bin/chromium is missing"
[ -x /usr/bin/chromedriver ] || say "apt installed chromium-driver but /usr/bin/chromedriver is missing"
