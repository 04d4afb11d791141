#!/usr/bin/env bash
# Single-node Apache Kafka (KRaft, broker+controller) on loopback, from the
# Maven Central jars (no distribution tarball needed).
#
# Usage: scripts/kafka.sh start|stop|status|env|reset|fetch
#   start   fetch jars if needed, format storage if needed, start, wait until ready;
#           no-op if already running and healthy, an error if running but not
#   stop    stop (TERM, then KILL); keeps data; no-op if not running
#   status  exit 0 if running, 3 if not, 4 if unknown (another call kept the lock)
#   env     print KAFKA_BOOTSTRAP=127.0.0.1:<port>
#   reset   stop and wipe the state dir (data, logs, configs)
#   fetch   only fetch the jars into the cache
#
# Env: SRE_KAFKA_PORT (19092), SRE_KAFKA_CONTROLLER_PORT (19093),
#      SRE_KAFKA_VERSION (4.1.1), SRE_KAFKA_HEAP_OPTS (-Xms256m -Xmx1g),
#      SRE_KAFKA_READY_TIMEOUT (90), SRE_LOCK_TIMEOUT (600), SRE_CACHE_DIR, SRE_STATE_DIR.
set -euo pipefail

SRE_SERVICE=kafka
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

KAFKA_VERSION="${SRE_KAFKA_VERSION:-4.1.1}"
LOG4J_VERSION="${SRE_LOG4J_VERSION:-2.24.3}"
DEPENDENCY_PLUGIN_VERSION=3.8.1
KAFKA_HOME="$SRE_CACHE_DIR/kafka-$KAFKA_VERSION"
LIBS="$KAFKA_HOME/libs"
COMPLETE_MARKER="$KAFKA_HOME/.complete"
HEAP_OPTS="${SRE_KAFKA_HEAP_OPTS:--Xms256m -Xmx1g}"
READY_TIMEOUT="${SRE_KAFKA_READY_TIMEOUT:-90}"

PORT="$SRE_KAFKA_PORT"
CPORT="$SRE_KAFKA_CONTROLLER_PORT"
ADDR="$SRE_BIND_HOST:$PORT"

state_dir() { printf '%s/kafka\n' "$SRE_STATE_DIR"; }

# Writes the throwaway pom used to resolve the broker's runtime classpath.
write_pom() {
    local extra="$1"
    write_file "$KAFKA_HOME/pom.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0"
         xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
         xsi:schemaLocation="http://maven.apache.org/POM/4.0.0 http://maven.apache.org/xsd/maven-4.0.0.xsd">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.sre-agent</groupId>
  <artifactId>kafka-broker-libs</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
$extra
  </dependencies>
  <build>
    <plugins>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-dependency-plugin</artifactId>
        <version>$DEPENDENCY_PLUGIN_VERSION</version>
      </plugin>
    </plugins>
  </build>
</project>
EOF
}

# sha512 of kafka_2.13-<version>.jar as published on Maven Central (checked
# against its .sha1 there). Other versions are checked against that .sha1.
declare -A KAFKA_JAR_SHA512=(
    [4.1.1]=6a4aec624b9723ba1903750e9768606557914824378081bf0ff223e219d265a62ec90bd5501b7cc2df3712421d8a5612922cd742072fdc2614ba4aec86c18877
)
MAVEN_CENTRAL=https://repo.maven.apache.org/maven2

# -C: Maven 3.8 only warns on a checksum mismatch, and .complete would then
# cache the corrupt jar for good.
run_mvn() {
    local out="$1"
    if ! mvn -B -C -f "$KAFKA_HOME/pom.xml" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$out" >>"$KAFKA_HOME/fetch.log" 2>&1; then
        log "maven failed; last 40 lines of $KAFKA_HOME/fetch.log:"
        tail -n 40 "$KAFKA_HOME/fetch.log" >&2
        return 1
    fi
}

