//! The accept loop every Pulse server runs its listener with: `TCP_NODELAY` on each
//! connection, at most `--max-connections` open at once (a connection beyond it is
//! accepted and refused at once by the `refuse` module: `503` with `Retry-After` and
//! `Connection: close` over HTTP/1, `UNAVAILABLE` with `retry-after` over gRPC, then
//! closed — TLS listeners answer after the handshake; each refusal is counted), and, when
//! TLS is configured, the handshake — run beside the loop, with a timeout, so a client that
//! never finishes its handshake holds up nobody. The connections come out as
//! [`ServerIo`], plain or TLS, for the HTTP servers ([`HttpListener`], served by [`serve`]:
//! hyper-util's server builder with the HTTP/1 header read timeout) or tonic
//! ([`grpc_incoming`]).
//!
//! `--header-read-timeout` bounds how long a client may take to send its request headers
//! (slowloris): a [`ServerIo`] fails its reads once the timeout passed before its first
//! bytes told HTTP/1 from the HTTP/2 preface (a client that connects and sends nothing, or
//! dribbles the preface), and from there hyper's HTTP/1 `header_read_timeout` bounds each
//! request's headers. Either closes the connection and counts `limit="header_timeout"`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::tls::{Alpn, ReloadingTls, TLS_HANDSHAKE_FAILURES_TOTAL};

mod refuse;

/// How one listener accepts connections.
#[derive(Debug, Clone)]
pub struct AcceptSettings {
    /// TLS, or plain when `None`.
    pub tls: Option<Arc<ReloadingTls>>,
    pub alpn: Alpn,
    pub handshake_timeout: Duration,
    /// See the module documentation.
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// `Retry-After` seconds of a connection refused beyond `max_connections`.
    pub retry_after_secs: u64,
    /// The `server` label of the limit metric (`http`, `grpc`, `admin`).
    pub server: &'static str,
}

/// The HTTP/2 connection preface; until a connection's first bytes match it or differ from
/// it, [`ServerIo`] bounds how long they may take.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The deadline of a connection's first bytes (see the module documentation).
struct Preface {
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// How many bytes matched [`H2_PREFACE`] so far.
    seen: usize,
    timeout: Duration,
    server: &'static str,
}

impl Preface {
    /// Takes `read` (the bytes a read returned); true once the protocol is known.
    fn decided(&mut self, read: &[u8]) -> bool {
        let end = (self.seen + read.len()).min(H2_PREFACE.len());
        let expected = &H2_PREFACE[self.seen..end];
        if read.is_empty() || read[..expected.len()] != *expected {
            return true;
        }
        self.seen = end;
        self.seen == H2_PREFACE.len()
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// An accepted connection (plain or TLS); it holds its slot of the connection limit until
/// dropped.
pub struct ServerIo {
    stream: Stream,
    local: SocketAddr,
    remote: SocketAddr,
    /// Until the protocol is known: when the first bytes must have come.
    preface: Option<Preface>,
    /// Whether bytes were read since bytes were last written: a request under way, as
    /// opposed to a keep-alive connection idle after its last answer (see [`serve`]).
    reading: Arc<AtomicBool>,
    _slot: OwnedSemaphorePermit,
}

impl std::fmt::Debug for ServerIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIo")
            .field("tls", &matches!(self.stream, Stream::Tls(_)))
            .field("remote", &self.remote)
            .finish()
    }
}

impl ServerIo {
    fn new(
        stream: Stream,
        local: SocketAddr,
        remote: SocketAddr,
        settings: &AcceptSettings,
        slot: OwnedSemaphorePermit,
    ) -> Self {
        Self {
            stream,
            local,
            remote,
            preface: Some(Preface {
                deadline: Box::pin(tokio::time::sleep(settings.header_read_timeout)),
                seen: 0,
                timeout: settings.header_read_timeout,
                server: settings.server,
            }),
            reading: Arc::new(AtomicBool::new(false)),
            _slot: slot,
        }
    }

