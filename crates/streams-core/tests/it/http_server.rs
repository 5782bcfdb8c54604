//! The bounds of every service's HTTP server (`http_server`), against a real server on
//! port 0 served by `App::serve`, configured through `TICKFLOW_HTTP_*` as a service is.
//! Clients are raw TCP sockets, so that they can misbehave as reqwest never would.
//!
//! No assertion here is on speed: each waits for what must happen (a closed socket, an
//! answer) with a generous bound, and the one "not yet" check is on something that cannot
//! happen while the test holds what blocks it.

use std::{net::SocketAddr, time::Duration};

use axum::{Router, body::Bytes, routing::post};
use streams_core::{App, Env};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

/// How long anything that must happen may take on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(30);

/// A running `App::serve` with an echo route (`POST /echo` answers the body's length).
struct Server {
    addr: SocketAddr,
    shutdown: CancellationToken,
    serving: JoinHandle<anyhow::Result<()>>,
}

impl Server {
    async fn start(limits: &[(&str, &str)]) -> Self {
        let mut pairs = vec![
            ("REDIS_URL", "redis://127.0.0.1:1"),
            ("HTTP_ADDR", "127.0.0.1:0"),
        ];
        pairs.extend_from_slice(limits);
        let app = App::init(
            "http-limits",
            Env::from_pairs(pairs),
            "127.0.0.1:0",
            CancellationToken::new(),
        )
        .unwrap();
        let listener = app.bind().await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = app.shutdown.clone();
        let stop = shutdown.clone();
        let routes = Router::new().route(
            "/echo",
            post(|body: Bytes| async move { body.len().to_string() }),
        );
        let serving = tokio::spawn(app.serve(listener, routes, async move {
            stop.cancelled().await;
            Ok(())
        }));
        Self {
            addr,
            shutdown,
            serving,
        }
    }

    /// `GET /livez` on a fresh connection through reqwest: the status.
    async fn livez(&self) -> u16 {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(PATIENCE)
            .build()
            .unwrap();
        client
            .get(format!("http://{}/livez", self.addr))
            .send()
            .await
            .expect("GET /livez is answered")
            .status()
            .as_u16()
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr).await.expect("connect")
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.serving)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
    }
}

