#!/usr/bin/env bash
# The local Pulse platform.
#   scripts/dev.sh up       install what is missing, start Kafka API (Tansu, with a
#                           supervisor that restarts it when it fails its probe: stack.sh),
#                           ClickHouse and S3 (s3s-fs), create topics, build and start the
#                           Pulse services, then Prometheus (rules of deploy/prometheus) and
#                           Alertmanager
#   scripts/dev.sh down     stop exactly what `up` started (by recorded pid)
#   scripts/dev.sh status   what runs, with pids and health (the broker by a real produce,
#                           each service by its /readyz); exits 1 if anything is unhealthy
#   scripts/dev.sh logs [NAME]  follow the logs (all, or one of: kafka clickhouse s3 ingest
#                           processor writer-clickhouse writer-parquet query-api schema-registry
#                           loadgen prometheus alertmanager kafka-supervisor)
# Everything lives in $PULSE_STATE (default: .pulse/ in the checkout). `up` is safe to
# run again: what runs is left running. Every port can be moved with an environment
# variable (README, Ports); PULSE_DEV_PROFILE=debug runs debug binaries, PULSE_DEV_BUILD=0
# skips the build, PULSE_DEV_LOADGEN=0 skips the synthetic workload (the end-to-end test
# uses all three). The schema registry refuses anonymous callers: `up` makes its users once
# per state folder (passwords in $PULSE_STATE/registry-auth/, README, Local stack);
# PULSE_DEV_REGISTRY_AUTH=0 runs it without users (anonymous writes: local experiments only).
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
PROM_PORT="${PULSE_PROMETHEUS_PORT:-9090}"
AM_PORT="${PULSE_ALERTMANAGER_PORT:-9093}"
# Prometheus scrapes and evaluates rules every PROM_INTERVAL; it loads every *.rules.yaml of
# PROM_RULES. Alertmanager runs AM_CONFIG if given, else a generated config that routes to
# PULSE_ALERTMANAGER_WEBHOOK_URL (when set) or to no receiver (alerts in its UI only).
PROM_INTERVAL="${PULSE_PROMETHEUS_INTERVAL:-15s}"
PROM_RULES="${PULSE_PROMETHEUS_RULES:-$REPO/deploy/prometheus/rules}"
AM_CONFIG="${PULSE_ALERTMANAGER_CONFIG:-}"
PROFILE="${PULSE_DEV_PROFILE:-release}"
LOADGEN_RATE="${PULSE_DEV_LOADGEN_RATE:-20}"
# The schema registry's users (registry_credentials below); 0: anonymous registry.
REGISTRY_AUTH="${PULSE_DEV_REGISTRY_AUTH:-1}"
REGISTRY_AUTH_DIR="$STATE/registry-auth"
case "$REGISTRY_AUTH" in
  0|1) ;;
  *) die "PULSE_DEV_REGISTRY_AUTH must be 1 (the registry needs credentials) or 0 (anonymous), not '$REGISTRY_AUTH'" ;;
esac

