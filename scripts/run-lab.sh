#!/usr/bin/env bash
# `make run` and `make chaos`: start what the lab needs (Kafka, Prometheus) unless already
# running, run the lab (arguments go to `sre-agent lab`), then stop exactly what this script
# started.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

started=()
cleanup() {
    for svc in "${started[@]}"; do
        "scripts/$svc.sh" stop || true
    done
}
trap cleanup EXIT

for svc in kafka prometheus; do
    if "scripts/$svc.sh" status >/dev/null 2>&1; then
        echo "run: $svc already running; leaving it running afterwards"
    else
        "scripts/$svc.sh" start
        started+=("$svc")
    fi
done

.venv/bin/sre-agent lab --config config/lab.yaml "$@"
