//! gRPC streams of ingest against the real broker: `SendEventsStream` answers each message
//! on its own (bounded answers for unbounded streams), and `StreamEvents`, whose single
//! answer holds one result per event, refuses the message that would take it past
//! `--max-stream-events` before processing it.

use std::sync::Arc;

use pulse_contracts::pb::events::v1 as ev;
use pulse_contracts::pb::ingest::v1::ingest_service_client::IngestServiceClient;
use pulse_contracts::pb::ingest::v1::{EventStatus, SendEventsRequest};
use pulse_ingest::pipeline::{FixedSchemaId, Framer};

use crate::support::ingest_server;

fn message(prefix: &str, from: usize, n: usize) -> SendEventsRequest {
    SendEventsRequest {
        events: (from..from + n)
            .map(|i| ev::Event {
                event_id: format!("{prefix}-{i}"),
                schema_version: 1,
                event_type: "page_view".into(),
                key: Some(ev::EventKey {
                    user_id: format!("u{}", i % 7),
                    session_id: String::new(),
                }),
                payload: Some(ev::Payload {
                    page: "/home".into(),
                    ..Default::default()
                }),
                metadata: Some(ev::Metadata {
                    event_timestamp_ms: pulse_platform::clock::now_ms(),
                    ..Default::default()
                }),
                ingest: None,
            })
            .collect(),
    }
}

fn authorized<T>(body: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(body);
    req.metadata_mut()
        .insert("x-api-key", "stream-key".parse().unwrap());
    req
}

#[tokio::test]
async fn send_events_stream_answers_each_message_and_stream_events_refuses_past_its_limit() {
    let kafka = pulse_tests::kafka();
    let events_topic = pulse_tests::unique("events");
    let dlq_topic = pulse_tests::unique("dlq");
    let _topics = ingest_server::create_topics(&events_topic, &dlq_topic, 1).await;
    let cfg = ingest_server::config(
        &kafka,
        "stream-key=stream-test",
        "hmac",
        &events_topic,
        &dlq_topic,
        &["--max-batch-events", "500", "--max-stream-events", "1000"],
    );
    let framer: Arc<dyn Framer> = Arc::new(FixedSchemaId(1));
    let servers = ingest_server::serve(&kafka, &cfg, framer, "ingest-stream-test").await;
    let mut client = IngestServiceClient::connect(format!("http://{}", servers.grpc_addr))
        .await
        .unwrap();

    // Bidirectional: three messages (more than StreamEvents may carry), three answers, in
    // order, indexes counted from the start of the stream.
    let msgs = vec![
        message("bidi", 0, 500),
        message("bidi", 500, 500),
        message("bidi", 1000, 500),
    ];
    let mut answers = client
        .send_events_stream(authorized(tokio_stream::iter(msgs)))
        .await
        .unwrap()
        .into_inner();
    let mut seen = 0u32;
    while let Some(a) = answers.message().await.unwrap() {
        assert_eq!((a.accepted, a.duplicates, a.rejected), (500, 0, 0));
        assert_eq!(a.results.len(), 500);
        assert!(
            a.results
                .iter()
                .all(|r| r.status == EventStatus::Accepted as i32),
            "every event accepted"
        );
        assert_eq!(a.results.first().map(|r| r.index), Some(seen));
        assert_eq!(a.results.last().map(|r| r.index), Some(seen + 499));
        seen += 500;
    }
    assert_eq!(seen, 1500, "one answer per message");

    // Client streaming: the third message would take the call past 1000 events.
    let msgs = vec![
        message("cs", 0, 500),
        message("cs", 500, 500),
        message("cs", 1000, 500),
    ];
    let err = client
        .stream_events(authorized(tokio_stream::iter(msgs)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("SendEventsStream"), "{err}");
    // The first two messages were processed: their retry is answered duplicate; the
    // refused message was not processed.
    let retry = client
        .send_events(authorized(message("cs", 500, 500)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((retry.accepted, retry.duplicates), (0, 500));
    let refused = client
        .send_events(authorized(message("cs", 1000, 500)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((refused.accepted, refused.duplicates), (500, 0));

    // 1500 (bidi) + 1000 (streamed) + 500 (the refused message, sent on its own).
    let records = ingest_server::read_exactly(&events_topic, 3000).await;
    assert_eq!(records.len(), 3000);
    servers.stop().await.unwrap();
}
