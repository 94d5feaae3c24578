"""The memory benchmark (issue #15, "Bounded memory"): the whole local platform, brought up
by `scripts/dev.sh up` in its own state folder on free ports (as the chaos suite does),
under a high-cardinality `pulsectl loadgen` workload: `--users` distinct users taking turns
(`--user-order turns`), so every user is active and each one's session stays open for the
whole run when `users / rate` is below the processor's session gap (30 min).

Every second it reads VmRSS and VmHWM (peak RSS) and CPU time from /proc/<pid>/status
and /proc/<pid>/stat of each service and of the backing processes, and scrapes the state
gauges: the processor's open sessions, open windows and held records, ingest's dedup set
size and producer queue depth, the consumers' lag. Meanwhile a dashboard-like reader
queries the query API every second. At the end it counts the stored events and distinct
users in ClickHouse, prints a table (service, peak RSS, RSS at the end, goal, pass/fail),
the state at its peak, events sent/accepted and distinct users, and writes the same as
Markdown (`--out`) plus every sample as CSV next to it.

Goals (issue #15): every stateless service (ingest, both writers, query API, schema
registry) under 64 MiB peak RSS; the processor under 64 MiB plus its state budget. The
processor's state grows with the users active within the session gap and the windows
open within the allowed lateness; the benchmark reports the RSS growth per 100,000 open
sessions, fitted over the run, as the per-entry cost.

A benchmark, not a test: it exits 0 when the run itself worked (whatever pass/fail says),
1 when the platform did not come up, loadgen failed, or nothing reached ClickHouse.
Run through `scripts/bench.sh memory` (builds the binaries and picks the venv's Python).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chaos import ADMIN_ENV, BACKING, CACHE, PORT_ENV, SERVICES, TARGET, Platform, free_ports, http  # noqa: E402
from devsh_up_output import check as devsh_up_problems  # noqa: E402

MIB = 1024 * 1024
GOAL_MIB = 64
STATELESS = ["ingest", "writer-clickhouse", "writer-parquet", "query-api", "schema-registry"]
# dev.sh also runs the ledger (`pulsectl ledger watch`); measured, no goal in the issue.
EXTRA = ["ledger"]
LEDGER_ENV = "PULSE_LEDGER_ADMIN_PORT"
GAUGES = {
    "processor": ["pulse_processor_open_sessions", "pulse_processor_open_windows",
                  "pulse_processor_held_records", "pulse_processor_events_total",
                  "pulse_processor_state_bytes", "pulse_processor_state_budget_bytes",
                  "pulse_processor_heap_allocated_bytes", "pulse_processor_heap_active_bytes",
                  "pulse_processor_heap_resident_bytes", "pulse_kafka_consumer_lag_records",
                  # Revokes + assignments + errors: 1 (the first assignment) in a run the
                  # group never rebalanced; more means a restore from checkpoints and a replay.
                  "pulse_kafka_rebalances_total"],
    "ingest": ["pulse_ingest_dedup_set_size", "pulse_ingest_producer_queue_depth"],
    "writer-clickhouse": ["pulse_kafka_consumer_lag_records"],
    "writer-parquet": ["pulse_kafka_consumer_lag_records"],
    "ledger": ["pulse_ledger_held_events", "pulse_ledger_rereads_total"],
}
ADMIN_PORT_ENV = {**ADMIN_ENV, "ledger": LEDGER_ENV}
# What every Pulse service sets for glibc's allocator at start (pulse_platform::malloc).
TUNABLES = "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=131072"
# Shown as "at the end" too: how far each consumer got (a processor that fell behind holds
# less state than the workload would give it).
PROGRESS = {"pulse_processor_events_total", "pulse_kafka_rebalances_total", "pulse_kafka_consumer_lag_records", "pulse_ledger_rereads_total",
            "pulse_processor_state_budget_bytes"}
CLK_TCK = os.sysconf("SC_CLK_TCK")

T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[memory {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def status_kib(pid: int | None) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in KiB of a live process, None when it cannot be read."""
    if pid is None:
        return None
    rss = hwm = None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    except (OSError, ValueError):
        return None
    return (rss, hwm) if rss is not None and hwm is not None else None


def cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a live process."""
    if pid is None:
        return None
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


def tunables(pid: int | None) -> str | None:
    """GLIBC_TUNABLES in a live process's environment ('' when unset), None if unreadable."""
    if pid is None:
        return None
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for i, var in enumerate(env):
        if var.startswith(b"GLIBC_TUNABLES="):
            # glibc (2.36) parses the variable in place, writing NUL over each ':'.
            parts = [var.split(b"=", 1)[1]]
            j = i + 1
            while j < len(env) and env[j].startswith(b"glibc."):
                parts.append(env[j])
                j += 1
            return b":".join(parts).decode(errors="replace")
    return ""


def scrape(port: int, names: list[str]) -> dict[str, float]:
    """Each gauge summed over its label sets (missing ones left out)."""
    code, body = http(f"http://127.0.0.1:{port}/metrics", timeout=3)
    if code != 200:
        return {}
    out: dict[str, float] = {}
    for line in body.decode(errors="replace").splitlines():
        for n in names:
            if line.startswith(n + "{") or line.startswith(n + " "):
                try:
                    out[n] = out.get(n, 0.0) + float(line.rsplit(" ", 1)[1])
                except ValueError:
                    pass
    return out


@dataclass
class Mem:
    peak_rss_kib: int = 0
    tunables: str | None = None
    hwm_kib: int = 0
    end_rss_kib: int = 0
    idle_rss_kib: int = 0
    cpu_start_s: float | None = None
    cpu_end_s: float = 0.0
    pids: set[int] = field(default_factory=set)


