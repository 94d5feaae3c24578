#!/usr/bin/env bash
# Starts and stops Pulse's backing services — Kafka API (Tansu, sqlite storage),
# ClickHouse and S3 (s3s-fs), and the monitoring pair Prometheus and Alertmanager
# (Debian's packages) — as plain processes under one state folder:
#   $STATE/{kafka,clickhouse,s3,prometheus,alertmanager}/   data
#   $STATE/logs/*.log               logs
#   $STATE/pids/*.pid               what `stack_stop` stops, and nothing else
# Sourced by dev.sh and test.sh, never executed.

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

S3_BUCKET="${PULSE_S3_BUCKET:-pulse}"
S3_ACCESS_KEY="${PULSE_S3_ACCESS_KEY:-pulse-dev-access}"
S3_SECRET_KEY="${PULSE_S3_SECRET_KEY:-pulse-dev-secret}"

# start_proc STATE NAME CMD... — starts CMD in its own session, logs to $STATE/logs/NAME.log.
start_proc() {
  local state=$1 name=$2; shift 2
  mkdir -p "$state/logs" "$state/pids"
  if is_running "$state" "$name"; then
    log "$name already running (pid $(cat "$state/pids/$name.pid"))"
    return 0
  fi
  setsid nohup "$@" >>"$state/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$state/pids/$name.pid"
}

