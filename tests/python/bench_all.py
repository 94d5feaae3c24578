"""`scripts/bench.sh all` (issue #19, "One table"): runs every benchmark part with one
profile — ingest, processor, writer and query (each `scripts/bench.sh <part> … --json FILE`
against its own throwaway broker or ClickHouse), then freshness (the whole platform under
loadgen at 50 % of its sustained rate, which also gives each service's RSS and CPU at that
load: the memory figures of goal 4) — and prints ONE table: every ratio with its goal and
pass/fail, events per CPU-second per service, freshness percentiles per stage, RSS per
service and the broker's share of CPU. The same table goes to `<out>/bench-all.md`, the
figures to `<out>/bench-all.json` and a chart (freshness percentiles per stage, events per
CPU-second per service) to `<out>/bench-all.png`; every part's output to
`<out>/bench-all-<part>.log`.

Profiles: `short` (the default; about 10 minutes on 2 cores) and `tiny` (a smoke run of a
minute or two that checks that everything is produced; its figures mean nothing).
A benchmark, not a test: exit 0 when every part ran and the table and chart were written,
whatever pass/fail says; 1 when a part failed (the table still shows the others).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("PULSE_CACHE", Path.home() / ".cache/pulse"))
MIB_GOAL = 64
STATELESS = ["ingest", "writer-clickhouse", "writer-parquet", "query-api", "schema-registry"]

PROFILES: dict[str, dict[str, list[str]]] = {
    "short": {
        "ingest": ["--duration-secs", "5", "--warmup-secs", "1", "--rounds", "1"],
        "processor": ["--core-events", "300000", "--loop-events", "50000", "--rounds", "1"],
        "writer": ["--events", "100000", "--insert-rows", "100000", "--insert-batch", "50000"],
        "query": ["--users", "500", "--hours", "2", "--requests", "40", "--warmup", "5"],
        "freshness": ["--calibrate-secs", "30", "--warmup", "10", "--duration", "120"],
        "freshness-tuned": ["--warmup", "10", "--duration", "120"],
    },
    "tiny": {
        "ingest": ["--duration-secs", "1", "--warmup-secs", "0", "--rounds", "1", "--concurrency", "2"],
        "processor": ["--core-events", "5000", "--loop-events", "1000", "--rounds", "1", "--users", "200"],
        "writer": ["--events", "2000", "--roll-rows", "1000", "--insert-rows", "2000", "--insert-batch", "1000"],
        "query": ["--users", "20", "--hours", "1", "--requests", "2", "--warmup", "1"],
        "freshness": ["--rate", "50", "--warmup", "2", "--duration", "6", "--probe-interval", "1",
                      "--probe-timeout", "30"],
        # No tuned freshness run: the same code path as the first, and the smoke run's time
        # goes into scripts/test.sh.
    },
}
PARTS = ["ingest", "processor", "writer", "query", "freshness", "freshness-tuned"]
# The second freshness run: the same rate as the first (its calibration's), with the knobs
# that bring p95 under a second here (README, Freshness knobs); not the services' defaults.
TUNED = ["--emit-interval-ms", "200", "--writer-max-age-ms", "200", "--fetch-wait-ms", "50"]
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[bench all {time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run_part(part: str, extra: list[str], out: Path, binaries: str) -> dict:
    js = out / f"bench-all-{part}.json"
    log = out / f"bench-all-{part}.log"
    js.unlink(missing_ok=True)
    script_part = "freshness" if part.startswith("freshness") else part
    cmd = ["bash", str(REPO / "scripts/bench.sh"), script_part, *extra, "--json", str(js)]
    if script_part == "freshness":
        cmd += ["--profile", binaries, "--out", str(out / f"bench-all-{part}.md")]
    env = dict(os.environ, PULSE_BENCH_SKIP_SETUP="1", PULSE_BENCH_BINARIES=binaries)
    say(f"{part}: {' '.join(cmd[2:])} (output: {log})")
    t = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            rc = proc.wait()
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM): the part stops what it started (its platform,
            # broker or ClickHouse) on SIGTERM; a SIGKILL would leave them running.
            proc.terminate()
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    secs = time.monotonic() - t
    data = {}
    if js.exists():
        try:
            data = json.loads(js.read_text())
        except ValueError as e:
            data = {"error": f"unreadable JSON: {e}"}
    say(f"{part}: exit {rc} after {secs:.0f} s")
    return {"rc": rc, "secs": secs, "data": data, "log": str(log)}


def g(d, *path):
    for k in path:
        if isinstance(d, dict):
            d = d.get(k)
        elif isinstance(d, list) and isinstance(k, int) and -len(d) <= k < len(d):
            d = d[k]
        else:
            return None
    return d


def num(x, nd=2, unit=""):
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    if isinstance(x, (int, float)) and abs(x) >= 1000:
        return f"{x:,.0f}{unit}"
    return f"{x:.{nd}f}{unit}"


def verdict(value, goal, higher_is_better=True):
    if value is None or (isinstance(value, float) and value != value):
        return "no figure"
    ok = value >= goal if higher_is_better else value <= goal
    return "pass" if ok else "**FAIL**"


def build_table(res: dict, meta: dict) -> tuple[str, dict]:
    ing, proc, wr, qy, fr, ft = (res.get(p, {}).get("data", {}) for p in PARTS)
    lines = [f"**Benchmark table — {meta['date']}**",
             "",
             f"Machine: {meta['nproc']} cores ({meta['cpu']}), shared with other work (load average "
             f"{meta['load']} at the start); profile `{meta['profile']}`, {meta['binaries']} binaries; "
             f"`scripts/bench.sh all --profile {meta['profile']}` took {meta['total_min']:.1f} min.",
             "",
             "| part | figure | measured | goal | result |",
             "|---|---|---|---|---|"]
    summary: dict = {}

    def goal_row(part, figure, value, goal_txt, goal, higher=True, fmtv=None):
        v = verdict(value, goal, higher)
        lines.append(f"| {part} | {figure} | {fmtv(value) if fmtv else num(value)} | {goal_txt} | {v} |")
        summary[f"{part}: {figure}"] = {"value": value, "goal": goal_txt, "result": v.strip("*")}

    goal_row("ingest", "HTTP events/s ÷ raw producer (median of rounds)", g(ing, "http_vs_raw_median"), "≥ 0.8", 0.8)
    goal_row("ingest", "gRPC events/s ÷ raw producer (median of rounds)", g(ing, "grpc_vs_raw_median"), "≥ 0.8", 0.8)
    ing_own = g(ing, "ingest_events_per_cpu_s")  # only if bench-ingest measures ingest's own CPU
    if ing_own is not None:
        goal_row("ingest", "events per CPU-second of ingest (JSON batches of 100, bench-ingest)", ing_own,
                 "≥ 100,000", 100_000)
    elif g(fr, "calibration", "events_per_cpu_s", "ingest") is not None:
        goal_row("ingest", "events per CPU-second of the ingest process (the real binary, loadgen's JSON "
                 "batches of 100, at the sustained rate: the freshness run's calibration)",
                 g(fr, "calibration", "events_per_cpu_s", "ingest"), "≥ 100,000", 100_000)
    else:
        goal_row("ingest", "events per CPU-second of the ingest process", None, "≥ 100,000", 100_000)
    goal_row("processor", "core + decode, events per CPU-second", g(proc, "core_decode", "events_per_cpu_s"),
             "≥ 300,000", g(proc, "core_goal_events_per_cpu_s") or 300_000)
    goal_row("processor", "whole loop events/s ÷ raw consumer (median of rounds)", g(proc, "loop_vs_raw_median"),
             "≥ 0.8", 0.8)
    goal_row("writer", "ClickHouse inserts, `clickhouse` crate ÷ clickhouse-client", g(wr, "clickhouse",
             "crate_vs_client"), "≥ 0.8", 0.8)
    eps = g(qy, "endpoints") or []
    worst50 = max((g(e, "rows", 0, "ratio_p50") or 0 for e in eps), default=None) if eps else None
    worst95 = max((g(e, "rows", 0, "ratio_p95") or 0 for e in eps), default=None) if eps else None
    goal_row("query", f"API ÷ direct ClickHouse, p50, worst of {len(eps)} endpoints", worst50, "≤ 1.2", 1.2, False)
    goal_row("query", f"API ÷ direct ClickHouse, p95, worst of {len(eps)} endpoints", worst95, "≤ 1.2", 1.2, False)
    ps = g(fr, "percentiles_s") or {}
    pt = g(ft, "percentiles_s") or {}
    goal_row("freshness", "ack → `/v1/users/{id}`, p95 (s), service defaults", g(ps, "end_to_end_users", "p95"),
             "≤ 1 s", 1.0, False)
    goal_row("freshness", "ack → live minute of `/v1/active_users`, p95 (s), service defaults",
             g(ps, "end_to_end_active_users", "p95"), "≤ 1 s", 1.0, False)
    if ft:
        knobs = ", ".join(f"`{k}={v}`" for k, v in (g(ft, "knobs") or {}).items())
        goal_row("freshness", f"ack → `/v1/users/{{id}}`, p95 (s), tuned: {knobs}", g(pt, "end_to_end_users", "p95"),
                 "≤ 1 s", 1.0, False)
        goal_row("freshness", "ack → live minute of `/v1/active_users`, p95 (s), tuned",
                 g(pt, "end_to_end_active_users", "p95"), "≤ 1 s", 1.0, False)
    rs = g(fr, "resources") or {}
    stateless = {n: g(rs, n, "peak_rss_mib") for n in STATELESS if g(rs, n, "peak_rss_mib") is not None}
    if stateless:
        worst = max(stateless, key=stateless.get)
        goal_row("memory", f"peak RSS of the stateless services at the freshness load (largest: {worst})",
                 stateless[worst], f"< {MIB_GOAL} MiB", MIB_GOAL - 1e-9, False, lambda v: f"{v:.1f} MiB")
    state = g(fr, "processor_state_mib_peak")
    proc_rss = g(rs, "processor", "peak_rss_mib")
    if state is not None:
        goal_row("memory", f"processor peak RSS at the freshness load (no state budget set; its estimated state "
                 f"`pulse_processor_state_bytes` peaked at {state:.1f} MiB)", proc_rss,
                 f"< {MIB_GOAL} MiB + state", MIB_GOAL + state, False,
                 lambda v: f"{v:.1f} MiB" if v is not None else "–")
    else:
        lines.append(f"| memory | processor peak RSS at the freshness load (no state budget set; its state was not "
                     f"sampled in this run) | {num(proc_rss, 1)} MiB | < {MIB_GOAL} MiB + state | no figure |")

    # Throughput per service.
    lines += ["", "| service | measured where | events/s | events per CPU-second |", "|---|---|---|---|"]
    thr = g(fr, "throughput") or {}
    per = g(fr, "events_per_cpu_s") or {}
    chart_thr: dict[str, float] = {}
    cal = g(fr, "calibration") or {}
    for svc in ("ingest", "processor", "writer-clickhouse", "writer-parquet"):
        v = g(cal, "events_per_cpu_s", svc)
        if cal:
            lines.append(f"| {svc} | platform, sustained rate (calibration) | {num(g(cal, 'rates', svc), 0)} | "
                         f"{num(v, 0)} |")
        if v:
            chart_thr[f"{svc}\n(platform, sustained)"] = v
    for svc in ("ingest", "processor", "writer-clickhouse", "writer-parquet"):
        lines.append(f"| {svc} | platform, freshness load | {num(thr.get(svc), 0)} | {num(per.get(svc), 0)} |")
        if per.get(svc) and not g(cal, "events_per_cpu_s", svc):
            chart_thr[f"{svc}\n(platform)"] = per[svc]
    for key, label in (("core", "windowing core alone"), ("decode", "decode alone (floor)"),
                       ("core_decode", "core + decode")):
        f = g(proc, key)
        if f:
            lines.append(f"| processor | bench-processor: {label} | {num(f.get('events_per_s'), 0)} | "
                         f"{num(f.get('events_per_cpu_s'), 0)} |")
            chart_thr[f"processor\n{label}"] = f.get("events_per_cpu_s") or 0
    for i, f in enumerate(g(proc, "loops") or []):
        lines.append(f"| processor | bench-processor: whole loop vs Tansu, run {i + 1} (CPU incl. librdkafka) | "
                     f"{num(f.get('events_per_s'), 0)} | {num(f.get('events_per_cpu_s'), 0)} |")
        chart_thr.setdefault("processor\nloop (bench)", f.get("events_per_cpu_s") or 0)
    http = [p for p in g(ing, "phases") or [] if p.get("phase") == "http"]
    if http:
        lines.append(f"| ingest | bench-ingest: HTTP, batches of {g(ing, 'batch')} (in-process; CPU not split) | "
                     f"{num(sum(p['events_per_s'] for p in http) / len(http), 0)} | – |")
    arch = g(wr, "parquet", "archive_rows_per_s")
    if arch:
        lines.append(f"| writer-parquet | bench-writer: decode + Parquet encode (one thread) | {num(arch, 0)} | "
                     f"≈ {num(arch, 0)} |")
    crate = g(wr, "clickhouse", "crate_rows_per_s")
    if crate:
        lines.append(f"| writer-clickhouse | bench-writer: RowBinary INSERTs, rows/s (ClickHouse's CPU not "
                     f"counted) | {num(sum(crate) / len(crate), 0)} | – |")

    # Freshness per stage.
    lines += ["", f"Freshness at {num(g(fr, 'rate'), 0)} events/s "
                  f"({'50 % of the sustained ' + num(g(fr, 'calibration', 'sustained'), 0) + ' events/s' if g(fr, 'calibration') else 'fixed rate'}; "
                  f"{g(fr, 'probes', 'visible')} of {g(fr, 'probes', 'sent')} probes seen; settings: "
                  f"{', '.join(f'`{k}={v}`' for k, v in (g(fr, 'knobs') or {}).items()) or 'the defaults'}):",
              "", "| stage | p50 s | p95 s | p99 s | tuned p50 s | tuned p95 s | tuned p99 s |",
              "|---|---|---|---|---|---|---|"]
    stage_rows = [("end_to_end_users", "**ack → `/v1/users/{id}`**"),
                  ("end_to_end_active_users", "**ack → `/v1/active_users` live minute**"),
                  ("ingest_to_topic", "ingest → topic (stamp → ack, before the clock)"),
                  ("processor_emit", "processor emit (ack → result record)"),
                  ("writer_consume", "writer consume (record → read)"),
                  ("writer_flush_visible", "writer flush + ClickHouse visibility"),
                  ("query_api", "query API (ClickHouse → API answer)")]
    for k, label in stage_rows:
        v, t = ps.get(k) or {}, pt.get(k) or {}
        lines.append(f"| {label} | {num(v.get('p50'))} | {num(v.get('p95'))} | {num(v.get('p99'))} | "
                     f"{num(t.get('p50'))} | {num(t.get('p95'))} | {num(t.get('p99'))} |")
    for name, d in (("defaults", fr), ("tuned", ft)):
        if d:
            ap = g(d, "active_parts_at_end") or {}
            parts = ", ".join(f"{k} {v}" for k, v in ap.items()) if isinstance(ap, dict) else str(ap)
            lines.append(f"| ({name}) ClickHouse writer: INSERTs per second; active parts at the end | "
                         f"{num(g(d, 'ch_inserts_per_s'), 1)} | {parts or '–'} | | | | |")
    if ft:
        lines.append(f"| (tuned) broker CPU, % of one core | {num((g(fr, 'broker_core_share') or 0) * 100, 0)} "
                     f"(defaults) | {num((g(ft, 'broker_core_share') or 0) * 100, 0)} (tuned) | | | | |")

    # RSS and CPU per process, broker share.
    lines += ["", "| process (freshness run) | peak RSS MiB | RSS at end MiB | CPU s | goal |", "|---|---|---|---|---|"]
    for n, v in rs.items():
        goal = (f"< {MIB_GOAL} MiB" if n in STATELESS else f"< {MIB_GOAL} MiB + state budget" if n == "processor"
                else "–")
        lines.append(f"| {n} | {num(v.get('peak_rss_mib'), 1)} | {num(v.get('end_rss_mib'), 1)} | "
                     f"{num(v.get('cpu_s'), 1)} | {goal} |")
    share = g(fr, "broker_cpu_share")
    core = g(fr, "broker_core_share")
    ib = [p.get("broker_busy_pct") for p in g(ing, "phases") or [] if p.get("broker_busy_pct") is not None]
    pl = [f for f in g(proc, "loops") or []]
    lines += ["", "Broker (Tansu) CPU: "
              f"{num(share * 100 if share is not None else None, 0)} % of the whole platform's CPU in the freshness "
              f"run ({num(core * 100 if core is not None else None, 0)} % of one core); "
              f"{num(sum(ib) / len(ib) if ib else None, 0)} % of its core during bench-ingest's phases; "
              + (f"{num(100 * pl[0]['broker_cpu_s'] / pl[0]['secs'], 0)} % during bench-processor's loop."
                 if pl and pl[0].get("secs") else "–.")]
    lines += ["", "Part run times: " + ", ".join(f"{p} {res[p]['secs']:.0f} s (exit {res[p]['rc']})"
                                                 for p in PARTS if p in res)]
    failed = [p for p in PARTS if p in res and res[p]["rc"] != 0]
    if failed:
        lines += ["", f"**Parts that failed** (their logs: `{meta['out']}/bench-all-<part>.log`): {', '.join(failed)}"]
    return "\n".join(lines) + "\n", {"goals": summary, "throughput_per_cpu_s": chart_thr, "freshness": ps,
                                     "freshness_tuned": pt}


def chart(path: Path, ps: dict, pt: dict, thr: dict, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 5.5))
    stages = [("end_to_end_users", "ack → /v1/users"), ("end_to_end_active_users", "ack → active_users"),
              ("processor_emit", "processor emit"), ("writer_consume", "writer consume"),
              ("writer_flush_visible", "writer flush +\nCH visibility"), ("query_api", "query API")]
    xs = range(len(stages))
    series = [(ps, q, q) for q in ("p50", "p95", "p99")]
    if pt:
        series += [(pt, q, f"{q} tuned") for q in ("p50", "p95", "p99")]
    width = 0.8 / len(series)
    for i, (src, q, label) in enumerate(series):
        vals = [((src.get(k) or {}).get(q) or 0.0) for k, _ in stages]
        a.bar([x + (i - (len(series) - 1) / 2) * width for x in xs], vals, width, label=label,
              hatch="//" if "tuned" in label else None)
    a.axhline(1.0, color="red", linestyle="--", linewidth=1, label="goal p95 ≤ 1 s")
    a.set_xticks(list(xs))
    a.set_xticklabels([s for _, s in stages], rotation=30, ha="right", fontsize=8)
    a.set_ylabel("seconds")
    a.set_title("Freshness per stage")
    a.legend(fontsize=8)
    names = list(thr)
    b.barh(range(len(names)), [thr[n] for n in names], color="tab:green")
    b.set_yticks(range(len(names)))
    b.set_yticklabels(names, fontsize=7)
    b.set_xscale("log")
    b.axvline(300_000, color="red", linestyle="--", linewidth=1, label="processor goal 300k")
    b.axvline(100_000, color="orange", linestyle="--", linewidth=1, label="ingest goal 100k")
    b.set_xlabel("events per CPU-second (log)")
    b.set_title("Throughput per service")
    b.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    def terminated(signum, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)  # unwinds through run_part, which stops the running part

    signal.signal(signal.SIGTERM, terminated)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="short")
    ap.add_argument("--binaries", choices=["release", "debug"], default="release",
                    help="(read by scripts/bench.sh, which builds them)")
    ap.add_argument("--out", type=Path, default=CACHE / "bench", help="folder of the table, chart and logs")
    ap.add_argument("--only", action="append", choices=PARTS,
                    help="run only these parts (repeatable; a part the profile lacks is refused)")
    ap.add_argument("--freshness-arg", action="append", default=[], metavar="ARG",
                    help="an extra bench_freshness.py argument (repeatable), e.g. --freshness-arg=--emit-interval-ms=200")
    args = ap.parse_args()
    for part in args.only or []:
        if part not in PROFILES[args.profile]:
            ap.error(f"the {args.profile} profile has no {part} part")
    args.out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res: dict = {}
    for part in args.only or [p for p in PARTS if p in PROFILES[args.profile]]:
        extra = list(PROFILES[args.profile][part])
        if part == "freshness":
            extra += args.freshness_arg
        if part == "freshness-tuned":
            rate = g(res, "freshness", "data", "rate")
            if rate and "--rate" not in extra:
                extra = ["--rate", f"{rate:.0f}"] + extra
            extra += TUNED
        res[part] = run_part(part, extra, args.out, args.binaries)
    meta = {"date": started, "nproc": os.cpu_count(), "cpu": cpu_model(), "load": f"{load:.1f}",
            "profile": args.profile, "binaries": args.binaries, "total_min": (time.monotonic() - T0) / 60,
            "out": str(args.out)}
    table, figures = build_table(res, meta)
    md = args.out / "bench-all.md"
    png = args.out / "bench-all.png"
    md.write_text(table)
    (args.out / "bench-all.json").write_text(json.dumps({"meta": meta, "figures": figures,
                                                          "parts": {p: r["data"] for p, r in res.items()}},
                                                         indent=1, default=str))
    chart(png, figures["freshness"], figures["freshness_tuned"], figures["throughput_per_cpu_s"],
          f"Pulse benchmarks {started}, {meta['nproc']} cores ({meta['cpu']}), profile {args.profile}")
    print()
    print(table)
    say(f"table: {md}; chart: {png}; figures: {args.out / 'bench-all.json'}; logs: {args.out}/bench-all-<part>.log")
    failed = [p for p, r in res.items() if r["rc"] != 0]
    if failed:
        say(f"parts that failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
