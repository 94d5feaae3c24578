//! Server-side encryption of the archive (`--s3-sse`, `--s3-sse-kms-key-id`) through the
//! one S3 builder the writer and `pulsectl replay` use ([`S3Config::object_store`]),
//! against the real S3 server of the stack (s3s-fs). s3s-fs accepts the encryption
//! headers but does not encrypt or echo them, so each test puts a recording TCP proxy in
//! front of it and checks the requests as sent: every PutObject and CreateMultipartUpload
//! carries `x-amz-server-side-encryption` (and the KMS key id for `aws:kms`), the server
//! accepts them, and the objects read back whole.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload, WriteMultipart};
use pulse_platform::s3::{S3Config, S3Sse};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::forwarder::address_of;

/// A TCP proxy to the stack's S3 server that keeps every byte clients send.
struct Recorder {
    port: u16,
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let record = sent.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let slot = {
                    let mut all = record.lock().unwrap();
                    all.push(Vec::new());
                    all.len() - 1
                };
                let record = record.clone();
                tokio::spawn(async move {
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let up = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match client_read.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            record.lock().unwrap()[slot].extend_from_slice(&buf[..n]);
                            if server_write.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = server_write.shutdown().await;
                    };
                    let down = async move {
                        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        Self { port, sent, task }
    }

    /// Every request head sent so far: the request line and the headers (names lowercase).
    fn requests(&self) -> Vec<(String, HashMap<String, String>)> {
        let mut out = Vec::new();
        for conn in self.sent.lock().unwrap().iter() {
            let mut at = 0;
            while at < conn.len() {
                let starts_request = at == 0 || conn[at - 1] == b'\n';
                let method = ["PUT /", "POST /", "GET /", "HEAD /", "DELETE /"]
                    .iter()
                    .any(|m| conn[at..].starts_with(m.as_bytes()));
                // Only where a request starts: the end of its head.
                let head_end = (starts_request && method)
                    .then(|| conn[at..].windows(4).position(|w| w == b"\r\n\r\n"))
                    .flatten();
                if let Some(end) = head_end {
                    let head = String::from_utf8_lossy(&conn[at..at + end]).into_owned();
                    let mut lines = head.split("\r\n");
                    let line = lines.next().unwrap_or_default().to_owned();
                    if line.ends_with("HTTP/1.1") {
                        let headers = lines
                            .filter_map(|l| l.split_once(':'))
                            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                            .collect();
                        out.push((line, headers));
                    }
                    at += end + 4;
                    continue;
                }
                at += 1;
            }
        }
        out
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const SSE: &str = "x-amz-server-side-encryption";
const KMS_KEY: &str = "x-amz-server-side-encryption-aws-kms-key-id";

/// A small object (PutObject) and a two-part multipart upload through `cfg`'s store, both
/// read back whole.
async fn upload_both_ways(cfg: &S3Config, prefix: &str) {
    let store = cfg.object_store().unwrap();
    let small = Path::from(format!("{prefix}/small.parquet"));
    let body = bytes::Bytes::from_static(b"PAR1 not really parquet PAR1");
    store
        .put(&small, PutPayload::from(body.clone()))
        .await
        .unwrap();
    assert_eq!(
        store.get(&small).await.unwrap().bytes().await.unwrap(),
        body
    );
    let big = Path::from(format!("{prefix}/big.bin"));
    let data: Vec<u8> = (0..(5 * 1024 * 1024 + 7))
        .map(|i| (i % 251) as u8)
        .collect();
    let mut w = WriteMultipart::new_with_chunk_size(
        store.put_multipart(&big).await.unwrap(),
        5 * 1024 * 1024,
    );
    w.write(&data);
    w.finish().await.unwrap();
    let got = store.get(&big).await.unwrap().bytes().await.unwrap();
    assert!(got.as_ref() == data.as_slice(), "multipart object differs");
}

/// The PutObject of `small.parquet` and the CreateMultipartUpload of `big.bin`.
fn uploads(
    requests: &[(String, HashMap<String, String>)],
) -> Vec<&(String, HashMap<String, String>)> {
    let found: Vec<_> = requests
        .iter()
        .filter(|(line, _)| {
            (line.starts_with("PUT ") && line.contains("/small.parquet "))
                || (line.starts_with("POST ") && line.contains("/big.bin?uploads"))
        })
        .collect();
    assert_eq!(
        found.len(),
        2,
        "PutObject and CreateMultipartUpload: {requests:#?}"
    );
    found
}

#[tokio::test]
async fn sse_kms_is_requested_on_every_put_object_and_multipart_create() {
    let base = pulse_tests::s3();
    let recorder = Recorder::start(address_of(&base.endpoint).await).await;
    let cfg = S3Config {
        endpoint: format!("http://127.0.0.1:{}", recorder.port),
        sse: Some(S3Sse::AwsKms),
        sse_kms_key_id: Some("alias/pulse-archive".into()),
        ..base
    };
    pulse_platform::config::validate_all(&[&cfg]).unwrap();
    upload_both_ways(&cfg, &pulse_tests::unique("sse-kms")).await;
    let requests = recorder.requests();
    for (line, headers) in uploads(&requests) {
        assert_eq!(
            headers.get(SSE).map(String::as_str),
            Some("aws:kms"),
            "{line}"
        );
        assert_eq!(
            headers.get(KMS_KEY).map(String::as_str),
            Some("alias/pulse-archive"),
            "{line}"
        );
    }
}

#[tokio::test]
async fn sse_s3_sends_aes256_and_no_setting_sends_no_encryption_header() {
    let base = pulse_tests::s3();
    let recorder = Recorder::start(address_of(&base.endpoint).await).await;
    let sse_s3 = S3Config {
        endpoint: format!("http://127.0.0.1:{}", recorder.port),
        sse: Some(S3Sse::Aes256),
        ..base.clone()
    };
    upload_both_ways(&sse_s3, &pulse_tests::unique("sse-s3")).await;
    let requests = recorder.requests();
    for (line, headers) in uploads(&requests) {
        assert_eq!(
            headers.get(SSE).map(String::as_str),
            Some("AES256"),
            "{line}"
        );
        assert!(!headers.contains_key(KMS_KEY), "{line}: {headers:?}");
    }
    drop(recorder);

    // The control: without --s3-sse no request asks for encryption (the bucket default).
    let recorder = Recorder::start(address_of(&base.endpoint).await).await;
    let plain = S3Config {
        endpoint: format!("http://127.0.0.1:{}", recorder.port),
        ..base
    };
    upload_both_ways(&plain, &pulse_tests::unique("sse-none")).await;
    let requests = recorder.requests();
    assert_eq!(uploads(&requests).len(), 2);
    for (line, headers) in &requests {
        assert!(
            !headers.keys().any(|k| k.starts_with(SSE)),
            "{line}: {headers:?}"
        );
    }
}
