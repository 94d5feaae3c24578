"""Drives Pulse's schema registry with PyPI's confluent-kafka SchemaRegistryClient, a
client we did not write. Usage: python schema_registry_client.py REGISTRY_URL SUBJECT_PREFIX

Exits 0 when every check holds; otherwise prints the failed check and exits 1.
Run by tests/tests/schema_registry.rs (scripts/test.sh provides the venv)."""

import sys

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

URL, PREFIX = sys.argv[1], sys.argv[2]

V1 = """syntax = "proto3";
package demo.v1;
message Click {
  string user_id = 1;
  int64 at_ms = 2;
}
"""
# Adds a field: BACKWARD compatible.
V2 = V1.replace("  int64 at_ms = 2;\n", "  int64 at_ms = 2;\n  string page = 3;\n")
# Changes field 2 from int64 to string: not wire-compatible.
BROKEN = V1.replace("int64 at_ms = 2;", "string at_ms = 2;")


def expect_error(code, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except SchemaRegistryError as e:
        assert e.error_code == code, f"{fn.__name__}: expected error {code}, got {e.error_code}: {e.error_message}"
        return e
    raise AssertionError(f"{fn.__name__}: expected error {code}, got success")


def main():
    client = SchemaRegistryClient({"url": URL})
    fresh = SchemaRegistryClient({"url": URL})  # no cache: every call reaches the server
    subject = f"{PREFIX}-value"

    id1 = client.register_schema(subject, Schema(V1, "PROTOBUF"))
    assert fresh.register_schema(subject, Schema(V1, "PROTOBUF")) == id1, "identical schema keeps its id"
    got = fresh.get_schema(id1)
    assert got.schema_type == "PROTOBUF" and got.schema_str == V1, got

    assert fresh.test_compatibility(subject, Schema(V2, "PROTOBUF")) is True
    assert fresh.test_compatibility(subject, Schema(BROKEN, "PROTOBUF")) is False
    id2 = fresh.register_schema(subject, Schema(V2, "PROTOBUF"))
    assert id2 != id1
    assert fresh.get_versions(subject) == [1, 2], fresh.get_versions(subject)
    latest = fresh.get_latest_version(subject)
    assert (latest.schema_id, latest.version) == (id2, 2), latest
    looked = fresh.lookup_schema(subject, Schema(V1, "PROTOBUF"))
    assert (looked.schema_id, looked.version) == (id1, 1), looked
    assert subject in fresh.get_subjects()

    e = expect_error(409, fresh.register_schema, subject, Schema(BROKEN, "PROTOBUF"))
    assert "at_ms" in e.error_message, e.error_message
    expect_error(42201, fresh.register_schema, subject, Schema("syntax = \"proto3\"; message {", "PROTOBUF"))
    expect_error(40403, fresh.get_schema, 987654)
    expect_error(40401, fresh.get_versions, f"{PREFIX}-missing")
    expect_error(40402, fresh.get_version, subject, 99)
    expect_error(42203, fresh.set_compatibility, subject, "SOMETIMES")

    assert fresh.set_compatibility(subject, "NONE")["compatibility"] == "NONE"
    assert fresh.get_compatibility(subject) == "NONE"
    fresh.register_schema(subject, Schema(BROKEN, "PROTOBUF"))  # allowed under NONE

    assert fresh.delete_subject(subject) == [1, 2, 3]
    expect_error(40401, fresh.get_versions, subject)
    assert fresh.delete_subject(subject, permanent=True) == [1, 2, 3]
    print("confluent-kafka SchemaRegistryClient: all checks passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}")
        sys.exit(1)