    /// Whether the connection is TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.stream, Stream::Tls(_))
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.get_mut().stream {
            Stream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::Tls($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = match &mut this.stream {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.reading.store(true, Ordering::Relaxed);
        }
        let Some(preface) = &mut this.preface else {
            return read;
        };
        match read {
            Poll::Ready(Ok(())) => {
                if preface.decided(&buf.filled()[before..]) {
                    this.preface = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if preface.deadline.as_mut().poll(cx).is_ready() => {
                crate::limits::count(preface.server, "header_timeout");
                tracing::debug!(
                    server = preface.server,
                    remote = %this.remote,
                    "closing a connection that sent no request within the header read timeout"
                );
                let timeout = preface.timeout;
                this.preface = None;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no request within the header read timeout of {timeout:?}"),
                )))
            }
            other => other,
        }
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.reading.store(false, Ordering::Relaxed);
        delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.reading.store(false, Ordering::Relaxed);
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

impl tonic::transport::server::Connected for ServerIo {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: Some(self.local),
            remote_addr: Some(self.remote),
        }
    }
}

/// Accepts on `listener` until `stop` is cancelled; the connections (handshaken when TLS
/// is on) come out of the returned channel.
pub fn spawn(
    listener: TcpListener,
    settings: AcceptSettings,
    stop: CancellationToken,
) -> mpsc::Receiver<(ServerIo, SocketAddr)> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let refuser = refuse::Refuser::new(settings.clone());
    tokio::spawn(async move {
        let local = listener.local_addr().ok();
        // The limit's warning: at most one per WARN_EVERY, with the connections refused
        // since the last one (each is counted in the limit metric too).
        const WARN_EVERY: Duration = Duration::from_secs(10);
        let mut warned: Option<tokio::time::Instant> = None;
        let mut refused_since = 0u64;
        loop {
            let (tcp, remote) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors, or a connection reset before accept:
                        // wait a moment instead of spinning.
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "could not set TCP_NODELAY on an accepted connection");
            }
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                refused_since += 1;
                if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                    tracing::warn!(
                        server = settings.server,
                        max_connections = settings.max_connections,
                        refused = refused_since,
                        "connection limit reached; refusing new connections with 503 until one closes"
                    );
                    warned = Some(tokio::time::Instant::now());
                    refused_since = 0;
                }
                refuser.refuse(tcp, remote);
                continue;
            };
            let local = local.unwrap_or(remote);
            match &settings.tls {
                None => {
                    let io = ServerIo::new(Stream::Plain(tcp), local, remote, &settings, slot);
                    if tx.send((io, remote)).await.is_err() {
                        return;
                    }
                }
                Some(tls) => {
                    let acceptor = tls.acceptor(settings.alpn);
                    let (tx, timeout, listener, settings) = (
                        tx.clone(),
                        settings.handshake_timeout,
                        tls.listener(),
                        settings.clone(),
                    );
                    tokio::spawn(async move {
                        let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await
                        {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                handshake_failed(listener, remote, &e.to_string());
                                return;
                            }
                            Err(_) => {
                                handshake_failed(listener, remote, "handshake timed out");
                                return;
                            }
                        };
                        let stream = Stream::Tls(Box::new(stream));
                        let io = ServerIo::new(stream, local, remote, &settings, slot);
                        let _ = tx.send((io, remote)).await;
                    });
                }
            }
        }
    });
    rx
}

fn handshake_failed(listener: &'static str, remote: SocketAddr, error: &str) {
    metrics::counter!(TLS_HANDSHAKE_FAILURES_TOTAL, "listener" => listener).increment(1);
    tracing::debug!(listener, %remote, error, "tls handshake failed");
}

/// The accepted connections of a listener as an axum listener.
#[derive(Debug)]
pub struct HttpListener {
    rx: mpsc::Receiver<(ServerIo, SocketAddr)>,
    local: SocketAddr,
    header_read_timeout: Duration,
    server: &'static str,
}

impl HttpListener {
    /// Runs the accept loop of `listener` (see [`spawn`]).
    pub fn new(
        listener: TcpListener,
        settings: AcceptSettings,
        stop: CancellationToken,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (header_read_timeout, server) = (settings.header_read_timeout, settings.server);
        Ok(Self {
            rx: spawn(listener, settings, stop),
            local,
            header_read_timeout,
            server,
        })
    }
}

