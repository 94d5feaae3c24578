//! Unit tests of `compat` (and of `parse`, whose errors they check).

use super::*;
use ChangeKind as K;
use Direction::{Backward as B, Forward as F};

const EVENT_PROTO: &str = include_str!("../../../../proto/pulse/events/v1/event.proto");

fn parse(text: &str) -> ParsedSchema {
    parse_protobuf(text, &[]).unwrap()
}

fn proto3(body: &str) -> ParsedSchema {
    parse(&format!("syntax = \"proto3\";\npackage test.v1;\n{body}"))
}

fn proto2(body: &str) -> ParsedSchema {
    parse(&format!("syntax = \"proto2\";\npackage test.v1;\n{body}"))
}

/// (kind, direction) of each finding of `new` against `[old]` at `level`.
fn findings(level: Level, old: &ParsedSchema, new: &ParsedSchema) -> Vec<(ChangeKind, Direction)> {
    check(level, new, std::slice::from_ref(old))
        .into_iter()
        .map(|i| (i.kind, i.direction))
        .collect()
}

fn assert_compatible_at(levels: &[Level], old: &ParsedSchema, new: &ParsedSchema) {
    for &level in levels {
        let found = check(level, new, std::slice::from_ref(old));
        assert!(found.is_empty(), "{level}: {found:#?}");
    }
}

#[test]
fn identical_schema_is_compatible_at_every_level() {
    let event = parse(EVENT_PROTO);
    let schema = proto3(
        "message A { int32 a = 1; oneof o { string b = 2; bytes c = 3; } enum E { X = 0; } }",
    );
    assert_compatible_at(&Level::ALL, &schema, &schema.clone());
    assert_compatible_at(&Level::ALL, &event, &event.clone());
}

#[test]
fn adding_a_field_is_compatible_at_backward_forward_and_full() {
    let old = proto3("message A { int32 a = 1; }");
    let new = proto3("message A { int32 a = 1; string b = 2; }");
    assert_compatible_at(
        &[
            Level::Backward,
            Level::Forward,
            Level::Full,
            Level::FullTransitive,
        ],
        &old,
        &new,
    );
}

#[test]
fn removing_a_field_without_reserving_its_number_breaks_backward() {
    let old = proto3("message A { int32 a = 1; string b = 2; }");
    let new = proto3("message A { int32 a = 1; }");
    let found = check(Level::Backward, &new, std::slice::from_ref(&old));
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].kind, K::FieldRemovedNotReserved);
    assert_eq!(found[0].direction, B);
    assert_eq!(found[0].location, "test.v1.A.b (field 2)");
    assert_eq!(
        findings(Level::Full, &old, &new),
        [(K::FieldRemovedNotReserved, B)]
    );
}

#[test]
fn removing_a_field_is_never_a_forward_finding() {
    let old = proto3("message A { int32 a = 1; string b = 2; }");
    let new = proto3("message A { int32 a = 1; }");
    assert_compatible_at(&[Level::Forward, Level::ForwardTransitive], &old, &new);
}

#[test]
fn removing_a_field_whose_number_is_reserved_is_compatible_at_backward() {
    let old = proto3("message A { int32 a = 1; string b = 2; int32 c = 7; }");
    let new = proto3("message A { int32 a = 1; reserved 2, 5 to 9; reserved \"b\"; }");
    assert_compatible_at(&[Level::Backward, Level::Full], &old, &new);
    // The range end is inclusive in the text: 9 is reserved, 10 is not.
    let old = proto3("message A { int32 a = 1; int32 j = 10; }");
    let new = proto3("message A { int32 a = 1; reserved 5 to 9; }");
    assert_eq!(
        findings(Level::Backward, &old, &new),
        [(K::FieldRemovedNotReserved, B)]
    );
}

#[test]
fn changing_the_package_breaks_both_directions() {
    let old = parse("syntax = \"proto3\"; package a.v1; message A { int32 a = 1; }");
    let new = parse("syntax = \"proto3\"; package a.v2; message A { int32 a = 1; }");
    let found = findings(Level::Full, &old, &new);
    assert!(found.contains(&(K::PackageChanged, B)), "{found:?}");
    assert!(found.contains(&(K::PackageChanged, F)), "{found:?}");
}

#[test]
fn changing_the_syntax_breaks_both_directions() {
    let old = proto2("message A { optional int32 a = 1; }");
    let new = proto3("message A { int32 a = 1; }");
    assert_eq!(
        findings(Level::Full, &old, &new),
        [(K::SyntaxChanged, B), (K::SyntaxChanged, F)]
    );
}

