"""The freshness benchmark (issue #19, goal 3): how long after ingest acknowledged an event
(the HTTP 200 its client got) the event is visible in the query API, end to end on the
whole local platform (`scripts/dev.sh up` in its own state folder on free ports, as the
memory benchmark and the chaos suite start it), under a steady `pulsectl loadgen` workload.

1. **Rate.** `--rate N` fixes loadgen's rate; `--rate 0` (the default) first measures what
   the stack sustains here: loadgen open loop at `--calibrate-rate` for `--calibrate-secs`,
   and the sustained rate is the lowest of ingest's accepted events/s, the processor's
   counted events/s and the ClickHouse writer's `events` rows/s over that window (what
   every stage kept up with). The run then waits until the consumers' lag is drained, and
   the measured phase runs loadgen at `--load-share` (0.5) of that rate.
2. **Probes.** Every `--probe-interval` seconds one `page_view` of a user unique to the probe
   (`fp-<run>-<n>`, dated now) is POSTed on its own. From its acknowledgement on, one direct
   ClickHouse SELECT every `--poll-ms` asks for the `user_activity` rows of every probe in
   flight; from a probe's first sight there on, `GET /v1/users/{id}` of exactly its
   live-minute window (`from` = the minute, `to` = the minute + 1 ms) is polled every
   `--api-poll-ms`, then one live-minute `GET /v1/active_users` is sent.
3. **Stages**, per probe, from what is observable (all clocks are this machine's):
   - *ingest → topic*: the probe's `pulse-ingest-ts` header (ingest stamped it) → the
     acknowledgement; the record's Kafka timestamp (librdkafka's CreateTime at the
     produce call) is reported beside it. This stage ends before the clock starts.
   - *processor emit*: acknowledgement → the Kafka timestamp of the first
     `pulse.user-activity.v1` record of the probe's window (the processor consumed the
     event, waited for its emission tick, produced the early result).
   - *writer consume*: that timestamp → the row's `written_at_ms` (the ClickHouse writer
     stamps a row when it reads the record, crates/writer/src/clickhouse_sink.rs `add`).
   - *writer flush + ClickHouse visibility*: `written_at_ms` → the first direct
     `SELECT` that returns the row (the batch waits for `--batch-max-age-ms` / rows, then
     the INSERT). Split further by the writer's own `pulse_writer_batch_write_seconds`
     (the INSERTs' duration, a histogram over the run, not per probe): ClickHouse's part.
   - *query API*: the first direct sight → the first `/v1/users/{id}` answer with the
     event. The API caches only its table-wide freshness (`--freshness-cache-ms`), never
     data, so this is the request's own time plus the poll interval.
   Every "first sight" is an upper bound with the poll interval's resolution.
   - *active_users*: the live minute's count cannot be attributed to one user while the
     workload runs (the route has no user filter), so it is not observed per probe: its
     figure is the completion time of the first live-minute `/v1/active_users` request sent
     after ClickHouse showed the row — the same `user_activity` row read the same way
     (argMax of the versions), with no data cache in between.
4. **Resources.** Every second, RSS and CPU of every service and backing process
   (`/proc`), as `memory_bench.py` samples them; over the measured phase: peak and end RSS
   per service, CPU-seconds, events per CPU-second (ingest: accepted events; processor:
   its counted events; writers: `events` rows written), and the broker's share of all the
   platform's CPU. The writer's and processor's latency histograms are scraped too.

Prints a Markdown report (also `--out`, default `$PULSE_CACHE/bench/freshness.md`) and, with
`--json FILE`, every figure machine-readable (`scripts/bench.sh all` reads it). A
benchmark, not a test: exit 0 when the run worked (whatever the goal says), 1 when the
platform did not come up, loadgen failed or no probe was seen.
Run through `scripts/bench.sh freshness` (builds the release binaries, picks the venv).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chaos import BACKING, CACHE, PORT_ENV, SERVICES, TARGET, Platform, free_ports, http  # noqa: E402
from memory_bench import ADMIN_PORT_ENV, EXTRA, LEDGER_ENV, Sampler, cpu_s, loadgen_summary  # noqa: E402

TOKEN = "pulse-dev-token"
API_KEY = "pulse-dev-key"
GOAL_P95_S = 1.0
MIB = 1024 * 1024
STAGES = [
    ("ingest_to_topic", "ingest → topic (ingest stamp → ack; before the clock starts)"),
    ("processor_emit", "processor emit (ack → result record on the topic)"),
    ("writer_consume", "writer consume (result record → writer read it)"),
    ("writer_flush_visible", "writer flush + ClickHouse visibility (read → SELECT sees the row)"),
    ("query_api", "query API (SELECT sees it → /v1/users answers it)"),
]
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[freshness {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def now_ms() -> float:
    return time.time() * 1000.0


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (the element at ceil(q·n) − 1 of the sorted values)."""
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    import math
    return v[max(0, math.ceil(q * len(v)) - 1)]


