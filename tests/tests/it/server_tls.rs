//! TLS and limits of Pulse's own servers, against the real binaries and the real server
//! code: `pulse-query-api` started with certificates the test makes (`openssl` CLI) and
//! called with curl, reqwest and tonic; a certificate replaced on disk and served without a
//! restart; mutual TLS; and the limits (a body trickled or stalled, more concurrent slow
//! requests than allowed) on a schema registry replica.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pulse_platform::server::ServerArgs;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::support::child_process::free_port;
use crate::support::service_process::{ServiceCommand, ServiceProcess, free_addr};
use crate::support::tls::{make_ca, make_client_cert, make_server_cert, work_dir};
use crate::support::{cleanup, metric_sum, wait_until};

const TOKEN: &str = "server-tls-test-token";

/// A CA (named after `name`) and a server certificate for 127.0.0.1/localhost it signed,
/// in a folder of their own: (CA, server certificate, server key).
pub(crate) fn pki(name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = work_dir(name);
    // A CA name of its own (its subject), so that another test CA is not mistaken for it.
    let ca_name = format!("{name}-ca");
    let ca = make_ca(&dir, &ca_name);
    let (cert, key) = make_server_cert(&dir, &ca_name);
    (ca, cert, key)
}

/// A `pulse-query-api` process (killed when dropped). ClickHouse is not needed for what
/// these tests call: the OpenAPI document, gRPC health and the admin server.
struct Api {
    process: ServiceProcess,
    http: String,
    grpc: String,
    admin: String,
    /// Its log file (also a file that holds no certificate, for a test).
    log: PathBuf,
}

impl Api {
    fn spawn(dir: &Path, args: &[&str]) -> Self {
        let (http, grpc) = (free_addr(), free_addr());
        let mut command = ServiceCommand::new("pulse-query-api");
        command
            .env("PULSE_QUERY_API_TOKENS", TOKEN)
            .args(["--clickhouse-url", &pulse_tests::clickhouse().url])
            .args(["--http-addr", &http, "--grpc-addr", &grpc])
            .args(args);
        let admin = command.admin().to_owned();
        let log = dir.join("query-api.log");
        let process = command.spawn(log.clone());
        Self {
            process,
            http,
            grpc,
            admin,
            log,
        }
    }

    fn logs(&self) -> String {
        self.process.logs()
    }

    /// Waits until `/readyz` of the admin server answers 200 to `client` over `scheme`.
    async fn wait_ready(&mut self, client: &reqwest::Client, scheme: &str) {
        let url = format!("{scheme}://{}/readyz", self.admin);
        self.process
            .wait_for(
                Duration::from_secs(30),
                "query-api ready",
                async || match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => Ok(()),
                    Ok(r) => Err(r.status().to_string()),
                    Err(e) => Err(chain(&e)),
                },
            )
            .await;
    }
}

/// An error with all its sources, as a user would read them.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A reqwest client that trusts only `ca` (and opens a new connection per request, so each
/// request makes a new handshake).
pub(crate) fn client_trusting(ca: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca).unwrap();
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// curl's (exit code, HTTP status or error text) for `url`, trusting `ca`, with `extra`.
fn curl(url: &str, ca: &Path, extra: &[&str]) -> (i32, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .arg("--cacert")
        .arg(ca)
        .args(extra)
        .arg(url)
        .output()
        .expect("curl");
    let code = out.status.code().unwrap_or(-1);
    let text = if code == 0 {
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    (code, text)
}

/// gRPC health of the query service over TLS, trusting `ca` (with a client identity if
/// given).
async fn grpc_health(
    addr: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<i32, String> {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| chain(&e))?
        .connect()
        .await
        .map_err(|e| chain(&e))?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let answer = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "pulse.query.v1.QueryService".into(),
        })
        .await
        .map_err(|s| format!("{s:?}"))?;
    Ok(answer.into_inner().status)
}

