//! Compatibility checking of protobuf schemas for the schema registry: a new schema against
//! the earlier versions of its subject at a Confluent [`Level`] ([`check`]).
//!
//! Parsing schema texts into [`ParsedSchema`] is `parse`'s; storage of schemas, subjects,
//! versions and configured levels, the HTTP API and the mapping of findings to Confluent
//! error bodies are the rest of the service's. It does no I/O.
//!
//! # Compatibility semantics
//!
//! A structural diff `diff(original, update)` compares the *main* files of two schemas (the
//! subject's own text; referenced files are not diffed — they are subjects of their own, and a
//! field whose type lives in a reference is compared by the type's fully-qualified name).
//! Messages, including nested messages, and enums, including nested enums, are matched by
//! fully-qualified name; fields are matched by **number**; enum values by number.
//!
//! * `BACKWARD` = `diff(old, new)`: readers using the new schema read data written with the old one.
//! * `FORWARD` = `diff(new, old)`: readers using the old schema read data written with the new one.
//! * `FULL` = both.
//! * The non-transitive levels compare with the latest previous version only; the `*_TRANSITIVE`
//!   levels compare with every previous version. `NONE`, or a subject without versions, reports
//!   nothing.
//!
//! Changes that are incompatible when they appear in `diff(original, update)` ([`ChangeKind`]):
//!
//! 1. the package changed ([`ChangeKind::PackageChanged`]); the syntax changed, a missing
//!    `syntax` counting as `proto2` ([`ChangeKind::SyntaxChanged`]);
//! 2. a message of `original` is missing from `update` ([`ChangeKind::MessageRemoved`]), likewise
//!    an enum ([`ChangeKind::EnumRemoved`]) and an enum value number
//!    ([`ChangeKind::EnumValueRemoved`]). A nested message or enum whose enclosing message is
//!    itself missing is not reported again, and synthetic map-entry messages are left to the rules
//!    of the map field that owns them;
//! 3. a field number present in both with another name
//!    ([`ChangeKind::FieldNumberReusedWithOtherName`]);
//! 4. a field number present in both whose type is not wire-compatible
//!    ([`ChangeKind::FieldTypeChanged`]). Wire-compatible groups: `{int32, uint32, int64, uint64,
//!    bool}`; `{sint32, sint64}`; `{fixed32, sfixed32}`; `{fixed64, sfixed64}`; `{string, bytes}`.
//!    An enum is compatible with `int32`, `uint32`, `int64` and `uint64`, and with the same enum
//!    (same fully-qualified name); a message (or group) only with the same message type;
//!    `float` and `double` only with themselves. `bytes` <-> message is reported;
//! 5. repeated <-> non-repeated, and (proto2) a `required` label added or removed
//!    ([`ChangeKind::FieldLabelChanged`]). Adding or removing proto3 `optional` is compatible;
//! 6. a field moved into a oneof that already existed in `original`
//!    ([`ChangeKind::FieldMovedIntoExistingOneof`]), and two or more existing fields moved into a
//!    new oneof ([`ChangeKind::MultipleFieldsMovedIntoNewOneof`]): data written with `original`
//!    may set several of them, and a reader keeps only one. Synthetic oneofs of proto3 `optional`
//!    fields are not oneofs for these rules.
//!
//! Special rule, removed field whose number is not reserved
//! ([`ChangeKind::FieldRemovedNotReserved`]): a field number of the **old** schema that the new
//! schema neither uses nor covers with a `reserved` range is incompatible. It is evaluated only on
//! the old -> new transition, i.e. only as a [`Direction::Backward`] finding (levels `BACKWARD`,
//! `FULL` and their transitive forms) and never as a forward finding, so adding a field is
//! compatible at every level. Removing a field whose number is reserved is compatible.
//!
//! Additions are compatible in the direction where they are additions. Because rule 2 applies to
//! both directions, adding a message, an enum or an enum value is reported by `FORWARD` and `FULL`
//! (readers using the old schema do not know it); adding a field is not (see the special rule).
//!
//! Not diffed: services, extensions, options, comments, field defaults and JSON names.
//!
//! Findings are ordered by the index of the earlier version (`against`), then direction
//! (backward first), then location.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{
    DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorProto,
};

