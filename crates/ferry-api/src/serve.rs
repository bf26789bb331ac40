//! Serving the REST API over TLS. Each connection's handshake is checked against the
//! cluster CA; a peer that presented a cluster certificate (another agent) is known by
//! its common name to the handlers ([`Peer`]), so a forwarded request can be checked to
//! come from the host it names.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// A handshake that takes longer than this is dropped (a peer holding sockets open).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is at the other end of the connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// The common name of the cluster certificate the peer presented (an agent's host
    /// name); none for a client without a certificate (the CLI, a browser).
    pub certificate: Option<String>,
}

/// Serves `router` on `listener` with TLS until the listener fails.
pub async fn serve_tls(
    listener: TcpListener,
    router: Router,
    config: rustls::ServerConfig,
) -> std::io::Result<()> {
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of descriptors and the like: the next accept may work.
            Err(error) => {
                tracing::warn!("API accept: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!("API TLS handshake with {remote}: {error}");
                    return;
                }
                Err(_) => {
                    tracing::debug!("API TLS handshake with {remote} timed out");
                    return;
                }
            };
            let peer = Peer {
                certificate: tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(ferry_tls::common_name),
            };
            let service = router.map_request(move |mut request: axum::http::Request<_>| {
                request.extensions_mut().insert(peer.clone());
                request
            });
            let served = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(
                    TokioIo::new(tls),
                    TowerToHyperService::new(service),
                )
                .await;
            if let Err(error) = served {
                tracing::debug!("API connection from {remote}: {error}");
            }
        });
    }
}
