//! A TCP forwarder from a local port to a store of the stack (ClickHouse, S3), for tests
//! that make a store unreachable: nothing listens on the port before [`Forwarder::start`],
//! and dropping it closes the port and cuts every open connection (a keep-alive
//! connection of the client under test does not survive it).

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Forwards 127.0.0.1:`port` to a target; stopped (port closed, connections cut) on drop.
pub struct Forwarder(tokio::task::JoinHandle<()>);

impl Forwarder {
    /// Listens on 127.0.0.1:`port` and forwards every connection to `target`.
    pub async fn start(port: u16, target: SocketAddr) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        Self(tokio::spawn(async move {
            // Owned by this task: aborting it drops the set, which aborts every connection.
            let mut connections = JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                while connections.try_join_next().is_some() {}
                connections.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }))
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The socket address of an `http://host:port` URL of the stack.
pub async fn address_of(url: &str) -> SocketAddr {
    let host_port = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    tokio::net::lookup_host(host_port)
        .await
        .unwrap()
        .next()
        .unwrap()
}
