#!/usr/bin/env bash
# Tests the Helm chart (helm/pulse) offline (~50 s at load 8; ~135 s with the chart-runs test):
#   1. `helm lint --strict` and `helm template` for the default values and every
#      helm/pulse/ci/*-values.yaml, with Helm 4 and (when installed) Helm 3, which must
#      render the same objects;
#   2. every rendered manifest validated against the Kubernetes API schemas of two
#      supported minor versions (kubernetes-validate, strict; custom resources —
#      ServiceMonitor, ScaledObject — checked structurally only: no schema ships for them);
#   3. checkov on the rendered manifests and deploy/Dockerfile (skips and their reasons:
#      helm/checkov.yaml), hadolint on deploy/Dockerfile;
#   4. bad values refused, naming the key: by values.schema.json (wrong type, unknown key,
#      replicas < 0, a registry password over bcrypt's 72 bytes, …) and by
#      templates/validate.yaml (a credential in args, SASL without a password, generated
#      registry users with secrets.existingSecret);
#   5. the generated schema-registry credentials (tests/python/chart_upgrade.py): each
#      password verifies against its bcrypt line, and an upgrade (rendered with
#      --dry-run=server against a fake API that answers `lookup`) changes no Secret and no
#      pod checksum, a rotation re-hashes only the rotated user;
#      the values table of helm/pulse/README.md in sync with values.yaml; the Grafana
#      dashboards' static check (tests/python/dashboards_check.py);
#   6. with the service binaries in $CARGO_TARGET_DIR/debug: every PULSE_* env name and
#      flag the chart (every ci/*-values.yaml render) and docker-compose.yml give a Pulse
#      binary is one its --help lists; docker-compose.yml against the compose-spec schema;
#   7. "the chart runs" (tests/python/chart_runs.py): only when PULSE_TEST_KAFKA_BROKERS,
#      PULSE_TEST_CLICKHOUSE_URL and PULSE_TEST_S3_* point at real servers (scripts/test.sh
#      exports them); then the binaries must exist.
# Tools (helm, helm3, the venv with kubernetes-validate, checkov and hadolint) come from
# scripts/install-deps.sh. Exits non-zero on the first failing step, naming it.
# Options (environment): PULSE_CHART_K8S_VERSIONS (default 1.33,1.35).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

CHART=helm/pulse
PY="$PULSE_CACHE/venv/bin/python"
K8S_VERSIONS="${PULSE_CHART_K8S_VERSIONS:-1.33,1.35}"
started=$(date +%s)

command -v helm >/dev/null || die "helm missing: run scripts/install-deps.sh"
[ -x "$PY" ] && "$PY" -c 'import kubernetes_validate, yaml' 2>/dev/null \
  || die "kubernetes-validate missing in $PULSE_CACHE/venv: run scripts/install-deps.sh"
[ -x "$PULSE_CACHE/venv/bin/checkov" ] || die "checkov missing in $PULSE_CACHE/venv: run scripts/install-deps.sh"

OUT=$(mktemp -d "${TMPDIR:-/tmp}/pulse-chart.XXXXXX")
cleanup() {
  local rc=${1:-$?}
  trap - EXIT INT TERM
  if [ "$rc" -ne 0 ]; then log "rendered manifests and logs kept in $OUT"; else rm -rf "$OUT"; fi
  exit "$rc"
}
if declare -F trap_cleanup >/dev/null; then trap_cleanup cleanup; else trap cleanup EXIT INT TERM; fi