#[test]
fn a_missing_syntax_means_proto2() {
    let implicit = parse("package test.v1; message A { optional int32 a = 1; }");
    let explicit = proto2("message A { optional int32 a = 1; }");
    assert_compatible_at(&Level::ALL, &implicit, &explicit);
    let p3 = proto3("message A { int32 a = 1; }");
    assert_eq!(
        findings(Level::Backward, &implicit, &p3),
        [(K::SyntaxChanged, B)]
    );
}

#[test]
fn removing_a_message_breaks_backward_and_adding_one_breaks_only_forward() {
    let one = proto3("message A { int32 a = 1; }");
    let two = proto3("message A { int32 a = 1; } message B { int32 b = 1; }");
    assert_eq!(findings(Level::Full, &two, &one), [(K::MessageRemoved, B)]);
    assert_eq!(findings(Level::Full, &one, &two), [(K::MessageRemoved, F)]);
    assert_compatible_at(&[Level::Backward], &one, &two);
}

#[test]
fn removing_an_enum_breaks_backward() {
    let old = proto3("enum E { E_UNSPECIFIED = 0; } message A { int32 a = 1; }");
    let new = proto3("message A { int32 a = 1; }");
    let found = check(Level::Backward, &new, std::slice::from_ref(&old));
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].kind, K::EnumRemoved);
    assert_eq!(found[0].location, "test.v1.E");
}

#[test]
fn removing_an_enum_value_breaks_backward_and_adding_one_breaks_only_forward() {
    let old = proto3("enum E { E_UNSPECIFIED = 0; E_ONE = 1; E_TWO = 2; }");
    let new = proto3("enum E { E_UNSPECIFIED = 0; E_ONE = 1; }");
    let found = check(Level::Full, &new, std::slice::from_ref(&old));
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].kind, K::EnumValueRemoved);
    assert_eq!(found[0].direction, B);
    assert_eq!(found[0].location, "test.v1.E.E_TWO (value 2)");
    assert_eq!(
        findings(Level::Full, &new, &old),
        [(K::EnumValueRemoved, F)]
    );
}

#[test]
fn renaming_an_enum_value_keeps_its_number_and_is_compatible() {
    let old = proto3("enum E { E_UNSPECIFIED = 0; E_ONE = 1; }");
    let new = proto3("enum E { E_UNSPECIFIED = 0; E_FIRST = 1; }");
    assert_compatible_at(&Level::ALL, &old, &new);
}

#[test]
fn reusing_a_field_number_with_another_name_breaks_both_directions() {
    let old = proto3("message A { int32 count = 1; }");
    let new = proto3("message A { int64 total = 1; }");
    let found = check(Level::Full, &new, std::slice::from_ref(&old));
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(
        found
            .iter()
            .all(|i| i.kind == K::FieldNumberReusedWithOtherName)
    );
    assert_eq!(found[0].location, "test.v1.A.total (field 1)");
    assert_eq!(
        found[0].message,
        "field 1 was named count and is now named total"
    );
    assert_eq!(found[1].direction, F);
}

#[test]
fn int32_to_int64_is_compatible() {
    let old = proto3("message A { int32 a = 1; }");
    let new = proto3("message A { int64 a = 1; }");
    assert_compatible_at(&Level::ALL, &old, &new);
}

#[test]
fn int32_to_string_is_not_compatible() {
    let old = proto3("message A { int32 a = 1; }");
    let new = proto3("message A { string a = 1; }");
    assert_eq!(
        findings(Level::Backward, &old, &new),
        [(K::FieldTypeChanged, B)]
    );
    assert_eq!(
        findings(Level::Forward, &old, &new),
        [(K::FieldTypeChanged, F)]
    );
}

#[test]
fn string_to_bytes_is_compatible() {
    let old = proto3("message A { string a = 1; }");
    let new = proto3("message A { bytes a = 1; }");
    assert_compatible_at(&Level::ALL, &old, &new);
}

