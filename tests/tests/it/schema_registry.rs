//! The schema registry against the real broker: replicas agree on ids when registering
//! concurrently, a new replica rebuilds the same state from the log, and clients we did
//! not write (Rust `schema_registry_converter`, PyPI `confluent-kafka`) work against it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use prost::Message;
use pulse_contracts::pb::events::v1 as ev;
use pulse_schema_registry::Replica;
use serde_json::{Value, json};

use crate::support::{cleanup, events};

async fn replica(topic: &str) -> Replica {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Replica::start(
        &pulse_tests::kafka(),
        topic,
        Duration::from_secs(30),
        Duration::from_secs(60),
        listener,
    )
    .await
    .unwrap()
}

fn proto(package: &str, n: usize) -> String {
    format!("syntax = \"proto3\";\npackage {package};\nmessage M{n} {{\n  string f = 1;\n}}\n")
}

async fn register(
    client: &reqwest::Client,
    base: &str,
    subject: &str,
    schema: &str,
) -> (u16, Value) {
    let r = client
        .post(format!("{base}/subjects/{subject}/versions"))
        .header("Content-Type", "application/vnd.schemaregistry.v1+json")
        .json(&json!({ "schemaType": "PROTOBUF", "schema": schema }))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn get(client: &reqwest::Client, url: String) -> Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

#[tokio::test]
async fn two_replicas_registering_concurrently_never_share_an_id() {
    let topic = pulse_tests::unique("_schemas");
    let _topics = cleanup::Topics::adopt([&topic]);
    let a = replica(&topic).await;
    let b = replica(&topic).await;
    let client = reqwest::Client::new();
    let (ua, ub) = (format!("http://{}", a.addr), format!("http://{}", b.addr));

    // Versions of a subject here are unrelated schemas: turn compatibility off (a write
    // through the log that replica b must also see).
    let resp = client
        .put(format!("{ua}/config"))
        .json(&json!({ "compatibility": "NONE" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // 12 distinct schemas, half through each replica, all at once; 4 subjects shared.
    let mut tasks = Vec::new();
    for n in 0..12 {
        let base = if n % 2 == 0 { ua.clone() } else { ub.clone() };
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let subject = format!("s{}-value", n % 4);
            let schema = proto(&format!("p{n}"), n);
            let (status, body) = register(&client, &base, &subject, &schema).await;
            assert_eq!(status, 200, "{body}");
            (schema, body["id"].as_u64().unwrap())
        }));
    }
    let mut ids = BTreeMap::new();
    for t in tasks {
        let (schema, id) = t.await.unwrap();
        ids.insert(id, schema);
    }
    assert_eq!(ids.len(), 12, "12 schemas got 12 distinct ids: {ids:?}");
    assert_eq!(
        ids.keys().copied().collect::<Vec<_>>(),
        (1..=12).collect::<Vec<u64>>()
    );

    // Both replicas (and a third that starts late and replays the log) serve the same state.
    let c = replica(&topic).await;
    let uc = format!("http://{}", c.addr);
    for (id, schema) in &ids {
        for base in [&ua, &ub, &uc] {
            let body = get(&client, format!("{base}/schemas/ids/{id}")).await;
            assert_eq!(
                body["schema"].as_str(),
                Some(schema.as_str()),
                "{base} id {id}"
            );
        }
    }
    for s in 0..4 {
        let va = get(&client, format!("{ua}/subjects/s{s}-value/versions")).await;
        let vb = get(&client, format!("{ub}/subjects/s{s}-value/versions")).await;
        let vc = get(&client, format!("{uc}/subjects/s{s}-value/versions")).await;
        assert_eq!(va, json!([1, 2, 3]));
        assert_eq!(va, vb);
        assert_eq!(va, vc);
    }
    // Registering an identical schema again, through either replica, returns its id.
    let (id1, schema1) = ids.iter().next().unwrap();
    let owner = get(&client, format!("{ub}/schemas/ids/{id1}/versions")).await;
    let subject = owner[0]["subject"].as_str().unwrap().to_owned();
    let (status, body) = register(&client, &ub, &subject, schema1).await;
    assert_eq!((status, body["id"].as_u64()), (200, Some(*id1)));

    for r in [a, b, c] {
        r.stop().await.unwrap();
    }
}

#[tokio::test]
async fn incompatible_change_is_refused_with_the_reason_and_confluent_codes() {
    let topic = pulse_tests::unique("_schemas");
    let _topics = cleanup::Topics::adopt([&topic]);
    let r = replica(&topic).await;
    let base = format!("http://{}", r.addr);
    let client = reqwest::Client::new();
    let v1 =
        "syntax = \"proto3\";\npackage t;\nmessage E {\n  string id = 1;\n  int64 amount = 2;\n}\n";
    let broken = v1.replace("int64 amount = 2", "string amount = 2");
    assert_eq!(register(&client, &base, "e-value", v1).await.0, 200);
    let (status, body) = register(&client, &base, "e-value", &broken).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error_code"], 409);
    assert!(
        body["message"].as_str().unwrap().contains("amount"),
        "{body}"
    );

    let (status, body) = register(&client, &base, "e-value", "message {").await;
    assert_eq!(
        (status, body["error_code"].as_u64()),
        (422, Some(42201)),
        "{body}"
    );
    let body = get(&client, format!("{base}/subjects/nope/versions")).await;
    assert_eq!(body["error_code"], 40401);
    let body = get(&client, format!("{base}/subjects/e-value/versions/7")).await;
    assert_eq!(body["error_code"], 40402);
    let body = get(&client, format!("{base}/subjects/e-value/versions/zero")).await;
    assert_eq!(body["error_code"], 42202);
    let body = get(&client, format!("{base}/schemas/ids/999")).await;
    assert_eq!(body["error_code"], 40403);
    let resp = client
        .put(format!("{base}/config"))
        .json(&json!({ "compatibility": "SIDEWAYS" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    assert_eq!(resp.json::<Value>().await.unwrap()["error_code"], 42203);
    let resp = client
        .delete(format!("{base}/subjects/e-value?permanent=true"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.json::<Value>().await.unwrap()["error_code"], 40405);
    r.stop().await.unwrap();
}

#[tokio::test]
async fn schema_registry_converter_round_trips_a_pulse_event_through_the_registry() {
    use schema_registry_converter::async_impl::proto_raw::{ProtoRawDecoder, ProtoRawEncoder};
    use schema_registry_converter::async_impl::schema_registry::SrSettings;
    use schema_registry_converter::schema_registry_common::SubjectNameStrategy;

    let topic = pulse_tests::unique("_schemas");
    let _topics = cleanup::Topics::adopt([&topic]);
    let r = replica(&topic).await;
    let base = format!("http://{}", r.addr);
    let events_topic = pulse_tests::unique("events");
    let subject = format!("{events_topic}-value");
    let client = reqwest::Client::new();
    let (status, body) = register(
        &client,
        &base,
        &subject,
        pulse_contracts::schemas::EVENTS.source,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_u64().unwrap() as u32;

    let event = events::event("e-1", "u-1", 1_764_000_000_000)
        .session("s-1")
        .purchase("EUR", 19_990_000)
        .build();
    let bytes = event.encode_to_vec();
    let encoder = ProtoRawEncoder::new(SrSettings::new(base.clone()));
    let framed = encoder
        .encode(
            &bytes,
            "pulse.events.v1.Event",
            SubjectNameStrategy::TopicNameStrategy(events_topic.clone(), false),
        )
        .await
        .unwrap();
    // Our own framing agrees with the library's.
    let ours = pulse_contracts::wire::RegistryEncoder::new(&base)
        .encode(&events_topic, "pulse.events.v1.Event", &bytes)
        .await
        .unwrap();
    assert_eq!(framed, ours);
    assert_eq!(
        pulse_contracts::wire::unframe(&framed).unwrap().schema_id,
        id
    );

    let decoder = ProtoRawDecoder::new(SrSettings::new(base));
    let decoded = decoder.decode(Some(&framed)).await.unwrap().unwrap();
    assert_eq!(decoded.full_name.as_str(), "pulse.events.v1.Event");
    assert_eq!(ev::Event::decode(decoded.bytes.as_slice()).unwrap(), event);
    r.stop().await.unwrap();
}

#[tokio::test]
async fn confluent_kafka_python_client_works_against_the_registry() {
    let python = std::env::var("PULSE_TEST_PYTHON").expect(
        "PULSE_TEST_PYTHON is not set: run the tests with scripts/test.sh (it provides the venv)",
    );
    let topic = pulse_tests::unique("_schemas");
    let _topics = cleanup::Topics::adopt([&topic]);
    let r = replica(&topic).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/python/schema_registry_client.py"
    );
    let out = tokio::process::Command::new(python)
        .arg(script)
        .arg(format!("http://{}", r.addr))
        .arg(pulse_tests::unique("py"))
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("all checks passed"), "{text}");
    let subjects: BTreeSet<String> = serde_json::from_value(
        reqwest::get(format!("http://{}/subjects?deleted=true", r.addr))
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap(),
    )
    .unwrap();
    assert!(
        subjects.is_empty(),
        "the script deleted its subject permanently: {subjects:?}"
    );
    r.stop().await.unwrap();
}