async fn scrape(client: &reqwest::Client, url: &str) -> String {
    client.get(url).send().await.unwrap().text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_query_api_serves_https_and_grpc_over_tls_and_refuses_what_it_should() {
    let (ca, cert, key) = pki("server-tls");
    let (wrong_ca, _, _) = pki("server-tls-wrong");
    let dir = ca.parent().unwrap().to_owned();
    let (cert_s, key_s) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let mut api = Api::spawn(
        &dir,
        &[
            "--tls-cert-file",
            cert_s,
            "--tls-key-file",
            key_s,
            "--admin-tls-cert-file",
            cert_s,
            "--admin-tls-key-file",
            key_s,
        ],
    );
    let trusting = client_trusting(&ca);
    api.wait_ready(&trusting, "https").await;
    let openapi = format!("https://{}/openapi.json", api.http);

    // The project's client and curl, trusting the CA, get answers over HTTPS.
    let r = trusting.get(&openapi).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(curl(&openapi, &ca, &[]), (0, "200".into()));
    assert_eq!(
        curl(
            &format!("https://localhost:{}/v1/freshness", port(&api.http)),
            &ca,
            &["-H", &format!("Authorization: Bearer {TOKEN}")]
        )
        .0,
        0,
        "a token-protected route answers over TLS too (whatever ClickHouse says)"
    );
    // gRPC over TLS (ALPN h2) with tonic.
    assert_eq!(grpc_health(&api.grpc, &ca, None).await, Ok(1), "SERVING");

    // pulsectl's ingest clients (`loadgen --ca-file`) get answers (refusals: this is not
    // ingest) with the CA, and a certificate error without it.
    {
        use pulsectl::ingest_client::{GrpcIngest, HttpIngest, SendError};
        let timeout = Duration::from_secs(10);
        let https = format!("https://{}", api.http);
        let with_ca = HttpIngest::new_with_ca(&https, "k", timeout, Some(&ca)).unwrap();
        let e = with_ca.post(b"[]".to_vec()).await.unwrap_err();
        assert!(matches!(e, SendError::Refused { .. }), "{e}");
        let without = HttpIngest::new(&https, "k", timeout).unwrap();
        let e = without.post(b"[]".to_vec()).await.unwrap_err();
        // A certificate error: not retried (see tests/it/dlq.rs).
        assert!(matches!(e, SendError::Tls { .. }), "{e}");
        assert!(e.to_string().contains("UnknownIssuer"), "{e}");
        let grpc =
            GrpcIngest::connect_with_ca(&format!("https://{}", api.grpc), "k", timeout, Some(&ca))
                .await
                .unwrap();
        let e = grpc.send(Vec::new()).await.unwrap_err();
        assert!(
            e.to_string().contains("Unimplemented") || e.to_string().contains("unimplemented"),
            "{e}"
        );
        let e = GrpcIngest::connect_with_ca(
            &format!("https://{}", api.grpc),
            "k",
            timeout,
            Some(&api.log),
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("holds no PEM certificate"), "{e}");
    }

    // Plain HTTP to a TLS port gets no answer.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/openapi.json", api.http))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP answered: {plain:?}");
    let plain_grpc = tonic::transport::Channel::from_shared(format!("http://{}", api.grpc))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plain_grpc {
        let r = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await;
        assert!(r.is_err(), "plain gRPC answered: {r:?}");
    }

    // A client that trusts another CA fails with a clear certificate error.
    let e = client_trusting(&wrong_ca)
        .get(&openapi)
        .send()
        .await
        .unwrap_err();
    let text = chain(&e);
    assert!(
        text.contains("invalid peer certificate") && text.contains("UnknownIssuer"),
        "{text}"
    );
    let (code, text) = curl(&openapi, &wrong_ca, &[]);
    assert_eq!(
        code, 60,
        "curl: peer certificate cannot be authenticated: {text}"
    );
    assert!(text.contains("SSL certificate problem"), "{text}");
    let e = grpc_health(&api.grpc, &wrong_ca, None).await.unwrap_err();
    assert!(e.contains("UnknownIssuer"), "{e}");

    // The admin server has its own TLS; its metrics count the failed handshakes.
    let metrics = scrape(&trusting, &format!("https://{}/metrics", api.admin)).await;
    let failures = metric_sum(
        &metrics,
        "pulse_tls_handshake_failures_total",
        &["listener=\"service\""],
    )
    .unwrap();
    assert!(
        failures >= 3.0,
        "plain HTTP, plain gRPC, wrong CA x3: {failures}"
    );
    let expiry = metric_sum(
        &metrics,
        "pulse_tls_cert_expiry_timestamp_seconds",
        &["listener=\"service\""],
    )
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now + 86_400.0..now + 3.0 * 86_400.0).contains(&expiry),
        "the test certificate is valid for 2 days: {expiry} vs now {now}"
    );
    assert!(
        metrics.contains("# HELP pulse_tls_reload_total"),
        "{metrics}"
    );
}

