#!/usr/bin/env python3
"""Pulse's alerting, checked statically and on a live platform (scripts/check-observability.sh).

`static`: promtool check/test of deploy/prometheus; every alert has `severity` (page or
ticket), a summary, a description and a `runbook_url` pointing at an existing heading of
docs/runbooks/; every alert has a promtool test case where it fires and one where it must
not; promtool evaluates the writers' rendered KEDA queries (helm/pulse ScaledObjects): no
value while a circuit is open or the store blocked (KEDA errors, the HPA holds), the lag
otherwise.

`prepare DIR`: writes the test copy of the rules (every range selector `[Nm]` of the symptom
alerts shortened to WINDOW, every `for:` there to FOR; the SLIs' windows compressed by
SLO_WINDOWS and the burn-rate alerts' `for:` set to FOR, thresholds and window pairs
unchanged; the ledger alerts shortened like the symptom alerts) and an Alertmanager
config that sends every
notification (resolved too) at once to the webhook.

`live`: with the PULSE_* variables of scripts/dev.sh set by the caller, runs a webhook
receiver, `dev.sh up`, a query workload (HTTP and gRPC), then real faults one at a time
(FAULTS), each followed by its recovery (`dev.sh up`, SIGCONT, or the repairing SQL):
  1. stop writer-clickhouse while events flow -> PulseEventsNotStored and PulseServiceDown
     {component=writer-clickhouse} reach the webhook; PulseProcessorStalled does not;
  2. stop the processor and the schema registry -> PulseProcessorStalled,
     PulseServiceDown{component=processor}, PulseServiceDown{component=schema-registry},
     PulseSchemaRegistryUnreachable; PulseEventsNotStored does not;
  3. kill ClickHouse and the S3 server while a second loadgen sends 400 events/s ->
     PulseClickHouseInsertErrors, PulseS3UploadErrors, PulseWriterCircuitOpen of each
     writer, PulseEventsNotArchived, PulseConsumerLagGrowing{component=writer-clickhouse}
     (its breaker paused consumption), PulseLedgerStalled (its runs fail); meanwhile the
     writers' KEDA queries (helm/pulse ScaledObjects, on this stack's `component` label)
     have no value although their lag has one, and have a value again after the recovery;
  4. stall ClickHouse (SIGSTOP) while 8 clients query -> PulseQueryLatencyHigh,
     PulseAvailabilityBudgetFastBurn and SlowBurn; after SIGCONT the backlog is written
     late -> PulseFreshnessBudgetFastBurn and SlowBurn;
  5. rename the events table away -> PulseWriterBlocked{component=writer-clickhouse};
  6. dev.sh's loadgen stopped, a loadgen sending only malformed and late events ->
     PulseDeadLetterRateHigh, PulseLateEventRateHigh, PulseWatermarkNotAdvancing;
  7. ingest restarted with --max-concurrent-requests 1, the processor with a 1-byte state
     budget and the query API with a certificate that expires in a day, while a loadgen
     sends 400 events/s with 16 requests in flight -> PulseIngestBackpressure,
     PulseProcessorStateOverBudget, PulseTlsCertExpiringSoon{component=query-api};
and after each recovery the same alerts arrive resolved. Beside the faults (LedgerTamper),
a final user window the ledger has not reconciled yet is corrupted in ClickHouse (a
tenth of its minute's events deleted, its revenue raised by 1 unit): once the minute closes,
PulseLedgerMismatch, PulseRevenueDelta and the correctness burn (fast and slow) fire and
resolve, and the ledger's missing count grows by at least the deleted events. Then every metric name used by a
rule or by the chart's KEDA queries must be in the live Prometheus
(/api/v1/label/__name__/values), and
tests/python/dashboards_check.py runs against the same Prometheus.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy/prometheus/rules"
RULE_TESTS = REPO / "deploy/prometheus/tests"
RUNBOOKS = REPO / "docs/runbooks"
RUNBOOK_BASE = "https://github.com/pulse-analytics/pulse/blob/main/docs/runbooks/"
SYMPTOMS = "pulse-symptoms.rules.yaml"
LEDGER = "pulse-ledger.rules.yaml"
DEV = REPO / "scripts/dev.sh"
TOKEN = "pulse-dev-token"

FIRE_TIMEOUT = 90.0
RESOLVE_TIMEOUT = 120.0


def fail(msg: str) -> None:
    print(f"observability check FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def say(msg: str) -> None:
    print(f"[observability] {msg}", flush=True)


# ---------------------------------------------------------------- static checks


def load_alerts() -> list[dict]:
    alerts = []
    for f in sorted(RULES.glob("*.rules.yaml")):
        for group in yaml.safe_load(f.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    alerts.append({**rule, "file": f.name})
    return alerts


def github_anchor(heading: str) -> str:
    """GitHub's heading id: lowercase, punctuation dropped, spaces to hyphens."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def runbook_anchors(page: Path) -> set[str]:
    anchors, in_code = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"^#{1,6}\s+(.*)$", line)):
            anchors.add(github_anchor(m.group(1)))
    return anchors


def check_annotations(alerts: list[dict]) -> list[str]:
    problems = []
    for a in alerts:
        name, labels, ann = a["alert"], a.get("labels", {}), a.get("annotations", {})
        if labels.get("severity") not in ("page", "ticket"):
            problems.append(f"{name}: severity must be page or ticket, not {labels.get('severity')!r}")
        for key in ("summary", "description", "runbook_url"):
            if not ann.get(key):
                problems.append(f"{name}: no {key} annotation")
        url = ann.get("runbook_url", "")
        if not url.startswith(RUNBOOK_BASE) or "#" not in url:
            problems.append(f"{name}: runbook_url {url!r} is not {RUNBOOK_BASE}<page>.md#<anchor>")
            continue
        page, anchor = url[len(RUNBOOK_BASE):].split("#", 1)
        path = RUNBOOKS / page
        if not path.is_file():
            problems.append(f"{name}: runbook page docs/runbooks/{page} does not exist")
        elif anchor not in runbook_anchors(path):
            problems.append(f"{name}: docs/runbooks/{page} has no heading with anchor #{anchor}")
    return problems


def check_runbook_links() -> list[str]:
    """Links between runbook pages ([text](page.md#anchor)) point at existing headings."""
    problems = []
    for page in sorted(RUNBOOKS.glob("*.md")):
        for target in re.findall(r"\]\(([a-z0-9-]+\.md)(?:#([\w-]+))?\)", page.read_text()):
            path = RUNBOOKS / target[0]
            if not path.is_file():
                problems.append(f"docs/runbooks/{page.name}: link to missing page {target[0]}")
            elif target[1] and target[1] not in runbook_anchors(path):
                problems.append(f"docs/runbooks/{page.name}: link to {target[0]}#{target[1]}: no such heading")
    return problems