pub use crate::parse::{InvalidSchema, ParsedSchema, SchemaSource, parse_protobuf};

/// Compatibility levels, Confluent names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Level {
    /// No checks.
    None,
    /// The new schema reads data written with the latest version.
    #[default]
    Backward,
    /// The new schema reads data written with every version.
    BackwardTransitive,
    /// The latest version reads data written with the new schema.
    Forward,
    /// Every version reads data written with the new schema.
    ForwardTransitive,
    /// Backward and forward against the latest version.
    Full,
    /// Backward and forward against every version.
    FullTransitive,
}

impl Level {
    /// All levels, in Confluent's documentation order.
    pub const ALL: [Level; 7] = [
        Level::None,
        Level::Backward,
        Level::BackwardTransitive,
        Level::Forward,
        Level::ForwardTransitive,
        Level::Full,
        Level::FullTransitive,
    ];

    /// The Confluent name, e.g. `"BACKWARD_TRANSITIVE"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::None => "NONE",
            Level::Backward => "BACKWARD",
            Level::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Level::Forward => "FORWARD",
            Level::ForwardTransitive => "FORWARD_TRANSITIVE",
            Level::Full => "FULL",
            Level::FullTransitive => "FULL_TRANSITIVE",
        }
    }
}

impl FromStr for Level {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Level::ALL
            .into_iter()
            .find(|level| level.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Level::ALL.iter().map(|l| l.as_str()).collect();
                format!(
                    "unknown compatibility level '{s}'; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One reason two schemas are incompatible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incompatibility {
    /// Which rule was broken.
    pub kind: ChangeKind,
    /// Where: fully-qualified element, e.g. `"pulse.events.v1.Payload.amount_micros (field 4)"`.
    /// Elements present in the new schema are named as the new schema names them.
    pub location: String,
    /// Human-readable reason, e.g.
    /// `"field 4 changed type from int64 to string, which is not wire-compatible"`.
    pub message: String,
    /// `Backward` (new schema reading data written with the old one) or `Forward` (old reading new).
    pub direction: Direction,
    /// Which earlier version (the index into `previous` given to [`check`]) this was found against.
    pub against: usize,
}

impl Incompatibility {
    /// One line: `"<direction>: <location>: <message>"`.
    pub fn describe(&self) -> String {
        format!("{}: {}: {}", self.direction, self.location, self.message)
    }
}

/// Which way data flows in a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Readers using the new schema read data written with the old one.
    Backward,
    /// Readers using the old schema read data written with the new one.
    Forward,
}

impl Direction {
    /// `"backward"` or `"forward"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Backward => "backward",
            Direction::Forward => "forward",
        }
    }

    fn rank(self) -> u8 {
        match self {
            Direction::Backward => 0,
            Direction::Forward => 1,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The rule an [`Incompatibility`] breaks (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The `package` changed.
    PackageChanged,
    /// The syntax changed (missing syntax means proto2).
    SyntaxChanged,
    /// A message (matched by fully-qualified name) is missing.
    MessageRemoved,
    /// A field of the old schema is gone and its number is not reserved.
    FieldRemovedNotReserved,
    /// A field number now has another name.
    FieldNumberReusedWithOtherName,
    /// A field's type changed in a way that is not wire-compatible.
    FieldTypeChanged,
    /// Repeated <-> singular, or a proto2 `required` label added or removed.
    FieldLabelChanged,
    /// An enum (matched by fully-qualified name) is missing.
    EnumRemoved,
    /// An enum value number is missing.
    EnumValueRemoved,
    /// A field moved into a oneof that already existed.
    FieldMovedIntoExistingOneof,
    /// Two or more existing fields moved into a new oneof.
    MultipleFieldsMovedIntoNewOneof,
}

/// Checks `new` against the earlier versions of a subject (`previous`, oldest first) at `level`.
///
/// Non-transitive levels compare with the latest previous version only; `*_TRANSITIVE` with all.
/// `NONE` returns nothing; so does an empty `previous`.
pub fn check(level: Level, new: &ParsedSchema, previous: &[ParsedSchema]) -> Vec<Incompatibility> {
    let (backward, forward, transitive) = match level {
        Level::None => return Vec::new(),
        Level::Backward => (true, false, false),
        Level::BackwardTransitive => (true, false, true),
        Level::Forward => (false, true, false),
        Level::ForwardTransitive => (false, true, true),
        Level::Full => (true, true, false),
        Level::FullTransitive => (true, true, true),
    };
    let first = if transitive {
        0
    } else {
        previous.len().saturating_sub(1)
    };
    let new_index = Index::of(new.main_file());
    let mut out = Vec::new();
    for (against, old) in previous.iter().enumerate().skip(first) {
        let old_index = Index::of(old.main_file());
        if backward {
            diff(
                &old_index,
                &new_index,
                Direction::Backward,
                against,
                &mut out,
            );
        }
        if forward {
            diff(
                &new_index,
                &old_index,
                Direction::Forward,
                against,
                &mut out,
            );
        }
    }
    // Stable: findings for one location keep the order the rules produced them in.
    out.sort_by(|a, b| {
        (a.against, a.direction.rank(), &a.location).cmp(&(
            b.against,
            b.direction.rank(),
            &b.location,
        ))
    });
    out
}

/// The messages and enums of one file, by fully-qualified name (without leading dot).
struct Index<'a> {
    file: &'a FileDescriptorProto,
    messages: BTreeMap<String, Scoped<'a, DescriptorProto>>,
    enums: BTreeMap<String, Scoped<'a, EnumDescriptorProto>>,
}

struct Scoped<'a, T> {
    proto: &'a T,
    /// The fully-qualified name of the enclosing message, if nested.
    parent: Option<String>,
}

