//! Unit tests of `validate`.

use super::*;
use proptest::prelude::*;
use serde_json::{Map, json};

/// 2024-06-01T12:00:00Z.
const NOW: i64 = 1_717_243_200_000;

fn full_event() -> Value {
    json!({
        "event_id": "evt-1",
        "schema_version": 1,
        "event_type": "purchase",
        "key": {"user_id": "user@example.com", "session_id": "s-42"},
        "payload": {
            "page": "/checkout",
            "referrer": "https://example.com/cart",
            "currency": "EUR",
            "amount": "19.99",
            "properties": {"plan": "pro", "ab.variant": "b"}
        },
        "metadata": {
            "event_timestamp": "2024-06-01T13:30:00.123456+02:00",
            "trace_id": "4bf92f3577b34da6",
            "source": "web"
        }
    })
}

fn minimal_event() -> Value {
    json!({
        "schema_version": 1,
        "event_type": "page_view",
        "key": {"user_id": "u1"},
        "metadata": {"event_timestamp": NOW}
    })
}

fn check_with(event: &Value, limits: &Limits) -> Result<Event, FieldError> {
    validate(&serde_json::to_vec(event).unwrap(), NOW, limits)
}

fn check(event: &Value) -> Result<Event, FieldError> {
    check_with(event, &Limits::default())
}

/// Sets the field at a JSON pointer such as `/payload/amount` (creating parents).
fn with(mut event: Value, pointer: &str, new: Value) -> Value {
    let (parent, name) = pointer.rsplit_once('/').unwrap();
    if event.pointer(parent).is_none() {
        event = with(event, parent, json!({}));
    }
    let parent = event.pointer_mut(parent).unwrap();
    parent.as_object_mut().unwrap().insert(name.to_owned(), new);
    event
}

fn without(mut event: Value, pointer: &str) -> Value {
    let (parent, name) = pointer.rsplit_once('/').unwrap();
    let parent = event.pointer_mut(parent).unwrap();
    parent.as_object_mut().unwrap().remove(name);
    event
}

fn rejected(event: &Value, field: &str, code: &str) -> FieldError {
    let err = check(event).unwrap_err();
    assert_eq!((err.field.as_str(), err.code), (field, code), "{err}");
    assert!(!err.reason.is_empty());
    err
}

#[test]
fn valid_full_event_maps_every_field() {
    let event = check(&full_event()).unwrap();
    let expected = Event {
        event_id: "evt-1".to_owned(),
        schema_version: 1,
        event_type: "purchase".to_owned(),
        key: Some(EventKey {
            user_id: "user@example.com".to_owned(),
            session_id: "s-42".to_owned(),
        }),
        payload: Some(Payload {
            page: "/checkout".to_owned(),
            referrer: "https://example.com/cart".to_owned(),
            currency: "EUR".to_owned(),
            amount_micros: Some(19_990_000),
            properties: HashMap::from([
                ("plan".to_owned(), "pro".to_owned()),
                ("ab.variant".to_owned(), "b".to_owned()),
            ]),
        }),
        metadata: Some(Metadata {
            // 13:30:00.123456+02:00 is 11:30:00.123 UTC: 30 minutes before NOW.
            event_timestamp_ms: NOW - 1_800_000 + 123,
            trace_id: "4bf92f3577b34da6".to_owned(),
            source: "web".to_owned(),
        }),
        ingest: None,
    };
    assert_eq!(event, expected);
}

#[test]
fn minimal_event_maps_absent_optionals_to_empty_values_and_derives_an_id() {
    let event = check(&minimal_event()).unwrap();
    assert_eq!(event.event_id, derive_event_id(&minimal_event()));
    assert_eq!(event.key.unwrap().session_id, "");
    assert_eq!(event.payload, None);
    let metadata = event.metadata.unwrap();
    assert_eq!(metadata.event_timestamp_ms, NOW);
    assert_eq!(
        (metadata.trace_id.as_str(), metadata.source.as_str()),
        ("", "")
    );
    assert_eq!(event.ingest, None);
}

#[test]
fn epoch_millisecond_timestamp_is_taken_as_is() {
    let event = with(minimal_event(), "/metadata/event_timestamp", json!(NOW - 5));
    assert_eq!(
        check(&event).unwrap().metadata.unwrap().event_timestamp_ms,
        NOW - 5
    );
}

