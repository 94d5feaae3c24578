"""Drives Pulse's schema registry with PyPI's confluent-kafka SchemaRegistryClient, a
client we did not write. Usage: python schema_registry_client.py REGISTRY_URL SUBJECT_PREFIX

With SR_WRITE_USER_INFO and SR_READ_USER_INFO set (`name:password`, from the environment so
no secret is a process argument) the registry is expected to have a credentials file: the
client authenticates with `basic.auth.user.info`; the read user can read but its
registration is refused with 403 (40301), an anonymous client gets 401 (40101), and the
write user does every write.

Exits 0 when every check holds; otherwise prints the failed check and exits 1.
Run by tests/tests/it/schema_registry.rs (scripts/test.sh provides the venv)."""

import os
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


def config(user_info):
    conf = {"url": URL}
    if user_info:
        conf["basic.auth.user.info"] = user_info
    return conf


def check_roles(subject, id1):
    """With credentials: what the read user and an anonymous client may do."""
    reader = SchemaRegistryClient(config(READ_USER_INFO))
    e = expect_error(40301, reader.register_schema, subject, Schema(V2, "PROTOBUF"))
    assert e.http_status_code == 403, e.http_status_code
    expect_error(40301, reader.set_compatibility, subject, "NONE")
    expect_error(40301, reader.delete_subject, subject)
    assert reader.get_versions(subject) == [1], "the refused writes changed nothing"
    got = reader.get_schema(id1)
    assert got.schema_str == V1, got
    assert reader.lookup_schema(subject, Schema(V1, "PROTOBUF")).schema_id == id1
    assert reader.test_compatibility(subject, Schema(V2, "PROTOBUF")) is True
    anonymous = SchemaRegistryClient(config(None))
    e = expect_error(40101, anonymous.get_subjects)
    assert e.http_status_code == 401, e.http_status_code
    wrong = SchemaRegistryClient(config(READ_USER_INFO.split(":", 1)[0] + ":not-the-password"))
    expect_error(40101, wrong.get_versions, subject)


WRITE_USER_INFO = os.environ.get("SR_WRITE_USER_INFO")
READ_USER_INFO = os.environ.get("SR_READ_USER_INFO")


def main():
    client = SchemaRegistryClient(config(WRITE_USER_INFO))
    # no cache: every call reaches the server
    fresh = SchemaRegistryClient(config(WRITE_USER_INFO))
    subject = f"{PREFIX}-value"

    id1 = client.register_schema(subject, Schema(V1, "PROTOBUF"))
    if READ_USER_INFO:
        check_roles(subject, id1)
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
    mode = "with basic auth (read and write users)" if READ_USER_INFO else "anonymous"
    print(f"confluent-kafka SchemaRegistryClient {mode}: all checks passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}")
        sys.exit(1)
