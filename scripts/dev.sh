#!/usr/bin/env bash
# The local Pulse platform.
#   scripts/dev.sh up       install what is missing, start Kafka API (Tansu), ClickHouse and
#                           S3 (s3s-fs), create topics, build and start the Pulse services
#   scripts/dev.sh down     stop exactly what `up` started (by recorded pid)
#   scripts/dev.sh status   what runs, with pids and ports
#   scripts/dev.sh logs [NAME]  follow the logs (all, or one of: kafka clickhouse s3 ingest
#                           processor writer-clickhouse writer-parquet query-api schema-registry)
# Everything lives in $PULSE_STATE (default: .pulse/ in the checkout). `up` is safe to
# run again: what runs is left running.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
source "$REPO/scripts/stack.sh"

STATE="${PULSE_STATE:-$REPO/.pulse}"
KAFKA_PORT="${PULSE_KAFKA_PORT:-9092}"
CH_HTTP_PORT="${PULSE_CLICKHOUSE_HTTP_PORT:-8123}"
CH_TCP_PORT="${PULSE_CLICKHOUSE_TCP_PORT:-9000}"
S3_PORT="${PULSE_S3_PORT:-9900}"

BACKING=(kafka clickhouse s3)
# name:binary:admin-port[:extra args]
SERVICES=(
  "schema-registry:pulse-schema-registry:9105"
  "ingest:pulse-ingest:9101"
  "processor:pulse-processor:9102"
  "writer-clickhouse:pulse-writer:9103:--sink clickhouse"
  "writer-parquet:pulse-writer:9106:--sink parquet"
  "query-api:pulse-query-api:9104"
)
BIN_DIR="$CARGO_TARGET_DIR/release"

port_owned_by_other() { # PORT NAME: the port answers but not from our recorded process
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && ! is_running "$STATE" "$2"
}

wait_ready() { # NAME ADMIN_PORT
  local i
  for i in $(seq 1 60); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$2/readyz")" = 200 ]; then
      log "$1 ready (admin http://127.0.0.1:$2)"
      return 0
    fi
    is_running "$STATE" "$1" || die "$1 exited; see $STATE/logs/$1.log"
    sleep 0.5
  done
  die "$1 not ready after 30 s; see $STATE/logs/$1.log"
}

