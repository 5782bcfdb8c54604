//! `<service> healthcheck`: asks the service's own `/readyz` whether it is ready, for
//! container images without curl (Docker `HEALTHCHECK`, compose `healthcheck`).
//!
//! The address is the one the service listens on: `HTTP_ADDR` read through the same
//! [`Env`] as the service, with the service's own default; an unspecified address
//! (`0.0.0.0`, `[::]`) is reached on the loopback of its family. The check is one HTTP/1.1
//! `GET /readyz` with a short overall deadline: exit status 0 on `200`, 1 on anything else,
//! and one line on stdout saying why. It goes through hyper's HTTP/1 client, which every
//! service links already (the OTLP exporter's gRPC channel is built on it), on a
//! current-thread runtime of its own: the check runs before the service's runtime starts.
//!
//! A service's `main.rs` calls [`exit_if_requested`] first:
//!
//! ```no_run
//! streams_core::healthcheck::exit_if_requested("0.0.0.0:8081");
//! ```

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{
    Request, StatusCode,
    header::{HOST, USER_AGENT},
};
use hyper_util::rt::TokioIo;

use crate::config::Env;

/// The first argument that selects the health check.
pub const COMMAND: &str = "healthcheck";

/// How long the whole check (connect, request, answer) may take. Below Docker's and
/// Kubernetes' usual probe timeouts, so the check reports a reason instead of being killed.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// The most of an answer's body that is read.
const MAX_ANSWER: usize = 16 * 1024;

/// The most of the body shown in the one-line reason.
const MAX_REASON: usize = 300;

/// If the process's first argument is `healthcheck`, runs the check against the service's
/// `/readyz` and exits with its status; otherwise returns and the service starts.
/// `default_http_addr` is the service's default for `HTTP_ADDR`.
pub fn exit_if_requested(default_http_addr: &str) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(code) = dispatch(&args, &Env::process(), default_http_addr) {
        std::process::exit(code);
    }
}

/// `None` unless `args` (without the program name) start with `healthcheck`; then runs the
/// check, prints its one line, and returns the exit status (0 ready, 1 not).
pub fn dispatch(args: &[String], env: &Env, default_http_addr: &str) -> Option<i32> {
    if args.first().map(String::as_str) != Some(COMMAND) {
        return None;
    }
    let (code, line) = run(env, default_http_addr);
    println!("{line}");
    Some(code)
}

/// The check as the subcommand runs it: the exit status and the line to print.
pub fn run(env: &Env, default_http_addr: &str) -> (i32, String) {
    let addr = match env.addr_or("HTTP_ADDR", default_http_addr) {
        Ok(addr) => target(addr),
        Err(e) => return (1, format!("unhealthy: {e}")),
    };
    match check(addr, TIMEOUT) {
        Ok(()) => (0, format!("ready: http://{addr}/readyz answered 200")),
        Err(reason) => (1, format!("not ready: {reason}")),
    }
}

/// Where to connect to reach a server listening on `listen`: the loopback of the same
/// family when it listens on every address.
pub fn target(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// `GET /readyz` on `addr`: `Ok` on a 200, otherwise why not (refused, timed out, the
/// status and the start of the body, which for `/readyz` carries the reason).
pub fn check(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let url = format!("http://{addr}/readyz");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("{url}: cannot start the check: {e}"))?;
    runtime.block_on(async {
        tokio::time::timeout(timeout, get_readyz(addr, &url))
            .await
            .unwrap_or_else(|_| Err(format!("{url}: no answer within {timeout:?}")))
    })
}

