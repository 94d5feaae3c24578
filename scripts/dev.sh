#!/usr/bin/env bash
# The local Pulse platform.
#   scripts/dev.sh up       install what is missing, start Kafka API (Tansu), ClickHouse and
#                           S3 (s3s-fs), create topics, build and start the Pulse services
#   scripts/dev.sh down     stop exactly what `up` started (by recorded pid)
#   scripts/dev.sh status   what runs, with pids and health (the broker by a real produce,
#                           each service by its /readyz); exits 1 if anything is unhealthy
#   scripts/dev.sh logs [NAME]  follow the logs (all, or one of: kafka clickhouse s3 ingest
#                           processor writer-clickhouse writer-parquet query-api schema-registry loadgen)
# Everything lives in $PULSE_STATE (default: .pulse/ in the checkout). `up` is safe to
# run again: what runs is left running. Every port can be moved with an environment
# variable (README, Ports); PULSE_DEV_PROFILE=debug runs debug binaries, PULSE_DEV_BUILD=0
# skips the build, PULSE_DEV_LOADGEN=0 skips the synthetic workload (the end-to-end test
# uses all three).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
source "$REPO/scripts/stack.sh"

STATE="${PULSE_STATE:-$REPO/.pulse}"
KAFKA_PORT="${PULSE_KAFKA_PORT:-9092}"
CH_HTTP_PORT="${PULSE_CLICKHOUSE_HTTP_PORT:-8123}"
CH_TCP_PORT="${PULSE_CLICKHOUSE_TCP_PORT:-9000}"
S3_PORT="${PULSE_S3_PORT:-9900}"
SR_PORT="${PULSE_SCHEMA_REGISTRY_PORT:-8081}"
INGEST_HTTP_PORT="${PULSE_INGEST_HTTP_PORT:-8080}"
INGEST_GRPC_PORT="${PULSE_INGEST_GRPC_PORT:-50051}"
QUERY_HTTP_PORT="${PULSE_QUERY_HTTP_PORT:-8090}"
QUERY_GRPC_PORT="${PULSE_QUERY_GRPC_PORT:-50052}"
PROFILE="${PULSE_DEV_PROFILE:-release}"
LOADGEN_RATE="${PULSE_DEV_LOADGEN_RATE:-20}"

BACKING=(kafka clickhouse s3)
# name:binary:admin-port[:extra args]
SERVICES=(
  "schema-registry:pulse-schema-registry:${PULSE_SCHEMA_REGISTRY_ADMIN_PORT:-9105}"
  "ingest:pulse-ingest:${PULSE_INGEST_ADMIN_PORT:-9101}"
  "processor:pulse-processor:${PULSE_PROCESSOR_ADMIN_PORT:-9102}"
  "writer-clickhouse:pulse-writer:${PULSE_WRITER_CLICKHOUSE_ADMIN_PORT:-9103}:--sink clickhouse"
  "writer-parquet:pulse-writer:${PULSE_WRITER_PARQUET_ADMIN_PORT:-9106}:--sink parquet"
  "query-api:pulse-query-api:${PULSE_QUERY_ADMIN_PORT:-9104}"
)
case "$PROFILE" in
  release|debug) BIN_DIR="$CARGO_TARGET_DIR/$PROFILE" ;;
  *) die "PULSE_DEV_PROFILE must be release or debug, not '$PROFILE'" ;;