BACKING=(kafka clickhouse s3)
# name:binary:admin-port[:extra args]
SERVICES=(
  "schema-registry:pulse-schema-registry:${PULSE_SCHEMA_REGISTRY_ADMIN_PORT:-9105}"
  "ingest:pulse-ingest:${PULSE_INGEST_ADMIN_PORT:-9101}"
  "processor:pulse-processor:${PULSE_PROCESSOR_ADMIN_PORT:-9102}"
  "writer-clickhouse:pulse-writer:${PULSE_WRITER_CLICKHOUSE_ADMIN_PORT:-9103}:--sink clickhouse"
  "writer-parquet:pulse-writer:${PULSE_WRITER_PARQUET_ADMIN_PORT:-9106}:--sink parquet"
  "query-api:pulse-query-api:${PULSE_QUERY_ADMIN_PORT:-9104}"
  "ledger:pulsectl:${PULSE_LEDGER_ADMIN_PORT:-9107}:ledger watch --query-url http://127.0.0.1:$QUERY_HTTP_PORT"
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

# registry_credentials: the schema registry's two users, made on the first `up` of a state
# folder and reused by every later one (a restart never changes a password): a random
# password per user in REGISTRY_AUTH_DIR/<user>.password (mode 600; pulse-read may look
# schemas up, pulse-write may also register, delete and change config), and the registry's
# users file REGISTRY_AUTH_DIR/users (name:role:argon2id-hash lines from `pulse-schema-registry
# hash-password`), rewritten only when it is missing or older than a password file.
registry_credentials() {
  local user role pw users="$REGISTRY_AUTH_DIR/users" old_umask
  old_umask=$(umask)
  umask 077
  mkdir -p "$REGISTRY_AUTH_DIR" && chmod 700 "$REGISTRY_AUTH_DIR" \
    || die "cannot make $REGISTRY_AUTH_DIR for the registry's credentials"
  for user in pulse-read pulse-write; do
    [ -s "$REGISTRY_AUTH_DIR/$user.password" ] && continue
    pw=$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')
    [ "${#pw}" = 48 ] || die "could not read 24 random bytes from /dev/urandom"
    printf '%s\n' "$pw" > "$REGISTRY_AUTH_DIR/$user.password.new" \
      && mv "$REGISTRY_AUTH_DIR/$user.password.new" "$REGISTRY_AUTH_DIR/$user.password" \
      || die "cannot write $REGISTRY_AUTH_DIR/$user.password"
    log "schema registry: new random password for $user in $REGISTRY_AUTH_DIR/$user.password"
  done
  if [ ! -s "$users" ] || [ "$REGISTRY_AUTH_DIR/pulse-read.password" -nt "$users" ] \
    || [ "$REGISTRY_AUTH_DIR/pulse-write.password" -nt "$users" ]; then
    echo "# The local schema registry's users, made by scripts/dev.sh up from the *.password files beside it." > "$users.new" \
      || die "cannot write $users.new"
    for user in pulse-read:read pulse-write:write; do
      role=${user#*:} user=${user%%:*}
      "$BIN_DIR/pulse-schema-registry" hash-password --user "$user" --role "$role" \
        < "$REGISTRY_AUTH_DIR/$user.password" >> "$users.new" \
        || die "pulse-schema-registry hash-password failed for $user ($BIN_DIR/pulse-schema-registry)"
    done
    mv "$users.new" "$users" || die "cannot write $users"
    log "schema registry: users pulse-read (read) and pulse-write (write) in $users"
  else
    log "schema registry: users pulse-read and pulse-write of an earlier up (passwords unchanged) in $REGISTRY_AUTH_DIR"
  fi
  umask "$old_umask"
}

# registry_user_env USER: sets REG_ENV to the client settings of registry user USER
# (PULSE_REGISTRY_USERNAME, PULSE_REGISTRY_PASSWORD_FILE); empty with PULSE_DEV_REGISTRY_AUTH=0.
registry_user_env() {
  REG_ENV=()
  [ "$REGISTRY_AUTH" = 1 ] || return 0
  REG_ENV=(PULSE_REGISTRY_USERNAME="$1" PULSE_REGISTRY_PASSWORD_FILE="$REGISTRY_AUTH_DIR/$1.password")
}

# registry_env NAME: sets REG_ENV to what service NAME needs of the registry's auth: its
# users file for the registry, the read user for ingest and the processor (they look their
# schemas up, never register), nothing for the others (they never call the registry).
registry_env() {
  REG_ENV=()
  [ "$REGISTRY_AUTH" = 1 ] || return 0
  case "$1" in
    schema-registry) REG_ENV=(PULSE_REGISTRY_AUTH_FILE="$REGISTRY_AUTH_DIR/users") ;;
    ingest|processor) registry_user_env pulse-read ;;
  esac
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

# prometheus_config FILE: scrapes every service's admin port (each target labelled with its
# `component`, the name the Helm chart uses too; the rules match on it, never on `job`),
# loads PROM_RULES and sends alerts to the local Alertmanager.
prometheus_config() {
  local spec name port timeout=10s
  # The scrape timeout may not exceed the interval (whole seconds below 10 s, e.g. tests' 1s).
  [[ "$PROM_INTERVAL" =~ ^[1-9]s$ ]] && timeout=$PROM_INTERVAL
  {
    cat <<YAML
# Generated by scripts/dev.sh up; edit the script, not this file.
# rules: $(cat "$PROM_RULES"/*.rules.yaml | sha256sum | cut -c1-16) (a rule change makes \`up\` reload)
global:
  scrape_interval: $PROM_INTERVAL
  scrape_timeout: $timeout
  evaluation_interval: $PROM_INTERVAL
  external_labels:
    environment: local
rule_files:
  - $PROM_RULES/*.rules.yaml
alerting:
  alertmanagers:
    - static_configs:
        - targets: ["127.0.0.1:$AM_PORT"]
scrape_configs:
  - job_name: pulse
    static_configs:
YAML
    for spec in "${SERVICES[@]}"; do
      IFS=: read -r name _ port _ <<<"$spec"
      printf '      - targets: ["127.0.0.1:%s"]\n        labels: {component: %s, pulse_release: local}\n' "$port" "$name"
    done
    cat <<YAML
  - job_name: prometheus
    static_configs:
      - targets: ["127.0.0.1:$PROM_PORT"]
  - job_name: alertmanager
    static_configs:
      - targets: ["127.0.0.1:$AM_PORT"]
YAML
  } > "$1"
}

# alertmanager_config FILE: one route; a webhook receiver when PULSE_ALERTMANAGER_WEBHOOK_URL
# is set (resolved alerts too), else a receiver without notifiers.
alertmanager_config() {
  {
    cat <<YAML
# Generated by scripts/dev.sh up; set PULSE_ALERTMANAGER_CONFIG to use your own file.
route:
  receiver: local
  group_by: [alertname, component]
  group_wait: 10s
  group_interval: 1m
  repeat_interval: 4h
receivers:
  - name: local
YAML
    if [ -n "${PULSE_ALERTMANAGER_WEBHOOK_URL:-}" ]; then
      printf '    webhook_configs:\n      - url: "%s"\n        send_resolved: true\n' "$PULSE_ALERTMANAGER_WEBHOOK_URL"
    fi
  } > "$1"
}

# start_monitoring: Alertmanager, then Prometheus (after the services, so the first scrapes
# find them). Already running: each reloads only when its config (or a rule) changed.
start_monitoring() {
  local am_config=$AM_CONFIG prom_config="$STATE/prometheus.yml"
  if [ -z "$am_config" ]; then
    am_config="$STATE/alertmanager.yml"
    alertmanager_config "$am_config"
  fi
  [ -d "$PROM_RULES" ] || die "PULSE_PROMETHEUS_RULES: $PROM_RULES is not a folder"
  promtool check rules "$PROM_RULES"/*.rules.yaml >/dev/null \
    || die "the rules in $PROM_RULES do not load (promtool check rules $PROM_RULES/*.rules.yaml)"
  prometheus_config "$prom_config.new"
  if ! is_running "$STATE" alertmanager; then
    cp "$am_config" "$STATE/alertmanager.loaded.yml"
    start_alertmanager "$STATE" "$AM_PORT" "$am_config"
  elif ! cmp -s "$am_config" "$STATE/alertmanager.loaded.yml"; then
    cp "$am_config" "$STATE/alertmanager.loaded.yml"
    curl -sf -X POST "http://127.0.0.1:$AM_PORT/-/reload" >/dev/null \
      || die "Alertmanager did not reload $am_config; see $STATE/logs/alertmanager.log"
    log "Alertmanager reloaded $am_config"
  fi
  if ! is_running "$STATE" prometheus; then
    mv "$prom_config.new" "$prom_config"
    start_prometheus "$STATE" "$PROM_PORT" "$prom_config"
  elif cmp -s "$prom_config.new" "$prom_config"; then
    # Unchanged: no reload. A reload restarts Alertmanager discovery, and notifications
    # sent meanwhile (e.g. a just-resolved alert) are dropped until the next resend (1 min).
    rm -f "$prom_config.new"
    log "Prometheus already running (config unchanged)"
  else
    mv "$prom_config.new" "$prom_config"
    curl -sf -X POST "http://127.0.0.1:$PROM_PORT/-/reload" >/dev/null \
      || die "Prometheus did not reload $prom_config; see $STATE/logs/prometheus.log"
    log "Prometheus reloaded $prom_config"
  fi
}

# monitoring_health PORT: "ready", or why not (Prometheus and Alertmanager: /-/ready).
monitoring_health() {
  local code
  code=$(curl -s -m 3 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1/-/ready" 2>/dev/null) || true
  if [ "$code" = 200 ]; then echo ready; else echo "not ready (${code:-no answer} on port $1)"; fi
}

# step_took N WHAT T0: remembers that step N (WHAT) took from T0 until now; `up` lists the
# times before its banner, so each run shows what its steps really cost on this machine.
STEP_TIMES=()
step_took() { STEP_TIMES+=("$1 $2 $(( (SECONDS - $3) / 60 )) min $(( (SECONDS - $3) % 60 )) s"); }

up() {
  local t_step=$SECONDS
  log "step 1/5: tools (scripts/install-deps.sh): Debian packages, the broker (Tansu) and S3 server (s3s-fs) built from crates.io, a Python venv; each says whether it is cached or being built, and how long that takes (all cached: seconds; the first time ~40 min on 2 cores, measured: Tansu 32 min, s3s-fs 5 min, cargo-machete 2.5 min)"
  bash "$REPO/scripts/install-deps.sh"
  step_took 1 tools "$t_step"; t_step=$SECONDS
  log "step 2/5: backing services: Kafka API (Tansu), ClickHouse and S3 (s3s-fs) under $STATE, each started and waited for until it answers (seconds: 1-2 s measured)"
  mkdir -p "$STATE/logs" "$STATE/pids"
  for pair in "kafka:$KAFKA_PORT" "clickhouse:$CH_HTTP_PORT" "s3:$S3_PORT" \
    "prometheus:$PROM_PORT" "alertmanager:$AM_PORT"; do
    port_owned_by_other "${pair#*:}" "${pair%%:*}" \
      && die "port ${pair#*:} is in use by another process; free it or set the PULSE_*_PORT variables (README, Ports)"
  done
  start_kafka "$STATE" "$KAFKA_PORT"
  start_kafka_supervisor "$STATE" "$KAFKA_PORT"
  start_clickhouse "$STATE" "$CH_HTTP_PORT" "$CH_TCP_PORT"
  start_s3 "$STATE" "$S3_PORT"

  step_took 2 "backing services" "$t_step"; t_step=$SECONDS
  if [ "${PULSE_DEV_BUILD:-1}" = 1 ]; then
    local flags=(--quiet --bins) t0=$SECONDS
    [ "$PROFILE" = release ] && flags+=(--release)
    if [ -x "$BIN_DIR/pulse-ingest" ] && [ -x "$BIN_DIR/pulsectl" ]; then
      log "step 3/5: building the Pulse services and pulsectl ($PROFILE profile, $BIN_DIR): incremental, only what changed since the last build (nothing changed: seconds; a change in a shared crate: a few minutes)"
    else
      log "step 3/5: building the Pulse services and pulsectl ($PROFILE profile, $BIN_DIR): the first $PROFILE build compiles every dependency (librdkafka from its C sources, Arrow/Parquet, tonic; expect 15-30 min on 2 cores; release: 28 min measured while other builds shared them), later runs rebuild only what changed"
    fi
    (cd "$REPO" && cargo build "${flags[@]}") || die "cargo build failed"
    log "Pulse binaries ready in $BIN_DIR (build took $(( (SECONDS - t0) / 60 )) min $(( (SECONDS - t0) % 60 )) s)"
  else
    log "step 3/5: build skipped (PULSE_DEV_BUILD=0; 0 s): using the binaries in $BIN_DIR"
  fi
  step_took 3 build "$t_step"; t_step=$SECONDS
  log "step 4/5: topics, ClickHouse migrations, then the Pulse services (schema registry first, then ingest, processor, writers, query API, ledger), each waited for until /readyz answers (seconds: 5-7 s measured with debug binaries on a fresh state)"

  export PULSE_KAFKA_BROKERS="127.0.0.1:$KAFKA_PORT"
  export PULSE_CLICKHOUSE_URL="http://127.0.0.1:$CH_HTTP_PORT"
  export PULSE_S3_ENDPOINT="http://127.0.0.1:$S3_PORT"
  export PULSE_S3_BUCKET="$S3_BUCKET" PULSE_S3_ACCESS_KEY="$S3_ACCESS_KEY" PULSE_S3_SECRET_KEY="$S3_SECRET_KEY"
  # One local broker: one replica per topic (the defaults, 3 and 2, need three brokers);
  # topics of an older dev stack that differ (e.g. no retention set) are reported, not fatal.
  export PULSE_KAFKA_REPLICATION_FACTOR=1 PULSE_KAFKA_MIN_INSYNC_REPLICAS=1
  "$BIN_DIR/pulsectl" topics create --allow-drift || die "creating topics failed"

  # Dev-only secrets, documented in the README; never use them elsewhere.
  export PULSE_INGEST_API_KEYS="${PULSE_INGEST_API_KEYS:-pulse-dev-key=dev}"
  export PULSE_INGEST_PII_HMAC_KEY="${PULSE_INGEST_PII_HMAC_KEY:-pulse-dev-hmac-key}"
  # The local stack takes event times up to 10 years back (ingest's own default is 7 days),
  # so the README's reference event, dated 2026-06-04, is accepted as written; it is late
  # for the processor (late topic), and stored in ClickHouse and the archive.
  export PULSE_INGEST_MAX_AGE_MS="${PULSE_INGEST_MAX_AGE_MS:-315360000000}"
  export PULSE_SCHEMA_REGISTRY_URL="http://127.0.0.1:$SR_PORT"
  export PULSE_SCHEMA_REGISTRY_ADDR="127.0.0.1:$SR_PORT"
  export PULSE_INGEST_HTTP_ADDR="127.0.0.1:$INGEST_HTTP_PORT" PULSE_INGEST_GRPC_ADDR="127.0.0.1:$INGEST_GRPC_PORT"
  export PULSE_QUERY_HTTP_ADDR="127.0.0.1:$QUERY_HTTP_PORT" PULSE_QUERY_GRPC_ADDR="127.0.0.1:$QUERY_GRPC_PORT"
  export PULSE_QUERY_API_TOKENS="${PULSE_QUERY_API_TOKENS:-pulse-dev-token}"
  "$BIN_DIR/pulsectl" migrate >/dev/null || die "applying the ClickHouse migrations failed"

  if [ "$REGISTRY_AUTH" = 1 ]; then
    registry_credentials
  else
    log "PULSE_DEV_REGISTRY_AUTH=0: the schema registry runs without users (anyone may register, delete and change config)"
  fi

  local spec name bin port extra
  # The registry first: the other services need Pulse's schemas registered.
  for spec in "${SERVICES[@]}"; do
    IFS=: read -r name bin port extra <<<"$spec"
    registry_env "$name"
    # shellcheck disable=SC2086 # extra holds separate arguments
    start_proc "$STATE" "$name" env "${REG_ENV[@]}" PULSE_ADMIN_ADDR="127.0.0.1:$port" "$BIN_DIR/$bin" $extra
    if [ "$name" = schema-registry ]; then
      wait_ready "$name" "$port"
      # Registering writes: the write user.
      registry_user_env pulse-write
      env "${REG_ENV[@]}" "$BIN_DIR/pulsectl" schemas register \
        || die "registering Pulse's schemas failed; see $STATE/logs/schema-registry.log"
    fi
  done
  for spec in "${SERVICES[@]}"; do
    IFS=: read -r name bin port extra <<<"$spec"
    wait_ready "$name" "$port"
  done
  step_took 4 services "$t_step"; t_step=$SECONDS
  log "step 5/5: Prometheus and Alertmanager (rules of $PROM_RULES; seconds: 1-2 s measured)"
  start_monitoring
  step_took 5 monitoring "$t_step"
  log "steps took: $(IFS=,; echo "${STEP_TIMES[*]}" | sed 's/,/, /g')"

  if [ "${PULSE_DEV_LOADGEN:-1}" = 1 ] && ! is_running "$STATE" loadgen; then
    # A live synthetic workload: users browsing, buying in several currencies, with a few
    # out-of-order, late, duplicate and malformed events (README, pulsectl loadgen).
    # The API key from the environment (a secret is never a process argument).
    PULSE_API_KEY=pulse-dev-key start_proc "$STATE" loadgen "$BIN_DIR/pulsectl" loadgen \
      --target "http://127.0.0.1:$INGEST_HTTP_PORT" \
      --rate "$LOADGEN_RATE" --duration 0
    log "loadgen sending ~$LOADGEN_RATE events/s (log: $STATE/logs/loadgen.log)"
  fi

  local ap_ingest ap_proc ap_wc ap_wp ap_q ap_sr ap_ledger
  ap_ingest=$(admin_port ingest); ap_proc=$(admin_port processor); ap_wc=$(admin_port writer-clickhouse)
  ap_wp=$(admin_port writer-parquet); ap_q=$(admin_port query-api); ap_sr=$(admin_port schema-registry)
  ap_ledger=$(admin_port ledger)
  local sr_auth="(anonymous: PULSE_DEV_REGISTRY_AUTH=0)"
  local sr_try="curl -s http://127.0.0.1:$SR_PORT/subjects"
  if [ "$REGISTRY_AUTH" = 1 ]; then
    sr_auth="(HTTP basic auth: users pulse-read, pulse-write; passwords in $REGISTRY_AUTH_DIR/<user>.password)"
    sr_try="curl -s -u \"pulse-read:\$(cat '$REGISTRY_AUTH_DIR/pulse-read.password')\" http://127.0.0.1:$SR_PORT/subjects"
  fi
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
  Schema registry     http://127.0.0.1:$SR_PORT/subjects  $sr_auth
    try: $sr_try
  Kafka API (Tansu)   127.0.0.1:$KAFKA_PORT      (dead letters: $BIN_DIR/pulsectl dlq inspect)
  ClickHouse HTTP     http://127.0.0.1:$CH_HTTP_PORT  database 'pulse'
    try: curl 'http://127.0.0.1:$CH_HTTP_PORT/?query=SELECT+count()+FROM+pulse.events+FINAL'
  S3 (s3s-fs)         http://127.0.0.1:$S3_PORT  bucket '$S3_BUCKET' (Parquet archive under events/)
  Metrics             http://127.0.0.1:{$ap_ingest ingest, $ap_proc processor, $ap_wc writer-clickhouse,
                      $ap_wp writer-parquet, $ap_q query-api, $ap_sr schema-registry}/metrics (also /livez, /readyz)
  Prometheus          http://127.0.0.1:$PROM_PORT  (rules: $PROM_RULES; alerts: http://127.0.0.1:$PROM_PORT/alerts)
  Alertmanager        http://127.0.0.1:$AM_PORT  (runbooks: docs/runbooks/)
  SLIs                $BIN_DIR/pulsectl slo --metrics ingest=http://127.0.0.1:$ap_ingest/metrics,writer=http://127.0.0.1:$ap_wc/metrics,query-api=http://127.0.0.1:$ap_q/metrics,ledger=http://127.0.0.1:$ap_ledger/metrics

Logs:   scripts/dev.sh logs [name]  (files in $STATE/logs)
Status: scripts/dev.sh status
Stop:   scripts/dev.sh down
TXT
}

down() {
  local spec name i
  stop_proc "$STATE" loadgen
  # The broker's supervisor first, so it does not restart the broker being stopped.
  stop_proc "$STATE" kafka-supervisor
  stop_proc "$STATE" prometheus
  stop_proc "$STATE" alertmanager
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
# with a 5 s deadline, and checks Tansu's group coordinator for a group waiting on a
# leader that is no longer a member (kafka_probe in stack.sh; the broker supervisor runs
# the same probe every few seconds).
broker_health() {
  kafka_probe "$1" "$STATE/kafka/tansu.db"
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
  local name pidfile spec health port rc=0
  printf '%-20s %-9s %-8s %s\n' NAME STATE PID HEALTH
  for name in "${BACKING[@]}" kafka-supervisor $(printf '%s\n' "${SERVICES[@]}" | cut -d: -f1) loadgen prometheus alertmanager; do
    pidfile="$STATE/pids/$name.pid"
    if is_running "$STATE" "$name"; then
      health=-
      if [ "$name" = kafka ]; then
        health=$(broker_health "$KAFKA_PORT")
      elif [ "$name" = prometheus ] || [ "$name" = alertmanager ]; then
        port=$PROM_PORT
        [ "$name" = alertmanager ] && port=$AM_PORT
        health=$(monitoring_health "$port")
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
  *) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
