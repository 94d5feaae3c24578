"""Checks Pulse's Grafana dashboards (helm/pulse/dashboards, also reached as
deploy/grafana/dashboards).

Static (always, no Prometheus needed):
  - every file is a dashboard JSON with a unique uid and title, schemaVersion >= 36, the
    `pulse` tag and a `datasource` variable of type prometheus; every panel, target and
    query variable uses `${datasource}` (no hard-coded datasource uid);
  - panel ids are unique, gridPos is complete, inside the 24-column grid, and no two panels
    overlap; every panel has a title and a description, every graph a unit;
  - every `$variable` used is defined; every key panel named in KEY_PANELS exists;
  - every dashboard has the `namespace` and `release` variables (labels `namespace` and
    `pulse_release`, set by the chart's ServiceMonitor) and every series selector filters on
    both, so two Pulse releases (also in one namespace) are told apart;
  - every metric name a query uses is declared in the services' source (a string literal
    in crates/*/src) or is a recording rule in deploy/prometheus (catches typos offline);
  - deploy/grafana/dashboards and the chart's folder hold the same files, byte for byte
    (one is a symlink to the other: a copy that drifts fails here).
Live (with --prometheus URL, after a workload):
  - every target's PromQL, with the template variables substituted (multi-value variables
    by their "All" value, custom variables by each of their options, `$__rate_interval` by
    --rate-interval), parses and runs (`/api/v1/query`);
  - every metric name used exists in `/api/v1/label/__name__/values` (the services
    register their failure-only series at zero at start-up), except those in FAULT_ONLY
    below (Prometheus's ALERTS, which exists only once an alert was pending), which are then
    reported, not failed;
  - every key panel returns data: a number (not NaN) from at least one of its targets,
    within --settle seconds (the last scrapes after a workload may not be in yet);
  - every query variable's `label_values(...)` finds values (`namespace` and `release` may
    find none where no series carries their label, e.g. scripts/dev.sh's scrape config:
    then All matches every series, and that is reported).

    python tests/python/dashboards_check.py [--dashboards DIR] [--prometheus URL]
        [--rate-interval 1m] [--timeout 10] [--settle 15]

Exit 1 on any failure, each one printed on its own line with the dashboard and panel.
Standard library only, so any python3 runs it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHART_DASHBOARDS = ROOT / "helm" / "pulse" / "dashboards"
DEPLOY_DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
RULES_DIR = ROOT / "deploy" / "prometheus"

# Panels that must return data after a workload on a healthy stack (dashboard uid → titles).
KEY_PANELS: dict[str, list[str]] = {
    "pulse-overview": [
        "Freshness SLI",
        "Availability SLI",
        "Events in → stored",
        "End-to-end latency (ingest → ClickHouse)",
        "Services up",
    ],
    "pulse-ingest": [
        "Events by outcome",
        "HTTP requests by route and status",
        "HTTP request latency",
        "Batch acknowledgement latency",
        "Producer queue depth",
    ],
    "pulse-processor": [
        "Watermark and latest event behind wall clock",
        "Partition watermarks behind wall clock",
        "Input records by outcome",
        "Open windows and sessions",
        "Held records",
        "Processing lag",
    ],
    "pulse-writers": [
        "Rows written",
        "Batch size",
        "Insert latency",
        "Ingest to stored latency",
        "Circuit breaker",
        "Bytes archived",
    ],
    "pulse-query": [
        "HTTP requests by route and status",
        "HTTP latency by endpoint (p95)",
        "ClickHouse query latency (p95)",
        "Freshness lag",
    ],
    "pulse-schema-registry": [
        "Replicas up",
        "Requests by route and status",
        "Request latency by route (p95)",
        "Auth failures by reason",
        "Subjects, schemas and versions",
        "_schemas log: applied offset per replica",
    ],
}

# The variables that pick a Pulse install: every dashboard has them (before `job`), and every
# selector of every query filters on them, so two releases (also in one namespace) can be
# told apart. Their labels come from the chart's ServiceMonitor; a scrape config without
# them (scripts/dev.sh) leaves them empty, and their All value (.*) matches that.
SCOPE_VARS = {"namespace": "namespace", "release": "pulse_release"}
SCOPE_MATCHERS = ('namespace=~"$namespace"', 'pulse_release=~"$release"')
# Series without the scope labels: one per SLO for every install (deploy/prometheus).
UNSCOPED_SERIES = {"pulse:slo_objective:ratio", "pulse:slo_freshness_threshold:seconds"}

# Metrics that may be absent from a healthy stack's Prometheus: the live check reports them
# missing instead of failing. Every service registers its failure-only series (errors,
# retries, refusals, DLQ truncations, gRPC calls, corrections, the ledger's horizon) at zero
# at start-up (crates/*/src/metrics.rs `init`, unit-tested per crate), so no service metric
# belongs here; only series that genuinely cannot exist before a fault.
FAULT_ONLY: set[str] = {
    # Prometheus's own: exists only while (or after) an alert was pending or firing.
    "ALERTS",
}
# Series Prometheus itself makes (not declared by the services).
PROMETHEUS_SERIES = {"up", "ALERTS", "ALERTS_FOR_STATE", "scrape_duration_seconds",
                     "scrape_samples_scraped", "scrape_series_added"}

BUILTIN_VARS = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s",
                "__range_ms", "__name", "__all", "__field", "__series", "__value"}
HIST_SUFFIXES = ("_bucket", "_sum", "_count")
PROMQL_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan", "sum", "avg", "min", "max", "count", "stddev", "stdvar",
    "topk", "bottomk", "quantile", "count_values", "group", "atan2", "start", "end",
}
VAR_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
DS_REF = {"type": "prometheus", "uid": "${datasource}"}


def metric_names(expr: str) -> set[str]:
    """The metric names (and recording rules) a PromQL expression selects."""
    e = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in PROMQL_WORDS:
            continue
        if re.fullmatch(r"\d+[smhdwy]", word):
            continue
        names.add(word)
    return names


SELECTOR_RE = re.compile(
    r'"(?:\\.|[^"\\])*"|\[[^\]]*\]|\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)'
    r'|(?<![\w:$.])([a-zA-Z_:][a-zA-Z0-9_:]*(?:\$\{\w+\})?)(\s*\{[^}]*\}|\s*\()?')


def selectors(expr: str) -> list[str]:
    """The series selectors of a PromQL expression, each as written (name{matchers})."""
    out = []
    for m in SELECTOR_RE.finditer(expr):
        word, after = m.group(1), m.group(2)
        if word is None or word.lower() in PROMQL_WORDS or (after and after.strip().startswith("(")):
            continue
        out.append(word + (after.strip() if after else ""))
    return out


def base_name(name: str) -> str:
    for s in HIST_SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def declared_metrics() -> set[str]:
    """String literals that look like metric names in the services' source."""
    out = set()
    for path in (ROOT / "crates").glob("*/src/**/*.rs"):
        out |= set(re.findall(r'"((?:pulse|process)_[a-z0-9_]+)"', path.read_text(errors="replace")))
    return out