fn port(addr: &str) -> &str {
    addr.rsplit_once(':').unwrap().1
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_certificate_is_served_without_a_restart_and_a_bad_one_is_not() {
    let (ca1, cert, key) = pki("server-tls-reload-1");
    let (ca2, cert2, key2) = pki("server-tls-reload-2");
    let dir = ca1.parent().unwrap().to_owned();
    let (audit_topic, _audit_guard, _) = crate::audit::new_audit_topic("tls-reload").await;
    let brokers = pulse_tests::kafka().brokers;
    let mut api = Api::spawn(
        &dir,
        &[
            "--tls-cert-file",
            cert.to_str().unwrap(),
            "--tls-key-file",
            key.to_str().unwrap(),
            "--tls-reload-interval",
            "200ms",
            "--kafka-brokers",
            &brokers,
            "--audit-topic",
            &audit_topic,
        ],
    );
    let plain = reqwest::Client::new();
    api.wait_ready(&plain, "http").await;
    let pid = api.process.pid();
    let openapi = format!("https://{}/openapi.json", api.http);
    let metrics_url = format!("http://{}/metrics", api.admin);
    let (old, new) = (client_trusting(&ca1), client_trusting(&ca2));
    assert_eq!(old.get(&openapi).send().await.unwrap().status(), 200);
    assert!(new.get(&openapi).send().await.is_err());

    // Replace the pair in place (key first, as a secret update may do it in any order).
    std::fs::copy(&key2, &key).unwrap();
    std::fs::copy(&cert2, &cert).unwrap();
    let started = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "the new certificate served",
        async || match new.get(&openapi).send().await {
            Ok(r) if r.status() == 200 => Ok(()),
            Ok(r) => Err(r.status().to_string()),
            Err(e) => Err(chain(&e)),
        },
    )
    .await;
    eprintln!("new certificate served after {:?}", started.elapsed());
    let e = old.get(&openapi).send().await.unwrap_err();
    assert!(chain(&e).contains("UnknownIssuer"), "{}", chain(&e));
    assert_eq!(curl(&openapi, &ca2, &[]), (0, "200".into()));
    api.process.assert_running();
    assert_eq!(api.process.pid(), pid, "no restart");
    let metrics = scrape(&plain, &metrics_url).await;
    let ok = |m: &str| {
        metric_sum(
            m,
            "pulse_tls_reload_total",
            &["listener=\"service\"", "outcome=\"ok\""],
        )
        .unwrap()
    };
    let errors = |m: &str| {
        metric_sum(
            m,
            "pulse_tls_reload_total",
            &["listener=\"service\"", "outcome=\"error\""],
        )
        .unwrap()
    };
    assert!(ok(&metrics) >= 1.0, "{metrics}");
    let errors_before = errors(&metrics);

    // A broken certificate file is refused: the last good one stays in use.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    wait_until(
        Duration::from_secs(10),
        "the failed reload counted",
        async || {
            let m = scrape(&plain, &metrics_url).await;
            if errors(&m) > errors_before {
                Ok(())
            } else {
                Err(errors(&m))
            }
        },
    )
    .await;
    assert_eq!(new.get(&openapi).send().await.unwrap().status(), 200);
    assert!(
        api.logs().contains("tls certificate reload failed"),
        "{}",
        api.logs()
    );

    // Both are key changes in the audit trail: the rotation `ok`, the broken file
    // `failed` with the reason; actor `file`, target the certificate file.
    let records = wait_until(
        Duration::from_secs(20),
        "both reloads in the audit trail",
        async || {
            let records = crate::audit::audit_json(
                &audit_topic,
                &["--action", pulse_platform::audit::action::TLS_RELOAD],
            )
            .await;
            let outcomes: Vec<_> = records.iter().map(|r| r.outcome).collect();
            if outcomes.contains(&pulse_platform::audit::Outcome::Ok)
                && outcomes.contains(&pulse_platform::audit::Outcome::Failed)
            {
                Ok(records)
            } else {
                Err(format!("{records:?}"))
            }
        },
    )
    .await;
    for r in &records {
        assert_eq!(
            (r.service.as_str(), r.actor.as_str(), r.target.as_str()),
            ("query-api", "file", cert.to_str().unwrap()),
            "{r:?}"
        );
        assert!(r.detail.starts_with("service listener: "), "{r:?}");
    }
    assert!(
        records
            .iter()
            .any(|r| r.outcome == pulse_platform::audit::Outcome::Failed
                && r.detail.contains("the previous certificate stays in use")),
        "{records:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_refuses_a_client_without_a_certificate_of_the_client_ca() {
    let (ca, cert, key) = pki("server-mtls");
    let dir = ca.parent().unwrap().to_owned();
    let clients = work_dir("server-mtls-clients");
    make_ca(&clients, "client-ca");
    let (client_cert, client_key) =
        make_client_cert(&clients, "client-ca", "pulse-test-client", None);
    let mut api = Api::spawn(
        &dir,
        &[
            "--tls-cert-file",
            cert.to_str().unwrap(),
            "--tls-key-file",
            key.to_str().unwrap(),
            "--tls-client-ca-file",
            clients.join("client-ca.pem").to_str().unwrap(),
        ],
    );
    api.wait_ready(&reqwest::Client::new(), "http").await;
    let openapi = format!("https://{}/openapi.json", api.http);

    // Refused either way; which error the client reports races the request's write against
    // the server's alert (TLS 1.3 refuses the missing certificate after the client's side of
    // the handshake is done): the alert ("certificate required") or the closed connection.
    let e = client_trusting(&ca).get(&openapi).send().await.unwrap_err();
    let text = chain(&e).to_lowercase();
    assert!(
        text.contains("certificate") || text.contains("connection"),
        "{text}"
    );
    let (code, text) = curl(&openapi, &ca, &[]);
    assert_ne!(code, 0, "curl without a client certificate got {text}");

    let (cert_s, key_s) = (client_cert.to_str().unwrap(), client_key.to_str().unwrap());
    assert_eq!(
        curl(&openapi, &ca, &["--cert", cert_s, "--key", key_s]),
        (0, "200".into())
    );
    let mut pem = std::fs::read(&client_cert).unwrap();
    pem.extend(std::fs::read(&client_key).unwrap());
    let with_identity = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
        .identity(reqwest::Identity::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    assert_eq!(
        with_identity.get(&openapi).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        grpc_health(&api.grpc, &ca, Some((&client_cert, &client_key))).await,
        Ok(1)
    );
    assert!(grpc_health(&api.grpc, &ca, None).await.is_err());
}

// ---------------------------------------------------------------------------------------
// Limits, on a schema registry replica (its register route reads a JSON body)

struct LimitedRegistry {
    replica: pulse_schema_registry::Replica,
    _topic: cleanup::Topics,
}

async fn registry_with(args: &[&str]) -> LimitedRegistry {
    use clap::Parser as _;
    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        server: ServerArgs,
    }
    let flags = Flags::parse_from(std::iter::once("test").chain(args.iter().copied()));
    let topic = pulse_tests::unique("_schemas");
    let replica = pulse_schema_registry::Replica::start_with_server(
        &pulse_tests::kafka(),
        &topic,
        Duration::from_secs(30),
        Duration::from_secs(60),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        pulse_schema_registry::auth::Access::anonymous(),
        &flags.server.settings().unwrap(),
    )
    .await
    .unwrap();
    LimitedRegistry {
        replica,
        _topic: cleanup::Topics::adopt([topic]),
    }
}

