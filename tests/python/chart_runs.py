"""The chart runs: renders helm/pulse with values that point at the test's own Kafka,
ClickHouse and S3, then does what Kubernetes would do with the rendered objects, with
local processes instead of pods:

1. every container of every Deployment, hook Job, Job and test Pod gets its env exactly
   as the kubelet builds it: `envFrom` (ConfigMaps, Secrets) first, then `env`
   (`value`, `configMapKeyRef`, `secretKeyRef`, `$(VAR)` references to earlier
   variables); `$(VAR)` is expanded in `command` and `args` too (and `$$` is `$`);
   Secret volumes are written to files in a temporary folder;
2. static checks, for this render and for every helm/pulse/ci/*-values.yaml render (the
   shadow's too, check_shadow_render: never scaled, scraped apart from the live rules; the
   defaults' registry auth, check_default_registry_auth: the registry reads the generated
   users file, ingest and the processor get the read user and its password file, the
   schemas Job the write user; the users file holds their bcrypt lines): each
   `PULSE_*`/`OTEL_*` name a container gets must be listed in its binary's `--help`
   (clap ignores unknown env vars, so a renamed env var would otherwise pass silently);
   any other name must be used through `$(NAME)` by another variable of the container;
   `<command> <args> --help` must succeed (clap refuses unknown flags);
3. the pre-install/pre-upgrade hook Jobs run to completion (topics, migrations), in hook
   weight order; then every Deployment starts as one process (replicas are not
   simulated; a process that exits before it is ready is restarted after a back-off,
   as the kubelet would, and reported) beside the non-hook Jobs (schema registration,
   retried like a Job's backoffLimit), and each Deployment must answer its declared
   startup, liveness and readiness probes (path and named port) with 200;
4. the `helm test` Pods run and must exit 0: they post an event to ingest and read it back
   from the query API; the ledger's query URL and token (as the chart gives them) are
   accepted by the query API, and the rules' pulse_ledger_* series are in its /metrics;
   the schema registry runs with authentication as the chart's defaults make it (random
   passwords in the main Secret, bcrypt users file made by Helm's `htpasswd` in its own
   Secret): anonymous `PUT /config/<s>` is refused (401), the read user's too (403), the
   read user's GET and the write user's PUT are accepted (200), with the passwords of the
   rendered Secret; ingest's user and password file as the chart gives them are accepted
   (ingest, the processor and the schemas Job authenticate to get ready / register); a
   second render's users file (new passwords and hashes) written over the mounted one is
   reloaded without a restart: its passwords work, the first render's are refused;
   the schema registry serves TLS (serverTls.components: schema-registry, with a CA and a
   server certificate this test makes with the openssl CLI, as an existing Secret): its
   clients get an https:// URL and the CA file from the chart, a client trusting only
   the system's CAs is refused with a certificate error, and plain HTTP gets no answer;
   a shadow processor and ClickHouse writer (shadow.enabled) run beside the live ones:
   the schemas Job registers the shadow's subjects (its processor is ready only then),
   and their /metrics say service="processor-shadow" / "writer-shadow";
5. every process gets SIGTERM and must exit 0 within its terminationGracePeriodSeconds;
   then the Parquet archive must hold the events under the run's S3 prefix.

Overrides, the only differences from a cluster (all applied to env values and args, never
to the chart): a container's listen address `0.0.0.0:<containerPort>` becomes
`127.0.0.1:<free port>`; a Service's DNS name with a Service port (`http://<service>.<ns>.svc:<port>`
and the shorter forms) becomes `127.0.0.1:<the free port of the pod port it targets>`;
a path under a Secret/ConfigMap volume's mountPath becomes the same path under the
temporary folder. Processes start with a clean environment (PATH, HOME, LANG) plus the
container's env, so nothing leaks in from the caller. Every process is killed on exit.

Run by scripts/chart-test.sh with $PULSE_CACHE/venv/bin/python when PULSE_TEST_KAFKA_BROKERS,
PULSE_TEST_CLICKHOUSE_URL, PULSE_TEST_S3_ENDPOINT, PULSE_TEST_S3_BUCKET,
PULSE_TEST_S3_ACCESS_KEY and PULSE_TEST_S3_SECRET_KEY are set. Unique per run: the
ClickHouse database, the S3 prefix, the consumer groups, the processor's checkpoint topic
and the registry's log topic (the data topics have the contract's fixed names: the
schemas are registered for them).
"""

from __future__ import annotations

import argparse
import atexit
import base64
import hashlib
import http.client
import os
import random
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

NAMESPACE = "pulse-chart-test"
RELEASE = "pulse"
REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
HELP_ENV = re.compile(r"\[env: ([A-Za-z_][A-Za-z0-9_]*)")
# Secrets read from the environment only (no flag, so no `[env: …]`): the flag that takes
# their file form documents them as "Or the password itself in PULSE_…".
HELP_ENV_ONLY = re.compile(r"(?:itself in|environment variable) (PULSE_[A-Z0-9_]+)")
CHECKED_PREFIXES = ("PULSE_", "OTEL_")
PROCS: list[subprocess.Popen] = []


class Failure(Exception):
    pass


def log(msg: str) -> None:
    print(f"[chart-runs] {msg}", file=sys.stderr, flush=True)


GIVEN_PORTS: set[int] = set()


def free_port() -> int:
    # Below the kernel's ephemeral range (32768 up): a bind(0) port is ephemeral, and an
    # outgoing connection can take it before the service binds it. Never the same port twice.
    while True:
        port = random.randint(20000, 32000)
        if port in GIVEN_PORTS:
            continue
        GIVEN_PORTS.add(port)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def kill_all() -> None:
    for p in PROCS:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in PROCS:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


# ---------------------------------------------------------------- rendering


def helm_binary() -> str:
    """helm from PATH (scripts/lib.sh puts $PULSE_CACHE/tools/bin first), else the cache's."""
    cache = Path(os.environ.get("PULSE_CACHE", Path.home() / ".cache" / "pulse"))
    found = shutil.which("helm") or str(cache / "tools" / "bin" / "helm")
    if not Path(found).exists():
        raise Failure("helm not found: run scripts/install-deps.sh")
    return found