#[test]
fn rfc3339_timestamps_convert_to_utc_milliseconds_truncating_sub_milliseconds() {
    for (text, expected) in [
        ("2024-06-01T12:00:00Z", NOW),
        ("2024-06-01T12:00:00.999999999Z", NOW + 999),
        ("2024-06-01T14:00:00+02:00", NOW),
        ("2024-06-01T07:30:00-04:30", NOW),
        ("2024-06-01T11:59:59.0005Z", NOW - 1000),
    ] {
        let event = with(minimal_event(), "/metadata/event_timestamp", json!(text));
        let got = check(&event).unwrap().metadata.unwrap().event_timestamp_ms;
        assert_eq!(got, expected, "{text}");
    }
}

#[test]
fn event_larger_than_max_event_bytes_is_rejected_before_it_is_parsed() {
    let limits = Limits {
        max_event_bytes: 10,
        ..Limits::default()
    };
    let err = validate(b"not json at all", NOW, &limits).unwrap_err();
    assert_eq!((err.field.as_str(), err.code), ("", code::EVENT_TOO_LARGE));
    assert!(
        err.reason.contains("15 bytes") && err.reason.contains("10 bytes"),
        "{err}"
    );
    assert!(validate(b"{}", NOW, &limits).is_err_and(|e| e.code != code::EVENT_TOO_LARGE));
}

#[test]
fn a_parsed_event_is_held_to_the_size_of_its_original_encoding_and_the_same_rules() {
    let limits = Limits {
        max_event_bytes: 100,
        ..Limits::default()
    };
    let event = full_event();
    let err = validate_parsed(&event, 101, NOW, &limits).unwrap_err();
    assert_eq!((err.field.as_str(), err.code), ("", code::EVENT_TOO_LARGE));
    assert!(err.reason.contains("101 bytes"), "{err}");
    // Within the limit, the answer is the one the JSON text gets.
    let limits = Limits::default();
    assert_eq!(
        validate_parsed(&event, 100, NOW, &limits),
        validate(&serde_json::to_vec(&event).unwrap(), NOW, &limits)
    );
    let bad = with(minimal_event(), "/event_type", json!("Not-A-Type"));
    assert_eq!(
        validate_parsed(&bad, 10, NOW, &limits).unwrap_err(),
        validate(&serde_json::to_vec(&bad).unwrap(), NOW, &limits).unwrap_err()
    );
}

#[test]
fn bytes_that_are_not_json_are_rejected_as_invalid_json_with_serdes_reason() {
    for raw in [&b""[..], b"{", b"{\"a\":}", b"\xff\xfe", b"{} {}"] {
        let err = validate(raw, NOW, &Limits::default()).unwrap_err();
        assert_eq!((err.field.as_str(), err.code), ("", code::INVALID_JSON));
        assert!(err.reason.contains("line"), "{err}");
    }
}

#[test]
fn json_that_is_not_an_object_is_rejected_as_not_an_object() {
    for raw in ["[]", "[{}]", "1", "\"event\"", "null", "true"] {
        let err = validate(raw.as_bytes(), NOW, &Limits::default()).unwrap_err();
        assert_eq!(
            (err.field.as_str(), err.code),
            ("", code::NOT_AN_OBJECT),
            "{raw}"
        );
    }
}

#[test]
fn unknown_top_level_field_is_rejected_naming_it() {
    let err = rejected(
        &with(minimal_event(), "/user", json!("u1")),
        "user",
        code::UNKNOWN_FIELD,
    );
    assert!(err.reason.contains("event_id, schema_version"), "{err}");
}

#[test]
fn unknown_nested_fields_are_rejected_naming_their_dotted_path() {
    rejected(
        &with(full_event(), "/key/device_id", json!("d")),
        "key.device_id",
        code::UNKNOWN_FIELD,
    );
    rejected(
        &with(full_event(), "/payload/price", json!(1)),
        "payload.price",
        code::UNKNOWN_FIELD,
    );
    rejected(
        &with(full_event(), "/metadata/timestamp", json!(NOW)),
        "metadata.timestamp",
        code::UNKNOWN_FIELD,
    );
}

#[test]
fn unknown_field_names_are_echoed_truncated() {
    let long = "x".repeat(500);
    let err = check(&with(minimal_event(), &format!("/{long}"), json!(1))).unwrap_err();
    assert_eq!(err.code, code::UNKNOWN_FIELD);
    assert_eq!(err.field, format!("{}…", "x".repeat(64)));
}

