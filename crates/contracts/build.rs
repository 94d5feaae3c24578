//! Compiles `proto/` with protox (pure Rust, no `protoc` needed) and generates prost
//! messages and tonic services into OUT_DIR, plus a descriptor set for gRPC reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "pulse/events/v1/event.proto",
    "pulse/aggregates/v1/aggregates.proto",
    "pulse/ingest/v1/ingest.proto",
    "pulse/query/v1/query.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not with env!(): a build script compiled in one checkout may be
    // reused (same target dir) for a checkout at another path.
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", proto_root.display());
    let fds = protox::compile(PROTOS, [&proto_root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("pulse_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
