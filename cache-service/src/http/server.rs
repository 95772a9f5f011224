//! The cache's accept loop: HTTP/1.1 only, on [`ZeroCopyListener`] connections.
//!
//! Not `axum::serve`: its connection builder also speaks cleartext HTTP/2 to a client that
//! opens with the HTTP/2 preface, and HTTP/2's framing copies body bytes in user space, which
//! for a stored blob's mapped window means reading the mapping (`store::mapped`). Envoy, the
//! rendered clusters and Kubernetes' `appProtocol: http` all speak HTTP/1.1 to the cache.

use std::future::Future;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

use super::zero_copy::ZeroCopyListener;

/// Serve `router` until `shutdown` resolves, then stop accepting and wait for the connections
/// in progress to finish their requests (the caller bounds that wait).
pub async fn serve_http1(
    mut listener: ZeroCopyListener,
    router: Router,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let io = tokio::select! {
            io = listener.accept() => io,
            () = &mut shutdown => break,
        };
        let conn = hyper::server::conn::http1::Builder::new()
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