/// `GET /readyz` on `addr`: `Ok` on 200, else the reason.
async fn get_readyz(addr: SocketAddr, url: &str) -> Result<(), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("{url}: cannot connect: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    // Drives the connection; it ends with the runtime.
    tokio::spawn(connection);
    let request = Request::get("/readyz")
        .header(HOST, addr.to_string())
        .header(USER_AGENT, "tickflow-healthcheck")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("{url}: {e}"))?;
    let response = sender.send_request(request).await.map_err(|e| {
        if e.is_parse() || e.is_incomplete_message() {
            format!("{url}: not an HTTP answer: {e}")
        } else {
            format!("{url}: no answer: {e}")
        }
    })?;
    let status = response.status();
    if status == StatusCode::OK {
        return Ok(());
    }
    // As much of the body as fits the reason; a body cut short still has its start.
    let body = Limited::new(response.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map(|body| body.to_bytes())
        .unwrap_or_default();
    let status = format!(
        "{} {}",
        status.as_str(),
        status.canonical_reason().unwrap_or_default()
    );
    let body = one_line(&String::from_utf8_lossy(&body));
    if body.is_empty() {
        Err(format!("{url} answered {}", status.trim_end()))
    } else {
        Err(format!("{url} answered {}: {body}", status.trim_end()))
    }
}

