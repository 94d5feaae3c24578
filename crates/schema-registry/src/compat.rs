//! Protobuf schema parsing and compatibility checking for the schema registry.
//!
//! This module owns two things:
//!
//! * **Parsing** the text of a `PROTOBUF` schema registered under a subject, together with the
//!   schemas it references, into a validated [`ParsedSchema`] ([`parse_protobuf`]). The subject's
//!   schema is compiled under the virtual file name `main.proto` (or `main_N.proto` when a
//!   reference already uses that name); references resolve by the name used in their
//!   `import "..."` statement, and the Google well-known types (`google/protobuf/*.proto`) always
//!   resolve. Syntax errors, unresolved imports, duplicate names, unknown types and every other
//!   problem the protobuf compiler reports become an [`InvalidSchema`] whose text carries
//!   `file:line:column` when the compiler knows it (Confluent error 42201).
//! * **Checking compatibility** of a new schema against the earlier versions of its subject at a
//!   Confluent [`Level`] ([`check`]).
//!
//! It leaves storage of schemas, subjects, versions and configured levels, the HTTP API and the
//! mapping of findings to Confluent error bodies to the rest of the service. It does no I/O.
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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;

use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{
    DescriptorProto, EnumDescriptorProto, FieldDescriptorProto, FileDescriptorProto,
    FileDescriptorSet,
};
use protox::file::{ChainFileResolver, File, FileResolver, GoogleFileResolver};

/// A referenced schema: its import path as used in `import "..."` and its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaSource<'a> {
    /// The import path, e.g. `"pulse/common/v1/money.proto"`.
    pub name: &'a str,
    /// The schema text.
    pub text: &'a str,
}

/// A parsed, validated protobuf schema (the main file plus its dependencies).
#[derive(Debug, Clone)]
pub struct ParsedSchema {
    main: FileDescriptorProto,
    files: FileDescriptorSet,
}

impl ParsedSchema {
    /// The descriptor of the subject's own schema text.
    pub fn main_file(&self) -> &FileDescriptorProto {
        &self.main
    }

    /// The main file and every file it imports, dependencies before dependents.
    pub fn file_descriptor_set(&self) -> &FileDescriptorSet {
        &self.files
    }
}

/// Why a schema text is not a valid protobuf schema (becomes Confluent error 42201).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSchema(pub String);

/// Resolves the main file and the references from memory.
#[derive(Debug)]
struct SourceResolver {
    files: HashMap<String, String>,
}

impl FileResolver for SourceResolver {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        match self.files.get(name) {
            Some(text) => File::from_source(name, text),
            None => Err(protox::Error::file_not_found(name)),
        }
    }
}

/// Parses `main` (the schema text registered under a subject) with `references` resolvable by
/// their import names; Google well-known types (`google/protobuf/*.proto`) resolve too.
///
/// # Errors
///
/// [`InvalidSchema`] on syntax errors, unresolved imports, duplicate names, unknown types, two
/// references with the same name and different texts, and anything else the protobuf compiler
/// rejects. The text names the file, line and column when the compiler reports them.
pub fn parse_protobuf(
    main: &str,
    references: &[SchemaSource<'_>],
) -> Result<ParsedSchema, InvalidSchema> {
    let mut files: HashMap<String, String> = HashMap::with_capacity(references.len() + 1);
    for reference in references {
        match files.get(reference.name) {
            Some(text) if text != reference.text => {
                return Err(InvalidSchema(format!(
                    "reference '{}' is given twice with different texts",
                    reference.name
                )));
            }
            Some(_) => {}
            None => {
                files.insert(reference.name.to_owned(), reference.text.to_owned());
            }
        }
    }
    let main_name = main_file_name(&files);
    files.insert(main_name.clone(), main.to_owned());

    let mut resolver = ChainFileResolver::new();
    resolver.add(SourceResolver { files });
    resolver.add(GoogleFileResolver::new());
    let mut compiler = protox::Compiler::with_file_resolver(resolver);
    compiler.include_imports(true);
    // protox's Debug output is `file:line:column: reason`; its Display omits the position.
    compiler
        .open_file(&main_name)
        .map_err(|err| InvalidSchema(format!("{err:?}")))?;
    let set = compiler.file_descriptor_set();
    let main_file = set
        .file
        .iter()
        .find(|f| f.name() == main_name)
        .cloned()
        .ok_or_else(|| {
            InvalidSchema(format!(
                "internal error: compiled schema lacks its main file '{main_name}'"
            ))
        })?;
    Ok(ParsedSchema {
        main: main_file,
        files: set,
    })
}

/// `main.proto`, or `main_N.proto` with the smallest N that no reference uses.
fn main_file_name(references: &HashMap<String, String>) -> String {
    let mut name = String::from("main.proto");
    let mut n: usize = 0;
    while references.contains_key(&name) {
        n += 1;
        name = format!("main_{n}.proto");
    }
    name
}

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
mod tests {
    use super::*;
    use ChangeKind as K;
    use Direction::{Backward as B, Forward as F};

    const EVENT_PROTO: &str = include_str!("../../../proto/pulse/events/v1/event.proto");

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
    fn findings(
        level: Level,
        old: &ParsedSchema,
        new: &ParsedSchema,
    ) -> Vec<(ChangeKind, Direction)> {
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
    fn transitive_levels_catch_a_break_against_an_older_version_that_the_non_transitive_level_misses()
     {
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
        let err = parse_protobuf("syntax = \"proto3\";\nmessage A {\n  int32 a = ;\n}\n", &[])
            .unwrap_err();
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
}
