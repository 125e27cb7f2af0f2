//! The HTTP floor: the same closed-loop producers as taskledger's
//! lifecycle, sending the same create requests over the same client to a
//! server that reads each request whole and answers `201` with a fixed JSON
//! body, storing nothing. It runs as a child process (this binary with
//! `--serve-null`) on a multi-threaded tokio runtime with hyper's HTTP/1,
//! as `taskledger serve` does, so it competes with the load generator for
//! the two cores the same way.
//!
//! No system that acknowledges each create with an HTTP answer can create
//! tasks faster on this machine, so its figure over the baseline's is the
//! most any such system's lifecycle ratio could be here: lifecycle needs
//! these creates and claims, completions, durable appends and projections
//! besides.

use std::convert::Infallible;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The shape and size of taskledger's answer to a create (`api::wire::CreatedResponse`).
const ANSWER: &[u8] = br#"{"task_id":"0193a5c4-7e1f-7c2a-9d1e-5b8f3a2c1d0e","created":true,"seq":1234567,"head_seq":1234567,"duplicate":false}"#;

/// `--serve-null`: listens on a free loopback port, prints its address on
/// stdout, and answers every request until killed.
pub fn serve_null() -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("start a runtime")?;
    runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.context("bind a loopback port")?;
        let mut stdout = std::io::stdout();
        writeln!(stdout, "{}", listener.local_addr()?)?;
        stdout.flush()?;
        loop {
            let (stream, _) = listener.accept().await.context("accept")?;
            stream.set_nodelay(true)?;
            tokio::spawn(async move {
                let service = service_fn(|request: Request<Incoming>| async move {
                    // Read the body whole, as a real server must before it can answer.
                    let status = match request.into_body().collect().await {
                        Ok(_) => StatusCode::CREATED,
                        Err(_) => StatusCode::BAD_REQUEST,
                    };
                    let mut answer = Response::new(Full::new(Bytes::from_static(ANSWER)));
                    *answer.status_mut() = status;
                    answer.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    Ok::<_, Infallible>(answer)
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    })
}

/// The null server as a child process; killed when dropped.
pub struct NullServer {
    child: Child,
    pub addr: SocketAddr,
}

impl NullServer {
    pub fn start() -> Result<NullServer> {
        let exe = std::env::current_exe().context("find this binary")?;
        let mut child = Command::new(exe)
            .arg("--serve-null")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start the null server")?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("the null server has no stdout"))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).context("read the null server's address")?;
        let addr = match line.trim().parse() {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(anyhow!("the null server printed {line:?}, not an address"));
            }
        };
        Ok(NullServer { child, addr })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for NullServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