def recording_rules() -> set[str]:
    out = set()
    if RULES_DIR.is_dir():
        for path in list(RULES_DIR.rglob("*.yml")) + list(RULES_DIR.rglob("*.yaml")):
            out |= set(re.findall(r"^\s*-?\s*record:\s*['\"]?([a-zA-Z_:][a-zA-Z0-9_:]*)", path.read_text(), re.M))
    return out


class Dashboard:
    def __init__(self, path: Path):
        self.path = path
        self.doc = json.loads(path.read_text())
        self.uid = self.doc.get("uid", "")
        self.vars = {v.get("name"): v for v in self.doc.get("templating", {}).get("list", [])}

    def panels(self):
        """Every panel, rows' nested panels included."""
        for p in self.doc.get("panels", []):
            yield p
            yield from p.get("panels", [])

    def where(self, panel: dict | None = None) -> str:
        if panel is None:
            return f"{self.path.name}"
        return f"{self.path.name}: panel {panel.get('id')} {panel.get('title')!r}"


def static_checks(dashboards: list[Dashboard], dash_dir: Path) -> list[str]:
    problems: list[str] = []
    seen_uids: dict[str, str] = {}
    seen_titles: dict[str, str] = {}
    known = declared_metrics() | recording_rules() | PROMETHEUS_SERIES
    for d in dashboards:
        doc, w = d.doc, d.where()
        for key, seen in (("uid", seen_uids), ("title", seen_titles)):
            value = doc.get(key)
            if not value:
                problems.append(f"{w}: no {key}")
            elif value in seen:
                problems.append(f"{w}: {key} {value!r} also used by {seen[value]}")
            else:
                seen[value] = d.path.name
        if len(d.uid) > 40:
            problems.append(f"{w}: uid longer than 40 characters")
        if not isinstance(doc.get("schemaVersion"), int) or doc["schemaVersion"] < 36:
            problems.append(f"{w}: schemaVersion {doc.get('schemaVersion')!r} (want >= 36)")
        if "pulse" not in doc.get("tags", []):
            problems.append(f"{w}: no `pulse` tag (the dashboards' links list them by it)")
        if not doc.get("description"):
            problems.append(f"{w}: no description")
        if doc.get("id") is not None:
            problems.append(f"{w}: id must be null (Grafana assigns it)")
        ds = d.vars.get("datasource")
        if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
            problems.append(f"{w}: no `datasource` variable of type datasource (query: prometheus)")
        for name, v in d.vars.items():
            if v.get("type") == "query" and v.get("datasource") != DS_REF:
                problems.append(f"{w}: variable {name} does not use ${{datasource}}")
            if not v.get("description") and name != "datasource":
                problems.append(f"{w}: variable {name} has no description")
        for name, label in SCOPE_VARS.items():
            v = d.vars.get(name)
            if not v or v.get("type") != "query" or v.get("allValue") != ".*" or not v.get("includeAll"):
                problems.append(f"{w}: no query variable {name} (label {label}) with an All value of .*")
        defined = set(d.vars) | BUILTIN_VARS
        assignments = variable_values(d)
        ids: dict[int, str] = {}
        boxes: list[tuple[dict, int, int, int, int]] = []
        for p in d.panels():
            pw = d.where(p)
            pid = p.get("id")
            if not isinstance(pid, int):
                problems.append(f"{pw}: no integer id")
            elif pid in ids:
                problems.append(f"{pw}: id {pid} also used by {ids[pid]!r}")
            else:
                ids[pid] = p.get("title", "")
            g = p.get("gridPos") or {}
            if not all(isinstance(g.get(k), int) for k in ("h", "w", "x", "y")):
                problems.append(f"{pw}: gridPos needs integer h, w, x, y")
            else:
                if g["x"] < 0 or g["w"] < 1 or g["x"] + g["w"] > 24 or g["h"] < 1:
                    problems.append(f"{pw}: gridPos {g} outside the 24-column grid")
                for q, x, y, wd, h in boxes:
                    if g["x"] < x + wd and x < g["x"] + g["w"] and g["y"] < y + h and y < g["y"] + g["h"]:
                        problems.append(f"{pw}: overlaps panel {q.get('id')} {q.get('title')!r}")
                boxes.append((p, g["x"], g["y"], g["w"], g["h"]))
            if not p.get("title"):
                problems.append(f"{pw}: no title")
            if p.get("type") == "row":
                continue
            if not p.get("description"):
                problems.append(f"{pw}: no description")
            targets = p.get("targets") or []
            if p.get("type") != "text":
                if p.get("datasource") != DS_REF:
                    problems.append(f"{pw}: datasource must be {DS_REF} (no hard-coded uid)")
                if not targets:
                    problems.append(f"{pw}: no targets")
                if p.get("type") in ("timeseries", "stat", "gauge", "bargauge") and not (
                        p.get("fieldConfig", {}).get("defaults", {}).get("unit")):
                    problems.append(f"{pw}: no unit (fieldConfig.defaults.unit)")
            refs = [t.get("refId") for t in targets]
            if len(set(refs)) != len(refs):
                problems.append(f"{pw}: duplicate refId in {refs}")
            for t in targets:
                if t.get("datasource", DS_REF) != DS_REF:
                    problems.append(f"{pw}: target {t.get('refId')} has a hard-coded datasource")
                expr = t.get("expr", "")
                if not expr.strip():
                    problems.append(f"{pw}: target {t.get('refId')} has no expr")
                for m in VAR_RE.finditer(expr + " " + str(t.get("legendFormat", ""))):
                    name = next(g for g in m.groups() if g)
                    if name not in defined:
                        problems.append(f"{pw}: ${name} is not a variable of the dashboard")
                for sel in selectors(expr):
                    name = sel.split("{", 1)[0].strip()
                    if name not in UNSCOPED_SERIES and not all(m in sel for m in SCOPE_MATCHERS):
                        problems.append(f"{pw}: target {t.get('refId')}: selector {sel!r} does not filter on "
                                        f"{' and '.join(SCOPE_MATCHERS)}")
                used = set().union(*(metric_names(substitute(expr, a, "1m")) for a in assignments))
                for name in sorted(used):
                    if base_name(name) not in known and name not in known:
                        problems.append(f"{pw}: metric {name} is declared in no crates/*/src file and is no recording rule in deploy/prometheus")
        titles = {p.get("title") for p in d.panels()}
        for t in KEY_PANELS.get(d.uid, []):
            if t not in titles:
                problems.append(f"{w}: key panel {t!r} (KEY_PANELS) not found")
    uids = {d.uid for d in dashboards}
    for uid in KEY_PANELS:
        if uid not in uids:
            problems.append(f"KEY_PANELS names dashboard {uid!r}, which is not in {dash_dir}")
    problems += drift_check()
    return problems