def render(chart: Path, values: list[Path], *sets: str) -> list[dict]:
    cmd = [helm_binary(), "template", RELEASE, str(chart), "--namespace", NAMESPACE]
    for v in values:
        cmd += ["-f", str(v)]
    for s_ in sets:
        cmd += ["--set", s_]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise Failure(f"helm template failed: {out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


# The keys an existing Secret (secrets.existingSecret) must hold, as the chart README
# documents them; a CA Secret (kafka.tls.caSecret) holds kafka.tls.caKey.
EXISTING_SECRET_KEYS = ["ingest-api-keys", "query-api-tokens", "pii-hmac-key", "clickhouse-password",
                        "s3-access-key", "s3-secret-key", "kafka-sasl-password", "ledger-query-token",
                        "registry-read-password", "registry-write-password"]


def external_secrets(values_file: Path) -> dict[str, dict]:
    """Stand-ins for the Secrets a values file expects to exist already (not rendered)."""
    v = yaml.safe_load(values_file.read_text()) or {}
    out = {}
    existing = (v.get("secrets") or {}).get("existingSecret")
    if existing:
        out[existing] = {k: f"stand-in-{k}=x" for k in EXISTING_SECRET_KEYS}
    tls = (v.get("kafka") or {}).get("tls") or {}
    if tls.get("caSecret"):
        out[tls["caSecret"]] = {tls.get("caKey", "ca.crt"): "-----BEGIN CERTIFICATE-----\n"}
    ch = v.get("clickhouse") or {}
    if ch.get("caSecret"):
        out[ch["caSecret"]] = {ch.get("caKey", "ca.crt"): "-----BEGIN CERTIFICATE-----\n"}
    auth = (v.get("schemaRegistry") or {}).get("auth") or {}
    if auth.get("existingSecret"):
        out[auth["existingSecret"]] = {auth.get("usersKey", "users"): "stand-in:read:$argon2id$\n"}
    st = v.get("serverTls") or {}
    if st.get("enabled"):
        if st.get("secret"):
            out[st["secret"]] = {"tls.crt": "-----BEGIN CERTIFICATE-----\n", "tls.key": "-----BEGIN PRIVATE KEY-----\n",
                                 st.get("caKey", "ca.crt"): "-----BEGIN CERTIFICATE-----\n"}
        for key, default in (("clientCaSecret", "clientCaKey"), ("caSecret", "caKey")):
            if st.get(key):
                out[st[key]] = {st.get(default, "ca.crt"): "-----BEGIN CERTIFICATE-----\n"}
    client = (v.get("ledger") or {}).get("queryClientTlsSecret")
    if client:
        out[client] = {"tls.crt": "-----BEGIN CERTIFICATE-----\n", "tls.key": "-----BEGIN PRIVATE KEY-----\n"}
    return out


# The existing kubernetes.io/tls Secret of the run's serverTls (keys tls.crt, tls.key and,
# as cert-manager writes it, ca.crt).
SERVER_TLS_SECRET = "pulse-chart-tls"


def server_tls_secret(work: Path) -> dict[str, str]:
    """A CA and a server certificate it signed for 127.0.0.1 (the Service names become
    127.0.0.1 here) and the registry Service's names, as the Secret's keys."""
    d = work / "pki"
    d.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        out = subprocess.run(["openssl", *args], cwd=d, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise Failure(f"openssl {' '.join(args)} failed: {out.stderr.strip()}")

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=pulse-chart-test-ca",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    svc = f"{RELEASE}-schema-registry"
    (d / "server.ext").write_text(f"subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:{svc},DNS:{svc}.{NAMESPACE}.svc\n"
                                  "extendedKeyUsage=serverAuth\n")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", f"/CN={svc}")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "server.ext")
    return {"tls.crt": (d / "server.pem").read_text(), "tls.key": (d / "server.key").read_text(),
            "ca.crt": (d / "ca.pem").read_text()}


@dataclass
class Objects:
    docs: list[dict]
    external: dict[str, dict] = field(default_factory=dict)
    configmaps: dict[str, dict] = field(default_factory=dict)
    secrets: dict[str, dict] = field(default_factory=dict)
    services: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.secrets.update(self.external)
        for d in self.docs:
            name = d["metadata"]["name"]
            if d["kind"] == "ConfigMap":
                self.configmaps[name] = {k: str(v) for k, v in (d.get("data") or {}).items()}
            elif d["kind"] == "Secret":
                data = {k: base64.b64decode(v).decode() for k, v in (d.get("data") or {}).items()}
                data.update({k: str(v) for k, v in (d.get("stringData") or {}).items()})
                self.secrets[name] = data
            elif d["kind"] == "Service":
                self.services.append(d)

    def of_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]


def hook_of(doc: dict) -> str:
    return (doc["metadata"].get("annotations") or {}).get("helm.sh/hook", "")


def pod_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


# ---------------------------------------------------------------- containers


@dataclass
class Container:
    owner: str  # "Deployment/pulse-pulse-ingest"
    name: str
    spec: dict
    pod: dict
    env: dict[str, str] = field(default_factory=dict)
    env_names: list[str] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)  # port name -> local port

    @property
    def label(self) -> str:
        return f"{self.owner} container {self.name}"


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, `$$` is `$`."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return REF.sub(sub, text)