up() {
  bash "$REPO/scripts/install-deps.sh"
  mkdir -p "$STATE/logs" "$STATE/pids"
  for pair in "kafka:$KAFKA_PORT" "clickhouse:$CH_HTTP_PORT" "s3:$S3_PORT"; do
    port_owned_by_other "${pair#*:}" "${pair%%:*}" \
      && die "port ${pair#*:} is in use by another process; free it or set the PULSE_*_PORT variables (README, Ports)"
  done
  start_kafka "$STATE" "$KAFKA_PORT"
  start_clickhouse "$STATE" "$CH_HTTP_PORT" "$CH_TCP_PORT"
  start_s3 "$STATE" "$S3_PORT"

  log "building Pulse (release; the first build takes several minutes)"
  (cd "$REPO" && cargo build --release --quiet --bins) || die "cargo build failed"

  export PULSE_KAFKA_BROKERS="127.0.0.1:$KAFKA_PORT"
  export PULSE_CLICKHOUSE_URL="http://127.0.0.1:$CH_HTTP_PORT"
  export PULSE_S3_ENDPOINT="http://127.0.0.1:$S3_PORT"
  export PULSE_S3_BUCKET="$S3_BUCKET" PULSE_S3_ACCESS_KEY="$S3_ACCESS_KEY" PULSE_S3_SECRET_KEY="$S3_SECRET_KEY"
  "$BIN_DIR/pulsectl" topics create || die "creating topics failed"

  # Dev-only secrets, documented in the README; never use them elsewhere.
  export PULSE_INGEST_API_KEYS="${PULSE_INGEST_API_KEYS:-pulse-dev-key=dev}"
  export PULSE_INGEST_PII_HMAC_KEY="${PULSE_INGEST_PII_HMAC_KEY:-pulse-dev-hmac-key}"
  export PULSE_SCHEMA_REGISTRY_URL="http://127.0.0.1:8081"

  local spec name bin port extra
  # The registry first: the other services need Pulse's schemas registered.
  for spec in "${SERVICES[@]}"; do
    IFS=: read -r name bin port extra <<<"$spec"
    # shellcheck disable=SC2086 # extra holds separate arguments
    start_proc "$STATE" "$name" env PULSE_ADMIN_ADDR="127.0.0.1:$port" "$BIN_DIR/$bin" $extra
    if [ "$name" = schema-registry ]; then
      wait_ready "$name" "$port"
      "$BIN_DIR/pulsectl" schemas register \
        || die "registering Pulse's schemas failed; see $STATE/logs/schema-registry.log"
    fi
  done
  for spec in "${SERVICES[@]}"; do
    IFS=: read -r name bin port extra <<<"$spec"
    wait_ready "$name" "$port"
  done

  cat <<TXT

Pulse is up. State, data and logs: $STATE
  Kafka API (Tansu)   127.0.0.1:$KAFKA_PORT
  ClickHouse HTTP     http://127.0.0.1:$CH_HTTP_PORT   (try: curl 'http://127.0.0.1:$CH_HTTP_PORT/?query=SELECT+version()')
  S3 (s3s-fs)         http://127.0.0.1:$S3_PORT  bucket '$S3_BUCKET'
  Schema registry     http://127.0.0.1:8081   (try: curl http://127.0.0.1:8081/subjects)
  Ingest              http://127.0.0.1:8080/v1/events, gRPC 127.0.0.1:50051 (API key: pulse-dev-key)
    try: curl -s http://127.0.0.1:8080/v1/events -H 'Authorization: Bearer pulse-dev-key' -H 'Content-Type: application/json' \\
           -d '{"schema_version":1,"event_type":"page_view","key":{"user_id":"u-1"},"payload":{"page":"/"},"metadata":{"event_timestamp":'\$(date +%s000)'}}'
  Service admin       http://127.0.0.1:{9101 ingest, 9102 processor, 9103 writer-clickhouse,
                      9106 writer-parquet, 9104 query-api, 9105 schema-registry}/metrics|livez|readyz
Logs:   scripts/dev.sh logs [name]      Status: scripts/dev.sh status      Stop: scripts/dev.sh down
Events sent to ingest flow through the processor into ClickHouse (database 'pulse'; try:
curl 'http://127.0.0.1:$CH_HTTP_PORT/?query=SELECT+count()+FROM+pulse.events+FINAL').
Not there yet: the Parquet archive, the query API and the synthetic workload (README, Status).
TXT
}

down() {
  local spec name i
  for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
    name="${SERVICES[$i]%%:*}"
    stop_proc "$STATE" "$name"
  done
  stack_stop "$STATE" s3 clickhouse kafka
  log "stopped; data kept in $STATE (remove it for a clean start)"
}

status() {
  local name pidfile
  printf '%-20s %-9s %s\n' NAME STATE PID
  for name in "${BACKING[@]}" $(printf '%s\n' "${SERVICES[@]}" | cut -d: -f1); do
    pidfile="$STATE/pids/$name.pid"
    if is_running "$STATE" "$name"; then
      printf '%-20s %-9s %s\n' "$name" running "$(cat "$pidfile")"
    else
      printf '%-20s %-9s %s\n' "$name" stopped -
    fi
  done
}

logs() {
  [ -d "$STATE/logs" ] || die "no logs yet in $STATE/logs; run scripts/dev.sh up"
  if [ $# -gt 0 ]; then
    tail -n 100 -F "$STATE/logs/$1.log"
  else
    tail -n 20 -F "$STATE"/logs/*.log
  fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  logs) shift; logs "$@" ;;
  *) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
