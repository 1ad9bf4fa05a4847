//! The std build's wire: HTTP/1.1 by hyper at the connection level over `tokio::net` streams.

use super::TripError;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// A bound socket, not yet accepting.
pub(super) type Bound = TcpListener;

/// Bind `addr`; returns the socket and its address.
pub(super) async fn bind(addr: SocketAddr) -> std::io::Result<(Bound, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Serve `app` on `listener` in a background task.
pub(super) fn serve<X: Clone + Send + Sync + 'static>(listener: Bound, app: Router, ext: X) {
    tokio::spawn(accept_loop(listener, app, ext));
}

async fn accept_loop<X: Clone + Send + Sync + 'static>(listener: TcpListener, app: Router, ext: X) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (app, ext) = (app.clone(), ext.clone());
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (app, ext) = (app.clone(), ext.clone());
            async move {
                let resp = super::route(app, ext, peer, req.map(axum::body::Body::new)).await;
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::trace!(error = %e, "http connection ended with an error");
            }
        });
    }
}

/// Makes a client's connections.
#[derive(Default)]
pub(super) struct Connector {}

impl Connector {
    pub(super) async fn connect(&self, addr: SocketAddr) -> Result<Conn, String> {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!(error = %e, "http client connection ended with an error");
            }
        });
        Ok(Conn(sender))
    }
}

/// One client connection.
pub(super) struct Conn(SendRequest<Full<Bytes>>);

impl Conn {
    pub(super) fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    /// Whether the connection can take a request now.
    pub(super) async fn ready(&mut self) -> bool {
        self.0.ready().await.is_ok()
    }

    /// Send `req` and read the whole answer: status and body.
    pub(super) async fn round_trip(
        &mut self,
        req: Request<Bytes>,
    ) -> Result<(u16, Bytes), TripError> {
        let resp = match self.0.try_send_request(req.map(Full::new)).await {
            Ok(resp) => resp,
            Err(mut e) => {
                // hyper gives the request back when the connection closed before writing it;
                // its body is still there unless writing had begun.
                let unsent = e.take_message().and_then(|r| {
                    let (parts, body) = r.into_parts();
                    body.into_inner().map(|b| Request::from_parts(parts, b))
                });
                let msg = e.into_error().to_string();
                return Err(match unsent {
                    Some(req) => TripError::NotSent(Box::new(req), msg),
                    None => TripError::NoAnswer(msg),
                });
            }
        };
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| TripError::Broken(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    }
}