impl<'a> Index<'a> {
    fn of(file: &'a FileDescriptorProto) -> Self {
        let mut messages = BTreeMap::new();
        let mut enums = BTreeMap::new();
        let package = file.package();
        for e in &file.enum_type {
            enums.insert(
                qualify(package, e.name()),
                Scoped {
                    proto: e,
                    parent: None,
                },
            );
        }
        // An explicit stack rather than recursion: nesting depth comes from client input.
        let mut stack: Vec<(Option<String>, &'a DescriptorProto)> =
            file.message_type.iter().map(|m| (None, m)).collect();
        while let Some((parent, message)) = stack.pop() {
            let scope = match &parent {
                Some(p) => p.as_str(),
                None => package,
            };
            let name = qualify(scope, message.name());
            for e in &message.enum_type {
                enums.insert(
                    qualify(&name, e.name()),
                    Scoped {
                        proto: e,
                        parent: Some(name.clone()),
                    },
                );
            }
            stack.extend(
                message
                    .nested_type
                    .iter()
                    .map(|nested| (Some(name.clone()), nested)),
            );
            messages.insert(
                name,
                Scoped {
                    proto: message,
                    parent,
                },
            );
        }
        Index {
            file,
            messages,
            enums,
        }
    }
}

fn qualify(scope: &str, name: &str) -> String {
    if scope.is_empty() {
        name.to_owned()
    } else {
        format!("{scope}.{name}")
    }
}

/// Appends the incompatibilities of `diff(original, update)` to `out`.
fn diff(
    original: &Index<'_>,
    update: &Index<'_>,
    direction: Direction,
    against: usize,
    out: &mut Vec<Incompatibility>,
) {
    let mut d = Differ {
        direction,
        against,
        out,
    };
    d.file(original, update);
}

struct Differ<'o> {
    direction: Direction,
    against: usize,
    out: &'o mut Vec<Incompatibility>,
}

