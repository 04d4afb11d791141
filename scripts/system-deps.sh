#!/usr/bin/env bash
# Installs the Debian packages the local infrastructure scripts need, if
# missing: prometheus, prometheus-alertmanager, kcat, curl, openssl, python3-venv
# (when python3 cannot make a venv), and a Java 17 runtime / Maven only when no
# `java` / `mvn` is on PATH. Idempotent; runs
# `apt-get update` once, only when something has to be installed.
#
# Package maintainer scripts are prevented from starting the Debian services
# (a temporary /usr/sbin/policy-rc.d that denies every action, unless one
# already exists); our scripts run their own instances on their own ports.
#
# Usage: scripts/system-deps.sh        (as root, or with sudo available)
set -euo pipefail

SRE_SERVICE=system-deps
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

missing=()

need_pkg() {
    local pkg="$1" probe="$2"
    if [[ ! -x "$probe" ]] && ! command -v "$probe" >/dev/null 2>&1; then
        missing+=("$pkg")
    fi
}

need_pkg prometheus /usr/bin/prometheus
need_pkg prometheus-alertmanager /usr/bin/prometheus-alertmanager
need_pkg kcat kcat
need_pkg curl curl
need_pkg util-linux flock
# k8s.sh makes the control plane's CA and certificates with it (not in a minimal Debian)
need_pkg openssl openssl
# Debian's python3 has no ensurepip without it, and `make`'s `python3 -m venv` then fails
python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)

if ((${#missing[@]} == 0)); then
    log "all system dependencies present"
    exit 0
fi

SUDO=()
if ((EUID != 0)); then
    command -v sudo >/dev/null 2>&1 || die "need root (or sudo) to install: ${missing[*]}"
    SUDO=(sudo)
fi

POLICY=/usr/sbin/policy-rc.d
created_policy=0
cleanup() {
    if ((created_policy)); then
        "${SUDO[@]}" rm -f "$POLICY"
    fi
}
trap cleanup EXIT
if [[ ! -e "$POLICY" ]]; then
    printf '#!/bin/sh\n# temporary, from sre-agent scripts/system-deps.sh\nexit 101\n' |
        "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod 755 "$POLICY"
    created_policy=1
fi

log "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"

# Belt and braces: if a package's postinst started its daemon anyway, stop it
# (it would listen on the Debian default ports and scrape/alert for nothing).
# Only daemons started through the Debian init scripts (their pid files under
# /run/<name>/) are touched, never instances run by our scripts.
for svc in prometheus prometheus-alertmanager prometheus-node-exporter; do
    pidfile="/run/$svc/$svc.pid"
    if [[ -x "/etc/init.d/$svc" && -s "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        log "stopping $svc started by its package"
        "${SUDO[@]}" "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
    fi
done
log "done"
