//! gRPC health (`grpc.health.v1.Health/Check`) and server reflection (`grpc.reflection.v1`)
//! checks shared by the service tests (`ingest`, `query_api`, `ingest_fuzz`): both
//! services register the same health reporter and reflection builder, so one set of checks
//! serves both.

use prost::Message as _;
use prost_types::FileDescriptorProto;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

/// A channel to `url` (`http://host:port`).
pub async fn channel(url: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// `Health/Check` for `service` ("" is the whole server).
pub async fn health(channel: Channel, service: &str) -> Result<HealthCheckResponse, tonic::Status> {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The server as a whole and `service` answer SERVING; an unknown service is NOT_FOUND.
pub async fn assert_health_serving(channel: Channel, service: &str) {
    for name in ["", service] {
        let status = health(channel.clone(), name)
            .await
            .unwrap_or_else(|e| panic!("health check of {name:?}: {e}"));
        assert_eq!(
            status.status,
            ServingStatus::Serving as i32,
            "health of {name:?}"
        );
    }
    let unknown = health(channel, "pulse.nothing.v1.NoSuchService")
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown}");
}

/// Sends `requests` on one reflection stream and collects the responses until the server
/// ends the stream (with OK, or with the status it ended it with).
async fn reflect(
    channel: Channel,
    requests: Vec<MessageRequest>,
) -> Result<Vec<MessageResponse>, tonic::Status> {
    let outbound = tokio_stream::iter(requests.into_iter().map(|r| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(r),
    }));
    let mut inbound = ServerReflectionClient::new(channel)
        .server_reflection_info(outbound)
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(ServerReflectionResponse {
        message_response, ..
    }) = inbound.message().await?
    {
        out.push(message_response.expect("a reflection response has a message"));
    }
    Ok(out)
}

/// Reflection lists `service` (and itself, nothing else) and describes it: the file containing the symbol declares it
/// with exactly `methods` (name, input type, output type, client streaming). Returns the
/// An unknown symbol is a NOT_FOUND error response.
pub async fn assert_reflection_describes(
    channel: Channel,
    service: &str,
    methods: &[(&str, &str, &str, bool)],
) {
    let answers = reflect(
        channel.clone(),
        vec![
            MessageRequest::ListServices(String::new()),
            MessageRequest::FileContainingSymbol(service.to_owned()),
        ],
    )
    .await
    .unwrap();
    assert_eq!(answers.len(), 2, "one reflection response per request");

    let MessageResponse::ListServicesResponse(list) = &answers[0] else {
        panic!("list_services answered {:?}", answers[0]);
    };
    // Exactly what this server serves: a client that discovers a service must be able to
    // call it.
    let mut names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    let mut want = vec![service, "grpc.reflection.v1.ServerReflection"];
    want.sort_unstable();
    assert_eq!(names, want, "services listed by reflection");

    let MessageResponse::FileDescriptorResponse(files) = &answers[1] else {
        panic!("file_containing_symbol answered {:?}", answers[1]);
    };
    let files: Vec<FileDescriptorProto> = files
        .file_descriptor_proto
        .iter()
        .map(|b| FileDescriptorProto::decode(b.as_slice()).unwrap())
        .collect();
    let (package, short) = service.rsplit_once('.').unwrap();
    let found = files
        .iter()
        .filter(|f| f.package() == package)
        .flat_map(|f| &f.service)
        .find(|s| s.name() == short)
        .unwrap_or_else(|| {
            panic!(
                "no file of {:?} declares {service}",
                files.iter().map(|f| f.name()).collect::<Vec<_>>()
            )
        });
    let got: Vec<(&str, &str, &str, bool)> = found
        .method
        .iter()
        .map(|m| {
            (
                m.name(),
                m.input_type(),
                m.output_type(),
                m.client_streaming(),
            )
        })
        .collect();
    assert_eq!(got, methods, "methods of {service}");

    // The reflection protocol answers an unknown symbol with an error response; tonic's
    // server ends the stream with that status instead. Either way it is NOT_FOUND.
    let unknown = MessageRequest::FileContainingSymbol("pulse.nothing.v1.NoSuchService".into());
    let code = match reflect(channel, vec![unknown]).await {
        Ok(answers) => match answers.as_slice() {
            [MessageResponse::ErrorResponse(e)] => e.error_code,
            other => panic!("an unknown symbol answered {other:?}"),
        },
        Err(status) => status.code() as i32,
    };
    assert_eq!(code, tonic::Code::NotFound as i32, "an unknown symbol");
}