class Sampler:
    def __init__(self, p: Platform, names: list[str], csv_path: Path):
        self.p = p
        self.names = names
        self.mem = {n: Mem() for n in names}
        self.gauge_peak: dict[str, float] = {}
        self.gauge_last: dict[str, float] = {}
        self.rows: list[dict] = []
        self.stop = threading.Event()
        self.phase = "idle"
        self.csv_path = csv_path
        self.lock = threading.Lock()

    def once(self) -> None:
        row: dict = {"t_s": round(time.monotonic() - T0, 1), "phase": self.phase}
        for n in self.names:
            pid = self.p.pid(n)
            st = status_kib(pid)
            if st is None:
                continue
            rss, hwm = st
            cpu = cpu_s(pid)
            with self.lock:
                m = self.mem[n]
                if cpu is not None:
                    if m.cpu_start_s is None or self.phase == "idle":
                        m.cpu_start_s = cpu
                    m.cpu_end_s = cpu
                if pid not in m.pids:
                    m.tunables = tunables(pid)
                m.pids.add(pid)
                m.peak_rss_kib = max(m.peak_rss_kib, rss)
                m.hwm_kib = max(m.hwm_kib, hwm)
                m.end_rss_kib = rss
                if self.phase == "idle":
                    m.idle_rss_kib = rss
            row[f"{n}_rss_kib"] = rss
        for svc, names in GAUGES.items():
            for k, v in scrape(self.p.port(ADMIN_PORT_ENV[svc]), names).items():
                if k.startswith("pulse_kafka_"):  # the platform's series: named per service
                    k = f"{svc}:{k}"
                with self.lock:
                    self.gauge_peak[k] = max(self.gauge_peak.get(k, 0.0), v)
                    self.gauge_last[k] = v
                row[k] = v
        self.rows.append(row)

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            self.once()
            self.stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))

    def write_csv(self) -> None:
        cols: list[str] = []
        for r in self.rows:
            cols.extend(k for k in r if k not in cols)
        with open(self.csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(self.rows)


def slope_per_100k(rows: list[dict], x: str, y: str) -> float | None:
    """Least-squares slope of y (KiB) over x, in MiB per 100,000 of x, over the load phase
    samples where x > 0; None with too few points or no spread in x."""
    pts = [(r[x], r[y]) for r in rows if r.get("phase") == "load" and r.get(x) and r.get(y)]
    if len(pts) < 5:
        return None
    n = len(pts)
    mx = sum(a for a, _ in pts) / n
    my = sum(b for _, b in pts) / n
    sxx = sum((a - mx) ** 2 for a, _ in pts)
    if sxx < 1e-9 or max(a for a, _ in pts) - min(a for a, _ in pts) < 1000:
        return None
    sxy = sum((a - mx) * (b - my) for a, b in pts)
    return sxy / sxx * 100_000 / 1024


def processor_gap(rows: list[dict]) -> list[str]:
    """Where the processor's RSS beyond its estimated state goes, over the load phase
    samples with state (MiB): RSS − estimate at its largest, at the state's peak and its
    median, each split as the heap gauges tell (jemalloc's statistics, read at the same
    second, the estimate at the loop's emissions): omitted (heap allocated − estimate), free room in the heap's
    pages (active − allocated), the heap's metadata and dirty pages (resident − active)
    and outside the Rust heap (RSS − heap resident: the binary, stacks, librdkafka)."""
    pts = [r for r in rows if r.get("phase") == "load" and r.get("pulse_processor_state_bytes")
           and r.get("processor_rss_kib")]
    if not pts:
        return []

    def split(r: dict) -> str:
        rss = r["processor_rss_kib"] * 1024
        est = r["pulse_processor_state_bytes"]
        alloc, active, res = (r.get(f"pulse_processor_heap_{k}_bytes") for k in ("allocated", "active", "resident"))
        head = f"{(rss - est) / MIB:.1f} MiB (RSS {rss / MIB:.1f}, estimate {est / MIB:.1f}"
        if not (alloc and active and res):
            return head + ")"
        return (head + f"; omitted {(alloc - est) / MIB:.1f} + free in pages {(active - alloc) / MIB:.1f} "
                f"+ metadata and dirty {(res - active) / MIB:.1f} + outside the heap {(rss - res) / MIB:.1f})")

    gaps = sorted(pts, key=lambda r: r["processor_rss_kib"] * 1024 - r["pulse_processor_state_bytes"])
    peak = max(pts, key=lambda r: r["pulse_processor_state_bytes"])
    return [f"| processor RSS − estimated state, largest (goal < {GOAL_MIB} MiB) | {split(gaps[-1])} | |",
            f"| processor RSS − estimated state, at the state's peak | {split(peak)} | |",
            f"| processor RSS − estimated state, median | {split(gaps[len(gaps) // 2])} | |"]


def query_load(p: Platform, stop: threading.Event, users: int, seed: int, tally: dict) -> None:
    """Dashboard-like reads through the query API while the load runs: every second the
    series of the last 10 minutes, top pages, sessions, freshness and one user's lookup."""
    base = f"http://127.0.0.1:{p.port('PULSE_QUERY_HTTP_PORT')}"
    hdr = {"Authorization": "Bearer pulse-dev-token"}
    i = 0
    while not stop.wait(1.0):
        to = (int(time.time()) // 60 + 1) * 60_000
        frm = to - 600_000
        for path in (f"/v1/active_users?from={frm}&to={to}&step=1m", f"/v1/revenue?from={frm}&to={to}&step=1m",
                     f"/v1/top_pages?from={frm}&to={to}&limit=10", f"/v1/sessions?from={frm}&to={to}",
                     f"/v1/users/lg-{seed}-u{(i * 7919) % users:04}?from={frm}&to={to}", "/v1/freshness"):
            code, _ = http(base + path, headers=hdr, timeout=10)
            key = "query_ok" if code in (200, 404) else f"query_{code or 'no_answer'}"
            tally[key] = tally.get(key, 0) + 1
        i += 1


def clickhouse(p: Platform, sql: str) -> str:
    code, body = http(f"http://127.0.0.1:{p.port('PULSE_CLICKHOUSE_HTTP_PORT')}/", "POST", sql.encode(),
                      timeout=120)
    if code != 200:
        raise RuntimeError(f"ClickHouse {code}: {body[:300]!r}")
    return body.decode().strip()


def loadgen_summary(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in ("sent", "accepted", "duplicates", "rejected", "failed", "unsent"):
        m = re.search(rf"^\s+{key}\s+(\d+)", text, re.M)
        if m:
            out[key] = int(m.group(1))
    m = re.search(r"achieved rate ([\d.]+) events/s over ([\d.]+) s", text)
    if m:
        out["achieved_rate"], out["elapsed_s"] = float(m.group(1)), float(m.group(2))
    return out


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB" if kib else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=["debug", "release"], default="release",
                    help="which binaries dev.sh runs (figures are only meaningful for release)")
    ap.add_argument("--users", type=int, default=1_000_000, help="distinct users (taking turns)")
    ap.add_argument("--rate", type=float, default=4000.0, help="loadgen events/s")
    ap.add_argument("--duration", type=int, default=300, help="loadgen seconds")
    ap.add_argument("--settle", type=int, default=30, help="seconds sampled after loadgen ended")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--out", type=Path, default=None,
                    help="Markdown report (default: $PULSE_CACHE/bench/memory-<profile>.md; the samples go "
                         "next to it as .csv)")
    ap.add_argument("--state-users", type=int, default=100_000,
                    help="first run bench-memory (the processor's state per user, no platform) with this many "
                         "users; 0 skips it")
    ap.add_argument("--keep", action="store_true", help="keep the state folder")
    args = ap.parse_args()

    def terminated(signum, _frame):
        raise SystemExit(128 + signum)  # unwinds through `finally`: the platform is stopped

    signal.signal(signal.SIGTERM, terminated)
    bin_dir = TARGET / args.profile
    state = Path(tempfile.mkdtemp(prefix="pulse-memory."))
    out = args.out or CACHE / "bench" / f"memory-{args.profile}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for name, port in zip(PORT_ENV + [LEDGER_ENV], free_ports(len(PORT_ENV) + 1)):
        env[name] = str(port)
    env.update({"PULSE_STATE": str(state), "PULSE_DEV_PROFILE": args.profile, "PULSE_DEV_BUILD": "0",
                "PULSE_DEV_LOADGEN": "0"})
    p = Platform(state, env)
    names = SERVICES + EXTRA + BACKING
    sampler = Sampler(p, names, out.with_suffix(".csv"))
    failures: list[str] = []
    lg_text = ""
    counts: dict[str, float] = {}
    ok_up = False
    loadgen: subprocess.Popen | None = None
    state_table = ""
    try:
        if args.state_users > 0:
            say(f"bench-memory: the processor's state per user ({args.state_users} users, no platform)")
            r = subprocess.run([str(bin_dir / "bench-memory"), "--users", str(args.state_users)],
                               capture_output=True, text=True, timeout=900)
            if r.returncode != 0:
                failures.append(f"bench-memory exited {r.returncode}: {r.stderr[-600:]}")
            state_table = r.stdout.strip()
            print(state_table, flush=True)
        t = time.monotonic()
        r = p.dev("up", timeout=900)
        if r.returncode != 0:
            print((state / "dev-up.log").read_text(errors="replace")[-3000:])
            failures.append("scripts/dev.sh up failed (see above)")
            return 1
        ok_up = True
        say(f"platform up in {time.monotonic() - t:.0f}s ({args.profile} binaries, state {state})")
        # What dev.sh up told its user (issue #20; the chaos suite fails on it, here it is shown).
        up_problems = devsh_up_problems((state / "dev-up.log").read_text(errors="replace"), env)
        say("dev.sh up output: " + ("; ".join(up_problems) or "every step with an estimate, banner URLs present"))
        threading.Thread(target=sampler.run, daemon=True).start()
        time.sleep(5)
        sampler.phase = "load"
        threading.Thread(target=query_load, args=(p, sampler.stop, args.users, args.seed, counts),
                         daemon=True).start()
        cmd = [str(bin_dir / "pulsectl"), "loadgen",
               "--target", f"http://127.0.0.1:{env['PULSE_INGEST_HTTP_PORT']}",
               "--seed", str(args.seed), "--users", str(args.users), "--user-order", "turns",
               "--rate", str(args.rate), "--duration", f"{args.duration}s",
               "--batch-size", str(args.batch_size), "--concurrency", str(args.concurrency),
               "--max-retry", "120s"]
        say("loadgen: " + " ".join(cmd[1:]))
        lg_log = state / "logs" / "bench-loadgen.log"
        with open(lg_log, "wb") as f:
            # The API key from the environment: a secret is never a process argument.
            loadgen = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env={**os.environ, "PULSE_API_KEY": "pulse-dev-key"})
            last = 0.0
            while loadgen.poll() is None:
                time.sleep(1)
                if time.monotonic() - last >= 30:
                    last = time.monotonic()
                    g = sampler.gauge_last
                    say(f"open sessions {g.get('pulse_processor_open_sessions', 0):.0f}, open windows "
                        f"{g.get('pulse_processor_open_windows', 0):.0f}, dedup set "
                        f"{g.get('pulse_ingest_dedup_set_size', 0):.0f}; RSS "
                        + ", ".join(f"{n} {mib(sampler.mem[n].end_rss_kib)}" for n in SERVICES))
        lg_rc = loadgen.wait()
        lg_text = lg_log.read_text(errors="replace")
        counts.update(loadgen_summary(lg_text))
        if lg_rc != 0:
            failures.append(f"loadgen exited {lg_rc}: " + " | ".join(lg_text.splitlines()[-6:]))
        sampler.phase = "settle"
        say(f"loadgen done ({counts}); sampling {args.settle}s more while the pipeline drains")
        time.sleep(args.settle)
        sampler.stop.set()
        time.sleep(1.2)
        try:
            stored, users = clickhouse(p, "SELECT count(), uniqExact(user_id) FROM pulse.events").split()
            counts["stored_rows"], counts["distinct_users_stored"] = int(stored), int(users)
            if int(stored) == 0:
                failures.append("no event reached ClickHouse")
        except Exception as e:
            failures.append(f"counting in ClickHouse failed: {e}")
    except Exception as e:  # a harness error fails the run, never a silent pass
        import traceback
        traceback.print_exc()
        failures.append(f"harness error: {e}")
    finally:
        sampler.stop.set()
        if loadgen is not None and loadgen.poll() is None:
            loadgen.kill()
            loadgen.wait()
        if ok_up or (state / "pids").exists():
            r = p.dev("down", timeout=300)
            if r.returncode != 0:
                failures.append("scripts/dev.sh down failed")
        if sampler.rows:
            sampler.write_csv()
        text = report(args, sampler, counts, failures, state_table)
        print("\n" + text)
        out.write_text(text)
        say(f"report written to {out}; samples in {sampler.csv_path}")
        if failures or args.keep:
            say(f"state, data and logs kept in {state}")
        else:
            subprocess.run(["rm", "-rf", str(state)])
    return 1 if failures else 0