esac
admin_port() { # NAME
  local spec
  for spec in "${SERVICES[@]}"; do
    [ "${spec%%:*}" = "$1" ] && { IFS=: read -r _ _ port _ <<<"$spec"; echo "$port"; return; }
  done
}

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

  if [ "${PULSE_DEV_BUILD:-1}" = 1 ]; then
    log "building Pulse ($PROFILE; the first build takes several minutes)"
    local flags=(--quiet --bins)
    [ "$PROFILE" = release ] && flags+=(--release)
    (cd "$REPO" && cargo build "${flags[@]}") || die "cargo build failed"
  fi

  export PULSE_KAFKA_BROKERS="127.0.0.1:$KAFKA_PORT"
  export PULSE_CLICKHOUSE_URL="http://127.0.0.1:$CH_HTTP_PORT"
  export PULSE_S3_ENDPOINT="http://127.0.0.1:$S3_PORT"
  export PULSE_S3_BUCKET="$S3_BUCKET" PULSE_S3_ACCESS_KEY="$S3_ACCESS_KEY" PULSE_S3_SECRET_KEY="$S3_SECRET_KEY"
  "$BIN_DIR/pulsectl" topics create || die "creating topics failed"

  # Dev-only secrets, documented in the README; never use them elsewhere.
  export PULSE_INGEST_API_KEYS="${PULSE_INGEST_API_KEYS:-pulse-dev-key=dev}"
  export PULSE_INGEST_PII_HMAC_KEY="${PULSE_INGEST_PII_HMAC_KEY:-pulse-dev-hmac-key}"
  export PULSE_SCHEMA_REGISTRY_URL="http://127.0.0.1:$SR_PORT"
  export PULSE_SCHEMA_REGISTRY_ADDR="127.0.0.1:$SR_PORT"
  export PULSE_INGEST_HTTP_ADDR="127.0.0.1:$INGEST_HTTP_PORT" PULSE_INGEST_GRPC_ADDR="127.0.0.1:$INGEST_GRPC_PORT"
  export PULSE_QUERY_HTTP_ADDR="127.0.0.1:$QUERY_HTTP_PORT" PULSE_QUERY_GRPC_ADDR="127.0.0.1:$QUERY_GRPC_PORT"
  export PULSE_QUERY_API_TOKENS="${PULSE_QUERY_API_TOKENS:-pulse-dev-token}"
  "$BIN_DIR/pulsectl" migrate >/dev/null || die "applying the ClickHouse migrations failed"

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

  if [ "${PULSE_DEV_LOADGEN:-1}" = 1 ] && ! is_running "$STATE" loadgen; then
    # A live synthetic workload: users browsing, buying in several currencies, with a few
    # out-of-order, late, duplicate and malformed events (README, pulsectl loadgen).
    start_proc "$STATE" loadgen "$BIN_DIR/pulsectl" loadgen \
      --target "http://127.0.0.1:$INGEST_HTTP_PORT" --api-key pulse-dev-key \
      --rate "$LOADGEN_RATE" --duration 0
    log "loadgen sending ~$LOADGEN_RATE events/s (log: $STATE/logs/loadgen.log)"
  fi

  local ap_ingest ap_proc ap_wc ap_wp ap_q ap_sr
  ap_ingest=$(admin_port ingest); ap_proc=$(admin_port processor); ap_wc=$(admin_port writer-clickhouse)
  ap_wp=$(admin_port writer-parquet); ap_q=$(admin_port query-api); ap_sr=$(admin_port schema-registry)
  cat <<TXT

Pulse is up. State, data and logs: $STATE

  Dashboard           http://127.0.0.1:$QUERY_HTTP_PORT/#token=pulse-dev-token
  Query API           http://127.0.0.1:$QUERY_HTTP_PORT/v1/...  gRPC 127.0.0.1:$QUERY_GRPC_PORT  (token: pulse-dev-token)
    try: curl -s -H 'Authorization: Bearer pulse-dev-token' 'http://127.0.0.1:$QUERY_HTTP_PORT/v1/active_users?step=1m'
         curl -s -H 'Authorization: Bearer pulse-dev-token' http://127.0.0.1:$QUERY_HTTP_PORT/v1/freshness
         (API description: http://127.0.0.1:$QUERY_HTTP_PORT/openapi.json)
  Ingest              http://127.0.0.1:$INGEST_HTTP_PORT/v1/events, gRPC 127.0.0.1:$INGEST_GRPC_PORT  (API key: pulse-dev-key)
    try: curl -s http://127.0.0.1:$INGEST_HTTP_PORT/v1/events -H 'Authorization: Bearer pulse-dev-key' -H 'Content-Type: application/json' \\
           -d '{"schema_version":1,"event_type":"page_view","key":{"user_id":"u-1"},"payload":{"page":"/"},"metadata":{"event_timestamp":'\$(date +%s000)'}}'
  Schema registry     http://127.0.0.1:$SR_PORT/subjects
  Kafka API (Tansu)   127.0.0.1:$KAFKA_PORT      (dead letters: $BIN_DIR/pulsectl dlq inspect)
  ClickHouse HTTP     http://127.0.0.1:$CH_HTTP_PORT  database 'pulse'
    try: curl 'http://127.0.0.1:$CH_HTTP_PORT/?query=SELECT+count()+FROM+pulse.events+FINAL'
  S3 (s3s-fs)         http://127.0.0.1:$S3_PORT  bucket '$S3_BUCKET' (Parquet archive under events/)
  Metrics             http://127.0.0.1:{$ap_ingest ingest, $ap_proc processor, $ap_wc writer-clickhouse,
                      $ap_wp writer-parquet, $ap_q query-api, $ap_sr schema-registry}/metrics (also /livez, /readyz)
  SLIs                $BIN_DIR/pulsectl slo --metrics ingest=http://127.0.0.1:$ap_ingest/metrics,writer=http://127.0.0.1:$ap_wc/metrics

