//! The schema registry against the real broker: replicas agree on ids when registering
//! concurrently, a new replica rebuilds the same state from the log, and clients we did
//! not write (Rust `schema_registry_converter`, PyPI `confluent-kafka`) work against it.
//! The `_schemas` log stays bounded (identical writes append nothing; what compaction
//! keeps is one record per key, and replays to the same state), a log written by the
//! previous release is served and converted, and a large log replays within the start-up
//! timeout.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use clap::Parser as _;
use prost::Message;
use pulse_contracts::pb::events::v1 as ev;
use pulse_platform::kafka::topics::TopicSpec;
use pulse_schema_registry::Replica;
use rdkafka::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

use crate::support::wait::wait_until;
use crate::support::{cleanup, events};

async fn replica(topic: &str) -> Replica {
    replica_with_startup_timeout(topic, Duration::from_secs(60)).await
}

async fn replica_with_startup_timeout(topic: &str, startup: Duration) -> Replica {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Replica::start(
        &pulse_tests::kafka(),
        topic,
        Duration::from_secs(30),
        startup,
        listener,
    )
    .await
    .unwrap()
}

/// A `_schemas` record as written: (key, value), `None` a tombstone.
type Record = (Vec<u8>, Option<Vec<u8>>);

fn record(key: Value, value: Option<Value>) -> Record {
    (
        key.to_string().into_bytes(),
        value.map(|v| v.to_string().into_bytes()),
    )
}

/// Every record of `topic`, in log order.
async fn log_records(topic: &str) -> Vec<Record> {
    crate::support::kafka::read_to_end(&pulse_tests::kafka(), topic)
        .await
        .into_iter()
        .map(|m| {
            (
                m.key().unwrap_or_default().to_vec(),
                m.payload().map(<[u8]>::to_vec),
            )
        })
        .collect()
}

/// What log compaction keeps of `records`: the last record of each key, in log order,
/// tombstones (and what they delete) gone.
fn compacted(records: &[Record]) -> Vec<Record> {
    let last: BTreeMap<&[u8], usize> = records
        .iter()
        .enumerate()
        .map(|(i, (k, _))| (k.as_slice(), i))
        .collect();
    records
        .iter()
        .enumerate()
        .filter(|(i, (k, v))| last[k.as_slice()] == *i && v.is_some())
        .map(|(_, r)| r.clone())
        .collect()
}