def hist(port: int, name: str, match: dict[str, str] | None = None) -> dict[float, float]:
    """Cumulative bucket counts (le → count) of a Prometheus histogram, summed over the label
    sets that contain `match`."""
    code, body = http(f"http://127.0.0.1:{port}/metrics", timeout=3)
    out: dict[float, float] = {}
    if code != 200:
        return out
    for line in body.decode(errors="replace").splitlines():
        if not line.startswith(name + "_bucket{"):
            continue
        labels = line[line.index("{") + 1:line.rindex("}")]
        kv = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if match and any(kv.get(k) != v for k, v in match.items()):
            continue
        le = float("inf") if kv.get("le") == "+Inf" else float(kv.get("le", "nan"))
        out[le] = out.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def hist_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """The q-quantile of the observations between two scrapes, interpolated linearly within
    its bucket (as Prometheus' histogram_quantile does)."""
    les = sorted(after)
    counts = [after[le] - before.get(le, 0.0) for le in les]
    if not counts or counts[-1] <= 0:
        return None
    rank = q * counts[-1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in zip(les, counts):
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 1.0)
        prev_le, prev_c = le, c
    return None


class Probe:
    def __init__(self, n: int, user: str):
        self.n = n
        self.user = user
        self.event_id = f"{user}-e"
        self.sent_ms: float | None = None
        self.ack_ms: float | None = None
        self.ch_ms: float | None = None  # first direct SELECT that returned the row
        self.api_ms: float | None = None  # first /v1/users answer with the event
        self.active_ms: float | None = None  # /v1/active_users request sent after ch_ms, done
        self.active_count: int | None = None
        self.active_request_ms: float | None = None
        self.written_at_ms: float | None = None
        self.last_ingest_ms: float | None = None
        self.ingest_ts_ms: float | None = None  # pulse-ingest-ts header (events topic)
        self.event_record_ms: float | None = None  # Kafka timestamp, events topic
        self.emit_ms: float | None = None  # Kafka timestamp, first user-activity record
        self.error: str | None = None