impl axum::serve::Listener for HttpListener {
    type Io = ServerIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(accepted) => accepted,
            // The accept loop stopped (shutdown): accept nothing more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Serves `app` on the connections of `listener` (HTTP/1.1, and HTTP/2 by ALPN or prior
/// knowledge) until `stop` is cancelled, then waits until the open connections finished
/// their requests (`axum::serve` with graceful shutdown does the same; this is hyper-util's
/// builder so that HTTP/1 has the listener's header read timeout). Handlers can extract
/// the caller's address as `ConnectInfo<SocketAddr>`.
pub async fn serve(
    mut listener: HttpListener,
    app: axum::Router,
    stop: CancellationToken,
) -> io::Result<()> {
    use axum::serve::Listener as _;
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::Layer as _;
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(listener.header_read_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let server = listener.server;
    loop {
        let (io, remote) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let reading = io.reading.clone();
        let app = axum::Extension(axum::extract::ConnectInfo(remote)).layer(app.clone());
        let service = hyper_util::service::TowerToHyperService::new(app);
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                // hyper's header timeout also closes a keep-alive connection idle after
                // its last answer: only one with a request under way is counted.
                if is_header_timeout(e.as_ref()) && reading.load(Ordering::Relaxed) {
                    crate::limits::count(server, "header_timeout");
                }
                tracing::debug!(server, %remote, error = %e, "connection closed with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Whether hyper closed a connection because its request headers took too long.
fn is_header_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(e) = source {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// The accepted connections of `listener` as a tonic incoming stream.
pub fn grpc_incoming(
    listener: TcpListener,
    settings: AcceptSettings,
    stop: CancellationToken,
) -> impl futures::Stream<Item = Result<ServerIo, io::Error>> + Send + 'static {
    let mut rx = spawn(listener, settings, stop);
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|o| o.map(|(io, _)| Ok(io))))
}

#[cfg(test)]
mod tests {
    use axum::serve::Listener as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    fn plain(max_connections: usize) -> AcceptSettings {
        AcceptSettings {
            tls: None,
            alpn: Alpn::Http,
            handshake_timeout: Duration::from_secs(1),
            header_read_timeout: Duration::from_secs(10),
            max_connections,
            retry_after_secs: 5,
            server: "http",
        }
    }

    /// A listener on a free port with `settings`: it, its address and its stop token.
    async fn listen(settings: AcceptSettings) -> (HttpListener, SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let l = HttpListener::new(listener, settings, stop.clone()).unwrap();
        (l, addr, stop)
    }

    /// [`plain`] with a self-signed certificate written to `dir`, and its files.
    fn with_tls(
        dir: &std::path::Path,
        max_connections: usize,
    ) -> (AcceptSettings, crate::tls::TlsFiles) {
        let files = crate::tls::tests::self_signed(dir, "s", 2);
        let mut settings = plain(max_connections);
        settings.tls = Some(ReloadingTls::load(files.clone(), "service").unwrap());
        (settings, files)
    }

    /// Sends `request` on a new connection to `addr` and reads until the server closes
    /// it; the answer, and after how long it was complete.
    async fn exchange(addr: SocketAddr, request: &[u8]) -> (String, Duration) {
        let started = std::time::Instant::now();
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        // A reset ends the answer too (what came before it is kept).
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
            .await
            .expect("the refused connection was never closed");
        (
            String::from_utf8_lossy(&answer).into_owned(),
            started.elapsed(),
        )
    }

    #[tokio::test]
    async fn a_connection_beyond_the_limit_gets_503_with_retry_after_at_once_and_is_closed() {
        let (mut l, addr, stop) = listen(plain(1)).await;
        let _a = TcpStream::connect(addr).await.unwrap();
        let (first, _) = l.accept().await;
        assert!(!first.is_tls());

        // A request, and one whose body is mostly unsent (never read by the refusal):
        // both get the answer, not a reset, at once.
        let mut post = b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n".to_vec();
        post.extend(std::iter::repeat_n(b'a', 50_000));
        for request in [&b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"[..], &post] {
            let (answer, took) = exchange(addr, request).await;
            assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
            let head = answer.to_lowercase();
            assert!(head.contains("retry-after: 5\r\n"), "{answer}");
            assert!(head.contains("connection: close\r\n"), "{answer}");
            assert!(answer.contains("\"too_many_connections\""), "{answer}");
            assert!(took < Duration::from_millis(500), "took {took:?}");
        }
        let waited = tokio::time::timeout(Duration::from_millis(300), l.accept()).await;
        assert!(waited.is_err(), "a connection was accepted over the limit");

        // Once the first closes, the next connection is accepted.
        drop(first);
        let _c = TcpStream::connect(addr).await.unwrap();
        let (second, _) = tokio::time::timeout(Duration::from_secs(5), l.accept())
            .await
            .expect("accepted once the first closed");
        match &second.stream {
            Stream::Plain(s) => assert!(s.nodelay().unwrap()),
            Stream::Tls(_) => unreachable!(),
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn an_http2_or_grpc_request_beyond_the_limit_gets_503_or_unavailable() {
        use http_body_util::Empty;
        let (mut l, addr, stop) = listen(plain(1)).await;
        let _a = TcpStream::connect(addr).await.unwrap();
        let _first = l.accept().await;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .build_http::<Empty<axum::body::Bytes>>();
        let r = client
            .get(format!("http://{addr}/").parse().unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "5");
        let grpc = axum::http::Request::post(format!("http://{addr}/s.S/M"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Empty::new())
            .unwrap();
        let r = client.request(grpc).await.unwrap();
        assert_eq!(r.status(), 200);
        let status = tonic::Status::from_header_map(r.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status.message().contains("open connections"), "{status:?}");
        assert_eq!(r.headers()["retry-after"], "5");
        stop.cancel();
    }

    #[tokio::test]
    async fn refusals_are_bounded_in_number_and_in_time() {
        let (mut l, addr, stop) = listen(plain(1)).await;
        let _a = TcpStream::connect(addr).await.unwrap();
        let _first = l.accept().await;
        // Clients beyond the limit that send nothing each hold a refusal…
        let started = std::time::Instant::now();
        let mut silent = Vec::new();
        for _ in 0..refuse::REFUSALS_AT_ONCE {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        // …so once they are all under way the next is closed at once, unanswered.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (answer, took) = exchange(addr, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert_eq!(answer, "", "answered while the refusals were full");
        assert!(took < Duration::from_millis(500), "took {took:?}");
        // Each is cut after the refusal deadline; then refusals are answered again.
        for mut tcp in silent {
            let mut buf = [0u8; 64];
            let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
                .await
                .expect("a silent refused connection was never closed")
                .unwrap_or(0);
            assert_eq!(n, 0);
        }
        let took = started.elapsed();
        assert!(
            took >= refuse::REFUSAL_DEADLINE - Duration::from_millis(100)
                && took < refuse::REFUSAL_DEADLINE + Duration::from_secs(1),
            "closed after {took:?}"
        );
        let (answer, _) = exchange(addr, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_client_that_never_handshakes_does_not_block_others() {
        let dir = tempfile::tempdir().unwrap();
        let (mut settings, files) = with_tls(dir.path(), 10);
        settings.handshake_timeout = Duration::from_secs(30);
        let (mut l, addr, stop) = listen(settings).await;
        // A client that connects and never starts its handshake…
        let _silent = TcpStream::connect(addr).await.unwrap();
        // …and one that speaks plain HTTP to the TLS port (its handshake fails).
        let mut plain = TcpStream::connect(addr).await.unwrap();
        plain.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        // A TLS client is accepted meanwhile.
        let connector = tls_connector(&files.cert);
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = "localhost".try_into().unwrap();
            connector.connect(name, tcp).await.unwrap()
        });
        let (accepted, _) = tokio::time::timeout(Duration::from_secs(5), l.accept())
            .await
            .expect("the TLS client is accepted while the silent one waits");
        assert!(accepted.is_tls());
        client.await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), plain.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert!(
            !String::from_utf8_lossy(&buf[..n]).contains("HTTP/1.1"),
            "plain HTTP got an HTTP answer"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn a_tls_connection_beyond_the_limit_gets_503_after_its_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let (settings, files) = with_tls(dir.path(), 1);
        let (mut l, addr, stop) = listen(settings).await;
        let connector = tls_connector(&files.cert);
        let connect = async || {
            let tcp = TcpStream::connect(addr).await.unwrap();
            connector
                .connect("localhost".try_into().unwrap(), tcp)
                .await
                .unwrap()
        };
        let _held = connect().await;
        let (first, _) = tokio::time::timeout(Duration::from_secs(5), l.accept())
            .await
            .unwrap();
        assert!(first.is_tls());
        let mut refused = connect().await;
        refused
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), refused.read_to_end(&mut answer))
            .await
            .expect("the refused TLS connection was never closed");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(
            answer.to_lowercase().contains("retry-after: 5\r\n"),
            "{answer}"
        );
        stop.cancel();
    }

    /// A TLS client trusting the (self-signed) certificate in `cert`.
    fn tls_connector(cert: &std::path::Path) -> tokio_rustls::TlsConnector {
        use tokio_rustls::rustls::pki_types::pem::PemObject as _;
        use tokio_rustls::rustls::{ClientConfig, RootCertStore, pki_types::CertificateDer};
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(cert).unwrap())
            .unwrap();
        let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// Serves a one-route app on a plain listener with a 500 ms header read timeout.
    async fn slow_header_server() -> (
        SocketAddr,
        CancellationToken,
        tokio::task::JoinHandle<io::Result<()>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let mut settings = plain(10);
        settings.header_read_timeout = Duration::from_millis(500);
        let l = HttpListener::new(listener, settings, stop.clone()).unwrap();
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(
                |axum::extract::ConnectInfo(from): axum::extract::ConnectInfo<SocketAddr>| async move {
                    format!("hello {}", from.ip())
                },
            ),
        );
        let server = tokio::spawn(serve(l, app, stop.clone()));
        (addr, stop, server)
    }

    /// Writes `head` a byte every 100 ms until the server closes the connection (or
    /// answers); returns after how long and what it answered.
    async fn dribble(addr: SocketAddr, head: &[u8]) -> (Duration, String) {
        let started = std::time::Instant::now();
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let mut bytes = head.iter().cycle();
        let mut buf = [0u8; 256];
        loop {
            tokio::select! {
                n = tcp.read(&mut buf) => {
                    let n = n.unwrap_or(0);
                    return (started.elapsed(), String::from_utf8_lossy(&buf[..n]).into_owned());
                }
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    let byte = *bytes.next().unwrap();
                    if tcp.write_all(&[byte]).await.is_err() {
                        return (started.elapsed(), String::new());
                    }
                }
            }
            assert!(started.elapsed() < Duration::from_secs(10), "never closed");
        }
    }

    fn header_timeouts(handle: &metrics_exporter_prometheus::PrometheusHandle) -> f64 {
        handle
            .render()
            .lines()
            .find(|l| {
                l.starts_with("pulse_server_limited_total")
                    && l.contains("server=\"http\"")
                    && l.contains("limit=\"header_timeout\"")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }

    #[tokio::test]
    async fn a_client_dribbling_its_headers_is_closed_after_the_header_read_timeout() {
        let handle = crate::metrics::install("listener-test").unwrap();
        let (addr, stop, server) = slow_header_server().await;
        let counted_before = header_timeouts(&handle);
        // A normal request is answered, with the caller's address for the handler.
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("hello 127.0.0.1"), "{answer}");

        // HTTP/1 headers one byte every 100 ms (never finished: the header value repeats),
        // a client that sends nothing, and one that dribbles the HTTP/2 preface: each is
        // closed after the 500 ms bound, without an answer.
        let headers = b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let cases = [
            ("http/1 headers", tokio::spawn(dribble(addr, headers))),
            (
                "silent",
                tokio::spawn(async move {
                    let started = std::time::Instant::now();
                    let mut tcp = TcpStream::connect(addr).await.unwrap();
                    let mut buf = [0u8; 64];
                    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
                        .await
                        .expect("never closed")
                        .unwrap_or(0);
                    (
                        started.elapsed(),
                        String::from_utf8_lossy(&buf[..n]).into_owned(),
                    )
                }),
            ),
            ("http/2 preface", tokio::spawn(dribble(addr, H2_PREFACE))),
        ];
        for (case, task) in cases {
            let (took, answer) = task.await.unwrap();
            assert!(
                took >= Duration::from_millis(450) && took < Duration::from_millis(1500),
                "{case}: closed after {took:?}"
            );
            assert!(!answer.contains("200"), "{case}: answered {answer}");
        }
        assert_eq!(header_timeouts(&handle), counted_before + 3.0);

        // A keep-alive connection idle after its answer is closed after the timeout too,
        // but not counted: it is not a slow client.
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        let started = std::time::Instant::now();
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .expect("the idle connection was never closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert!(started.elapsed() >= Duration::from_millis(400));
        assert_eq!(header_timeouts(&handle), counted_before + 3.0);
        stop.cancel();
        server.await.unwrap().unwrap();
    }
}
