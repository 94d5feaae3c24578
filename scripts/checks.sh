#!/usr/bin/env bash
# Fast structural checks run by scripts/test.sh (a few seconds, no services needed):
#   1. crate layering: contracts and platform at the bottom, storage above them, the
#      service crates depending only on those, pulsectl on top, the tests crate free
#      (docs/architecture.md); read from `cargo metadata`;
#   2. unused dependencies (cargo-machete, installed by scripts/install-deps.sh);
#   3. the scripts' signal handling: trap_cleanup (scripts/lib.sh) exits 130 on SIGINT
#      and 143 on SIGTERM after cleaning up, and keeps a failure's status.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

log "crate layering (docs/architecture.md)"
cargo metadata --format-version 1 --no-deps --offline 2>/dev/null | python3 -c '
import json, sys
BOTTOM = {"pulse-contracts": set(), "pulse-platform": set()}
STORAGE = {"pulse-storage": {"pulse-contracts", "pulse-platform"}}
SERVICES = ["pulse-ingest", "pulse-processor", "pulse-writer", "pulse-query-api", "pulse-schema-registry"]
allowed = dict(BOTTOM)
allowed.update(STORAGE)
for s in SERVICES:
    allowed[s] = {"pulse-contracts", "pulse-platform", "pulse-storage"}
allowed["pulsectl"] = {"pulse-contracts", "pulse-platform", "pulse-storage"}
allowed["pulse-tests"] = None  # the end-to-end crate may use everything
meta = json.load(sys.stdin)
internal = {p["name"] for p in meta["packages"]}
bad = []
for p in meta["packages"]:
    name = p["name"]
    if name not in allowed:
        bad.append(f"{name}: a new crate; give it a layer in scripts/checks.sh and docs/architecture.md")
        continue
    ok = allowed[name]
    if ok is None:
        continue
    for d in p["dependencies"]:
        if d["name"] in internal and d["name"] not in ok:
            kind = d["kind"] or "normal"
            dep = d["name"]
            allowed_list = ", ".join(sorted(ok)) or "no Pulse crate"
            bad.append(f"{name} depends on {dep} ({kind}); allowed: {allowed_list}")
for b in bad:
    print("  - " + b, file=sys.stderr)
sys.exit(1 if bad else 0)
' || die "a crate breaks the layering rule (above)"

log "unused dependencies (cargo machete)"
command -v cargo-machete >/dev/null || die "cargo-machete missing: run scripts/install-deps.sh"
cargo machete --with-metadata >/dev/null 2>&1 || {
  cargo machete --with-metadata || true
  die "unused dependencies (above): remove them, or list a false positive under [package.metadata.cargo-machete] ignored"
}

log "scripts: signals exit 130/143 after cleanup"
probe() { # SIGNAL|exit:N -> prints "<status> <cleanup-ran>"
  local how=$1 dir script pid rc
  dir=$(mktemp -d)
  script="$dir/probe.sh"
  cat >"$script" <<PROBE
set -euo pipefail
source "$PWD/scripts/lib.sh"
cleanup() { local rc=\$1; trap - EXIT INT TERM; echo ran >"$dir/cleaned"; exit "\$rc"; }
trap_cleanup cleanup
touch "$dir/ready"
case "$how" in exit:*) exit "${how#exit:}" ;; esac
sleep 1  # a foreground step: bash runs the trap after it ends (status 0)
echo "not reached" >"$dir/continued"
PROBE
  # Job control on, so the probe's SIGINT is not ignored as in a plain background job.
  set -m
  bash "$script" & pid=$!
  set +m
  for _ in $(seq 100); do [ -f "$dir/ready" ] && break; sleep 0.05; done
  case "$how" in exit:*) ;; *) kill "-$how" "$pid" ;; esac
  rc=0; wait "$pid" || rc=$?
  echo "$rc $([ -f "$dir/cleaned" ] && echo cleaned || echo dirty) $([ -f "$dir/continued" ] && echo continued || echo stopped)"
  rm -rf "$dir"
}
for case in "TERM:143 cleaned stopped" "INT:130 cleaned stopped" "exit:3:3 cleaned stopped" "exit:0:0 cleaned stopped"; do
  how=${case%:*}; want=${case##*:}
  got=$(probe "$how")
  [ "$got" = "$want" ] || die "trap_cleanup on $how: got '$got', want '$want'"
done
log "structural checks passed"
