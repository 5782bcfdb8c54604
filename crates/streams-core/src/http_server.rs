//! The one HTTP server of every service (its own routes and the admin router), bounded so
//! that no client holds a connection, a slot or a task forever.
//!
//! `axum::serve` sets none of these bounds: without a timer hyper has no header-read
//! timeout, so a client that sends half a request header keeps its connection (and a task)
//! forever, and nothing caps how many it may open. [`serve`] is the same hyper server
//! (`hyper_util`'s automatic HTTP/1 and HTTP/2 builder, graceful shutdown) with its own
//! accept loop and these bounds, each from [`HttpServerLimits`]:
//!
//! - **connections**: at most `max_connections` are served at once; the accept loop waits
//!   for one to close before it accepts another, so a client past the cap waits in the
//!   kernel's accept queue instead of being served (or refused when that queue is full);
//! - **header read**: hyper closes an HTTP/1 connection whose request headers have not
//!   arrived `header_read_timeout` after it began waiting for them;
//! - **request**: a request's body must be read and answered within `request_timeout`, else
//!   the answer is 408;
//! - **idle**: a connection with no request in progress for `idle_timeout` (an HTTP/2 one
//!   that opens no stream, one that never finishes saying which protocol it speaks) is
//!   closed, gracefully;
//! - **closing**: a connection told to close (idle, or the server shutting down) that has
//!   not finished `request_timeout` later (a client that does not read its answer) is
//!   dropped.
//!
//! Each connection closed by a bound is counted in `tickflow_http_connections_closed_total`
//! with its `reason`.

use std::{
    pin::pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Request, State},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::config::HttpServerLimits;

/// The metric counting connections closed by one of the bounds, by `reason`:
/// `header_timeout`, `idle` or `unfinished` (dropped after closing took too long).
pub const CONNECTIONS_CLOSED_METRIC: &str = "tickflow_http_connections_closed_total";

/// Serves `router` on `listener` within `limits` until `shutdown` is cancelled; then stops
/// accepting, lets every connection finish the request in hand (each for at most
/// `limits.request_timeout`) and returns once all are closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &HttpServerLimits,
    shutdown: CancellationToken,
) {
    let router = router.layer(middleware::from_fn_with_state(
        limits.request_timeout,
        answer_within,
    ));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    let mut warned_full_at: Option<Instant> = None;
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                // Said at most once a minute: under a flood it would be said per connection.
                if warned_full_at.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
                    tracing::warn!(
                        limit = limits.max_connections,
                        "HTTP connection cap reached (TICKFLOW_HTTP_MAX_CONNECTIONS); new \
                         connections wait until one closes"
                    );
                    warned_full_at = Some(Instant::now());
                }
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    slot = slots.clone().acquire_owned() => {
                        slot.expect("the connection semaphore is never closed")
                    }
                }
            }
        };
        let stream = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    on_accept_error(e).await;
                    continue;
                }
            },
        };
        // Answers are small and written whole: send them at once.
        let _ = stream.set_nodelay(true);
        connections.spawn(serve_connection(
            stream,
            router.clone(),
            builder.clone(),
            Bounds {
                idle: limits.idle_timeout,
                closing: limits.request_timeout,
            },
            shutdown.clone(),
            slot,
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// The answer to a request that took longer than the request timeout.
async fn answer_within(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => (
            StatusCode::REQUEST_TIMEOUT,
            Json(serde_json::json!({
                "error": format!(
                    "the request was not received and answered within {} ms \
                     (TICKFLOW_HTTP_REQUEST_TIMEOUT_MS); what it asked for may or may not \
                     have been done",
                    limit.as_millis()
                )
            })),
        )
            .into_response(),
    }
}

/// An error accepting a connection: the client's (ignored), or the process's, such as
/// running out of file descriptors (logged; accepting pauses so that some can close).
async fn on_accept_error(error: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %error, "cannot accept HTTP connections; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// The per-connection bounds enforced by [`serve_connection`].
#[derive(Clone, Copy, Debug)]
struct Bounds {
    /// Close a connection with no request in progress for this long.
    idle: Duration,
    /// Drop a connection that has not finished closing this long after it was told to.
    closing: Duration,
}

/// Serves one connection until it ends, is idle too long, or shutdown; `_slot` is its
/// place under the connection cap, given back when this returns.
async fn serve_connection(
    stream: TcpStream,
    router: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    bounds: Bounds,
    shutdown: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let activity = Arc::new(Activity::new());
    let tracked = activity.clone();
    let router = TowerToHyperService::new(router);
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let in_flight = tracked.begin();
        let answer = hyper::service::Service::call(&router, request);
        async move {
            let response = answer.await;
            drop(in_flight);
            response
        }
    });
    let mut connection =
        pin!(builder.serve_connection_with_upgrades(TokioIo::new(stream), service));
    let mut closing_until: Option<Instant> = None;
    loop {
        let wake_at = closing_until.unwrap_or_else(|| activity.idle_deadline(bounds.idle));
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(error) = served {
                    let header_timeout = error
                        .downcast_ref::<hyper::Error>()
                        .is_some_and(hyper::Error::is_timeout);
                    if header_timeout {
                        closed("header_timeout");
                    }
                    tracing::debug!(error = %error, "HTTP connection ended with an error");
                }
                return;
            }
            () = shutdown.cancelled(), if closing_until.is_none() => {
                connection.as_mut().graceful_shutdown();
                closing_until = Some(Instant::now() + bounds.closing);
            }
            () = tokio::time::sleep_until(wake_at) => {
                if closing_until.is_some() {
                    closed("unfinished");
                    return;
                }
                if activity.is_idle_for(bounds.idle) {
                    closed("idle");
                    connection.as_mut().graceful_shutdown();
                    closing_until = Some(Instant::now() + bounds.closing);
                }
            }
        }
    }
}

fn closed(reason: &'static str) {
    tracing::debug!(reason, "HTTP connection closed by the server's bounds");
    metrics::counter!(CONNECTIONS_CLOSED_METRIC, "reason" => reason).increment(1);
}

/// Whether a connection has a request in progress, and since when it has had none.
#[derive(Debug)]
struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `opened` of the last request's start or end.
    last_change_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_change_ms: AtomicU64::new(0),
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.touch();
        InFlight(self.clone())
    }

    fn touch(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_change_ms.store(ms, Ordering::SeqCst);
    }

    fn last_change(&self) -> Instant {
        self.opened + Duration::from_millis(self.last_change_ms.load(Ordering::SeqCst))
    }

    /// When the connection will have been idle for `idle`, if no request starts; while one
    /// is in progress, a time to look again.
    fn idle_deadline(&self, idle: Duration) -> Instant {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            Instant::now() + idle
        } else {
            self.last_change() + idle
        }
    }

    fn is_idle_for(&self, idle: Duration) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0 && self.last_change().elapsed() >= idle
    }
}

/// A request in progress on a connection; its end is recorded when this is dropped.
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.touch();
    }
}