#[test]
fn unknown_fields_are_reported_before_any_other_problem() {
    let event = json!({"extra": 1, "key": {"nope": 1}});
    rejected(&event, "extra", code::UNKNOWN_FIELD);
    rejected(
        &json!({"key": {"nope": 1}}),
        "key.nope",
        code::UNKNOWN_FIELD,
    );
}

#[test]
fn explicit_event_id_is_kept_as_given() {
    let id = "A-z_0.9:x".to_owned() + &"a".repeat(119);
    let event = with(full_event(), "/event_id", json!(id));
    assert_eq!(check(&event).unwrap().event_id, id);
}

#[test]
fn malformed_event_id_is_rejected_as_invalid_event_id() {
    for id in ["", "has space", "slash/", "é", &"a".repeat(129)] {
        let err = rejected(
            &with(full_event(), "/event_id", json!(id)),
            "event_id",
            code::INVALID_EVENT_ID,
        );
        assert!(err.reason.contains("[A-Za-z0-9._:-]"), "{err}");
    }
    rejected(
        &with(full_event(), "/event_id", json!(7)),
        "event_id",
        code::INVALID_TYPE,
    );
}

#[test]
fn null_event_id_is_treated_as_absent_and_an_id_is_derived() {
    let event = with(minimal_event(), "/event_id", Value::Null);
    assert_eq!(
        check(&event).unwrap().event_id,
        derive_event_id(&minimal_event())
    );
}

#[test]
fn missing_or_null_schema_version_is_rejected_as_missing_field() {
    rejected(
        &without(minimal_event(), "/schema_version"),
        "schema_version",
        code::MISSING_FIELD,
    );
    rejected(
        &with(minimal_event(), "/schema_version", Value::Null),
        "schema_version",
        code::MISSING_FIELD,
    );
}

#[test]
fn schema_version_that_is_not_an_integer_is_rejected_as_invalid_type() {
    for v in [json!("1"), json!(1.0), json!(1.5), json!(true), json!([1])] {
        rejected(
            &with(minimal_event(), "/schema_version", v),
            "schema_version",
            code::INVALID_TYPE,
        );
    }
}

#[test]
fn any_producer_schema_version_from_1_up_is_accepted_and_kept() {
    for v in [1, 2, 3, 33, u32::MAX] {
        let event = with(minimal_event(), "/schema_version", json!(v));
        assert_eq!(check(&event).unwrap().schema_version, v);
    }
}

#[test]
fn schema_version_0_negative_or_beyond_u32_is_rejected_naming_the_field() {
    for (v, says) in [
        (json!(0), "unset value"),
        (json!(-1), "not a version"),
        (json!(u64::MAX), "not a version"),
    ] {
        let err = rejected(
            &with(minimal_event(), "/schema_version", v),
            "schema_version",
            code::UNSUPPORTED_SCHEMA_VERSION,
        );
        assert!(err.reason.contains(says), "{err}");
    }
}

#[test]
fn a_refused_schema_version_is_rejected_naming_the_field_and_the_setting() {
    let limits = Limits {
        refused_schema_versions: "2,4-5".parse().unwrap(),
        ..Limits::default()
    };
    for v in [2, 4, 5] {
        let event = with(minimal_event(), "/schema_version", json!(v));
        let err = check_with(&event, &limits).unwrap_err();
        assert_eq!(
            (err.field.as_str(), err.code),
            ("schema_version", code::UNSUPPORTED_SCHEMA_VERSION)
        );
        assert_eq!(
            err.to_string(),
            format!(
                "schema_version: {v} is refused by this deployment \
                 (--refuse-schema-versions 2,4-5); send the event in a version it accepts"
            )
        );
    }
    for v in [1, 3, 6] {
        let event = with(minimal_event(), "/schema_version", json!(v));
        assert_eq!(check_with(&event, &limits).unwrap().schema_version, v);
    }
}

#[test]
fn missing_event_type_is_rejected_as_missing_field() {
    rejected(
        &without(minimal_event(), "/event_type"),
        "event_type",
        code::MISSING_FIELD,
    );
    rejected(
        &with(minimal_event(), "/event_type", json!(3)),
        "event_type",
        code::INVALID_TYPE,
    );
}

