"""The chaos suite (issue #15): the whole local platform, brought up by `scripts/dev.sh up`
in its own state folder on free ports, under a seeded `pulsectl loadgen` workload with
duplicates, out-of-order, late and malformed events, while faults are injected at seeded
random moments; then, after recovery, a reconciliation of every event:

- every event a client got a success for (`accepted`, or `duplicate` of an earlier stored
  attempt, as loadgen books it) is in ClickHouse exactly once (`pulse.events FINAL`) and in
  the Parquet archive (distinct event ids; the archive is at least once by design, extra
  rows are reported);
- no event is stored that no client sent, and an event stored without a success answer is
  only one whose request got no answer (loadgen's `failed`/`unsent`);
- every aggregate the query API serves for the run's closed windows equals loadgen's
  expected answers (`--expect-out`);
- the DLQ holds exactly the malformed events, each with loadgen's reason code (a second copy of one
  is allowed only after a broker stall or restart, counted as `dlq_duplicate_records`);
- the late topic holds exactly the late events.

Faults: kill -9 of each service and a restart (as an orchestrator would); a broker
restart; the broker paused (SIGSTOP) for longer than the producers' message timeout and
producer stall timeout, then resumed (a broker that then fails every request — Tansu's
storage task can panic after such a resume, lite.rs:503 — or keeps a group waiting for a
leader that left is restarted by the local stack's broker supervisor, scripts/stack.sh, as a
liveness probe would, and the table says so; if the broker is still broken 60 s after the
fault the suite restarts it as an operator would, and that fails the run); ClickHouse paused
(a hung server); ClickHouse stopped for longer than the writers' max.poll.interval.ms, with
a SIGTERM of the ClickHouse writer during the outage; S3 stopped. `quick` (run by
scripts/test.sh) injects a seeded subset (every consumer kill, the registry kill, a broker
restart, the broker stall, both ClickHouse faults, S3, one of the ingest/query-API kills);
`soak` all of them, repeated. `--plan` prints a seed's faults without running them.

Restarts reuse each process's own command line, environment and working folder, read
from /proc after `dev.sh up` started it, so they follow dev.sh as it changes. Any process
that exits on its own is restarted too and reported (an orchestrator restarts pods).

Run through scripts/chaos.sh (which checks the binaries and picks the venv's Python).
Prints a table (faults with time to recover, events sent/accepted/stored, max RSS per
process from /proc/<pid>/status VmHWM) and exits 1 naming each failed check.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("PULSE_CACHE", Path.home() / ".cache/pulse"))
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", CACHE / "target"))
BIN = TARGET / "debug"

TOKEN = "pulse-dev-token"
API_KEY = "pulse-dev-key"
SERVICES = ["schema-registry", "ingest", "processor", "writer-clickhouse", "writer-parquet", "query-api"]
BACKING = ["kafka", "clickhouse", "s3"]
ADMIN_ENV = {
    "schema-registry": "PULSE_SCHEMA_REGISTRY_ADMIN_PORT",
    "ingest": "PULSE_INGEST_ADMIN_PORT",
    "processor": "PULSE_PROCESSOR_ADMIN_PORT",
    "writer-clickhouse": "PULSE_WRITER_CLICKHOUSE_ADMIN_PORT",
    "writer-parquet": "PULSE_WRITER_PARQUET_ADMIN_PORT",
    "query-api": "PULSE_QUERY_ADMIN_PORT",
}
PORT_ENV = [
    "PULSE_KAFKA_PORT", "PULSE_CLICKHOUSE_HTTP_PORT", "PULSE_CLICKHOUSE_TCP_PORT", "PULSE_S3_PORT",
    "PULSE_SCHEMA_REGISTRY_PORT", "PULSE_INGEST_HTTP_PORT", "PULSE_INGEST_GRPC_PORT",
    "PULSE_QUERY_HTTP_PORT", "PULSE_QUERY_GRPC_PORT", "PULSE_PROMETHEUS_PORT",
    "PULSE_ALERTMANAGER_PORT", *ADMIN_ENV.values(),
]
EVENTS_TOPIC = "pulse.events.v1"
DLQ_TOPIC = "pulse.events.dlq.v1"
LATE_TOPIC = "pulse.events.late.v1"
LATENESS_MS = 60_000  # the processor's default allowed lateness
SENTINELS = 30

# Settings that make faults bite within seconds (all documented knobs of the services).
MESSAGE_TIMEOUT_MS = 5_000
STALL_TIMEOUT = "5s"
SESSION_TIMEOUT_MS = 6_000
MAX_POLL_INTERVAL_MS = 8_000
WRITER_SHUTDOWN_TIMEOUT_MS = 10_000
# A stage with no new data this long after a fault, while everything says ready, is stuck.
STUCK_S = 45
# A broker still failing this long after a fault (or outside one) is restarted by the suite
# (a failed check) when the local stack's broker supervisor (scripts/stack.sh, which
# restarts one that fails its probe 3 times in a row, 3 s apart) is not running.
OPERATOR_S = 60

T0 = time.monotonic()


def now() -> float:
    return time.monotonic() - T0


def say(msg: str) -> None:
    print(f"[chaos {now():6.1f}s] {msg}", flush=True)


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports: every socket is held until all are picked, so the
    kernel cannot hand the same port out twice."""
    # Below the kernel's ephemeral range (32768 up): a bind(0) port is ephemeral, and an
    # outgoing connection can take it before the service binds it.
    ports: list[int] = []
    while len(ports) < n:
        port = random.randint(20000, 32000)
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    return ports


