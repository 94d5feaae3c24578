//! What the test modules share: waiting on a condition ([`wait`]), sample events
//! ([`events`]), guards that remove a test's databases, topics and folders ([`cleanup`]),
//! and the harnesses of several modules (an in-process ingest, schema registry or Parquet
//! sink, gRPC health and reflection checks, the service binaries as child processes).

pub mod archive;
pub mod child_process;
pub mod cleanup;
pub mod events;
pub mod grpc_meta;
pub mod ingest_server;
pub mod kafka;
pub mod registry;
pub mod wait;

pub use wait::{Deadline, poll_until, wait_until};
