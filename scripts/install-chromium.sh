#!/usr/bin/env bash
# Install Debian's Chromium and its WebDriver (the `chromium` and `chromium-driver`
# packages) if /usr/bin/chromium or /usr/bin/chromedriver is missing: the console's
# real-browser tests (tests/browser.py) drive them headless through selenium, offline.
# Nothing is configured here.
#
# Unlike scripts/install-postgres.sh this never fails the build: a machine where apt
# cannot install them (no root and no sudo, no network, not Debian) gets one line saying
# why, exit 0, and the browser tests then skip with that reason.
set -uo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
say() { echo "install-chromium: $*; the browser tests will skip" >&2; exit 0; }
command -v apt-get > /dev/null 2>&1 || say "no apt-get here (not Debian), Chromium not installed"
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
if ! $SUDO apt-get $APT_WAIT install -y -qq --no-install-recommends \
        chromium chromium-driver > "$log" 2>&1; then
    say "apt-get install chromium chromium-driver failed ($(tail -n 1 "$log"))"
fi
[ -x /usr/bin/chromium ] || say "apt installed chromium but /usr/bin/chromium is missing"
[ -x /usr/bin/chromedriver ] || say "apt installed chromium-driver but /usr/bin/chromedriver is missing"
