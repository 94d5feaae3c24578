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
    use rdkafka::consumer::{BaseConsumer, Consumer};
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
        topic: String,
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
                topic: topic.clone(),
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

        /// The end offset of the registry's `_schemas` topic.
        fn log_end(&self) -> i64 {
            let c: BaseConsumer = pulse_tests::kafka()
                .client_config("schemas-end")
                .create()
                .unwrap();
            c.fetch_watermarks(&self.topic, 0, Duration::from_secs(10))
                .unwrap()
                .1
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
    async fn repeated_identical_writes_do_not_grow_the_schemas_log() {
        use reqwest::Method as M;
        let r = Registry::start(&[(WRITER.0, Role::Write, WRITER.1)]).await;
        let b = &r.base;
        let config = || Some(json!({ "compatibility": "FULL" }));
        for url in [format!("{b}/config/c-value"), format!("{b}/config")] {
            assert_eq!(call(M::PUT, url, Some(WRITER), config()).await.0, 200);
        }
        let (s, _, first) = call(
            M::POST,
            format!("{b}/subjects/c-value/versions"),
            Some(WRITER),
            schema_body(3),
        )
        .await;
        assert_eq!(s, 200, "{first}");
        let end = r.log_end();
        assert_eq!(end, 3, "one record per distinct write");
        for _ in 0..5 {
            for url in [format!("{b}/config/c-value"), format!("{b}/config")] {
                let (s, _, body) = call(M::PUT, url, Some(WRITER), config()).await;
                assert_eq!((s, &body["compatibility"]), (200, &json!("FULL")), "{body}");
            }
            let (s, _, body) = call(
                M::POST,
                format!("{b}/subjects/c-value/versions"),
                Some(WRITER),
                schema_body(3),
            )
            .await;
            assert_eq!((s, &body["id"]), (200, &first["id"]), "{body}");
        }
        assert_eq!(r.log_end(), end, "identical writes appended records");
        // A different level is a real change and is written.
        let (s, _, _) = call(
            M::PUT,
            format!("{b}/config/c-value"),
            Some(WRITER),
            Some(json!({"compatibility": "NONE"})),
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(r.log_end(), end + 1);
        let (_, _, body) = call(M::GET, format!("{b}/config/c-value"), Some(WRITER), None).await;
        assert_eq!(body["compatibilityLevel"], "NONE");
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