/// Waits until the server closes `socket` (EOF or reset); panics after [`PATIENCE`].
/// Returns what it sent before closing.
async fn wait_closed(mut socket: TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let read = tokio::time::timeout(PATIENCE, async {
        let mut buffer = [0u8; 4096];
        loop {
            match socket.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the server kept the connection open for {PATIENCE:?} (received {:?})",
        String::from_utf8_lossy(&received)
    );
    received
}

/// Sends a whole `GET /livez` on `socket` (kept alive) and reads its answer.
async fn livez_on(socket: &mut TcpStream) -> String {
    socket
        .write_all(b"GET /livez HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    read_answer(socket).await
}

/// Reads an answer's status line and headers (and whatever of its short body came along).
async fn read_answer(socket: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let mut buffer = [0u8; 1024];
    // The answer is small; it is complete once its (empty or short) body has arrived.
    while !String::from_utf8_lossy(&answer).contains("\r\n\r\n") {
        let n = tokio::time::timeout(PATIENCE, socket.read(&mut buffer))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed before answering");
        answer.extend_from_slice(&buffer[..n]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_half_sent_request_headers_are_closed_while_a_normal_request_is_answered() {
    let server = Server::start(&[
        ("TICKFLOW_HTTP_HEADER_READ_TIMEOUT_MS", "500"),
        ("TICKFLOW_HTTP_IDLE_TIMEOUT_MS", "3600000"),
        ("TICKFLOW_HTTP_REQUEST_TIMEOUT_MS", "3600000"),
        ("TICKFLOW_HTTP_MAX_CONNECTIONS", "2000"),
    ])
    .await;
    let mut half_sent = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let mut socket = server.connect().await;
        socket
            .write_all(b"POST /echo HTTP/1.1\r\nhost: test\r\ncontent-type: appl")
            .await
            .unwrap();
        half_sent.push(socket);
    }
    assert_eq!(server.livez().await, 200, "a normal request is answered");

    let closings: Vec<_> = half_sent
        .into_iter()
        .map(|socket| tokio::spawn(wait_closed(socket)))
        .collect();
    for closing in closings {
        let received = closing.await.unwrap();
        // hyper closes without an answer, or with a 408; never with a success.
        let text = String::from_utf8_lossy(&received);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{text}"
        );
    }
    assert_eq!(server.livez().await, 200, "and still is afterwards");
    server.stop().await;
}

#[tokio::test]
async fn connections_past_the_cap_wait_until_one_closes() {
    let server = Server::start(&[
        ("TICKFLOW_HTTP_MAX_CONNECTIONS", "4"),
        ("TICKFLOW_HTTP_HEADER_READ_TIMEOUT_MS", "3600000"),
        ("TICKFLOW_HTTP_IDLE_TIMEOUT_MS", "3600000"),
    ])
    .await;
    // Four kept-alive connections, each answered once: all four are being served.
    let mut holders = Vec::new();
    for _ in 0..4 {
        let mut socket = server.connect().await;
        assert!(livez_on(&mut socket).await.starts_with("HTTP/1.1 200"));
        holders.push(socket);
    }
    // A fifth is not served while the four are held (it cannot be: no slot is free)...
    let mut fifth = server.connect().await;
    fifth
        .write_all(b"GET /livez HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), fifth.read(&mut byte)).await;
    assert!(
        early.is_err(),
        "a connection past the cap was served: {early:?}"
    );
    // ...and is as soon as one of them closes; then the server serves as before.
    drop(holders.pop());
    let answer = read_answer(&mut fifth).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(holders);
    drop(fifth);
    for _ in 0..8 {
        assert_eq!(server.livez().await, 200);
    }
    server.stop().await;
}

#[tokio::test]
async fn idle_connections_are_closed_whatever_they_speak() {
    let server = Server::start(&[
        ("TICKFLOW_HTTP_IDLE_TIMEOUT_MS", "300"),
        ("TICKFLOW_HTTP_HEADER_READ_TIMEOUT_MS", "3600000"),
    ])
    .await;
    // Answered once, then silent.
    let mut kept_alive = server.connect().await;
    assert!(livez_on(&mut kept_alive).await.starts_with("HTTP/1.1 200"));
    wait_closed(kept_alive).await;
    // Never finishes the HTTP/2 preface, so the server never learns which protocol it is.
    let mut undecided = server.connect().await;
    undecided.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    wait_closed(undecided).await;
    // Says nothing at all.
    wait_closed(server.connect().await).await;
    assert_eq!(server.livez().await, 200);
    server.stop().await;
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_answered_408() {
    let server = Server::start(&[("TICKFLOW_HTTP_REQUEST_TIMEOUT_MS", "300")]).await;
    let mut socket = server.connect().await;
    socket
        .write_all(b"POST /echo HTTP/1.1\r\nhost: test\r\ncontent-length: 100\r\n\r\nonly ten b")
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&wait_closed(socket).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("TICKFLOW_HTTP_REQUEST_TIMEOUT_MS"),
        "{answer}"
    );
    // A whole body is answered.
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let echoed = client
        .post(format!("http://{}/echo", server.addr))
        .body("0123456789")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(echoed, "10");
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_kept_alive_connections_and_returns() {
    let server = Server::start(&[
        ("TICKFLOW_HTTP_IDLE_TIMEOUT_MS", "3600000"),
        ("TICKFLOW_HTTP_HEADER_READ_TIMEOUT_MS", "3600000"),
    ])
    .await;
    let mut idle = server.connect().await;
    assert!(livez_on(&mut idle).await.starts_with("HTTP/1.1 200"));
    server.stop().await;
    wait_closed(idle).await;
}
