# Sourced by the scripts that install an optional tool from Debian's packages
# (install-chromium.sh, install-haproxy.sh, install-wrk.sh). They never fail the build: a
# machine where apt cannot install the packages (no root and no sudo, no network, not
# Debian) gets one line saying why, exit 0, and what needed the tool then says so itself.
#
# The sourcing script sets SCRIPT (its name, for the message) and CONSEQUENCE (what
# happens without the tool), then calls `apt_optional PACKAGE...`; `say` ends it with a
# reason.
say() { echo "$SCRIPT: $*; $CONSEQUENCE" >&2; exit 0; }

apt_optional() {
    command -v apt-get > /dev/null 2>&1 || say "no apt-get here (not Debian), $* not installed"
    SUDO=""  # global: a script may need it after (install-haproxy stops a service)
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo > /dev/null 2>&1 || say "not root and no sudo, cannot run apt-get"
        sudo -n true > /dev/null 2>&1 || say "not root and sudo asks for a password, cannot run apt-get"
        SUDO="sudo -n"
    fi
    export DEBIAN_FRONTEND=noninteractive
    # apt waits for another apt (an install already under way) rather than failing at once.
    local wait="-o DPkg::Lock::Timeout=600"
    local log
    log=$(mktemp)
    if ! $SUDO apt-get $wait update -qq > "$log" 2>&1; then
        local why; why=$(tail -n 1 "$log"); rm -f "$log"
        say "apt-get update failed ($why)"
    fi
    if ! $SUDO apt-get $wait install -y -qq --no-install-recommends "$@" > "$log" 2>&1; then
        local why; why=$(tail -n 1 "$log"); rm -f "$log"
        say "apt-get install $* failed ($why)"
    fi
    rm -f "$log"
}