#[test]
fn types_in_one_wire_group_are_compatible_and_across_groups_are_not() {
    let compatible = [
        ("uint64", "bool"),
        ("sint32", "sint64"),
        ("fixed32", "sfixed32"),
        ("fixed64", "sfixed64"),
        ("E", "int32"),
        ("uint64", "E"),
        ("B", "B"),
    ];
    let incompatible = [
        ("int32", "sint32"),
        ("fixed32", "fixed64"),
        ("float", "double"),
        ("E", "bool"),
        ("E", "E2"),
        ("B", "bytes"),
        ("bytes", "B"),
        ("B", "C"),
        ("fixed32", "int32"),
    ];
    let schema = |ty: &str| {
        proto3(&format!(
            "enum E {{ E_0 = 0; }} enum E2 {{ E2_0 = 0; }} message B {{}} message C {{}} \
             message A {{ {ty} a = 1; }}"
        ))
    };
    for (from, to) in compatible {
        assert_compatible_at(&Level::ALL, &schema(from), &schema(to));
    }
    for (from, to) in incompatible {
        let found = findings(Level::Full, &schema(from), &schema(to));
        assert_eq!(
            found,
            [(K::FieldTypeChanged, B), (K::FieldTypeChanged, F)],
            "{from} -> {to}"
        );
    }
}

#[test]
fn changing_repeated_to_singular_breaks_both_directions() {
    let old = proto3("message A { repeated int32 a = 1; }");
    let new = proto3("message A { int32 a = 1; }");
    assert_eq!(
        findings(Level::Full, &old, &new),
        [(K::FieldLabelChanged, B), (K::FieldLabelChanged, F)]
    );
    assert_eq!(
        findings(Level::Backward, &new, &old),
        [(K::FieldLabelChanged, B)]
    );
}

#[test]
fn adding_or_removing_proto2_required_breaks() {
    let optional = proto2("message A { optional int32 a = 1; }");
    let required = proto2("message A { required int32 a = 1; }");
    let found = check(Level::Backward, &required, std::slice::from_ref(&optional));
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].kind, K::FieldLabelChanged);
    assert_eq!(found[0].message, "field 1 became required");
    assert_eq!(
        findings(Level::Backward, &required, &optional),
        [(K::FieldLabelChanged, B)]
    );
}

#[test]
fn adding_or_removing_proto3_optional_is_compatible() {
    let plain = proto3("message A { int64 a = 1; oneof o { string x = 2; } }");
    let optional = proto3("message A { optional int64 a = 1; oneof o { string x = 2; } }");
    assert_compatible_at(&Level::ALL, &plain, &optional);
    assert_compatible_at(&Level::ALL, &optional, &plain);
}

#[test]
fn moving_a_field_into_an_existing_oneof_breaks_backward() {
    let old = proto3("message A { int32 a = 1; oneof o { string b = 2; } }");
    let new = proto3("message A { oneof o { int32 a = 1; string b = 2; } }");
    let found = check(Level::Backward, &new, std::slice::from_ref(&old));
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].kind, K::FieldMovedIntoExistingOneof);
    assert_eq!(found[0].location, "test.v1.A.a (field 1)");
    // Moving it back out of the oneof is the mirror image: a forward break.
    assert_eq!(
        findings(Level::Forward, &new, &old),
        [(K::FieldMovedIntoExistingOneof, F)]
    );
}

#[test]
fn moving_one_field_into_a_new_oneof_is_compatible_but_moving_two_breaks_backward() {
    let old = proto3("message A { int32 a = 1; string b = 2; }");
    let one = proto3("message A { oneof o { int32 a = 1; } string b = 2; }");
    assert_compatible_at(&[Level::Backward], &old, &one);
    let two = proto3("message A { oneof o { int32 a = 1; string b = 2; } }");
    let found = check(Level::Backward, &two, std::slice::from_ref(&old));
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].kind, K::MultipleFieldsMovedIntoNewOneof);
    assert_eq!(found[0].location, "test.v1.A.o (oneof)");
}

#[test]
fn nested_messages_and_enums_are_matched_by_full_name() {
    let old = proto3(
        "message Outer { message Inner { int32 a = 1; enum Kind { K_0 = 0; K_1 = 1; } } Inner inner = 1; }",
    );
    let changed = proto3(
        "message Outer { message Inner { string a = 1; enum Kind { K_0 = 0; } } Inner inner = 1; }",
    );
    let found = check(Level::Backward, &changed, std::slice::from_ref(&old));
    let described: Vec<String> = found.iter().map(Incompatibility::describe).collect();
    assert_eq!(
        described,
        [
            "backward: test.v1.Outer.Inner.Kind.K_1 (value 1): enum value 1 (K_1) was removed; \
             data written with the old schema may still use it",
            "backward: test.v1.Outer.Inner.a (field 1): field 1 changed type from int32 to \
             string, which is not wire-compatible",
        ]
    );
}