class Freshness:
    def __init__(self, p: Platform, env: dict[str, str], args):
        self.p = p
        self.args = args
        self.query = f"http://127.0.0.1:{env['PULSE_QUERY_HTTP_PORT']}"
        self.ingest = f"http://127.0.0.1:{env['PULSE_INGEST_HTTP_PORT']}"
        self.ch = f"http://127.0.0.1:{env['PULSE_CLICKHOUSE_HTTP_PORT']}"
        self.run = uuid.uuid4().hex[:8]
        self.probes: list[Probe] = []
        self.lock = threading.Lock()

    def send(self, pr: Probe) -> None:
        t = int(now_ms())
        body = json.dumps([{
            "schema_version": 1, "event_type": "page_view", "event_id": pr.event_id,
            "key": {"user_id": pr.user},
            "payload": {"page": "/freshness-probe"},
            "metadata": {"event_timestamp": t, "source": "bench-freshness"},
        }]).encode()
        pr.sent_ms = now_ms()
        code, resp = http(self.ingest + "/v1/events", "POST", body,
                          {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}, timeout=30)
        pr.ack_ms = now_ms()
        if code != 200 or b'"accepted":1' not in resp:
            pr.error = f"ingest answered {code}: {resp[:200]!r}"

    def direct_poller(self, stop: threading.Event) -> None:
        """One direct ClickHouse SELECT every --poll-ms for every probe in flight (one
        statement however many are in flight, to keep the poll's own load small): the first
        one that returns a probe's `user_activity` row is its ClickHouse visibility."""
        poll = self.args.poll_ms / 1000.0
        while not stop.is_set():
            started = time.monotonic()
            with self.lock:
                waiting = [pr for pr in self.probes
                           if pr.error is None and pr.ack_ms is not None and pr.ch_ms is None
                           and now_ms() - pr.ack_ms < self.args.probe_timeout * 1000]
            if waiting:
                users = ",".join(f"'{pr.user}'" for pr in waiting)
                sql = ("SELECT user_id, min(written_at_ms), min(last_ingest_ms) FROM pulse.user_activity "
                       f"WHERE user_id IN ({users}) GROUP BY user_id FORMAT TSV").encode()
                code, body = http(self.ch + "/", "POST", sql, timeout=10)
                seen_at = now_ms()
                if code == 200:
                    by_user = {pr.user: pr for pr in waiting}
                    for line in body.decode().splitlines():
                        f = line.split("\t")
                        pr = by_user.get(f[0])
                        if pr is not None and len(f) == 3:
                            pr.written_at_ms, pr.last_ingest_ms = float(f[1]), float(f[2])
                            pr.ch_ms = seen_at
                            threading.Thread(target=self.watch_api, args=(pr,), daemon=True).start()
            stop.wait(max(0.0, poll - (time.monotonic() - started)))

    def watch_api(self, pr: Probe) -> None:
        """From ClickHouse's first sight on (the API has no other source, so it cannot answer
        earlier): `/v1/users/{id}` every --api-poll-ms until it answers with the event, then
        one live-minute `/v1/active_users`."""
        minute = int(pr.sent_ms // 60_000 * 60_000)
        hdr = {"Authorization": f"Bearer {TOKEN}"}
        # [minute, minute + 1 ms): exactly the probe's live-minute window (windows are chosen by
        # their start); the session, which starts at the event, is outside it.
        users_url = f"{self.query}/v1/users/{pr.user}?from={minute}&to={minute + 1}"
        deadline = time.monotonic() + self.args.probe_timeout
        poll = self.args.api_poll_ms / 1000.0
        failed = 0
        while time.monotonic() < deadline:
            started = time.monotonic()
            code, body = http(users_url, headers=hdr, timeout=10)
            if code >= 500 or code == 0:
                failed += 1
                if failed >= 5:  # a broken API, not a late event: say so instead of polling on
                    pr.error = f"/v1/users answered {code or 'nothing'} 5 times: {body[:300]!r}"
                    break
            if code == 200:
                try:
                    if json.loads(body).get("events", 0) >= 1:
                        pr.api_ms = now_ms()
                        break
                except ValueError:
                    pass
            time.sleep(max(0.0, poll - (time.monotonic() - started)))
        a_start = now_ms()
        c, b = http(f"{self.query}/v1/active_users?from={minute}&to={minute + 60_000}&step=1m",
                    headers=hdr, timeout=10)
        if c == 200:
            pr.active_ms = now_ms()
            pr.active_request_ms = pr.active_ms - a_start
            try:
                pr.active_count = json.loads(b)["series"][0]["active_users"]
            except (ValueError, KeyError, IndexError):
                pass
        if pr.api_ms is None and pr.error is None:
            pr.error = f"not visible in the query API within {self.args.probe_timeout:.0f} s"

    def probe_loop(self, stop: threading.Event) -> None:
        n = 0
        poll_stop = threading.Event()
        poller = threading.Thread(target=self.direct_poller, args=(poll_stop,), daemon=True)
        poller.start()
        while not stop.is_set():
            pr = Probe(n, f"fp-{self.run}-{n:05d}")
            n += 1
            with self.lock:
                self.probes.append(pr)
            self.send(pr)
            stop.wait(self.args.probe_interval)
        # Let the last probes arrive (or time out).
        end = time.monotonic() + self.args.probe_timeout + 5
        while time.monotonic() < end and any(pr.error is None and pr.api_ms is None for pr in self.probes):
            time.sleep(0.2)
        poll_stop.set()
        poller.join(timeout=15)
        for pr in self.probes:
            if pr.error is None and pr.ch_ms is None:
                pr.error = f"not visible in ClickHouse within {self.args.probe_timeout:.0f} s"

    def kafka_timestamps(self, brokers: str) -> None:
        """Reads the probes' records back (after the run: no extra broker load during it):
        the event's `pulse-ingest-ts` and timestamp, and the first result record's
        timestamp. Seeks by time to just before the first probe."""
        from confluent_kafka import OFFSET_END, Consumer, TopicPartition
        done = [pr for pr in self.probes if pr.ack_ms is not None]
        if not done:
            return
        by_user = {pr.user: pr for pr in done}
        start = int(min(pr.sent_ms for pr in done) - 5_000)
        prefix = f"fp-{self.run}-".encode()
        for topic in ("pulse.events.v1", "pulse.user-activity.v1"):
            c = Consumer({"bootstrap.servers": brokers, "group.id": f"bench-freshness-{self.run}",
                          "enable.auto.commit": False, "enable.partition.eof": True,
                          "fetch.max.bytes": 16 * MIB})
            try:
                md = c.list_topics(topic, timeout=10).topics[topic]
                parts = [TopicPartition(topic, p, start) for p in md.partitions]
                try:
                    parts = c.offsets_for_times(parts, timeout=15)
                    # -1: no record at or after the time (read from the end: nothing to find).
                    parts = [TopicPartition(topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_END)
                             for tp in parts]
                except Exception as e:  # the broker may not index timestamps: read it all
                    say(f"offsets_for_times on {topic} failed ({e}); reading from the start")
                    parts = [TopicPartition(topic, tp.partition, 0) for tp in parts]
                # Read each partition up to its high watermark (now: the run is over).
                high = {tp.partition: c.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=10)[1]
                        for tp in parts}
                eof = {tp.partition for tp in parts if tp.offset < 0 or tp.offset >= high[tp.partition]}
                c.assign([tp for tp in parts if tp.partition not in eof])
                idle_until = time.monotonic() + 120
                while len(eof) < len(parts) and time.monotonic() < idle_until:
                    msgs = c.consume(10_000, timeout=1.0)
                    for m in msgs:
                        if m.error():
                            if m.error().code() == -191:  # _PARTITION_EOF
                                eof.add(m.partition())
                            continue
                        if m.offset() + 1 >= high.get(m.partition(), 0):
                            eof.add(m.partition())
                        k = m.key() or b""
                        if not k.startswith(prefix):
                            continue
                        user = k.split(b"|", 1)[0].decode()
                        pr = by_user.get(user)
                        if pr is None:
                            continue
                        ts = m.timestamp()[1]
                        if topic == "pulse.events.v1":
                            if pr.event_record_ms is None:
                                pr.event_record_ms = ts
                                for hk, hv in m.headers() or []:
                                    if hk == "pulse-ingest-ts":
                                        pr.ingest_ts_ms = float(hv.decode())
                        elif pr.emit_ms is None or ts < pr.emit_ms:
                            pr.emit_ms = ts
            finally:
                c.close()


