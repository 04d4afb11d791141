#!/usr/bin/env bash
# `make run` and `make chaos`: start what the lab needs (Kafka, Prometheus, and with
# SRE_LAB_CLUSTER=kubernetes the local control plane) unless already running, run the lab
# (arguments go to `sre-agent lab`), then stop exactly what this script started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

started=()
cleanup() {
    for svc in "${started[@]}"; do
        if [[ $svc == k8s ]]; then
            scripts/k8s.sh down || true
        else
            "scripts/$svc.sh" stop || true
        fi
    done
}
trap cleanup EXIT

services=(kafka prometheus)
# On the real control plane (SRE_LAB_CLUSTER=kubernetes, `make chaos`): scripts/k8s.sh's
# kube-apiserver, controller-manager, scheduler and kwok (built once, then cached).
if [[ ${SRE_LAB_CLUSTER:-in-process} == kubernetes ]]; then
    services+=(k8s)
fi
# The lock of the test fixtures (tests/fixtures/infra.py), so that concurrent runs and
# test sessions on one state dir never both decide to start an instance. 7>&- keeps
# the daemons from inheriting, and so holding, the lock.
lock_dir="${SRE_STATE_DIR:-.state}/.fixtures"
mkdir -p "$lock_dir"
for svc in "${services[@]}"; do
    exec 7>"$lock_dir/$svc.lock"
    flock 7
    rc=0
    "scripts/$svc.sh" status >/dev/null 2>&1 7>&- || rc=$?
    if ((rc == 0)); then
        echo "run: $svc already running; leaving it running afterwards"
    elif ((rc == 4)); then
        # LSB "unknown": another scripts/$svc.sh call kept its lock past the wait; a
        # start now would wait as long again, not knowing what it waits for
        echo "run: $svc status unknown: another scripts/$svc.sh call holds its lock; retry once it has finished" >&2
        exit 1
    elif [[ $svc == k8s && $rc != 3 ]]; then
        # running but unhealthy: someone else's; `up` repairs it, and it stays theirs
        echo "run: k8s running but not healthy; repairing it with up, leaving it running afterwards"
        scripts/k8s.sh up 7>&-
    elif [[ $svc == k8s ]]; then
        started+=("$svc")  # before `up`: a half-started control plane is stopped too
        scripts/k8s.sh up 7>&-
    else
        "scripts/$svc.sh" start 7>&-
        started+=("$svc")
    fi
    exec 7>&-
done
if [[ " ${services[*]} " == *" k8s "* ]]; then
    eval "$(scripts/k8s.sh env)"
fi

.venv/bin/sre-agent lab --config config/lab.yaml "$@"
