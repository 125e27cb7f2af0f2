//! A deliberately small HTTP/1 client: one raw hyper connection per caller,
//! kept alive for the whole run, with TCP_NODELAY. The load generator shares
//! two cores with the server and PostgreSQL, so it avoids a pooled client's
//! bookkeeping: each producer or worker owns its connections outright and
//! sends one request at a time on each (HTTP/1 without pipelining, as real
//! clients do). Bodies are preformatted bytes; answers are read whole.

use std::net::SocketAddr;

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Where the server is and how to authenticate; cloned into every connection.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    host: HeaderValue,
    bearer: HeaderValue,
}

impl Target {
    pub fn new(addr: SocketAddr, token: &str) -> Result<Target> {
        Ok(Target {
            addr,
            host: HeaderValue::from_str(&addr.to_string()).context("format the Host header")?,
            bearer: HeaderValue::from_str(&format!("Bearer {token}"))
                .context("the admin token is not a header value")?,
        })
    }

    /// `Bearer <token>`, as a WebSocket's `connection_init` carries it.
    pub fn bearer(&self) -> &str {
        self.bearer.to_str().unwrap_or_default()
    }
}

/// One keep-alive connection.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    target: Target,
}

static JSON: HeaderValue = HeaderValue::from_static("application/json");

impl Conn {
    pub async fn connect(target: &Target) -> Result<Conn> {
        let stream = TcpStream::connect(target.addr).await.with_context(|| format!("connect to {}", target.addr))?;
        stream.set_nodelay(true).context("set TCP_NODELAY")?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await.context("HTTP/1 handshake")?;
        // The connection future drives the socket; it ends when `sender` is dropped.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Conn { sender, target: target.clone() })
    }

    /// POSTs a JSON body and returns the status and the whole answer.
    pub async fn post(&mut self, path: &str, body: Bytes) -> Result<(StatusCode, Bytes)> {
        self.send(Method::POST, path, body).await
    }

    pub async fn get(&mut self, path: &str) -> Result<(StatusCode, Bytes)> {
        self.send(Method::GET, path, Bytes::new()).await
    }

    /// GETs `path` and returns the status and the body as it streams in (an event feed that
    /// follows the log).
    pub async fn get_streaming(&mut self, path: &str) -> Result<(StatusCode, hyper::body::Incoming)> {
        let response = self.response(Method::GET, path, Bytes::new()).await?;
        Ok((response.status(), response.into_body()))
    }

    /// Sends a request on this connection and returns the answer's head, its body unread.
    async fn response(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<hyper::Response<hyper::body::Incoming>> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = path.parse().with_context(|| format!("parse the path {path:?}"))?;
        let headers = request.headers_mut();
        headers.insert(HOST, self.target.host.clone());
        headers.insert(AUTHORIZATION, self.target.bearer.clone());
        headers.insert(CONTENT_TYPE, JSON.clone());
        self.sender.ready().await.map_err(|e| anyhow!("connection to the server closed: {e}"))?;
        self.sender.send_request(request).await.map_err(|e| anyhow!("HTTP request {path}: {e}"))
    }

    async fn send(&mut self, method: Method, path: &str, body: Bytes) -> Result<(StatusCode, Bytes)> {
        let response = self.response(method, path, body).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await.map_err(|e| anyhow!("read the answer to {path}: {e}"))?;
        Ok((status, bytes.to_bytes()))
    }
}
