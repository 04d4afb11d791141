#!/usr/bin/env bash
# Local Kubernetes control plane without Docker: etcd + kube-apiserver +
# kube-controller-manager + kube-scheduler + kwok (simulated nodes and pods),
# all on loopback, TLS and RBAC on.
#
#   scripts/k8s.sh build    build (once) the binaries into the cache
#   scripts/k8s.sh up       build if needed, start everything, wait for Ready nodes
#   scripts/k8s.sh down     stop everything by pid (TERM, wait, KILL); no-op if nothing runs;
#                           fails, touching nothing, if an `up` keeps the lock past SRE_LOCK_TIMEOUT
#   scripts/k8s.sh status   show components and nodes; exit 0 if healthy, 3 if nothing runs, else 1
#   scripts/k8s.sh env      print `export KUBECONFIG=...` and PATH (eval "$(scripts/k8s.sh env)")
#   scripts/k8s.sh reset    down, then delete the state dir's contents (certs, etcd data,
#                           logs) but its lock; fails, touching nothing, if an `up`
#                           keeps the lock past SRE_LOCK_TIMEOUT
#
# Environment (all optional):
#   SRE_CACHE_DIR            cache root (default ~/.cache/sre-agent); we use <root>/k8s
#   SRE_STATE_DIR            state root (default <repo>/.state); we use <root>/k8s
#   SRE_K8S_APISERVER_PORT   kube-apiserver https port (default 16443)
#   SRE_ETCD_PORT            etcd client port (default 12379)
#   SRE_ETCD_PEER_PORT       etcd peer port (default SRE_ETCD_PORT+1)
#   SRE_K8S_CONTROLLER_MANAGER_PORT  kube-controller-manager https port (default APISERVER_PORT+1)
#   SRE_K8S_SCHEDULER_PORT   kube-scheduler https port (default APISERVER_PORT+2)
#   SRE_K8S_NODES            number of kwok nodes (default 3)
#   SRE_K8S_UP_TIMEOUT       seconds to wait for each readiness step (default 120)
#   SRE_ETCD_BIN             use this etcd binary instead of the one built here
#   SRE_LOCK_TIMEOUT         seconds down/reset wait for the state dir's lock (default 60);
#                            then they fail naming the holder, stopping and deleting nothing
#
# `up` is idempotent: when everything is already running and healthy it says so
# and exits 0. When only some components are alive it stops them and starts
# afresh (etcd data is kept; use `reset` for a blank cluster).
set -euo pipefail

# ---------------------------------------------------------------------------
# Versions. KWOK v0.8.0 is built against k8s.io/* v0.36.x and defaults to
# Kubernetes 1.36, so the control plane is 1.36 too. etcd is built as well:
# Debian bookworm's etcd-server (3.4.23) is older than 3.4.31, so the apiserver
# turns off RequestWatchProgress, and client-go 1.36's streaming watch-lists
# (used by kwok) then fail and fall back to slow relists.
K8S_VERSION=v1.36.3
KWOK_VERSION=v0.8.0
ETCD_VERSION=v3.6.16

# ---------------------------------------------------------------------------
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
# shared helpers (wipe_service_dir, wait_exec, pid_running, need_cmd); log and die are redefined below
# shellcheck source=lib.sh
source "$SCRIPT_DIR/lib.sh"
REPO_ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd)

# absolute, so the daemons' flags and the printed kubeconfig path work from anywhere
CACHE_DIR=$(realpath -m -- "${SRE_CACHE_DIR:-$HOME/.cache/sre-agent}/k8s")
STATE_DIR=$(realpath -m -- "${SRE_STATE_DIR:-$REPO_ROOT/.state}/k8s")

BUILD_ID=${K8S_VERSION}-kwok-${KWOK_VERSION}-etcd-${ETCD_VERSION}
BIN_DIR=$CACHE_DIR/bin-$BUILD_ID
SRC_DIR=$CACHE_DIR/src-${K8S_VERSION}-kwok-${KWOK_VERSION}
ETCD_SRC_DIR=$CACHE_DIR/src-etcd-$ETCD_VERSION
ETCD_BIN=${SRE_ETCD_BIN:-$BIN_DIR/etcd}
BUILD_MARKER=$BIN_DIR/.complete