Logs:   scripts/dev.sh logs [name]  (files in $STATE/logs)
Status: scripts/dev.sh status
Stop:   scripts/dev.sh down
TXT
}

down() {
  local spec name i
  stop_proc "$STATE" loadgen
  for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
    name="${SERVICES[$i]%%:*}"
    stop_proc "$STATE" "$name"
  done
  stack_stop "$STATE" s3 clickhouse kafka
  log "stopped; data kept in $STATE (remove it for a clean start)"
}

# broker_health PORT: "ok", or why the broker fails a real request. A TCP connect is not
# enough: a stalled broker, or Tansu after its storage task panicked, accepts connections
# and fails every request. This creates (once) and produces one record to `_pulse_health`
# with a 10 s deadline, through PyPI's confluent-kafka in the cache's venv.
broker_health() {
  timeout 20 "$PULSE_CACHE/venv/bin/python" - "$1" <<'PY' 2>/dev/null || echo "no answer within 20 s"
import sys
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
bootstrap = f"127.0.0.1:{sys.argv[1]}"
try:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    if "_pulse_health" not in admin.list_topics(timeout=10).topics:
        for f in admin.create_topics([NewTopic("_pulse_health", 1, 1)]).values():
            try:
                f.result(10)
            except Exception as e:  # already created by a concurrent check
                if "TOPIC_ALREADY_EXISTS" not in str(e):
                    raise
    outcome = []
    p = Producer({"bootstrap.servers": bootstrap, "message.timeout.ms": 10000})
    p.produce("_pulse_health", b"ping", on_delivery=lambda err, msg: outcome.append(err))
    p.flush(15)
    if not outcome:
        print("produce not acknowledged within 10 s")
    elif outcome[0] is not None:
        print(f"produce failed: {outcome[0]}")
    else:
        print("ok")
except Exception as e:
    print(f"request failed: {e}")
PY
}

# service_health ADMIN_PORT: "ready", or /readyz's reason.
service_health() {
  local body code
  body=$(curl -s -m 3 -w '\n%{http_code}' "http://127.0.0.1:$1/readyz" 2>/dev/null) || { echo "admin port $1 not answering"; return; }
  code=${body##*$'\n'}
  body=${body%$'\n'*}
  if [ "$code" = 200 ]; then echo ready; else echo "not ready ($code): ${body//$'\n'/ }"; fi
}

status() {
  local name pidfile spec health rc=0
  printf '%-20s %-9s %-8s %s\n' NAME STATE PID HEALTH
  for name in "${BACKING[@]}" $(printf '%s\n' "${SERVICES[@]}" | cut -d: -f1) loadgen; do
    pidfile="$STATE/pids/$name.pid"
    if is_running "$STATE" "$name"; then
      health=-
      if [ "$name" = kafka ]; then
        health=$(broker_health "$KAFKA_PORT")
      else
        for spec in "${SERVICES[@]}"; do
          [ "${spec%%:*}" = "$name" ] || continue
          IFS=: read -r _ _ port _ <<<"$spec"
          health=$(service_health "$port")
        done
      fi
      case "$health" in -|ok|ready) ;; *) rc=1 ;; esac
      printf '%-20s %-9s %-8s %s\n' "$name" running "$(cat "$pidfile")" "$health"
    else
      printf '%-20s %-9s %-8s %s\n' "$name" stopped - -
    fi
  done
  return "$rc"
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
