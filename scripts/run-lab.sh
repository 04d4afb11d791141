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
for svc in "${services[@]}"; do
    if "scripts/$svc.sh" status >/dev/null 2>&1; then
        echo "run: $svc already running; leaving it running afterwards"
    elif [[ $svc == k8s ]]; then
        started+=("$svc")  # before `up`: a half-started control plane is stopped too
        scripts/k8s.sh up
    else
        "scripts/$svc.sh" start
        started+=("$svc")
    fi
done
if [[ " ${services[*]} " == *" k8s "* ]]; then
    eval "$(scripts/k8s.sh env)"
fi

.venv/bin/sre-agent lab --config config/lab.yaml "$@"