#[test]
fn event_type_not_matching_the_pattern_is_rejected_showing_the_pattern() {
    for t in [
        "",
        "PageView",
        "1st",
        "_x",
        "page-view",
        "page view",
        "pagé",
        &"a".repeat(65),
    ] {
        let err = rejected(
            &with(minimal_event(), "/event_type", json!(t)),
            "event_type",
            code::INVALID_EVENT_TYPE,
        );
        assert!(err.reason.contains(EVENT_TYPE_PATTERN), "{err}");
    }
    for t in ["a", "page_view_2", &"a".repeat(64)] {
        assert!(
            check(&with(minimal_event(), "/event_type", json!(t))).is_ok(),
            "{t}"
        );
    }
}

#[test]
fn missing_key_is_rejected_as_missing_field_and_a_non_object_key_as_invalid_type() {
    rejected(
        &without(minimal_event(), "/key"),
        "key",
        code::MISSING_FIELD,
    );
    rejected(
        &with(minimal_event(), "/key", json!("u1")),
        "key",
        code::INVALID_TYPE,
    );
}

#[test]
fn missing_user_id_is_rejected_naming_key_user_id() {
    rejected(
        &without(minimal_event(), "/key/user_id"),
        "key.user_id",
        code::MISSING_FIELD,
    );
    rejected(
        &with(minimal_event(), "/key/user_id", Value::Null),
        "key.user_id",
        code::MISSING_FIELD,
    );
    rejected(
        &with(minimal_event(), "/key/user_id", json!(42)),
        "key.user_id",
        code::INVALID_TYPE,
    );
}

#[test]
fn malformed_user_id_is_rejected_as_invalid_user_id() {
    for id in ["", "a b", "a/b", "ü", &"u".repeat(129)] {
        let err = rejected(
            &with(minimal_event(), "/key/user_id", json!(id)),
            "key.user_id",
            code::INVALID_USER_ID,
        );
        assert!(err.reason.contains("1..=128"), "{err}");
    }
    let limits = Limits {
        max_user_id_len: 4,
        ..Limits::default()
    };
    let event = with(minimal_event(), "/key/user_id", json!("abcde"));
    assert_eq!(
        check_with(&event, &limits).unwrap_err().code,
        code::INVALID_USER_ID
    );
}

#[test]
fn malformed_session_id_is_rejected_as_invalid_session_id() {
    for id in ["a b", "a#b", &"s".repeat(129)] {
        rejected(
            &with(minimal_event(), "/key/session_id", json!(id)),
            "key.session_id",
            code::INVALID_SESSION_ID,
        );
    }
    rejected(
        &with(minimal_event(), "/key/session_id", json!(1)),
        "key.session_id",
        code::INVALID_TYPE,
    );
    let ok = with(minimal_event(), "/key/session_id", json!("s".repeat(128)));
    assert!(check(&ok).is_ok());
}

#[test]
fn non_object_payload_is_rejected_as_invalid_type() {
    rejected(
        &with(minimal_event(), "/payload", json!([])),
        "payload",
        code::INVALID_TYPE,
    );
}

#[test]
fn page_and_referrer_longer_than_max_string_len_are_rejected_as_too_long() {
    let long = json!("p".repeat(2049));
    rejected(
        &with(full_event(), "/payload/page", long.clone()),
        "payload.page",
        code::TOO_LONG,
    );
    rejected(
        &with(full_event(), "/payload/referrer", long),
        "payload.referrer",
        code::TOO_LONG,
    );
    rejected(
        &with(full_event(), "/payload/page", json!(1)),
        "payload.page",
        code::INVALID_TYPE,
    );
    // The limit counts characters, not bytes.
    let ok = with(full_event(), "/payload/page", json!("é".repeat(2048)));
    assert!(
        check_with(
            &ok,
            &Limits {
                max_event_bytes: 1 << 20,
                ..Limits::default()
            }
        )
        .is_ok()
    );
}

#[test]
fn non_string_property_value_is_rejected_naming_the_property() {
    let event = with(full_event(), "/payload/properties/count", json!(3));
    rejected(&event, "payload.properties.count", code::INVALID_TYPE);
    rejected(
        &with(full_event(), "/payload/properties", json!(["a"])),
        "payload.properties",
        code::INVALID_TYPE,
    );
}

#[test]
fn more_properties_than_max_properties_are_rejected() {
    let props: Map<String, Value> = (0..65).map(|i| (format!("p{i}"), json!("v"))).collect();
    let err = rejected(
        &with(full_event(), "/payload/properties", Value::Object(props)),
        "payload.properties",
        code::TOO_MANY_PROPERTIES,
    );
    assert!(
        err.reason.contains("65") && err.reason.contains("64"),
        "{err}"
    );
}