impl Differ<'_> {
    fn push(&mut self, kind: ChangeKind, location: String, message: String) {
        self.out.push(Incompatibility {
            kind,
            location,
            message,
            direction: self.direction,
            against: self.against,
        });
    }

    /// `(old, new)` from `(original, update)`.
    fn old_new<'x, T: ?Sized>(&self, original: &'x T, update: &'x T) -> (&'x T, &'x T) {
        match self.direction {
            Direction::Backward => (original, update),
            Direction::Forward => (update, original),
        }
    }

    /// Wording for "present in `original`, missing in `update`".
    fn gone(&self) -> &'static str {
        match self.direction {
            Direction::Backward => "was removed; data written with the old schema may still use it",
            Direction::Forward => "was added; readers using the old schema do not know it",
        }
    }

    fn file(&mut self, original: &Index<'_>, update: &Index<'_>) {
        let (old, new) = self.old_new(original.file, update.file);
        if old.package() != new.package() {
            self.push(
                ChangeKind::PackageChanged,
                "package".to_owned(),
                format!(
                    "package changed from {} to {}, which renames every type",
                    display_package(old.package()),
                    display_package(new.package())
                ),
            );
        }
        if syntax(old) != syntax(new) {
            self.push(
                ChangeKind::SyntaxChanged,
                "syntax".to_owned(),
                format!("syntax changed from {} to {}", syntax(old), syntax(new)),
            );
        }

        for (name, message) in &original.messages {
            match update.messages.get(name) {
                Some(updated) => self.message(name, message.proto, updated.proto),
                None => {
                    let is_map_entry = message
                        .proto
                        .options
                        .as_ref()
                        .is_some_and(|o| o.map_entry());
                    let parent_gone = message
                        .parent
                        .as_ref()
                        .is_some_and(|p| !update.messages.contains_key(p));
                    if !is_map_entry && !parent_gone {
                        let gone = self.gone();
                        self.push(
                            ChangeKind::MessageRemoved,
                            name.clone(),
                            format!("message {name} {gone}"),
                        );
                    }
                }
            }
        }

        for (name, e) in &original.enums {
            match update.enums.get(name) {
                Some(updated) => self.enumeration(name, e.proto, updated.proto),
                None => {
                    let parent_gone = e
                        .parent
                        .as_ref()
                        .is_some_and(|p| !update.messages.contains_key(p));
                    if !parent_gone {
                        let gone = self.gone();
                        self.push(
                            ChangeKind::EnumRemoved,
                            name.clone(),
                            format!("enum {name} {gone}"),
                        );
                    }
                }
            }
        }
    }

    fn enumeration(
        &mut self,
        name: &str,
        original: &EnumDescriptorProto,
        update: &EnumDescriptorProto,
    ) {
        let numbers: BTreeSet<i32> = update.value.iter().map(|v| v.number()).collect();
        // With `allow_alias` a number may have several names; report it once, by its first name.
        let mut seen = BTreeSet::new();
        for value in &original.value {
            let number = value.number();
            if numbers.contains(&number) || !seen.insert(number) {
                continue;
            }
            let gone = self.gone();
            self.push(
                ChangeKind::EnumValueRemoved,
                format!("{name}.{} (value {number})", value.name()),
                format!("enum value {number} ({}) {gone}", value.name()),
            );
        }
    }

    fn message(&mut self, name: &str, original: &DescriptorProto, update: &DescriptorProto) {
        let original_fields: BTreeMap<i32, &FieldDescriptorProto> =
            original.field.iter().map(|f| (f.number(), f)).collect();
        let update_fields: BTreeMap<i32, &FieldDescriptorProto> =
            update.field.iter().map(|f| (f.number(), f)).collect();
        let original_oneofs = real_oneofs(original);

        for (&number, &of) in &original_fields {
            let Some(&uf) = update_fields.get(&number) else {
                if self.direction == Direction::Backward && !is_reserved(update, number) {
                    self.push(
                        ChangeKind::FieldRemovedNotReserved,
                        format!("{name}.{} (field {number})", of.name()),
                        format!(
                            "field {number} ({}) was removed without reserving its number; \
                             reserve it (`reserved {number};`) so it is never reused",
                            of.name()
                        ),
                    );
                }
                continue;
            };
            let (old_f, new_f) = self.old_new(of, uf);
            let location = format!("{name}.{} (field {number})", new_f.name());

            if old_f.name() != new_f.name() {
                self.push(
                    ChangeKind::FieldNumberReusedWithOtherName,
                    location.clone(),
                    format!(
                        "field {number} was named {} and is now named {}",
                        old_f.name(),
                        new_f.name()
                    ),
                );
            }
            if !types_compatible(old_f, new_f) {
                self.push(
                    ChangeKind::FieldTypeChanged,
                    location.clone(),
                    format!(
                        "field {number} changed type from {} to {}, which is not wire-compatible",
                        type_label(old_f),
                        type_label(new_f)
                    ),
                );
            }
            let old_repeated = old_f.label() == Label::Repeated;
            let new_repeated = new_f.label() == Label::Repeated;
            if old_repeated != new_repeated {
                self.push(
                    ChangeKind::FieldLabelChanged,
                    location.clone(),
                    format!(
                        "field {number} changed from {} to {}",
                        repeated_label(old_repeated),
                        repeated_label(new_repeated)
                    ),
                );
            }
            let old_required = old_f.label() == Label::Required;
            let new_required = new_f.label() == Label::Required;
            if old_required != new_required {
                let change = if new_required {
                    "became required"
                } else {
                    "is no longer required"
                };
                self.push(
                    ChangeKind::FieldLabelChanged,
                    location.clone(),
                    format!("field {number} {change}"),
                );
            }

            // Oneof rules, phrased for diff(original, update): `update` puts the field into a
            // oneof that `original` already had, while `original` kept it outside that oneof.
            let original_oneof = oneof_name(original, of);
            if let Some(target) = oneof_name(update, uf)
                && original_oneofs.contains(target)
                && original_oneof != Some(target)
            {
                let message = match self.direction {
                    Direction::Backward => format!(
                        "field {number} was moved into the existing oneof {target}; data written \
                         with the old schema may set it together with another member"
                    ),
                    Direction::Forward => format!(
                        "field {number} was moved out of the oneof {target}; data written with \
                         the new schema may set it together with a member of {target}, and \
                         readers using the old schema keep only one"
                    ),
                };
                self.push(ChangeKind::FieldMovedIntoExistingOneof, location, message);
            }
        }

        // Several existing fields moved together into a oneof that `original` lacks.
        let mut moved: BTreeMap<&str, Vec<&FieldDescriptorProto>> = BTreeMap::new();
        for field in &update.field {
            if let Some(oneof) = oneof_name(update, field)
                && !original_oneofs.contains(oneof)
                && original_fields.contains_key(&field.number())
            {
                moved.entry(oneof).or_default().push(field);
            }
        }
        for (oneof, fields) in moved {
            if fields.len() < 2 {
                continue;
            }
            let list: Vec<String> = fields
                .iter()
                .map(|f| format!("{} ({})", f.name(), f.number()))
                .collect();
            let list = list.join(", ");
            let message = match self.direction {
                Direction::Backward => format!(
                    "fields {list} were moved into the new oneof {oneof}; data written with the \
                     old schema may set several of them, and readers keep only one"
                ),
                Direction::Forward => format!(
                    "fields {list} were moved out of the oneof {oneof}; data written with the new \
                     schema may set several of them, and readers using the old schema keep only one"
                ),
            };
            self.push(
                ChangeKind::MultipleFieldsMovedIntoNewOneof,
                format!("{name}.{oneof} (oneof)"),
                message,
            );
        }
    }
}