# verify_kafka_jar DIR -> fails unless DIR's kafka_2.13 jar is the published one.
verify_kafka_jar() {
    local jar="$1/kafka_2.13-$KAFKA_VERSION.jar" want got algo
    [[ -f "$jar" ]] || { log "kafka_2.13-$KAFKA_VERSION.jar missing after fetch"; return 1; }
    if [[ -n "${KAFKA_JAR_SHA512[$KAFKA_VERSION]:-}" ]]; then
        algo=sha512
        want="${KAFKA_JAR_SHA512[$KAFKA_VERSION]}"
    else
        algo=sha1
        need_cmd curl "curl"
        want="$(curl -fsS --proto =https --max-time 30 \
            "$MAVEN_CENTRAL/org/apache/kafka/kafka_2.13/$KAFKA_VERSION/kafka_2.13-$KAFKA_VERSION.jar.sha1")" ||
            { log "could not fetch the .sha1 of kafka_2.13-$KAFKA_VERSION.jar from Maven Central"; return 1; }
        want="${want%% *}"
    fi
    got="$("${algo}sum" "$jar")"
    got="${got%% *}"
    if [[ "${got,,}" != "${want,,}" ]]; then
        log "kafka_2.13-$KAFKA_VERSION.jar $algo is $got, expected $want"
        return 1
    fi
    log "kafka_2.13-$KAFKA_VERSION.jar $algo verified"
}

# Fetches kafka_2.13 and its runtime dependencies plus a log4j2 binding into
# $LIBS. A marker file is written only after a complete fetch.
fetch_jars() {
    [[ -f "$COMPLETE_MARKER" ]] && return 0
    need_cmd mvn "maven"
    mkdir -p "$KAFKA_HOME"
    (
        flock 9
        [[ -f "$COMPLETE_MARKER" ]] && exit 0
        local t0 tmp slf4j binding
        t0="$(now_ms)"
        tmp="$KAFKA_HOME/libs.tmp"
        rm -rf "$LIBS" "$tmp"
        # a failed fetch leaves nothing behind that a later run could take for complete
        trap 'rm -rf "$tmp"' EXIT
        : >"$KAFKA_HOME/fetch.log"
        log "fetching org.apache.kafka:kafka_2.13:$KAFKA_VERSION with maven into $LIBS"
        write_pom ""
        run_mvn "$tmp"
        slf4j="$(find "$tmp" -maxdepth 1 -name 'slf4j-api-*.jar' -printf '%f\n' | head -n 1)"
        case "$slf4j" in
            slf4j-api-1.*) binding=log4j-slf4j-impl ;;
            *) binding=log4j-slf4j2-impl ;;
        esac
        log "found ${slf4j:-no slf4j-api}; adding $binding + log4j-core $LOG4J_VERSION"
        write_pom "    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>$binding</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>"
        run_mvn "$tmp"
        if ! verify_kafka_jar "$tmp"; then
            # Maven's local repository holds the same bytes and would serve them again
            rm -rf "${HOME:-/root}/.m2/repository/org/apache/kafka/kafka_2.13/$KAFKA_VERSION"
            die "kafka_2.13-$KAFKA_VERSION.jar failed verification; removed the partial fetch"
        fi
        mv "$tmp" "$LIBS"
        printf 'kafka %s, %s jars, fetched in %s ms\n' "$KAFKA_VERSION" \
            "$(find "$LIBS" -name '*.jar' | wc -l)" "$(($(now_ms) - t0))" >"$COMPLETE_MARKER"
        log "$(cat "$COMPLETE_MARKER")"
    ) 9>"$KAFKA_HOME.lock"
}

check_java() {
    need_cmd java "openjdk-17-jre-headless"
    local spec
    spec="$(java -XshowSettings:properties -version 2>&1 |
        awk -F'= ' '/java.specification.version/ {print $2; exit}')"
    if [[ -z "$spec" || "${spec%%.*}" -lt 17 ]]; then
        die "Kafka $KAFKA_VERSION needs Java 17+, found '${spec:-unknown}'"
    fi
}

write_configs() {
    local dir="$1"
    write_file "$dir/log4j2.properties" <<'EOF'
# Console only; stdout is redirected to kafka.log in the state dir.
status = warn
name = sre-agent-kafka
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.stdout.ref = STDOUT
logger.raftserver.name = kafka.server.KafkaRaftServer
logger.raftserver.level = INFO
logger.server.name = kafka.server.KafkaServer
logger.server.level = INFO
logger.kafka.name = kafka.Kafka$
logger.kafka.level = INFO
EOF
    write_file "$dir/server.properties" <<EOF
# Generated by scripts/kafka.sh; regenerated on every start.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$SRE_BIND_HOST:$CPORT
listeners=PLAINTEXT://$SRE_BIND_HOST:$PORT,CONTROLLER://$SRE_BIND_HOST:$CPORT
advertised.listeners=PLAINTEXT://$SRE_BIND_HOST:$PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=true
delete.topic.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
num.replica.fetchers=1
background.threads=2
log.cleaner.threads=1
log.retention.hours=24
EOF
}

