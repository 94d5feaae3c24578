//! Parsing of `PROTOBUF` schema texts for the schema registry.
//!
//! Owns turning the text registered under a subject, together with the schemas it
//! references, into a validated [`ParsedSchema`] ([`parse_protobuf`]). The subject's schema is
//! compiled under the virtual file name `main.proto` (or `main_N.proto` when a reference
//! already uses that name); references resolve by the name used in their `import "..."`
//! statement, and the Google well-known types (`google/protobuf/*.proto`) always resolve.
//! Syntax errors, unresolved imports, duplicate names, unknown types and every other problem
//! the protobuf compiler reports become an [`InvalidSchema`] whose text carries
//! `file:line:column` when the compiler knows it (Confluent error 42201).
//!
//! Compatibility between parsed schemas is `compat`'s; storage and the HTTP API are the rest
//! of the service's. It does no I/O.

use std::collections::HashMap;

use prost_types::{FileDescriptorProto, FileDescriptorSet};
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
