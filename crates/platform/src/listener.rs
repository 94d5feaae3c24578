//! The accept loop every Pulse server runs its listener with: `TCP_NODELAY` on each
//! connection, at most `--max-connections` open at once (beyond it the loop stops
//! accepting, so new connections wait in the kernel's backlog, and the time is counted),
//! and, when TLS is configured, the handshake — run beside the loop, with a timeout, so a
//! client that never finishes its handshake holds up nobody. The connections come out as
//! [`ServerIo`], plain or TLS, for axum ([`HttpListener`]) or tonic ([`grpc_incoming`]).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::tls::{Alpn, ReloadingTls, TLS_HANDSHAKE_FAILURES_TOTAL};

/// How one listener accepts connections.
#[derive(Debug, Clone)]
pub struct AcceptSettings {
    /// TLS, or plain when `None`.
    pub tls: Option<Arc<ReloadingTls>>,
    pub alpn: Alpn,
    pub handshake_timeout: Duration,
    pub max_connections: usize,
    /// The `server` label of the limit metric (`http`, `grpc`, `admin`).
    pub server: &'static str,
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
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
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
    tokio::spawn(async move {
        let local = listener.local_addr().ok();
        loop {
            let slot = match slots.clone().try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => {
                    crate::limits::count(settings.server, "connections");
                    tracing::warn!(
                        server = settings.server,
                        max_connections = settings.max_connections,
                        "connection limit reached; not accepting until a connection closes"
                    );
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        slot = slots.clone().acquire_owned() => match slot {
                            Ok(slot) => slot,
                            Err(_) => return,
                        },
                    }
                }
            };
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
            let local = local.unwrap_or(remote);
            match &settings.tls {
                None => {
                    let io = ServerIo {
                        stream: Stream::Plain(tcp),
                        local,
                        remote,
                        _slot: slot,
                    };
                    if tx.send((io, remote)).await.is_err() {
                        return;
                    }
                }
                Some(tls) => {
                    let acceptor = tls.acceptor(settings.alpn);
                    let (tx, timeout, listener) =
                        (tx.clone(), settings.handshake_timeout, tls.listener());
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
                        let io = ServerIo {
                            stream: Stream::Tls(Box::new(stream)),
                            local,
                            remote,
                            _slot: slot,
                        };
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
}

impl HttpListener {
    /// Runs the accept loop of `listener` (see [`spawn`]).
    pub fn new(
        listener: TcpListener,
        settings: AcceptSettings,
        stop: CancellationToken,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        Ok(Self {
            rx: spawn(listener, settings, stop),
            local,
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

/// A router served on an [`HttpListener`] whose handlers can extract the caller's address
/// as `ConnectInfo<SocketAddr>` (what `Router::into_make_service_with_connect_info` does
/// for a plain `TcpListener`).
#[derive(Debug, Clone)]
pub struct WithConnectInfo(pub axum::Router);

impl<'a> tower::Service<axum::serve::IncomingStream<'a, HttpListener>> for WithConnectInfo {
    type Response =
        axum::middleware::AddExtension<axum::Router, axum::extract::ConnectInfo<SocketAddr>>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, incoming: axum::serve::IncomingStream<'a, HttpListener>) -> Self::Future {
        use tower::Layer as _;
        let info = axum::extract::ConnectInfo(*incoming.remote_addr());
        std::future::ready(Ok(axum::Extension(info).layer(self.0.clone())))
    }
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
            max_connections,
            server: "http",
        }
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_until_one_closes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let mut l = HttpListener::new(listener, plain(1), stop.clone()).unwrap();
        let _a = TcpStream::connect(addr).await.unwrap();
        let (first, _) = l.accept().await;
        assert!(!first.is_tls());
        let _b = TcpStream::connect(addr).await.unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(300), l.accept()).await;
        assert!(
            waited.is_err(),
            "the second connection was accepted over the limit"
        );
        drop(first);
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
    async fn a_client_that_never_handshakes_does_not_block_others() {
        use tokio_rustls::rustls::pki_types::pem::PemObject as _;
        use tokio_rustls::rustls::{ClientConfig, RootCertStore, pki_types::CertificateDer};
        let dir = tempfile::tempdir().unwrap();
        let files = crate::tls::tests::self_signed(dir.path(), "s", 2);
        let tls = ReloadingTls::load(files.clone(), "service").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let mut settings = plain(10);
        settings.tls = Some(tls);
        settings.handshake_timeout = Duration::from_secs(30);
        let mut l = HttpListener::new(listener, settings, stop.clone()).unwrap();
        // A client that connects and never starts its handshake…
        let _silent = TcpStream::connect(addr).await.unwrap();
        // …and one that speaks plain HTTP to the TLS port (its handshake fails).
        let mut plain = TcpStream::connect(addr).await.unwrap();
        plain.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        // A TLS client is accepted meanwhile.
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&files.cert).unwrap())
            .unwrap();
        let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
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
}