def clickhouse(url: str, sql: str) -> str:
    code, body = http(url + "/", "POST", sql.encode(), timeout=60)
    if code != 200:
        raise RuntimeError(f"ClickHouse {code}: {body[:300]!r}")
    return body.decode().strip()


def metric_sum(port: int, name: str, match: dict[str, str] | None = None) -> float:
    code, body = http(f"http://127.0.0.1:{port}/metrics", timeout=3)
    total = 0.0
    if code != 200:
        return total
    for line in body.decode(errors="replace").splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        if match:
            kv = dict(re.findall(r'(\w+)="([^"]*)"', line[:line.rfind(" ")]))
            if any(kv.get(k) != v for k, v in match.items()):
                continue
        try:
            total += float(line.rsplit(" ", 1)[1])
        except ValueError:
            pass
    return total


COUNTERS = {
    # service: (admin env, metric, labels) — the events each one handled
    "processor": ("PULSE_PROCESSOR_ADMIN_PORT", "pulse_processor_events_total", {"outcome": "added"}),
    "writer-clickhouse": ("PULSE_WRITER_CLICKHOUSE_ADMIN_PORT", "pulse_writer_rows_written_total",
                          {"sink": "clickhouse", "table": "events"}),
    # The archive counts rows when a roll is uploaded (hourly or --parquet-max-rows): its
    # consumed records instead.
    "writer-parquet": ("PULSE_WRITER_PARQUET_ADMIN_PORT", "pulse_kafka_consumed_records_total", None),
    "ingest": ("PULSE_INGEST_ADMIN_PORT", "pulse_ingest_events_total", {"outcome": "accepted"}),
}


def counters(p: Platform) -> dict[str, float]:
    return {svc: metric_sum(p.port(env), name, match) for svc, (env, name, match) in COUNTERS.items()}


def lag(p: Platform) -> float:
    # Processing lag (position, not committed offset: the processor commits only up to what its
    # open sessions still need, so its committed lag stays high by design).
    return sum(metric_sum(p.port(ADMIN_PORT_ENV[s]), "pulse_kafka_consumer_processing_lag_records")
               for s in ("processor", "writer-clickhouse", "writer-parquet"))


def run_loadgen(env: dict, bin_dir: Path, args, rate: float, secs: float, log: Path, seed: int) -> subprocess.Popen:
    cmd = [str(bin_dir / "pulsectl"), "loadgen", "--target", f"http://127.0.0.1:{env['PULSE_INGEST_HTTP_PORT']}",
           "--seed", str(seed), "--users", str(args.users), "--rate", f"{rate:.0f}",
           "--duration", f"{secs:.0f}s", "--batch-size", str(args.batch_size), "--concurrency",
           str(args.concurrency), "--max-retry", "120s", "--progress-interval", "10s"]
    say("loadgen: " + " ".join(cmd[1:]))
    f = open(log, "wb")
    # The API key from the environment: a secret is never a process argument.
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PULSE_API_KEY": API_KEY})


def calibrate(p: Platform, env: dict, bin_dir: Path, args, state: Path) -> dict:
    """loadgen open loop at --calibrate-rate; the sustained rate is the slowest stage's."""
    names = list(COUNTERS) + ["kafka", "clickhouse"]
    cpu0 = {n: cpu_s(p.pid(n)) for n in names}
    c0 = counters(p)
    t0 = time.monotonic()
    lg = run_loadgen(env, bin_dir, args, args.calibrate_rate, args.calibrate_secs,
                     state / "logs" / "calibrate-loadgen.log", args.seed + 1)
    time.sleep(args.calibrate_secs)
    c1 = counters(p)
    cpu1 = {n: cpu_s(p.pid(n)) for n in names}
    t1 = time.monotonic()
    # Behind its schedule by now: one SIGINT makes loadgen stop generating, send what it
    # has generated and wait for the answers.
    lg.send_signal(signal.SIGINT)
    try:
        rc = lg.wait(timeout=120)
    except subprocess.TimeoutExpired:
        lg.kill()
        rc = lg.wait()
    text = (state / "logs" / "calibrate-loadgen.log").read_text(errors="replace")
    summary = loadgen_summary(text)
    secs = t1 - t0
    rates = {svc: (c1[svc] - c0[svc]) / secs for svc in c1}
    stages = {k: v for k, v in rates.items() if k in ("ingest", "processor", "writer-clickhouse") and v > 0}
    # A loadgen interrupted mid-run exits 130; that is how it was stopped, not a failure.
    sustained = min(stages.values()) if stages else summary.get("achieved_rate", 0.0)
    say(f"calibration: {', '.join(f'{k} {v:.0f}/s' for k, v in rates.items())}; loadgen {summary}; "
        f"sustained {sustained:.0f} events/s (loadgen exit {rc})")
    cpu = {n: (cpu1[n] - cpu0[n]) if cpu0[n] is not None and cpu1[n] is not None else None for n in names}
    per_cpu = {n: (c1[n] - c0[n]) / cpu[n] if cpu.get(n) else None for n in COUNTERS}
    say("calibration, events per CPU-second: " + ", ".join(f"{k} {v:.0f}" for k, v in per_cpu.items() if v))
    return {"offered_rate": args.calibrate_rate, "secs": round(secs, 1), "rates": rates,
            "loadgen": summary, "sustained": sustained, "cpu_s": cpu, "events_per_cpu_s": per_cpu,
            "broker_core_share": (cpu["kafka"] / secs) if cpu.get("kafka") is not None else None}