#[test]
fn property_names_outside_the_allowed_set_are_rejected_as_invalid_property_name() {
    for name in ["", "a b", "a/b", "ä", &"k".repeat(65)] {
        let props = json!({ name: "v" });
        rejected(
            &with(full_event(), "/payload/properties", props),
            "payload.properties",
            code::INVALID_PROPERTY_NAME,
        );
    }
    let ok = json!({ "k".repeat(64): "v", "A-z_0.9": "v" });
    assert!(check(&with(full_event(), "/payload/properties", ok)).is_ok());
}

#[test]
fn property_value_longer_than_max_string_len_is_rejected_as_too_long() {
    let event = with(
        full_event(),
        "/payload/properties/plan",
        json!("v".repeat(2049)),
    );
    rejected(&event, "payload.properties.plan", code::TOO_LONG);
}

#[test]
fn amount_that_is_not_an_exact_decimal_is_rejected_naming_payload_amount() {
    for (amount, hint) in [
        (json!("abc"), "not a decimal"),
        (json!("1.2345678"), "more than 6 decimal places"),
        (json!(0.1234567), "more than 6 decimal places"),
        (json!("1e20"), "too large"),
        (json!(true), "number or a decimal string"),
    ] {
        let err = rejected(
            &with(full_event(), "/payload/amount", amount),
            "payload.amount",
            code::INVALID_AMOUNT,
        );
        assert!(err.reason.contains(hint), "{err}");
    }
}

#[test]
fn negative_amount_is_rejected_as_invalid_amount() {
    let err = rejected(
        &with(full_event(), "/payload/amount", json!(-1)),
        "payload.amount",
        code::INVALID_AMOUNT,
    );
    assert_eq!(err.reason, "must be >= 0");
}

#[test]
fn amount_as_json_number_converts_to_micros() {
    let event = with(full_event(), "/payload/amount", json!(12.34));
    assert_eq!(
        check(&event).unwrap().payload.unwrap().amount_micros,
        Some(12_340_000)
    );
    let event = with(full_event(), "/payload/amount", json!(0));
    assert_eq!(
        check(&event).unwrap().payload.unwrap().amount_micros,
        Some(0)
    );
}

#[test]
fn amount_without_currency_is_rejected_naming_payload_currency() {
    let event = without(full_event(), "/payload/currency");
    let err = rejected(&event, "payload.currency", code::MISSING_FIELD);
    assert!(err.reason.contains("payload.amount"), "{err}");
    rejected(
        &with(full_event(), "/payload/currency", Value::Null),
        "payload.currency",
        code::MISSING_FIELD,
    );
}

#[test]
fn currency_that_is_not_an_active_iso_4217_code_is_rejected_as_invalid_currency() {
    for c in ["eur", "EURO", "EU", "", "E1R", "ÉUR", "ABC", "HRK", "XYZ"] {
        rejected(
            &with(full_event(), "/payload/currency", json!(c)),
            "payload.currency",
            code::INVALID_CURRENCY,
        );
    }
    rejected(
        &with(full_event(), "/payload/currency", json!(978)),
        "payload.currency",
        code::INVALID_TYPE,
    );
    for c in ["USD", "JPY", "CHF", "XAU", "ZWG", "XCG"] {
        assert!(
            check(&with(full_event(), "/payload/currency", json!(c))).is_ok(),
            "{c}"
        );
    }
}

#[test]
fn currency_without_amount_must_still_be_a_valid_code() {
    let event = without(full_event(), "/payload/amount");
    let payload = check(&event).unwrap().payload.unwrap();
    assert_eq!(
        (payload.currency.as_str(), payload.amount_micros),
        ("EUR", None)
    );
    let event = with(event, "/payload/currency", json!("usd"));
    rejected(&event, "payload.currency", code::INVALID_CURRENCY);
}

#[test]
fn missing_metadata_is_rejected_as_missing_field_and_non_object_as_invalid_type() {
    rejected(
        &without(minimal_event(), "/metadata"),
        "metadata",
        code::MISSING_FIELD,
    );
    rejected(
        &with(minimal_event(), "/metadata", json!(NOW)),
        "metadata",
        code::INVALID_TYPE,
    );
}

#[test]
fn missing_event_timestamp_is_rejected_as_missing_field() {
    let event = without(minimal_event(), "/metadata/event_timestamp");
    rejected(&event, "metadata.event_timestamp", code::MISSING_FIELD);
}