APISERVER_PORT=${SRE_K8S_APISERVER_PORT:-16443}
ETCD_PORT=${SRE_ETCD_PORT:-12379}
ETCD_PEER_PORT=${SRE_ETCD_PEER_PORT:-$((ETCD_PORT + 1))}
CM_PORT=${SRE_K8S_CONTROLLER_MANAGER_PORT:-$((APISERVER_PORT + 1))}
SCHED_PORT=${SRE_K8S_SCHEDULER_PORT:-$((APISERVER_PORT + 2))}
NODE_COUNT=${SRE_K8S_NODES:-3}
UP_TIMEOUT=${SRE_K8S_UP_TIMEOUT:-120}
LOCK_TIMEOUT=${SRE_LOCK_TIMEOUT:-60}

SERVICE_CIDR=10.96.0.0/16
SERVICE_IP=10.96.0.1
POD_CIDR=10.244.0.1/16

PKI=$STATE_DIR/pki
LOGS=$STATE_DIR/logs
PIDS=$STATE_DIR/pids
ADMIN_KUBECONFIG=$STATE_DIR/admin.kubeconfig
# start order; stopped in reverse
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

log() { printf '[k8s.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
STARTING=0 # set while `up` starts components: a failure then stops them again
die() {
	log "ERROR: $*"
	if ((STARTING)); then
		STARTING=0
		log "stopping what was started (logs stay in $LOGS)"
		stop_all
	fi
	exit 1
}

# ---------------------------------------------------------------------------
# build

go_env() {
	export GOMODCACHE=$CACHE_DIR/gomod
	export GOCACHE=$CACHE_DIR/gocache
	export GOTOOLCHAIN=local
	export GOFLAGS="-mod=mod -buildvcs=false"
	export CGO_ENABLED=0
}

built() { [[ -f $BUILD_MARKER ]]; }

write_wrapper_module() {
	# k8s.io/kubernetes replaces its staging modules (k8s.io/api, ...) with
	# ./staging/src paths, which only work inside its own repository. Point each
	# one at its published v0.Y.Z twin instead.
	local kmod staging_version=v0.${K8S_VERSION#v1.}
	kmod=$(cd "$SRC_DIR" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" |
		sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
	[[ -f $kmod ]] || die "could not download k8s.io/kubernetes@$K8S_VERSION go.mod"
	local staging
	staging=$(sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\) => \./staging/.*#\1#p' "$kmod")
	[[ -n $staging ]] || die "no staging replaces found in $kmod"
	{
		echo "module sre-agent.local/k8s-build"
		echo
		echo "go $(sed -n 's/^go \([0-9.]*\)$/\1/p' "$kmod")"
		echo
		echo "require ("
		echo "	k8s.io/kubernetes $K8S_VERSION"
		echo "	sigs.k8s.io/kwok $KWOK_VERSION"
		echo ")"
		echo
		echo "replace ("
		local m
		for m in $staging; do
			echo "	$m => $m $staging_version"
		done
		echo ")"
	} >"$SRC_DIR/go.mod"
}

cmd_build() {
	built && {
		log "binaries for $BUILD_ID already built in $BIN_DIR"
		return 0
	}
	command -v go >/dev/null || die "go is not installed"
	mkdir -p "$CACHE_DIR"
	exec 8>"$CACHE_DIR/build.lock"
	flock -w 7200 8 || die "another build still holds $CACHE_DIR/build.lock"
	built && return 0 # built by a concurrent caller while we waited
	go_env
	local start=$SECONDS
	log "building Kubernetes $K8S_VERSION, kwok $KWOK_VERSION and etcd $ETCD_VERSION into $BIN_DIR (cold: ~13 min on 2 cores)"
	mkdir -p "$SRC_DIR" "$BIN_DIR" "$ETCD_SRC_DIR"
	# go mod download needs some go.mod to run in
	[[ -f $SRC_DIR/go.mod ]] || printf 'module sre-agent.local/k8s-build\n' >"$SRC_DIR/go.mod"
	write_wrapper_module

	local minor=${K8S_VERSION#v1.}
	minor=${minor%%.*}
	local build_date
	build_date=$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' \
		"$GOMODCACHE/cache/download/k8s.io/kubernetes/@v/$K8S_VERSION.info")
	local ldflags="-s -w" pkg key val
	for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		for kv in "gitVersion=$K8S_VERSION" gitMajor=1 "gitMinor=$minor" \
			gitTreeState=clean "buildDate=${build_date:-1970-01-01T00:00:00Z}"; do
			key=${kv%%=*} val=${kv#*=}
			ldflags+=" -X $pkg.$key=$val"
		done
	done
	ldflags+=" -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
	ldflags+=" -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=$K8S_VERSION"

	# One go build for all five commands so shared packages compile once.
	(
		cd "$SRC_DIR"
		go build -trimpath -pgo=off -ldflags "$ldflags" -o "$BIN_DIR/" \
			k8s.io/kubernetes/cmd/kube-apiserver \
			k8s.io/kubernetes/cmd/kube-controller-manager \
			k8s.io/kubernetes/cmd/kube-scheduler \
			k8s.io/kubernetes/cmd/kubectl \
			sigs.k8s.io/kwok/cmd/kwok
	) || die "go build of Kubernetes and kwok failed"

	# etcd's server module replaces its sibling modules with ../ paths too, so
	# it needs a wrapper module of its own (as a dependency its replaces are
	# ignored and the published siblings it requires are used).
	log "building etcd $ETCD_VERSION"
	printf 'module sre-agent.local/etcd-build\n\ngo 1.26.0\n\nrequire go.etcd.io/etcd/server/v3 %s\n' \
		"$ETCD_VERSION" >"$ETCD_SRC_DIR/go.mod"
	(
		cd "$ETCD_SRC_DIR"
		go build -trimpath -pgo=off -ldflags "-s -w" -o "$BIN_DIR/etcd" go.etcd.io/etcd/server/v3
	) || die "go build of etcd failed"

	# kwok stage configs ship in the kwok module (kustomize/stage/...): the
	# "fast" set (node-initialize, node-heartbeat-with-lease, pod-ready,
	# pod-complete, pod-delete) as one multi-document file.
	local kdir
	kdir=$(cd "$SRC_DIR" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)
	local f first=1
	: >"$BIN_DIR/kwok-stages.yaml"
	for f in node/fast/node-initialize.yaml \
		node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
		pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
		[[ -f $kdir/kustomize/stage/$f ]] || die "kwok stage $f missing in $kdir"
		((first)) || echo "---" >>"$BIN_DIR/kwok-stages.yaml"
		first=0
		cat "$kdir/kustomize/stage/$f" >>"$BIN_DIR/kwok-stages.yaml"
	done

	local secs=$((SECONDS - start))
	printf 'k8s %s kwok %s etcd %s built in %ss on %s cores\n' "$K8S_VERSION" "$KWOK_VERSION" \
		"$ETCD_VERSION" "$secs" "$(nproc)" >"$BUILD_MARKER"
	log "build done in ${secs}s into $BIN_DIR"
}

# ---------------------------------------------------------------------------
# PKI and kubeconfigs (openssl, EC P-256)

gen_cert() { # name CN O [SANs] [CA name]
	local name=$1 cn=$2 org=$3 sans=${4:-} ca=${5:-ca}
	local ext=$PKI/$name.ext
	{
		echo "basicConstraints=CA:FALSE"
		echo "keyUsage=critical,digitalSignature,keyEncipherment"
		if [[ -n $sans ]]; then
			echo "extendedKeyUsage=serverAuth,clientAuth"
			echo "subjectAltName=$sans"
		else
			echo "extendedKeyUsage=clientAuth"
		fi
	} >"$ext"
	local subj="/CN=$cn"
	[[ -n $org ]] && subj="/O=$org/CN=$cn"
	openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/$name.key" 2>/dev/null
	openssl req -new -key "$PKI/$name.key" -subj "$subj" -out "$PKI/$name.csr" 2>/dev/null
	openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/$ca.crt" -CAkey "$PKI/$ca.key" \
		-CAcreateserial -days 3650 -sha256 -extfile "$ext" -out "$PKI/$name.crt" 2>/dev/null
	rm -f "$PKI/$name.csr" "$ext"
}

gen_ca() { # name CN
	openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/$1.key" 2>/dev/null
	openssl req -x509 -new -key "$PKI/$1.key" -subj "/CN=$2" -days 3650 -sha256 \
		-addext "basicConstraints=critical,CA:TRUE" \
		-addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
		-out "$PKI/$1.crt" 2>/dev/null
}

write_kubeconfig() { # file user-cert-name
	local file=$1 name=$2
	cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: sre-local
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $(base64 -w0 <"$PKI/ca.crt")
users:
- name: $name
  user:
    client-certificate-data: $(base64 -w0 <"$PKI/$name.crt")
    client-key-data: $(base64 -w0 <"$PKI/$name.key")
contexts:
- name: sre-local
  context:
    cluster: sre-local
    user: $name
current-context: sre-local
EOF
	chmod 600 "$file"
}

ensure_pki() {
	need_cmd openssl openssl
	mkdir -p "$PKI"
	chmod 700 "$PKI"
	if [[ ! -f $PKI/.complete ]]; then
		log "generating CA, certificates and service-account key in $PKI"
		gen_ca ca sre-agent-local-ca
		# requestheader (front-proxy) CA: completes delegated authentication of
		# the controller-manager and scheduler, and aggregated APIs if added
		gen_ca front-proxy-ca sre-agent-local-front-proxy-ca
		gen_cert front-proxy-client front-proxy-client "" "" front-proxy-ca
		gen_cert apiserver kube-apiserver "" \
			"DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:$SERVICE_IP"
		gen_cert components-serving localhost "" "DNS:localhost,IP:127.0.0.1"
		gen_cert admin sre-admin system:masters
		gen_cert kube-controller-manager system:kube-controller-manager ""
		gen_cert kube-scheduler system:kube-scheduler ""
		# kwok plays every kubelet; it writes node and pod status cluster-wide
		gen_cert kwok kwok-controller system:masters
		openssl ecparam -name prime256v1 -genkey -noout -out "$PKI/sa.key" 2>/dev/null
		openssl ec -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
		touch "$PKI/.complete"
	fi
	# kubeconfigs carry the port, so rewrite them on every up
	write_kubeconfig "$STATE_DIR/admin.kubeconfig" admin
	write_kubeconfig "$STATE_DIR/kube-controller-manager.kubeconfig" kube-controller-manager
	write_kubeconfig "$STATE_DIR/kube-scheduler.kubeconfig" kube-scheduler
	write_kubeconfig "$STATE_DIR/kwok.kubeconfig" kwok
}

# ---------------------------------------------------------------------------
# processes

expected_exe() {
	case $1 in
	etcd) echo "$ETCD_BIN" ;;
	*) echo "$BIN_DIR/$1" ;;
	esac
}

# pid of a running component, verified against /proc/<pid>/exe and against
# this instance's state dir in its command line: other clusters run the same
# binaries, so a recycled pid can name another cluster's kube-apiserver.
component_pid() {
	local f=$PIDS/$1.pid pid exe
	[[ -f $f ]] || return 1
	pid=$(<"$f")
	[[ $pid =~ ^[0-9]+$ ]] || return 1
	exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
	exe=${exe% (deleted)}
	[[ $(basename "$exe") == "$1" ]] || return 1
	uses_state_dir "$pid" || return 1
	echo "$pid"
}

# Every component gets a path under $STATE_DIR as a whole argument or a flag's
# value; a substring match would take /x$STATE_DIR/... for ours.
uses_state_dir() { # pid
	local arg args=()
	mapfile -d '' -t args <"/proc/$1/cmdline" 2>/dev/null || return 1
	for arg in "${args[@]}"; do
		[[ $arg == "$STATE_DIR/"* || $arg == *"=$STATE_DIR/"* ]] && return 0
	done
	return 1
}

port_in_use() { (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_component() { # name args...
	local name=$1
	shift
	local exe
	exe=$(expected_exe "$name")
	echo "$exe $*" >"$LOGS/$name.cmdline"
	# setsid: own session, so the caller's terminal or process group can't take it down
	# 8>&- 9>&-: the daemons must not inherit (and so hold) our flock fds
	setsid "$exe" "$@" </dev/null >>"$LOGS/$name.log" 2>&1 8>&- 9>&- &
	local pid=$!
	echo "$pid" >"$PIDS/$name.pid"
	# Until its exec completes the child's /proc entry shows this shell (exe
	# bash) or an empty command line, so alive, which wait_ready checks at
	# once, would call a slow-starting component dead: up failed, and
	# stop_all, not knowing the pid either, left the component running with
	# its pid file removed.
	wait_exec "$pid" 30 alive "$name"
}

alive() { component_pid "$1" >/dev/null; }

check_alive_or_die() {
	alive "$1" || {
		log "$1 exited; last lines of $LOGS/$1.log:"
		tail -n 30 "$LOGS/$1.log" >&2 || true
		die "$1 failed to start"
	}
}

# wait_ready WHAT TIMEOUT CHECK COMPONENT... : poll CHECK until it succeeds;
# fail at once if one of the COMPONENTs dies meanwhile, or after TIMEOUT s.
wait_ready() {
	local what=$1 timeout=$2 check=$3 c
	shift 3
	local deadline=$((SECONDS + timeout))
	until "$check" >/dev/null 2>&1; do
		for c in "$@"; do check_alive_or_die "$c"; done
		((SECONDS < deadline)) || die "timed out after ${timeout}s waiting for $what"
		sleep 0.5
	done
}

https_ok() { # url
	curl -sf -o /dev/null --max-time 3 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" "$1"
}

etcd_ok() { curl -sf --max-time 3 "http://127.0.0.1:$ETCD_PORT/health" | grep -q '"health":"true"'; }
apiserver_ok() { https_ok "https://127.0.0.1:$APISERVER_PORT/readyz"; }
cm_ok() { https_ok "https://127.0.0.1:$CM_PORT/healthz"; }
sched_ok() { https_ok "https://127.0.0.1:$SCHED_PORT/healthz"; }
kctl() { "$BIN_DIR/kubectl" --kubeconfig "$ADMIN_KUBECONFIG" "$@"; }

# Ready and untainted: the node-lifecycle controller removes the initial
# node.kubernetes.io/not-ready taint a moment after the node turns Ready, and
# until then nothing schedules there.
nodes_ready() {
	local ready
	ready=$(kctl get nodes -l type=kwok \
		-o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}/{.spec.taints}{"\n"}{end}' |
		grep -c '^True/$') || return 1
	((ready >= NODE_COUNT))
}

healthy() {
	local c
	for c in "${COMPONENTS[@]}"; do alive "$c" || return 1; done
	etcd_ok && apiserver_ok && cm_ok && sched_ok && nodes_ready
}

apply_nodes() {
	local i manifest=""
	for ((i = 0; i < NODE_COUNT; i++)); do
		manifest+="---
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-$i
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: \"0\"
  labels:
    type: kwok
    kubernetes.io/hostname: kwok-node-$i
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    kubernetes.io/role: agent
    node-role.kubernetes.io/agent: \"\"
spec: {}
"
	done
	printf '%s' "$manifest" | kctl apply -f - >/dev/null
}

cmd_up() {
	local t0=$SECONDS
	mkdir -p "$STATE_DIR"
	# a concurrent `up` may be doing the cold build
	take_lock up 1800
	cmd_build
	[[ -x $ETCD_BIN ]] || die "etcd binary $ETCD_BIN is not executable"
	mkdir -p "$LOGS" "$PIDS"
	if healthy; then
		log "already running and healthy (apiserver https://127.0.0.1:$APISERVER_PORT, state $STATE_DIR)"
		return 0
	fi
	local c any=0
	for c in "${COMPONENTS[@]}"; do alive "$c" && any=1; done
	if ((any)); then
		log "partially running or unhealthy: restarting all components"
		stop_all
	fi
	local p
	for p in "$ETCD_PORT" "$ETCD_PEER_PORT" "$APISERVER_PORT" "$CM_PORT" "$SCHED_PORT"; do
		port_in_use "$p" && die "port 127.0.0.1:$p is already in use (set SRE_K8S_APISERVER_PORT / SRE_ETCD_PORT ...)"
	done
	ensure_pki
	for c in "${COMPONENTS[@]}"; do
		printf '\n==== %s up %s ====\n' "$c" "$(date -Is)" >>"$LOGS/$c.log"
	done
	# etcd cannot open a data dir written by a much older etcd (e.g. 3.4 -> 3.6)
	local etcd_minor=${ETCD_VERSION%.*} data_minor=""
	[[ -f $STATE_DIR/etcd.version ]] && data_minor=$(<"$STATE_DIR/etcd.version")
	if [[ -d $STATE_DIR/etcd && $data_minor != "$etcd_minor" ]]; then
		local aside
		aside=$STATE_DIR/etcd.old-$(date +%Y%m%d%H%M%S)
		log "etcd data in $STATE_DIR/etcd is from etcd ${data_minor:-unknown}, not $etcd_minor: moved to $aside"
		mv "$STATE_DIR/etcd" "$aside"
	fi
	echo "$etcd_minor" >"$STATE_DIR/etcd.version"

	STARTING=1
	start_component etcd \
		--name sre-local \
		--data-dir "$STATE_DIR/etcd" \
		--listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
		--advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
		--listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
		--initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
		--initial-cluster "sre-local=http://127.0.0.1:$ETCD_PEER_PORT" \
		--quota-backend-bytes $((2 * 1024 * 1024 * 1024)) \
		--auto-compaction-retention 1 \
		--unsafe-no-fsync \
		--logger zap
	wait_ready etcd 60 etcd_ok etcd

	# --endpoint-reconciler-type=none: the default/kubernetes Endpoints may not
	# hold a loopback address, and nothing runs in-cluster to use it anyway
	start_component kube-apiserver \
		--bind-address=127.0.0.1 \
		--advertise-address=127.0.0.1 \
		--secure-port="$APISERVER_PORT" \
		--etcd-servers="http://127.0.0.1:$ETCD_PORT" \
		--tls-cert-file="$PKI/apiserver.crt" \
		--tls-private-key-file="$PKI/apiserver.key" \
		--client-ca-file="$PKI/ca.crt" \
		--authorization-mode=RBAC \
		--service-account-issuer=https://kubernetes.default.svc.cluster.local \
		--service-account-key-file="$PKI/sa.pub" \
		--service-account-signing-key-file="$PKI/sa.key" \
		--service-cluster-ip-range="$SERVICE_CIDR" \
		--endpoint-reconciler-type=none \
		--requestheader-client-ca-file="$PKI/front-proxy-ca.crt" \
		--requestheader-allowed-names=front-proxy-client \
		--requestheader-username-headers=X-Remote-User \
		--requestheader-group-headers=X-Remote-Group \
		--requestheader-extra-headers-prefix=X-Remote-Extra- \
		--proxy-client-cert-file="$PKI/front-proxy-client.crt" \
		--proxy-client-key-file="$PKI/front-proxy-client.key" \
		--allow-privileged=true \
		--profiling=false \
		--v=1
	wait_ready kube-apiserver "$UP_TIMEOUT" apiserver_ok etcd kube-apiserver

	local common=(
		--bind-address=127.0.0.1
		--tls-cert-file="$PKI/components-serving.crt"
		--tls-private-key-file="$PKI/components-serving.key"
		--client-ca-file="$PKI/ca.crt"
		--leader-elect=false
		--profiling=false
		--v=1
	)
	start_component kube-controller-manager "${common[@]}" \
		--secure-port="$CM_PORT" \
		--kubeconfig="$STATE_DIR/kube-controller-manager.kubeconfig" \
		--authentication-kubeconfig="$STATE_DIR/kube-controller-manager.kubeconfig" \
		--authorization-kubeconfig="$STATE_DIR/kube-controller-manager.kubeconfig" \
		--controllers='*' \
		--use-service-account-credentials=true \
		--service-account-private-key-file="$PKI/sa.key" \
		--root-ca-file="$PKI/ca.crt" \
		--cluster-signing-cert-file="$PKI/ca.crt" \
		--cluster-signing-key-file="$PKI/ca.key" \
		--service-cluster-ip-range="$SERVICE_CIDR" \
		--node-monitor-period=5s \
		--node-monitor-grace-period=40s
	start_component kube-scheduler "${common[@]}" \
		--secure-port="$SCHED_PORT" \
		--kubeconfig="$STATE_DIR/kube-scheduler.kubeconfig" \
		--authentication-kubeconfig="$STATE_DIR/kube-scheduler.kubeconfig" \
		--authorization-kubeconfig="$STATE_DIR/kube-scheduler.kubeconfig"
	start_component kwok \
		--kubeconfig="$STATE_DIR/kwok.kubeconfig" \
		--config="$BIN_DIR/kwok-stages.yaml" \
		--manage-all-nodes=false \
		--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
		--node-lease-duration-seconds=40 \
		--cidr="$POD_CIDR" \
		--node-ip=127.0.0.1

	wait_ready kube-controller-manager "$UP_TIMEOUT" cm_ok "${COMPONENTS[@]}"
	wait_ready kube-scheduler "$UP_TIMEOUT" sched_ok "${COMPONENTS[@]}"

	apply_nodes
	wait_ready "$NODE_COUNT Ready, untainted kwok nodes" "$UP_TIMEOUT" nodes_ready "${COMPONENTS[@]}"
	STARTING=0
	log "up in $((SECONDS - t0))s: apiserver https://127.0.0.1:$APISERVER_PORT, $NODE_COUNT kwok nodes Ready"
	log "kubeconfig: $ADMIN_KUBECONFIG   (eval \"\$($0 env)\")"
}

stop_all() {
	local i c pid pids=() names=()
	for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
		c=${COMPONENTS[i]}
		if pid=$(component_pid "$c"); then
			kill -TERM "$pid" 2>/dev/null || true
			pids+=("$pid")
			names+=("$c")
			# let the apiserver go before etcd
			if [[ $c == kube-apiserver ]]; then
				wait_pid_gone "$pid" 15 || kill -KILL "$pid" 2>/dev/null || true
			fi
		fi
	done
	for i in "${!pids[@]}"; do
		wait_pid_gone "${pids[i]}" 15 || {
			log "${names[i]} (pid ${pids[i]}) ignored TERM; sending KILL"
			kill -KILL "${pids[i]}" 2>/dev/null || true
			wait_pid_gone "${pids[i]}" 5 || true
		}
	done
	for c in "${COMPONENTS[@]}"; do rm -f "$PIDS/$c.pid"; done
	((${#names[@]})) && log "stopped: ${names[*]}"
	return 0
}

wait_pid_gone() { # pid seconds
	local deadline=$((SECONDS + $2))
	while pid_running "$1"; do
		((SECONDS >= deadline)) && return 1
		sleep 0.2
	done
}

# take_lock ACTION SECONDS -> waits that long for the exclusive lock on fd 9,
# then notes the holder in it (as lib.sh's locked does); dies naming the
# holder if it is still busy. >>: opening must not truncate that note.
take_lock() {
	local holder
	exec 9>>"$STATE_DIR/lock"
	if ! flock -w "$2" 9; then
		holder=$(cat "$STATE_DIR/lock" 2>/dev/null)
		die "another scripts/k8s.sh (${holder:-holder unknown}) still holds $STATE_DIR/lock after ${2}s; stopped and deleted nothing, retry once it has finished (SRE_LOCK_TIMEOUT sets the wait)"
	fi
	printf 'pid %s: %s\n' "$$" "$1" >"$STATE_DIR/lock"
}

# Never without the lock: an `up` holding it may be between spawning a
# component and its exec, when component_pid cannot tell it is ours; a down
# that went ahead anyway removed its pid file and left it running untracked
# (ports taken), and the up then failed on a component it thought dead.
cmd_down() {
	[[ -d $STATE_DIR ]] || {
		log "nothing running (no $STATE_DIR)"
		return 0
	}
	take_lock down "$LOCK_TIMEOUT"
	stop_running
}

stop_running() {
	mkdir -p "$PIDS"
	local c any=0
	for c in "${COMPONENTS[@]}"; do alive "$c" && any=1; done
	if ((!any)); then
		rm -f "$PIDS"/*.pid
		log "nothing running"
		return 0
	fi
	stop_all
}

cmd_status() {
	local c pid rc=0 any=0
	if built; then
		echo "build:  $(<"$BUILD_MARKER") ($BIN_DIR)"
	else
		echo "build:  not built ($BIN_DIR)"
	fi
	echo "state:  $STATE_DIR"
	for c in "${COMPONENTS[@]}"; do
		if pid=$(component_pid "$c"); then
			printf '%-24s running (pid %s)\n' "$c" "$pid"
			any=1
		else
			printf '%-24s stopped\n' "$c"
			rc=1
		fi
	done
	if ((rc == 0)); then
		local check
		for check in etcd_ok apiserver_ok cm_ok sched_ok; do
			if "$check" >/dev/null 2>&1; then
				printf '%-24s ok\n' "${check%_ok}"
			else
				printf '%-24s FAIL\n' "${check%_ok}"
				rc=1
			fi
		done
		kctl version 2>/dev/null || rc=1
		kctl get nodes -o wide 2>/dev/null || rc=1
		nodes_ready || rc=1
	fi
	echo "apiserver:  https://127.0.0.1:$APISERVER_PORT"
	echo "kubeconfig: $ADMIN_KUBECONFIG"
	if ((rc == 0)); then echo "healthy"; else echo "NOT healthy"; fi
	((any)) || return 3 # LSB "not running": nothing of this instance to leave alone
	return $rc
}

cmd_env() {
	printf 'export KUBECONFIG=%q\n' "$ADMIN_KUBECONFIG"
	# shellcheck disable=SC2016 # $PATH is for the shell that evals this
	printf 'export PATH=%q:"$PATH"\n' "$BIN_DIR"
	printf 'export SRE_K8S_APISERVER=%q\n' "https://127.0.0.1:$APISERVER_PORT"
	printf 'export SRE_K8S_VERSION=%q\n' "$K8S_VERSION"
	printf 'export SRE_K8S_BIN_DIR=%q\n' "$BIN_DIR"
	printf 'export SRE_K8S_STATE_DIR=%q\n' "$STATE_DIR"
}

# Stops and deletes everything but the lock, holding it throughout: with the
# lock deleted too, a caller already waiting on it would run beside the next
# `up`, which makes and takes a fresh one (lib.sh's reset keeps its lock the
# same way). Never without the lock either: an `up` that still holds it (a
# cold build, a slow start) would have its certs and etcd data deleted under it.
cmd_reset() {
	[[ -d $STATE_DIR ]] || return 0
	take_lock reset "$LOCK_TIMEOUT"
	stop_running
	wipe_service_dir "$STATE_DIR"
	log "removed everything in $STATE_DIR but its lock"
}

case ${1:-} in
build) cmd_build ;;
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
env) cmd_env ;;
reset) cmd_reset ;;
*)
	sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
	exit 2
	;;
esac