def http(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None,
         timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except Exception as e:  # refused, reset, timeout: no answer
        return 0, str(e).encode()


@dataclass
class Spec:
    """How to start a process again: what dev.sh started, read from /proc."""
    argv: list[str]
    env: dict[str, str]
    cwd: str


@dataclass
class Fault:
    name: str
    at_s: float = 0.0
    lasted_s: float = 0.0
    recover_s: float | None = None
    notes: list[str] = field(default_factory=list)
    stuck: bool = False  # recovered only after an operator restarted a service


class Platform:
    def __init__(self, state: Path, env: dict[str, str]):
        self.state = state
        self.env = env
        self.specs: dict[str, Spec] = {}
        self.children: dict[str, subprocess.Popen] = {}
        self.hwm_kib: dict[str, int] = {}
        self.pids_seen: dict[str, set[int]] = {}
        self.unexpected: dict[str, int] = {}
        self.expected_down: set[str] = set()
        self.lock = threading.Lock()
        self.stop_sampling = threading.Event()
        self.broker_bad_since: float | None = None
        self.operator_notes: list[str] = []
        self.port = lambda name: int(env[name])

    # --- processes -------------------------------------------------------------------
    def dev(self, cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
        with open(self.state / f"dev-{cmd}.log", "ab") as log:
            return subprocess.run(["bash", str(REPO / "scripts/dev.sh"), cmd], env=self.env,
                                  stdout=log, stderr=subprocess.STDOUT, timeout=timeout)

    def pid(self, name: str) -> int | None:
        try:
            return int((self.state / "pids" / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    @staticmethod
    def pid_alive(pid: int | None) -> bool:
        if pid is None:
            return False
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"

    def alive(self, name: str) -> bool:
        return self.pid_alive(self.pid(name))

    def capture(self, name: str) -> None:
        pid = self.pid(name)
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        env = dict(kv.decode().split("=", 1) for kv in raw if b"=" in kv)
        argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
        self.specs[name] = Spec(argv=argv, env=env, cwd=os.readlink(f"/proc/{pid}/cwd"))

    def signal(self, name: str, sig: int) -> None:
        pid = self.pid(name)
        if self.pid_alive(pid):
            os.kill(pid, sig)

    def wait_dead(self, name: str, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.reap()
            if not self.alive(name):
                return True
            time.sleep(0.1)
        return False

    def kill9(self, name: str) -> None:
        self.signal(name, signal.SIGKILL)
        self.wait_dead(name, 10)

    def stop(self, name: str) -> None:
        """SIGTERM and wait, as stack.sh's stop_proc (SIGKILL after 20 s)."""
        self.signal(name, signal.SIGTERM)
        if not self.wait_dead(name, 20):
            say(f"{name} did not stop in 20 s; killing it")
            self.kill9(name)

    def start(self, name: str) -> None:
        """start_proc with the process's own recorded command, env and folder."""
        spec = self.specs[name]
        log = open(self.state / "logs" / f"{name}.log", "ab")
        p = subprocess.Popen(spec.argv, env=spec.env, cwd=spec.cwd, stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        log.close()
        self.children[f"{name}-{p.pid}"] = p  # every incarnation, so each is reaped
        (self.state / "pids" / f"{name}.pid").write_text(f"{p.pid}\n")

    def reap(self) -> None:
        for p in list(self.children.values()):
            p.poll()

    def reaper(self) -> None:
        """Waits for our children, so a stopped one is gone, not a zombie that `kill -0`
        (stack.sh's stop_proc) takes for alive."""
        while True:
            self.reap()
            time.sleep(0.2)

    # --- memory ----------------------------------------------------------------------
    def sample(self) -> None:
        while not self.stop_sampling.wait(0.5):
            self.reap()
            for name in SERVICES + BACKING:
                pid = self.pid(name)
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            kib = int(line.split()[1])
                            with self.lock:
                                self.hwm_kib[name] = max(self.hwm_kib.get(name, 0), kib)
                                self.pids_seen.setdefault(name, set()).add(pid)
                except (OSError, ValueError):
                    pass

    # --- health ----------------------------------------------------------------------
    def metric(self, name: str, series: str) -> float | None:
        """The sum of a series in a service's /metrics (None when it cannot be read)."""
        code, body = http(f"http://127.0.0.1:{self.port(ADMIN_ENV[name])}/metrics", timeout=3)
        if code != 200:
            return None
        values = [float(line.rsplit(" ", 1)[1]) for line in body.decode(errors="replace").splitlines()
                  if line.startswith(series + "{") or line.startswith(series + " ")]
        return sum(values) if values else None

    def readyz(self, name: str) -> tuple[int, str]:
        code, body = http(f"http://127.0.0.1:{self.port(ADMIN_ENV[name])}/readyz", timeout=3)
        return code, body.decode(errors="replace").strip()

    def broker_health(self) -> str:
        """'ok', or why a real produce failed (as `dev.sh status` checks the broker)."""
        from confluent_kafka import Producer
        from confluent_kafka.admin import AdminClient, NewTopic
        outcome: list = []
        bootstrap = f"127.0.0.1:{self.port('PULSE_KAFKA_PORT')}"
        try:
            admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
            if "_pulse_health" not in admin.list_topics(timeout=5).topics:
                for fut in admin.create_topics([NewTopic("_pulse_health", 1, 1)]).values():
                    try:
                        fut.result(5)
                    except Exception as e:  # created meanwhile by `dev.sh status`
                        if "TOPIC_ALREADY_EXISTS" not in str(e):
                            raise
            p = Producer({"bootstrap.servers": f"127.0.0.1:{self.port('PULSE_KAFKA_PORT')}",
                          "message.timeout.ms": 5000, "socket.timeout.ms": 5000, "log_level": 0})
            p.produce("_pulse_health", b"ping", on_delivery=lambda err, msg: outcome.append(err))
            p.flush(8)
        except Exception as e:
            return f"request failed: {e}"
        if not outcome:
            return "produce not acknowledged within 5 s"
        return "ok" if outcome[0] is None else f"produce failed: {outcome[0]}"

    def clickhouse_ok(self) -> bool:
        code, body = http(f"http://127.0.0.1:{self.port('PULSE_CLICKHOUSE_HTTP_PORT')}/ping", timeout=2)
        return code == 200 and body.strip() == b"Ok."

    def s3_ok(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port("PULSE_S3_PORT")), timeout=2).close()
            return True
        except OSError:
            return False

    def supervise(self) -> None:
        """Restarts what exited on its own (as an orchestrator restarts a pod) and counts it."""
        self.reap()
        for name in BACKING + SERVICES:
            if name in self.expected_down or self.alive(name):
                continue
            if name == "kafka" and (self.state / "pids" / "kafka.restarting").exists():
                continue  # the local stack's broker supervisor is replacing it
            self.unexpected[name] = self.unexpected.get(name, 0) + 1
            tail = (self.state / "logs" / f"{name}.log").read_text(errors="replace").splitlines()[-3:]
            say(f"{name} exited on its own; restarting it. Last log lines: " + " | ".join(tail)[-600:])
            self.start(name)

    def supervisor_log_at(self) -> int:
        try:
            return len((self.state / "logs" / "kafka-supervisor.log").read_text(errors="replace"))
        except OSError:
            return 0

    def supervisor_restarts(self, since: int) -> list[str]:
        """The broker restarts of the local stack's supervisor (stack.sh, a liveness probe's
        stand-in) logged after offset `since`, each with the probe failure that caused it."""
        try:
            lines = (self.state / "logs" / "kafka-supervisor.log").read_text(errors="replace")[since:].splitlines()
        except OSError:
            return []
        out, why = [], ""
        for line in lines:
            if " failed: " in line:
                why = line.split(" failed: ", 1)[1]
            elif "restarting the broker" in line:
                out.append(why[:200])
        return out

    def broker_operator(self, notes: list[str]) -> None:
        """Outside a fault: a broker that fails every request for OPERATOR_S although the
        local stack's supervisor restarts a broker that fails its probe 3 times in a row is
        restarted, as an operator would; that is noted, and fails the run."""
        if self.broker_health() == "ok":
            self.broker_bad_since = None
            return
        if self.broker_bad_since is None:
            self.broker_bad_since = now()
        elif now() - self.broker_bad_since > OPERATOR_S:
            panics = (self.state / "logs" / "kafka.log").read_text(errors="replace").count("panicked")
            note = (f"broker failed every request for {OPERATOR_S} s at {now():.0f}s ({panics} Tansu panics in "
                    "kafka.log so far)")
            if self.alive("kafka-supervisor"):
                note += "; its supervisor keeps probing it"
            else:
                note += "; restarted it as an operator would"
                self.stop("kafka")
                self.start("kafka")
            say(note)
            notes.append(note)
            self.broker_bad_since = None

    def unhealthy(self) -> list[str]:
        """What is not healthy now (empty when the platform is fully recovered)."""
        self.supervise()
        bad = []
        if not self.clickhouse_ok():
            bad.append("clickhouse")
        if not self.s3_ok():
            bad.append("s3")
        for name in SERVICES:
            code, body = self.readyz(name)
            if code != 200:
                bad.append(f"{name} ({code}: {body[:120]})")
        if not bad:
            h = self.broker_health()
            if h != "ok":
                bad.append(f"kafka ({h})")
        return bad

    def data_lagging(self, lifted_ms: int) -> list[str]:
        lagging = []
        try:
            n = clickhouse(self, f"SELECT count() FROM pulse.events WHERE ingest_time_ms >= {lifted_ms}")
            if int(n.strip() or 0) == 0:
                lagging.append("no event ingested since the fault in ClickHouse")
            w = clickhouse(self, "SELECT max(last_ingest_ms) FROM pulse.user_activity")
            if int(w.strip() or 0) < lifted_ms:
                lagging.append("no window with an event ingested since the fault")
        except (RuntimeError, ValueError) as e:
            lagging.append(f"ClickHouse: {e}")
        newest = max((os.path.getmtime(f) for f in glob.glob(str(self.state / "s3") + "/**/*.parquet",
                                                             recursive=True)), default=0)
        if newest * 1000 < lifted_ms:
            lagging.append("no Parquet object since the fault")
        return lagging

    def wait_recovered(self, fault: Fault, started: float, deadline_s: float,
                       broker_fault: bool = False) -> None:
        """Polls until healthy; with a broker fault, restarts a broker that stays broken."""
        last: list[str] = []
        operator_restart_done = False
        lifted_ms = int(time.time() * 1000)
        ready_s = None
        operator_restarted: set[str] = set()
        sup_at = fault.__dict__.get("_supervisor_at", 0)
        calm_since, restarts_seen = started, 0  # the stuck clock restarts with each broker restart
        while now() - started < deadline_s:
            last = self.unhealthy()
            if not last and ready_s is None:
                ready_s = now() - started
            if not last:
                # Data flows again: an event ingested after the fault was lifted is in
                # ClickHouse, the processor emitted a window holding one, and the archive
                # uploaded an object since.
                last = self.data_lagging(lifted_ms)
            if not last:
                fault.recover_s = now() - started
                fault.notes.insert(0, f"ready {ready_s:.1f}s")
                for why in self.supervisor_restarts(sup_at):
                    fault.notes.append(f"broker restarted by the local stack's supervisor ({why})")
                return
            # A stage whose data stopped although every /readyz says ready (a consumer
            # left without partitions) gets what an operator would do: a restart. The fault
            # still counts as not recovered by itself (a failed check).
            n = len(self.supervisor_restarts(sup_at))
            if n != restarts_seen:
                restarts_seen, calm_since = n, now()
            if now() - calm_since > STUCK_S and all(not b.split(" ")[0] in SERVICES for b in last):
                stuck = {"no event ingested since the fault in ClickHouse": "writer-clickhouse",
                         "no window with an event ingested since the fault": "processor",
                         "no Parquet object since the fault": "writer-parquet"}
                for why in last:
                    name = stuck.get(why)
                    if name and name not in operator_restarted:
                        note = (f"STUCK: {why} {now() - started:.0f}s after the fault while every "
                                f"/readyz said ready ({name}: pulse_kafka_assigned_partitions "
                                f"{self.metric(name, 'pulse_kafka_assigned_partitions')}); "
                                f"restarted {name} as an operator would")
                        say(note)
                        fault.notes.append(note)
                        fault.stuck = True
                        operator_restarted.add(name)
                        self.kill9(name)
                        self.start(name)
                # Still stuck after that: the broker's group state is the suspect, so the
                # next operator step is a broker restart.
                if (now() - started > 2 * STUCK_S and operator_restarted and "kafka" not in operator_restarted
                        and not self.alive("kafka-supervisor")):
                    note = (f"STUCK: still {'; '.join(last)} {now() - started:.0f}s after the fault "
                            "after restarting the stuck service; restarted the broker as an operator would")
                    say(note)
                    fault.notes.append(note)
                    operator_restarted.add("kafka")
                    self.stop("kafka")
                    self.start("kafka")
            broker_bad = any(b.startswith("kafka") for b in last) or (
                broker_fault and not self.broker_health() == "ok")
            if broker_fault and broker_bad and not operator_restart_done and now() - started > OPERATOR_S:
                log = (self.state / "logs" / "kafka.log").read_text(errors="replace")
                panicked = "panicked" in log[fault.__dict__.get("_log_at", 0):]
                note = (f"broker fails every request {OPERATOR_S} s after the fault"
                        + (" (Tansu panicked: see kafka.log)" if panicked else ""))
                operator_restart_done = True
                if self.alive("kafka-supervisor"):
                    # The stack's own restarter keeps its job (two restarters race for the
                    # port and the pid file); not recovering by the deadline fails the run.
                    note += "; its supervisor keeps probing it"
                else:
                    note = "STUCK: " + note + "; restarted it as an operator would"
                    fault.stuck = True
                    self.stop("kafka")
                    self.start("kafka")
                say(note)
                fault.notes.append(note)
            time.sleep(0.5)
        fault.notes.append("NOT RECOVERED: " + "; ".join(last))


# --- faults ----------------------------------------------------------------------------
def kill_and_restart(p: Platform, name: str) -> Fault:
    f = Fault(f"kill -9 {name}")
    p.expected_down.add(name)
    p.kill9(name)
    time.sleep(1)
    p.start(name)
    p.expected_down.discard(name)
    return f


def restart_broker(p: Platform) -> Fault:
    f = Fault("restart broker (SIGTERM, start)")
    p.expected_down.add("kafka")
    p.stop("kafka")
    time.sleep(2)
    p.start("kafka")
    p.expected_down.discard("kafka")
    return f


def pause(p: Platform, name: str, seconds: float, why: str) -> Fault:
    f = Fault(f"SIGSTOP {name} {seconds:.0f}s ({why})")
    f._log_at = len((p.state / "logs" / f"{name}.log").read_text(errors="replace"))  # type: ignore[attr-defined]
    p.signal(name, signal.SIGSTOP)
    time.sleep(seconds)
    p.signal(name, signal.SIGCONT)
    return f


def stop_clickhouse_and_term_writer(p: Platform, seconds: float) -> Fault:
    f = Fault(f"stop clickhouse {seconds:.0f}s (> max.poll.interval.ms {MAX_POLL_INTERVAL_MS}) "
              "+ SIGTERM writer-clickhouse in it")
    p.expected_down.update({"clickhouse", "writer-clickhouse"})
    p.stop("clickhouse")
    t = time.monotonic()  # down from here (its own shutdown can take ~10 s)
    time.sleep(seconds / 2)
    t_term = time.monotonic()
    p.stop("writer-clickhouse")
    f.notes.append(f"writer exited {time.monotonic() - t_term:.1f}s after SIGTERM")
    p.start("writer-clickhouse")
    p.expected_down.discard("writer-clickhouse")
    time.sleep(max(0.0, seconds - (time.monotonic() - t)))
    p.start("clickhouse")
    p.expected_down.discard("clickhouse")
    return f


def stop_start(p: Platform, name: str, seconds: float) -> Fault:
    f = Fault(f"stop {name} {seconds:.0f}s, start")
    p.expected_down.add(name)
    p.stop(name)
    time.sleep(seconds)
    p.start(name)
    p.expected_down.discard(name)
    return f


def fault_table() -> dict:
    """Every fault by its `--faults` name: a callable taking the platform, returning a Fault."""
    named = {f"kill-{n}": (lambda p, n=n: kill_and_restart(p, n)) for n in SERVICES}
    named.update({
        "broker-restart": restart_broker,
        "broker-stall": lambda p: pause(p, "kafka", MESSAGE_TIMEOUT_MS / 1000 * 2 + 2,
                                        "> producers' message timeout"),
        "clickhouse-pause": lambda p: pause(p, "clickhouse", 8, "hung server"),
        "clickhouse-outage": lambda p: stop_clickhouse_and_term_writer(p, MAX_POLL_INTERVAL_MS / 1000 + 4),
        "s3-outage": lambda p: stop_start(p, "s3", 8),
    })
    return named


def plan(profile: str, rng: random.Random, only: list[str] | None = None) -> list[str]:
    """The faults' names (keys of fault_table()), in order."""
    if only:
        unknown = [n for n in only if n not in fault_table()]
        if unknown:
            raise SystemExit(f"--faults: unknown {unknown}; known: {', '.join(fault_table())}")
        return list(only)
    sinks = ["broker-stall", "clickhouse-pause", "clickhouse-outage", "s3-outage"]
    if profile == "quick":
        # A kill -9 of every consumer-group member (the processor and both writers: on
        # Tansu 0.6 a member's kill can leave its group formed with no assignment, which the
        # consumer watchdog repairs), one of ingest and the query API (seeded), the broker
        # stall (Tansu may then keep a group waiting for a leader that left, which the local
        # stack's broker supervisor repairs with a restart), a hung and a stopped ClickHouse
        # (with the writer's SIGTERM), S3 stopped; in a seeded order. Then the registry's
        # kill -9 and a broker restart, each at a seeded position: drawn after the shuffle,
        # so a seed orders the faults above as it did before these two joined.
        members = ["kill-processor", "kill-writer-clickhouse", "kill-writer-parquet"]
        chosen = [rng.choice(["kill-ingest", "kill-query-api"]), *members, *sinks]
        rng.shuffle(chosen)
        for name in ("kill-schema-registry", "broker-restart"):
            chosen.insert(rng.randrange(len(chosen) + 1), name)
        return chosen
    rounds: list[str] = []
    for _ in range(3):
        r = [f"kill-{n}" for n in SERVICES] + ["broker-restart", *sinks]
        rng.shuffle(r)
        rounds += r
    return rounds


# --- reading the stores ----------------------------------------------------------------
def clickhouse(p: Platform, sql: str) -> str:
    code, body = http(f"http://127.0.0.1:{p.port('PULSE_CLICKHOUSE_HTTP_PORT')}/", "POST",
                      sql.encode(), timeout=60)
    if code != 200:
        raise RuntimeError(f"ClickHouse {code}: {body[:300]!r} for {sql}")
    return body.decode()


def parquet_ids(state: Path) -> list[str]:
    import pyarrow.parquet as pq
    ids: list[str] = []
    for f in sorted(glob.glob(str(state / "s3") + "/**/*.parquet", recursive=True)):
        ids += pq.read_table(f, columns=["event_id"]).column("event_id").to_pylist()
    return ids


def read_topic(p: Platform, topic: str) -> list[tuple[str | None, str | None, bytes]]:
    """(event id header, error code header, value) of every record, to the current end."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": f"127.0.0.1:{p.port('PULSE_KAFKA_PORT')}",
                  "group.id": f"chaos-{uuid.uuid4()}", "enable.auto.commit": False})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {}
        for n in parts:
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, n), timeout=10)
            if hi > lo:
                ends[n] = hi
        c.assign([TopicPartition(topic, n, OFFSET_BEGINNING) for n in ends])
        out = []
        deadline = time.monotonic() + 60
        while ends and time.monotonic() < deadline:
            m = c.poll(1.0)
            if m is None or m.error():
                continue
            h = dict((k, v.decode(errors="replace") if v else None) for k, v in (m.headers() or []))
            out.append((h.get("pulse-event-id"), h.get("pulse-error-code"), m.value() or b""))
            if m.offset() + 1 >= ends.get(m.partition(), 0):
                ends.pop(m.partition(), None)
        if ends:
            raise RuntimeError(f"could not read {topic} to its end within 60 s")
        return out
    finally:
        c.close()


def query(p: Platform, path: str) -> dict:
    code, body = http(f"http://127.0.0.1:{p.port('PULSE_QUERY_HTTP_PORT')}{path}",
                      headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    if code != 200:
        raise RuntimeError(f"GET {path}: {code} {body[:300]!r}")
    return json.loads(body)


def rfc3339_ms(s: str) -> int:
    return int(dt.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() * 1000)


def answers(p: Platform, exp: dict) -> dict:
    """The query API's answers in the shape of loadgen's (as it::e2e compares them)."""
    rng = f"from={exp['range']['from_ms']}&to={exp['range']['to_ms']}"
    au = query(p, f"/v1/active_users?{rng}&step=1m")
    rev = query(p, f"/v1/revenue?{rng}&step=1m")
    top = query(p, f"/v1/top_pages?{rng}&limit=10")
    users = {}
    for user in exp["users"]:
        u = query(p, f"/v1/users/{user}?{rng}")
        users[user] = {"first_seen_ms": rfc3339_ms(u["first_seen"]), "last_seen_ms": rfc3339_ms(u["last_seen"]),
                       "page_views": u["page_views"], "events": u["events"], "sessions": u["sessions"]}
    s = query(p, f"/v1/sessions?{rng}")
    return {
        "active_users": [{"ts_ms": rfc3339_ms(pt["ts"]), "active_users": pt["active_users"]}
                         for pt in au["series"] if pt["active_users"] != 0],
        "revenue": [{"ts_ms": rfc3339_ms(pt["ts"]), "currency": pt["currency"], "amount": pt["amount"]}
                    for pt in rev["series"]],
        "top_pages": top["pages"],
        "users": users,
        "sessions": {k: s[k] for k in ["sessions", "avg_duration_seconds", "p50_duration_seconds",
                                       "p95_duration_seconds", "avg_pages"]},
        "complete": au["freshness"]["complete"],
    }


def expected_answers(exp: dict) -> dict:
    return {
        "active_users": [pt for pt in exp["active_users"] if pt["active_users"] != 0],
        "revenue": exp["revenue"], "top_pages": exp["top_pages"], "users": exp["users"],
        "sessions": exp["sessions"], "complete": True,
    }


def send_sentinels(p: Platform, wave: int, at_ms: int) -> list[str]:
    """Events dated after the run for users of every partition: they move each partition's
    watermark past the run's windows + the allowed lateness, so those windows are final."""
    ids = [f"chaos-sentinel-{wave}-{i}" for i in range(SENTINELS)]
    body = json.dumps([{"schema_version": 1, "event_type": "page_view", "event_id": i,
                        "key": {"user_id": f"sentinel-{n}"}, "payload": {"page": "/sentinel"},
                        "metadata": {"event_timestamp": at_ms}} for n, i in enumerate(ids)]).encode()
    for _ in range(60):
        code, resp = http(f"http://127.0.0.1:{p.port('PULSE_INGEST_HTTP_PORT')}/v1/events", "POST", body,
                          {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}, 30)
        if code == 200:
            if all(x["status"] in ("accepted", "duplicate") for x in json.loads(resp)["results"]):
                return ids
            raise RuntimeError(f"sentinels refused: {resp[:400]!r}")
        time.sleep(1)
    raise RuntimeError(f"ingest did not take the sentinels: {code} {resp[:300]!r}")


# --- the run ---------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=["quick", "soak"], default="quick")
    ap.add_argument("--seed", type=int, default=None, help="faults' and workload's seed (default: clock)")
    ap.add_argument("--rate", type=float, default=None, help="loadgen events/s")
    ap.add_argument("--keep", action="store_true", help="keep the state folder even on success")
    ap.add_argument("--plan", action="store_true", help="print the seed's faults in order and exit")
    ap.add_argument("--faults", default="", help="only these faults, in order (comma-separated; "
                    "kill-<service>, broker-restart, broker-stall, clickhouse-pause, clickhouse-outage, s3-outage)")
    args = ap.parse_args()

    def terminated(signum, _frame):
        raise SystemExit(128 + signum)  # unwinds through `finally`: the platform is stopped

    signal.signal(signal.SIGTERM, terminated)
    seed = args.seed if args.seed is not None else int(time.time()) % 100_000
    rng = random.Random(seed)
    soak = args.profile == "soak"
    rate = args.rate or (40.0 if soak else 30.0)
    planned = plan(args.profile, rng, [f for f in args.faults.split(",") if f])
    if args.plan:
        print(f"profile {args.profile}, seed {seed}: {', '.join(planned)}")
        return 0
    say(f"profile {args.profile}, seed {seed} (re-run: scripts/chaos.sh {'--soak ' if soak else ''}--seed {seed}): "
        + ", ".join(planned))

    state = Path(tempfile.mkdtemp(prefix="pulse-chaos."))
    env = dict(os.environ)
    # The ledger's admin port too (dev.sh's default 9107 would collide with another stack).
    ports = PORT_ENV + ["PULSE_LEDGER_ADMIN_PORT"]
    for name, port in zip(ports, free_ports(len(ports))):
        env[name] = str(port)
    env.update({
        "PULSE_STATE": str(state), "PULSE_DEV_PROFILE": "debug", "PULSE_DEV_BUILD": "0",
        "PULSE_DEV_LOADGEN": "0",
        # The default (a registry with users), whatever the caller's shell says.
        "PULSE_DEV_REGISTRY_AUTH": "1",
        "PULSE_PROCESSOR_IDLE_TIMEOUT_MS": "3000", "PULSE_WRITER_PARQUET_MAX_AGE_MS": "2000",
        "PULSE_KAFKA_MESSAGE_TIMEOUT_MS": str(MESSAGE_TIMEOUT_MS),
        "PULSE_KAFKA_PRODUCER_STALL_TIMEOUT": STALL_TIMEOUT,
        "PULSE_KAFKA_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
        # The consumers' stuck-member watchdog (platform consumer): at least twice the session.
        "PULSE_KAFKA_CONSUMER_STUCK_TIMEOUT": "15s",
        "PULSE_WRITER_SHUTDOWN_TIMEOUT_MS": str(WRITER_SHUTDOWN_TIMEOUT_MS),
    })
    p = Platform(state, env)
    failures: list[str] = []
    faults: list[Fault] = []
    counts: dict[str, object] = {}
    ok_up = False
    loadgen: subprocess.Popen | None = None
    try:
        t = now()
        r = p.dev("up")
        if r.returncode != 0:
            print((state / "dev-up.log").read_text(errors="replace")[-3000:])
            failures.append("scripts/dev.sh up failed (see above)")
            return 1  # the finally block reports and stops what started
        ok_up = True
        say(f"platform up in {now() - t:.0f}s (state {state})")
        # What dev.sh up told its user: step estimates, step times, banner URLs (issue #20).
        from devsh_up_output import check as devsh_up_problems
        up_log = (state / "dev-up.log").read_text(errors="replace")
        failures += [f"dev.sh up output: {x}" for x in devsh_up_problems(up_log, env)]
        # The registry dev.sh started refuses anonymous and read-only writes (issue #17).
        from devsh_registry_auth import banner_problems as registry_banner_problems
        from devsh_registry_auth import check as registry_auth_problems
        t = now()
        registry_failures = registry_banner_problems(up_log, env) + registry_auth_problems(env)
        failures += [f"registry auth: {x}" for x in registry_failures]
        verdict = "; ".join(registry_failures) or "anonymous and read-only writes refused, the write user's applied"
        say(f"registry auth: {verdict} ({now() - t:.1f}s)")
        for name in BACKING + SERVICES:
            p.capture(name)
        # The writers get a short max.poll.interval.ms (a consumer setting that would refuse
        # to start the registry, whose session timeout is its own), so a sink outage outlasts it.
        for name in ("writer-clickhouse", "writer-parquet"):
            extra = p.specs[name].env.get("PULSE_KAFKA_OPTIONS", "")
            p.specs[name].env["PULSE_KAFKA_OPTIONS"] = ",".join(
                x for x in (extra, f"max.poll.interval.ms={MAX_POLL_INTERVAL_MS}") if x)
            p.stop(name)
            p.start(name)
        t = now()
        while p.unhealthy() and now() - t < 60:
            time.sleep(0.5)
        threading.Thread(target=p.sample, daemon=True).start()
        threading.Thread(target=p.reaper, daemon=True).start()

        expect_file, record_file = state / "expected.json", state / "record.ndjson"
        lg_log = open(state / "logs" / "chaos-loadgen.log", "ab")
        loadgen = subprocess.Popen(
            [str(BIN / "pulsectl"), "loadgen", "--target", f"http://127.0.0.1:{env['PULSE_INGEST_HTTP_PORT']}",
             "--seed", str(seed), "--users", "40", "--rate", str(rate),
             "--duration", "0", "--out-of-order", "0.05", "--late", "0.02", "--late-warmup-ms", "8000",
             "--duplicates", "0.03", "--malformed", "0.02", "--max-retry", "10m", "--request-timeout", "10s",
             "--expect-out", str(expect_file), "--record", str(record_file)],
            # The API key from the environment: a secret is never a process argument.
            env={**os.environ, "PULSE_API_KEY": API_KEY},
            stdout=lg_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        time.sleep(6)
        for name in planned:
            time.sleep(rng.uniform(2, 6))
            at = now()
            say(f"injecting fault {name}")
            sup_at = p.supervisor_log_at()
            f = fault_table()[name](p)
            f._supervisor_at = sup_at  # type: ignore[attr-defined]
            f.at_s, f.lasted_s = at, now() - at
            say(f"{f.name}: lifted after {f.lasted_s:.1f}s; waiting for recovery")
            p.wait_recovered(f, now(), 100 if not soak else 150, broker_fault="kafka" in f.name)
            say(f"{f.name}: " + (f"recovered in {f.recover_s:.1f}s" if f.recover_s is not None
                                 else "NOT recovered") + (" — " + "; ".join(f.notes) if f.notes else ""))
            faults.append(f)
            if f.stuck and f.recover_s is not None:
                failures.append(f"the platform did not recover by itself from: {f.name} "
                                f"({'; '.join(n for n in f.notes if n.startswith('STUCK'))})")
            if f.recover_s is None:
                failures.append(f"the platform did not recover from: {f.name} ({'; '.join(f.notes)})")
                break
        time.sleep(4)
        p._after_faults_at = p.supervisor_log_at()  # type: ignore[attr-defined]
        loadgen.send_signal(signal.SIGINT)
        # loadgen retries unanswered batches (up to 10 min): keep the platform running
        # meanwhile, as an orchestrator and an operator would.
        t = now()
        while loadgen.poll() is None and now() - t < 660:
            p.supervise()
            p.broker_operator(p.operator_notes)
            time.sleep(1)
        if loadgen.poll() is None:
            loadgen.kill()
            failures.append("loadgen still had unanswered requests 11 min after the faults")
        lg_rc = loadgen.wait()
        lg_log.close()
        lg_out = (state / "logs" / "chaos-loadgen.log").read_text(errors="replace")
        if lg_rc != 0:
            failures.append(f"loadgen exited {lg_rc}: " + " | ".join(lg_out.splitlines()[-6:]))
        if not expect_file.exists() or not record_file.exists():
            failures.append("loadgen wrote no expect/record file")
            raise RuntimeError("no loadgen output to reconcile")
        exp = json.loads(expect_file.read_text())
        record = [json.loads(line) for line in record_file.read_text().splitlines() if line]
        status: dict[str, str] = {}
        for r_ in record:  # a re-sent id answered `accepted` once is a success for that id
            if status.get(r_["event_id"]) != "accepted":
                status[r_["event_id"]] = r_["status"]
        accepted = set(exp["accepted_event_ids"])
        late = set(exp["late_event_ids"])
        rejected = {r_["event_id"]: r_["reason_code"] for r_ in exp["rejected"]}
        unanswered = {i for i, s in status.items() if s in ("failed", "unsent")}
        counts.update(sent=len(record), distinct_ids=len(status), accepted=len(accepted),
                      duplicates=exp["duplicates"], rejected=len(rejected), late=len(late),
                      unanswered=len(unanswered))
        if len(accepted) < 500 or not late or not rejected or not exp["duplicates"]:
            failures.append(f"workload too small or without late/malformed/duplicate events: {counts}")

        # Windows become final: sentinels dated after the run (as it::e2e does).
        to_ms = exp["range"]["to_ms"]
        sentinels = send_sentinels(p, 1, to_ms + 1_000) + send_sentinels(p, 2, to_ms + 60_000 + LATENESS_MS + 10_000)
        want = expected_answers(exp)
        t = now()
        got: dict = {}
        # A run that already failed gets less time to settle (it fails either way).
        settle_limit, store_limit = (180, 90) if not failures else (60, 30)
        while now() - t < settle_limit:
            p.supervise()
            p.broker_operator(p.operator_notes)
            try:
                got = answers(p, exp)
            except Exception as e:
                got = {"error": str(e)}
            if got == want:
                break
            time.sleep(2)
        settle_s = now() - t
        counts["settle_s"] = round(settle_s)
        if got != want:
            for key, w in want.items():
                if got.get(key) != w:
                    failures.append(f"aggregate {key} differs from loadgen's expected answer:\n"
                                    f"    query API: {json.dumps(got.get(key))[:1500]}\n"
                                    f"    expected:  {json.dumps(w)[:1500]}")
            if "error" in got:
                failures.append(f"query API: {got['error']}")

        # Stores: ClickHouse exactly once, the archive every id, no stranger.
        must = accepted | set(sentinels)
        may = must | unanswered
        ch_ids: list[str] = []
        pq_ids: list[str] = []
        t = now()
        while now() - t < store_limit:
            p.broker_operator(p.operator_notes)
            ch_ids = clickhouse(p, "SELECT event_id FROM pulse.events FINAL FORMAT TabSeparated").split()
            pq_ids = parquet_ids(state)
            if must <= set(ch_ids) and must <= set(pq_ids):
                break
            time.sleep(2)
        ch_set, pq_set = set(ch_ids), set(pq_ids)
        raw_rows = int(clickhouse(p, "SELECT count() FROM pulse.events").strip())
        counts.update(clickhouse=len(ch_set), clickhouse_rows_final=len(ch_ids), clickhouse_rows_raw=raw_rows,
                      parquet=len(pq_set), parquet_rows=len(pq_ids))
        for store, ids, s in (("ClickHouse", ch_ids, ch_set), ("the Parquet archive", pq_ids, pq_set)):
            missing = sorted(must - s)
            if missing:
                failures.append(f"LOSS: {len(missing)} event(s) a client got a success for are not in {store}: "
                                f"{missing[:10]}")
            strangers = sorted(s - may)
            if strangers:
                failures.append(f"{len(strangers)} event(s) in {store} that no client got a success for "
                                f"nor sent without an answer: {strangers[:10]}")
        if len(ch_ids) != len(ch_set):
            dup = sorted({i for i in ch_ids if ch_ids.count(i) > 1})
            failures.append(f"DUPLICATE: {len(dup)} event id(s) more than once in ClickHouse under FINAL: {dup[:10]}")
        stored_unanswered = len(unanswered & ch_set)
        counts["stored_without_answer"] = stored_unanswered

        # DLQ: exactly the malformed events, with their reasons; late topic: the late ones.
        dlq = read_topic(p, DLQ_TOPIC)
        dlq_ids: dict[str, str] = {}
        for _, code, value in dlq:
            try:
                eid = json.loads(value).get("event_id", "<no event_id>")
            except Exception:
                eid = "<not JSON>"
            dlq_ids[str(eid)] = code or ""
        counts.update(dlq_records=len(dlq))
        if dlq_ids != rejected:
            extra = {k: v for k, v in dlq_ids.items() if rejected.get(k) != v}
            miss = {k: v for k, v in rejected.items() if dlq_ids.get(k) != v}
            failures.append(f"DLQ differs from the malformed events: in DLQ only {list(extra.items())[:8]}, "
                            f"malformed but not in DLQ {list(miss.items())[:8]}")
        # The DLQ is at-least-once like the archive: a malformed event whose 503 came from a
        # broker that stored the record but never acknowledged it (a stall or restart) is
        # written again by the client's retry. Outside broker faults a second copy is a defect.
        counts["dlq_duplicate_records"] = len(dlq) - len(dlq_ids)
        broker_fault = any(f.name.startswith(("SIGSTOP kafka", "restart broker")) for f in faults)
        if len(dlq) != len(dlq_ids) and not broker_fault:
            failures.append(f"DLQ holds {len(dlq)} records for {len(dlq_ids)} malformed events (some twice)")
        late_ids = {i for i, _, _ in read_topic(p, LATE_TOPIC)}
        counts["late_topic"] = len(late_ids)
        if late_ids != late:
            failures.append(f"late topic differs: only in topic {sorted(late_ids - late)[:8]}, "
                            f"late but not in topic {sorted(late - late_ids)[:8]}")
    except Exception as e:  # a harness error is a failure too, never a pass
        import traceback
        traceback.print_exc()
        failures.append(f"harness error: {e}")
    finally:
        p.stop_sampling.set()
        if loadgen is not None and loadgen.poll() is None:
            loadgen.kill()
            loadgen.wait()
        if ok_up or (state / "pids").exists():
            t = now()
            r = p.dev("down", timeout=300)
            say(f"dev.sh down in {now() - t:.0f}s")
            if r.returncode != 0:
                failures.append("scripts/dev.sh down failed")
        for note in p.operator_notes:
            failures.append(f"the broker did not recover by itself: {note}")
        report(args.profile, seed, faults, counts, p, failures)
        if failures or args.keep:
            say(f"state, data and logs kept in {state}")
        else:
            subprocess.run(["rm", "-rf", str(state)])
    return 1 if failures else 0


def report(profile: str, seed: int, faults: list[Fault], counts: dict, p: Platform, failures: list[str]) -> None:
    print(f"\n== chaos {profile}, seed {seed} ==")
    print(f"{'#':>2} {'at s':>6} {'fault':<78} {'lasted':>7} {'recover':>8}  notes")
    for i, f in enumerate(faults, 1):
        rec = f"{f.recover_s:.1f}s" if f.recover_s is not None else "NO"
        print(f"{i:>2} {f.at_s:>6.0f} {f.name:<78} {f.lasted_s:>6.1f}s {rec:>8}  {'; '.join(f.notes)}")
    for note in p.operator_notes:
        print(f"   after the faults: {note}")
    for why in p.supervisor_restarts(p.__dict__.get("_after_faults_at", 0)):
        print(f"   after the faults: broker restarted by the local stack's supervisor ({why})")
    if counts:
        print("\nevents: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"\n{'process':<18} {'max RSS (VmHWM)':>16} {'incarnations':>13} {'exited on its own':>18}")
    for name in SERVICES + BACKING:
        kib = p.hwm_kib.get(name)
        print(f"{name:<18} {(f'{kib / 1024:.1f} MiB' if kib else '-'):>16} "
              f"{len(p.pids_seen.get(name, ())):>13} {p.unexpected.get(name, 0):>18}")
    if failures:
        print(f"\nFAILED ({len(failures)}):")
        for f in failures:
            print(f"  - {f}")
    else:
        print("\nall checks passed: every accepted event stored once in ClickHouse and in the archive, "
              "aggregates exact, DLQ and late topic exact")


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    os._exit(rc)  # skip interpreter teardown: pyarrow's pools can abort it