#[test]
fn timestamp_neither_rfc3339_nor_integer_epoch_ms_is_rejected_as_invalid_timestamp() {
    for ts in [
        json!(1_717_243_200_000.5),
        json!(1.7e12),
        json!(u64::MAX),
        json!("2024-06-01"),
        json!("2024-06-01 12:00:00"),
        json!("2024-06-01T12:00:00"),
        json!("yesterday"),
        json!(""),
        json!(true),
        json!({}),
    ] {
        let event = with(minimal_event(), "/metadata/event_timestamp", ts.clone());
        let err = rejected(&event, "metadata.event_timestamp", code::INVALID_TIMESTAMP);
        assert!(err.reason.contains("RFC 3339"), "{ts}: {err}");
    }
}

#[test]
fn timestamp_further_ahead_than_the_allowed_skew_is_rejected_naming_the_limit() {
    let skew = Limits::default().max_future_skew_ms;
    let at_limit = with(
        minimal_event(),
        "/metadata/event_timestamp",
        json!(NOW + skew),
    );
    assert!(check(&at_limit).is_ok());
    let beyond = with(
        minimal_event(),
        "/metadata/event_timestamp",
        json!(NOW + skew + 1),
    );
    let err = rejected(
        &beyond,
        "metadata.event_timestamp",
        code::TIMESTAMP_IN_FUTURE,
    );
    assert!(err.reason.contains("300000 ms"), "{err}");
    let far = with(
        minimal_event(),
        "/metadata/event_timestamp",
        json!(i64::MAX),
    );
    rejected(&far, "metadata.event_timestamp", code::TIMESTAMP_IN_FUTURE);
}

#[test]
fn timestamp_older_than_max_age_is_rejected_naming_the_limit() {
    let max_age = Limits::default().max_age_ms;
    let at_limit = with(
        minimal_event(),
        "/metadata/event_timestamp",
        json!(NOW - max_age),
    );
    assert!(check(&at_limit).is_ok());
    let older = with(
        minimal_event(),
        "/metadata/event_timestamp",
        json!(NOW - max_age - 1),
    );
    let err = rejected(&older, "metadata.event_timestamp", code::TIMESTAMP_TOO_OLD);
    assert!(err.reason.contains("604800000 ms"), "{err}");
    let ancient = with(
        minimal_event(),
        "/metadata/event_timestamp",
        json!(i64::MIN),
    );
    rejected(
        &ancient,
        "metadata.event_timestamp",
        code::TIMESTAMP_TOO_OLD,
    );
    let rfc = with(
        minimal_event(),
        "/metadata/event_timestamp",
        json!("0001-01-01T00:00:00Z"),
    );
    rejected(&rfc, "metadata.event_timestamp", code::TIMESTAMP_TOO_OLD);
}

#[test]
fn trace_id_and_source_longer_than_128_are_rejected_as_too_long() {
    let long = json!("t".repeat(129));
    rejected(
        &with(full_event(), "/metadata/trace_id", long.clone()),
        "metadata.trace_id",
        code::TOO_LONG,
    );
    rejected(
        &with(full_event(), "/metadata/source", long),
        "metadata.source",
        code::TOO_LONG,
    );
    rejected(
        &with(full_event(), "/metadata/source", json!(["web"])),
        "metadata.source",
        code::INVALID_TYPE,
    );
    assert!(
        check(&with(
            full_event(),
            "/metadata/trace_id",
            json!("t".repeat(128))
        ))
        .is_ok()
    );
}

#[test]
fn null_optional_fields_are_treated_as_absent() {
    let mut event = full_event();
    for pointer in [
        "/key/session_id",
        "/payload/page",
        "/payload/referrer",
        "/payload/properties",
        "/payload/amount",
        "/payload/currency",
        "/metadata/trace_id",
        "/metadata/source",
    ] {
        event = with(event, pointer, Value::Null);
    }
    let mapped = check(&event).unwrap();
    assert_eq!(mapped.key.unwrap().session_id, "");
    assert_eq!(mapped.payload, Some(Payload::default()));
    let metadata = mapped.metadata.unwrap();
    assert_eq!(
        (metadata.trace_id.as_str(), metadata.source.as_str()),
        ("", "")
    );
    let no_payload = with(minimal_event(), "/payload", Value::Null);
    assert_eq!(check(&no_payload).unwrap().payload, None);
}