def build_env(c: Container, objs: Objects) -> None:
    """The env of a container as the kubelet builds it (no overrides yet)."""
    env: dict[str, str] = {}
    names: list[str] = []
    for src in c.spec.get("envFrom") or []:
        prefix = src.get("prefix", "")
        if "configMapRef" in src:
            ref = src["configMapRef"]
            data = objs.configmaps.get(ref["name"])
        else:
            ref = src["secretRef"]
            data = objs.secrets.get(ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise Failure(f"{c.label}: envFrom names {ref['name']}, which the chart does not render")
        for k, v in data.items():
            env[prefix + k] = v
            names.append(prefix + k)
    for item in c.spec.get("env") or []:
        name = item["name"]
        names.append(name)
        if "value" in item:
            env[name] = expand(str(item["value"]), env)
            continue
        vf = item.get("valueFrom") or {}
        if "configMapKeyRef" in vf or "secretKeyRef" in vf:
            ref = vf.get("configMapKeyRef") or vf.get("secretKeyRef")
            store = objs.configmaps if "configMapKeyRef" in vf else objs.secrets
            data = store.get(ref["name"])
            if data is None or ref["key"] not in data:
                if ref.get("optional"):
                    names.pop()
                    continue
                raise Failure(f"{c.label}: env {name} refers to {ref['name']}/{ref['key']}, which the chart does not render")
            env[name] = data[ref["key"]]
        else:
            raise Failure(f"{c.label}: env {name} uses an unsupported valueFrom {sorted(vf)}")
    c.env = env
    c.env_names = names
    argv = list(c.spec.get("command") or []) + list(c.spec.get("args") or [])
    if not argv:
        raise Failure(f"{c.label}: no command (the image's default is not a Pulse service)")
    c.argv = [expand(a, env) for a in argv]


def containers_of(doc: dict, objs: Objects) -> list[Container]:
    spec = pod_spec(doc)
    out = []
    for kind in ("initContainers", "containers"):
        for cs in spec.get(kind) or []:
            c = Container(owner=f"{doc['kind']}/{doc['metadata']['name']}", name=cs["name"], spec=cs, pod=spec)
            build_env(c, objs)
            out.append(c)
    return out


# ---------------------------------------------------------------- static checks


class HelpCache:
    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.cache: dict[tuple[str, ...], tuple[int, str]] = {}

    def binary(self, name: str) -> str | None:
        if "/" in name:
            return name
        local = self.bin_dir / name
        if local.exists():
            return str(local)
        return shutil.which(name)

    def help(self, argv: list[str]) -> tuple[int, str]:
        key = tuple(argv)
        if key not in self.cache:
            exe = self.binary(argv[0])
            if exe is None:
                raise Failure(f"{argv[0]} not found in {self.bin_dir} (build the binaries: cargo build --bins)")
            p = subprocess.run([exe, *argv[1:], "--help"], capture_output=True, text=True, timeout=60,
                               env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent"})
            self.cache[key] = (p.returncode, p.stdout + p.stderr)
        return self.cache[key]


def check_static(c: Container, help_cache: HelpCache) -> list[str]:
    """Env names and flags of a container against its binary's --help."""
    problems = []
    if not c.argv[0].startswith("pulse"):
        return problems  # the test Pod's shell: no clap binary to ask
    # Flags: `<command> <args> --help` fails on an unknown flag or subcommand.
    rc, text = help_cache.help(c.argv)
    if rc != 0:
        problems.append(f"{c.label}: `{' '.join(c.argv)} --help` failed (a flag or subcommand the binary does not know?):\n{text.strip()[:2000]}")
        return problems
    known = set(HELP_ENV.findall(text)) | set(HELP_ENV_ONLY.findall(text))
    # Env of parent commands (e.g. `pulsectl topics` holds the Kafka flags of `topics create`).
    for i in range(1, len(c.argv)):
        if c.argv[i].startswith("-"):
            break
        parent = help_cache.help(c.argv[:i])[1]
        known |= set(HELP_ENV.findall(parent)) | set(HELP_ENV_ONLY.findall(parent))
    for name in c.env_names:
        if name.startswith(CHECKED_PREFIXES):
            if name not in known:
                problems.append(f"{c.label}: the chart sets {name}, which `{' '.join(c.argv)} --help` does not list (renamed or misspelled?)")
        elif not any(f"$({name})" in str(item.get("value", "")) for item in c.spec.get("env") or []):
            problems.append(f"{c.label}: the chart sets {name}, which no Pulse binary reads and no other variable references")
    return problems


def checker_refuses_unknown_names(help_cache: HelpCache) -> None:
    """The env/flag check itself must fail on a made-up env name and a made-up flag."""
    for argv, env in ((["pulse-ingest"], {"PULSE_INGEST_NO_SUCH_SETTING": "1"}),
                      (["pulse-processor", "--no-such-flag=1"], {})):
        spec = {"name": "probe", "command": argv[:1], "args": argv[1:],
                "env": [{"name": k, "value": v} for k, v in env.items()]}
        c = Container(owner="self-check", name="probe", spec=spec, pod={})
        build_env(c, Objects([]))
        if not check_static(c, help_cache):
            raise Failure(f"the env/flag check accepted {argv} {env}: it cannot catch a renamed setting")


def static_checks(objs: Objects, help_cache: HelpCache, what: str) -> int:
    problems = []
    n = 0
    for doc in objs.docs:
        if doc["kind"] in ("Deployment", "Job", "Pod"):
            for c in containers_of(doc, objs):
                n += 1
                problems += check_static(c, help_cache)
    for p in problems:
        log(f"FAIL {what}: {p}")
    if problems:
        raise Failure(f"{what}: {len(problems)} env/flag problem(s)")
    log(f"{what}: env names and flags of {n} containers match the binaries' --help")
    return n


# ---------------------------------------------------------------- registry auth

BCRYPT_LINE = re.compile(r"^([^:\s]+):(read|write):(\$2[aby]\$(\d{2})\$[./A-Za-z0-9]{53})$")


def mounted_secret_key(c: Container, path: str) -> tuple[str, str] | None:
    """The (Secret, key) a file path of a container comes from, through its Secret volumes
    (mountPath + item path), or None."""
    volumes = {v["name"]: v for v in c.pod.get("volumes") or []}
    for m in c.spec.get("volumeMounts") or []:
        v = volumes.get(m["name"]) or {}
        mount = m["mountPath"].rstrip("/") + "/"
        if "secret" not in v or not path.startswith(mount):
            continue
        rel = path[len(mount):]
        for it in v["secret"].get("items") or []:
            if it["path"] == rel:
                return v["secret"]["secretName"], it["key"]
        if not v["secret"].get("items"):
            return v["secret"]["secretName"], rel
    return None


def ledger_query_tls_problems(objs: Objects, values: dict) -> list[str]:
    """The ledger reaches a query API that serves TLS (`query-api` in serverTls.components)
    over https, trusting the CA file mounted from serverTls' CA Secret and key; under mutual
    TLS (serverTls.clientCaSecret) it presents the certificate and key mounted from
    ledger.queryClientTlsSecret, or, without one, skips its revenue check; a plain query API
    is read over http with neither."""
    st, ledger = values.get("serverTls") or {}, values.get("ledger") or {}
    if ledger.get("enabled") is False or (values.get("queryApi") or {}).get("enabled") is False:
        return []
    tls = bool(st.get("enabled")) and "query-api" in (st.get("components") or ["ingest", "query-api"])
    client = ledger.get("queryClientTlsSecret") or ""
    skip = tls and bool(st.get("clientCaSecret")) and not client
    ca = (st.get("caSecret") or st.get("secret") or "", st.get("caKey", "ca.crt"))
    problems = []
    cs = [c for d in objs.docs if d["kind"] == "Deployment"
          and d["metadata"]["labels"].get("app.kubernetes.io/component") == "ledger" for c in containers_of(d, objs)]
    if not cs:
        return ["no ledger container rendered"]
    for c in cs:
        url, skips = c.env.get("PULSE_LEDGER_QUERY_URL", ""), c.env.get("PULSE_LEDGER_SKIP_REVENUE") == "true"
        if not url.startswith("https://" if tls else "http://"):
            problems.append(f"{c.label}: PULSE_LEDGER_QUERY_URL={url!r}, want {'https' if tls else 'http'}://")
        if skips != skip:
            problems.append(f"{c.label}: PULSE_LEDGER_SKIP_REVENUE is {skips}, want {skip}")
        want = {"PULSE_LEDGER_QUERY_CA_FILE": ca if tls and not skip else None,
                "PULSE_LEDGER_QUERY_CLIENT_CERT_FILE": (client, "tls.crt") if tls and client and st.get("clientCaSecret") else None,
                "PULSE_LEDGER_QUERY_CLIENT_KEY_FILE": (client, "tls.key") if tls and client and st.get("clientCaSecret") else None}
        for name, expect in want.items():
            got = c.env.get(name)
            if expect is None and got is not None:
                problems.append(f"{c.label}: {name}={got!r} set, want none")
            elif expect is not None and (got is None or mounted_secret_key(c, got) != expect):
                problems.append(f"{c.label}: {name}={got!r} is {got and mounted_secret_key(c, got)} mounted, want {expect}")
    return problems


def default_registry_auth_problems(objs: Objects) -> list[str]:
    """The chart's defaults authenticate the schema registry: its container reads
    PULSE_REGISTRY_AUTH_FILE from the rendered users Secret; ingest and the processor send
    the read user with PULSE_REGISTRY_PASSWORD_FILE from the main Secret's
    registry-read-password, the schemas Job the write user with registry-write-password;
    the users file is exactly `<read>:read:<bcrypt>` and `<write>:write:<bcrypt>` (what
    Helm's htpasswd makes), the passwords are generated (32 characters, different), and
    each fingerprint the chart keeps for upgrades is sha256("<hash>:<password>")."""
    problems = []
    by_component: dict[str, list[Container]] = {}
    for doc in objs.docs:
        if doc["kind"] in ("Deployment", "Job"):
            comp = doc["metadata"]["labels"].get("app.kubernetes.io/component", "")
            by_component.setdefault(comp, []).extend(containers_of(doc, objs))
    secret = f"{RELEASE}-secrets"  # the release is named like the chart: fullname = release
    users_secret = next((n for n in objs.secrets if n.endswith("-registry-users")), None)
    if users_secret is None:
        return ["no registry users Secret is rendered"]
    main = objs.secrets.get(secret, {})
    passwords = {role: main.get(f"registry-{role}-password", "") for role in ("read", "write")}
    for role, pw in passwords.items():
        if not re.fullmatch(r"[A-Za-z0-9]{32}", pw):
            problems.append(f"{secret}: registry-{role}-password is not a generated 32-character password")
    if passwords["read"] == passwords["write"]:
        problems.append(f"{secret}: the read and write passwords are the same")

    def wiring(comp: str, want: dict[str, object]) -> None:
        cs = by_component.get(comp) or []
        if not cs:
            problems.append(f"no {comp} container rendered")
        for c in cs:
            for name, expect in want.items():
                got = c.env.get(name)
                if got is None:
                    problems.append(f"{c.label}: no {name}")
                elif isinstance(expect, tuple):
                    src = mounted_secret_key(c, got)
                    if src != expect:
                        problems.append(f"{c.label}: {name}={got} is {src} mounted, want {expect}")
                elif got != expect:
                    problems.append(f"{c.label}: {name}={got!r}, want {expect!r}")

    wiring("schema-registry", {"PULSE_REGISTRY_AUTH_FILE": (users_secret, "users")})
    for comp in ("ingest", "processor"):
        wiring(comp, {"PULSE_REGISTRY_USERNAME": "pulse-read",
                      "PULSE_REGISTRY_PASSWORD_FILE": (secret, "registry-read-password")})
    wiring("schemas", {"PULSE_REGISTRY_USERNAME": "pulse-write",
                       "PULSE_REGISTRY_PASSWORD_FILE": (secret, "registry-write-password")})
    users = objs.secrets[users_secret]
    lines = users.get("users", "").splitlines()
    parsed = [BCRYPT_LINE.match(l) for l in lines]
    got = [(m.group(1), m.group(2), m.group(4)) for m in parsed if m]
    if len(got) != len(lines) or got != [("pulse-read", "read", "10"), ("pulse-write", "write", "10")]:
        problems.append(f"{users_secret}: users file is not the two bcrypt lines pulse-read:read:$2a$10$… and "
                        f"pulse-write:write:$2a$10$… ({len(lines)} line(s), parsed {got})")
    else:
        want = [f"{m.group(1)}:{hashlib.sha256(f'{m.group(3)}:{passwords[m.group(2)]}'.encode()).hexdigest()}"
                for m in parsed]
        if users.get("fingerprints", "").splitlines() != want:
            problems.append(f"{users_secret}: the fingerprints are not sha256(<hash>:<password>) of the lines and passwords")
    return problems


def check_default_registry_auth(objs: Objects, what: str) -> None:
    problems = default_registry_auth_problems(objs)
    for p_ in problems:
        log(f"FAIL {what}: {p_}")
    if problems:
        raise Failure(f"{what}: {len(problems)} registry auth problem(s)")
    log(f"{what}: registry auth on: users file (bcrypt, generated) mounted as PULSE_REGISTRY_AUTH_FILE; "
        "ingest/processor send pulse-read, the schemas Job pulse-write, password files from the main Secret")


def registry_auth_checker_refuses(chart: Path) -> None:
    """default_registry_auth_problems can fail: auth off, a client without its password
    file, the schemas Job as the read user, an Argon2 users file in place of the chart's."""
    import copy
    base = render(chart, [chart / "ci" / "default-values.yaml"])
    off = render(chart, [], "schemaRegistry.auth.enabled=false")

    def env_of(d: dict, comp: str) -> list | None:
        if d["kind"] in ("Deployment", "Job") and d["metadata"]["labels"].get("app.kubernetes.io/component") == comp:
            return pod_spec(d)["containers"][0].setdefault("env", [])
        return None

    def drop_password_file(d: dict) -> None:
        env = env_of(d, "processor")
        if env is not None:
            env[:] = [e for e in env if e["name"] != "PULSE_REGISTRY_PASSWORD_FILE"]
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-processor"):
            (d.get("data") or {}).pop("PULSE_REGISTRY_PASSWORD_FILE", None)

    def job_as_reader(d: dict) -> None:
        env = env_of(d, "schemas")
        if env is not None:
            for e in env:
                if e["name"] == "PULSE_REGISTRY_USERNAME":
                    e["value"] = "pulse-read"

    def argon2_users(d: dict) -> None:
        if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-registry-users"):
            d["data"]["users"] = base64.b64encode(b"pulse-read:read:$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA\n"
                                                  b"pulse-write:write:$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA\n").decode()

    cases = [("auth off", off, None), ("no password file", base, drop_password_file),
             ("the schemas Job as the read user", base, job_as_reader), ("Argon2 users", base, argon2_users)]
    for label, docs, breaks in cases:
        docs = copy.deepcopy(docs)
        for d in docs:
            if breaks:
                breaks(d)
        if not default_registry_auth_problems(Objects(docs, {})):
            raise Failure(f"the registry auth check accepted a render with {label}: it cannot catch that")


# ---------------------------------------------------------------- shadows

SHADOWS = ("processor-shadow", "writer-clickhouse-shadow")
PROMQL_WORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
                "bool", "offset", "inf", "nan"}


def rule_series_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects: identifiers outside `{…}`, not
    called (`f(`), not keywords, not inside `by (…)` / `on (…)` label lists."""
    expr = re.sub(r"#[^\n]*", " ", expr)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', " ", expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", expr):
        if m.group(2) or m.group(1).lower() in PROMQL_WORDS:
            continue
        names.add(m.group(1))
    return names


def check_shadow_render(objs: Objects, what: str, required: bool) -> None:
    if not required and not any(d["metadata"]["labels"].get("app.kubernetes.io/component") in SHADOWS
                                for d in objs.of_kind("Deployment")):
        return
    problems = shadow_problems(objs, what, required)
    for p_ in problems:
        log(f"FAIL {what}: {p_}")
    if problems:
        raise Failure(f"{what}: {len(problems)} shadow problem(s)")
    log(f"{what}: shadow: fixed replicas, no HPA/KEDA/PDB, scraped apart from the live rules, subjects registered")


def shadow_checker_refuses(chart: Path) -> None:
    """check_shadow_render can fail: each of these breakages of ci/shadow-values.yaml's
    render must be reported (a shadow scraped like a live service, not renamed, selected by a
    live ServiceMonitor, scaled by KEDA, a rule reading a series the rename misses, no
    shadow schema registration)."""
    import copy
    base = render(chart, [chart / "ci" / "shadow-values.yaml"])

    def sm(d: dict) -> bool:
        return d["kind"] == "ServiceMonitor" and d["metadata"]["name"].endswith("-shadow")

    def breakages():
        yield "component label", lambda d: sm(d) and d["spec"]["endpoints"][0]["relabelings"].append({"targetLabel": "component"})
        yield "no rename", lambda d: sm(d) and d["spec"]["endpoints"][0].pop("metricRelabelings")
        yield "live ServiceMonitor selects shadows", lambda d: (
            d["kind"] == "ServiceMonitor" and d["metadata"]["name"].endswith("-processor")
            and d["spec"]["selector"]["matchLabels"].pop("app.kubernetes.io/component"))
        yield "KEDA scales a shadow", lambda d: (
            d["kind"] == "ScaledObject" and d["metadata"]["name"].endswith("-processor")
            and d["spec"]["scaleTargetRef"].update(name=d["spec"]["scaleTargetRef"]["name"] + "-shadow"))
        yield "a rule reads a non-pulse_ series", lambda d: (
            d["kind"] == "PrometheusRule" and d["spec"]["groups"][0]["rules"][0].update(expr="rate(process_cpu_seconds_total[5m]) > 1"))
        yield "no shadow schemas", lambda d: (
            d["kind"] == "Job" and d["metadata"]["labels"].get("app.kubernetes.io/component") == "schemas"
            and pod_spec(d).update(containers=pod_spec(d)["containers"][:1]))

    for label, breaks in breakages():
        docs = copy.deepcopy(base)
        for d in docs:
            breaks(d)
        if not shadow_problems(Objects(docs, {}), label, True):
            raise Failure(f"the shadow check accepted a render with {label}: it cannot catch that")


def shadow_problems(objs: Objects, what: str, required: bool) -> list[str]:
    """A render with shadow.enabled: the shadow Deployments run `--shadow <name>`, are never
    scaled or budgeted (no HPA, ScaledObject, PDB targets them), carry no prometheus.io
    scrape annotations, get a NetworkPolicy when the live ones do, and their series cannot
    reach the shipped rules: no live ServiceMonitor selects a shadow Service, and each
    shadow's own ServiceMonitor sets no `component`/`pulse_release` and renames `pulse_*` to
    `pulse_shadow_*` while every series a rule reads is `pulse_*`, `up` (matched on
    `component`) or a recording rule; the schemas Job registers the shadow's subjects."""
    deps = {d["metadata"]["name"]: d for d in objs.of_kind("Deployment")}
    shadows = {n: d for n, d in deps.items() if d["metadata"]["labels"].get("app.kubernetes.io/component") in SHADOWS}
    if not shadows:
        return ["shadow.enabled renders no shadow Deployment"] if required else []
    problems = []
    if sorted(d["metadata"]["labels"]["app.kubernetes.io/component"] for d in shadows.values()) != sorted(SHADOWS):
        problems.append(f"shadow Deployments {sorted(shadows)}, expected one per {SHADOWS}")
    names = set()
    for n, d in shadows.items():
        pod = d["spec"]["template"]
        (c,) = pod["spec"]["containers"]
        args = c.get("args") or []
        if "--shadow" not in args or args.index("--shadow") + 1 >= len(args):
            problems.append(f"{n}: args {args} lack --shadow <name>")
        else:
            names.add(args[args.index("--shadow") + 1])
        if "replicas" not in d["spec"]:
            problems.append(f"{n}: no fixed replicas (a shadow is never autoscaled)")
        if any(k.startswith("prometheus.io/") for k in (pod["metadata"].get("annotations") or {})):
            problems.append(f"{n}: prometheus.io annotations (an annotation scrape would feed the live rules)")
    if len(names) != 1:
        problems.append(f"the shadow Deployments disagree on --shadow: {sorted(names)}")
    for kind in ("HorizontalPodAutoscaler", "ScaledObject"):
        for o in objs.of_kind(kind):
            if o["spec"]["scaleTargetRef"]["name"] in shadows:
                problems.append(f"{kind} {o['metadata']['name']} scales a shadow")

    def selects(sel: dict, labels: dict) -> bool:
        return bool(sel) and all(labels.get(k) == v for k, v in sel.items())

    pod_labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in shadows.items()}
    for pdb in objs.of_kind("PodDisruptionBudget"):
        for n, labels in pod_labels.items():
            if selects(pdb["spec"]["selector"].get("matchLabels") or {}, labels):
                problems.append(f"PodDisruptionBudget {pdb['metadata']['name']} selects {n}")
    if objs.of_kind("NetworkPolicy"):
        for n, labels in pod_labels.items():
            if not any(selects(np_["spec"]["podSelector"].get("matchLabels") or {}, labels)
                       for np_ in objs.of_kind("NetworkPolicy")):
                problems.append(f"no NetworkPolicy selects {n}, though the live services have them")
    shadow_svcs = {s_["metadata"]["name"]: s_["metadata"]["labels"] for s_ in objs.services
                   if s_["metadata"]["labels"].get("app.kubernetes.io/component") in SHADOWS}
    monitors = objs.of_kind("ServiceMonitor")
    if monitors:
        own = set()
        for sm in monitors:
            hit = [sv for sv, labels in shadow_svcs.items() if selects(sm["spec"]["selector"].get("matchLabels") or {}, labels)]
            if not hit:
                continue
            own.update(hit)
            for ep in sm["spec"]["endpoints"]:
                targets = {r.get("targetLabel") for r in ep.get("relabelings") or []}
                if targets & {"component", "pulse_release"}:
                    problems.append(f"ServiceMonitor {sm['metadata']['name']} (of {hit}) sets {sorted(targets & {'component', 'pulse_release'})}, which the live rules match/aggregate on")
                renames = [r for r in ep.get("metricRelabelings") or []
                           if r.get("targetLabel") == "__name__" and r.get("regex") == "pulse_(.+)"
                           and r.get("replacement", "").startswith("pulse_shadow_")]
                if not renames:
                    problems.append(f"ServiceMonitor {sm['metadata']['name']} (of {hit}) keeps the pulse_* names the live rules read")
        # Everything the rules read is renamed away from a shadow (or is `up` on `component`).
        for pr in objs.of_kind("PrometheusRule"):
            for g in pr["spec"]["groups"]:
                for r in g["rules"]:
                    for name in rule_series_names(str(r["expr"])):
                        if name == "up":
                            if 'component!=""' not in str(r["expr"]):
                                problems.append(f"rule {r.get('alert') or r.get('record')}: reads `up` without requiring `component`")
                        elif not (name.startswith("pulse_") or ":" in name) or name.startswith("pulse_shadow_"):
                            problems.append(f"rule {r.get('alert') or r.get('record')}: reads {name}, which a shadow's ServiceMonitor does not rename")
    jobs = [j for j in objs.of_kind("Job") if j["metadata"]["labels"].get("app.kubernetes.io/component") == "schemas"]
    if jobs and not any(["shadow", "schemas", "--shadow", *names] == (c.get("args") or [])
                        for j in jobs for c in pod_spec(j)["containers"]):
        problems.append(f"the schemas Job does not run `pulsectl shadow schemas --shadow {sorted(names)}`")
    return problems