fn display_package(package: &str) -> String {
    if package.is_empty() {
        "(none)".to_owned()
    } else {
        package.to_owned()
    }
}

fn syntax(file: &FileDescriptorProto) -> &str {
    match file.syntax() {
        "" => "proto2",
        other => other,
    }
}

fn repeated_label(repeated: bool) -> &'static str {
    if repeated { "repeated" } else { "singular" }
}

/// Whether `number` falls in one of the message's `reserved` ranges (end exclusive).
fn is_reserved(message: &DescriptorProto, number: i32) -> bool {
    message
        .reserved_range
        .iter()
        .any(|r| r.start() <= number && number < r.end())
}

/// The name of the real (not proto3-`optional` synthetic) oneof the field belongs to.
fn oneof_name<'m>(message: &'m DescriptorProto, field: &FieldDescriptorProto) -> Option<&'m str> {
    if field.proto3_optional() {
        return None;
    }
    let index = usize::try_from(field.oneof_index?).ok()?;
    message.oneof_decl.get(index).map(|o| o.name())
}

/// The names of the message's real oneofs.
fn real_oneofs(message: &DescriptorProto) -> BTreeSet<&str> {
    message
        .field
        .iter()
        .filter_map(|f| oneof_name(message, f))
        .collect()
}

/// The wire-compatibility class of a scalar type.
#[derive(PartialEq, Eq)]
enum Wire {
    Varint,
    ZigZag,
    Fixed32,
    Fixed64,
    LengthDelimited,
    Float,
    Double,
}