/// `text` on one line, shortened.
fn one_line(text: &str) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > MAX_REASON {
        let cut: String = flat.chars().take(MAX_REASON).collect();
        format!("{cut}…")
    } else {
        flat
    }
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener as StdListener, time::Instant};

    use axum::{Json, Router, http::StatusCode, routing::get};
    use serde_json::json;

    use super::*;
    use crate::{
        Redis, Stats,
        admin::{self, AdminState},
        testing::RedisServer,
    };

    /// Serves `router` on a free loopback port; the server lives as long as the runtime.
    async fn serve(router: Router) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        addr
    }

    fn readyz(status: StatusCode) -> Router {
        Router::new().route(
            "/readyz",
            get(move || async move {
                let ready = status == StatusCode::OK;
                let body = if ready {
                    json!({ "ready": true })
                } else {
                    json!({ "ready": false, "reason": "consumer groups not ready: transform" })
                };
                (status, Json(body))
            }),
        )
    }

    /// `check`, off the async threads (it blocks).
    async fn check_off_thread(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
        tokio::task::spawn_blocking(move || check(addr, timeout))
            .await
            .unwrap()
    }

    async fn dispatch_off_thread(args: &[&str], env: Env, default: &str) -> Option<i32> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let default = default.to_owned();
        tokio::task::spawn_blocking(move || dispatch(&args, &env, &default))
            .await
            .unwrap()
    }

    fn closed_port() -> SocketAddr {
        // Free a moment ago, and outside the range the kernel hands out to clients.
        SocketAddr::from(([127, 0, 0, 1], crate::testing::free_port()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_200_is_ready() {
        let addr = serve(readyz(StatusCode::OK)).await;
        assert_eq!(check_off_thread(addr, TIMEOUT).await, Ok(()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_503_is_not_ready_and_says_why() {
        let addr = serve(readyz(StatusCode::SERVICE_UNAVAILABLE)).await;
        let reason = check_off_thread(addr, TIMEOUT).await.unwrap_err();
        assert!(reason.contains("503 Service Unavailable"), "{reason}");
        assert!(
            reason.contains("consumer groups not ready: transform"),
            "{reason}"
        );
        assert!(!reason.contains('\n'), "one line: {reason}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_missing_route_is_not_ready() {
        let addr = serve(Router::new().route("/livez", get(|| async { "ok" }))).await;
        let reason = check_off_thread(addr, TIMEOUT).await.unwrap_err();
        assert!(reason.contains("404"), "{reason}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_port_is_not_ready() {
        let addr = closed_port();
        let reason = check_off_thread(addr, TIMEOUT).await.unwrap_err();
        assert!(reason.contains("cannot connect"), "{reason}");
        assert!(reason.contains(&addr.to_string()), "{reason}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_server_times_out_within_the_deadline() {
        // Accepts connections (the kernel does, from the backlog) and never answers.
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let started = Instant::now();
        let reason = check_off_thread(addr, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(
            reason.contains("timed out") || reason.contains("no answer"),
            "{reason}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        drop(listener);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_is_not_an_http_answer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = socket.read(&mut buf).await;
            socket.write_all(b"+PONG\r\n").await.unwrap();
        });
        let reason = check_off_thread(addr, TIMEOUT).await.unwrap_err();
        assert!(reason.contains("not an HTTP answer"), "{reason}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_the_healthcheck_argument_dispatches() {
        let env = Env::from_pairs([("HTTP_ADDR", closed_port().to_string())]);
        for args in [
            &[][..],
            &["load-refdata", "x.json"],
            &["serve"],
            &["Healthcheck"],
        ] {
            assert_eq!(
                dispatch_off_thread(args, env.clone(), "0.0.0.0:1").await,
                None,
                "{args:?}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dispatch_exits_0_when_ready_and_1_otherwise() {
        let ok = serve(readyz(StatusCode::OK)).await;
        let unavailable = serve(readyz(StatusCode::SERVICE_UNAVAILABLE)).await;
        // The service listens on every address; the check goes to the loopback.
        let everywhere = |addr: SocketAddr| format!("0.0.0.0:{}", addr.port());
        let cases = [
            (everywhere(ok), Some(0)),
            (everywhere(unavailable), Some(1)),
            (closed_port().to_string(), Some(1)),
            ("localhost:8080".to_owned(), Some(1)),
        ];
        for (http_addr, expected) in cases {
            let env = Env::from_pairs([("HTTP_ADDR", http_addr.clone())]);
            let code = dispatch_off_thread(&["healthcheck"], env, "0.0.0.0:1").await;
            assert_eq!(code, expected, "HTTP_ADDR={http_addr}");
        }
        // Unset HTTP_ADDR: the service's default applies.
        let env = Env::from_pairs::<&str, &str>([]);
        let default = everywhere(ok);
        assert_eq!(
            dispatch_off_thread(&["healthcheck"], env, &default).await,
            Some(0)
        );
    }

    #[test]
    fn the_lines_say_why() {
        let env = Env::from_pairs([("HTTP_ADDR", "nonsense")]);
        let (code, line) = run(&env, "0.0.0.0:1");
        assert_eq!(code, 1);
        assert!(line.starts_with("unhealthy: invalid HTTP_ADDR="), "{line}");
        let env = Env::from_pairs([("HTTP_ADDR", closed_port().to_string())]);
        let (code, line) = run(&env, "0.0.0.0:1");
        assert_eq!(code, 1);
        assert!(line.starts_with("not ready: http://127.0.0.1:"), "{line}");
    }

    #[test]
    fn unspecified_addresses_go_to_the_loopback() {
        let t = |s: &str| target(s.parse().unwrap()).to_string();
        assert_eq!(t("0.0.0.0:8080"), "127.0.0.1:8080");
        assert_eq!(t("[::]:8081"), "[::1]:8081");
        assert_eq!(t("10.1.2.3:8082"), "10.1.2.3:8082");
        assert_eq!(t("127.0.0.1:8083"), "127.0.0.1:8083");
    }

    fn admin_router(redis_url: &str) -> Router {
        admin::router(AdminState {
            redis: Redis::new(redis_url, 2).unwrap(),
            stats: Stats::default(),
            admin_token: None,
            metrics: None,
            service: "test".into(),
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_real_readyz_of_the_admin_router() {
        let redis = RedisServer::start();
        let up = serve(admin_router(&redis.url())).await;
        assert_eq!(check_off_thread(up, TIMEOUT).await, Ok(()));

        let down = serve(admin_router(&format!("redis://{}", closed_port()))).await;
        let reason = check_off_thread(down, TIMEOUT).await.unwrap_err();
        assert!(reason.contains("503"), "{reason}");
        assert!(reason.contains("redis unreachable"), "{reason}");
    }
}