#[test]
fn the_first_error_in_the_fixed_order_is_reported() {
    let mut event = full_event();
    let steps = [
        ("/metadata/source", json!(1), "metadata.source"),
        (
            "/metadata/event_timestamp",
            json!("x"),
            "metadata.event_timestamp",
        ),
        ("/payload/currency", json!("x"), "payload.currency"),
        ("/payload/amount", json!("x"), "payload.amount"),
        ("/payload/properties", json!(1), "payload.properties"),
        ("/payload/referrer", json!(1), "payload.referrer"),
        ("/payload/page", json!(1), "payload.page"),
        ("/key/session_id", json!("#"), "key.session_id"),
        ("/key/user_id", json!("#"), "key.user_id"),
        ("/event_type", json!("#"), "event_type"),
        ("/schema_version", json!(0), "schema_version"),
        ("/event_id", json!("#"), "event_id"),
        ("/payload/zzz", json!(1), "payload.zzz"),
        ("/key/zzz", json!(1), "key.zzz"),
        ("/zzz", json!(1), "zzz"),
    ];
    for (pointer, bad, field) in steps {
        event = with(event, pointer, bad);
        assert_eq!(check(&event).unwrap_err().field, field);
    }
}

#[test]
fn derived_id_is_d_dash_and_32_lowercase_hex_characters() {
    let id = derive_event_id(&minimal_event());
    let hex_part = id.strip_prefix("d-").unwrap();
    assert_eq!(hex_part.len(), 32);
    assert!(
        hex_part
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    );
}

#[test]
fn the_same_event_with_keys_in_a_different_order_gets_the_same_id() {
    let a = br#"{"schema_version":1,"event_type":"page_view","key":{"user_id":"u1","session_id":"s"},"metadata":{"event_timestamp":1717243200000,"source":"web"}}"#;
    let b = br#"{ "metadata": {"source": "web", "event_timestamp": 1717243200000},
                  "key": {"session_id": "s", "user_id": "u1"},
                  "event_type": "page_view", "schema_version": 1 }"#;
    let limits = Limits::default();
    let (a, b) = (
        validate(a, NOW, &limits).unwrap(),
        validate(b, NOW, &limits).unwrap(),
    );
    assert!(a.event_id.starts_with("d-"));
    assert_eq!(a.event_id, b.event_id);
}

#[test]
fn any_field_change_gives_a_different_id() {
    let base = check(&without(full_event(), "/event_id")).unwrap().event_id;
    let changes = [
        ("/schema_version", json!(2)),
        ("/event_type", json!("purchase2")),
        ("/key/user_id", json!("other")),
        ("/key/session_id", json!("s-43")),
        ("/payload/page", json!("/checkout2")),
        ("/payload/referrer", json!("")),
        ("/payload/currency", json!("USD")),
        ("/payload/amount", json!("19.98")),
        ("/payload/properties/plan", json!("free")),
        ("/metadata/event_timestamp", json!(NOW)),
        ("/metadata/trace_id", json!("x")),
        ("/metadata/source", json!("ios")),
    ];
    for (pointer, new) in changes {
        let changed = with(without(full_event(), "/event_id"), pointer, new);
        assert_ne!(derive_event_id(&changed), base, "{pointer}");
    }
}

#[test]
fn derived_id_ignores_the_event_id_field() {
    let with_id = full_event();
    assert_eq!(
        derive_event_id(&with_id),
        derive_event_id(&without(full_event(), "/event_id"))
    );
}

#[test]
fn canonical_text_equals_serde_jsons_sorted_compact_output() {
    let value = json!({
        "z": [1, -2, 3.5, 1e300, null, true, false],
        "a": {"y": "quote\" back\\ nl\n tab\t cr\r bs\u{8} ff\u{c} nul\u{0} us\u{1f} del\u{7f} é 😀"},
        "m": {}
    });
    let mut text = String::new();
    write_canonical(&json::Json::from_value(&value), false, &mut text);
    assert_eq!(text, serde_json::to_string(&value).unwrap());
}

