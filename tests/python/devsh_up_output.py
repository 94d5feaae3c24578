"""What `scripts/dev.sh up` tells its user (issue #20: "says what it is building and why,
with the right estimate for each step"), checked on the output of a real run:

- each of the five "step N/5: ..." lines, once and in order, and each with an estimate of
  how long it takes (a duration such as "1-2 s", "15-30 min", "~40 min", or the words
  seconds/minutes; paths are ignored, so a temporary folder's name cannot pass for one);
- the "steps took: ..." line after them, with the time of every step ("N name M min S s");
- the banner: "Pulse is up." with the state folder, and the where-to-look lines (dashboard,
  query API, ingest, schema registry, Kafka API, ClickHouse, S3, metrics, Prometheus,
  Alertmanager), each starting with its URL on the port the environment asked for (dev.sh's
  default when the variable is unset), then the Logs/Status/Stop hints.

No platform of its own: the chaos suite (tests/python/chaos.py, run by scripts/test.sh)
calls `check` on its `dev.sh up` log. By hand: `python3 tests/python/devsh_up_output.py LOG`
(ports from the environment, as for dev.sh); exits 1 naming each problem.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping

ANSI = re.compile(r"\x1b\[[0-9;]*m")
STEP = re.compile(r"\bstep (\d)/5: (.*)")
# A path ("/tmp/pulse-memory.k3s", "/root/.cache/...") is not an estimate: removed first.
PATH = re.compile(r"(?<![\w.])/[^\s,;:()]*")
ESTIMATE = re.compile(
    r"\b\d+(?:\.\d+)?(?:\s?[-–]\s?\d+(?:\.\d+)?)?\s?(?:s|min|mins|minutes|seconds|h|hours)\b"
    r"|\b(?:seconds|minutes)\b")
TOOK = re.compile(r"\bsteps took: (.*)")
TOOK_STEP = re.compile(r"(\d) ([a-z][a-z ]*?) (\d+) min (\d+) s")

# dev.sh's port variables and their defaults (scripts/dev.sh, README "Ports").
PORTS = {
    "PULSE_KAFKA_PORT": 9092, "PULSE_CLICKHOUSE_HTTP_PORT": 8123, "PULSE_S3_PORT": 9900,
    "PULSE_SCHEMA_REGISTRY_PORT": 8081, "PULSE_INGEST_HTTP_PORT": 8080, "PULSE_INGEST_GRPC_PORT": 50051,
    "PULSE_QUERY_HTTP_PORT": 8090, "PULSE_QUERY_GRPC_PORT": 50052, "PULSE_PROMETHEUS_PORT": 9090,
    "PULSE_ALERTMANAGER_PORT": 9093,
}
ADMIN = {
    "ingest": ("PULSE_INGEST_ADMIN_PORT", 9101), "processor": ("PULSE_PROCESSOR_ADMIN_PORT", 9102),
    "writer-clickhouse": ("PULSE_WRITER_CLICKHOUSE_ADMIN_PORT", 9103),
    "writer-parquet": ("PULSE_WRITER_PARQUET_ADMIN_PORT", 9106), "query-api": ("PULSE_QUERY_ADMIN_PORT", 9104),
    "schema-registry": ("PULSE_SCHEMA_REGISTRY_ADMIN_PORT", 9105),
}
# Banner label -> what its line must hold ({VAR} is that port variable's value).
BANNER = {
    "Dashboard": ["http://127.0.0.1:{PULSE_QUERY_HTTP_PORT}/#token="],
    "Query API": ["http://127.0.0.1:{PULSE_QUERY_HTTP_PORT}/v1/", "gRPC 127.0.0.1:{PULSE_QUERY_GRPC_PORT}"],
    "Ingest": ["http://127.0.0.1:{PULSE_INGEST_HTTP_PORT}/v1/events", "gRPC 127.0.0.1:{PULSE_INGEST_GRPC_PORT}"],
    "Schema registry": ["http://127.0.0.1:{PULSE_SCHEMA_REGISTRY_PORT}/subjects"],
    "Kafka API (Tansu)": ["127.0.0.1:{PULSE_KAFKA_PORT}"],
    "ClickHouse HTTP": ["http://127.0.0.1:{PULSE_CLICKHOUSE_HTTP_PORT}"],
    "S3 (s3s-fs)": ["http://127.0.0.1:{PULSE_S3_PORT}"],
    "Metrics": ["http://127.0.0.1:{{"],
    "Prometheus": ["http://127.0.0.1:{PULSE_PROMETHEUS_PORT}", "/alerts"],
    "Alertmanager": ["http://127.0.0.1:{PULSE_ALERTMANAGER_PORT}"],
}
HINTS = ["Logs:   scripts/dev.sh logs", "Status: scripts/dev.sh status", "Stop:   scripts/dev.sh down"]


def check(text: str, env: Mapping[str, str] | None = None) -> list[str]:
    """The problems of one `dev.sh up` output (the last run when a log holds several)."""
    env = os.environ if env is None else env
    lines = ANSI.sub("", text).splitlines()
    starts = [i for i, line in enumerate(lines) if "step 1/5:" in line]
    lines = lines[starts[-1]:] if starts else lines
    problems: list[str] = []

    seen: list[int] = []
    for line in lines:
        m = STEP.search(line)
        if not m:
            continue
        n, what = int(m.group(1)), m.group(2)
        seen.append(n)
        if not ESTIMATE.search(PATH.sub("", what)):
            problems.append(f"step {n}/5 has no time estimate: {line.strip()!r}")
    if seen != [1, 2, 3, 4, 5]:
        problems.append(f"expected the step lines 1..5 once each in order, found {seen}")

    took = [TOOK.search(line) for line in lines]
    took = [m for m in took if m]
    if not took:
        problems.append("no 'steps took: ...' line")
    else:
        got = [(int(n), name) for n, name, _, _ in TOOK_STEP.findall(took[-1].group(1))]
        if [n for n, _ in got] != [1, 2, 3, 4, 5]:
            problems.append(f"'steps took' lists steps {[n for n, _ in got]}, not 1..5 with 'M min S s' each: "
                            f"{took[-1].group(0)!r}")

    try:
        up = next(i for i, line in enumerate(lines) if line.startswith("Pulse is up. State, data and logs: "))
    except StopIteration:
        return problems + ["no banner ('Pulse is up. State, data and logs: ...')"]
    banner = lines[up:]
    state = env.get("PULSE_STATE")
    if state and not banner[0].endswith(state):
        problems.append(f"the banner names another state folder than {state}: {banner[0]!r}")
    ports = {k: env.get(k) or str(v) for k, v in PORTS.items()}
    for label, wants in BANNER.items():
        line = next((x for x in banner if re.match(rf"  {re.escape(label)}\s{{2,}}\S", x)), None)
        if line is None:
            problems.append(f"the banner has no '{label}' line")
            continue
        for i, want in enumerate(wants):
            pat = re.escape(want.format(**ports))
            if "{PULSE_" in want and want.endswith("}"):
                pat += r"(?!\d)"  # the whole port, not a prefix of another
            if i == 0:  # the line's own URL comes first, right after the label
                pat = rf"^  {re.escape(label)}\s{{2,}}" + pat
            if not re.search(pat, line):
                problems.append(f"the banner's '{label}' line lacks {want.format(**ports)!r}: {line.strip()!r}")
    text_banner = "\n".join(banner)
    for name, (var, default) in ADMIN.items():
        if not re.search(rf"(?<!\d){env.get(var) or default} {re.escape(name)}\b", text_banner):
            problems.append(f"the banner's metrics URLs lack '{env.get(var) or default} {name}'")
    if "}/metrics" not in text_banner:
        problems.append("the banner's metrics line lacks '/metrics'")
    for hint in HINTS:
        if not any(x.startswith(hint) for x in banner):
            problems.append(f"the banner lacks the hint {hint!r}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    with open(argv[1], errors="replace") as f:
        problems = check(f.read())
    for p in problems:
        print(f"dev.sh up output: {p}")
    if not problems:
        print(f"dev.sh up output: every step with an estimate, step times and banner URLs present ({argv[1]})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
