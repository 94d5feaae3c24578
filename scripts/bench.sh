#!/usr/bin/env bash
# Benchmarks against a throwaway broker:
#   scripts/bench.sh ingest [bench-ingest args]       HTTP and gRPC ingest vs a raw producer
#   scripts/bench.sh ingest --process [bench-ingest args]  the real pulse-ingest binary in its
#                                                     own process (and a schema registry):
#                                                     events per CPU-second of that process
#                                                     for JSON, NDJSON, gzip and gRPC batches
#                                                     beside the floor (parse + validate +
#                                                     encode in a loop); PULSE_BENCH_INGEST_BIN
#                                                     picks another pulse-ingest binary
#   scripts/bench.sh processor [bench-processor args] windowing core; processor loop vs a raw consumer
#   scripts/bench.sh writer [bench-writer args]       Parquet encoding vs prost decoding; ClickHouse
#                                                     inserts (clickhouse crate) vs clickhouse-client
#   scripts/bench.sh query [bench-query args]         query API p50/p95 per endpoint vs the same SQL
#                                                     sent straight to ClickHouse over HTTP
#   scripts/bench.sh memory [memory_bench.py args]   the whole local platform (scripts/dev.sh up
#                                                     on free ports, its own state folder) under a
#                                                     high-cardinality loadgen workload (1M users
#                                                     taking turns); peak RSS per service and the
#                                                     processor's state (tests/python/memory_bench.py;
#                                                     --profile debug|release, --users, --rate,
#                                                     --duration; table also in
#                                                     $PULSE_CACHE/bench/memory-<profile>.md)
#   scripts/bench.sh freshness [bench_freshness.py args]  the whole local platform the same way,
#                                                     loadgen at 50 % of the rate it sustains here
#                                                     (measured first) and probe events: ingest's
#                                                     acknowledgement → visible in the query API,
#                                                     p50/p95/p99 end to end and per stage, RSS and
#                                                     CPU per service (tests/python/bench_freshness.py;
#                                                     --rate, --duration, the knobs --emit-interval-ms,
#                                                     --writer-max-age-ms, --fetch-wait-ms, …; report
#                                                     also in $PULSE_CACHE/bench/freshness.md)
#   scripts/bench.sh all [--profile tiny|short] [--binaries release|debug]
#                                                     every part above with a short profile (short:
#                                                     about 10 min on 2 cores; tiny: a smoke run),
#                                                     then ONE table (ratios and goals, events per
#                                                     CPU-second, freshness, RSS, the broker's CPU
#                                                     share) printed and written to
#                                                     $PULSE_CACHE/bench/bench-all.md with a PNG chart
#                                                     (tests/python/bench_all.py; memory's RSS comes
#                                                     from the freshness run's platform at its load)
# (writer and query start a throwaway ClickHouse on two free ports instead of Tansu and pass
# --clickhouse-url http://127.0.0.1:<http>; writer also --clickhouse-tcp-port <native>)
# installs missing dependencies, starts Tansu on a free port in a temporary folder, builds
# and runs the release benchmark binary (tests/src/bin/bench_<what>.rs; `--help` lists its
# arguments), then stops the broker.
# ingest and processor also get --broker-pid, so each phase prints the broker's CPU use.
# PULSE_BENCH_KEEP=1 keeps the temporary folder (broker log and data).
# PULSE_BENCH_BINARIES=debug runs the debug build of bench-<what> (default release; `all
# --binaries debug` sets it for its parts); PULSE_BENCH_SKIP_SETUP=1 skips install-deps and
# the build (`all` builds once, then runs each part with it).
# PULSE_BENCH_PIN=1 (the default, on machines with 2+ cores) pins Tansu to core 0 and the
# ingest/processor benchmark to the other cores, as if the broker had its own host;
# PULSE_BENCH_PIN=0 lets them share every core.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/stack.sh

usage() {
  echo "usage: scripts/bench.sh ingest [--duration-secs N] [--batch N] [--concurrency N] [--warmup-secs N] [--rounds N] [--linger-ms N]" >&2
  echo "       scripts/bench.sh processor [--core-events N] [--loop-events N] [--users N] [--rounds N]" >&2
  echo "       scripts/bench.sh writer [--events N] [--roll-rows N] [--insert-rows N] [--insert-batch N]" >&2
  echo "       scripts/bench.sh query [--users N] [--hours N] [--active-share F] [--requests N] [--warmup N]" >&2
  echo "       scripts/bench.sh memory [--profile debug|release] [--users N] [--rate F] [--duration SECS] [--settle SECS] [--keep]" >&2
  echo "       scripts/bench.sh freshness [--profile debug|release] [--rate F] [--duration SECS] [--emit-interval-ms N] [--writer-max-age-ms N] [--fetch-wait-ms N] [--json FILE] (--help: all)" >&2
  echo "       scripts/bench.sh all [--profile tiny|short] [--binaries release|debug] [--out DIR]" >&2
  exit 2
}
[ $# -ge 1 ] || usage
what=$1; shift
case "$what" in
  ingest|processor|writer|query|memory|freshness|all) ;;
  *) usage ;;