fn scalar_wire(ty: Type) -> Option<Wire> {
    Some(match ty {
        Type::Int32 | Type::Uint32 | Type::Int64 | Type::Uint64 | Type::Bool => Wire::Varint,
        Type::Sint32 | Type::Sint64 => Wire::ZigZag,
        Type::Fixed32 | Type::Sfixed32 => Wire::Fixed32,
        Type::Fixed64 | Type::Sfixed64 => Wire::Fixed64,
        Type::String | Type::Bytes => Wire::LengthDelimited,
        Type::Float => Wire::Float,
        Type::Double => Wire::Double,
        Type::Enum | Type::Message | Type::Group => return None,
    })
}

fn types_compatible(old: &FieldDescriptorProto, new: &FieldDescriptorProto) -> bool {
    let is_enum_compatible_int =
        |t: Type| matches!(t, Type::Int32 | Type::Uint32 | Type::Int64 | Type::Uint64);
    match (old.r#type(), new.r#type()) {
        (Type::Message, Type::Message) | (Type::Group, Type::Group) | (Type::Enum, Type::Enum) => {
            old.type_name() == new.type_name()
        }
        (Type::Enum, other) | (other, Type::Enum) => is_enum_compatible_int(other),
        (a, b) => match (scalar_wire(a), scalar_wire(b)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        },
    }
}

fn type_label(field: &FieldDescriptorProto) -> String {
    let ty = field.r#type();
    match ty {
        Type::Message | Type::Enum | Type::Group => {
            let name = field.type_name();
            name.strip_prefix('.').unwrap_or(name).to_owned()
        }
        Type::Double => "double".to_owned(),
        Type::Float => "float".to_owned(),
        Type::Int64 => "int64".to_owned(),
        Type::Uint64 => "uint64".to_owned(),
        Type::Int32 => "int32".to_owned(),
        Type::Fixed64 => "fixed64".to_owned(),
        Type::Fixed32 => "fixed32".to_owned(),
        Type::Bool => "bool".to_owned(),
        Type::String => "string".to_owned(),
        Type::Bytes => "bytes".to_owned(),
        Type::Uint32 => "uint32".to_owned(),
        Type::Sfixed32 => "sfixed32".to_owned(),
        Type::Sfixed64 => "sfixed64".to_owned(),
        Type::Sint32 => "sint32".to_owned(),
        Type::Sint64 => "sint64".to_owned(),
    }
}

#[cfg(test)]
mod tests;