format_storage() {
    local dir="$1" cluster_id
    [[ -f "$dir/data/meta.properties" ]] && return 0
    if [[ -f "$dir/cluster.id" ]]; then
        cluster_id="$(cat "$dir/cluster.id")"
    else
        cluster_id="$(java -cp "$LIBS/*" kafka.tools.StorageTool random-uuid 2>>"$dir/kafka.log" | tail -n 1)"
        [[ -n "$cluster_id" ]] || die "could not generate a cluster id; see $dir/kafka.log"
        printf '%s\n' "$cluster_id" >"$dir/cluster.id"
    fi
    log "formatting storage in $dir/data (cluster id $cluster_id)"
    if ! java -Dlog4j2.configurationFile="$dir/log4j2.properties" -cp "$LIBS/*" \
        kafka.tools.StorageTool format -t "$cluster_id" -c "$dir/server.properties" \
        >>"$dir/kafka.log" 2>&1; then
        tail -n 30 "$dir/kafka.log" >&2
        die "storage format failed"
    fi
}

# Ready = the broker answers a metadata request (kcat), or, without kcat,
# the port is open and the broker logged its start line.
kafka_ready() {
    local logfile="$1" skip="$2"
    if command -v kcat >/dev/null 2>&1; then
        kcat -L -b "$ADDR" -m 2 2>/dev/null | grep -q '1 brokers'
    else
        port_open "$PORT" && tail -n "+$skip" "$logfile" | grep -q 'Kafka Server started'
    fi
}

cmd_start() {
    local dir pidfile logfile t0 skip deadline
    dir="$(service_dir kafka)"
    pidfile="$dir/kafka.pid"
    logfile="$dir/kafka.log"
    exit_if_running kafka "$pidfile" "$dir/server.properties" "$ADDR" kafka_ready "$logfile" 1
    require_port_free "$PORT" "kafka broker"
    require_port_free "$CPORT" "kafka controller"
    check_java
    fetch_jars
    t0="$(now_ms)"
    mkdir -p "$dir/data"
    touch "$logfile"
    write_configs "$dir"
    format_storage "$dir"
    skip=$(($(wc -l <"$logfile") + 1))
    # shellcheck disable=SC2086  # HEAP_OPTS is a list of JVM flags
    spawn "$logfile" "$pidfile" "$dir/server.properties" java $HEAP_OPTS \
        -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError \
        -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$dir/log4j2.properties" \
        -cp "$LIBS/*" kafka.Kafka "$dir/server.properties"
    log "started pid $(cat "$pidfile"); waiting for $ADDR (timeout ${READY_TIMEOUT}s)"
    deadline=$((SECONDS + READY_TIMEOUT))
    while ! kafka_ready "$logfile" "$skip"; do
        if ! still_running "$pidfile" "$dir/server.properties"; then
            fail_start kafka "$pidfile" "$dir/server.properties" "$logfile" "kafka exited during startup"
        fi
        if ((SECONDS >= deadline)); then
            fail_start kafka "$pidfile" "$dir/server.properties" "$logfile" \
                "kafka not ready on $ADDR after ${READY_TIMEOUT}s"
        fi
        sleep 0.3
    done
    log "kafka $KAFKA_VERSION ready on $ADDR in $(($(now_ms) - t0)) ms (pid $(cat "$pidfile"), log $logfile)"
}

cmd_stop() {
    local dir
    dir="$(state_dir)"
    stop_service kafka "$dir/kafka.pid" "$dir/server.properties" 30
}

cmd_status() {
    local dir
    dir="$(state_dir)"
    status_service kafka "$dir/kafka.pid" "$dir/server.properties" "$ADDR"
}

cmd_reset() {
    local dir
    cmd_stop
    dir="$(state_dir)"
    wipe_service_dir "$dir"
    log "removed everything in $dir but its lock"
}

case "${1:-}" in
    start) locked kafka start cmd_start ;;
    stop) locked kafka stop cmd_stop ;;
    status) locked kafka status cmd_status ;;
    env) printf 'KAFKA_BOOTSTRAP=%s\n' "$ADDR" ;;
    reset) locked kafka reset cmd_reset ;;
    fetch) fetch_jars ;;
    *)
        printf 'usage: %s start|stop|status|env|reset|fetch\n' "$0" >&2
        exit 2
        ;;
esac
