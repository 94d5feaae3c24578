#!/usr/bin/env bash
# Runs every test of the workspace against real backing services:
#   1. installs missing dependencies (scripts/install-deps.sh; a no-op when present),
#   2. starts its own Kafka API (Tansu), ClickHouse and S3 (s3s-fs) on free ports in a
#      temporary folder,
#   3. checks formatting and clippy, the crate layering, unused dependencies and the
#      scripts' signal handling (scripts/checks.sh), the Helm chart and compose file
#      (scripts/chart-test.sh), runs `cargo test --workspace`,
#   4. stops what it started, and exits non-zero on any failure.
# Options (environment): PULSE_TEST_LINT=0 skips fmt/clippy; PULSE_TEST_KEEP=1 keeps
# the temporary folder (logs, data) for inspection; extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/stack.sh

started=$(date +%s)
bash scripts/install-deps.sh

STATE=$(mktemp -d "${TMPDIR:-/tmp}/pulse-test.XXXXXX")
cleanup() {
  local rc=$1
  trap - EXIT INT TERM
  stack_stop "$STATE" schema-registry kafka clickhouse s3
  if [ "$rc" -ne 0 ] || [ "${PULSE_TEST_KEEP:-0}" = 1 ]; then
    log "state, data and logs kept in $STATE"
  else
    rm -rf "$STATE"
  fi
  exit "$rc"
}
trap_cleanup cleanup

KAFKA_PORT=$(free_port)
CH_HTTP_PORT=$(free_port)
CH_TCP_PORT=$(free_port)
S3_PORT=$(free_port)

log "starting backing services in $STATE"
start_kafka "$STATE" "$KAFKA_PORT"
start_clickhouse "$STATE" "$CH_HTTP_PORT" "$CH_TCP_PORT"
start_s3 "$STATE" "$S3_PORT"

export PULSE_TEST_KAFKA_BROKERS="127.0.0.1:$KAFKA_PORT"
export PULSE_TEST_CLICKHOUSE_URL="http://127.0.0.1:$CH_HTTP_PORT"
export PULSE_TEST_S3_ENDPOINT="http://127.0.0.1:$S3_PORT"
export PULSE_TEST_S3_BUCKET="$S3_BUCKET"
export PULSE_TEST_S3_ACCESS_KEY="$S3_ACCESS_KEY"
export PULSE_TEST_S3_SECRET_KEY="$S3_SECRET_KEY"
export PULSE_TEST_STATE="$STATE"
export PULSE_TEST_PYTHON="$PULSE_CACHE/venv/bin/python"

if [ "${PULSE_TEST_LINT:-1}" = 1 ]; then
  log "cargo fmt --check"
  cargo fmt --all -- --check || die "formatting differs: run cargo fmt --all"
  log "cargo clippy --workspace --all-targets -- -D warnings"
  cargo clippy --workspace --all-targets --quiet -- -D warnings || die "clippy found problems"
fi

bash scripts/checks.sh

# The service binaries first: some tests run them as child processes (e.g. SIGKILL tests).
log "cargo build --bins"
cargo build --quiet --bins

# The Helm chart, the Dockerfile and docker-compose.yml: lint, render, schemas, policies,
# bad values, every env name and flag against the binaries, and the chart's exact
# commands run against this script's broker, ClickHouse and S3 (scripts/chart-test.sh).
log "Helm chart and compose file (scripts/chart-test.sh)"
bash scripts/chart-test.sh
bash scripts/check-observability.sh  # alert rules, runbooks, and alerts that fire on real faults (its own platform)
log "chaos suite, quick profile: its own platform, faults, reconciliation (scripts/chaos.sh)"
bash scripts/chaos.sh

# Ingest's memory under a body of millions of tiny events (its own broker and registry).
log "ingest memory under a hostile body (scripts/check-ingest-memory.sh)"
bash scripts/check-ingest-memory.sh

# The benchmark table (issue #19): `scripts/bench.sh all` with the tiny profile on the debug
# build just made (every part with its own broker, ClickHouse or platform on free ports); the
# figures mean nothing, the check is that the table and its chart are produced.
log "benchmark table, tiny profile (scripts/bench.sh all --profile tiny)"
bench_started=$(date +%s)
bash scripts/bench.sh all --profile tiny --binaries debug --out "$STATE/bench" \
  || die "scripts/bench.sh all --profile tiny failed; see $STATE/bench/bench-all-<part>.log"
grep -q '^| freshness | ack → `/v1/users/{id}`, p95' "$STATE/bench/bench-all.md" \
  || die "the benchmark table $STATE/bench/bench-all.md has no freshness row"
[ "$(head -c 8 "$STATE/bench/bench-all.png" | od -An -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ] \
  || die "$STATE/bench/bench-all.png is not a PNG"
log "benchmark table and chart produced in $(( $(date +%s) - bench_started )) s"

log "cargo test --workspace"
cargo test --workspace "$@"

# Schema compatibility: register the protos of a baseline commit with a real registry,
# then check the working tree's protos against them (BACKWARD). The baseline is HEAD when
# proto/ has uncommitted changes, else HEAD~1 (so the last commit's change is checked);
# PULSE_SCHEMA_BASELINE overrides it.
log "schema compatibility check"
if [ -z "${PULSE_SCHEMA_BASELINE:-}" ]; then
  if git diff --quiet HEAD -- proto 2>/dev/null; then PULSE_SCHEMA_BASELINE=HEAD~1; else PULSE_SCHEMA_BASELINE=HEAD; fi
fi
SR_PORT=$(free_port)
start_proc "$STATE" schema-registry env PULSE_KAFKA_BROKERS="$PULSE_TEST_KAFKA_BROKERS" \
  PULSE_SCHEMAS_TOPIC=_schemas_check PULSE_SCHEMA_REGISTRY_ADDR="127.0.0.1:$SR_PORT" \
  PULSE_ADMIN_ADDR="127.0.0.1:$(free_port)" "$CARGO_TARGET_DIR/debug/pulse-schema-registry"
wait_port 127.0.0.1 "$SR_PORT" "schema registry" 60 || die "schema registry did not start; see $STATE/logs/schema-registry.log"
export PULSE_SCHEMA_REGISTRY_URL="http://127.0.0.1:$SR_PORT"
if git rev-parse --verify --quiet "$PULSE_SCHEMA_BASELINE^{commit}" >/dev/null \
  && git ls-tree -d --name-only "$PULSE_SCHEMA_BASELINE" proto | grep -q proto; then
  mkdir -p "$STATE/baseline"
  git archive "$PULSE_SCHEMA_BASELINE" proto | tar -x -C "$STATE/baseline"
  log "registering the schemas of $PULSE_SCHEMA_BASELINE ($(git rev-parse --short "$PULSE_SCHEMA_BASELINE"))"
  "$CARGO_TARGET_DIR/debug/pulsectl" schemas register --proto-dir "$STATE/baseline/proto"
else
  log "no baseline commit $PULSE_SCHEMA_BASELINE with proto/; checking registration only"
fi
"$CARGO_TARGET_DIR/debug/pulsectl" schemas check \
  || die "a proto change breaks BACKWARD compatibility with $PULSE_SCHEMA_BASELINE (reasons above)"
"$CARGO_TARGET_DIR/debug/pulsectl" schemas register
stop_proc "$STATE" schema-registry

log "all tests passed in $(( $(date +%s) - started )) s"
