#!/usr/bin/env bash
# Installs everything the local stack and the tests need, idempotently.
# System packages come from Debian; Kafka-API broker (Tansu) and the S3 server
# (s3s-fs) are built from crates.io into $PULSE_CACHE/tools, outside the
# checkout, so every clone reuses them. A second run is a no-op.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

TANSU_VERSION=0.6.0
S3S_FS_VERSION=0.14.1
APT_PACKAGES=(clickhouse-server clickhouse-client protobuf-compiler prometheus
  cmake pkg-config build-essential zlib1g-dev libssl-dev libcurl4-openssl-dev python3-venv
  chromium)  # chromium: the query API's dashboard test renders the page headless

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
  # The Debian package starts a system ClickHouse on 8123/9000; Pulse runs its
  # own instances under its state folder, so stop and disable the system one.
  if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl disable --now clickhouse-server >/dev/null 2>&1 || true; fi
  $SUDO service clickhouse-server stop >/dev/null 2>&1 || true
else
  log "Debian packages present"
fi

# cargo install builds into its own target dir in the cache (kept between runs).
cargo_tool() { # name version binary features...
  local name=$1 version=$2 bin=$3; shift 3
  if [ -x "$PULSE_TOOLS/bin/$bin" ] && [ -f "$PULSE_TOOLS/.$name-$version" ]; then
    log "$name $version present"
    return
  fi
  log "building $name $version from crates.io (first time only; Tansu takes ~20 min on 2 cores)"
  CARGO_TARGET_DIR="$PULSE_CACHE/tool-target/$name" cargo install "$name" --version "$version" --locked \
    --root "$PULSE_TOOLS" "$@" || die "cargo install $name $version failed"
  touch "$PULSE_TOOLS/.$name-$version"
}

cargo_tool tansu "$TANSU_VERSION" tansu --no-default-features --features dynostore,libsql
cargo_tool s3s-fs "$S3S_FS_VERSION" s3s-fs --features binary
# scripts/checks.sh: unused dependencies of the workspace crates.
cargo_tool cargo-machete 0.9.2 cargo-machete

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

log "dependencies ready in $PULSE_CACHE"