# is_running STATE NAME — the recorded pid is alive.
is_running() {
  local pidfile="$1/pids/$2.pid"
  [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

# stop_proc STATE NAME — SIGTERM, wait up to 20 s, then SIGKILL; removes the pid file.
stop_proc() {
  local state=$1 name=$2 pidfile="$1/pids/$2.pid" pid i
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 40); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name did not stop in 20 s; killing it"
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    log "stopped $name (pid $pid)"
  fi
  rm -f "$pidfile"
}

# start_kafka STATE PORT
start_kafka() {
  local state=$1 port=$2
  mkdir -p "$state/kafka"
  # Tansu reads sqlite://PATH relative to its working directory (it drops a leading /),
  # so it runs inside its data folder.
  start_proc "$state" kafka env -C "$state/kafka" tansu broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine "sqlite://tansu.db"
  wait_port 127.0.0.1 "$port" "Kafka API (Tansu)" 60 || die "Tansu did not open port $port; see $state/logs/kafka.log"
  index_tansu_headers "$state/kafka/tansu.db"
}

# index_tansu_headers DB — Tansu 0.6's sqlite schema has no index on header(topition,
# offset_id), so fetching each record scans every header of every topic: a consumer
# catching up on ~10k records with headers stalls the broker for minutes (measured; see
# README, Local stack). The index makes it ~2 s for 30k. Idempotent; the table exists once
# Tansu listens.
index_tansu_headers() {
  python3 - "$1" <<'PY' || die "could not index Tansu's header table in $1"
import sqlite3, sys, time
for attempt in range(50):
    try:
        db = sqlite3.connect(sys.argv[1], timeout=30)
        db.execute("create index if not exists pulse_header_record on header (topition, offset_id)")
        db.commit()
        sys.exit(0)
    except sqlite3.OperationalError as e:
        if attempt == 49:
            raise
        time.sleep(0.2)
PY
}

# start_clickhouse STATE HTTP_PORT TCP_PORT — writes a config for ClickHouse 18.16+.
start_clickhouse() {
  local state=$1 http_port=$2 tcp_port=$3 dir="$1/clickhouse"
  mkdir -p "$dir/data" "$dir/tmp" "$dir/user_files" "$dir/format_schemas" "$state/logs"
  cat > "$dir/config.xml" <<XML
<?xml version="1.0"?>
<yandex>
  <logger>
    <level>warning</level>
    <log>$state/logs/clickhouse-server.log</log>
    <errorlog>$state/logs/clickhouse-server.err.log</errorlog>
    <size>100M</size>
    <count>2</count>
  </logger>
  <listen_host>127.0.0.1</listen_host>
  <http_port>$http_port</http_port>
  <tcp_port>$tcp_port</tcp_port>
  <path>$dir/data/</path>
  <tmp_path>$dir/tmp/</tmp_path>
  <user_files_path>$dir/user_files/</user_files_path>
  <format_schema_path>$dir/format_schemas/</format_schema_path>
  <users_config>$dir/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <timezone>UTC</timezone>
  <mark_cache_size>268435456</mark_cache_size>
  <max_concurrent_queries>100</max_concurrent_queries>
</yandex>
XML
  cat > "$dir/users.xml" <<XML
<?xml version="1.0"?>
<yandex>
  <profiles><default><max_memory_usage>4000000000</max_memory_usage></default></profiles>
  <users>
    <default>
      <password></password>
      <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
      <profile>default</profile>
      <quota>default</quota>
    </default>
  </users>
  <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
    <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
XML
  start_proc "$state" clickhouse clickhouse-server --config-file="$dir/config.xml"
  local i
  for i in $(seq 1 120); do
    if [ "$(curl -s "http://127.0.0.1:$http_port/ping" 2>/dev/null)" = "Ok." ]; then
      log "ClickHouse answers on 127.0.0.1:$http_port"
      return 0
    fi
    is_running "$state" clickhouse || die "ClickHouse exited; see $state/logs/clickhouse*.log"
    sleep 0.5
  done
  die "ClickHouse did not answer on $http_port within 60 s; see $state/logs/clickhouse*.log"
}

# start_s3 STATE PORT — s3s-fs serving $STATE/s3, with the bucket created.
start_s3() {
  local state=$1 port=$2
  mkdir -p "$state/s3/$S3_BUCKET"
  start_proc "$state" s3 s3s-fs --host 127.0.0.1 --port "$port" \
    --access-key "$S3_ACCESS_KEY" --secret-key "$S3_SECRET_KEY" "$state/s3"
  wait_port 127.0.0.1 "$port" "S3 (s3s-fs)" 30 || die "s3s-fs did not open port $port; see $state/logs/s3.log"
}

# start_prometheus STATE PORT CONFIG_FILE — Debian's Prometheus (our own process, never the
# package's systemd unit) on 127.0.0.1:PORT with its TSDB in $STATE/prometheus; waits until
# /-/ready answers. --web.enable-lifecycle lets a caller reload rules (POST /-/reload).
start_prometheus() {
  local state=$1 port=$2 config=$3 i
  [ -f "$config" ] || die "Prometheus config $config not found"
  mkdir -p "$state/prometheus"
  start_proc "$state" prometheus prometheus \
    --config.file="$config" \
    --storage.tsdb.path="$state/prometheus" \
    --storage.tsdb.retention.time=7d \
    --web.listen-address="127.0.0.1:$port" \
    --web.enable-lifecycle
  for i in $(seq 1 120); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/-/ready")" = 200 ]; then
      log "Prometheus answers on http://127.0.0.1:$port"
      return 0
    fi
    is_running "$state" prometheus || die "Prometheus exited; see $state/logs/prometheus.log"
    sleep 0.5
  done
  die "Prometheus not ready on $port within 60 s; see $state/logs/prometheus.log"
}

# start_alertmanager STATE PORT CONFIG_FILE — Debian's Alertmanager (our own process) on
# 127.0.0.1:PORT, data in $STATE/alertmanager, clustering off (it would bind 9094).
start_alertmanager() {
  local state=$1 port=$2 config=$3 i
  [ -f "$config" ] || die "Alertmanager config $config not found"
  mkdir -p "$state/alertmanager"
  start_proc "$state" alertmanager prometheus-alertmanager \
    --config.file="$config" \
    --storage.path="$state/alertmanager" \
    --web.listen-address="127.0.0.1:$port" \
    --cluster.listen-address=
  for i in $(seq 1 60); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/-/ready")" = 200 ]; then
      log "Alertmanager answers on http://127.0.0.1:$port"
      return 0
    fi
    is_running "$state" alertmanager || die "Alertmanager exited; see $state/logs/alertmanager.log"
    sleep 0.5
  done
  die "Alertmanager not ready on $port within 30 s; see $state/logs/alertmanager.log"
}

stack_stop() {
  local state=$1 name
  for name in "${@:2}"; do stop_proc "$state" "$name"; done
}