# ---------------------------------------------------------------- running


class Runner:
    def __init__(self, objs: Objects, work: Path, bin_dir: Path, help_cache: HelpCache):
        self.objs = objs
        self.work = work
        self.bin_dir = bin_dir
        self.help_cache = help_cache
        self.pod_ports: dict[tuple[str, str], int] = {}  # (Deployment name, port name) -> local
        self.host_map: dict[str, str] = {}  # "<svc host>:<port>" -> "127.0.0.1:<local>"
        (work / "logs").mkdir(parents=True, exist_ok=True)

    # -- addresses

    def plan_ports(self) -> None:
        deployments = self.objs.of_kind("Deployment")
        for d in deployments:
            for cs in pod_spec(d)["containers"]:
                for p in cs.get("ports") or []:
                    self.pod_ports[(d["metadata"]["name"], p["name"])] = free_port()
        for svc in self.objs.services:
            sel = svc["spec"].get("selector") or {}
            targets = [d for d in deployments
                       if sel and all(d["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())]
            if len(targets) != 1:
                raise Failure(f"Service {svc['metadata']['name']} selects {len(targets)} Deployments, not one")
            dep = targets[0]
            dep_name = dep["metadata"]["name"]
            by_number = {p["containerPort"]: p["name"] for cs in pod_spec(dep)["containers"] for p in cs.get("ports") or []}
            for sp in svc["spec"]["ports"]:
                target = sp.get("targetPort", sp["port"])
                pname = target if isinstance(target, str) else by_number.get(target)
                if (dep_name, pname) not in self.pod_ports:
                    raise Failure(f"Service {svc['metadata']['name']} port {sp['port']} targets {target}, which {dep_name} does not declare")
                name = svc["metadata"]["name"]
                for host in (name, f"{name}.{NAMESPACE}", f"{name}.{NAMESPACE}.svc", f"{name}.{NAMESPACE}.svc.cluster.local"):
                    self.host_map[f"{host}:{sp['port']}"] = f"127.0.0.1:{self.pod_ports[(dep_name, pname)]}"

    def mounts(self, c: Container, owner_dir: str) -> dict[str, str]:
        """Writes the Secret/ConfigMap volumes the container mounts; mountPath -> local dir."""
        out = {}
        volumes = {v["name"]: v for v in c.pod.get("volumes") or []}
        for m in c.spec.get("volumeMounts") or []:
            v = volumes.get(m["name"])
            if v is None:
                raise Failure(f"{c.label}: mounts volume {m['name']}, which the pod does not declare")
            if "secret" in v or "configMap" in v:
                src = v.get("secret") or v.get("configMap")
                ref = src.get("secretName") or src.get("name")
                data = (self.objs.secrets if "secret" in v else self.objs.configmaps).get(ref)
                if data is None:
                    if src.get("optional"):
                        continue
                    raise Failure(f"{c.label}: volume {m['name']} needs {ref}, which the chart does not render")
                local = self.work / "mounts" / owner_dir / c.name / m["name"]
                local.mkdir(parents=True, exist_ok=True)
                items = src.get("items") or [{"key": k, "path": k} for k in data]
                for it in items:
                    if it["key"] not in data:
                        raise Failure(f"{c.label}: volume {m['name']} needs key {it['key']} of {ref}, which is not there")
                    (local / it["path"]).write_text(data[it["key"]])
                out[m["mountPath"].rstrip("/")] = str(local)
        return out

    def localize(self, text: str, own_ports: dict[int, int], mounts: dict[str, str]) -> str:
        def listen(m: re.Match) -> str:
            port = int(m.group(1))
            if port not in own_ports:
                raise Failure(f"listen address 0.0.0.0:{port} is not a declared containerPort")
            return f"127.0.0.1:{own_ports[port]}"

        text = re.sub(r"^0\.0\.0\.0:(\d+)$", listen, text)
        for hostport, local in sorted(self.host_map.items(), key=lambda kv: -len(kv[0])):
            text = re.sub(rf"(?<![A-Za-z0-9.-]){re.escape(hostport)}(?![0-9])", local, text)
        for mount, local in mounts.items():
            if text == mount or text.startswith(mount + "/"):
                text = local + text[len(mount):]
        return text

    def prepare(self, c: Container, owner_dir: str, deployment: str | None) -> tuple[list[str], dict[str, str]]:
        own_ports = {}
        if deployment:
            for p in c.spec.get("ports") or []:
                own_ports[p["containerPort"]] = self.pod_ports[(deployment, p["name"])]
                c.ports[p["name"]] = self.pod_ports[(deployment, p["name"])]
        mounts = self.mounts(c, owner_dir)
        env = {k: self.localize(v, own_ports, mounts) for k, v in c.env.items()}
        argv = [self.localize(a, own_ports, mounts) for a in c.argv]
        exe = self.help_cache.binary(argv[0])
        if exe is None:
            raise Failure(f"{c.label}: {argv[0]} not found")
        base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.work), "LANG": "C.UTF-8"}
        return [exe, *argv[1:]], {**base, **env}

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
        logfile = self.work / "logs" / f"{name}.log"
        f = open(logfile, "ab")
        p = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, cwd=self.work)
        PROCS.append(p)
        return p, logfile

    def run_to_end(self, name: str, argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
        p, logfile = self.start(name, argv, env)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = -1
        return rc, logfile.read_text(errors="replace")

    # -- phases

    def run_job(self, job: dict, attempts: int, deadline: float) -> None:
        name = job["metadata"]["name"]
        cs = containers_of(job, self.objs)
        backoff = 1.0
        for attempt in range(1, attempts + 1):
            ok = True
            for c in cs:
                argv, env = self.prepare(c, name, None)
                rc, out = self.run_to_end(f"{name}-{c.name}", argv, env, max(1.0, deadline - time.monotonic()))
                if rc != 0:
                    ok = False
                    last = f"{c.label} exited {rc}:\n{out[-3000:]}"
                    break
            if ok:
                log(f"Job {name}: {', '.join(' '.join(c.argv) for c in cs)} succeeded (attempt {attempt})")
                return
            if attempt == attempts or time.monotonic() + backoff > deadline:
                raise Failure(f"Job {name} failed after {attempt} attempt(s): {last}")
            time.sleep(backoff)
            backoff = min(backoff * 2, 8.0)

    def probe_ok(self, port: int, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False


@dataclass
class Service:
    """A Deployment's container running as a local process."""

    c: Container
    argv: list[str]
    env: dict[str, str]
    grace: int
    probes: list[tuple[str, str, str]]
    proc: subprocess.Popen | None = None
    logfile: Path | None = None


def probes_of(c: Container) -> list[tuple[str, str, str]]:
    out = []
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        pr = c.spec.get(kind)
        if not pr:
            raise Failure(f"{c.label}: no {kind}")
        http = pr.get("httpGet")
        if not http:
            raise Failure(f"{c.label}: {kind} is not an httpGet probe")
        out.append((kind, http["path"], http["port"]))
    return out


def check_archive(run_id: str) -> None:
    """The Parquet writer, configured only by the chart, archived the events under the
    run's prefix (it uploads its open roll when it drains)."""
    import boto3

    e = os.environ
    s3 = boto3.client("s3", endpoint_url=e["PULSE_TEST_S3_ENDPOINT"], region_name="us-east-1",
                      aws_access_key_id=e["PULSE_TEST_S3_ACCESS_KEY"], aws_secret_access_key=e["PULSE_TEST_S3_SECRET_KEY"])
    listed = s3.list_objects_v2(Bucket=e["PULSE_TEST_S3_BUCKET"], Prefix=f"{run_id}/events/")
    keys = [o["Key"] for o in listed.get("Contents", []) if o["Key"].endswith(".parquet")]
    if not keys:
        raise Failure(f"writer-parquet archived nothing under s3://{e['PULSE_TEST_S3_BUCKET']}/{run_id}/events/")
    log(f"writer-parquet archived {len(keys)} Parquet object(s) under s3://{e['PULSE_TEST_S3_BUCKET']}/{run_id}/events/")


def check_scaling_metrics(objs: "Objects", running: list["Service"]) -> None:
    """Every series a KEDA ScaledObject's query reads exists in a live /metrics scrape of
    the Deployment it scales, with one of the topics the query selects."""
    scaled = objs.of_kind("ScaledObject")
    if not scaled:
        raise Failure("the test values enable KEDA, but no ScaledObject was rendered")
    by_owner = {svc.c.owner: svc for svc in running}
    for so in scaled:
        target = so["spec"]["scaleTargetRef"]["name"]
        svc = by_owner.get(f"Deployment/{target}")
        if svc is None:
            raise Failure(f"ScaledObject {so['metadata']['name']} scales {target}, which is not a running Deployment")
        admin = svc.c.ports.get("admin")
        if admin is None:
            raise Failure(f"{svc.c.label} has no port named admin")
        for trig in so["spec"]["triggers"]:
            query = trig["metadata"]["query"]
            # Each selector `name{...}`, with the topics it selects (none: any series of it),
            # e.g. the lag per input topic and the writers' circuit/blocked gate.
            wanted: dict[str, set[str]] = {}
            for n, body in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", query):
                topics = re.search(r'topic=~"([^"]+)"', body)
                wanted.setdefault(n, set()).update(topics.group(1).split("|") if topics else [])
            names = sorted(wanted)
            if not names:
                raise Failure(f"cannot read a metric name from the KEDA query {query!r}")
            deadline = time.monotonic() + 30  # the lag gauges follow librdkafka's statistics interval
            while True:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
                    text = r.read().decode()
                missing = [f"{n} (topics {sorted(wanted[n])})" if wanted[n] else n for n in names
                           if not any(l.startswith(n + "{")
                                      and (not wanted[n] or any(f'topic="{t}"' in l for t in wanted[n]))
                                      for l in text.splitlines())]
                if not missing:
                    break
                if time.monotonic() > deadline:
                    raise Failure(f"{target}: the KEDA query reads {missing}, absent from its live /metrics")
                time.sleep(1)
            log(f"{target}: KEDA's {', '.join(names)} present in the live /metrics scrape")


def http_status(url: str, token: str | None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def check_shadow_live(running: list["Service"]) -> None:
    """The rendered shadow processor and writer run as shadows: their /metrics label every
    Pulse series with the shadow's service (processor-shadow, writer-shadow), never the
    live one, which is what keeps them apart from the live processor's and writer's series."""
    want = {"processor-shadow": "processor-shadow", "writer-clickhouse-shadow": "writer-shadow"}
    seen = 0
    for svc in running:
        comp = next((k for k in want if svc.c.owner.endswith(f"-{k}")), None)
        if comp is None:
            continue
        seen += 1
        with urllib.request.urlopen(f"http://127.0.0.1:{svc.c.ports['admin']}/metrics", timeout=5) as r:
            text = r.read().decode()
        services = set(re.findall(r'^pulse_[a-z0-9_]+\{[^}]*\bservice="([^"]+)"', text, re.M))
        if services != {want[comp]}:
            raise Failure(f"{svc.c.owner}: its pulse_* series carry service={sorted(services)}, not only {want[comp]!r}")
        log(f"{svc.c.owner}: every pulse_* series says service=\"{want[comp]}\"")
    if seen != len(want):
        raise Failure(f"the test values enable a shadow, but {seen} of {len(want)} shadow Deployments ran")


def check_ledger(objs: "Objects", running: list["Service"]) -> None:
    """The ledger Deployment (`pulsectl ledger watch`), configured only by the chart: the
    query URL and token it is given reach this release's query API (through the Service
    name) and are accepted there, on the route and with the parameters its revenue check
    uses, while the same request without the token is refused; and every pulse_ledger_*
    series the rendered PrometheusRule reads is in its live /metrics."""
    ledgers = [s for s in running if s.argv[1:3] == ["ledger", "watch"]]
    if len(ledgers) != 1:
        raise Failure(f"expected one running `pulsectl ledger watch` Deployment, found {len(ledgers)}")
    svc = ledgers[0]
    url = svc.env.get("PULSE_LEDGER_QUERY_URL", "")
    if not url.startswith("http://127.0.0.1:"):
        raise Failure(f"{svc.c.label}: PULSE_LEDGER_QUERY_URL={url!r} does not name a Service of the release")
    token_file = svc.env.get("PULSE_LEDGER_QUERY_TOKEN_FILE")
    if not token_file:
        raise Failure(f"{svc.c.label}: no PULSE_LEDGER_QUERY_TOKEN_FILE (secrets.asFiles is on in the test values)")
    token = Path(token_file).read_text().rstrip("\r\n")
    hour = int(time.time()) // 3600 * 3600 * 1000
    route = f"{url}/v1/revenue?from={hour - 3600_000}&to={hour}&step=1h"
    ok, anonymous = http_status(route, token), http_status(route, None)
    if ok != 200 or anonymous != 401:
        raise Failure(f"{svc.c.label}: GET {route} answered {ok} with the ledger's token (want 200) and {anonymous} without one (want 401)")
    log(f"{svc.c.owner}: its query URL reaches the query API Service and its token is accepted (200; 401 without)")
    rules = objs.of_kind("PrometheusRule")
    exprs = [str(r.get("expr", "")) for pr in rules for g in pr["spec"]["groups"] for r in g["rules"]]
    names = sorted({n for e in exprs for n in re.findall(r"\b(pulse_ledger_[a-z_]+)\b", e)})
    if not names:
        raise Failure("the rendered PrometheusRule reads no pulse_ledger_* series (prometheusRule.enabled in the test values?)")
    with urllib.request.urlopen(f"http://127.0.0.1:{svc.c.ports['admin']}/metrics", timeout=5) as r:
        text = r.read().decode()
    present = {l.split("{")[0].split(" ")[0] for l in text.splitlines() if l and not l.startswith("#")}
    missing = [n for n in names if n not in present]
    if missing:
        raise Failure(f"{svc.c.owner}: the rules read {missing}, absent from its live /metrics")
    log(f"{svc.c.owner}: the rules' {', '.join(names)} present in its live /metrics")


def check_registry_auth(objs: "Objects", running: list["Service"], second: "Objects") -> None:
    """Schema-registry authentication and TLS as the chart's defaults wire them (serverTls
    in the test values): with the passwords of the rendered main Secret, the registry
    Service refuses an anonymous `PUT /config/x` and GET (401) and the read user's PUT
    (403), and accepts the read user's GETs and the write user's PUT (200); ingest's user
    and password file as the chart gives them are that read user and its password; all
    over HTTPS trusting the CA file the chart gives ingest. Then a second render's users
    file (`second`: new random passwords, new bcrypt hashes, as a fresh install would
    make) is written over the registry's mounted file, as the kubelet does after a Secret
    edit: the registry reloads it without a restart, the second render's passwords work
    and the first's are refused; the first file is put back (and works again) for the
    rest of the run. A client trusting only the system's CAs is refused with a certificate
    error, and plain HTTP gets no answer. Ingest and the processor being ready, and the
    schemas Job having registered, already show that each connected over TLS and
    authenticated."""
    by_name = {Path(s.argv[0]).name: s for s in running}
    ingest, registry = by_name.get("pulse-ingest"), by_name.get("pulse-schema-registry")
    if ingest is None or registry is None:
        raise Failure("expected running pulse-ingest and pulse-schema-registry Deployments")
    env = ingest.env
    url, user, pw_file, ca_file = (env.get(k, "") for k in
                                   ("PULSE_SCHEMA_REGISTRY_URL", "PULSE_REGISTRY_USERNAME", "PULSE_REGISTRY_PASSWORD_FILE",
                                    "PULSE_SCHEMA_REGISTRY_CA_FILE"))
    if not (url.startswith("https://127.0.0.1:") and user and pw_file and ca_file):
        raise Failure(f"{ingest.c.label}: registry URL {url!r} (want https://), user {user!r}, password file {pw_file!r}, "
                      f"CA file {ca_file!r}: not all set")
    users_file = Path(registry.env.get("PULSE_REGISTRY_AUTH_FILE", "/nonexistent"))
    if not users_file.is_file():
        raise Failure(f"{registry.c.label}: PULSE_REGISTRY_AUTH_FILE={users_file} is not a mounted file")

    def creds(o: "Objects") -> tuple[str, str, str]:
        main = o.secrets[f"{RELEASE}-secrets"]
        users = next(v for n, v in o.secrets.items() if n.endswith("-registry-users"))
        return main["registry-read-password"], main["registry-write-password"], users["users"]

    read_pw, write_pw, users1 = creds(objs)
    jobs = [c for j in objs.of_kind("Job") if j["metadata"]["labels"].get("app.kubernetes.io/component") == "schemas"
            for c in containers_of(j, objs)]
    writer = jobs[0].env.get("PULSE_REGISTRY_USERNAME", "") if jobs else ""
    if Path(pw_file).read_text().rstrip("\n") != read_pw or not writer or writer == user:
        raise Failure(f"{ingest.c.label}: its password file is not the Secret's registry-read-password, or the schemas "
                      f"Job's user {writer!r} is not a second user")
    trusting = ssl.create_default_context(cafile=ca_file)

    def basic(name: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()

    def status(method: str, path: str, auth: str | None) -> int:
        body = b'{"compatibility":"NONE"}' if method == "PUT" else None
        headers = {"Content-Type": "application/vnd.schemaregistry.v1+json"}
        if auth:
            headers["Authorization"] = auth
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{url}{path}", data=body, method=method,
                                                               headers=headers), timeout=20, context=trusting) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def expect(cases: list[tuple[str, str, str, str | None, int]], what: str) -> None:
        bad = []
        for who, m, p_, auth, want in cases:
            st = status(m, p_, auth)
            if st != want:
                bad.append(f"{m} {p_} as {who} answered {st}, want {want}")
        if bad:
            raise Failure(f"schema registry, {what}: " + "; ".join(bad))

    def wait_status(method: str, path: str, auth: str, want: int, what: str, timeout: float = 40) -> None:
        deadline = time.monotonic() + timeout
        while (st := status(method, path, auth)) != want:
            if time.monotonic() > deadline:
                raise Failure(f"schema registry: {what}: {method} {path} still answers {st} after {timeout:.0f} s, want {want}")
            time.sleep(0.5)

    r1, w1 = basic(user, read_pw), basic(writer, write_pw)
    expect([("anonymous", "PUT", "/config/x", None, 401), ("anonymous", "GET", "/subjects", None, 401),
            (user, "PUT", "/config/x", r1, 403), (user, "GET", "/subjects", r1, 200), (user, "GET", "/config", r1, 200),
            (writer, "PUT", "/config/x", w1, 200), (user, "GET", "/config/x", r1, 200)],
           "the rendered Secret's passwords")
    log(f"schema registry (chart defaults: generated passwords, bcrypt users file): anonymous PUT /config/x 401, "
        f"{user} PUT 403 and GET 200, {writer} PUT 200; ingest's password file is {user}'s")

    read2, write2, users2 = creds(second)
    if read2 == read_pw or write2 == write_pw or users2 == users1:
        raise Failure("a second render without a cluster reused the first's registry passwords or hashes")
    users_file.write_text(users2)
    r2, w2 = basic(user, read2), basic(writer, write2)
    wait_status("PUT", "/config/x", w2, 200, "after the second render's users file was written")
    expect([(f"{writer} (first password)", "PUT", "/config/x", w1, 401),
            (f"{user} (first password)", "GET", "/subjects", r1, 401),
            (f"{user} (second password)", "GET", "/subjects", r2, 200),
            (f"{user} (second password)", "PUT", "/config/x", r2, 403)], "after the second render's users file")
    users_file.write_text(users1)
    wait_status("PUT", "/config/x", w1, 200, "after the first users file was put back")
    expect([(f"{user} (first password)", "GET", "/subjects", r1, 200),
            (f"{writer} (second password)", "PUT", "/config/x", w2, 401)], "after the first users file was put back")
    log("schema registry: a second render's users file (new bcrypt hashes of new passwords) reloaded without a "
        "restart: its passwords 200, the first's 401; the first file put back works again")
    try:
        urllib.request.urlopen(f"{url}/subjects", timeout=10, context=ssl.create_default_context())
        raise Failure(f"schema registry: {url} answered a client that does not trust the chart's CA")
    except urllib.error.URLError as e:
        if not isinstance(e.reason, ssl.SSLCertVerificationError):
            raise Failure(f"schema registry: a client without the CA failed with {e.reason!r}, want a certificate error")
    plain = url.replace("https://", "http://", 1)
    try:
        urllib.request.urlopen(f"{plain}/subjects", timeout=10)
        raise Failure(f"schema registry: {plain} answered plain HTTP while serverTls lists it")
    except urllib.error.HTTPError as e:
        raise Failure(f"schema registry: plain HTTP got HTTP {e.code}, want no answer (TLS only)")
    except (urllib.error.URLError, OSError, http.client.HTTPException):
        pass  # refused, reset or not HTTP: the port speaks TLS only
    log(f"schema registry: serves TLS ({url}), trusted through the chart's CA file {Path(ca_file).name}; "
        "a client without it gets a certificate error, plain HTTP no answer")


def test_values(run_id: str) -> dict:
    e = os.environ
    # The registry's authentication is the chart's default: ingest and the processor read
    # as pulse-read, the schemas Job registers as pulse-write, with passwords the chart
    # generates (Secret files) and a users file it hashes with htpasswd (bcrypt).
    return {
        "kafka": {"brokers": e["PULSE_TEST_KAFKA_BROKERS"], "partitions": 3, "replicationFactor": 1, "minInsyncReplicas": 1,
                  "compression": "lz4"},
        "clickhouse": {"url": e["PULSE_TEST_CLICKHOUSE_URL"], "database": f"pulse_{run_id}", "user": "default",
                       "compression": "none", "validation": False},
        "s3": {"endpoint": e["PULSE_TEST_S3_ENDPOINT"], "bucket": e["PULSE_TEST_S3_BUCKET"], "prefix": run_id,
               "region": "us-east-1", "pathStyle": True,
               # s3s-fs accepts the SSE header without encrypting; here: the setting reaches
               # the writer and the ledger and they run with it (tests/it/s3_sse.rs checks
               # the requests).
               "sse": "AES256"},
        "secrets": {
            "asFiles": True,
            "ingestApiKeys": [{"key": f"ingest-{run_id}", "source": "chart-test"}],
            "queryApiTokens": [f"query-{run_id}"],
            "piiHmacKey": f"hmac-{run_id}",
            "s3AccessKey": e["PULSE_TEST_S3_ACCESS_KEY"],
            "s3SecretKey": e["PULSE_TEST_S3_SECRET_KEY"],
        },
        "telemetry": {"logFormat": "text", "traceSampleRatio": 1.0},
        "tests": {"timeoutSeconds": 120},
        # Rendered so that check_scaling_metrics can hold the ScaledObjects' queries
        # against the services' live /metrics (nothing here runs KEDA itself).
        "keda": {"enabled": True},
        # Rendered so that check_ledger can hold the rules' pulse_ledger_* series against
        # the ledger's live /metrics.
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "ingest": {"replicas": 1},
        "processor": {"replicas": 1, "config": {
            "PULSE_PROCESSOR_GROUP_ID": f"pulse-processor-{run_id}",
            "PULSE_PROCESSOR_CHECKPOINT_TOPIC": f"pulse.processor.checkpoints.{run_id}"}},
        "writerClickhouse": {"replicas": 1, "config": {"PULSE_WRITER_GROUP_ID": f"pulse-writer-clickhouse-{run_id}"}},
        "writerParquet": {"replicas": 1, "config": {"PULSE_WRITER_GROUP_ID": f"pulse-writer-parquet-{run_id}"}},
        "queryApi": {"replicas": 1},
        "schemaRegistry": {"replicas": 1, "schemasTopic": f"_schemas_{run_id}"},
        "ledger": {"enabled": True},
        # The registry serves TLS; its clients (ingest, the processor, the schemas Job) get
        # https:// and the CA from the Secret (caSecret empty: the Secret's ca.crt).
        "serverTls": {"enabled": True, "secret": SERVER_TLS_SECRET, "components": ["schema-registry"]},
        # A shadow processor and writer beside the live ones (their group, topics and tables
        # follow from the live names above plus `.shadow.<name>`): the schemas Job registers
        # its subjects, both must get ready, drain and identify as shadows in /metrics.
        "shadow": {"enabled": True, "name": f"t{run_id}", "processor": {"config": {"PULSE_PROCESSOR_SESSION_GAP_MS": "600000"}}},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chart", type=Path, default=Path("helm/pulse"))
    ap.add_argument("--bin-dir", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--static-only", action="store_true", help="only the env/flag checks (no servers needed)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    atexit.register(kill_all)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: sys.exit(128 + s))
    started = time.monotonic()
    help_cache = HelpCache(args.bin_dir)
    try:
        checker_refuses_unknown_names(help_cache)
        shadow_checker_refuses(args.chart)
        registry_auth_checker_refuses(args.chart)
        for values in sorted((args.chart / "ci").glob("*-values.yaml")):
            ci_objs = Objects(render(args.chart, [values]), external_secrets(values))
            static_checks(ci_objs, help_cache, f"ci/{values.name}")
            check_shadow_render(ci_objs, f"ci/{values.name}", required=values.name == "shadow-values.yaml")
            if values.name == "default-values.yaml":
                check_default_registry_auth(ci_objs, f"ci/{values.name}")
            ledger_problems = ledger_query_tls_problems(ci_objs, yaml.safe_load(values.read_text()) or {})
            if ledger_problems:
                raise Failure(f"ci/{values.name}: " + "; ".join(ledger_problems))
        if not (args.chart / "ci" / "shadow-values.yaml").exists():
            raise Failure("helm/pulse/ci/shadow-values.yaml is missing: no render checks the shadow Deployments")
        if args.static_only:
            return 0
        run_id = "c" + secrets.token_hex(4)
        values_file = args.work / "values.yaml"
        values_file.write_text(yaml.safe_dump(test_values(run_id)))
        objs = Objects(render(args.chart, [values_file]), {SERVER_TLS_SECRET: server_tls_secret(args.work)})
        static_checks(objs, help_cache, "test values")
        runner = Runner(objs, args.work, args.bin_dir, help_cache)
        runner.plan_ports()

        jobs = objs.of_kind("Job")
        pre = sorted((j for j in jobs if "pre-install" in hook_of(j)),
                     key=lambda j: int((j["metadata"].get("annotations") or {}).get("helm.sh/hook-weight", "0")))
        if not pre:
            raise Failure("the chart renders no pre-install hook Job")
        for j in pre:
            runner.run_job(j, 1, time.monotonic() + 120)

        # Deployments and plain Jobs start together, as `helm install` creates them.
        running: list[Service] = []
        for d in objs.of_kind("Deployment"):
            dname = d["metadata"]["name"]
            (c,) = containers_of(d, objs)
            argv, env = runner.prepare(c, dname, dname)
            svc = Service(c, argv, env, int(pod_spec(d).get("terminationGracePeriodSeconds", 30)), probes_of(c))
            svc.proc, svc.logfile = runner.start(dname, argv, env)
            running.append(svc)
            log(f"started {dname}: {' '.join(argv[1:]) or '(no args)'} (ports {c.ports})")
        plain = [j for j in jobs if not hook_of(j)]
        if not plain:
            raise Failure("the chart renders no schema registration Job")
        for j in plain:
            limit = int(j["spec"].get("backoffLimit", 6)) + 1
            runner.run_job(j, max(limit, 30), time.monotonic() + 120)

        # Readiness. Every dependency a service waits for exists or comes up during this
        # phase (the schema Job registers the subjects while ingest and the processor wait
        # for them), so a service that exits before it is ready fails the test: on a
        # cluster it would crash-loop on a fresh install.
        deadline = time.monotonic() + 150
        pending = {s.c.owner: s for s in running}
        while pending:
            for owner, svc in list(pending.items()):
                if svc.proc.poll() is not None:
                    raise Failure(f"{owner} exited {svc.proc.returncode} before it was ready (a crash loop on a fresh install):\n"
                                  + svc.logfile.read_text(errors="replace")[-3000:])
                if all(runner.probe_ok(svc.c.ports[port], path) for _, path, port in svc.probes):
                    log(f"{owner}: " + ", ".join(f"{k} {path} on {port}" for k, path, port in svc.probes)
                        + " answer 200")
                    del pending[owner]
            if pending and time.monotonic() > deadline:
                names = ", ".join(pending)
                tails = "\n".join(f"--- {o}\n{v.logfile.read_text(errors='replace')[-1500:]}" for o, v in pending.items())
                raise Failure(f"not ready within 150 s: {names}\n{tails}")
            time.sleep(0.5)

        tests = [p for p in objs.of_kind("Pod") if hook_of(p) == "test"]
        if not tests:
            raise Failure("the chart renders no helm test Pod")
        for t in tests:
            tname = t["metadata"]["name"]
            for c in containers_of(t, objs):
                argv, env = runner.prepare(c, tname, None)
                rc, out = runner.run_to_end(tname, argv, env, 200)
                if rc != 0 or "round trip ok" not in out:
                    raise Failure(f"helm test Pod {tname} failed (exit {rc}):\n{out[-3000:]}")
                log(f"helm test {tname}: " + out.strip().splitlines()[-1])

        check_scaling_metrics(objs, running)
        check_ledger(objs, running)
        check_shadow_render(objs, "test values", required=True)
        check_shadow_live(running)
        check_registry_auth(objs, running, Objects(render(args.chart, [values_file]), {}))

        for svc in running:
            if svc.proc.poll() is not None:
                raise Failure(f"{svc.c.owner} exited {svc.proc.returncode} during the test:\n{svc.logfile.read_text(errors='replace')[-3000:]}")
            os.killpg(svc.proc.pid, signal.SIGTERM)
        for svc in running:
            try:
                rc = svc.proc.wait(timeout=svc.grace)
            except subprocess.TimeoutExpired:
                raise Failure(f"{svc.c.owner} did not stop within terminationGracePeriodSeconds={svc.grace} after SIGTERM")
            if rc != 0:
                raise Failure(f"{svc.c.owner} exited {rc} after SIGTERM:\n{svc.logfile.read_text(errors='replace')[-3000:]}")
        log("every service drained and exited 0 within its grace period")
        check_archive(run_id)
        log(f"the chart runs ({time.monotonic() - started:.0f} s)")
        return 0
    except Failure as e:
        log(f"FAIL: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