#[test]
fn removing_a_nested_message_reports_only_the_outermost_removed_message() {
    let old = proto3(
        "message Keep { int32 a = 1; } message Outer { message Inner { message Deep {} enum E { E_0 = 0; } } }",
    );
    let without_inner = proto3("message Keep { int32 a = 1; } message Outer {}");
    let found = check(Level::Backward, &without_inner, std::slice::from_ref(&old));
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].kind, K::MessageRemoved);
    assert_eq!(found[0].location, "test.v1.Outer.Inner");
    let without_outer = proto3("message Keep { int32 a = 1; }");
    let found = check(Level::Backward, &without_outer, std::slice::from_ref(&old));
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].location, "test.v1.Outer");
}

#[test]
fn removing_a_reserved_map_field_is_compatible_at_backward() {
    let old = proto3("message A { int32 a = 1; map<string, string> props = 2; }");
    let new = proto3("message A { int32 a = 1; reserved 2; }");
    assert_compatible_at(&[Level::Backward], &old, &new);
}

#[test]
fn transitive_levels_catch_a_break_against_an_older_version_that_the_non_transitive_level_misses() {
    // Type changes cannot show this: wire groups are equivalence classes, so a type change
    // that is compatible step by step is compatible end to end. Number reuse can: v2 removes
    // field 2 and reserves it (compatible with v1), v3 drops the reservation and reuses 2
    // with another name and type. Against v2 that is a plain addition; against v1 it is a
    // reused number of an incompatible type.
    let v1 = proto3("message A { int32 a = 1; int64 b = 2; }");
    let v2 = proto3("message A { int32 a = 1; reserved 2; }");
    let v3 = proto3("message A { int32 a = 1; string c = 2; }");
    let history = [v1, v2];
    for level in [Level::Backward, Level::Full] {
        assert!(check(level, &v3, &history).is_empty(), "{level}");
    }
    let found = check(Level::BackwardTransitive, &v3, &history);
    let kinds: Vec<(ChangeKind, usize)> = found.iter().map(|i| (i.kind, i.against)).collect();
    assert_eq!(
        kinds,
        [
            (K::FieldNumberReusedWithOtherName, 0),
            (K::FieldTypeChanged, 0)
        ]
    );
    let full = check(Level::FullTransitive, &v3, &history);
    assert_eq!(full.len(), 4, "{full:#?}");
    assert!(full.iter().all(|i| i.against == 0));
}

#[test]
fn none_level_and_empty_history_report_nothing() {
    let old = proto3("message A { int32 a = 1; }");
    let new = proto3("message B { string a = 1; }");
    assert!(check(Level::None, &new, std::slice::from_ref(&old)).is_empty());
    for level in Level::ALL {
        assert!(check(level, &new, &[]).is_empty(), "{level}");
    }
}

#[test]
fn findings_are_ordered_by_version_then_direction_then_location() {
    let v1 = proto3("message A { int32 z = 1; int32 y = 2; } message M {}");
    let v2 = proto3("message A { string z = 1; int32 y = 2; }");
    let new = proto3("message A { string z = 1; } message N {}");
    let found = check(Level::FullTransitive, &new, &[v1, v2]);
    let keys: Vec<(usize, Direction, &str)> = found
        .iter()
        .map(|i| (i.against, i.direction, i.location.as_str()))
        .collect();
    assert_eq!(
        keys,
        [
            (0, B, "test.v1.A.y (field 2)"),
            (0, B, "test.v1.A.z (field 1)"),
            (0, B, "test.v1.M"),
            (0, F, "test.v1.A.z (field 1)"),
            (0, F, "test.v1.N"),
            (1, B, "test.v1.A.y (field 2)"),
            (1, F, "test.v1.N"),
        ]
    );
}

#[test]
fn invalid_schema_text_yields_invalid_schema_with_a_line_reference() {
    let err =
        parse_protobuf("syntax = \"proto3\";\nmessage A {\n  int32 a = ;\n}\n", &[]).unwrap_err();
    assert!(err.0.contains("main.proto:3:"), "{err}");
    let err = parse_protobuf(
        "syntax = \"proto3\";\nmessage A {\n  Missing m = 1;\n}\n",
        &[],
    )
    .unwrap_err();
    assert!(
        err.0.contains("main.proto:3:") && err.0.contains("Missing"),
        "{err}"
    );
}

#[test]
fn duplicate_names_are_invalid() {
    let err =
        parse_protobuf("syntax = \"proto3\";\nmessage A {}\nmessage A {}\n", &[]).unwrap_err();
    assert!(err.0.contains("main.proto:3:"), "{err}");
    let err = parse_protobuf(
        "syntax = \"proto3\";\nmessage A {\n  int32 a = 1;\n  int32 b = 1;\n}\n",
        &[],
    )
    .unwrap_err();
    assert!(err.0.contains("main.proto:4:"), "{err}");
}