def drain(p: Platform, limit: float, timeout: float) -> float:
    end = time.monotonic() + timeout
    while True:
        lg = lag(p)
        if lg <= limit or time.monotonic() > end:
            return lg
        time.sleep(2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=["debug", "release"], default="release",
                    help="which binaries dev.sh runs (figures are only meaningful for release)")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="loadgen events/s during the measurement; 0 = --load-share of the calibrated rate")
    ap.add_argument("--load-share", type=float, default=0.5, help="share of the sustained rate (with --rate 0)")
    ap.add_argument("--calibrate-rate", type=float, default=20_000.0, help="loadgen's offered rate while calibrating")
    ap.add_argument("--calibrate-secs", type=float, default=30.0)
    ap.add_argument("--duration", type=float, default=120.0, help="measured seconds (probes sent meanwhile)")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of load before the first probe")
    ap.add_argument("--probe-interval", type=float, default=1.0, help="seconds between probes")
    ap.add_argument("--poll-ms", type=float, default=50.0,
                    help="interval of the direct ClickHouse poll (one statement for every probe in flight)")
    ap.add_argument("--api-poll-ms", type=float, default=20.0,
                    help="interval of the /v1/users poll, from ClickHouse's first sight of the probe on")
    ap.add_argument("--probe-timeout", type=float, default=60.0)
    ap.add_argument("--users", type=int, default=10_000, help="loadgen's distinct users")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=19)
    # The freshness knobs (each an environment variable of the services; README, Performance).
    ap.add_argument("--emit-interval-ms", type=int, help="processor --emit-interval-ms (default 1000)")
    ap.add_argument("--writer-max-age-ms", type=int, help="writers' --batch-max-age-ms (default 1000)")
    ap.add_argument("--writer-max-rows", type=int, help="writers' --batch-max-rows (default 10000)")
    ap.add_argument("--freshness-cache-ms", type=int, help="query API --freshness-cache-ms (default 1000)")
    ap.add_argument("--fetch-wait-ms", type=int,
                    help="consumers' fetch.wait.max.ms (librdkafka, via --kafka-option; default 500)")
    ap.add_argument("--linger-ms", type=int, help="producers' --kafka-linger-ms (default 5)")
    ap.add_argument("--set", action="append", default=[], metavar="ENV=VALUE",
                    help="any other service setting by its environment variable (repeatable)")
    ap.add_argument("--out", type=Path, default=None,
                    help="Markdown report (default: $PULSE_CACHE/bench/freshness.md)")
    ap.add_argument("--json", type=Path, default=None, help="every figure as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the state folder")
    args = ap.parse_args()

    def terminated(signum, _frame):
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second one must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        raise SystemExit(128 + signum)  # unwinds through `finally`: the platform is stopped

    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGINT, terminated)
    bin_dir = TARGET / args.profile
    state = Path(tempfile.mkdtemp(prefix="pulse-freshness."))
    out = args.out or CACHE / "bench" / "freshness.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for name, port in zip(PORT_ENV + [LEDGER_ENV], free_ports(len(PORT_ENV) + 1)):
        env[name] = str(port)
    env.update({"PULSE_STATE": str(state), "PULSE_DEV_PROFILE": args.profile, "PULSE_DEV_BUILD": "0",
                "PULSE_DEV_LOADGEN": "0"})
    knobs: dict[str, str] = {}
    if args.emit_interval_ms is not None:
        knobs["PULSE_PROCESSOR_EMIT_INTERVAL_MS"] = str(args.emit_interval_ms)
    if args.writer_max_age_ms is not None:
        knobs["PULSE_WRITER_BATCH_MAX_AGE_MS"] = str(args.writer_max_age_ms)
    if args.writer_max_rows is not None:
        knobs["PULSE_WRITER_BATCH_MAX_ROWS"] = str(args.writer_max_rows)
    if args.freshness_cache_ms is not None:
        knobs["PULSE_QUERY_FRESHNESS_CACHE_MS"] = str(args.freshness_cache_ms)
    if args.linger_ms is not None:
        knobs["PULSE_KAFKA_LINGER_MS"] = str(args.linger_ms)
    if args.fetch_wait_ms is not None:
        knobs["PULSE_KAFKA_OPTIONS"] = f"fetch.wait.max.ms={args.fetch_wait_ms}"
    for kv in args.set:
        if "=" not in kv:
            ap.error(f"--set wants ENV=VALUE, not {kv!r}")
        k, v = kv.split("=", 1)
        knobs[k] = v
    env.update(knobs)
    p = Platform(state, env)
    names = SERVICES + EXTRA + BACKING
    failures: list[str] = []
    result: dict = {"knobs": knobs, "profile": args.profile, "goal_p95_s": GOAL_P95_S,
                    "nproc": os.cpu_count(), "started_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    fr: Freshness | None = None
    sampler: Sampler | None = None
    ok_up = False
    loadgen: subprocess.Popen | None = None
    try:
        t = time.monotonic()
        r = p.dev("up", timeout=900)
        if r.returncode != 0:
            print((state / "dev-up.log").read_text(errors="replace")[-3000:])
            failures.append("scripts/dev.sh up failed (see above)")
            return 1
        ok_up = True
        say(f"platform up in {time.monotonic() - t:.0f}s ({args.profile} binaries, state {state}; "
            f"settings {knobs or 'defaults'})")
        rate = args.rate
        if rate <= 0:
            cal = calibrate(p, env, bin_dir, args, state)
            result["calibration"] = cal
            if cal["sustained"] <= 0:
                failures.append("calibration measured no throughput")
                return 1
            rate = max(1.0, cal["sustained"] * args.load_share)
            left = drain(p, 1000, 300)
            say(f"drained (consumer lag {left:.0f} records); measuring at {rate:.0f} events/s "
                f"({args.load_share:.0%} of {cal['sustained']:.0f})")
        result["rate"] = rate
        sampler = Sampler(p, names, state / "samples.csv")
        threading.Thread(target=sampler.run, daemon=True).start()
        time.sleep(1.5)
        fr = Freshness(p, env, args)
        total = args.warmup + args.duration
        lg_log = state / "logs" / "bench-loadgen.log"
        loadgen = run_loadgen(env, bin_dir, args, rate, total + 5, lg_log, args.seed)
        time.sleep(args.warmup)
        sampler.phase = "load"
        c0, w_hist0 = counters(p), {}
        wport, pport = p.port("PULSE_WRITER_CLICKHOUSE_ADMIN_PORT"), p.port("PULSE_PROCESSOR_ADMIN_PORT")
        w_hist0 = {"write": hist(wport, "pulse_writer_batch_write_seconds", {"sink": "clickhouse"}),
                   "e2e": hist(wport, "pulse_writer_end_to_end_latency_seconds", {"sink": "clickhouse"}),
                   "emit": hist(pport, "pulse_processor_emit_seconds")}
        tables = ("events", "user_activity", "sessions")
        ins0 = {t: hist(wport, "pulse_writer_batch_rows", {"sink": "clickhouse", "table": t}).get(float("inf"), 0.0)
                for t in tables}
        m0 = time.monotonic()
        stop = threading.Event()
        pt = threading.Thread(target=fr.probe_loop, args=(stop,), daemon=True)
        pt.start()
        time.sleep(args.duration)
        stop.set()
        c1 = counters(p)
        m1 = time.monotonic()
        ins1 = {t: hist(wport, "pulse_writer_batch_rows", {"sink": "clickhouse", "table": t}).get(float("inf"), 0.0)
                for t in tables}
        w_hist1 = {"write": hist(wport, "pulse_writer_batch_write_seconds", {"sink": "clickhouse"}),
                   "e2e": hist(wport, "pulse_writer_end_to_end_latency_seconds", {"sink": "clickhouse"}),
                   "emit": hist(pport, "pulse_processor_emit_seconds")}
        sampler.stop.set()
        pt.join(timeout=args.probe_timeout + 30)
        rc = loadgen.wait(timeout=300)
        lg_text = lg_log.read_text(errors="replace")
        result["loadgen"] = loadgen_summary(lg_text)
        if rc != 0:
            failures.append(f"loadgen exited {rc}: " + " | ".join(lg_text.splitlines()[-6:]))
        secs = m1 - m0
        result["measured_secs"] = round(secs, 1)
        result["throughput"] = {k: (c1[k] - c0[k]) / secs for k in c1}
        result["histograms"] = {
            name: {f"p{int(q * 100)}": hist_quantile(w_hist0[name], w_hist1[name], q) for q in (0.5, 0.95, 0.99)}
            for name in w_hist0}
        say("reading the probes' records back from the topics")
        fr.kafka_timestamps(f"127.0.0.1:{env['PULSE_KAFKA_PORT']}")
        w = w_hist1["write"].get(float("inf"), 0.0) - w_hist0["write"].get(float("inf"), 0.0)
        result["ch_inserts_per_s"] = w / secs
        # Per table (ClickHouse's advice is about one INSERT a second per table).
        result["ch_inserts_per_s_by_table"] = {t: (ins1[t] - ins0[t]) / secs for t in tables}
        try:
            parts = clickhouse(fr.ch, "SELECT table, count() FROM system.parts WHERE database = 'pulse' AND active "
                                      "GROUP BY table ORDER BY table FORMAT TSV")
            result["active_parts_at_end"] = {ln.split("\t")[0]: int(ln.split("\t")[1])
                                             for ln in parts.splitlines() if "\t" in ln}
        except Exception as e:
            failures.append(f"ClickHouse query failed: {e}")
    except Exception as e:  # a harness error fails the run, never a silent pass
        import traceback
        traceback.print_exc()
        failures.append(f"harness error: {e}")
    finally:
        if sampler is not None:
            sampler.stop.set()
        if loadgen is not None and loadgen.poll() is None:
            loadgen.kill()
            loadgen.wait()
        if ok_up or (state / "pids").exists():
            r = p.dev("down", timeout=300)
            if r.returncode != 0:
                failures.append("scripts/dev.sh down failed")
        if fr is not None:
            analyse(fr, result, failures)
        if sampler is not None:
            resources(sampler, result)
        result["failures"] = failures
        text = report(result, args)
        print("\n" + text)
        out.write_text(text)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=1, default=str))
        say(f"report written to {out}" + (f", figures to {args.json}" if args.json else ""))
        if failures or args.keep:
            say(f"state, data and logs kept in {state}")
        else:
            subprocess.run(["rm", "-rf", str(state)])
    return 1 if failures else 0