def report(args, s: Sampler, counts: dict, failures: list[str], state_table: str) -> str:
    g = s.gauge_peak
    sessions = g.get("pulse_processor_open_sessions", 0)
    per_sess = slope_per_100k(s.rows, "pulse_processor_open_sessions", "processor_rss_kib")
    per_dedup = slope_per_100k(s.rows, "pulse_ingest_dedup_set_size", "ingest_rss_kib")
    lines = [
        f"## Memory benchmark ({args.profile} binaries)",
        "",
        f"Workload: `pulsectl loadgen --users {args.users} --user-order turns --rate {args.rate:g} "
        f"--duration {args.duration}s --batch-size {args.batch_size} --concurrency {args.concurrency} "
        f"--seed {args.seed}` (default shares of out-of-order, late, duplicate and malformed events), "
        f"then {args.settle} s of draining; RSS sampled every second from /proc/<pid>/status.",
        "",
        "| service | peak RSS (VmHWM) | RSS at end | idle RSS before load | CPU s during the run | goal | result "
        "| glibc allocator |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in s.names:
        m = s.mem[n]
        hwm = m.hwm_kib
        if n in STATELESS:
            goal = f"< {GOAL_MIB} MiB"
            res = ("pass" if hwm < GOAL_MIB * 1024 else "FAIL") if hwm else "no data"
        elif n == "processor":
            goal = f"< {GOAL_MIB} MiB + state budget"
            extra = hwm - GOAL_MIB * 1024
            budget = g.get("pulse_processor_state_budget_bytes", 0)
            state = g.get("pulse_processor_state_bytes", 0)
            res = ("pass" if extra <= 0 else
                   f"{extra / 1024:.1f} MiB above {GOAL_MIB} MiB for {sessions:,.0f} open sessions, estimated state "
                   f"{state / MIB:.1f} MiB at its peak; the state is bounded by `--state-budget-bytes` "
                   + (f"({budget / MIB:.0f} MiB in this run)" if budget else "(none set in this run)"))
        else:
            goal, res = "(not a Pulse service)" if n in BACKING else "(no goal)", "-"
        restarts = f" ({len(m.pids)} pids)" if len(m.pids) > 1 else ""
        cpu = f"{m.cpu_end_s - m.cpu_start_s:.0f}" if m.cpu_start_s is not None else "-"
        alloc = ("-" if n in BACKING else "tuned" if m.tunables == TUNABLES else
                 "glibc defaults" if m.tunables == "" else f"GLIBC_TUNABLES={m.tunables}" if m.tunables else "?")
        lines.append(f"| {n}{restarts} | {mib(hwm)} | {mib(m.end_rss_kib)} | {mib(m.idle_rss_kib)} | {cpu} "
                     f"| {goal} | {res} | {alloc} |")
    lines += [
        "",
        "| state and progress | peak | at the end |",
        "|---|---|---|",
    ]
    for k in sorted(g, key=lambda k: (k.split(":")[-1] in PROGRESS, k)):
        lines.append(f"| `{k}` | {g[k]:,.0f} | {s.gauge_last.get(k, 0):,.0f} |")
    if per_sess is not None:
        lines.append(f"| processor RSS growth per 100,000 open sessions (fit over the load) | {per_sess:.1f} MiB | |")
    lines += processor_gap(s.rows)
    per_state = slope_per_100k(s.rows, "pulse_processor_open_sessions", "pulse_processor_state_bytes")
    if per_state is not None:
        # The state gauge is in bytes, the fit takes KiB.
        lines.append(f"| processor estimated state growth per 100,000 open sessions (fit over the load) "
                     f"| {per_state / 1024:.1f} MiB | |")
    if per_dedup is not None:
        lines.append(f"| ingest RSS growth per 100,000 dedup ids (fit over the load) | {per_dedup:.1f} MiB | |")
    lines += ["", "| events | value |", "|---|---|"]
    for k in ("sent", "accepted", "duplicates", "rejected", "failed", "unsent", "achieved_rate", "elapsed_s",
              "stored_rows", "distinct_users_stored", *sorted(k for k in counts if k.startswith("query_"))):
        if k in counts:
            v = counts[k]
            lines.append(f"| {k.replace('_', ' ')} | {v:,.1f} |" if isinstance(v, float) and not v.is_integer()
                         else f"| {k.replace('_', ' ')} | {v:,.0f} |")
    processed, accepted = s.gauge_last.get("pulse_processor_events_total", 0), counts.get("accepted", 0)
    if accepted and processed < accepted:
        # Its state then covers fewer users than the workload: say so beside the figures.
        lines += ["", f"The processor processed {processed:,.0f} of the {accepted:,.0f} accepted events by the end "
                  f"(its open sessions peaked at {sessions:,.0f}): it stopped or fell behind (see its log)."]
    if state_table:
        lines += ["", "The processor's state per user, measured alone (`bench-memory`: RSS growth while "
                  "folding one event per user into each structure):", "", "```", state_table, "```"]
    if failures:
        lines += ["", "Run FAILED:"] + [f"- {f}" for f in failures]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    os._exit(rc)