fn keytype(r: &Record) -> String {
    serde_json::from_slice::<Value>(&r.0).unwrap()["keytype"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The records of `topic` once every command in it is settled (what compaction keeps
/// holds no command), waiting for the settling that runs behind the answers.
async fn settled_log(topic: &str) -> Vec<Record> {
    wait_until(
        Duration::from_secs(30),
        "every command in the schemas log to be settled",
        async || {
            let records = log_records(topic).await;
            let kept = compacted(&records);
            if kept.iter().all(|r| keytype(r) != "COMMAND") {
                Ok(records)
            } else {
                Err(format!("{} records, {} kept", records.len(), kept.len()))
            }
        },
    )
    .await
}

/// The end offset of `topic` (one partition).
fn log_end(topic: &str) -> i64 {
    let c: BaseConsumer = pulse_tests::kafka()
        .client_config("schemas-end")
        .create()
        .unwrap();
    c.fetch_watermarks(topic, 0, Duration::from_secs(10))
        .unwrap()
        .1
}

/// Writes `records` to `topic` as fast as the broker takes them (one batch of sends,
/// acknowledgements awaited at the end), like another registry release would have.
async fn produce_raw(topic: &str, records: &[Record]) {
    let producer: FutureProducer = pulse_tests::kafka()
        .client_config("raw-schemas-writer")
        .set("linger.ms", "20")
        .set("batch.num.messages", "5000")
        .create()
        .unwrap();
    let mut acks = Vec::with_capacity(records.len());
    for (key, value) in records {
        let mut r = FutureRecord::<[u8], [u8]>::to(topic).key(key);
        if let Some(v) = value {
            r = r.payload(v);
        }
        acks.push(producer.send_result(r).map_err(|(e, _)| e).unwrap());
    }
    for ack in acks {
        ack.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

/// Everything a registry serves: every subject (deleted ones too) with each version's id
/// and schema, the subject levels and the global level.
async fn dump(client: &reqwest::Client, base: &str) -> Value {
    let mut subjects = serde_json::Map::new();
    let names = get(client, format!("{base}/subjects?deleted=true")).await;
    for name in names.as_array().unwrap() {
        let name = name.as_str().unwrap();
        let versions = get(
            client,
            format!("{base}/subjects/{name}/versions?deleted=true"),
        )
        .await;
        let mut detail = Vec::new();
        for v in versions.as_array().unwrap() {
            let body = get(
                client,
                format!("{base}/subjects/{name}/versions/{v}?deleted=true"),
            )
            .await;
            detail.push(json!([body["version"], body["id"], body["schema"]]));
        }
        let live = get(client, format!("{base}/subjects/{name}/versions")).await;
        let level = get(client, format!("{base}/config/{name}")).await;
        subjects.insert(
            name.to_owned(),
            json!({ "versions": detail, "live": live, "level": level }),
        );
    }
    json!({ "subjects": subjects, "global": get(client, format!("{base}/config")).await })
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

#[tokio::test]
async fn repeated_identical_writes_do_not_grow_the_schemas_log_and_compaction_keeps_one_record_per_key()
 {
    let topic = pulse_tests::unique("_schemas");
    let _topics = cleanup::Topics::adopt([&topic]);
    let r = replica(&topic).await;
    let b = format!("http://{}", r.addr);
    let client = reqwest::Client::new();
    let put = async |url: String, level: &str| {
        let resp = client
            .put(url)
            .json(&json!({ "compatibility": level }))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().await.unwrap())
    };
    let schema = proto("bounded", 1);
    for url in [format!("{b}/config/c-value"), format!("{b}/config")] {
        assert_eq!(put(url, "FULL").await.0, 200);
    }
    let (s, first) = register(&client, &b, "c-value", &schema).await;
    assert_eq!(s, 200, "{first}");
    let end = settled_log(&topic).await.len() as i64;
    assert_eq!(log_end(&topic), end);

    // 100 identical config writes (subject and global) and re-registrations: nothing.
    for _ in 0..100 {
        for url in [format!("{b}/config/c-value"), format!("{b}/config")] {
            let (s, body) = put(url, "FULL").await;
            assert_eq!((s, &body["compatibility"]), (200, &json!("FULL")), "{body}");
        }
        let (s, body) = register(&client, &b, "c-value", &schema).await;
        assert_eq!((s, &body["id"]), (200, &first["id"]), "{body}");
    }
    assert_eq!(log_end(&topic), end, "identical writes appended records");
    // Deleting what is already deleted writes nothing either.
    let resp = client
        .delete(format!("{b}/config/never-set"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(log_end(&topic), end);

    // What compaction keeps: one record per key (2 configs, 1 schema id, 1 version);
    // every command was settled (its record deleted).
    let kept = compacted(&settled_log(&topic).await);
    let mut kinds: Vec<String> = kept.iter().map(keytype).collect();
    kinds.sort();
    assert_eq!(kinds, ["CONFIG", "CONFIG", "ID", "SCHEMA"], "{kept:?}");

    // 20 real changes (the subject's level flipping) each append a command, its fact and
    // the command's tombstone; what compaction keeps does not grow.
    let changes = Instant::now();
    for i in 0..20 {
        let level = if i % 2 == 0 { "NONE" } else { "FULL" };
        assert_eq!(put(format!("{b}/config/c-value"), level).await.0, 200);
    }
    let per_change = changes.elapsed() / 20;
    let records = settled_log(&topic).await;
    let grown = records.len() as i64 - end;
    assert!(grown <= 20 * 3, "{grown} records for 20 changes");
    assert_eq!(compacted(&records).len(), kept.len());
    println!(
        "schemas log: {} records written, {} kept by compaction; a config change answered in {per_change:?}",
        records.len(),
        kept.len()
    );

    // A replica replaying only what compaction keeps serves the same state.
    let copy = pulse_tests::unique("_schemas");
    let _copy = cleanup::Topics::create(&[TopicSpec::compacted(&copy)]).await;
    produce_raw(&copy, &compacted(&records)).await;
    let c = replica(&copy).await;
    assert_eq!(
        dump(&client, &b).await,
        dump(&client, &format!("http://{}", c.addr)).await
    );
    let level = get(&client, format!("http://{}/config/c-value", c.addr)).await;
    assert_eq!(level["compatibilityLevel"], "FULL");
    c.stop().await.unwrap();
    r.stop().await.unwrap();
}

#[tokio::test]
async fn a_referenced_subject_cannot_be_deleted_permanently_until_its_referrer_is() {
    let topic = pulse_tests::unique("_schemas");
    let _topics = cleanup::Topics::adopt([&topic]);
    let r = replica(&topic).await;
    let base = format!("http://{}", r.addr);
    let client = reqwest::Client::new();
    let (s, body) = register(&client, &base, "common", &proto("t", 1)).await;
    assert_eq!(s, 200, "{body}");
    let resp = client
        .post(format!("{base}/subjects/order/versions"))
        .json(&json!({ "schemaType": "PROTOBUF",
            "schema": "syntax = \"proto3\";\npackage o;\nimport \"common.proto\";\nmessage Order {\n  t.M1 total = 1;\n}\n",
            "references": [{ "name": "common.proto", "subject": "common", "version": 1 }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let delete = async |subject: &str, permanent: bool| {
        let resp = client
            .delete(format!("{base}/subjects/{subject}?permanent={permanent}"))
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
    };
    assert_eq!(delete("common", false).await, (200, json!([1])));
    let (s, body) = delete("common", true).await;
    assert_eq!((s, &body["error_code"]), (422, &json!(42206)), "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("'order'"),
        "{body}"
    );
    assert_eq!(delete("order", false).await.0, 200);
    assert_eq!(delete("order", true).await.0, 200);
    assert_eq!(delete("common", true).await, (200, json!([1])));
    r.stop().await.unwrap();
}

/// A protobuf schema of `messages` messages of 20 fields each (slow to parse and check).
fn big_proto(messages: usize, extra: bool) -> String {
    let mut text = String::from("syntax = \"proto3\";\npackage slow;\n");
    for m in 0..messages {
        let fields: Vec<String> = (1..=20).map(|f| format!("string f{f} = {f};")).collect();
        text.push_str(&format!("message M{m} {{ {} }}\n", fields.join(" ")));
    }
    if extra {
        text.push_str("message Extra { string x = 1; }\n");
    }
    text
}

/// Parsing and compatibility checks run on the blocking pool: on a single-threaded
/// runtime (this test's), reads are answered while a slow registration is checked.
#[tokio::test]
async fn reads_are_answered_while_a_slow_registration_is_checked() {
    const MESSAGES: usize = 1_500;
    let topic = pulse_tests::unique("_schemas");
    let _topics = cleanup::Topics::adopt([&topic]);
    let r = replica(&topic).await;
    let base = format!("http://{}", r.addr);
    let client = reqwest::Client::new();
    let (s, body) = register(&client, &base, "slow-value", &big_proto(MESSAGES, false)).await;
    assert_eq!(s, 200, "{body}");

    // What parsing and checking the new version costs (the same work, alone).
    let asked = Instant::now();
    let resp = client
        .post(format!(
            "{base}/compatibility/subjects/slow-value/versions/latest"
        ))
        .json(&json!({ "schemaType": "PROTOBUF", "schema": big_proto(MESSAGES, true) }))
        .send()
        .await
        .unwrap();
    let check = asked.elapsed();
    assert_eq!(resp.json::<Value>().await.unwrap()["is_compatible"], true);

    let started = Instant::now();
    let slow = tokio::spawn({
        let (client, base) = (client.clone(), base.clone());
        async move { register(&client, &base, "slow-value", &big_proto(MESSAGES, true)).await }
    });
    let (mut answered, mut slowest) = (0, Duration::ZERO);
    while !slow.is_finished() {
        let asked = Instant::now();
        let body = get(&client, format!("{base}/subjects/slow-value/versions")).await;
        assert!(body == json!([1]) || body == json!([1, 2]), "{body}");
        slowest = slowest.max(asked.elapsed());
        if !slow.is_finished() {
            answered += 1;
        }
    }
    let registration = started.elapsed();
    let (s, body) = slow.await.unwrap();
    assert_eq!(s, 200, "{body}");
    println!(
        "a registration of {MESSAGES} messages took {registration:?} (its check alone {check:?}); {answered} reads answered meanwhile, the slowest in {slowest:?}"
    );
    assert!(
        answered >= 5,
        "{answered} reads answered during {registration:?}"
    );
    // Had the check blocked the runtime, one read would have waited at least as long
    // (with the preview on the runtime a read waited 1.77 s; on the blocking pool the
    // slowest took 37–167 ms, the check alone 0.44–1.27 s, debug build).
    assert!(
        slowest * 4 < check * 3,
        "a read waited {slowest:?}; the check alone takes {check:?}"
    );
    r.stop().await.unwrap();
}

/// A command record as the previous release wrote it (key and value shapes pinned here,
/// not taken from the crate's types).
fn old_command(n: usize, command: Value) -> Record {
    let request_id = format!("old-{n}-{}", uuid::Uuid::new_v4());
    let mut value = command;
    value["request_id"] = json!(request_id);
    record(
        json!({ "keytype": "COMMAND", "request_id": request_id }),
        Some(value),
    )
}

#[tokio::test]
async fn a_log_written_by_the_previous_release_is_served_then_settled_into_compactable_records() {
    let topic = pulse_tests::unique("_schemas");
    let _topics = cleanup::Topics::create(&[TopicSpec::compacted(&topic)]).await;
    let v1 = "syntax = \"proto3\";\npackage up;\nmessage E {\n  int64 amount = 1;\n}\n";
    let broken = v1.replace("int64", "string");
    let reg = |subject: &str, schema: &str| {
        json!({ "command": "register", "subject": subject,
                "content": { "schemaType": "PROTOBUF", "schema": schema, "references": [] } })
    };
    let set = |subject: Option<&str>, level: &str| json!({ "command": "set_config", "subject": subject, "level": level });
    let del = |subject: &str, permanent: bool| json!({ "command": "delete_subject", "subject": subject, "permanent": permanent });
    let commands = [
        set(None, "NONE"),
        reg("s1", v1),
        reg("s1", &broken), // accepted: the level is NONE when it is decided
        set(None, "BACKWARD"),
        reg("s1", v1), // identical: a no-op
        reg("s2", v1), // the same schema: id 1 again
        reg("s3", &proto("up3", 3)),
        set(Some("s3"), "FULL"),
        del("s3", false),
        del("s3", true),
        reg("s4", &proto("up4", 4)),
        del("s4", false),
        set(Some("s2"), "FULL"),
        set(Some("s1"), "FORWARD"),
        json!({ "command": "delete_config", "subject": "s1" }),
    ];
    let old: Vec<Record> = commands
        .into_iter()
        .enumerate()
        .map(|(n, c)| old_command(n, c))
        .collect();
    produce_raw(&topic, &old).await;

    let client = reqwest::Client::new();
    let a = replica(&topic).await;
    let ua = format!("http://{}", a.addr);
    assert_eq!(
        get(&client, format!("{ua}/subjects")).await,
        json!(["s1", "s2"])
    );
    assert_eq!(
        get(&client, format!("{ua}/subjects?deleted=true")).await,
        json!(["s1", "s2", "s4"])
    );
    assert_eq!(
        get(&client, format!("{ua}/subjects/s1/versions")).await,
        json!([1, 2])
    );
    let s2 = get(&client, format!("{ua}/subjects/s2/versions/1")).await;
    assert_eq!((&s2["id"], s2["schema"].as_str()), (&json!(1), Some(v1)));
    assert_eq!(
        get(&client, format!("{ua}/schemas/ids/2")).await["schema"].as_str(),
        Some(broken.as_str())
    );
    assert_eq!(
        get(&client, format!("{ua}/config")).await["compatibilityLevel"],
        "BACKWARD"
    );
    assert_eq!(
        get(&client, format!("{ua}/config/s2")).await["compatibilityLevel"],
        "FULL"
    );
    assert_eq!(
        get(&client, format!("{ua}/config/s1")).await["error_code"],
        40408
    );

    // The new release settles the old commands at start: facts under stable keys, then a
    // tombstone for every command; compaction keeps facts only.
    let kept = compacted(&settled_log(&topic).await);
    let mut kinds = BTreeMap::<String, usize>::new();
    for r in &kept {
        *kinds.entry(keytype(r)).or_default() += 1;
    }
    // Ids 1-4; versions s1:2, s2:1, s4:1 (deleted) and s3's removed one; configs: global,
    // s2, and the removed ones of s1 and s3.
    assert_eq!(
        kinds,
        BTreeMap::from([
            ("CONFIG".to_owned(), 4),
            ("ID".to_owned(), 4),
            ("SCHEMA".to_owned(), 5)
        ]),
        "{kept:?}"
    );

    // A replica replaying only what compaction keeps serves the same state, and carries
    // on with the next id and version.
    let copy = pulse_tests::unique("_schemas");
    let _copy = cleanup::Topics::create(&[TopicSpec::compacted(&copy)]).await;
    produce_raw(&copy, &kept).await;
    let b = replica(&copy).await;
    let ub = format!("http://{}", b.addr);
    assert_eq!(dump(&client, &ua).await, dump(&client, &ub).await);
    // Checked against the latest version (BACKWARD), parsed from its fact.
    let refused = v1.replace("amount = 1;", "amount = 1;\n  int64 note = 2;");
    let (status, body) = register(&client, &ub, "s1", &refused).await;
    assert_eq!(status, 409, "{body}");
    let next = broken.replace(
        "string amount = 1;",
        "string amount = 1;\n  string note = 2;",
    );
    let (status, body) = register(&client, &ub, "s1", &next).await;
    assert_eq!((status, &body["id"]), (200, &json!(5)), "{body}");
    assert_eq!(
        get(&client, format!("{ub}/subjects/s1/versions")).await,
        json!([1, 2, 3])
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test]
async fn a_replica_replays_a_large_schemas_log_within_its_startup_timeout() {
    const SUBJECTS: usize = 2_000;
    const LEGACY: usize = 200;
    let topic = pulse_tests::unique("_schemas");
    let _topics = cleanup::Topics::create(&[TopicSpec::compacted(&topic)]).await;
    let subject = |s: usize| format!("big-{s}-value");
    let mut records = Vec::new();
    let mut id = 0_u32;
    // Two versions per subject, each its own schema id.
    for s in 0..SUBJECTS {
        for version in 1..=2_u32 {
            id += 1;
            let schema = proto(&format!("big{s}"), version as usize);
            records.push(record(
                json!({ "keytype": "ID", "id": id }),
                Some(json!({ "keytype": "ID", "id": id, "schemaType": "PROTOBUF",
                             "schema": schema, "references": [] })),
            ));
            records.push(record(
                json!({ "keytype": "SCHEMA", "subject": subject(s), "version": version }),
                Some(
                    json!({ "keytype": "SCHEMA", "subject": subject(s), "version": version,
                             "as_of": id, "id": id, "deleted": false }),
                ),
            ));
        }
    }
    // Config writes: every 4th subject's level three times over (the last one holds), and
    // the global level.
    let levels = ["FULL", "NONE", "FORWARD"];
    for (round, level) in levels.iter().enumerate() {
        for s in (0..SUBJECTS).step_by(4) {
            records.push(record(
                json!({ "keytype": "CONFIG", "subject": subject(s) }),
                Some(json!({ "keytype": "CONFIG", "subject": subject(s),
                             "as_of": 10_000 + round * SUBJECTS + s,
                             "compatibilityLevel": level })),
            ));
        }
    }
    records.push(record(
        json!({ "keytype": "CONFIG", "subject": null }),
        Some(
            json!({ "keytype": "CONFIG", "subject": null, "as_of": 20_000,
                     "compatibilityLevel": "NONE" }),
        ),
    ));
    // And commands a previous release left (each parsed and decided at replay).
    for n in 0..LEGACY {
        records.push(old_command(
            n,
            json!({ "command": "register", "subject": format!("legacy-{n}-value"),
                    "content": { "schemaType": "PROTOBUF",
                                 "schema": proto(&format!("legacy{n}"), n), "references": [] } }),
        ));
    }
    let written = Instant::now();
    produce_raw(&topic, &records).await;
    println!(
        "wrote {} _schemas records in {:?}",
        records.len(),
        written.elapsed()
    );

    // The replica's start-up timeout: the service's default.
    let timeout = Duration::from_millis(
        pulse_schema_registry::Config::parse_from(["pulse-schema-registry"]).startup_timeout_ms,
    );
    let started = Instant::now();
    let r = replica_with_startup_timeout(&topic, timeout).await;
    let took = started.elapsed();
    println!(
        "replayed {} records in {took:?} ({:.0} records/s); start-up timeout {timeout:?}",
        records.len(),
        records.len() as f64 / took.as_secs_f64()
    );
    assert!(took < timeout, "{took:?} >= {timeout:?}");

    // It serves the last state.
    let client = reqwest::Client::new();
    let base = format!("http://{}", r.addr);
    let subjects = get(&client, format!("{base}/subjects")).await;
    assert_eq!(subjects.as_array().unwrap().len(), SUBJECTS + LEGACY);
    let last = subject(SUBJECTS - 1);
    assert_eq!(
        get(&client, format!("{base}/subjects/{last}/versions")).await,
        json!([1, 2])
    );
    let top = get(&client, format!("{base}/subjects/{last}/versions/2")).await;
    assert_eq!(top["id"], json!(2 * SUBJECTS));
    assert_eq!(
        top["schema"].as_str(),
        Some(proto(&format!("big{}", SUBJECTS - 1), 2).as_str())
    );
    for (s, want) in [(0, json!("FORWARD")), (SUBJECTS - 4, json!("FORWARD"))] {
        let body = get(&client, format!("{base}/config/{}", subject(s))).await;
        assert_eq!(body["compatibilityLevel"], want, "{body}");
    }
    assert_eq!(
        get(&client, format!("{base}/config/{}", subject(1))).await["error_code"],
        40408
    );
    assert_eq!(
        get(&client, format!("{base}/config")).await["compatibilityLevel"],
        "NONE"
    );
    // The commands were decided after the facts: ids continue after theirs.
    let legacy = get(
        &client,
        format!("{base}/subjects/legacy-{}-value/versions/1", LEGACY - 1),
    )
    .await;
    assert_eq!(legacy["id"], json!(2 * SUBJECTS + LEGACY));
    r.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Authentication: the real `pulse-schema-registry` binary with a credentials file.

mod authenticated {
    use std::path::PathBuf;
    use std::process::Stdio;
    use std::sync::Arc;
    use std::time::Duration;

    use clap::Parser as _;
    use pulse_ingest::pipeline::Framer;
    use pulse_schema_registry::auth::{Role, hash_line};
    use serde_json::{Value, json};
    use tokio::process::{Child, Command};

    use crate::support::child_process::{binary, free_port};
    use crate::support::wait::wait_until;
    use crate::support::{cleanup, events, ingest_server};

    const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

    /// A registry process whose users are in `file`, reloaded every 200 ms.
    struct Registry {
        child: Child,
        base: String,
        admin: String,
        file: PathBuf,
        dir: cleanup::TempDir,
        _topics: cleanup::Topics,
    }

    impl Registry {
        async fn start(users: &[(&str, Role, &str)]) -> Self {
            let dir = cleanup::TempDir::new("sr-auth");
            let file = dir.path().join("users");
            let lines: Vec<String> = users
                .iter()
                .map(|(n, r, p)| hash_line(n, *r, p).unwrap())
                .collect();
            std::fs::write(&file, lines.join("\n") + "\n").unwrap();
            let topic = pulse_tests::unique("_schemas");
            let (port, admin) = (free_port(), free_port());
            let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
            let child = Command::new(binary("pulse-schema-registry"))
                .env("PULSE_KAFKA_BROKERS", pulse_tests::kafka().brokers)
                .env("PULSE_SCHEMAS_TOPIC", &topic)
                .env("PULSE_SCHEMA_REGISTRY_ADDR", format!("127.0.0.1:{port}"))
                .env("PULSE_ADMIN_ADDR", format!("127.0.0.1:{admin}"))
                .env("PULSE_REGISTRY_AUTH_FILE", &file)
                .env("PULSE_REGISTRY_AUTH_RELOAD_INTERVAL_MS", "200")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let mut r = Self {
                child,
                base: format!("http://127.0.0.1:{port}"),
                admin: format!("http://127.0.0.1:{admin}"),
                file,
                dir,
                _topics: cleanup::Topics::adopt([topic]),
            };
            let ready = format!("{}/readyz", r.admin);
            let log = r.dir.path().join("registry.log");
            let child = &mut r.child;
            wait_until(
                Duration::from_secs(90),
                "the registry to be ready",
                async || {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!(
                            "the registry exited ({status}): {}",
                            std::fs::read_to_string(&log).unwrap_or_default()
                        );
                    }
                    match reqwest::get(&ready).await {
                        Ok(resp) if resp.status() == 200 => Ok(()),
                        Ok(resp) => Err(resp.status().to_string()),
                        Err(e) => Err(e.to_string()),
                    }
                },
            )
            .await;
            r
        }

        fn log(&self) -> String {
            std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
        }

        /// `pulse_schema_registry_auth_failures_total{reason}` from the admin port (no credentials).
        async fn failures(&self, reason: &str) -> f64 {
            let text = reqwest::get(format!("{}/metrics", self.admin))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let label = format!("reason=\"{reason}\"");
            crate::support::metric_sum(
                &text,
                "pulse_schema_registry_auth_failures_total",
                &[&label],
            )
            .unwrap_or_else(|| panic!("no failure series for {reason} in /metrics:\n{text}"))
        }

        /// `pulse_schema_registry_authenticated_requests_total{user}` (0 without a series).
        async fn authenticated(&self, user: &str) -> f64 {
            let text = reqwest::get(format!("{}/metrics", self.admin))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let label = format!("user=\"{user}\"");
            crate::support::metric_sum(
                &text,
                "pulse_schema_registry_authenticated_requests_total",
                &[&label],
            )
            .unwrap_or(0.0)
        }
    }

    fn proto(n: usize) -> String {
        format!("syntax = \"proto3\";\npackage auth{n};\nmessage M {{\n  string f = 1;\n}}\n")
    }

    /// A request as `user` (`None`: anonymous); returns (status, WWW-Authenticate, body).
    async fn call(
        method: reqwest::Method,
        url: String,
        user: Option<(&str, &str)>,
        body: Option<Value>,
    ) -> (u16, Option<String>, Value) {
        let mut req = reqwest::Client::new()
            .request(method, url)
            .header("Content-Type", CONTENT_TYPE);
        if let Some((u, p)) = user {
            req = req.basic_auth(u, Some(p));
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let challenge = resp
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_owned());
        let text = resp.text().await.unwrap();
        (
            status,
            challenge,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    const WRITER: (&str, &str) = ("ci", "write-pass-1");
    const READER: (&str, &str) = ("svc", "read-pass-1");

    fn schema_body(n: usize) -> Option<Value> {
        Some(json!({ "schemaType": "PROTOBUF", "schema": proto(n) }))
    }

    #[tokio::test]
    async fn writes_need_the_write_role_reads_need_a_user_and_failures_are_counted() {
        use reqwest::Method as M;
        let r = Registry::start(&[
            (WRITER.0, Role::Write, WRITER.1),
            (READER.0, Role::Read, READER.1),
        ])
        .await;
        let b = &r.base;
        // Every reason is exported at zero before the first failure; admin stays open.
        for reason in [
            "missing",
            "malformed",
            "unknown_user",
            "wrong_password",
            "forbidden",
        ] {
            assert_eq!(r.failures(reason).await, 0.0, "{reason}");
        }
        for path in ["livez", "readyz"] {
            assert_eq!(
                reqwest::get(format!("{}/{path}", r.admin))
                    .await
                    .unwrap()
                    .status(),
                200
            );
        }
        assert!(
            r.log().contains("registry authentication on"),
            "{}",
            r.log()
        );

        // Anonymous: 401 with a Basic challenge, on reads and writes; the write has no effect.
        let (s, challenge, body) = call(
            M::PUT,
            format!("{b}/config/orders-value"),
            None,
            Some(json!({"compatibility": "NONE"})),
        )
        .await;
        assert_eq!(s, 401, "{body}");
        assert!(challenge.unwrap_or_default().starts_with("Basic "));
        assert_eq!(body["error_code"], 40101);
        let (s, _, _) = call(M::GET, format!("{b}/subjects"), None, None).await;
        assert_eq!(s, 401);
        let (s, _, body) = call(
            M::GET,
            format!("{b}/config/orders-value"),
            Some(WRITER),
            None,
        )
        .await;
        assert_eq!((s, &body["error_code"]), (404, &json!(40408)), "{body}");

        // A read user may not register, delete or change config.
        let (s, _, body) = call(
            M::POST,
            format!("{b}/subjects/a-value/versions"),
            Some(READER),
            schema_body(1),
        )
        .await;
        assert_eq!((s, &body["error_code"]), (403, &json!(40301)), "{body}");
        let (s, _, _) = call(
            M::PUT,
            format!("{b}/config"),
            Some(READER),
            Some(json!({"compatibility": "NONE"})),
        )
        .await;
        assert_eq!(s, 403);
        let (s, _, _) = call(
            M::DELETE,
            format!("{b}/subjects/a-value?permanent=true"),
            Some(READER),
            None,
        )
        .await;
        assert_eq!(s, 403);

        // The write user registers; the read user reads, looks up and checks compatibility.
        let (s, _, body) = call(
            M::POST,
            format!("{b}/subjects/a-value/versions"),
            Some(WRITER),
            schema_body(1),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let id = body["id"].as_u64().unwrap();
        let (s, _, body) = call(
            M::GET,
            format!("{b}/subjects/a-value/versions"),
            Some(READER),
            None,
        )
        .await;
        assert_eq!((s, body), (200, json!([1])));
        let (s, _, body) = call(M::GET, format!("{b}/schemas/ids/{id}"), Some(READER), None).await;
        assert_eq!(s, 200, "{body}");
        let (s, _, body) = call(
            M::POST,
            format!("{b}/subjects/a-value"),
            Some(READER),
            schema_body(1),
        )
        .await;
        assert_eq!((s, &body["id"]), (200, &json!(id)), "{body}");
        let (s, _, body) = call(
            M::POST,
            format!("{b}/compatibility/subjects/a-value/versions/latest"),
            Some(READER),
            schema_body(1),
        )
        .await;
        assert_eq!((s, &body["is_compatible"]), (200, &json!(true)), "{body}");

        // Counted by the user's name: the reader's requests above (a 403 is not counted:
        // it is a failure of its own); never a password in the series.
        let reader_requests = r.authenticated(READER.0).await;
        assert!(reader_requests >= 4.0, "{reader_requests}");

        // A wrong password and an unknown user: 401, each counted once under its reason,
        // logged with the caller's address and never with the password.
        let before = r.failures("wrong_password").await;
        let (s, challenge, _) = call(
            M::GET,
            format!("{b}/subjects"),
            Some((READER.0, "not-the-password")),
            None,
        )
        .await;
        assert_eq!(s, 401);
        assert!(challenge.is_some());
        assert_eq!(r.failures("wrong_password").await, before + 1.0);
        let before = r.failures("unknown_user").await;
        let (s, _, _) = call(M::GET, format!("{b}/subjects"), Some(("nobody", "x")), None).await;
        assert_eq!(s, 401);
        assert_eq!(r.failures("unknown_user").await, before + 1.0);
        assert!(r.failures("forbidden").await >= 3.0);
        assert!(r.failures("missing").await >= 2.0);
        assert_eq!(
            r.authenticated(READER.0).await,
            reader_requests,
            "a refused request counted as the reader's"
        );
        assert_eq!(r.authenticated("nobody").await, 0.0);
        let log = r.log();
        assert!(
            log.contains("registry request refused") && log.contains("127.0.0.1:"),
            "{log}"
        );
        assert!(
            !log.contains("not-the-password") && !log.contains(READER.1),
            "{log}"
        );

        // Reload without a restart: a user appended to the file can write; a removed one
        // is refused.
        let late = ("late", "late-pass-1");
        let mut text = std::fs::read_to_string(&r.file).unwrap();
        text.push_str(&hash_line(late.0, Role::Write, late.1).unwrap());
        text.push('\n');
        std::fs::write(&r.file, &text).unwrap();
        wait_until(
            Duration::from_secs(15),
            "the appended user to be accepted",
            async || match call(
                M::POST,
                format!("{b}/subjects/late-value/versions"),
                Some(late),
                schema_body(2),
            )
            .await
            {
                (200, _, _) => Ok(()),
                other => Err(other),
            },
        )
        .await;
        let without_reader: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with(&format!("{}:", READER.0)))
            .collect();
        std::fs::write(&r.file, without_reader.join("\n") + "\n").unwrap();
        wait_until(
            Duration::from_secs(15),
            "the removed user to be refused",
            async || match call(M::GET, format!("{b}/subjects"), Some(READER), None).await {
                (401, _, _) => Ok(()),
                other => Err(other),
            },
        )
        .await;
        let (s, _, _) = call(M::GET, format!("{b}/subjects"), Some(WRITER), None).await;
        assert_eq!(s, 200, "other users are unaffected");
    }

    #[tokio::test]
    async fn confluent_kafka_python_client_authenticates_with_basic_auth_user_info() {
        let python = std::env::var("PULSE_TEST_PYTHON").expect(
            "PULSE_TEST_PYTHON is not set: run the tests with scripts/test.sh (it provides the venv)",
        );
        let r = Registry::start(&[
            (WRITER.0, Role::Write, WRITER.1),
            (READER.0, Role::Read, READER.1),
        ])
        .await;
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/python/schema_registry_client.py"
        );
        let prefix = pulse_tests::unique("py-auth");
        let out = Command::new(python)
            .arg(script)
            .arg(&r.base)
            .arg(&prefix)
            .env("SR_WRITE_USER_INFO", format!("{}:{}", WRITER.0, WRITER.1))
            .env("SR_READ_USER_INFO", format!("{}:{}", READER.0, READER.1))
            .output()
            .await
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(
            text.contains("with basic auth (read and write users): all checks passed"),
            "{text}"
        );
        // The server saw the refusals the client reported: the read user's three writes
        // (403) and the anonymous and wrong-password reads (401).
        assert!(r.failures("forbidden").await >= 3.0);
        assert!(r.failures("missing").await >= 1.0);
        assert!(r.failures("wrong_password").await >= 1.0);
        let (s, _, body) = call(
            reqwest::Method::GET,
            format!("{}/subjects?deleted=true", r.base),
            Some(READER),
            None,
        )
        .await;
        assert_eq!(s, 200);
        assert!(
            !body
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v.as_str().is_some_and(|s| s.starts_with(&prefix))),
            "the script deleted its subject permanently: {body}"
        );
    }

    #[tokio::test]
    async fn ingest_and_pulsectl_authenticate_with_the_configured_credentials() {
        let r = Registry::start(&[
            (WRITER.0, Role::Write, WRITER.1),
            (READER.0, Role::Read, READER.1),
        ])
        .await;
        let kafka = pulse_tests::kafka();
        let events_topic = pulse_tests::unique("events");
        let dlq_topic = pulse_tests::unique("dlq");
        let _topics = ingest_server::create_topics(&events_topic, &dlq_topic, 1).await;

        // pulsectl without credentials is refused; with the write user's it registers.
        let pulsectl = |user: Option<&str>, password: Option<&str>| {
            let mut c = Command::new(binary("pulsectl"));
            c.args(["schemas", "register", "--schema-registry-url", &r.base])
                .env_remove("PULSE_REGISTRY_USERNAME")
                .env_remove("PULSE_REGISTRY_PASSWORD")
                .env_remove("PULSE_REGISTRY_PASSWORD_FILE")
                .stdin(Stdio::null());
            if let Some(u) = user {
                c.args(["--registry-username", u]);
            }
            if let Some(p) = password {
                c.env("PULSE_REGISTRY_PASSWORD", p);
            }
            c
        };
        let out = pulsectl(None, None).output().await.unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success());
        assert!(text.contains("401"), "{text}");
        let out = pulsectl(Some(WRITER.0), Some(WRITER.1))
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!String::from_utf8_lossy(&out.stdout).contains(WRITER.1));

        // The events schema for this test's topic, then ingest configured with the read
        // user (password from a file) frames events with its id.
        let (s, _, body) = call(
            reqwest::Method::POST,
            format!("{}/subjects/{events_topic}-value/versions", r.base),
            Some(WRITER),
            Some(json!({ "schemaType": "PROTOBUF", "schema": pulse_contracts::schemas::EVENTS.source })),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        let schema_id = body["id"].as_u64().unwrap() as u32;
        let password_file = r.dir.path().join("ingest-password");
        std::fs::write(&password_file, format!("{}\n", READER.1)).unwrap();
        let cfg = ingest_server::config(
            &kafka,
            "auth-key=shop",
            "hmac",
            &events_topic,
            &dlq_topic,
            &[
                "--schema-registry-url",
                &r.base,
                "--registry-username",
                READER.0,
                "--registry-password-file",
                password_file.to_str().unwrap(),
            ],
        );
        let framer: Arc<dyn Framer> = Arc::new(pulse_ingest::registry_encoder(&cfg).unwrap());
        let servers = ingest_server::serve(&kafka, &cfg, framer, "ingest-auth-test").await;
        let event = events::event("auth-e1", "auth-u1", pulse_platform::clock::now_ms())
            .session("s1")
            .page("/home")
            .json();
        let resp = reqwest::Client::new()
            .post(format!("http://{}/v1/events", servers.http_addr))
            .bearer_auth("auth-key")
            .json(&json!([event]))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap();
        assert_eq!((status, &body["accepted"]), (200, &json!(1)), "{body}");
        let records = ingest_server::read_exactly(&events_topic, 1).await;
        use rdkafka::Message as _;
        let framed = pulse_contracts::wire::unframe(records[0].payload().unwrap()).unwrap();
        assert_eq!(framed.schema_id, schema_id);
        servers.stop().await.unwrap();

        // Without credentials the same lookup is refused by the registry.
        let anonymous = pulse_contracts::wire::RegistryEncoder::new(&r.base)
            .encode(&events_topic, "pulse.events.v1.Event", b"")
            .await
            .unwrap_err();
        assert!(anonymous.to_string().contains("401"), "{anonymous}");

        // The processor takes the same flags (password from the environment is covered
        // by its unit test); its encoder finds the id with the read user.
        let processor = pulse_processor::Config::parse_from([
            "pulse-processor",
            "--schema-registry-url",
            &r.base,
            "--registry-username",
            READER.0,
            "--registry-password-file",
            password_file.to_str().unwrap(),
        ]);
        let framed = pulse_processor::registry_encoder(&processor)
            .unwrap()
            .encode(&events_topic, "pulse.events.v1.Event", b"")
            .await
            .unwrap();
        assert_eq!(
            pulse_contracts::wire::unframe(&framed).unwrap().schema_id,
            schema_id
        );
    }
}