def analyse(fr: Freshness, result: dict, failures: list[str]) -> None:
    probes = fr.probes
    seen = [pr for pr in probes if pr.api_ms is not None and pr.ack_ms is not None]
    result["probes"] = {"sent": len(probes), "visible": len(seen),
                        "errors": [pr.error for pr in probes if pr.error][:5]}
    if not seen:
        failures.append("no probe became visible in the query API")
        return

    def d(a, b):
        return None if a is None or b is None else (a - b) / 1000.0

    series = {
        "end_to_end_users": [d(pr.api_ms, pr.ack_ms) for pr in seen],
        "end_to_end_active_users": [d(pr.active_ms, pr.ack_ms) for pr in seen],
        "ingest_to_topic": [d(pr.ack_ms, pr.ingest_ts_ms) for pr in seen],
        "ingest_stamp_to_record": [d(pr.event_record_ms, pr.ingest_ts_ms) for pr in seen],
        "processor_emit": [d(pr.emit_ms, pr.ack_ms) for pr in seen],
        "writer_consume": [d(pr.written_at_ms, pr.emit_ms) for pr in seen],
        "writer_flush_visible": [d(pr.ch_ms, pr.written_at_ms) for pr in seen],
        "query_api": [d(pr.api_ms, pr.ch_ms) for pr in seen],
        "ack_to_clickhouse": [d(pr.ch_ms, pr.ack_ms) for pr in seen],
        "request": [d(pr.ack_ms, pr.sent_ms) for pr in seen],
    }
    result["percentiles_s"] = {
        k: {"p50": pct([x for x in v if x is not None], 0.5), "p95": pct([x for x in v if x is not None], 0.95),
            "p99": pct([x for x in v if x is not None], 0.99), "n": sum(x is not None for x in v),
            "mean": statistics.fmean([x for x in v if x is not None]) if any(x is not None for x in v) else None}
        for k, v in series.items()}
    e2e = result["percentiles_s"]["end_to_end_users"]
    result["goal_met"] = e2e["p95"] is not None and e2e["p95"] <= GOAL_P95_S
    result["probe_rows"] = [
        {"user": pr.user, "sent_ms": pr.sent_ms, "ack_ms": pr.ack_ms, "ingest_ts_ms": pr.ingest_ts_ms,
         "event_record_ms": pr.event_record_ms, "emit_ms": pr.emit_ms, "written_at_ms": pr.written_at_ms,
         "ch_ms": pr.ch_ms, "api_ms": pr.api_ms, "active_ms": pr.active_ms, "active_count": pr.active_count,
         "error": pr.error} for pr in probes]


