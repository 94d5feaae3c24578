"""The chart's generated registry credentials across installs and upgrades, offline.

`helm template` has no cluster, so its `lookup` finds nothing and every render generates
new credentials. To see what an upgrade renders, this test serves a fake Kubernetes API
on 127.0.0.1 (discovery, and GET of the Secrets it was given: what `lookup` reads) and
renders with `helm template --dry-run=server --disable-openapi-validation` against it,
as Helm does for `helm upgrade` (the same template code path):

1. two renders without a cluster (plain `helm template`): each pair of generated password
   and `htpasswd` bcrypt line verifies (libcrypt's bcrypt, the same check the registry
   makes), the users file holds exactly the read and write user, and the two renders'
   passwords differ (random);
2. install, then upgrade with the install's Secrets in the fake API: the main Secret, the
   users Secret and every pod's checksum/secret annotation are unchanged (an upgrade rolls
   nothing and rewrites no hash);
3. upgrade with `secrets.registryWritePassword=<new>` (rotation): the write line gets a
   new hash that verifies with the new password, the read line stays byte for byte; the
   next upgrade with the same value changes nothing again;
4. a password edited in the main Secret by hand (kubectl edit): the next upgrade keeps
   that password and re-hashes its line (the fingerprint no longer matches), so the pair
   still verifies.

Run by scripts/chart-test.sh with $PULSE_CACHE/venv/bin/python, with Helm 4 and (when
installed) Helm 3: `chart_upgrade.py helm/pulse helm [helm3]`.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import yaml

RELEASE = "pulse"
NAMESPACE = "pulse-upgrade-test"
MAIN = f"{RELEASE}-secrets"
USERS = f"{RELEASE}-registry-users"
LINE = re.compile(r"^([^:\s]+):(read|write):(\$2[aby]\$\d{2}\$[./A-Za-z0-9]{53})$")

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import crypt  # libcrypt (libxcrypt) verifies bcrypt; gone in Python 3.13
    except ImportError:  # pragma: no cover - depends on the interpreter
        crypt = None


class Failure(Exception):
    pass


def log(msg: str) -> None:
    print(f"[chart-upgrade] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- fake API server

# Discovery of the kinds the chart renders (Helm 4 maps every rendered object to a
# resource even in a dry run).
GROUPS = {
    "": ("v1", ["secrets/Secret", "configmaps/ConfigMap", "services/Service", "serviceaccounts/ServiceAccount",
                "pods/Pod"]),
    "apps": ("v1", ["deployments/Deployment"]),
    "batch": ("v1", ["jobs/Job"]),
    "policy": ("v1", ["poddisruptionbudgets/PodDisruptionBudget"]),
    "autoscaling": ("v2", ["horizontalpodautoscalers/HorizontalPodAutoscaler"]),
    "networking.k8s.io": ("v1", ["networkpolicies/NetworkPolicy"]),
    "monitoring.coreos.com": ("v1", ["servicemonitors/ServiceMonitor", "prometheusrules/PrometheusRule"]),
    "keda.sh": ("v1alpha1", ["scaledobjects/ScaledObject"]),
}


class FakeApi:
    """Discovery plus GET of namespaced Secrets from `self.secrets` ({name: Secret})."""

    def __init__(self) -> None:
        self.secrets: dict[str, dict] = {}
        self.lookups: list[str] = []
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def send(self, code: int, obj: dict) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?")[0].rstrip("/")
                if path == "/version":
                    return self.send(200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0"})
                if path == "/api":
                    return self.send(200, {"kind": "APIVersions", "versions": ["v1"]})
                if path == "/apis":
                    return self.send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                        {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v}],
                         "preferredVersion": {"groupVersion": f"{g}/{v}", "version": v}}
                        for g, (v, _) in GROUPS.items() if g]})
                for g, (v, kinds) in GROUPS.items():
                    if path == (f"/apis/{g}/{v}" if g else "/api/v1"):
                        return self.send(200, {"kind": "APIResourceList", "groupVersion": f"{g}/{v}" if g else v,
                                               "resources": [{"name": k.split("/")[0], "kind": k.split("/")[1],
                                                              "namespaced": True, "singularName": "",
                                                              "verbs": ["get", "list", "create"]} for k in kinds]})
                m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/secrets/([^/]+)", path)
                if m and m.group(1) == NAMESPACE:
                    api.lookups.append(m.group(2))
                    if m.group(2) in api.secrets:
                        return self.send(200, api.secrets[m.group(2)])
                return self.send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                       "reason": "NotFound", "code": 404})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kubeconfig(self, folder: Path) -> Path:
        path = folder / "kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{self.server.server_address[1]}"}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": NAMESPACE}}],
            "current-context": "fake"}))
        return path

    def install(self, docs: list[dict]) -> None:
        """Stores the rendered Secrets as the cluster would hold them after an install/upgrade
        (with the ownership metadata Helm adds, which Helm 4 checks in a dry run)."""
        for d in docs:
            if d["kind"] == "Secret":
                meta = {**d["metadata"], "namespace": NAMESPACE,
                        "labels": {**(d["metadata"].get("labels") or {}), "app.kubernetes.io/managed-by": "Helm"},
                        "annotations": {**(d["metadata"].get("annotations") or {}),
                                        "meta.helm.sh/release-name": RELEASE, "meta.helm.sh/release-namespace": NAMESPACE}}
                self.secrets[d["metadata"]["name"]] = {**d, "metadata": meta}


# ---------------------------------------------------------------- rendering and checks


def render(helm: str, chart: Path, kubeconfig: Path | None, *sets: str) -> list[dict]:
    cmd = [helm, "template", RELEASE, str(chart), "--namespace", NAMESPACE]
    # No KUBECONFIG or context of the caller's: only the fake API, when given.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tempfile.gettempdir(),
           "KUBECONFIG": str(kubeconfig or "/nonexistent")}
    if kubeconfig is not None:
        cmd += ["--dry-run=server", "--disable-openapi-validation", "--kubeconfig", str(kubeconfig)]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if out.returncode != 0:
        raise Failure(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def secret(docs: list[dict], name: str) -> dict[str, str]:
    for d in docs:
        if d["kind"] == "Secret" and d["metadata"]["name"] == name:
            return {k: base64.b64decode(v).decode() for k, v in (d.get("data") or {}).items()}
    raise Failure(f"no Secret {name} rendered")


def checksums(docs: list[dict]) -> dict[str, str]:
    return {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]
            for d in docs if d["kind"] == "Deployment"}


def verifies(hash_: str, password: str) -> bool:
    return crypt.crypt(password, hash_) == hash_


def pairs(docs: list[dict], what: str) -> dict[str, tuple[str, str, str]]:
    """role -> (user, bcrypt hash, password); checks each pair verifies (when libcrypt is
    there) and that the fingerprints are those of the pairs."""
    main, users = secret(docs, MAIN), secret(docs, USERS)
    lines = users["users"].splitlines()
    found = {}
    for line in lines:
        m = LINE.match(line)
        if not m:
            raise Failure(f"{what}: users line {line.split(':')[0]!r}… is not `name:role:<bcrypt>`")
        found[m.group(2)] = (m.group(1), m.group(3), main[f"registry-{m.group(2)}-password"])
    if sorted(found) != ["read", "write"] or len(lines) != 2:
        raise Failure(f"{what}: the users file has {len(lines)} line(s) with roles {sorted(found)}, want read and write")
    for role, (user, h, pw) in found.items():
        if crypt is not None and not verifies(h, pw):
            raise Failure(f"{what}: {user}'s bcrypt hash does not verify with registry-{role}-password")
        if crypt is not None and verifies(h, pw + "x"):
            raise Failure(f"{what}: {user}'s bcrypt hash verifies with a wrong password")
    want = [f"{u}:{hashlib.sha256(f'{h}:{pw}'.encode()).hexdigest()}" for u, h, pw in found.values()]
    if sorted(users.get("fingerprints", "").splitlines()) != sorted(want):
        raise Failure(f"{what}: the fingerprints are not sha256(<hash>:<password>) of the lines")
    return found


def run(helm: str, chart: Path, work: Path) -> None:
    name = Path(helm).name
    # 1. Renders without a cluster.
    a, b = render(helm, chart, None), render(helm, chart, None)
    pa, pb = pairs(a, f"{name}: render 1"), pairs(b, f"{name}: render 2")
    if any(pa[r][2] == pb[r][2] for r in pa):
        raise Failure(f"{name}: two renders without a cluster generated the same password")
    log(f"{name}: two renders without a cluster: random passwords, each with a bcrypt line that "
        + ("verifies (libcrypt)" if crypt else "has its fingerprint (no libcrypt: not verified here)"))

    # 2. Install, then upgrade.
    api = FakeApi()
    kube = api.kubeconfig(work)
    try:
        installed = render(helm, chart, kube)
        if USERS not in api.lookups or MAIN not in api.lookups:
            raise Failure(f"{name}: the render against the fake API looked up {sorted(set(api.lookups))}, "
                          f"not {MAIN} and {USERS}: the fake API does not answer lookup")
        first = pairs(installed, f"{name}: install")
        api.install(installed)
        upgraded = render(helm, chart, kube)
        for s in (MAIN, USERS):
            if secret(upgraded, s) != secret(installed, s):
                changed = sorted(k for k, v in secret(upgraded, s).items() if secret(installed, s).get(k) != v)
                raise Failure(f"{name}: an upgrade without changes changed Secret {s} (keys {changed})")
        if checksums(upgraded) != checksums(installed):
            raise Failure(f"{name}: an upgrade without changes changed the pods' checksum/secret (pods would roll)")
        log(f"{name}: install then upgrade: {MAIN}, {USERS} and the pods' checksum/secret unchanged")

        # 3. Rotation of the write password.
        new_pw = "rotated-" + hashlib.sha256(str(work).encode()).hexdigest()[:24]
        rotated = render(helm, chart, kube, f"secrets.registryWritePassword={new_pw}")
        second = pairs(rotated, f"{name}: rotation")
        if second["write"][2] != new_pw or second["write"][1] == first["write"][1]:
            raise Failure(f"{name}: setting secrets.registryWritePassword did not re-hash the write user")
        if second["read"] != first["read"]:
            raise Failure(f"{name}: rotating the write password changed the read user's line or password")
        api.install(rotated)
        again = render(helm, chart, kube, f"secrets.registryWritePassword={new_pw}")
        if secret(again, USERS) != secret(rotated, USERS) or secret(again, MAIN) != secret(rotated, MAIN):
            raise Failure(f"{name}: the upgrade after a rotation changed the Secrets again")
        log(f"{name}: rotation (secrets.registryWritePassword): the write line re-hashed and verifies, the read "
            "line kept; the next upgrade changes nothing")

        # 4. A password edited by hand in the main Secret.
        edited = json.loads(json.dumps(api.secrets[MAIN]))
        edited["data"]["registry-read-password"] = base64.b64encode(b"edited-by-hand-password").decode()
        api.secrets[MAIN] = edited
        after_edit = render(helm, chart, kube, f"secrets.registryWritePassword={new_pw}")
        third = pairs(after_edit, f"{name}: after a hand edit")
        if third["read"][2] != "edited-by-hand-password" or third["read"][1] == second["read"][1]:
            raise Failure(f"{name}: after a hand edit of registry-read-password the read line was not re-hashed for it")
        if third["write"] != second["write"]:
            raise Failure(f"{name}: a hand edit of the read password changed the write line")
        log(f"{name}: a hand-edited registry-read-password is kept and its line re-hashed (fingerprint mismatch)")
    finally:
        api.server.shutdown()


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__.split("\n\n")[0], file=sys.stderr)
        print("usage: chart_upgrade.py CHART HELM [HELM...]", file=sys.stderr)
        return 2
    chart = Path(sys.argv[1])
    if crypt is None:
        log("WARNING: Python's crypt module is missing: bcrypt pairs are checked by fingerprint only here "
            "(tests/python/chart_runs.py verifies them with the registry)")
    try:
        with tempfile.TemporaryDirectory(prefix="pulse-chart-upgrade.") as tmp:
            for helm in sys.argv[2:]:
                run(helm, chart, Path(tmp))
    except Failure as e:
        log(f"FAIL: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