esac

skip_setup=${PULSE_BENCH_SKIP_SETUP:-0}
[ "$skip_setup" = 1 ] || bash scripts/install-deps.sh

if [ "$what" = all ]; then
  # One build of every binary (the services, pulsectl and bench-*), then each part.
  binaries=release
  prev=
  for a in "$@"; do
    [ "$prev" = --binaries ] && binaries=$a
    case "$a" in --binaries=*) binaries=${a#--binaries=} ;; esac
    prev=$a
  done
  case "$binaries" in
    release) log "building every binary (release)"; cargo build --release --quiet --bins ;;
    debug) log "building every binary (debug; figures are not release figures)"; cargo build --quiet --bins ;;
    *) die "--binaries must be release or debug, not '$binaries'" ;;
  esac
  exec "$PULSE_CACHE/venv/bin/python" tests/python/bench_all.py "$@"
fi

if [ "$what" = memory ] || [ "$what" = freshness ]; then
  # Its own platform (dev.sh up/down inside the driver): no throwaway broker here.
  profile=release
  prev=
  for a in "$@"; do
    [ "$prev" = --profile ] && profile=$a
    case "$a" in --profile=*) profile=${a#--profile=} ;; esac
    prev=$a
  done
  case "$profile" in
    release|debug) ;;
    *) die "--profile must be debug or release, not '$profile'" ;;
  esac
  if [ "$skip_setup" = 1 ]; then
    :
  elif [ "$profile" = release ]; then
    log "building the Pulse binaries (release)"; cargo build --release --quiet --bins
  else
    log "building the Pulse binaries (debug; figures are not release figures)"; cargo build --quiet --bins
  fi
  if [ "$what" = memory ]; then
    exec "$PULSE_CACHE/venv/bin/python" tests/python/memory_bench.py "$@"
  fi
  exec "$PULSE_CACHE/venv/bin/python" tests/python/bench_freshness.py "$@"
fi

STATE=$(mktemp -d "${TMPDIR:-/tmp}/pulse-bench.XXXXXX")
cleanup() {
  local rc=$1
  trap - EXIT INT TERM
  stack_stop "$STATE" schema-registry kafka clickhouse
  if [ "$rc" -ne 0 ] || [ "${PULSE_BENCH_KEEP:-0}" = 1 ]; then
    log "state and broker log kept in $STATE"
  else
    rm -rf "$STATE"
  fi
  exit "$rc"
}
trap_cleanup cleanup

BIN=$CARGO_TARGET_DIR/${PULSE_BENCH_BINARIES:-release}
case "${PULSE_BENCH_BINARIES:-release}" in
  release) [ "$skip_setup" = 1 ] || { log "building bench-$what (release)"; cargo build --release --quiet -p pulse-tests --bin "bench-$what"; } ;;
  debug) [ "$skip_setup" = 1 ] || { log "building bench-$what (debug)"; cargo build --quiet -p pulse-tests --bin "bench-$what"; } ;;
  *) die "PULSE_BENCH_BINARIES must be release or debug" ;;
esac

if [ "$what" = writer ] || [ "$what" = query ]; then
  CH_HTTP_PORT=$(free_port)
  CH_TCP_PORT=$(free_port)
  while [ "$CH_TCP_PORT" = "$CH_HTTP_PORT" ]; do CH_TCP_PORT=$(free_port); done
  log "starting ClickHouse in $STATE"
  start_clickhouse "$STATE" "$CH_HTTP_PORT" "$CH_TCP_PORT"
  if [ "$what" = writer ]; then
    log "running bench-writer against ClickHouse 127.0.0.1:$CH_HTTP_PORT (HTTP) and :$CH_TCP_PORT (native)"
    "$BIN/bench-writer" --clickhouse-url "http://127.0.0.1:$CH_HTTP_PORT" \
      --clickhouse-tcp-port "$CH_TCP_PORT" "$@"
  else
    log "running bench-query against ClickHouse 127.0.0.1:$CH_HTTP_PORT (HTTP)"
    "$BIN/bench-query" --clickhouse-url "http://127.0.0.1:$CH_HTTP_PORT" "$@"
  fi
