//! The cache's accept loop: HTTP/1.1 only, on [`ZeroCopyListener`] connections.
//!
//! Not `axum::serve`: its connection builder also speaks cleartext HTTP/2 to a client that
//! opens with the HTTP/2 preface, and HTTP/2's framing copies body bytes in user space, which
//! for a stored blob's mapped window means reading the mapping (`store::mapped`). Envoy, the
//! rendered clusters and Kubernetes' `appProtocol: http` all speak HTTP/1.1 to the cache.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

use super::zero_copy::ZeroCopyListener;

/// How long the listener waits on a client before it closes the connection. Without these a
/// client could hold a connection (and a file descriptor) by trickling its request head, and
/// one that stops reading a response pins the blob it is sent (and a cold download's spool,
/// or its share of the pass-through memory) for as long as it stays connected.
#[derive(Debug, Clone, Copy)]
pub struct ClientTimeouts {
    /// For a request's whole head, counted from when the connection is ready for one: a
    /// connection idle between requests closes after this too. Envoy's cache cluster closes
    /// its idle connections at half of it (`render`), so it rarely sends on one being
    /// closed here (only when it took that long to take in the end of a response).
    pub request_head: Duration,
    /// For a response write to make any progress: Envoy's stream idle timeout.
    pub stalled_write: Duration,
}

impl ClientTimeouts {
    pub const DEFAULT: Self = Self {
        request_head: Duration::from_secs(60),
        stalled_write: Duration::from_secs(300),
    };
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Serve `router` until `shutdown` resolves, then stop accepting and wait for the connections
/// in progress to finish their requests (the caller bounds that wait).
pub async fn serve_http1(
    mut listener: ZeroCopyListener,
    router: Router,
    timeouts: ClientTimeouts,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let io = tokio::select! {
            io = listener.accept(timeouts.stalled_write) => io,
            () = &mut shutdown => break,
        };
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(timeouts.request_head)
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(router.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    // Closed now: a new connection is refused, not left waiting in the backlog.
    drop(listener);
    graceful.shutdown().await;
}