/// Opens a POST of a 1000-byte JSON body and sends its first byte.
async fn start_slow_post(addr: std::net::SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        b"POST /subjects/slow-value/versions HTTP/1.1\r\nHost: registry\r\n\
          Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
    )
    .await
    .unwrap();
    tcp
}

/// Sends a body byte every `every` until the server answers or closes; returns the
/// answer's head (empty if it closed without one) and when it came.
async fn trickle_until_answered(mut tcp: TcpStream, every: Duration) -> (String, Instant) {
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            n = tcp.read(&mut buf) => {
                let n = n.unwrap_or(0);
                return (String::from_utf8_lossy(&buf[..n]).into_owned(), Instant::now());
            }
            _ = tokio::time::sleep(every) => {
                if tcp.write_all(b" ").await.is_err() {
                    return (String::new(), Instant::now());
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trickled_or_stalled_body_is_cut_and_requests_over_the_limit_get_503() {
    let handle = pulse_platform::metrics::install("server-tls-test").unwrap();
    let registry = registry_with(&[
        "--request-body-timeout",
        "1s",
        "--request-timeout",
        "3s",
        "--max-concurrent-requests",
        "2",
        "--limit-retry-after-secs",
        "7",
    ])
    .await;
    let addr = registry.replica.addr;

    // A body that stalls after its first byte: cut after the body timeout.
    let started = Instant::now();
    let stalled = start_slow_post(addr).await;
    let (head, at) = trickle_until_answered(stalled, Duration::from_secs(60)).await;
    let took = at - started;
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "cut after {took:?}: {head}"
    );
    assert!(head.starts_with("HTTP/1.1 4"), "{head}");

    // Two bodies trickled just fast enough (a byte every 300 ms) hold both slots…
    let started = Instant::now();
    let slow = [start_slow_post(addr).await, start_slow_post(addr).await]
        .map(|tcp| tokio::spawn(trickle_until_answered(tcp, Duration::from_millis(300))));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // …so the next request is refused at once with 503 and Retry-After.
    let r = reqwest::get(format!("http://{addr}/subjects"))
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "7");
    let body = r.text().await.unwrap();
    assert!(body.contains("concurrent requests"), "{body}");
    // The trickled requests are cut by the request timeout, with 503 and Retry-After.
    for task in slow {
        let (head, at) = task.await.unwrap();
        let took = at - started;
        assert!(
            took >= Duration::from_millis(2900) && took < Duration::from_millis(4500),
            "cut after {took:?}: {head}"
        );
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        assert!(head.to_lowercase().contains("retry-after: 7"), "{head}");
    }
    let r = reqwest::get(format!("http://{addr}/subjects"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "slots free again");

    let text = handle.render();
    for (limit, at_least) in [
        ("body_timeout", 1.0),
        ("request_timeout", 2.0),
        ("concurrency", 1.0),
    ] {
        let n = metric_sum(
            &text,
            "pulse_server_limited_total",
            &["server=\"http\"", &format!("limit=\"{limit}\"")],
        )
        .unwrap_or(0.0);
        assert!(n >= at_least, "{limit}: {n}\n{text}");
    }
    registry.replica.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grpc_call_over_the_concurrency_limit_gets_unavailable_with_retry_after() {
    use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
    let dir = work_dir("server-grpc-limits");
    let mut api = Api::spawn(
        &dir,
        &[
            "--max-concurrent-requests",
            "1",
            "--request-body-timeout",
            "1500ms",
            "--request-timeout",
            "10s",
            "--limit-retry-after-secs",
            "4",
        ],
    );
    let plain = reqwest::Client::new();
    api.wait_ready(&plain, "http").await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", api.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();

    // A call whose request message never comes holds the one slot…
    let held = {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        tokio::spawn(async move {
            grpc.ready().await.unwrap();
            let started = Instant::now();
            let never = futures::stream::pending::<HealthCheckRequest>();
            let r = grpc
                .client_streaming(
                    tonic::Request::new(never),
                    "/grpc.health.v1.Health/Check".parse().unwrap(),
                    tonic_prost::ProstCodec::<HealthCheckRequest, HealthCheckResponse>::default(),
                )
                .await;
            (r, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // …so the next call is refused at once with UNAVAILABLE and retry-after metadata.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let refused = health
        .check(HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(refused.metadata().get("retry-after").unwrap(), "4");
    assert!(
        refused.message().contains("concurrent requests"),
        "{refused:?}"
    );
    // The held call is cut by the body timeout; then calls are served again.
    let (r, took) = held.await.unwrap();
    assert!(r.is_err(), "{r:?}");
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(5),
        "cut after {took:?}"
    );
    assert!(health.check(HealthCheckRequest::default()).await.is_ok());

    let metrics = scrape(&plain, &format!("http://{}/metrics", api.admin)).await;
    for limit in ["concurrency", "body_timeout"] {
        let n = metric_sum(
            &metrics,
            "pulse_server_limited_total",
            &["server=\"grpc\"", &format!("limit=\"{limit}\"")],
        )
        .unwrap();
        assert!(n >= 1.0, "{limit}: {n}");
    }
    assert!(
        metrics.contains("# HELP pulse_server_limited_total"),
        "{metrics}"
    );
}

// ---------------------------------------------------------------------------------------
// Services whose only server is the admin server: the processor and the writers

/// A `pulse-processor` or `pulse-writer` process (killed when dropped) that stays up
/// waiting for a dependency (a schema registry or a broker nothing answers for), so that
/// only its admin server is exercised.
struct AdminOnly {
    process: ServiceProcess,
    _topics: Option<cleanup::Topics>,
}

impl AdminOnly {
    /// The processor on the test broker, with topics of its own and a schema registry URL
    /// where nothing listens: it waits for its schemas, alive and not ready.
    fn processor(dir: &Path, args: &[&str]) -> Self {
        let mut all: Vec<String> = vec![
            "--group-id".into(),
            pulse_tests::unique("admin_tls"),
            "--schema-registry-url".into(),
            format!("http://127.0.0.1:{}", free_port()),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        let topics = [
            "--events-topic",
            "--user-activity-topic",
            "--sessions-topic",
            "--late-topic",
            "--checkpoint-topic",
        ];
        Self::on_broker(dir, "pulse-processor", &[], &topics, &all)
    }

    /// A writer of `sink` whose broker does not answer: it waits for it, alive and not
    /// ready (the parquet writer is given an S3 endpoint where nothing listens either).
    fn writer(dir: &Path, sink: &str, args: &[&str]) -> Self {
        let nowhere = format!("127.0.0.1:{}", free_port());
        let mut all: Vec<String> = ["--sink", sink, "--kafka-brokers", &nowhere]
            .map(String::from)
            .to_vec();
        if sink == "parquet" {
            all.extend(
                [
                    "--s3-endpoint",
                    &format!("http://{nowhere}"),
                    "--s3-access-key-file",
                    &pulse_tests::secret_file("admin-tls-s3-access", "a"),
                    "--s3-secret-key-file",
                    &pulse_tests::secret_file("admin-tls-s3-secret", "s"),
                ]
                .map(String::from),
            );
        } else {
            all.extend(["--clickhouse-url".into(), format!("http://{nowhere}")]);
        }
        all.extend(args.iter().map(|a| a.to_string()));
        Self::spawn(dir, "pulse-writer", &[], &all)
    }

    /// `pulsectl ledger watch` whose sources do not answer (broker, ClickHouse, S3 and query
    /// API where nothing listens): it retries opening them, alive and not ready.
    fn ledger(dir: &Path, args: &[&str]) -> Self {
        let nowhere = format!("127.0.0.1:{}", free_port());
        let http = format!("http://{nowhere}");
        let mut all: Vec<String> = [
            "--kafka-brokers",
            &nowhere,
            "--clickhouse-url",
            &http,
            "--s3-endpoint",
            &http,
            "--s3-access-key-file",
            &pulse_tests::secret_file("admin-tls-ledger-access", "a"),
            "--s3-secret-key-file",
            &pulse_tests::secret_file("admin-tls-ledger-secret", "s"),
            "--query-url",
            &http,
            "--interval",
            "1s",
        ]
        .map(String::from)
        .to_vec();
        all.extend(args.iter().map(|a| a.to_string()));
        Self::spawn(dir, "pulsectl", &["ledger", "watch"], &all)
    }

    fn spawn(dir: &Path, binary_name: &str, command: &[&str], args: &[String]) -> Self {
        let mut service = ServiceCommand::new(binary_name);
        service.args(command).args(args);
        let log = dir.join(format!("{binary_name}-{}.log", port(service.admin())));
        Self {
            process: service.spawn(log),
            _topics: None,
        }
    }

    fn admin(&self) -> &str {
        self.process.admin()
    }

    /// Waits until `/livez` answers 200 over HTTPS (curl trusting `ca`, with `extra`).
    async fn wait_live(&mut self, ca: &Path, extra: &[&str]) {
        let url = format!("https://localhost:{}/livez", port(self.admin()));
        let what = format!("{url} to answer 200");
        let live = async || match curl(&url, ca, extra) {
            (0, code) if code == "200" => Ok(()),
            other => Err(other),
        };
        self.process
            .wait_for(Duration::from_secs(30), what, live)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_processor_both_writers_and_the_ledger_serve_their_admin_endpoints_over_tls() {
    let (ca, cert, key) = pki("admin-tls");
    let (wrong_ca, _, _) = pki("admin-tls-wrong");
    let dir = ca.parent().unwrap().to_owned();
    let clients = work_dir("admin-tls-clients");
    make_ca(&clients, "admin-client-ca");
    let (client_cert, client_key) =
        make_client_cert(&clients, "admin-client-ca", "pulse-test-client", None);
    let tls = [
        "--admin-tls-cert-file",
        cert.to_str().unwrap(),
        "--admin-tls-key-file",
        key.to_str().unwrap(),
    ];
    let mut mtls = tls.to_vec();
    let client_ca = clients.join("admin-client-ca.pem");
    mtls.extend(["--admin-tls-client-ca-file", client_ca.to_str().unwrap()]);
    let identity = [
        "--cert",
        client_cert.to_str().unwrap(),
        "--key",
        client_key.to_str().unwrap(),
    ];

    let mut services = [
        ("processor", AdminOnly::processor(&dir, &tls), false),
        (
            "writer clickhouse",
            AdminOnly::writer(&dir, "clickhouse", &tls),
            false,
        ),
        (
            "writer parquet",
            AdminOnly::writer(&dir, "parquet", &mtls),
            true,
        ),
        ("ledger watch", AdminOnly::ledger(&dir, &mtls), true),
    ];
    for (name, service, mutual) in &mut services {
        let extra: &[&str] = if *mutual { &identity } else { &[] };
        service.wait_live(&ca, extra).await;
        let url = |path: &str| format!("https://localhost:{}{path}", port(service.admin()));
        // curl trusting the CA reads all three endpoints over TLS; /readyz is 503 while
        // the service waits for its dependency.
        assert_eq!(
            curl(&url("/metrics"), &ca, extra),
            (0, "200".into()),
            "{name}"
        );
        assert_eq!(
            curl(&url("/readyz"), &ca, extra),
            (0, "503".into()),
            "{name}"
        );
        // A CA that did not sign the certificate: curl refuses (exit 60).
        let (code, text) = curl(&url("/livez"), &wrong_ca, extra);
        assert_eq!(code, 60, "{name}: {text}");
        // Plain HTTP to the TLS port gets no HTTP answer.
        let (code, text) = curl(&format!("http://{}/livez", service.admin()), &ca, &[]);
        assert!(code != 0 || text == "000", "{name}: plain HTTP got {text}");
        if *mutual {
            let (code, text) = curl(&url("/livez"), &ca, &[]);
            assert_ne!(code, 0, "{name}: no client certificate, yet {text}");
        }
        // The admin listener's certificate and handshake failures are in its metrics.
        let scraped = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&ca)
            .args(extra)
            .arg(url("/metrics"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&scraped.stdout);
        let expiry = metric_sum(
            &text,
            "pulse_tls_cert_expiry_timestamp_seconds",
            &["listener=\"admin\""],
        );
        assert!(expiry.is_some_and(|t| t > 1.0e9), "{name}: {text}");
        let failures = metric_sum(
            &text,
            "pulse_tls_handshake_failures_total",
            &["listener=\"admin\""],
        )
        .unwrap_or(0.0);
        assert!(
            failures >= 2.0,
            "{name}: {failures} handshake failures\n{text}"
        );
    }
}

/// A rustls client stream to `addr` (127.0.0.1) trusting `ca`.
async fn tls_connect(addr: &str, ca: &Path) -> tokio_rustls::client::TlsStream<TcpStream> {
    use std::sync::Arc;
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).unwrap())
        .unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_dribbling_its_headers_to_an_admin_server_is_closed_after_the_header_read_timeout()
{
    let (ca, cert, key) = pki("header-timeout");
    let dir = ca.parent().unwrap().to_owned();
    let mut writer = AdminOnly::writer(
        &dir,
        "clickhouse",
        &[
            "--admin-tls-cert-file",
            cert.to_str().unwrap(),
            "--admin-tls-key-file",
            key.to_str().unwrap(),
            "--header-read-timeout",
            "1s",
        ],
    );
    writer.wait_live(&ca, &[]).await;

    // Over TLS, a request's headers one byte every 200 ms (never finished): the writer
    // closes the connection about a second after it opened, without an answer.
    let mut tls = tls_connect(writer.admin(), &ca).await;
    let started = Instant::now();
    let head = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Slow: ";
    let mut bytes = head.iter().chain(std::iter::repeat(&b'a'));
    let mut buf = [0u8; 256];
    let (took, answer) = loop {
        tokio::select! {
            n = tls.read(&mut buf) => {
                let n = n.unwrap_or(0);
                break (started.elapsed(), String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if tls.write_all(&[*bytes.next().unwrap()]).await.is_err() {
                    break (started.elapsed(), String::new());
                }
            }
        }
        assert!(started.elapsed() < Duration::from_secs(15), "never closed");
    };
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(3000),
        "closed after {took:?}"
    );
    assert!(!answer.contains("200"), "answered: {answer}");
    // A client that connects and sends nothing is closed likewise.
    let mut silent = tls_connect(writer.admin(), &ca).await;
    let started = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(15), silent.read(&mut buf))
        .await
        .expect("the silent connection was never closed")
        .unwrap_or(0);
    let took = started.elapsed();
    assert_eq!(n, 0, "{}", String::from_utf8_lossy(&buf[..n]));
    assert!(took < Duration::from_millis(3000), "closed after {took:?}");

    // Both are counted; a normal request is still served.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&ca)
        .arg(format!(
            "https://localhost:{}/metrics",
            port(writer.admin())
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let n = metric_sum(
        &text,
        "pulse_server_limited_total",
        &["server=\"admin\"", "limit=\"header_timeout\""],
    )
    .unwrap_or(0.0);
    assert!(n >= 2.0, "{n} header timeouts counted\n{text}");
}

// ---------------------------------------------------------------------------------------
// The admin-only services' certificate rotations in the audit trail

impl AdminOnly {
    /// `binary_name` (with `command`) on the test broker (single-broker topic settings),
    /// each of `topic_flags` given a topic of its own (removed when it is dropped), and
    /// `args`: the writers and the ledger as the constructors above give them, but with a
    /// broker that answers, which their audit records need.
    fn on_broker(
        dir: &Path,
        binary_name: &str,
        command: &[&str],
        topic_flags: &[&str],
        args: &[String],
    ) -> Self {
        let names: Vec<String> = topic_flags
            .iter()
            .map(|flag| pulse_tests::unique(&format!("admin_audit_{}", flag.trim_matches('-'))))
            .collect();
        let mut all: Vec<String> = [
            "--kafka-brokers",
            &pulse_tests::kafka().brokers,
            "--kafka-partitions",
            "1",
            "--kafka-replication-factor",
            "1",
            "--kafka-min-insync-replicas",
            "1",
        ]
        .map(String::from)
        .to_vec();
        for (flag, name) in topic_flags.iter().zip(&names) {
            all.extend([flag.to_string(), name.clone()]);
        }
        all.extend(args.iter().cloned());
        let mut p = Self::spawn(dir, binary_name, command, &all);
        p._topics = Some(cleanup::Topics::adopt(names));
        p
    }
}

/// The `keys.tls.reload` records of `topic` written at or after `since_ms`.
async fn tls_reloads_since(topic: &str, since_ms: i64) -> Vec<pulse_platform::audit::AuditRecord> {
    crate::audit::audit_json(
        topic,
        &["--action", pulse_platform::audit::action::TLS_RELOAD],
    )
    .await
    .into_iter()
    .filter(|r| r.ts_ms >= since_ms)
    .collect()
}

/// Waits until every service of `services` has a `keys.tls.reload` record of `outcome`
/// written at or after `since_ms` in `topic`; returns those records.
async fn wait_for_reload_records(
    topic: &str,
    services: &[&str],
    outcome: pulse_platform::audit::Outcome,
    since_ms: i64,
) -> Vec<pulse_platform::audit::AuditRecord> {
    wait_until(
        Duration::from_secs(60),
        format!("a {outcome} keys.tls.reload record of each of {services:?}"),
        async || {
            let records: Vec<_> = tls_reloads_since(topic, since_ms)
                .await
                .into_iter()
                .filter(|r| r.outcome == outcome)
                .collect();
            let missing: Vec<&str> = services
                .iter()
                .copied()
                .filter(|s| !records.iter().any(|r| r.service == *s))
                .collect();
            if missing.is_empty() {
                Ok(records)
            } else {
                Err(format!("missing {missing:?}; records {records:?}"))
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_processor_both_writers_and_the_ledger_audit_their_admin_certificate_reloads() {
    use pulse_platform::audit::Outcome;
    let (ca1, cert, key) = pki("admin-tls-audit-1");
    let (ca2, cert2, key2) = pki("admin-tls-audit-2");
    let dir = ca1.parent().unwrap().to_owned();
    let (audit_topic, _audit_guard, _) = crate::audit::new_audit_topic("admin-tls-audit").await;
    let key_pem = std::fs::read_to_string(&key2).unwrap();
    let tls_audit: Vec<String> = [
        "--admin-tls-cert-file",
        cert.to_str().unwrap(),
        "--admin-tls-key-file",
        key.to_str().unwrap(),
        "--tls-reload-interval",
        "200ms",
        "--audit-topic",
        &audit_topic,
    ]
    .map(String::from)
    .to_vec();
    let with = |args: &[&str]| -> Vec<String> {
        args.iter()
            .map(|a| a.to_string())
            .chain(tls_audit.iter().cloned())
            .collect()
    };
    // Each waits for a dependency where nothing listens (the schema registry, ClickHouse,
    // S3), alive and not ready, with its admin server up; the broker answers.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let s3_keys = [
        "--s3-access-key-file",
        &pulse_tests::secret_file("admin-tls-audit-s3-access", "a"),
        "--s3-secret-key-file",
        &pulse_tests::secret_file("admin-tls-audit-s3-secret", "s"),
    ]
    .map(String::from);
    let s3 = |args: &[&str]| -> Vec<String> {
        let mut all = with(args);
        all.extend(s3_keys.iter().cloned());
        all
    };
    let tls_audit_refs: Vec<&str> = tls_audit.iter().map(String::as_str).collect();
    let mut services = [
        ("processor", AdminOnly::processor(&dir, &tls_audit_refs)),
        (
            "writer-clickhouse",
            AdminOnly::on_broker(
                &dir,
                "pulse-writer",
                &[],
                &[
                    "--events-topic",
                    "--user-activity-topic",
                    "--sessions-topic",
                    "--dlq-topic",
                ],
                &with(&["--sink", "clickhouse", "--clickhouse-url", &nowhere]),
            ),
        ),
        (
            "writer-parquet",
            AdminOnly::on_broker(
                &dir,
                "pulse-writer",
                &[],
                &["--events-topic", "--dlq-topic"],
                &s3(&["--sink", "parquet", "--s3-endpoint", &nowhere]),
            ),
        ),
        (
            "ledger",
            AdminOnly::on_broker(
                &dir,
                "pulsectl",
                &["ledger", "watch"],
                &["--events-topic", "--late-topic", "--dlq-topic"],
                &s3(&[
                    "--clickhouse-url",
                    &nowhere,
                    "--s3-endpoint",
                    &nowhere,
                    "--query-url",
                    &nowhere,
                    "--interval",
                    "1s",
                ]),
            ),
        ),
    ];
    let names: Vec<&str> = services.iter().map(|(name, _)| *name).collect();
    for (_, service) in &mut services {
        service.wait_live(&ca1, &[]).await;
    }

    // A rotation (key first, as a secret update may do it in any order): each serves the
    // new certificate and records an `ok` reload naming itself.
    let swapped_at = pulse_platform::clock::now_ms();
    std::fs::copy(&key2, &key).unwrap();
    std::fs::copy(&cert2, &cert).unwrap();
    for (name, service) in &mut services {
        let url = format!("https://localhost:{}/livez", port(service.admin()));
        wait_until(
            Duration::from_secs(15),
            format!("{name} serving the new certificate"),
            async || match curl(&url, &ca2, &[]) {
                (0, code) if code == "200" => Ok(()),
                other => Err(other),
            },
        )
        .await;
    }
    let ok = wait_for_reload_records(&audit_topic, &names, Outcome::Ok, swapped_at).await;
    // And counted what it wrote.
    for (name, service) in &services {
        let url = format!("https://localhost:{}/metrics", port(service.admin()));
        wait_until(
            Duration::from_secs(10),
            format!("{name} counting its audit record"),
            async || {
                let out = Command::new("curl")
                    .args(["-sS", "--max-time", "10", "--cacert"])
                    .arg(&ca2)
                    .arg(&url)
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                match metric_sum(&text, pulse_platform::audit::RECORDS_WRITTEN_TOTAL, &[]) {
                    Some(n) if n >= 1.0 => Ok(()),
                    _ => Err(text),
                }
            },
        )
        .await;
    }

    // A broken certificate file is refused by each (the new one stays in use) and
    // recorded as `failed` with the reason.
    let broken_at = pulse_platform::clock::now_ms();
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    let failed = wait_for_reload_records(&audit_topic, &names, Outcome::Failed, broken_at).await;
    for (name, service) in &mut services {
        let url = format!("https://localhost:{}/livez", port(service.admin()));
        assert_eq!(curl(&url, &ca2, &[]), (0, "200".into()), "{name}");
    }
    for r in ok.iter().chain(&failed) {
        assert!(names.contains(&r.service.as_str()), "{r:?}");
        assert_eq!(
            (r.actor.as_str(), r.target.as_str()),
            ("file", cert.to_str().unwrap()),
            "{r:?}"
        );
        assert!(r.detail.starts_with("admin listener: "), "{r:?}");
        let json = String::from_utf8(r.to_json()).unwrap();
        assert!(
            !json.contains("PRIVATE KEY") && !json.contains(key_pem.lines().nth(1).unwrap()),
            "a key in the record: {json}"
        );
    }
    for s in &names {
        assert!(
            failed.iter().any(|r| r.service == *s
                && r.outcome == Outcome::Failed
                && r.detail.contains("the previous certificate stays in use")),
            "{s}: {failed:?}"
        );
    }
}
