//! Pulse's contracts: the protobuf types generated from `proto/`, the Kafka topic and
//! header names, the Confluent wire framing of record values, and the W3C trace-context
//! carrier for Kafka headers. Services depend on this crate for every name they share;
//! they never spell a topic or header as a string literal.

pub mod headers;
pub mod money;
pub mod schemas;
pub mod topics;
pub mod trace_context;
pub mod wire;

/// Generated protobuf types, one module per proto package.
pub mod pb {
    pub mod events {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/pulse.events.v1.rs"));
        }
    }
    pub mod aggregates {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/pulse.aggregates.v1.rs"));
        }
    }
    pub mod ingest {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/pulse.ingest.v1.rs"));
        }
    }
    pub mod query {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/pulse.query.v1.rs"));
        }
    }
}

/// Encoded `FileDescriptorSet` of every Pulse proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/pulse_descriptor.bin"));