/// The id derived while validating the event's bytes (parsed as `json::Json`) is the one
/// `derive_event_id` gives for its `serde_json::Value`: escapes, a repeated key (the last
/// value counts), numbers and nesting alike.
#[test]
fn the_derived_id_of_the_bytes_equals_derive_event_id_of_the_value() {
    let text = format!(
        r#"{{"schema_version":1,"event_type":"page_view","event_type":"click",
            "key":{{"user_id":"u\u0031","session_id":"s"}},
            "payload":{{"page":"/a\"b","properties":{{"z":"1","a":"\u00e9"}},"amount":12.50,"currency":"EUR"}},
            "metadata":{{"event_timestamp":{NOW},"source":"web"}}}}"#
    );
    let event = validate(text.as_bytes(), NOW, &Limits::default()).unwrap();
    let value: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(event.event_id, derive_event_id(&value));
    assert_eq!(
        event.event_type, "click",
        "a repeated key's last value counts"
    );
    assert_eq!(event.key.unwrap().user_id, "u1");
}

#[test]
fn field_error_displays_field_and_reason() {
    let err = FieldError::new("payload.amount", code::INVALID_AMOUNT, "must be >= 0");
    assert_eq!(err.to_string(), "payload.amount: must be >= 0");
    let whole = FieldError::new("", code::INVALID_JSON, "event is not valid JSON");
    assert_eq!(whole.to_string(), "event is not valid JSON");
}

#[test]
fn default_limits_match_the_documented_values() {
    let l = Limits::default();
    assert!(l.refused_schema_versions.is_empty());
    assert_eq!((l.max_future_skew_ms, l.max_age_ms), (300_000, 604_800_000));
    assert_eq!((l.max_event_bytes, l.max_user_id_len), (32_768, 128));
    assert_eq!((l.max_properties, l.max_string_len), (64, 2048));
}

#[test]
fn currency_list_is_sorted_unique_and_three_uppercase_letters() {
    assert!(ISO_4217.windows(2).all(|w| w[0] < w[1]));
    assert!(
        ISO_4217
            .iter()
            .all(|c| c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()))
    );
    assert!(ISO_4217.len() > 170, "{}", ISO_4217.len());
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        ".{0,12}".prop_map(Value::String),
        prop::sample::select(vec![
            "u1",
            "EUR",
            "usd",
            "page_view",
            "19.99",
            "-1",
            "1e400",
            "2024-06-01T12:00:00Z",
            "2024-06-01T12:00:00+99:00",
            "9999-12-31T23:59:59Z",
        ])
        .prop_map(|s| Value::String(s.to_owned())),
    ];
    let key = prop_oneof![
        prop::sample::select(
            [TOP_FIELDS, KEY_FIELDS, PAYLOAD_FIELDS, METADATA_FIELDS]
                .concat()
                .into_iter()
                .chain(["event_timestamp"])
                .collect::<Vec<_>>()
        )
        .prop_map(str::to_owned),
        ".{0,8}",
    ];
    leaf.prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn assert_well_formed(result: &Result<Event, FieldError>) {
    match result {
        Ok(event) => {
            assert!(!event.event_id.is_empty());
            assert!(event.ingest.is_none());
        }
        Err(err) => {
            assert!(!err.reason.is_empty(), "{err:?}");
            assert!(!err.code.is_empty(), "{err:?}");
        }
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..512)) {
        assert_well_formed(&validate(&raw, NOW, &Limits::default()));
    }

    #[test]
    fn arbitrary_json_values_never_panic(value in arb_json()) {
        let raw = serde_json::to_vec(&value).unwrap();
        assert_well_formed(&validate(&raw, NOW, &Limits::default()));
        let _ = derive_event_id(&value);
    }

    #[test]
    fn arbitrary_values_in_any_field_of_a_valid_event_never_panic(
        pointer in prop::sample::select(vec![
            "/event_id", "/schema_version", "/event_type", "/key", "/key/user_id",
            "/key/session_id", "/payload", "/payload/page", "/payload/referrer",
            "/payload/currency", "/payload/amount", "/payload/properties",
            "/payload/properties/plan", "/metadata", "/metadata/event_timestamp",
            "/metadata/trace_id", "/metadata/source",
        ]),
        value in arb_json(),
        now in any::<i64>(),
    ) {
        let raw = serde_json::to_vec(&with(full_event(), pointer, value)).unwrap();
        assert_well_formed(&validate(&raw, now, &Limits::default()));
        let extreme = Limits {
            refused_schema_versions: "0-4294967295".parse().unwrap(),
            max_future_skew_ms: i64::MAX,
            max_age_ms: i64::MIN,
            max_event_bytes: usize::MAX,
            max_user_id_len: 0,
            max_properties: 0,
            max_string_len: 0,
        };
        assert_well_formed(&validate(&raw, now, &extreme));
    }
}
