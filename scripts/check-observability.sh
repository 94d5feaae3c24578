#!/usr/bin/env bash
# Pulse's alerting, end to end (issue 16), run by scripts/test.sh after the chart step:
#   1. static: promtool check/test of deploy/prometheus, severity/summary/runbook_url on
#      every alert, every runbook_url at an existing heading of docs/runbooks/, a promtool
#      case that fires and one that must not fire for every alert; every `by`/`on` of every
#      rule keeps `namespace` and `pulse_release`, and two Helm releases rendered into one
#      namespace label their series with their own `pulse_release`;
#   2. live: an isolated platform from `scripts/dev.sh up` (its own state folder, free
#      ports, debug binaries already built, PULSE_DEV_BUILD=0) with Prometheus scraping and
#      evaluating every second, the rules loaded from a test copy
#      (tests/python/observability_check.py prepare): the symptom alerts with every range
#      selector shortened to 15s and every `for:` to 3s; the SLO burn-rate alerts unchanged
#      but on a compressed clock (SLI windows of 10-20 s, `for:` 3s); the ledger alerts
#      shortened like the symptoms. An Alertmanager notifies a webhook receiver at once. Real
#      faults, one at a time, each followed by its recovery: stop writer-clickhouse while
#      loadgen sends events; stop the processor and the schema registry; kill ClickHouse
#      and the S3 server; stall ClickHouse (SIGSTOP, then SIGCONT) while dashboards query;
#      rename the ClickHouse events table away (and back); replace dev.sh's loadgen by one
#      sending only malformed and late events; restart ingest (1 request in flight), the
#      processor (1-byte state budget) and the query API (a certificate expiring in a day)
#      under load. Beside the faults, one not yet reconciled minute is corrupted in
#      ClickHouse (events deleted, a window's revenue raised). The matching alerts (listed
#      at the end of the run) must reach the webhook firing, then resolved.
#      Every metric name a rule uses must exist in the live Prometheus, and
#      tests/python/dashboards_check.py runs against the same Prometheus.
# Prints the time to fire and to resolve of each alert, and its own duration.
# PULSE_TEST_KEEP=1 keeps the state folder (logs, generated configs).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

started=$(date +%s)
script_start=$SECONDS
PY="$PULSE_CACHE/venv/bin/python"
CHECK=tests/python/observability_check.py
[ -x "$CARGO_TARGET_DIR/debug/pulse-ingest" ] || die "no debug binaries in $CARGO_TARGET_DIR/debug: run cargo build --bins"

"$PY" "$CHECK" static

ST=$(mktemp -d "${TMPDIR:-/tmp}/pulse-observability.XXXXXX")
export PULSE_STATE="$ST/platform"
cleanup() {
  local rc=$1
  trap - EXIT INT TERM
  local t0=$SECONDS
  bash scripts/dev.sh down >"$ST/down.log" 2>&1 || log "dev.sh down failed; see $PULSE_STATE/logs"
  # A process that ignores SIGTERM costs 20 s here: name it.
  grep -h "did not stop" "$ST/down.log" >&2 || true
  log "dev.sh down took $((SECONDS - t0)) s"
  if [ "$rc" -ne 0 ] || [ "${PULSE_TEST_KEEP:-0}" = 1 ]; then
    log "observability check: state and logs kept in $ST"
  else
    t0=$SECONDS
    rm -rf "$ST"
    log "state folder removed in $((SECONDS - t0)) s"
  fi
  log "observability check: $((SECONDS - script_start)) s in all"
  exit "$rc"
}
trap_cleanup cleanup

for v in KAFKA_PORT CLICKHOUSE_HTTP_PORT CLICKHOUSE_TCP_PORT S3_PORT SCHEMA_REGISTRY_PORT \
  INGEST_HTTP_PORT INGEST_GRPC_PORT QUERY_HTTP_PORT QUERY_GRPC_PORT SCHEMA_REGISTRY_ADMIN_PORT \
  INGEST_ADMIN_PORT PROCESSOR_ADMIN_PORT WRITER_CLICKHOUSE_ADMIN_PORT WRITER_PARQUET_ADMIN_PORT \
  QUERY_ADMIN_PORT LEDGER_ADMIN_PORT PROMETHEUS_PORT ALERTMANAGER_PORT; do
  export "PULSE_$v=$(free_port)"
done
WEBHOOK_PORT=$(free_port)
export PULSE_DEV_PROFILE=debug PULSE_DEV_BUILD=0
export PULSE_PROMETHEUS_INTERVAL=1s
export PULSE_PROMETHEUS_RULES="$ST/rules" PULSE_ALERTMANAGER_CONFIG="$ST/alertmanager.yml"
# Parquet rolls every 5 s (not 60 s), so the archive's metrics exist within the check.
export PULSE_WRITER_PARQUET_MAX_AGE_MS=5000
# The writers' breaker opens after 3 failed writes (not 8) and retries every 2 s at most
# (not 10 s, probing every 15 s), so a store outage opens it within seconds and recovery
# is seen soon after the store is back.
export PULSE_WRITER_BREAKER_FAILURES=3 PULSE_WRITER_BREAKER_PROBE_MS=2000 PULSE_WRITER_RETRY_MAX_MS=2000
# The ledger looks for closed minutes every 2 s (not 15 s) and counts a minute closed 30 s
# (not 2 min) after its end plus the allowed lateness, so the minute the check corrupts is
# reconciled within the run; consumer lag is refreshed from the broker every second.
export PULSE_LEDGER_INTERVAL=2s PULSE_LEDGER_SETTLE=30s PULSE_KAFKA_STATISTICS_INTERVAL_MS=1000

"$PY" "$CHECK" prepare "$ST" --window 15s --for 3s --webhook "http://127.0.0.1:$WEBHOOK_PORT/"
"$PY" "$CHECK" live --webhook-port "$WEBHOOK_PORT"

log "observability check passed in $(( $(date +%s) - started )) s"