def resources(s: Sampler, result: dict) -> None:
    out = {}
    total_cpu = 0.0
    for n in s.names:
        m = s.mem[n]
        cpu = (m.cpu_end_s - m.cpu_start_s) if m.cpu_start_s is not None else None
        if cpu is not None:
            total_cpu += cpu
        out[n] = {"peak_rss_mib": m.peak_rss_kib / 1024 if m.peak_rss_kib else None,
                  "end_rss_mib": m.end_rss_kib / 1024 if m.end_rss_kib else None,
                  "cpu_s": cpu}
    result["resources"] = out
    # The processor's own estimate of its state (goal: 64 MiB + its state budget; none is set
    # here, so its state is what it holds for the loadgen users' open windows and sessions).
    state = s.gauge_peak.get("pulse_processor_state_bytes")
    result["processor_state_mib_peak"] = state / MIB if state is not None else None
    secs = result.get("measured_secs") or 0
    result["cpu_total_s"] = total_cpu
    k = out.get("kafka", {}).get("cpu_s")
    result["broker_cpu_share"] = (k / total_cpu) if k is not None and total_cpu > 0 else None
    result["broker_core_share"] = (k / secs) if k is not None and secs else None
    per = {}
    for svc, rate in (result.get("throughput") or {}).items():
        cpu = out.get(svc, {}).get("cpu_s")
        per[svc] = (rate * secs / cpu) if cpu else None
    result["events_per_cpu_s"] = per


def fmt(x, unit: str = "", nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}{unit}"