else
  KAFKA_PORT=$(free_port)
  log "starting Tansu in $STATE"
  start_kafka "$STATE" "$KAFKA_PORT"
  # One local broker: one replica per topic (the defaults, 3 and 2, need three brokers).
  export PULSE_KAFKA_REPLICATION_FACTOR=1 PULSE_KAFKA_MIN_INSYNC_REPLICAS=1

  broker_pid=$(cat "$STATE/pids/kafka.pid")
  pin=()
  cores=$(nproc)
  if [ "${PULSE_BENCH_PIN:-1}" = 1 ] && [ "$cores" -ge 2 ] && command -v taskset >/dev/null; then
    # The broker gets core 0 to itself (every thread, -a), the benchmark the others, as if
    # the broker ran on its own host: otherwise the measured side and the broker take CPU
    # from each other, and the ratio measures that contention instead of Pulse.
    taskset -a -c -p 0 "$broker_pid" >/dev/null
    pin=(taskset -c "1-$((cores - 1))")
    log "pinned: Tansu on core 0, bench-$what on cores 1-$((cores - 1)) (PULSE_BENCH_PIN=0 turns this off)"
  fi
  if [ "$what" = ingest ]; then
    # --process: the real binary in its own process, framing through a schema registry.
    process=0 rest=()
    for a in "$@"; do
      if [ "$a" = --process ]; then process=1; else rest+=("$a"); fi
    done
    if [ "$process" = 1 ]; then
      profile_flag=()
      [ "${PULSE_BENCH_BINARIES:-release}" = release ] && profile_flag=(--release)
      [ "$skip_setup" = 1 ] || { log "building pulse-ingest, pulse-schema-registry, pulsectl (${PULSE_BENCH_BINARIES:-release})"; cargo build "${profile_flag[@]}" --quiet -p pulse-ingest -p pulse-schema-registry -p pulsectl --bins; }
      SR_PORT=$(free_port); SR_ADMIN_PORT=$(free_port)
      while [ "$SR_ADMIN_PORT" = "$SR_PORT" ]; do SR_ADMIN_PORT=$(free_port); done
      export PULSE_KAFKA_BROKERS="127.0.0.1:$KAFKA_PORT"
      export PULSE_SCHEMA_REGISTRY_URL="http://127.0.0.1:$SR_PORT"
      log "starting the schema registry on 127.0.0.1:$SR_PORT and registering Pulse's schemas"
      start_proc "$STATE" schema-registry env PULSE_SCHEMA_REGISTRY_ADDR="127.0.0.1:$SR_PORT" \
        PULSE_ADMIN_ADDR="127.0.0.1:$SR_ADMIN_PORT" "$BIN/pulse-schema-registry"
      wait_port 127.0.0.1 "$SR_PORT" "schema registry" 60 || die "the schema registry did not open its port; see $STATE/logs/schema-registry.log"
      ok=0
      for _ in $(seq 1 30); do
        if "$BIN/pulsectl" schemas register >>"$STATE/logs/pulsectl.log" 2>&1; then ok=1; break; fi
        sleep 1
      done
      [ "$ok" = 1 ] || die "registering Pulse's schemas failed; see $STATE/logs/pulsectl.log"
      ingest_bin=()
      [ -n "${PULSE_BENCH_INGEST_BIN:-}" ] || ingest_bin=(--ingest-bin "$BIN/pulse-ingest")
      set -- "${ingest_bin[@]}" --registry-url "$PULSE_SCHEMA_REGISTRY_URL" \
        --ingest-log "$STATE/logs/ingest.log" ${rest[@]+"${rest[@]}"}
    fi
  fi
  log "running bench-$what against 127.0.0.1:$KAFKA_PORT"
  "${pin[@]}" "$BIN/bench-$what" --brokers "127.0.0.1:$KAFKA_PORT" \
    --broker-pid "$broker_pid" "$@"
fi

case "$what" in
  ingest)
    if [ "${process:-0}" = 1 ]; then
      log "figures: the table above; events/CPU-s counts the ingest process's CPU alone (every thread, librdkafka's included); the floor is the same events' split + validate + PII + encode + frame on one thread; goal >= 100000 events/CPU-s for JSON batches of 100 (issue #19)"
      exit 0
    fi
    log "figures: the table above (events/s, request latency p50/p99 per phase); progress lines went to stderr"
    log "vs raw = each http/grpc phase's events/s ÷ mean of the raw rdkafka producer runs just before and after its round (same records, broker and topic); the median is the figure; goal >= 0.8" ;;
  processor)
    log "figures: the table above; events/cpu-s counts the whole process's CPU time (librdkafka threads included)"
    log "core + decode = the windowing core with each event read from its record (trace context, framed protobuf, pulse-ingest-ts); goal >= 300000 events/cpu-s (issue #19), printed beside decode alone (the floor)"
    log "vs raw = each processor loop run's events/s ÷ mean of the raw consumer runs just before and after it (same topic and records); the median is the figure; goal >= 0.8" ;;
  writer)
    log "figures: the two tables above; progress lines went to stderr"
    log "archive ÷ decode = Parquet rows/s ÷ mean of the prost-decode runs before and after (what archiving costs; no goal)"
    log "crate ÷ clickhouse-client = mean rows/s of the two crate runs ÷ mean of the two client runs (same rows, server and table schema); goal >= 0.8" ;;
  query)
    log "figures: the seed counts and the table above; progress lines went to stderr"
    log "ratio = API latency ÷ the same statements sent straight to ClickHouse (same run, interleaved); goal <= 1.2 on the first row of each endpoint" ;;
esac
