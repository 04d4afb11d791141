#!/usr/bin/env bash
# `make clean`: stop every instance whose state lives under the state root (the
# developer's, the tests' under test/, any SRE_STATE_DIR below it, and their k8s
# control planes), each by the pid files in its own state dir, then delete the root.
# Deleting first would orphan them: their pid files gone, their ports still taken.
#
# Env: SRE_STATE_DIR (state root, default <repo>/.state).
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(realpath -m -- "${SRE_STATE_DIR:-$SCRIPT_DIR/../.state}")

if [[ ! -d $ROOT ]]; then
    echo "[clean] nothing to clean ($ROOT absent)" >&2
    exit 0
fi

# A state dir is any dir holding a service dir; depth 3 reaches <root>/test/<svc>
# (and one level more) without walking Kafka or etcd data.
mapfile -t state_dirs < <(
    find "$ROOT" -maxdepth 3 -type d \
        \( -name kafka -o -name prometheus -o -name alertmanager -o -name k8s \) \
        -printf '%h\n' | sort -u
)
rc=0
for dir in "${state_dirs[@]}"; do
    echo "[clean] stopping instances with state in $dir" >&2
    for svc in kafka prometheus alertmanager; do
        if [[ -d $dir/$svc ]]; then
            SRE_STATE_DIR=$dir "$SCRIPT_DIR/$svc.sh" stop || rc=1
        fi
    done
    if [[ -d $dir/k8s ]]; then
        SRE_STATE_DIR=$dir "$SCRIPT_DIR/k8s.sh" down || rc=1
    fi
done
if ((rc != 0)); then
    # keep the pid files: they are the only handle on what may still run
    echo "[clean] some instance failed to stop; kept $ROOT" >&2
    exit 1
fi
rm -rf "$ROOT"
echo "[clean] removed $ROOT" >&2
