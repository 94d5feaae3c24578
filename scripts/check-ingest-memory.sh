#!/usr/bin/env bash
# Bounded memory under a hostile body (#15 defect 6), on the real pulse-ingest binary:
# starts its own Tansu, schema registry and ingest, posts three 8 KB gzip requests that
# inflate to just under --max-decompressed-bytes (8 MiB) of `[0,0,0,…]` — four million
# tiny events — and checks each is refused (413) and that ingest's peak RSS (VmHWM) grew
# by less than PULSE_MEMORY_LIMIT_MIB (default 16: the one 8 MiB buffer and room). Measured
# on debug binaries: before the fix the peak went from 27 to 331 MiB (4.4 s of CPU for the
# three requests); after it, from 28 to 36 MiB (0.18 s). Under jemalloc (ingest's allocator
# since) `read_to_end`'s doubling made it +32 MiB (a CI run failed on it); inflating into one
# buffer sized by the gzip trailer and capped at the limit (`body::inflate`): +8 MiB, both
# measured twice, alternating, on 2026-12-07. ~15 s. Run by scripts/test.sh; needs the binaries in
# $CARGO_TARGET_DIR/debug (cargo build --bins) and the tools of scripts/install-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/stack.sh

BIN="$CARGO_TARGET_DIR/debug"
LIMIT_MIB="${PULSE_MEMORY_LIMIT_MIB:-16}"
ST=$(mktemp -d "${TMPDIR:-/tmp}/pulse-memory.XXXXXX")
cleanup() {
  local rc=$1
  trap - EXIT INT TERM
  stack_stop "$ST" ingest schema-registry kafka >/dev/null 2>&1 || true
  if [ "$rc" -ne 0 ]; then log "logs kept in $ST/logs"; else rm -rf "$ST"; fi
  exit "$rc"
}
trap_cleanup cleanup

KP=$(free_port); SRP=$(free_port); IP=$(free_port)
start_kafka "$ST" "$KP"
export PULSE_KAFKA_BROKERS="127.0.0.1:$KP" PULSE_SCHEMA_REGISTRY_URL="http://127.0.0.1:$SRP"
# One local broker: one replica per topic (the defaults, 3 and 2, need three brokers).
export PULSE_KAFKA_REPLICATION_FACTOR=1 PULSE_KAFKA_MIN_INSYNC_REPLICAS=1
"$BIN/pulsectl" topics create >/dev/null
start_proc "$ST" schema-registry env PULSE_SCHEMA_REGISTRY_ADDR="127.0.0.1:$SRP" \
  PULSE_ADMIN_ADDR="127.0.0.1:$(free_port)" "$BIN/pulse-schema-registry"
wait_port 127.0.0.1 "$SRP" "schema registry" 60 || die "the registry did not start; see $ST/logs"
"$BIN/pulsectl" schemas register >/dev/null
start_proc "$ST" ingest env PULSE_INGEST_HTTP_ADDR="127.0.0.1:$IP" \
  PULSE_INGEST_GRPC_ADDR="127.0.0.1:$(free_port)" PULSE_ADMIN_ADDR="127.0.0.1:$(free_port)" \
  PULSE_INGEST_API_KEYS=memory-key=memory PULSE_INGEST_PII_HMAC_KEY=memory "$BIN/pulse-ingest"
wait_port 127.0.0.1 "$IP" ingest 60 || die "ingest did not start; see $ST/logs"
pid=$(cat "$ST/pids/ingest.pid")
python3 -c 'import gzip, sys; sys.stdout.buffer.write(gzip.compress(b"[" + b"0," * (4 * 1024 * 1024 - 2) + b"0]", 9))' >"$ST/body.gz"

hwm() { awk '/^VmHWM/ {print $2}' "/proc/$pid/status"; }
cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
before=$(hwm); cpu0=$(cpu)
for i in 1 2 3; do
  code=$(curl -s -m 60 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$IP/v1/events" \
    -H 'Authorization: Bearer memory-key' -H 'Content-Type: application/json' \
    -H 'Content-Encoding: gzip' --data-binary @"$ST/body.gz")
  [ "$code" = 413 ] || die "request $i: want 413 (too many events), got $code"
done
after=$(hwm); cpu1=$(cpu)
grew=$(( (after - before) / 1024 ))
log "ingest peak RSS $((before / 1024)) -> $((after / 1024)) MiB (+$grew MiB) and $(( (cpu1 - cpu0) * 10 )) ms of CPU for three $(stat -c %s "$ST/body.gz")-byte requests of 4M events"
[ "$grew" -lt "$LIMIT_MIB" ] || die "ingest's peak RSS grew by $grew MiB (limit $LIMIT_MIB MiB)"
