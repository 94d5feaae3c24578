"""Validates rendered Helm manifests offline against the Kubernetes API schemas
(kubernetes-validate, strict: unknown fields are errors) for several Kubernetes versions.

Custom resources (ServiceMonitor, PrometheusRule, KEDA's ScaledObject) have no schema in
kubernetes-validate: for those kinds only, schema validation is skipped and replaced by a
structural check (apiVersion, metadata.name, spec). Any other kind without a schema is an
error (a typo in apiVersion must not pass silently). Before the real files, a known-bad
Deployment is validated and must be refused, so a validator that accepts everything fails.

    python tests/python/chart_validate.py 1.33,1.35 rendered/*.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

import kubernetes_validate
import yaml

CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("keda.sh/v1alpha1", "ScaledObject"),
}

BAD = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "bad"},
    "spec": {
        "replicas": "two",
        "selector": {"matchLabels": {"a": "b"}},
        "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i", "bogus": 1}]}},
    },
}


def problems(doc: dict, version: str) -> list[str]:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CUSTOM_KINDS:
        missing = [f for f in ("metadata", "spec") if not isinstance(doc.get(f), dict)]
        if not missing and not doc["metadata"].get("name"):
            missing.append("metadata.name")
        return [f"missing {m}" for m in missing]
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        return [f"{where}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"no schema for {key[1]} {key[0]} in Kubernetes {version}: {e}"]
    return []


def main(argv: list[str]) -> int:
    versions = argv[1].split(",")
    for v in versions:
        if not problems(BAD, v):
            print(f"kubernetes-validate accepted a broken Deployment for {v}", file=sys.stderr)
            return 1
    failures = 0
    for path in map(Path, argv[2:]):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        kinds: dict[str, int] = {}
        for doc in docs:
            kinds[doc.get("kind", "?")] = kinds.get(doc.get("kind", "?"), 0) + 1
            for v in versions:
                for p in problems(doc, v):
                    failures += 1
                    name = doc.get("metadata", {}).get("name", "?")
                    print(f"{path.name}: {doc.get('kind')} {name} (Kubernetes {v}): {p}", file=sys.stderr)
        skipped = sum(n for (_, k), n in ((c, kinds.get(c[1], 0)) for c in CUSTOM_KINDS))
        print(
            f"{path.name}: {len(docs)} objects validated for {', '.join(versions)}"
            + (f" ({skipped} custom resources checked structurally only)" if skipped else "")
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