#[test]
fn an_unresolved_import_yields_invalid_schema_naming_the_import() {
    let err = parse_protobuf(
        "syntax = \"proto3\";\nimport \"pulse/common/missing.proto\";\nmessage A {}\n",
        &[],
    )
    .unwrap_err();
    assert!(err.0.contains("pulse/common/missing.proto"), "{err}");
    assert!(err.0.contains("main.proto:2:"), "{err}");
}

#[test]
fn a_schema_importing_a_given_reference_parses() {
    let money = SchemaSource {
        name: "pulse/common/v1/money.proto",
        text: "syntax = \"proto3\"; package pulse.common.v1; message Money { int64 micros = 1; }",
    };
    let main = "syntax = \"proto3\";\nimport \"pulse/common/v1/money.proto\";\n\
                package test.v1;\nmessage A { pulse.common.v1.Money price = 1; }\n";
    let schema = parse_protobuf(main, &[money]).unwrap();
    assert_eq!(schema.main_file().name(), "main.proto");
    assert_eq!(schema.file_descriptor_set().file.len(), 2);
    let field = &schema.main_file().message_type[0].field[0];
    assert_eq!(field.type_name(), ".pulse.common.v1.Money");
    assert_compatible_at(&Level::ALL, &schema, &schema.clone());
}

#[test]
fn a_reference_named_main_proto_does_not_collide_with_the_subject_schema() {
    let reference = SchemaSource {
        name: "main.proto",
        text: "syntax = \"proto3\"; package other; message Other {}",
    };
    let main = "syntax = \"proto3\"; import \"main.proto\"; message A { other.Other o = 1; }";
    let schema = parse_protobuf(main, &[reference]).unwrap();
    assert_eq!(schema.main_file().name(), "main_1.proto");
}

#[test]
fn a_reference_given_twice_with_different_texts_is_invalid() {
    let a = SchemaSource {
        name: "x.proto",
        text: "syntax = \"proto3\";",
    };
    let b = SchemaSource {
        name: "x.proto",
        text: "syntax = \"proto2\";",
    };
    assert!(parse_protobuf("syntax = \"proto3\";", &[a, b]).is_err());
    assert!(parse_protobuf("syntax = \"proto3\";", &[a, a]).is_ok());
}

#[test]
fn a_schema_importing_google_protobuf_timestamp_parses() {
    let schema = parse_protobuf(
        "syntax = \"proto3\";\nimport \"google/protobuf/timestamp.proto\";\n\
         message A { google.protobuf.Timestamp at = 1; }\n",
        &[],
    )
    .unwrap();
    assert_eq!(
        schema.main_file().message_type[0].field[0].type_name(),
        ".google.protobuf.Timestamp"
    );
}

#[test]
fn the_pulse_event_schema_parses_and_is_compatible_with_itself() {
    let event = parse_protobuf(EVENT_PROTO, &[]).unwrap();
    assert_eq!(event.main_file().package(), "pulse.events.v1");
    assert_compatible_at(&Level::ALL, &event, &event.clone());
}

#[test]
fn changing_amount_micros_to_string_is_rejected_naming_the_field() {
    let old_line = "optional int64 amount_micros = 4;";
    assert!(EVENT_PROTO.contains(old_line));
    let mutated = EVENT_PROTO.replace(old_line, "string amount_micros = 4;");
    let old = parse(EVENT_PROTO);
    let new = parse(&mutated);
    let found = check(Level::Backward, &new, std::slice::from_ref(&old));
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].kind, K::FieldTypeChanged);
    assert_eq!(
        found[0].describe(),
        "backward: pulse.events.v1.Payload.amount_micros (field 4): field 4 changed type \
         from int64 to string, which is not wire-compatible"
    );
}

#[test]
fn all_seven_level_names_round_trip() {
    let names = [
        "NONE",
        "BACKWARD",
        "BACKWARD_TRANSITIVE",
        "FORWARD",
        "FORWARD_TRANSITIVE",
        "FULL",
        "FULL_TRANSITIVE",
    ];
    for name in names {
        let level: Level = name.parse().unwrap();
        assert_eq!(level.to_string(), name);
    }
    assert_eq!(Level::default(), Level::Backward);
}

#[test]
fn lowercase_and_unknown_level_names_are_errors() {
    let err = "backward".parse::<Level>().unwrap_err();
    assert!(
        err.contains("BACKWARD_TRANSITIVE") && err.contains("FULL"),
        "{err}"
    );
    assert!("SOMETHING".parse::<Level>().is_err());
    assert!("".parse::<Level>().is_err());
}
