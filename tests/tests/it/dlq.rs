//! `pulsectl dlq redrive` to an ingest over TLS whose certificate the client cannot accept
//! — signed by a CA other than `--ca-file`'s, for another name, expired: the redrive fails
//! at once (a retry cannot fix a certificate) with an error naming the URL and the reason,
//! instead of retrying for its minute like a transient failure. The same ingest answers
//! with the right CA and name, so the certificate was the only problem.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pulse_ingest::pipeline::{FixedSchemaId, Framer};
use pulse_platform::kafka::{KafkaProducer, OutRecord, RecordProducer};
use pulsectl::dlq::{self, Redriven, TopicArgs};
use pulsectl::ingest_client::IngestArgs;

use crate::support::{ingest_server, tls};

/// Well under the redrive's retry budget (60 s), well over reading the DLQ and one request.
const AT_ONCE: Duration = Duration::from_secs(20);

/// An in-process ingest serving TLS with `cert`/`key`: (its port, the servers, topics).
async fn tls_ingest(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> (u16, pulse_ingest::Servers, crate::support::cleanup::Topics) {
    let kafka = pulse_tests::kafka();
    let events = pulse_tests::unique("events");
    let dlq = pulse_tests::unique("dlq");
    let topics = ingest_server::create_topics(&events, &dlq, 1).await;
    let cfg = ingest_server::config(
        &kafka,
        "test-key=redrive",
        "test-hmac",
        &events,
        &dlq,
        &[
            "--tls-cert-file",
            cert.to_str().unwrap(),
            "--tls-key-file",
            key.to_str().unwrap(),
        ],
    );
    let framer: Arc<dyn Framer> = Arc::new(FixedSchemaId(1));
    let servers = ingest_server::serve(&kafka, &cfg, framer, "dlq-tls-test").await;
    (servers.http_addr.port(), servers, topics)
}

/// A DLQ topic holding one JSON event at 0:0.
async fn dlq_with_one_json_record() -> (String, crate::support::cleanup::Topics) {
    let events = pulse_tests::unique("unused-events");
    let dlq = pulse_tests::unique("dlq");
    let topics = ingest_server::create_topics(&events, &dlq, 1).await;
    let producer = KafkaProducer::new(&pulse_tests::kafka(), "dlq-tls-test").unwrap();
    let body = br#"{"event_id":"redrive-tls-1","event_type":"page_view"}"#.to_vec();
    let ack = producer
        .enqueue(OutRecord::new(&dlq, Some(b"k".to_vec()), body))
        .unwrap();
    let acked = tokio::time::timeout(Duration::from_secs(30), ack)
        .await
        .expect("an acknowledgement within 30 s")
        .unwrap();
    assert_eq!((acked.partition, acked.offset), (0, 0));
    (dlq, topics)
}

fn redrive_args(dlq: &str, target: String, ca: &std::path::Path) -> dlq::RedriveArgs {
    dlq::RedriveArgs {
        offsets: vec![(0, 0)],
        code: None,
        ingest: IngestArgs {
            target,
            api_key: "test-key".into(),
            ca_file: Some(ca.to_owned()),
            ..IngestArgs::default()
        },
        topic: TopicArgs {
            topic: dlq.to_owned(),
            read_timeout: Duration::from_secs(30),
            kafka: pulse_tests::kafka(),
        },
    }
}

/// Redrives 0:0 of `dlq` to `target` trusting `ca`, expecting a TLS failure that names the
/// URL and contains each of `reasons`, within [`AT_ONCE`].
async fn assert_fails_at_once(dlq: &str, target: String, ca: &std::path::Path, reasons: &[&str]) {
    let started = Instant::now();
    let err = dlq::redrive(&redrive_args(dlq, target.clone(), ca), None)
        .await
        .expect_err("a redrive to an ingest whose certificate is not accepted");
    let took = started.elapsed();
    let text = err.to_string();
    eprintln!("{target}: failed in {took:?}: {text}");
    assert!(
        took < AT_ONCE,
        "{target}: took {took:?} (retried like a transient failure?): {text}"
    );
    assert!(
        text.contains(&format!(
            "TLS handshake with {target}/v1/events failed (not retried): invalid peer certificate"
        )),
        "{text}"
    );
    for reason in reasons {
        assert!(text.contains(reason), "{reason:?} not in {text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn redrive_to_a_tls_ingest_fails_at_once_on_a_certificate_error() {
    let dir = tls::work_dir("dlq-tls");
    let ca = tls::make_ca(&dir, "dlq-ca");
    let other_ca = tls::make_ca(&dir, "dlq-other-ca");
    // For `localhost` only: https://127.0.0.1 is a name mismatch.
    let (cert, key) = tls::make_cert(
        &dir,
        "dlq-ca",
        "localhost-only",
        "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n",
        None,
    );
    let (expired_cert, expired_key) = tls::make_cert(
        &dir,
        "dlq-ca",
        "expired",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        Some(("20200101000000Z", "20200102000000Z")),
    );
    let (port, _servers, _topics) = tls_ingest(&cert, &key).await;
    let (expired_port, _expired_servers, _expired_topics) =
        tls_ingest(&expired_cert, &expired_key).await;
    let (dlq, _dlq_topic) = dlq_with_one_json_record().await;

    // A CA that did not sign the ingest's certificate.
    assert_fails_at_once(
        &dlq,
        format!("https://localhost:{port}"),
        &other_ca,
        &["UnknownIssuer", "not signed by a CA in --ca-file"],
    )
    .await;
    // A certificate for another name.
    assert_fails_at_once(
        &dlq,
        format!("https://127.0.0.1:{port}"),
        &ca,
        &["not valid for name", "does not name the URL's host"],
    )
    .await;
    // An expired certificate.
    assert_fails_at_once(
        &dlq,
        format!("https://127.0.0.1:{expired_port}"),
        &ca,
        &["expired"],
    )
    .await;

    // The right CA and name: the same ingest answers.
    let redriven = dlq::redrive(
        &redrive_args(&dlq, format!("https://localhost:{port}"), &ca),
        None,
    )
    .await
    .unwrap();
    match &redriven[..] {
        [((0, 0), Redriven::Answered(a))] => assert_eq!(a.event_id, "redrive-tls-1"),
        other => panic!("{other:?}"),
    }
}
