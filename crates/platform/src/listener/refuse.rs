//! The answer of a connection beyond `--max-connections`: a quick, definite refusal
//! instead of a wait in the kernel's backlog. The accept loop hands such a connection to
//! [`Refuser::refuse`], which serves it with a tiny hyper server (HTTP/1 and HTTP/2 by the
//! preface) whose one service answers every request with the connection limit's refusal —
//! `503` with `Retry-After` and `Connection: close` over HTTP, `UNAVAILABLE` with
//! `retry-after` metadata over gRPC (a request whose `content-type` is `application/grpc`)
//! — and then closes the connection (HTTP/2: GOAWAY). On a TLS listener the handshake
//! comes first, so TLS clients get the same answer.
//!
//! Refusals are bounded so that they cannot pile up themselves: at most
//! [`REFUSALS_AT_ONCE`] are under way per listener (beyond that a connection is closed at
//! once, unanswered), and each has [`REFUSAL_DEADLINE`] for its handshake, its request
//! headers and the answer's write; a client that takes longer is cut. Everything else
//! (bodies, further requests) is never read, beyond a short drain after the answer so that
//! the client reads the answer instead of a reset.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::http::{HeaderValue, Request, Response, Version, header};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};

use super::{AcceptSettings, handshake_failed};
use crate::limits::{Refusal, Refused};

/// Most refusals under way at once on one listener.
pub const REFUSALS_AT_ONCE: usize = 64;

/// Longest time one refusal may take: the TLS handshake, the request's headers, writing
/// the answer and the drain after it.
pub const REFUSAL_DEADLINE: Duration = Duration::from_secs(2);

/// The largest request head a refusal reads (hyper's smallest HTTP/1 buffer is 8 KiB).
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Refuses the connections of one listener beyond its limit.
#[derive(Debug)]
pub(super) struct Refuser {
    settings: AcceptSettings,
    under_way: Arc<Semaphore>,
}

impl Refuser {
    pub(super) fn new(settings: AcceptSettings) -> Self {
        Self {
            settings,
            under_way: Arc::new(Semaphore::new(REFUSALS_AT_ONCE)),
        }
    }

    /// Answers `tcp` with the connection limit's refusal (in a task of its own) and closes
    /// it, or closes it at once when [`REFUSALS_AT_ONCE`] are under way. Counted either way.
    pub(super) fn refuse(&self, tcp: TcpStream, remote: SocketAddr) {
        let server = self.settings.server;
        crate::limits::count(server, "connections");
        let Ok(slot) = self.under_way.clone().try_acquire_owned() else {
            tracing::debug!(
                server,
                %remote,
                "closing a connection beyond the connection limit unanswered: too many refusals under way"
            );
            return;
        };
        let refused = Arc::new(Refused {
            why: Refusal::Connections(self.settings.max_connections),
            retry_after: self.settings.retry_after_secs,
        });
        let tls = self
            .settings
            .tls
            .as_ref()
            .map(|tls| (tls.acceptor(self.settings.alpn), tls.listener()));
        tokio::spawn(async move {
            let answered = tokio::time::timeout(REFUSAL_DEADLINE, async move {
                match tls {
                    None => answer(tcp, refused).await,
                    Some((acceptor, listener)) => match acceptor.accept(tcp).await {
                        Ok(stream) => answer(stream, refused).await,
                        Err(e) => handshake_failed(listener, remote, &e.to_string()),
                    },
                }
            })
            .await;
            if answered.is_err() {
                tracing::debug!(server, %remote, "cut a refusal that took longer than its deadline");
            }
            drop(slot);
        });
    }
}

/// Serves `io` until its first request is answered with `refused`, then closes it.
async fn answer<I>(io: I, refused: Arc<Refused>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let answered = Arc::new(Notify::new());
    let service = {
        let answered = answered.clone();
        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            answered.notify_one();
            std::future::ready(Ok::<_, Infallible>(response(&req, &refused)))
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(REFUSAL_DEADLINE)
        .keep_alive(false)
        .max_buf_size(MAX_HEAD_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1)
        .max_header_list_size(MAX_HEAD_BYTES as u32);
    let connection = builder.serve_connection(TokioIo::new(Draining::new(io)), service);
    tokio::pin!(connection);
    let closed = tokio::select! {
        closed = connection.as_mut() => closed,
        () = answered.notified() => {
            // HTTP/2: GOAWAY once the answered stream is done; HTTP/1: close after it.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = closed {
        tracing::debug!(error = %e, "refused connection closed with an error");
    }
}

/// The refusal of one request: gRPC's (HTTP 200, `grpc-status` 14) for a gRPC request,
/// 503 otherwise; with `Connection: close` over HTTP/1.
fn response(req: &Request<hyper::body::Incoming>, refused: &Refused) -> Response<axum::body::Body> {
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|t| t.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        return crate::api_error::grpc_status(refused)
            .into_http::<tonic::body::Body>()
            .map(axum::body::Body::new);
    }
    let mut response = crate::api_error::http_response(refused);
    if req.version() < Version::HTTP_2 {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A connection whose shutdown, after sending FIN, reads and discards what the client
/// still sends until it closes too (bounded by the refusal's deadline): closing a socket
/// with unread bytes (a request body nobody read) makes the kernel send a reset, and a
/// client may then lose the answer before reading it.
struct Draining<I> {
    io: I,
    shut: bool,
}

impl<I> Draining<I> {
    fn new(io: I) -> Self {
        Self { io, shut: false }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Draining<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Draining<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.shut {
            ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
            this.shut = true;
        }
        let mut scratch = [0u8; 2048];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match ready!(Pin::new(&mut this.io).poll_read(cx, &mut buf)) {
                Ok(()) if !buf.filled().is_empty() => {}
                // The client closed (or reset): done.
                Ok(()) | Err(_) => return Poll::Ready(Ok(())),
            }
        }
    }
}
