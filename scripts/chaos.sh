#!/usr/bin/env bash
# The chaos suite (README, Chaos): the whole platform (scripts/dev.sh up, debug binaries,
# its own state folder and free ports) under a seeded loadgen workload while services are
# killed and restarted, the broker is paused and restarted, ClickHouse is paused and
# stopped, S3 is stopped; then every accepted event is reconciled against ClickHouse, the
# Parquet archive, the DLQ, the late topic and the query API's aggregates.
#   scripts/chaos.sh                 quick profile (scripts/test.sh runs it; ~4-5 min)
#   scripts/chaos.sh --soak          every fault, three rounds (~15-20 min)
#   scripts/chaos.sh --seed N        replay a run's faults and workload (the seed is printed)
#   scripts/chaos.sh --keep          keep the state folder (logs, data) even on success
#   scripts/chaos.sh --plan --seed N print the faults a seed injects, in order (no platform)
#   scripts/chaos.sh --faults broker-stall,kill-ingest   only these faults (names: --help of
#                                    tests/python/chaos.py)
# Needs `cargo build --bins` first (scripts/test.sh does it); exits 1 naming each failed check.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
source "$REPO/scripts/lib.sh"

args=()
plan=0
while [ $# -gt 0 ]; do
  case "$1" in
    --soak) args+=(--profile soak) ;;
    --quick) args+=(--profile quick) ;;
    --seed) args+=(--seed "${2:?--seed needs a number}"); shift ;;
    --rate) args+=(--rate "${2:?--rate needs a number}"); shift ;;
    --keep) args+=(--keep) ;;
    --faults) args+=(--faults "${2:?--faults needs a list}"); shift ;;
    --plan) args+=(--plan); plan=1 ;;
    *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
  esac
  shift
done

[ "$plan" = 0 ] || exec python3 "$REPO/tests/python/chaos.py" "${args[@]}"
for bin in pulse-ingest pulse-processor pulse-writer pulse-query-api pulse-schema-registry pulsectl; do
  [ -x "$CARGO_TARGET_DIR/debug/$bin" ] || die "$CARGO_TARGET_DIR/debug/$bin is missing: run cargo build --bins"
done
bash "$REPO/scripts/install-deps.sh" >/dev/null 2>&1 || die "scripts/install-deps.sh failed"
exec "$PULSE_CACHE/venv/bin/python" "$REPO/tests/python/chaos.py" "${args[@]}"
