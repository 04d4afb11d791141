#!/usr/bin/env bash
# `make bench`: start Kafka and Alertmanager unless running, run the benchmarks, then stop
# exactly what this script started. Benchmarks print numbers; they assert nothing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

started=()
cleanup() {
    for svc in "${started[@]}"; do
        "scripts/$svc.sh" stop || true
    done
}
trap cleanup EXIT

# The test fixtures' lock (tests/fixtures/infra.py) around status+start, so concurrent
# runs never both start one instance; 7>&- keeps the daemons from holding it.
lock_dir="${SRE_STATE_DIR:-.state}/.fixtures"
mkdir -p "$lock_dir"
for svc in kafka alertmanager; do
    exec 7>"$lock_dir/$svc.lock"
    flock 7
    rc=0
    "scripts/$svc.sh" status >/dev/null 2>&1 7>&- || rc=$?
    if ((rc == 4)); then
        # LSB "unknown": another scripts/$svc.sh call kept its lock past the wait
        echo "bench: $svc status unknown: another scripts/$svc.sh call holds its lock; retry once it has finished" >&2
        exit 1
    elif ((rc != 0)); then
        "scripts/$svc.sh" start 7>&-
        started+=("$svc")
    fi
    exec 7>&-
done

eval "$(scripts/kafka.sh env)"
.venv/bin/python bench/correlate.py --bootstrap "$KAFKA_BOOTSTRAP" \
    --alertmanager "http://127.0.0.1:${SRE_ALERTMANAGER_PORT:-19094}" "$@"
# What the executor's cross-replica checks cost per action (budget claims, feed re-check).
.venv/bin/python bench/actions.py --bootstrap "$KAFKA_BOOTSTRAP"