def report(r: dict, args) -> str:
    lines = [f"## Freshness benchmark ({r.get('profile')} binaries, {r.get('started_at')}, {r.get('nproc')} cores)", ""]
    cal = r.get("calibration")
    if cal:
        lines.append(f"Sustained rate: {cal['sustained']:.0f} events/s — the slowest of ingest "
                     f"{cal['rates'].get('ingest', 0):.0f}, processor {cal['rates'].get('processor', 0):.0f} and "
                     f"ClickHouse writer {cal['rates'].get('writer-clickhouse', 0):.0f} events/s during "
                     f"{cal['secs']:.0f} s of loadgen offering {cal['offered_rate']:.0f}/s. Events per CPU-second "
                     "there: " + ", ".join(f"{k} {v:,.0f}" for k, v in cal.get("events_per_cpu_s", {}).items() if v)
                     + f"; the broker used {fmt((cal.get('broker_core_share') or 0) * 100, ' %', 0)} of a core.")
    lines.append(f"Measured at {r.get('rate', 0):.0f} events/s for {r.get('measured_secs', '-')} s "
                 f"(loadgen `--users {args.users} --batch-size {args.batch_size} --concurrency {args.concurrency}`), "
                 f"settings: {', '.join(f'`{k}={v}`' for k, v in r.get('knobs', {}).items()) or 'the defaults'}.")
    pr = r.get("probes", {})
    lines.append(f"Probes: {pr.get('visible', 0)} of {pr.get('sent', 0)} visible; one every "
                 f"{args.probe_interval:g} s; ClickHouse polled every {args.poll_ms:g} ms, the API every "
                 f"{args.api_poll_ms:g} ms from then on.")
    lines += ["", "| stage | p50 s | p95 s | p99 s | n |", "|---|---|---|---|---|"]
    ps = r.get("percentiles_s", {})
    rows = [("end_to_end_users", "**end to end: ack → `/v1/users/{id}`**"),
            ("end_to_end_active_users", "**end to end: ack → live minute of `/v1/active_users`**"),
            ("ingest_to_topic", "ingest → topic: `pulse-ingest-ts` → ack (before the clock starts)"),
            ("processor_emit", "processor emit: ack → result record (Kafka timestamp)"),
            ("writer_consume", "writer consume: result record → `written_at_ms`"),
            ("writer_flush_visible", "writer flush + ClickHouse visibility: `written_at_ms` → direct SELECT sees it"),
            ("query_api", "query API: direct SELECT → `/v1/users` answers it"),
            ("ack_to_clickhouse", "ack → direct SELECT (ClickHouse, no API)")]
    for k, label in rows:
        v = ps.get(k)
        if v:
            lines.append(f"| {label} | {fmt(v['p50'])} | {fmt(v['p95'])} | {fmt(v['p99'])} | {v['n']} |")
    h = r.get("histograms", {})
    if h:
        lines += ["", "From the services' histograms over the measured phase (all records, not per probe):", ""]
        lines.append(f"- ClickHouse writer INSERT duration (`pulse_writer_batch_write_seconds`): p50 "
                     f"{fmt(h['write'].get('p50'), ' s', 3)}, p95 {fmt(h['write'].get('p95'), ' s', 3)}")
        lines.append(f"- raw events, ingest → written (`pulse_writer_end_to_end_latency_seconds`): p50 "
                     f"{fmt(h['e2e'].get('p50'), ' s')}, p95 {fmt(h['e2e'].get('p95'), ' s')}")
        parts = r.get("active_parts_at_end") or {}
        by_table = r.get("ch_inserts_per_s_by_table") or {}
        lines.append(f"- ClickHouse writer INSERTs: {fmt(r.get('ch_inserts_per_s'), ' per second', 1)} over all its "
                     f"tables (" + (", ".join(f"{k} {fmt(v, '', 1)}/s" for k, v in by_table.items())
                                    or "events, user_activity, sessions") + "; plus one freshness INSERT per batch); "
                     f"active parts at the end: " + (", ".join(f"{k} {v}" for k, v in parts.items()) or "-"))
        lines.append(f"- processor emission until offsets stored (`pulse_processor_emit_seconds`): p50 "
                     f"{fmt(h['emit'].get('p50'), ' s')}, p95 {fmt(h['emit'].get('p95'), ' s')}")
    e2e = ps.get("end_to_end_users", {})
    if e2e:
        lines += ["", f"Goal p95 ≤ {GOAL_P95_S:g} s: **{'pass' if r.get('goal_met') else 'FAIL'}** "
                      f"(p95 {fmt(e2e.get('p95'))} s)"]
    res = r.get("resources")
    if res:
        lines += ["", "| process | peak RSS MiB | RSS at end MiB | CPU s | events/CPU-s |", "|---|---|---|---|---|"]
        per = r.get("events_per_cpu_s", {})
        for n, v in res.items():
            lines.append(f"| {n} | {fmt(v['peak_rss_mib'], '', 1)} | {fmt(v['end_rss_mib'], '', 1)} | "
                         f"{fmt(v['cpu_s'], '', 1)} | {fmt(per.get(n), '', 0)} |")
        lines.append("")
        lines.append(f"Broker (Tansu) CPU: {fmt((r.get('broker_cpu_share') or 0) * 100, ' %', 0)} of the platform's "
                     f"CPU, {fmt((r.get('broker_core_share') or 0) * 100, ' %', 0)} of one core.")
    if r.get("failures"):
        lines += ["", "Run FAILED:"] + [f"- {f}" for f in r["failures"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    os._exit(rc)