def check_test_coverage(alerts: list[dict]) -> list[str]:
    fires, silent = set(), set()
    for f in sorted(RULE_TESTS.glob("*.test.yaml")):
        for case in yaml.safe_load(f.read_text())["tests"]:
            for t in case.get("alert_rule_test", []):
                (fires if t.get("exp_alerts") else silent).add(t["alertname"])
    problems = []
    for a in alerts:
        if a["alert"] not in fires:
            problems.append(f"{a['alert']}: no promtool test where it fires")
        if a["alert"] not in silent:
            problems.append(f"{a['alert']}: no promtool test where it must not fire")
    return problems


def check_chart_rules() -> list[str]:
    """The chart's PrometheusRule (helm template, prometheusRule.enabled) carries exactly the
    groups of the rule files, and promtool accepts them as rendered."""
    helm = Path(os.environ.get("PULSE_CACHE", Path.home() / ".cache/pulse")) / "tools/bin/helm"
    r = subprocess.run([str(helm), "template", "t", str(REPO / "helm/pulse"),
                        "--set", "prometheusRule.enabled=true", "--show-only", "templates/prometheusrule.yaml"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return [f"helm template of the PrometheusRule failed: {r.stderr.strip()}"]
    doc = yaml.safe_load(r.stdout)
    want = [g for f in sorted(RULES.glob("*.rules.yaml")) for g in yaml.safe_load(f.read_text())["groups"]]
    got = doc["spec"]["groups"]
    if sorted(got, key=lambda g: g["name"]) != sorted(want, key=lambda g: g["name"]):
        return ["the chart's PrometheusRule groups differ from deploy/prometheus/rules"]
    rendered = Path(os.environ.get("TMPDIR", "/tmp")) / f"pulse-prometheusrule-{os.getpid()}.yaml"
    rendered.write_text(yaml.safe_dump({"groups": got}))
    try:
        r = subprocess.run(["promtool", "check", "rules", str(rendered)], capture_output=True, text=True)
    finally:
        rendered.unlink()
    return [] if r.returncode == 0 else [f"promtool refuses the chart's rendered rules: {r.stdout}{r.stderr}"]


# KEDA's queries (helm/pulse/templates/scaledobject.yaml), rendered as `helm template pulse
# --namespace pulse --set keda.enabled=true`: ScaledObject name -> (query, threshold).
def keda_queries() -> dict[str, tuple[str, int]]:
    helm = Path(os.environ.get("PULSE_CACHE", Path.home() / ".cache/pulse")) / "tools/bin/helm"
    r = subprocess.run([str(helm), "template", "pulse", str(REPO / "helm/pulse"), "--namespace", "pulse",
                        "--set", "keda.enabled=true", "--show-only", "templates/scaledobject.yaml"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"helm template of the ScaledObjects failed: {r.stderr.strip()}")
    out = {}
    for d in yaml.safe_load_all(r.stdout):
        if d:
            trig = d["spec"]["triggers"][0]["metadata"]
            # The hold needs KEDA to treat "no value" as an error, not as 0 (a scale-in).
            if trig.get("ignoreNullValues") != "false":
                fail(f"ScaledObject {d['metadata']['name']}: ignoreNullValues is {trig.get('ignoreNullValues')!r}, "
                     "not \"false\": KEDA would read the gated query's empty result as 0 and scale in")
            out[d["metadata"]["name"]] = (trig["query"], int(trig["threshold"]))
    return out


def keda_metric_names() -> set[str]:
    return {n for q, _ in keda_queries().values() for n in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", q)}


def keda_local_query(name: str) -> tuple[str, str]:
    """ScaledObject `name`'s query on this stack's series (selected by `component`, not by
    namespace and pod): (the query, its lag part alone)."""
    query = keda_queries()[name][0]
    local = re.sub(r'namespace="[^"]*", pod=~"[^"]*"', f'component="{name.removeprefix("pulse-")}"', query)
    if local == query:
        fail(f"cannot point the KEDA query of {name} at the local stack: {query}")
    return local, local.split(" unless ")[0]


def check_keda_gate() -> list[str]:
    """promtool evaluates each writer's rendered KEDA query (and HPA's desired replicas,
    ceil(value / threshold)) on series of two pods of that writer: lag high with every
    circuit closed -> the lag (a scale-out); lag high while one pod's circuit is open, or
    its store is blocked -> no value (KEDA errors, the HPA holds its replica count). The
    other writer's open circuit, and this writer's in another namespace, do not gate it; the
    processor's query is never gated by a writer's circuit. A case that expects no value
    where the query returns one fails promtool (checked, so the cases can fail)."""
    queries = keda_queries()
    writers = {n: q for n, q in queries.items() if n.startswith("pulse-writer-")}
    if set(writers) != {"pulse-writer-clickhouse", "pulse-writer-parquet"} or "pulse-processor" not in queries:
        return [f"expected ScaledObjects for the processor and both writers, got {sorted(queries)}"]
    lag = 60000  # 3 replicas' worth at the default threshold of 20000
    pods = ["5d8f7c9b4-x2x7q", "5d8f7c9b4-k9zzl"]

    def series(name: str, labels: dict, values: str) -> dict:
        body = ",".join(f'{k}="{v}"' for k, v in labels.items())
        return {"series": f"{name}{{{body}}}", "values": values}

    tests = []
    for name, (query, threshold) in sorted(writers.items()):
        sink = name.removeprefix("pulse-writer-")
        other = "parquet" if sink == "clickhouse" else "clickhouse"
        pod = [f"{name}-{p}" for p in pods]
        # Minutes 0-12: closed (0-2), pod 0's circuit open (3-5), pod 1's open (6-8),
        # pod 0 blocked (9-10), all clear again (11-12) while the other writer's circuit and
        # this writer's in another namespace are open.
        inputs = [
            series("pulse_kafka_consumer_processing_lag_records",
                   {"namespace": "pulse", "pod": pod[0], "topic": "pulse.events.v1", "partition": "0"}, f"{lag}x12"),
            series("pulse_kafka_consumer_processing_lag_records",
                   {"namespace": "pulse", "pod": pod[1], "topic": "pulse.events.v1", "partition": "1"}, "0x12"),
            series("pulse_writer_circuit_open", {"namespace": "pulse", "pod": pod[0], "sink": sink},
                   "0 0 0 1 1 1 0 0 0 0 0 0 0"),
            series("pulse_writer_circuit_open", {"namespace": "pulse", "pod": pod[1], "sink": sink},
                   "0 0 0 0 0 0 1 1 1 0 0 0 0"),
            series("pulse_writer_blocked", {"namespace": "pulse", "pod": pod[0], "sink": sink, "reason": "auth"},
                   "0 0 0 0 0 0 0 0 0 1 1 0 0"),
            series("pulse_writer_blocked", {"namespace": "pulse", "pod": pod[1], "sink": sink, "reason": "auth"},
                   "0x12"),
            series("pulse_writer_circuit_open",
                   {"namespace": "pulse", "pod": f"pulse-writer-{other}-{pods[0]}", "sink": other}, "1x12"),
            series("pulse_writer_circuit_open", {"namespace": "other", "pod": pod[0], "sink": sink}, "1x12"),
            series("pulse_kafka_consumer_processing_lag_records",
                   {"namespace": "pulse", "pod": f"pulse-processor-{pods[0]}", "topic": "pulse.events.v1",
                    "partition": "0"}, f"{lag}x12"),
        ]
        desired = f"ceil(({query}) / {threshold})"
        cases = []
        for minute, scaled in ((1, True), (4, False), (7, False), (10, False), (12, True)):
            cases.append({"expr": query, "eval_time": f"{minute}m",
                          "exp_samples": [{"labels": "{}", "value": lag}] if scaled else []})
            cases.append({"expr": desired, "eval_time": f"{minute}m",
                          "exp_samples": [{"labels": "{}", "value": -(-lag // threshold)}] if scaled else []})
        # The processor is not gated by any writer's circuit.
        cases.append({"expr": queries["pulse-processor"][0], "eval_time": "4m",
                      "exp_samples": [{"labels": "{}", "value": lag}]})
        tests.append({"interval": "1m", "input_series": inputs, "promql_expr_test": cases})
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"pulse-keda-{os.getpid()}.test.yaml"
    problems = []
    try:
        tmp.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "1m", "tests": tests}))
        r = subprocess.run(["promtool", "test", "rules", str(tmp)], capture_output=True, text=True)
        if r.returncode != 0:
            problems.append(f"promtool: the writers' KEDA queries do not hold during a store outage:\n"
                            f"{r.stdout}{r.stderr}")
        # The same cases with the gate flipped (an outage expected to scale) must fail.
        for t in tests:
            for c in t["promql_expr_test"]:
                if c["eval_time"] == "4m" and c["expr"] in {q for q, _ in writers.values()}:
                    c["exp_samples"] = [{"labels": "{}", "value": lag}]
        tmp.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "1m", "tests": tests}))
        r = subprocess.run(["promtool", "test", "rules", str(tmp)], capture_output=True, text=True)
        if r.returncode == 0:
            problems.append("promtool passed a KEDA case expecting a scale-out while a circuit is open")
    finally:
        tmp.unlink(missing_ok=True)
    return problems


# The labels that tell Pulse installs apart (the ServiceMonitor sets both): every rule's
# aggregation keeps them, so two releases, in one namespace or several, alert separately.
SCOPE_LABELS = ("namespace", "pulse_release")


def check_release_scope() -> list[str]:
    """Every `by (...)` and `on (...)` of every rule keeps namespace and pulse_release
    (`on (slo)`, the join with the one objective series per SLO, is the only exception)."""
    problems = []
    for f in sorted(RULES.glob("*.rules.yaml")):
        for group in yaml.safe_load(f.read_text())["groups"]:
            for rule in group["rules"]:
                name = rule.get("alert") or rule.get("record")
                expr = re.sub(r'"[^"]*"', '""', str(rule["expr"]))
                for kw, labels in re.findall(r"\b(by|on)\s*\(([^)]*)\)", expr):
                    got = {s.strip() for s in labels.split(",") if s.strip()}
                    if kw == "on" and got == {"slo"}:
                        continue
                    if not set(SCOPE_LABELS) <= got:
                        problems.append(f"{f.name}: {name}: `{kw} ({labels})` drops "
                                        f"{' and '.join(sorted(set(SCOPE_LABELS) - got))}: two releases would merge")
    return problems


def check_two_releases_render() -> list[str]:
    """Two releases in one namespace: `helm template` of each, with serviceMonitor enabled,
    gives ServiceMonitors of distinct names whose every endpoint sets `pulse_release` to
    its own release (the label the rules aggregate by and the dashboards filter on)."""
    helm = Path(os.environ.get("PULSE_CACHE", Path.home() / ".cache/pulse")) / "tools/bin/helm"
    names: dict[str, str] = {}
    problems = []
    for release in ("blue", "green"):
        r = subprocess.run([str(helm), "template", release, str(REPO / "helm/pulse"), "--namespace", "pulse",
                            "--set", "serviceMonitor.enabled=true", "--show-only", "templates/servicemonitor.yaml"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return [f"helm template of the ServiceMonitors ({release}) failed: {r.stderr.strip()}"]
        docs = [d for d in yaml.safe_load_all(r.stdout) if d]
        if not docs:
            problems.append(f"release {release}: no ServiceMonitor rendered")
        for d in docs:
            name = d["metadata"]["name"]
            if name in names:
                problems.append(f"ServiceMonitor {name} rendered by both {names[name]} and {release}")
            names[name] = release
            for ep in d["spec"]["endpoints"]:
                got = [rl.get("replacement") for rl in ep.get("relabelings", [])
                       if rl.get("targetLabel") == "pulse_release" and not rl.get("sourceLabels")]
                if got != [release]:
                    problems.append(f"release {release}: ServiceMonitor {name} sets pulse_release to {got}, "
                                    f"not [{release!r}]")
                comp = [rl for rl in ep.get("relabelings", []) if rl.get("targetLabel") == "component"]
                if not comp:
                    problems.append(f"release {release}: ServiceMonitor {name} sets no `component`")
    return problems


def static() -> None:
    rules = sorted(str(p) for p in RULES.glob("*.rules.yaml"))
    tests = sorted(str(p) for p in RULE_TESTS.glob("*.test.yaml"))
    if not rules or not tests:
        fail("no rules or no rule tests in deploy/prometheus")
    for cmd in (["promtool", "check", "rules", *rules], ["promtool", "test", "rules", *tests]):
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if r.returncode != 0:
            fail(f"{' '.join(cmd[:3])} failed:\n{r.stdout}{r.stderr}")
    alerts = load_alerts()
    problems = (check_annotations(alerts) + check_runbook_links() + check_test_coverage(alerts)
                + check_chart_rules() + check_release_scope() + check_two_releases_render()
                + check_keda_gate())
    if problems:
        fail("\n  " + "\n  ".join(problems))
    say(f"static: {len(rules)} rule files, {len(alerts)} alerting rules ({len({a['alert'] for a in alerts})} "
        f"alerts), each with severity, summary, "
        f"an existing runbook anchor, and promtool tests that fire it and keep it silent; "
        f"the chart's PrometheusRule holds the same groups; every aggregation keeps "
        f"{' and '.join(SCOPE_LABELS)}, and two releases in one namespace render ServiceMonitors "
        f"that label their series with their own pulse_release; promtool holds the writers' KEDA "
        f"queries at no value while a circuit is open or the store blocked, and at the lag otherwise")


# ---------------------------------------------------------------- prepare


def prepare(out: Path, window: str, for_: str, webhook: str) -> None:
    rules = out / "rules"
    rules.mkdir(parents=True, exist_ok=True)
    for f in RULES.glob("*.rules.yaml"):
        text = f.read_text()
        if f.name in (SYMPTOMS, LEDGER):
            text = re.sub(r"\[(\d+)m\]", f"[{window}]", text)
            text = re.sub(r"(?m)^(\s+for:) \S+$", rf"\1 {for_}", text)
        elif f.name == SLIS:
            text = re.sub(r"\[(\d+[mhd])\]", lambda m: f"[{SLO_WINDOWS[m.group(1)]}]", text)
        elif f.name == SLO_ALERTS:
            text = re.sub(r"(?m)^(\s+for:) \S+$", rf"\1 {for_}", text)
        (rules / f.name).write_text(text)
    (out / "alertmanager.yml").write_text(
        "# The observability check's Alertmanager: every notification at once to its webhook.\n"
        + yaml.safe_dump({
            "route": {
                "receiver": "check",
                "group_by": ["alertname", "component"],
                "group_wait": "1s",
                "group_interval": "1s",
                "repeat_interval": "1h",
            },
            "receivers": [{
                "name": "check",
                "webhook_configs": [{"url": webhook, "send_resolved": True}],
            }],
        }, sort_keys=False)
    )


# ---------------------------------------------------------------- live


class Webhook:
    """Alertmanager webhook receiver: records (monotonic time, status, labels) per alert."""

    def __init__(self, port: int):
        self.events: list[tuple[float, str, dict]] = []
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                now = time.monotonic()
                try:
                    payload = json.loads(body)
                    with hook.lock:
                        for a in payload.get("alerts", []):
                            hook.events.append((now, a.get("status", ""), a.get("labels", {})))
                    self.send_response(200)
                except ValueError:
                    self.send_response(400)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def first(self, status: str, alertname: str, component: str | None, since: float) -> float | None:
        with self.lock:
            for t, s, labels in self.events:
                if (t >= since and s == status and labels.get("alertname") == alertname
                        and (component is None or labels.get("component") == component)):
                    return t
        return None


def http_json(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def prom_query(prom: str, q: str) -> list:
    return http_json(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": q}))["data"]["result"]


def wait_for(what: str, cond, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = cond()
        except (OSError, urllib.error.URLError, KeyError, ValueError):
            got = None
        if got:
            return got
        time.sleep(every)
    fail(f"timed out after {timeout:.0f} s waiting for {what}")


def dev(arg: str) -> float:
    t = time.monotonic()
    r = subprocess.run(["bash", str(DEV), arg], capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"scripts/dev.sh {arg} failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    return time.monotonic() - t


def stop(state: str, name: str, crash: bool) -> None:
    """A crash: SIGKILL to the recorded process group. Else stack.sh's stop_proc: SIGTERM,
    SIGKILL after 20 s. Either way the pid file's process is gone and `dev.sh up` starts it."""
    if crash:
        pid = int((Path(state) / "pids" / f"{name}.pid").read_text().strip())
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            fail(f"{name} (pid {pid}) was not running")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        fail(f"{name} (pid {pid}) survived SIGKILL")
    r = subprocess.run(
        ["bash", "-c", 'source "$0/scripts/stack.sh" && stop_proc "$1" "$2"', str(REPO), state, name],
        capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"stopping {name} failed: {r.stderr}")


def restart_with(state: str, name: str, extra: dict[str, str]) -> None:
    """Restarts NAME as it runs now (its command line, environment and working directory,
    read from /proc) with EXTRA added to its environment, under the same pid file (so
    `dev.sh down` stops it), without waiting for readiness."""
    pidfile = Path(state) / "pids" / f"{name}.pid"
    pid = int(pidfile.read_text().strip())
    proc = Path(f"/proc/{pid}")
    argv = [a.decode() for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
    environ = dict(kv.decode().split("=", 1) for kv in (proc / "environ").read_bytes().split(b"\0") if b"=" in kv)
    cwd = os.readlink(proc / "cwd")
    stop(state, name, False)
    # stack.sh's start_proc (setsid nohup ... &, pid file): the process is not this one's
    # child, so once stopped it is reaped at once and stop_proc does not wait on a zombie.
    r = subprocess.run(["bash", "-c", 'source "$0/scripts/stack.sh" && cd "$1" && shift && start_proc "$@"',
                        str(REPO), cwd, state, name, *argv], env={**environ, **extra}, capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"restarting {name} failed: {r.stderr}")


def short_lived_cert(state: str) -> dict[str, str]:
    """A self-signed certificate for 127.0.0.1 that expires in one day (openssl), as the
    TLS variables of a server: its expiry gauge is then under PulseTlsCertExpiringSoon's
    2-day page threshold."""
    d = Path(state) / "tls"
    d.mkdir(exist_ok=True)
    cert, key = d / "expiring.crt", d / "expiring.key"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"openssl could not make the test certificate: {r.stderr}")
    return {"PULSE_TLS_CERT_FILE": str(cert), "PULSE_TLS_KEY_FILE": str(key)}


def registry_read_auth(env) -> dict[str, str]:
    """The Authorization header of the registry's read user that `dev.sh up` made
    (tests/python/devsh_registry_auth.py); none with PULSE_DEV_REGISTRY_AUTH=0."""
    if env.get("PULSE_DEV_REGISTRY_AUTH", "1") == "0":
        return {}
    from devsh_registry_auth import READ_USER, basic, password
    try:
        secret = password(env, READ_USER)
    except OSError as e:
        fail(f"no password file of the registry's read user ({e}); dev.sh up makes it")
    return basic(READ_USER, secret)


def workload(env: dict) -> None:
    """Every query-API route over HTTP and every gRPC method once, so their series exist;
    and a client's lookups in the schema registry (its dashboard's latency panels)."""
    registry = f"http://127.0.0.1:{env['PULSE_SCHEMA_REGISTRY_PORT']}"
    # As a client: the read user dev.sh made (its password in the state folder).
    read_user = registry_read_auth(env)
    for path in ("/subjects", "/schemas/ids/1", "/subjects/pulse.events.v1-value/versions/latest"):
        try:
            urllib.request.urlopen(urllib.request.Request(registry + path, headers=read_user), timeout=10).read()
        except urllib.error.HTTPError as e:
            if e.code >= 500 or e.code in (401, 403):
                fail(f"schema registry GET {path} as the read user answered {e.code}")
    base = f"http://127.0.0.1:{env['PULSE_QUERY_HTTP_PORT']}"
    for path in ("/v1/active_users?step=1m", "/v1/active_users/current", "/v1/revenue?step=1m",
                 "/v1/revenue_last_hour", "/v1/top_pages", "/v1/sessions", "/v1/freshness",
                 "/v1/users/u-1"):
        req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {TOKEN}"})
        try:
            urllib.request.urlopen(req, timeout=10).read()
        except urllib.error.HTTPError as e:
            if e.code >= 500:
                fail(f"GET {path} answered {e.code}")
    try:
        import grpc
    except ImportError:
        fail("grpcio is missing from the venv: run scripts/install-deps.sh")
    with grpc.insecure_channel(f"127.0.0.1:{env['PULSE_QUERY_GRPC_PORT']}") as ch:
        for m in ("ActiveUsers", "ActiveUsersCurrent", "Revenue", "RevenueLastHour", "TopPages",
                  "User", "Sessions", "GetFreshness"):
            call = ch.unary_unary(f"/pulse.query.v1.QueryService/{m}")
            try:
                call(b"", metadata=[("authorization", f"Bearer {TOKEN}")], timeout=10)
            except grpc.RpcError as e:  # User without a user_id is InvalidArgument: still counted
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL):
                    fail(f"gRPC {m} failed: {e.code()} {e.details()}")


def rule_metric_names() -> set[str]:
    names = set()
    for f in RULES.glob("*.rules.yaml"):
        for group in yaml.safe_load(f.read_text())["groups"]:
            for rule in group["rules"]:
                expr = re.sub(r'"[^"]*"', '""', str(rule["expr"]))
                # Label names (by/on clauses, matchers) are not metric names.
                expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)|\{[^}]*\}", " ", expr)
                names |= set(re.findall(r"\b(pulse_[a-z0-9_]+|up)\b", expr))
    return names


class Fault:
    """One fault: what is stopped (name, crash?), paused (SIGSTOP, resumed by SIGCONT), broken
    in ClickHouse (statements, and the ones that repair it) or the bad traffic injected; the
    alerts that must fire during it [(alertname, component or None)], those that must fire
    after the recovery (`after`: e.g. a backlog written late), and those that must stay
    silent. `queries`: query-API requests run in the background while the fault lasts."""

    def __init__(self, label: str, expect: list, silent: list, stop: list | None = None,
                 traffic: list | None = None, pause: list | None = None,
                 sql: tuple[list, list] | None = None, queries: bool = False,
                 after: list | None = None, restart: dict | None = None, keda: list | None = None):
        self.label, self.expect, self.silent = label, expect, silent
        # ScaledObjects (helm/pulse) whose query, on this stack's labels, must have no value
        # once the expected alerts fired (KEDA holds the replica count) and a value again
        # after the recovery.
        self.keda = keda or []
        # {process name: {VAR: value or callable(state dir) -> value}}: restarted with these
        # variables added, not waited for (its readiness may be what the fault breaks);
        # recovery stops it and `dev.sh up` starts it as configured.
        self.restart = restart or {}
        self.stop = stop or []          # [(process name in $PULSE_STATE/pids, crash?)]
        self.traffic = traffic          # extra `pulsectl loadgen` arguments, or None
        self.pause = pause or []        # [process name]: SIGSTOP to its group, then SIGCONT
        self.sql = sql                  # ([statements that break], [statements that repair])
        self.queries = queries
        self.after = after or []


# The injected traffic: a second loadgen at 40 events/s while dev.sh's own loadgen is
# stopped: half its events fail validation (ingest dead-letters them) and half are dated
# 10 min back, beyond the processor's allowed lateness (the late topic), so both shares are
# well above the alerts' 10 %; and as no event moves event time forward, the processor
# consumes while its watermark stands still. Back at ~1 % once dev.sh's loadgen is back.
BAD_TRAFFIC = ["--rate", "40", "--malformed", "0.5", "--late", "0.5", "--late-warmup-ms", "0",
               "--duplicates", "0", "--out-of-order", "0"]

# The SLO burn-rate alerts as they are (thresholds, objectives, the pairing of a long and a
# short window), on a compressed clock: every SLI window shortened (the check's Prometheus
# scrapes and evaluates every second) and every `for:` set to --for. The long windows 1h,
# 1d and 3d become 20 s; 5m, 30m, 2h and 6h (6h is the short window of the 3d pair) 10 s:
# a fault of ~15 s burns the budget at well over 14.4x in both windows of a pair, and the
# alert resolves ~10 s after the burn stops. This proves the chain (SLI recording rules ->
# burn-rate alert -> Alertmanager) with real failures; promtool proves the real windows.
SLO_WINDOWS = {"5m": "10s", "30m": "10s", "2h": "10s", "6h": "10s", "1h": "20s", "1d": "20s", "3d": "20s"}
SLIS, SLO_ALERTS = "pulse-slis.rules.yaml", "pulse-slo-alerts.rules.yaml"

FAULTS = [
    Fault("writer-clickhouse stopped",
          stop=[("writer-clickhouse", False)],
          expect=[("PulseEventsNotStored", None), ("PulseServiceDown", "writer-clickhouse")],
          silent=["PulseProcessorStalled"]),
    # The processor and the schema registry at once (the others keep running on the schema
    # ids they cached): each alert names what it is about.
    Fault("processor and schema-registry stopped",
          stop=[("processor", False), ("schema-registry", False)],
          expect=[("PulseProcessorStalled", None), ("PulseServiceDown", "processor"),
                  ("PulseServiceDown", "schema-registry"),
                  ("PulseSchemaRegistryUnreachable", "schema-registry")],
          silent=["PulseEventsNotStored"]),
    # Both stores crash (ClickHouse's graceful shutdown takes ~17 s; a crash is as real and
    # quicker). check-observability.sh runs the writers with a 3-failure breaker, so each
    # opens within seconds.
    # A second loadgen at 400 events/s meanwhile: the writers, their breakers open, stop
    # consuming, so their processing lag (refreshed from the broker on a timer, not from
    # what the paused consumer fetches) passes 1000 records and grows; the ledger cannot
    # read ClickHouse, so its runs fail.
    Fault("clickhouse and s3 killed",
          stop=[("clickhouse", True), ("s3", True)], traffic=["--rate", "400", "--concurrency", "8"],
          expect=[("PulseClickHouseInsertErrors", "writer-clickhouse"),
                  ("PulseWriterCircuitOpen", "writer-clickhouse"),
                  ("PulseS3UploadErrors", "writer-parquet"),
                  ("PulseWriterCircuitOpen", "writer-parquet"),
                  ("PulseEventsNotArchived", "writer-parquet"),
                  ("PulseConsumerLagGrowing", "writer-clickhouse"),
                  ("PulseLedgerStalled", "ledger")],
          silent=["PulseProcessorStalled"],
          keda=["pulse-writer-clickhouse", "pulse-writer-parquet"]),
    # ClickHouse hangs (SIGSTOP: a stalled server, not a dead one) while dashboards query:
    # every query waits for the query API's timeout (10 s) and answers 504, so query p95
    # latency passes 1 s and the availability budget burns (fast and slow); the writer's
    # inserts hang too, and once ClickHouse resumes (SIGCONT) the backlog is written more
    # than 3 s after ingest's acknowledgement: the freshness budget burns.
    Fault("clickhouse stalled (SIGSTOP) while queries run",
          pause=["clickhouse"], queries=True,
          expect=[("PulseQueryLatencyHigh", "query-api"),
                  ("PulseAvailabilityBudgetFastBurn", None),
                  ("PulseAvailabilityBudgetSlowBurn", None)],
          after=[("PulseFreshnessBudgetFastBurn", None), ("PulseFreshnessBudgetSlowBurn", None)],
          silent=["PulseProcessorStalled"]),
    # The events table disappears (an operator's mistake, a botched migration): ClickHouse
    # refuses every insert with UNKNOWN_TABLE, which is not about the data, so the writer
    # blocks (readiness 503, nothing dead-lettered) instead of retrying rows; renaming the
    # table back unblocks it.
    Fault("events table renamed away in ClickHouse",
          sql=(["RENAME TABLE pulse.events TO pulse.events_moved_by_check"],
               ["RENAME TABLE pulse.events_moved_by_check TO pulse.events"]),
          expect=[("PulseWriterBlocked", "writer-clickhouse")],
          silent=["PulseProcessorStalled"]),
    # dev.sh's loadgen stops and only malformed and late events arrive. PulseProcessorStalled
    # may fire too here (late events make no aggregate): not asserted either way.
    Fault("only malformed and late events",
          stop=[("loadgen", False)], traffic=BAD_TRAFFIC,
          expect=[("PulseDeadLetterRateHigh", "ingest"), ("PulseLateEventRateHigh", "processor"),
                  ("PulseWatermarkNotAdvancing", "processor")],
          silent=["PulseEventsNotStored"]),
    # Three services restarted with tight settings while a loadgen sends 400 events/s with
    # 16 requests in flight: ingest allows one request at a time (--max-concurrent-requests
    # 1: the rest is shed with 503 + Retry-After), the processor's state budget is 1 byte,
    # and the query API serves a certificate that expires in a day. Recovery: `dev.sh up`
    # restarts them as configured (no TLS, default limits and budget).
    Fault("ingest, processor and query-api restarted with tight limits",
          restart={"ingest": {"PULSE_MAX_CONCURRENT_REQUESTS": "1"},
                   "processor": {"PULSE_PROCESSOR_STATE_BUDGET_BYTES": "1"},
                   "query-api": short_lived_cert},
          traffic=["--rate", "400", "--concurrency", "16"],
          expect=[("PulseIngestBackpressure", "ingest"), ("PulseProcessorStateOverBudget", "processor"),
                  ("PulseTlsCertExpiringSoon", "query-api")],
          silent=[]),
]


# What the corrupted minute raises (the fired times count from the corruption).
LEDGER_EXPECT = [("PulseLedgerMismatch", "ledger"), ("PulseRevenueDelta", "ledger"),
                 ("PulseCorrectnessBudgetFastBurn", None), ("PulseCorrectnessBudgetSlowBurn", None)]


class LedgerTamper(threading.Thread):
    """Corrupts, in ClickHouse, one minute the ledger has not reconciled yet, the way a bad
    migration or a manual fix would: deletes a tenth of its stored events and adds 1
    currency unit to the revenue of one final user window (a new row version, which the query
    API serves). Runs beside the faults (it waits for a final, unreconciled window with
    revenue; ClickHouse may be down meanwhile) and records what it did; the ledger must then
    report the missing events (PulseLedgerMismatch, the correctness burn) and the revenue
    delta (PulseRevenueDelta) once the minute closes."""

    def __init__(self, env):
        super().__init__(daemon=True)
        self.ch = f"http://127.0.0.1:{env['PULSE_CLICKHOUSE_HTTP_PORT']}/"
        self.ledger = f"http://127.0.0.1:{env['PULSE_LEDGER_ADMIN_PORT']}/metrics"
        self.done = threading.Event()
        self.stopping = threading.Event()
        self.when: float | None = None
        self.window_ms: int | None = None
        self.user, self.version, self.window = "", 0, ""
        self.raised = self.altered = False
        self.deleted: int | None = None
        self.missing_before = 0.0
        self.error = ""

    def sql(self, q: str, params: str = "") -> str:
        with urllib.request.urlopen(urllib.request.Request(self.ch + params, data=q.encode()), timeout=15) as r:
            return r.read().decode()

    def ledger_metric(self, name: str, labels: str = "") -> float:
        with urllib.request.urlopen(self.ledger, timeout=5) as r:
            text = r.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and labels in line and not line.startswith("#"))

    def run(self) -> None:
        deadline = time.monotonic() + 240
        while not self.stopping.is_set() and time.monotonic() < deadline:
            try:
                if self.attempt():
                    self.when = time.monotonic()
                    break
            except (OSError, urllib.error.URLError, ValueError, IndexError) as e:
                self.error = str(e)
            time.sleep(1)
        self.done.set()

    def attempt(self) -> bool:
        """One try; each step is done once (ClickHouse may be killed or stalled by a fault
        between two steps: the next try resumes where this one failed)."""
        if self.window_ms is None:
            reconciled_ms = int(self.ledger_metric("pulse_ledger_last_reconciled_timestamp_seconds") * 1000)
            row = self.sql(
                "SELECT user_id, window_start_ms, version FROM pulse.user_activity FINAL "
                f"WHERE is_final = 1 AND window_start_ms >= {reconciled_ms} AND arraySum(revenue_micros) > 0 "
                "ORDER BY window_start_ms LIMIT 1 FORMAT TSV").strip()
            if not row:
                return False
            user, start, version = row.split("\t")
            self.user = user.replace("\\", "\\\\").replace("'", "\\'")
            self.version = int(version)
            self.missing_before = self.ledger_metric("pulse_ledger_missing_events_total", 'path="clickhouse"')
            self.window_ms = int(start)
            self.window = time.strftime("%H:%M:%S", time.gmtime(self.window_ms / 1000))
        if not self.raised:
            # The window's revenue + 1 unit per currency, as a newer version of its row (the
            # local ClickHouse, 18.16, has no `* REPLACE`: every column named).
            cols = ("user_id, window_start_ms, window_end_ms, page_views, pages, page_views_by_page, types, "
                    "events_by_type, revenue_currencies, revenue_micros, event_count, first_event_ms, "
                    "last_event_ms, version, is_final, last_ingest_ms, written_at_ms, window_date")
            changed = cols.replace("revenue_micros,", "arrayMap(x -> x + 1000000, revenue_micros),").replace(
                "version,", "version + 1,")
            self.sql(f"INSERT INTO pulse.user_activity ({cols}) SELECT {changed} FROM pulse.user_activity FINAL "
                     f"WHERE user_id = '{self.user}' AND window_start_ms = {self.window_ms} AND version = {self.version}")
            self.raised = True
        # ... and a tenth of its stored events deleted (by a hash of the id: spread over the
        # minute, which may have begun before the platform did; a mutation: waited for).
        where = (f"event_time_ms >= {self.window_ms} AND event_time_ms < {self.window_ms + 60_000} "
                 "AND cityHash64(event_id) % 10 = 0")
        if self.deleted is None:
            self.deleted = int(self.sql(f"SELECT uniqExact(event_id) FROM pulse.events WHERE {where}").strip())
        if not self.altered:
            self.sql(f"ALTER TABLE pulse.events DELETE WHERE {where}")
            self.altered = True
        deadline = time.monotonic() + 30
        while self.sql("SELECT count() FROM system.mutations WHERE database = 'pulse' AND table = 'events' "
                       "AND is_done = 0").strip() != "0":
            if time.monotonic() > deadline:
                raise ValueError("the DELETE mutation on pulse.events did not finish in 30 s")
            time.sleep(0.2)
        return True


class QueryLoad:
    """Query-API requests in WORKERS threads until stopped (a dashboard's refreshes): each
    answer, error or not, is what the query API's metrics count."""

    ROUTES = ("/v1/top_pages", "/v1/active_users?step=1m", "/v1/revenue?step=1m", "/v1/sessions")
    WORKERS = 8

    def __init__(self, env):
        self.base = f"http://127.0.0.1:{env['PULSE_QUERY_HTTP_PORT']}"
        self.done = threading.Event()
        self.answers: dict[int, int] = {}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(self.WORKERS)]
        for th in self.threads:
            th.start()

    def run(self, i: int) -> None:
        n = i
        while not self.done.is_set():
            path = self.ROUTES[n % len(self.ROUTES)]
            n += 1
            req = urllib.request.Request(self.base + path, headers={"Authorization": f"Bearer {TOKEN}"})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    r.read()
                    code = r.status
            except urllib.error.HTTPError as e:
                code = e.code
            except (OSError, urllib.error.URLError):
                code = 0
            with self.lock:
                self.answers[code] = self.answers.get(code, 0) + 1
            time.sleep(0.2)

    def stop(self) -> dict[int, int]:
        self.done.set()
        for th in self.threads:
            th.join(timeout=35)
        return dict(sorted(self.answers.items()))


def clickhouse(env, statement: str) -> None:
    url = f"http://127.0.0.1:{env['PULSE_CLICKHOUSE_HTTP_PORT']}/"
    try:
        urllib.request.urlopen(urllib.request.Request(url, data=statement.encode()), timeout=30).read()
    except (OSError, urllib.error.URLError) as e:
        fail(f"ClickHouse refused {statement!r}: {e}")


def signal_group(state: str, name: str, sig: int) -> None:
    pid = int((Path(state) / "pids" / f"{name}.pid").read_text().strip())
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        fail(f"{name} (pid {pid}) was not running")


def start_traffic(env, args: list[str]) -> subprocess.Popen:
    pulsectl = Path(env["CARGO_TARGET_DIR"]) / env.get("PULSE_DEV_PROFILE", "debug") / "pulsectl"
    log = open(Path(env["PULSE_STATE"]) / "logs" / "check-traffic.log", "ab")
    return subprocess.Popen(
        [str(pulsectl), "loadgen", "--target", f"http://127.0.0.1:{env['PULSE_INGEST_HTTP_PORT']}",
         "--duration", "0", *args],
        # The API key from the environment: a secret is never a process argument.
        env={**os.environ, "PULSE_API_KEY": "pulse-dev-key"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_traffic(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def live(webhook_port: int) -> None:
    env = os.environ
    state = env["PULSE_STATE"]
    prom = f"http://127.0.0.1:{env['PULSE_PROMETHEUS_PORT']}"
    hook = Webhook(webhook_port)
    took = dev("up")
    say(f"dev.sh up: {took:.1f} s (Prometheus {prom}, Alertmanager "
        f"http://127.0.0.1:{env['PULSE_ALERTMANAGER_PORT']})")
    workload(env)

    components = ["ingest", "processor", "writer-clickhouse", "writer-parquet", "query-api", "schema-registry"]
    wait_for("Prometheus to scrape every component (up == 1)",
             lambda: {r["metric"].get("component") for r in prom_query(prom, 'up{component!=""} == 1')}
             >= set(components), 60)
    watched = {a for f in FAULTS for a, _ in f.expect} | {a for f in FAULTS for a in f.silent}

    def healthy(also=frozenset()):
        # Events flow end to end (in the rules' own test window) and none of the watched
        # alerts (and of `also`: the next fault's SLO alerts) is pending or firing.
        flowing = prom_query(prom, 'sum(rate(pulse_writer_rows_written_total{sink="clickhouse",table="events"}[10s])) > 0 '
                             'and on () sum(rate(pulse_processor_outputs_total{kind="activity"}[10s])) > 0')
        alerts = http_json(f"{prom}/api/v1/alerts")["data"]["alerts"]
        return flowing and not [a for a in alerts if a["labels"]["alertname"] in watched | also]
    t = time.monotonic()
    wait_for(f"a healthy baseline (events stored and aggregated; none of {sorted(watched)} "
             "pending or firing)", healthy, 90)
    say(f"baseline healthy after {time.monotonic() - t:.1f} s")
    tamper = LedgerTamper(env)
    tamper.start()

    def named(alert: str, comp: str | None) -> str:
        return f"{alert}{{component={comp}}}" if comp else alert

    results = []
    durations = []
    t_tamper = time.monotonic()
    for i, f in enumerate(FAULTS):
        t_fault = time.monotonic()
        also = frozenset(a for a, _ in f.after)
        if i or also:
            t = time.monotonic()
            wait_for(f"a healthy baseline before: {f.label}", lambda: healthy(also), 90)
            say(f"healthy again after {time.monotonic() - t:.1f} s")
        t_stop = time.monotonic()
        traffic = load = None
        for name, crash in f.stop:
            stop(state, name, crash)
        for name in f.pause:
            signal_group(state, name, signal.SIGSTOP)
        for name, extra in f.restart.items():
            restart_with(state, name, extra(state) if callable(extra) else extra)
        for statement in (f.sql or ([], []))[0]:
            clickhouse(env, statement)
        if f.traffic is not None:
            traffic = start_traffic(env, f.traffic)
        if f.queries:
            load = QueryLoad(env)
        t_stopped = time.monotonic()
        say(f"{f.label} ({t_stopped - t_stop:.1f} s); waiting for {[named(*a) for a in f.expect]}")
        fired = {}
        try:
            for alert, comp in f.expect:
                at = wait_for(f"{named(alert, comp)} firing at the webhook after: {f.label}",
                              lambda: hook.first("firing", alert, comp, t_stop), FIRE_TIMEOUT)
                fired[(alert, comp)] = at
                results.append((f.label, named(alert, comp), "fired", at - t_stopped))
            for so in f.keda:
                gated, lag = keda_local_query(so)
                raw = wait_for(f"{so}'s lag in Prometheus during: {f.label}", lambda: prom_query(prom, lag), 30)
                held = prom_query(prom, gated)
                if held:
                    fail(f"{so}: the KEDA query has a value ({held}) while its circuit is open or its store "
                         f"blocked during: {f.label} (KEDA would scale on it): {gated}")
                say(f"{so}: KEDA query has no value during the outage (lag alone: {raw[0]['value'][1]} records): "
                    "KEDA errors and the HPA holds its replicas")
        finally:
            # Whatever happens, the fault ends: a paused ClickHouse would hang dev.sh down.
            if traffic is not None:
                stop_traffic(traffic)
            for name in f.pause:
                signal_group(state, name, signal.SIGCONT)
            if load is not None:
                say(f"query answers during the fault (status: count): {load.stop()}")
        for alert in f.silent:
            if hook.first("firing", alert, None, t_stop) is not None:
                fail(f"{alert} fired during: {f.label}")
        t_up = time.monotonic()
        for statement in (f.sql or ([], []))[1]:
            clickhouse(env, statement)
        for name in f.restart:
            stop(state, name, False)
        if f.stop or f.restart:
            took = dev("up")
            say(f"dev.sh up restarted {', '.join([n for n, _ in f.stop] + list(f.restart))} in {took:.1f} s; "
                "waiting for the alerts to resolve")
        elif f.pause:
            say(f"{', '.join(f.pause)} resumed (SIGCONT); waiting for the alerts to resolve")
        elif f.sql:
            say("ClickHouse repaired; waiting for the alerts to resolve")
        else:
            say("bad traffic stopped; waiting for the alerts to resolve")
        for alert, comp in f.after:
            at = wait_for(f"{named(alert, comp)} firing at the webhook after the end of: {f.label}",
                          lambda: hook.first("firing", alert, comp, t_stop), FIRE_TIMEOUT)
            fired[(alert, comp)] = at
            results.append((f.label, named(alert, comp), "fired", at - t_up))
        for alert, comp in f.expect + f.after:
            since = max(t_up, fired[(alert, comp)])
            at = wait_for(f"{named(alert, comp)} resolved at the webhook after: {f.label}",
                          lambda: hook.first("resolved", alert, comp, since), RESOLVE_TIMEOUT)
            results.append((f.label, named(alert, comp), "resolved", at - t_up))
        for so in f.keda:
            gated, _ = keda_local_query(so)
            got = wait_for(f"{so}'s KEDA query to have a value again after: {f.label}",
                           lambda: prom_query(prom, gated), RESOLVE_TIMEOUT)
            say(f"{so}: KEDA query back after the recovery ({got[0]['value'][1]} records)")
        for alert in f.silent:
            if hook.first("firing", alert, None, t_stop) is not None:
                fail(f"{alert} fired during or after: {f.label}")
        durations.append((f.label, time.monotonic() - t_fault))
        say(f"{f.label}: {durations[-1][1]:.1f} s (healthy baseline, fault, recovery, every alert resolved)")

    # The ledger's minute corrupted beside the faults: reported once it closes (the check
    # runs the ledger with --settle 30s; a minute closes ~2.5 min after it starts).
    tamper.stopping.set()
    tamper.done.wait(10)
    if tamper.when is None or tamper.deleted is None:
        fail(f"no final, unreconciled user window with revenue to corrupt was found in ClickHouse "
             f"(last error: {tamper.error or 'none'})")
    label = f"ledger: {tamper.deleted} events deleted, revenue +1 (window {tamper.window} UTC)"
    say(f"{label}: injected {tamper.when - t_tamper:.1f} s after the first fault started")
    fired = {}
    for alert, comp in LEDGER_EXPECT:
        at = wait_for(f"{named(alert, comp)} firing at the webhook after: {label}",
                      lambda: hook.first("firing", alert, comp, tamper.when),
                      max(5.0, tamper.when + 180 - time.monotonic()))
        fired[(alert, comp)] = at
        results.append((label, named(alert, comp), "fired", at - tamper.when))
    for alert, comp in LEDGER_EXPECT:
        at = wait_for(f"{named(alert, comp)} resolved at the webhook after: {label}",
                      lambda: hook.first("resolved", alert, comp, fired[(alert, comp)]), RESOLVE_TIMEOUT)
        results.append((label, named(alert, comp), "resolved", at - tamper.when))
    missing = tamper.ledger_metric("pulse_ledger_missing_events_total", 'path="clickhouse"') - tamper.missing_before
    if missing < tamper.deleted:
        fail(f"the ledger counted {missing:.0f} events missing in ClickHouse; {tamper.deleted} were deleted")
    if tamper.deleted == 0:
        fail(f"the window {tamper.window} UTC had no stored events to delete")
    say(f"the ledger counted {missing:.0f} events missing in ClickHouse ({tamper.deleted} deleted)")

    say("fault                                            alert                                             "
        "event     seconds after the fault / its end (fired after the end: the `after` alerts)")
    for label, alert, what, secs in results:
        say(f"{label:<48} {alert:<49} {what:<9} {secs:6.1f}")
    say("time per fault: " + ", ".join(f"{label} {secs:.1f} s" for label, secs in durations)
        + f"; {sum(s for _, s in durations):.1f} s in all")
    proven = sorted({a.split("{")[0] for _, a, _, _ in results})
    say(f"{len(proven)} of {len({a['alert'] for a in load_alerts()})} alerts proven to fire and resolve live: {', '.join(proven)}")

    # The last two checks both run (one platform serves both); either failing fails.
    failures = []
    # The rules' metrics and those of the chart's KEDA queries (the writers' gate included).
    used = rule_metric_names() | keda_metric_names()
    # Series created by a first occurrence (e.g. the ledger's, after its first range) may
    # still be on their way: wait up to 30 s for all of them, then report what is missing.
    deadline = time.monotonic() + 30
    while True:
        missing = sorted(used - set(http_json(f"{prom}/api/v1/label/__name__/values")["data"]))
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1)
    if missing:
        failures.append("metrics used by deploy/prometheus rules or the chart's KEDA queries but absent "
                        "from the live Prometheus:\n  " + "\n  ".join(missing))
    else:
        say(f"all {len(used)} metric names used by the rules and the KEDA queries exist in the live Prometheus")

    dashboards = REPO / "tests/python/dashboards_check.py"
    if dashboards.exists():
        say("running tests/python/dashboards_check.py against the same Prometheus")
        workload(env)  # recent query traffic for the query API's latency panels
        r = subprocess.run([sys.executable, str(dashboards), "--prometheus", prom])
        if r.returncode != 0:
            failures.append("tests/python/dashboards_check.py failed (above)")
    if failures:
        fail("\n".join(failures))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("static")
    pr = sub.add_parser("prepare")
    pr.add_argument("dir", type=Path)
    pr.add_argument("--window", default="20s")
    pr.add_argument("--for", dest="for_", default="5s")
    pr.add_argument("--webhook", required=True)
    lv = sub.add_parser("live")
    lv.add_argument("--webhook-port", type=int, required=True)
    a = p.parse_args()
    if a.cmd == "static":
        static()
    elif a.cmd == "prepare":
        prepare(a.dir, a.window, a.for_, a.webhook)
    else:
        live(a.webhook_port)


if __name__ == "__main__":
    main()
