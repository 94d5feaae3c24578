#!/usr/bin/env bash
# Shared helpers for Pulse scripts: cache locations, logging, waiting on ports.
# Sourced, never executed.

PULSE_CACHE="${PULSE_CACHE:-$HOME/.cache/pulse}"
PULSE_TOOLS="$PULSE_CACHE/tools"
export PATH="$PULSE_TOOLS/bin:$PATH"
# Builds go to the cache so a fresh clone (as CI uses) builds incrementally.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PULSE_CACHE/target}"

log() { printf '\033[1m[pulse]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[31m[pulse] error:\033[0m %s\n' "$*" >&2; exit 1; }

# trap_cleanup FN: calls `FN STATUS` once when the script ends: with the script's exit
# status on a normal exit, with 130 on SIGINT and 143 on SIGTERM. FN must end with
# `exit "$1"`, so a signal never turns into exit 0 and the remaining steps are skipped.
trap_cleanup() {
  local fn=$1
  # shellcheck disable=SC2064  # expand $fn now
  trap "$fn \$?" EXIT
  # shellcheck disable=SC2064
  trap "trap - EXIT INT TERM; $fn 130" INT
  # shellcheck disable=SC2064
  trap "trap - EXIT INT TERM; $fn 143" TERM
}

# wait_port HOST PORT NAME TIMEOUT_SECONDS
wait_port() {
  local host=$1 port=$2 name=$3 timeout=${4:-60} waited=0
  until (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; do
    sleep 0.5
    waited=$((waited + 1))
    if [ "$waited" -ge $((timeout * 2)) ]; then
      return 1
    fi
  done
  log "$name answers on $host:$port"
}

# free_port: a free TCP port on loopback, chosen below the kernel's ephemeral range
# (net.ipv4.ip_local_port_range starts at 32768 by default). A port the kernel hands out
# with bind(0) is an ephemeral one: any outgoing connection made between this call and the
# service's own bind can take it ("Address already in use"). Ports below the range are only
# ever taken by an explicit bind, so a port that binds now stays free for the service.
# Ports already handed out by this script (and its subshells: $$ is the script's pid in
# them too) are remembered in a file and never handed out twice, so two calls before any
# service binds cannot return the same port.
free_port() {
  PULSE_FREE_PORTS_FILE="${TMPDIR:-/tmp}/pulse-free-ports.$$" python3 - <<'PY'
import os, random, socket
given_file = os.environ["PULSE_FREE_PORTS_FILE"]
try:
    with open(given_file) as f:
        given = {int(line) for line in f if line.strip().isdigit()}
except OSError:
    given = set()
low = 20000
try:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        high = int(f.read().split()[0]) - 1
except (OSError, ValueError, IndexError):
    high = 32767
if high <= low:
    low, high = 10000, max(high, 10001)
for _ in range(200):
    port = random.randint(low, high)
    if port in given:
        continue
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    with open(given_file, "a") as f:
        f.write(f"{port}\n")
    print(port)
    break
else:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()
PY
}