# The chart supports Helm 3 and 4: every helm step runs with each installed (helm3 is
# optional; install-deps.sh installs it).
HELMS=(helm)
command -v helm3 >/dev/null && HELMS+=(helm3)
mkdir -p "$OUT/rendered" "$OUT/rendered-helm3"
for h in "${HELMS[@]}"; do
  log "chart: $h $("$h" version --short 2>/dev/null)"
  dir="$OUT/rendered"; [ "$h" = helm ] || dir="$OUT/rendered-$h"
  for values in "$CHART"/ci/*-values.yaml; do
    name=$(basename "$values" -values.yaml)
    "$h" lint --strict "$CHART" -f "$values" >"$OUT/lint-$h-$name.log" 2>&1 \
      || { cat "$OUT/lint-$h-$name.log" >&2; die "$h lint --strict failed for $values"; }
    "$h" template pulse "$CHART" --namespace pulse -f "$values" >"$dir/$name.yaml" 2>"$OUT/template-$h-$name.log" \
      || { cat "$OUT/template-$h-$name.log" >&2; die "$h template failed for $values"; }
    log "chart: $h: $values lints and renders ($(grep -c '^kind:' "$dir/$name.yaml") objects)"
  done
done
[ -f "$OUT/rendered/default.yaml" ] || die "$CHART/ci/default-values.yaml is missing (CI renders the defaults through it)"
if [ "${#HELMS[@]}" -gt 1 ]; then
  # Same objects from both (the generated credentials, the registry users' bcrypt hashes
  # and fingerprints, and the checksum differ by design).
  generated='^  (ingest-api-keys|query-api-tokens|pii-hmac-key|ledger-query-token|registry-read-password|registry-write-password|users|fingerprints): |checksum/secret'
  for f in "$OUT"/rendered/*.yaml; do
    diff <(grep -vE "$generated" "$f") \
         <(grep -vE "$generated" "$OUT/rendered-helm3/$(basename "$f")") >&2 \
      || die "helm and helm3 render $(basename "$f") differently (above)"
  done
  log "chart: helm 4 and helm 3 render the same manifests"
fi

log "chart: Kubernetes API schemas $K8S_VERSIONS (kubernetes-validate, strict)"
"$PY" tests/python/chart_validate.py "$K8S_VERSIONS" "$OUT"/rendered/*.yaml \
  || die "rendered manifests do not match the Kubernetes API schemas (above)"

log "chart: checkov on the rendered manifests and deploy/Dockerfile (skips: helm/checkov.yaml)"
"$PULSE_CACHE/venv/bin/checkov" --config-file helm/checkov.yaml -d "$OUT/rendered" --framework kubernetes \
  >"$OUT/checkov-k8s.log" 2>&1 || { cat "$OUT/checkov-k8s.log" >&2; die "checkov found problems in the rendered chart (above)"; }
grep -E 'Passed checks|Failed checks' "$OUT/checkov-k8s.log" | head -1 >&2 || true
"$PULSE_CACHE/venv/bin/checkov" --config-file helm/checkov.yaml -f deploy/Dockerfile --framework dockerfile \
  >"$OUT/checkov-docker.log" 2>&1 || { cat "$OUT/checkov-docker.log" >&2; die "checkov found problems in deploy/Dockerfile (above)"; }
if [ -x "$PULSE_CACHE/venv/bin/hadolint" ]; then
  "$PULSE_CACHE/venv/bin/hadolint" deploy/Dockerfile || die "hadolint found problems in deploy/Dockerfile (above)"
  log "chart: hadolint deploy/Dockerfile clean"
fi

# refused CASE KEY_REGEX CMDS ARGS...: each of CMDS ("lint template" or "template") must
# fail, with every helm, naming the key (KEY_REGEX, extended grep: Helm 4 writes
# /kafka/partitions, Helm 3 kafka.partitions). Schema errors fail both; a template's
# `fail` fails `helm template` and `helm install` only (helm lint logs `fail` calls
# without failing, by design).
refused() {
  local case=$1 key=$2 cmds=$3; shift 3
  local cmd out h
  for h in "${HELMS[@]}"; do
    for cmd in $cmds; do
      if [ "$cmd" = lint ]; then
        out=$("$h" lint --strict "$CHART" "$@" 2>&1) && die "$h lint accepted $case ($*)"
      else
        out=$("$h" template pulse "$CHART" "$@" 2>&1) && die "$h template accepted $case ($*)"
      fi
      grep -qE -- "$key" <<<"$out" || { echo "$out" >&2; die "$h $cmd refused $case but did not name the key ($key)"; }
    done
  done
  log "chart: refused $case, naming the key (${HELMS[*]})"
}
refused "a wrong type" "kafka[./]partitions" "lint template" --set-string kafka.partitions=six
refused "an unknown key" "ingest.*replica\b" "lint template" --set ingest.replica=3
refused "replicas < 0" "processor[./]replicas" "lint template" --set processor.replicas=-1
refused "a negative window" "windowing[./]windowMs" "lint template" --set windowing.windowMs=-5
refused "a setting name that is not PULSE_*" "queryApi[./]config.*query_timeout|query_timeout.*queryApi" "lint template" --set queryApi.config.query_timeout=5
refused "a credential in extraArgs" "ingest\.extraArgs" "template" --set 'ingest.extraArgs[0]=--api-keys=k=s'
refused "SASL without a password" "secrets\.kafkaSaslPassword" "template" --set kafka.sasl.enabled=true,kafka.sasl.username=u
refused "a second ledger replica" "ledger\.replicas" "template" --set ledger.replicas=2
refused "an autoscaled ledger" "ledger\.autoscaling" "template" --set ledger.autoscaling.enabled=true
refused "generated registry users with secrets.existingSecret" "schemaRegistry\.auth\.users or schemaRegistry\.auth\.existingSecret" "template" --set secrets.existingSecret=mine
refused "one registry user for read and write" "schemaRegistry\.auth\.readUser and writeUser" "template" --set schemaRegistry.auth.writeUser=pulse-read
refused "a registry password bcrypt cannot hold" "registryWritePassword" "lint template" --set "secrets.registryWritePassword=$(printf 'p%.0s' {1..73})"
refused "a registry user name with a space" "readUser" "lint template" --set "schemaRegistry.auth.readUser=a b"

log "chart: generated registry credentials across install, upgrade and rotation (fake API for lookup)"
"$PY" tests/python/chart_upgrade.py "$CHART" "${HELMS[@]}" \
  || die "the generated registry users/passwords are not stable or do not verify (above)"

log "chart: README values table"
"$PY" tests/python/chart_docs.py "$CHART" || die "helm/pulse/README.md's values table is stale (above)"

log "chart: Grafana dashboards (static: structure, datasource variables, metric names, one copy)"
"$PY" tests/python/dashboards_check.py || die "the Grafana dashboards have problems (above)"

BIN_DIR="$CARGO_TARGET_DIR/debug"
COMPOSE_SCHEMA="$PULSE_TOOLS/share/compose-spec-1.0.0.json"
if [ -x "$BIN_DIR/pulsectl" ] && [ -x "$BIN_DIR/pulse-ingest" ]; then
  log "chart: env names and flags against the binaries' --help ($BIN_DIR)"
  "$PY" tests/python/chart_runs.py --chart "$CHART" --bin-dir "$BIN_DIR" --work "$OUT/static" --static-only \
    || die "the chart sets env names or flags the binaries do not know (above)"
  "$PY" tests/python/chart_compose.py docker-compose.yml "$BIN_DIR" "$COMPOSE_SCHEMA" \
    || die "docker-compose.yml has problems (above)"
else
  log "chart: skipping the --help checks of the chart and docker-compose.yml (no binaries in $BIN_DIR; cargo build --bins)"
fi

if [ -n "${PULSE_TEST_KAFKA_BROKERS:-}" ] && [ -n "${PULSE_TEST_CLICKHOUSE_URL:-}" ] && [ -n "${PULSE_TEST_S3_ENDPOINT:-}" ] \
  && [ -n "${PULSE_TEST_S3_BUCKET:-}" ] && [ -n "${PULSE_TEST_S3_ACCESS_KEY:-}" ] && [ -n "${PULSE_TEST_S3_SECRET_KEY:-}" ]; then
  log "chart: the chart runs (rendered commands against the test's broker, ClickHouse and S3)"
  [ -x "$BIN_DIR/pulsectl" ] || die "the service binaries are missing in $BIN_DIR (cargo build --bins)"
  "$PY" tests/python/chart_runs.py --chart "$CHART" --bin-dir "$BIN_DIR" --work "$OUT/runs" \
    || die "the chart does not run (above; logs in $OUT/runs)"
else
  log "chart: skipping 'the chart runs' (PULSE_TEST_KAFKA_BROKERS etc. unset; scripts/test.sh sets them)"
fi

log "chart: all checks passed in $(( $(date +%s) - started )) s"
