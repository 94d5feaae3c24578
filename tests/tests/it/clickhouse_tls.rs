//! ClickHouse over `https://` through Pulse's one client builder
//! ([`ClickHouseConfig::client`]): the stack's ClickHouse 18.16 speaks plain HTTP, so each
//! test puts a TLS terminator (tokio-rustls, `support::tls`) with certificates it makes
//! itself in front of it and points Pulse at `https://127.0.0.1:<terminator>`. The writer
//! stores rows and the query API's store reads them over TLS with `--clickhouse-ca-file`;
//! a CA that did not sign the server's certificate fails with an error naming the URL,
//! the CA file and the reason.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use prost::Message as _;
use pulse_contracts::pb::aggregates::v1::UserWindowActivity;
use pulse_contracts::{headers, wire};
use pulse_platform::clickhouse::{ClickHouseConfig, error_chain};
use pulse_platform::kafka::{KafkaProducer, OutRecord, TopicSpec};
use rdkafka::message::OwnedHeaders;
use tokio_util::sync::CancellationToken;

use crate::support::forwarder::address_of;
use crate::support::tls::{Terminator, make_ca, make_server_cert, work_dir};
use crate::support::{Deadline, cleanup, wait_until};

/// The stack's ClickHouse behind a TLS terminator, and the CA that signed its certificate.
struct TlsClickHouse {
    terminator: Terminator,
    ca: PathBuf,
    dir: PathBuf,
}

impl TlsClickHouse {
    async fn start(name: &str) -> Self {
        let dir = work_dir(name);
        let ca = make_ca(&dir, "pulse-test-ca");
        let (cert, key) = make_server_cert(&dir, "pulse-test-ca");
        let upstream = address_of(&pulse_tests::clickhouse().url).await;
        let terminator = Terminator::start(&cert, &key, upstream.port()).await;
        Self {
            terminator,
            ca,
            dir,
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.terminator.port)
    }
}

#[tokio::test]
async fn the_writer_and_the_query_store_work_over_https_with_the_ca_file() {
    let tls = TlsClickHouse::start("ch-tls").await;
    let database = cleanup::Database::unique("pulse_tls");
    let kafka = pulse_tests::kafka();
    let activity = pulse_tests::unique("activity");
    let names = [
        pulse_tests::unique("events"),
        activity.clone(),
        pulse_tests::unique("sessions"),
        pulse_tests::unique("dlq"),
    ];
    let _topics = cleanup::Topics::create(
        &names
            .iter()
            .map(|t| TopicSpec::new(t.as_str(), 1))
            .collect::<Vec<_>>(),
    )
    .await;
    let url = tls.url();
    let ca = tls.ca.to_string_lossy().into_owned();
    let cfg = pulse_writer::Config::parse_from([
        "pulse-writer",
        "--kafka-brokers",
        &kafka.brokers,
        "--clickhouse-url",
        &url,
        "--clickhouse-ca-file",
        &ca,
        "--clickhouse-database",
        &database.database,
        "--group-id",
        &pulse_tests::unique("writer"),
        "--batch-max-age-ms",
        "200",
        "--events-topic",
        &names[0],
        "--user-activity-topic",
        &names[1],
        "--sessions-topic",
        &names[2],
        "--dlq-topic",
        &names[3],
    ]);
    pulse_platform::config::validate_all(&[&cfg.clickhouse]).unwrap();

    let sink = pulse_writer::build_clickhouse(&cfg).await.unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(sink.run(stop.clone()));
    let window = UserWindowActivity {
        user_id: "tls-user".into(),
        window_start_ms: 1_764_000_000_000,
        window_end_ms: 1_764_000_060_000,
        page_views: 3,
        event_count: 3,
        version: 1,
        r#final: true,
        ..Default::default()
    };
    let producer = KafkaProducer::new(&kafka, "clickhouse-tls-test").unwrap();
    producer
        .send(
            OutRecord::new(
                &activity,
                Some(b"tls-user|w".to_vec()),
                wire::frame(1, &[0], &window.encode_to_vec()),
            )
            .with_headers(headers::with_str(
                OwnedHeaders::new(),
                headers::INGEST_TS,
                "1764000000500",
            )),
            Duration::from_secs(5),
        )
        .await
        .unwrap();

    // The query API's store, over the same TLS client settings.
    let store = pulse_query_api::store::Store::new(&cfg.clickhouse, Duration::from_secs(10));
    wait_until(
        Deadline::after(Duration::from_secs(60)).every(Duration::from_millis(200)),
        "the window written over https is read back over https",
        async || match store.active_users_since(1_764_000_000_000).await {
            Ok(row) if row.users == 1 => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    assert!(
        tls.terminator.handshakes() >= 2,
        "the writer and the store connected through TLS ({} handshakes)",
        tls.terminator.handshakes()
    );
    assert!(
        tls.terminator.failures().is_empty(),
        "{:?}",
        tls.terminator.failures()
    );
    stop.cancel();
    task.await.unwrap().unwrap();
    drop(database);
    let _ = std::fs::remove_dir_all(&tls.dir);
}

#[tokio::test]
async fn a_ca_that_did_not_sign_the_server_certificate_fails_naming_url_ca_and_reason() {
    let tls = TlsClickHouse::start("ch-tls-wrong-ca").await;
    let other_ca = make_ca(&tls.dir, "some-other-ca");
    let cfg = ClickHouseConfig {
        url: tls.url(),
        ca_file: Some(other_ca.clone()),
        ..pulse_tests::clickhouse()
    };
    pulse_platform::config::validate_all(&[&cfg]).unwrap();
    let e = cfg
        .server_client()
        .query("SELECT 1")
        .execute()
        .await
        .unwrap_err();
    let text = error_chain(&e);
    for expected in [
        format!("cannot connect to ClickHouse at {}", tls.url()),
        format!("checked against the CA file {}", other_ca.display()),
        "invalid peer certificate: UnknownIssuer".to_owned(),
    ] {
        assert!(text.contains(&expected), "{expected:?} missing in: {text}");
    }
    assert!(
        matches!(e, clickhouse::error::Error::Network(_)),
        "retryable like any connection failure: {e:?}"
    );
    // The query API's store reports the same reason (as 503 unavailable).
    let store = pulse_query_api::store::Store::new(&cfg, Duration::from_secs(5));
    let q = store.active_users_since(0).await.unwrap_err();
    let text = error_chain(&q);
    assert!(
        text.contains("ClickHouse is unavailable") && text.contains("UnknownIssuer"),
        "{text}"
    );
    assert_eq!(tls.terminator.handshakes(), 0);

    // Without a CA file, the system's roots: they do not trust the test's CA either.
    let system = ClickHouseConfig {
        ca_file: None,
        ..cfg.clone()
    };
    let text = error_chain(
        &system
            .server_client()
            .query("SELECT 1")
            .execute()
            .await
            .unwrap_err(),
    );
    assert!(
        text.contains("checked against the system's CA certificates")
            && text.contains("UnknownIssuer"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&tls.dir);
}
