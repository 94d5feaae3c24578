"""The local stack's schema registry refuses anonymous and read-only writes (issue #17: an
anonymous `PUT /config/<subject>` was answered 200 on `scripts/dev.sh up`'s registry),
checked on a running stack:

- `dev.sh up` made the registry's users in `$PULSE_STATE/registry-auth/`: a password file
  per user (`pulse-read`, `pulse-write`) and the users file, none readable by others;
- on a subject of its own (a unique name, its config removed at the end), whose
  compatibility the write user sets to FULL first: an anonymous `PUT /config/<subject>`
  is answered 401 with a `WWW-Authenticate: Basic` challenge, the write user with a wrong
  password 401, the read user 403, and after each the read user's GET still shows FULL;
  the write user's PUT is answered 200 and the GET then shows NONE;
- reads need a user too: an anonymous `GET /subjects` is 401, the read user's lists the
  subjects `dev.sh up` registered (as the write user) — the events subject among them;
- optionally, the `dev.sh up` banner names the passwords' folder (`banner_problems`).

No platform of its own: the chaos suite (tests/python/chaos.py, run by scripts/test.sh via
scripts/chaos.sh) calls `check` on its stack right after `dev.sh up`. By hand, against a
running stack (PULSE_STATE and PULSE_SCHEMA_REGISTRY_PORT as given to dev.sh, defaults
otherwise): `python3 tests/python/devsh_registry_auth.py`; exits 1 naming each problem.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
READ_USER, WRITE_USER = "pulse-read", "pulse-write"
EVENTS_SUBJECT = "pulse.events.v1-value"
CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


def auth_dir(env: Mapping[str, str]) -> Path:
    """Where dev.sh keeps the registry's credentials (scripts/dev.sh, REGISTRY_AUTH_DIR)."""
    return Path(env.get("PULSE_STATE") or REPO / ".pulse") / "registry-auth"


def registry_url(env: Mapping[str, str]) -> str:
    return f"http://127.0.0.1:{env.get('PULSE_SCHEMA_REGISTRY_PORT') or 8081}"


def password(env: Mapping[str, str], user: str) -> str:
    """The password dev.sh made for `user` (OSError when there is none)."""
    return (auth_dir(env) / f"{user}.password").read_text().strip()


def basic(user: str, secret: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def call(url: str, method: str = "GET", body: dict | None = None,
         headers: Mapping[str, str] | None = None) -> tuple[int, dict, str]:
    """(status, response headers, body text) of one request; status 0 when no answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": CONTENT_TYPE, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode(errors="replace")
    except OSError as e:  # refused, reset, timeout
        return 0, {}, str(e)


def file_problems(env: Mapping[str, str]) -> list[str]:
    """The credentials files exist and only their owner may read them."""
    problems = []
    folder = auth_dir(env)
    for name in (f"{READ_USER}.password", f"{WRITE_USER}.password", "users"):
        path = folder / name
        try:
            st = path.stat()
        except OSError as e:
            problems.append(f"no {path} ({e.strerror}): dev.sh up makes it (PULSE_DEV_REGISTRY_AUTH=0 set?)")
            continue
        if st.st_size == 0:
            problems.append(f"{path} is empty")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            problems.append(f"{path} has mode {stat.S_IMODE(st.st_mode):o}: others than its owner may read it (want 600)")
    return problems


def check(env: Mapping[str, str] | None = None) -> list[str]:
    """The problems of the running stack's registry auth (see the module's docstring)."""
    env = os.environ if env is None else env
    problems = file_problems(env)
    try:
        read_pw, write_pw = password(env, READ_USER), password(env, WRITE_USER)
    except OSError:
        return problems  # named by file_problems
    base = registry_url(env)
    read, write = basic(READ_USER, read_pw), basic(WRITE_USER, write_pw)
    subject = f"pulse-auth-check-{uuid.uuid4().hex[:12]}-value"
    config = f"{base}/config/{subject}"

    def level() -> str:
        code, _, text = call(config, headers=read)
        if code != 200:
            return f"<GET as {READ_USER} answered {code}: {text[:200]}>"
        return json.loads(text).get("compatibilityLevel", f"<no compatibilityLevel in {text[:200]}>")

    code, _, text = call(config, "PUT", {"compatibility": "FULL"}, write)
    if code != 200:
        return problems + [f"PUT {config} FULL as {WRITE_USER} answered {code}, not 200: {text[:300]}"]
    if (got := level()) != "FULL":
        return problems + [f"after the write user set FULL, GET {config} shows {got}"]

    refused = [
        ("anonymously", {}, 401),
        (f"as {WRITE_USER} with a wrong password", basic(WRITE_USER, write_pw + "-wrong"), 401),
        (f"as {READ_USER} (read role)", read, 403),
    ]
    for who, headers, want in refused:
        code, resp_headers, text = call(config, "PUT", {"compatibility": "NONE"}, headers)
        if code != want:
            problems.append(f"PUT {config} NONE {who} answered {code}, not {want}: {text[:200]}")
        challenge = {k.lower(): v for k, v in resp_headers.items()}.get("www-authenticate", "")
        if want == 401 and code == 401 and not challenge.lower().startswith("basic"):
            problems.append(f"the 401 to PUT {config} {who} has no 'WWW-Authenticate: Basic' challenge")
        if (got := level()) != "FULL":
            problems.append(f"PUT {config} NONE {who} changed the compatibility: FULL -> {got}")

    code, _, text = call(f"{base}/subjects")
    if code != 401:
        problems.append(f"an anonymous GET /subjects answered {code}, not 401: {text[:200]}")
    code, _, text = call(f"{base}/subjects", headers=read)
    if code != 200 or EVENTS_SUBJECT not in text:
        problems.append(f"GET /subjects as {READ_USER} answered {code} without {EVENTS_SUBJECT}: {text[:300]}")

    code, _, text = call(config, "PUT", {"compatibility": "NONE"}, write)
    if code != 200:
        problems.append(f"PUT {config} NONE as {WRITE_USER} answered {code}, not 200: {text[:200]}")
    elif (got := level()) != "NONE":
        problems.append(f"PUT {config} NONE as {WRITE_USER} answered 200 but GET shows {got}")
    code, _, text = call(config, "DELETE", headers=write)
    if code != 200:
        problems.append(f"DELETE {config} as {WRITE_USER} (clean-up) answered {code}: {text[:200]}")
    return problems


def banner_problems(up_log: str, env: Mapping[str, str] | None = None) -> list[str]:
    """The `dev.sh up` banner's schema-registry line says where the credentials are."""
    env = os.environ if env is None else env
    lines = [x for x in up_log.splitlines() if x.startswith("  Schema registry ")]
    if not lines:
        return ["the dev.sh up banner has no 'Schema registry' line"]
    folder = str(auth_dir(env))
    if folder not in lines[-1] or READ_USER not in lines[-1] or WRITE_USER not in lines[-1]:
        return [f"the banner's 'Schema registry' line does not name the users and {folder}: {lines[-1].strip()!r}"]
    return []


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    problems = check()
    for p in problems:
        print(f"registry auth: {p}")
    if not problems:
        print(f"registry auth: anonymous and read-only writes refused, the write user's applied ({registry_url(os.environ)})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