def drift_check() -> list[str]:
    """deploy/grafana/dashboards must hold exactly the chart's files."""
    if not DEPLOY_DASHBOARDS.exists():
        return [f"{DEPLOY_DASHBOARDS} is missing (a symlink to {CHART_DASHBOARDS})"]
    if DEPLOY_DASHBOARDS.resolve() == CHART_DASHBOARDS.resolve():
        return []
    problems = []
    a = {p.name: p.read_bytes() for p in CHART_DASHBOARDS.glob("*.json")}
    b = {p.name: p.read_bytes() for p in DEPLOY_DASHBOARDS.glob("*.json")}
    for name in sorted(set(a) | set(b)):
        if name not in b:
            problems.append(f"drift: {name} is in {CHART_DASHBOARDS} but not in {DEPLOY_DASHBOARDS}")
        elif name not in a:
            problems.append(f"drift: {name} is in {DEPLOY_DASHBOARDS} but not in {CHART_DASHBOARDS}")
        elif a[name] != b[name]:
            problems.append(f"drift: {name} differs between {CHART_DASHBOARDS} and {DEPLOY_DASHBOARDS}")
    return problems + [f"{DEPLOY_DASHBOARDS} should be a symlink to ../../helm/pulse/dashboards"]


# ------------------------------------------------------------------ live checks
class Prometheus:
    def __init__(self, url: str, timeout: float):
        self.url, self.timeout = url.rstrip("/"), timeout

    def get(self, path: str, **params) -> dict:
        q = urllib.parse.urlencode(params)
        req = urllib.request.Request(f"{self.url}{path}?{q}" if q else f"{self.url}{path}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                return json.loads(e.read())
            except ValueError:
                return {"status": "error", "error": f"HTTP {e.code}"}
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            return {"status": "error", "error": f"cannot reach {self.url}: {e}"}

    def query(self, expr: str) -> dict:
        return self.get("/api/v1/query", query=expr)


def variable_values(d: Dashboard) -> list[dict[str, str]]:
    """Assignments of the dashboard's variables to test with: every option of each custom
    variable (one assignment per option, others at their default); query variables by
    their All value."""
    base: dict[str, str] = {}
    customs: list[tuple[str, list[str]]] = []
    for name, v in d.vars.items():
        if v.get("type") == "datasource":
            continue
        if v.get("type") == "query":
            base[name] = v.get("allValue") or ".+"
        elif v.get("type") in ("custom", "interval"):
            options = [o.strip() for o in str(v.get("query", "")).split(",") if o.strip()]
            options = [o.split(" : ")[-1] for o in options]
            base[name] = str(v.get("current", {}).get("value") or (options[0] if options else ""))
            customs.append((name, options))
        elif v.get("type") in ("constant", "textbox"):
            base[name] = str(v.get("query", ""))
    out = [base]
    for name, options in customs:
        for o in options:
            if o != base[name]:
                out.append({**base, name: o})
    return out


def substitute(expr: str, values: dict[str, str], rate_interval: str) -> str:
    values = {**values, "__rate_interval": rate_interval, "__interval": rate_interval,
              "__range": "1h", "__range_s": "3600"}

    def repl(m: re.Match) -> str:
        name = next(g for g in m.groups() if g)
        return values.get(name, m.group(0))

    return VAR_RE.sub(repl, expr)


def has_data(r: dict) -> bool:
    """A successful result with at least one sample that is a number (not NaN, as a
    quantile of no observations is)."""
    if r.get("status") != "success":
        return False
    data = r["data"]
    if data.get("resultType") == "scalar":
        return data["result"][1] != "NaN"
    for series in data["result"]:
        values = [series["value"]] if "value" in series else series.get("values", [])
        if any(v[1] != "NaN" for v in values):
            return True
    return False


def any_empty_key_panel(jobs: list, results: dict) -> bool:
    """Whether some key panel has no target with data yet."""
    with_data: dict[tuple[str, int], bool] = {}
    for d, p, e in jobs:
        if p.get("title") in KEY_PANELS.get(d.uid, []):
            key = (d.uid, p.get("id"))
            with_data[key] = with_data.get(key, False) or has_data(results[e])
    return not all(with_data.values())


def live_checks(dashboards: list[Dashboard], prom: Prometheus, rate_interval: str,
                settle: float) -> tuple[list[str], list[str]]:
    problems: list[str] = []
    notes: list[str] = []
    names = prom.get("/api/v1/label/__name__/values")
    if names.get("status") != "success":
        return [f"Prometheus: {names.get('error')}"], notes
    present = set(names["data"])
    jobs: list[tuple[Dashboard, dict, str]] = []
    for d in dashboards:
        assignments = variable_values(d)
        for p in d.panels():
            for t in p.get("targets") or []:
                expr = t.get("expr", "")
                for values in assignments:
                    jobs.append((d, p, substitute(expr, values, rate_interval)))
        for name, v in d.vars.items():
            if v.get("type") == "query":
                q = v.get("query")
                q = q.get("query", "") if isinstance(q, dict) else (q or v.get("definition", ""))
                m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q.strip())
                if not m:
                    problems.append(f"{d.where()}: variable {name}: not label_values(selector, label): {q!r}")
                    continue
                sel = substitute(m.group(1), assignments[0], rate_interval)
                r = prom.query(f"count by ({m.group(2)}) ({sel})")
                if r.get("status") != "success":
                    problems.append(f"{d.where()}: variable {name}: {r.get('error')}")
                elif not r["data"]["result"]:
                    label = SCOPE_VARS.get(name)
                    if label and not prom.query(f'count({{__name__=~"pulse_.+", {label}!=""}})')["data"]["result"]:
                        note = (f"variable {name}: no series carries `{label}` (a scrape config without the "
                                f"chart's ServiceMonitor labels): All (.*) matches every series")
                        if note not in notes:
                            notes.append(note)
                    else:
                        problems.append(f"{d.where()}: variable {name}: {q} finds no values")
    unique = sorted({e for _, _, e in jobs})
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = dict(zip(unique, pool.map(prom.query, unique)))
        # Key panels' queries that ran but found nothing get until the deadline: the last
        # scrapes after a workload may not be in yet.
        key_exprs = {e for d, p, e in jobs if p.get("title") in KEY_PANELS.get(d.uid, [])}
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            waiting = sorted(e for e in key_exprs if results[e].get("status") == "success"
                             and not has_data(results[e]))
            if not waiting or not any_empty_key_panel(jobs, results):
                break
            time.sleep(1)
            results.update(zip(waiting, pool.map(prom.query, waiting)))
    data_by_panel: dict[tuple[str, int], bool] = {}
    missing: dict[str, set[str]] = {}
    for d, p, expr in jobs:
        r = results[expr]
        key = (d.uid, p.get("id"))
        data_by_panel.setdefault(key, False)
        if r.get("status") != "success":
            line = f"{d.where(p)}: query fails: {r.get('errorType', '')} {r.get('error')}\n    {expr}"
            if line not in problems:
                problems.append(line)
            continue
        if has_data(r):
            data_by_panel[key] = True
        for name in metric_names(expr):
            if name not in present:
                missing.setdefault(name, set()).add(f"{d.uid}/{p.get('title')}")
    for name, where in sorted(missing.items()):
        line = f"metric {name} is not in Prometheus (used by {', '.join(sorted(where))})"
        if base_name(name) in FAULT_ONLY:
            notes.append(line + " — in FAULT_ONLY: reported, not failed")
        else:
            problems.append(line)
    key_total = key_data = 0
    for d in dashboards:
        for p in d.panels():
            if p.get("title") in KEY_PANELS.get(d.uid, []):
                key_total += 1
                if data_by_panel.get((d.uid, p.get("id"))):
                    key_data += 1
                else:
                    problems.append(f"{d.where(p)}: key panel returned no data")
    empty = [f"{d.uid}/{p.get('title')}" for d in dashboards for p in d.panels()
             if (d.uid, p.get("id")) in data_by_panel and not data_by_panel[(d.uid, p.get("id"))]]
    if empty:
        notes.append("panels without data now (not key panels; they show faults or traffic that did not happen): "
                     + "; ".join(empty))
    with_targets = len(data_by_panel)
    with_data = sum(data_by_panel.values())
    notes.append(f"{len(unique)} distinct queries ran; {with_data} of {with_targets} panels with queries "
                 f"returned data; key panels with data: {key_data} of {key_total}")
    return problems, notes


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dashboards", type=Path, default=DEPLOY_DASHBOARDS)
    ap.add_argument("--prometheus", help="base URL of a Prometheus scraping a running stack")
    ap.add_argument("--rate-interval", default="1m", help="what $__rate_interval becomes (default 1m)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per Prometheus request")
    ap.add_argument("--settle", type=float, default=15.0,
                    help="seconds key panels without data are queried again before failing (default 15)")
    args = ap.parse_args(argv)
    started = time.monotonic()
    files = sorted(args.dashboards.glob("*.json"))
    if not files:
        print(f"FAIL no dashboards (*.json) in {args.dashboards}", file=sys.stderr)
        return 1
    dashboards, problems = [], []
    for f in files:
        try:
            dashboards.append(Dashboard(f))
        except (ValueError, OSError) as e:
            problems.append(f"{f.name}: not valid JSON: {e}")
    problems += static_checks(dashboards, args.dashboards)
    n_panels = sum(1 for d in dashboards for p in d.panels() if p.get("type") != "row")
    print(f"dashboards: {len(dashboards)} files, {n_panels} panels: static checks "
          + ("passed" if not problems else f"{len(problems)} problem(s)"))
    if args.prometheus and not problems:
        live, notes = live_checks(dashboards, Prometheus(args.prometheus, args.timeout),
                                  args.rate_interval, args.settle)
        for n in notes:
            print(f"dashboards: {n}")
        problems += live
    for p in problems:
        print(f"FAIL {p}", file=sys.stderr)
    print(f"dashboards: {'ok' if not problems else 'FAILED'} in {time.monotonic() - started:.1f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
