//! The standard services every Pulse gRPC server carries beside its own: gRPC health
//! (SERVING for the server and for the named service) and reflection that lists only that
//! service (Pulse's descriptor set holds every Pulse service, most served elsewhere); and
//! the caller's W3C trace context from request metadata.

use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::metadata::{KeyRef, MetadataMap};
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_reflection::pb::v1::server_reflection_server::{
    SERVICE_NAME as REFLECTION, ServerReflection, ServerReflectionServer,
};

/// Health and reflection for a server serving `service` (its `NamedService::NAME`), with
/// the encoded `FileDescriptorSet` that describes it.
pub async fn health_and_reflection(
    service: &'static str,
    descriptors: &'static [u8],
) -> Result<
    (
        HealthServer<impl Health>,
        ServerReflectionServer<impl ServerReflection>,
    ),
    tonic_reflection::server::Error,
> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(service, tonic_health::ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(descriptors)
        .with_service_name(service)
        .with_service_name(REFLECTION)
        .build_v1()?;
    Ok((health, reflection))
}

/// The accepted connections of `listener` for a tonic server, with `TCP_NODELAY` set (tonic
/// sets it only on sockets it binds itself): without it, a response's small HTTP/2 frames
/// wait on Nagle's algorithm and the peer's delayed ACK.
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                KeyRef::Ascii(k) => Some(k.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// The caller's trace context from gRPC metadata (`traceparent`, `tracestate`); empty if
/// absent or malformed. The gRPC counterpart of [`crate::http::extract_context`].
pub fn extract_context(metadata: &MetadataMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&MetadataExtractor(metadata))
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;

    #[test]
    fn the_trace_context_comes_from_the_traceparent_metadata() {
        use opentelemetry::trace::TraceContextExt as _;
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let cx = super::extract_context(&md);
        let span = cx.span();
        let sc = span.span_context();
        assert!(sc.is_remote());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let empty = super::extract_context(&tonic::metadata::MetadataMap::new());
        assert!(!empty.span().span_context().is_valid());
    }

    #[tokio::test]
    async fn accepted_grpc_connections_have_tcp_nodelay_set() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = super::incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
