//! The ingest gRPC service (`tickflow.v1.IngestService`) and the limits of its server.

use std::time::Duration;

use futures::StreamExt;
use streams_core::{Env, config::ConfigError};
use tickflow_proto::v1::{
    self, PublishRequest, PublishResponse, PublishStreamResponse,
    ingest_service_server::{IngestService, IngestServiceServer},
};
use tonic::{Code, Request, Response, Status, Streaming, metadata::MetadataValue};

use crate::{
    publish::{PublishError, Publisher},
    validate,
};

/// Events appended per Redis round trip on `PublishStream`.
const STREAM_CHUNK: usize = 512;

/// The bounds of ingest's gRPC server, so that no client holds a connection, a stream or
/// memory without limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcLimits {
    /// `INGEST_GRPC_MAX_MESSAGE_BYTES`: the largest request message (`RESOURCE_EXHAUSTED`).
    pub max_message_bytes: usize,
    /// `INGEST_GRPC_MAX_CONCURRENT_STREAMS`: calls open at once on one connection (HTTP/2
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_concurrent_streams: u32,
    /// `INGEST_GRPC_CONCURRENCY_PER_CONNECTION`: calls of one connection handled at once;
    /// the others wait.
    pub concurrency_per_connection: usize,
    /// `INGEST_GRPC_KEEPALIVE_INTERVAL_MS`: how often an HTTP/2 ping checks the client.
    pub keepalive_interval: Duration,
    /// `INGEST_GRPC_KEEPALIVE_TIMEOUT_MS`: a connection whose ping is not answered within
    /// this is closed.
    pub keepalive_timeout: Duration,
    /// `INGEST_GRPC_REQUEST_TIMEOUT_MS`: how long a `Publish` may take, and how long a
    /// `PublishStream` may wait for its next event (`DEADLINE_EXCEEDED`).
    pub request_timeout: Duration,
    /// `INGEST_MAX_STREAM_EVENTS`: events one `PublishStream` may carry; past it the stream
    /// fails with `RESOURCE_EXHAUSTED` (the events before are appended).
    pub max_stream_events: u64,
}

impl Default for GrpcLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 << 20,
            max_concurrent_streams: 100,
            concurrency_per_connection: 32,
            keepalive_interval: Duration::from_millis(30_000),
            keepalive_timeout: Duration::from_millis(10_000),
            request_timeout: Duration::from_millis(30_000),
            max_stream_events: 1_000_000,
        }
    }
}

impl GrpcLimits {
    /// Reads the variables.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let defaults = Self::default();
        let ms = |duration: Duration| duration.as_millis() as u64;
        Ok(Self {
            max_message_bytes: env.ranged_or(
                "INGEST_GRPC_MAX_MESSAGE_BYTES",
                defaults.max_message_bytes as u64,
                1024,
                64 << 20,
            )? as usize,
            max_concurrent_streams: env.ranged_or(
                "INGEST_GRPC_MAX_CONCURRENT_STREAMS",
                u64::from(defaults.max_concurrent_streams),
                1,
                10_000,
            )? as u32,
            concurrency_per_connection: env.ranged_or(
                "INGEST_GRPC_CONCURRENCY_PER_CONNECTION",
                defaults.concurrency_per_connection as u64,
                1,
                10_000,
            )? as usize,
            keepalive_interval: env.millis_or(
                "INGEST_GRPC_KEEPALIVE_INTERVAL_MS",
                ms(defaults.keepalive_interval),
                10,
                3_600_000,
            )?,
            keepalive_timeout: env.millis_or(
                "INGEST_GRPC_KEEPALIVE_TIMEOUT_MS",
                ms(defaults.keepalive_timeout),
                10,
                3_600_000,
            )?,
            request_timeout: env.millis_or(
                "INGEST_GRPC_REQUEST_TIMEOUT_MS",
                ms(defaults.request_timeout),
                10,
                3_600_000,
            )?,
            max_stream_events: env.ranged_or(
                "INGEST_MAX_STREAM_EVENTS",
                defaults.max_stream_events,
                1,
                u64::from(u32::MAX),
            )?,
        })
    }

    /// A tonic server builder with these limits (the service's own, message size and
    /// `Publish`'s deadline, are set by [`service`]).
    pub fn server(&self) -> tonic::transport::Server {
        tonic::transport::Server::builder()
            .max_concurrent_streams(self.max_concurrent_streams)
            .concurrency_limit_per_connection(self.concurrency_per_connection)
            .http2_keepalive_interval(Some(self.keepalive_interval))
            .http2_keepalive_timeout(Some(self.keepalive_timeout))
    }
}

/// The service implementation.
#[derive(Clone, Debug)]
pub struct Ingest {
    publisher: Publisher,
    max_events: usize,
    limits: GrpcLimits,
}

/// The tonic server for the ingest service, answering malformed requests with the statuses
/// gRPC prescribes and bounding `Publish` in time ([`ClientErrors`]).
pub fn service(
    publisher: Publisher,
    max_events: usize,
    limits: &GrpcLimits,
) -> ClientErrors<IngestServiceServer<Ingest>> {
    let server = IngestServiceServer::new(Ingest {
        publisher,
        max_events,
        limits: limits.clone(),
    })
    .max_decoding_message_size(limits.max_message_bytes);
    ClientErrors {
        inner: server,
        publish_timeout: limits.request_timeout,
    }
}

#[tonic::async_trait]
impl IngestService for Ingest {
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        let (traceparent, tracestate) = trace_context(request.metadata());
        let idempotency_key = match request.metadata().get(crate::http::IDEMPOTENCY_KEY) {
            None => None,
            Some(value) => {
                let key = value
                    .to_str()
                    .map_err(|_| "must be printable ASCII".to_owned())
                    .and_then(|k| crate::publish::check_idempotency_key(k).map(|()| k.to_owned()))
                    .map_err(|m| Status::invalid_argument(format!("idempotency-key: {m}")))?;
                Some(key)
            }
        };
        let mut events = request.into_inner().events;
        if events.is_empty() {
            return Err(Status::invalid_argument("no events"));
        }
        if events.len() > self.max_events {
            return Err(Status::invalid_argument(format!(
                "{} events; at most {} per call",
                events.len(),
                self.max_events
            )));
        }
        for (index, event) in events.iter_mut().enumerate() {
            check(index, event)?;
        }
        let appended = self
            .publisher
            .publish(
                "tickflow.v1.IngestService/Publish",
                &events,
                traceparent.as_deref(),
                tracestate.as_deref(),
                idempotency_key.as_deref(),
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(PublishResponse {
            accepted: appended.ids.len() as u32,
            ids: appended.ids,
        }))
    }

    async fn publish_stream(
        &self,
        request: Request<Streaming<v1::Event>>,
    ) -> Result<Response<PublishStreamResponse>, Status> {
        let (traceparent, tracestate) = trace_context(request.metadata());
        let trace = (traceparent.as_deref(), tracestate.as_deref());
        let mut stream = request.into_inner();
        let mut progress = StreamProgress::default();
        let mut chunk = Vec::with_capacity(STREAM_CHUNK);
        loop {
            // Take what has already arrived, up to a chunk, then append it in one round trip;
            // wait for more only with nothing in hand, and not forever.
            let next = if chunk.is_empty() {
                match tokio::time::timeout(self.limits.request_timeout, stream.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        return Err(progress.status(
                            Code::DeadlineExceeded,
                            &format!(
                                "no event for {} ms (INGEST_GRPC_REQUEST_TIMEOUT_MS)",
                                self.limits.request_timeout.as_millis()
                            ),
                        ));
                    }
                }
            } else {
                match futures::FutureExt::now_or_never(stream.next()) {
                    Some(item) => item,
                    None => {
                        self.flush(&mut chunk, &mut progress, trace).await?;
                        continue;
                    }
                }
            };
            let failure = match next {
                None => break,
                Some(Err(status)) => status,
                Some(Ok(_))
                    if progress.accepted + chunk.len() as u64 >= self.limits.max_stream_events =>
                {
                    Status::resource_exhausted(format!(
                        "more than {} events in one PublishStream (INGEST_MAX_STREAM_EVENTS); \
                         send the rest in a new stream",
                        self.limits.max_stream_events
                    ))
                }
                Some(Ok(mut event)) => {
                    let index = progress.accepted + chunk.len() as u64;
                    match check(index as usize, &mut event) {
                        Ok(()) => {
                            chunk.push(event);
                            if chunk.len() >= STREAM_CHUNK {
                                self.flush(&mut chunk, &mut progress, trace).await?;
                            }
                            continue;
                        }
                        Err(status) => status,
                    }
                }
            };
            // Everything before the failure is appended, so that the client knows exactly
            // where to resume: the status says how many.
            self.flush(&mut chunk, &mut progress, trace).await?;
            return Err(progress.status(failure.code(), failure.message()));
        }
        self.flush(&mut chunk, &mut progress, trace).await?;
        Ok(Response::new(PublishStreamResponse {
            accepted: progress.accepted as u32,
            last_id: progress.last_id.unwrap_or_default(),
        }))
    }
}

impl Ingest {
    async fn flush(
        &self,
        chunk: &mut Vec<v1::Event>,
        progress: &mut StreamProgress,
        (traceparent, tracestate): (Option<&str>, Option<&str>),
    ) -> Result<(), Status> {
        if chunk.is_empty() {
            return Ok(());
        }
        let appended = self
            .publisher
            .publish(
                "tickflow.v1.IngestService/PublishStream",
                chunk,
                traceparent,
                tracestate,
                None,
            )
            .await
            .map_err(|e| {
                let status = to_status(e);
                progress.status(status.code(), status.message())
            })?;
        progress.accepted += appended.ids.len() as u64;
        progress.last_id = appended.ids.last().cloned().or(progress.last_id.take());
        chunk.clear();
        Ok(())
    }
}

/// What a `PublishStream` has appended so far: its answer, or what its failure reports.
#[derive(Debug, Default)]
struct StreamProgress {
    accepted: u64,
    last_id: Option<String>,
}

impl StreamProgress {
    /// A status ending the stream that says how much of it was appended, in its message and
    /// in the metadata `tickflow-accepted` and `tickflow-last-id`.
    fn status(&self, code: Code, message: &str) -> Status {
        let last = self
            .last_id
            .as_deref()
            .map_or(String::new(), |id| format!(", the last with id {id}"));
        let mut status = Status::new(
            code,
            format!(
                "{message}; {} events of this stream were accepted before it{last}",
                self.accepted
            ),
        );
        let metadata = status.metadata_mut();
        metadata.insert("tickflow-accepted", MetadataValue::from(self.accepted));
        if let Some(id) = self.last_id.as_deref().and_then(|id| id.parse().ok()) {
            metadata.insert("tickflow-last-id", id);
        }
        status
    }
}

fn check(index: usize, event: &mut v1::Event) -> Result<(), Status> {
    validate::normalize(event).map_err(|problems| {
        let text = problems
            .iter()
            .map(|(field, message)| format!("event {index}: `{field}` {message}"))
            .collect::<Vec<_>>()
            .join("; ");
        Status::invalid_argument(text)
    })
}

fn to_status(error: PublishError) -> Status {
    match error {
        PublishError::Overloaded(e) => Status::resource_exhausted(e.to_string()),
        PublishError::KeyReused => Status::invalid_argument(
            "idempotency-key was already used for a different request; nothing was accepted",
        ),
        PublishError::Redis(e) => {
            tracing::warn!(error = %e, "publish failed");
            Status::unavailable("the pipeline's Redis is unavailable; nothing was accepted")
        }
        e @ PublishError::NotConfirmed(_) => {
            tracing::warn!(error = %e, "publish not confirmed by replicas");
            Status::unavailable(e.to_string())
        }
    }
}

/// The caller's `traceparent` and `tracestate` metadata, as sent: the publisher checks them
/// (and drops an oversize `tracestate`) for every source alike.
fn trace_context(metadata: &tonic::metadata::MetadataMap) -> (Option<String>, Option<String>) {
    let text = |name| {
        metadata
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    (text("traceparent"), text("tracestate"))
}

/// A gRPC service whose answers to malformed requests carry the status gRPC prescribes, not
/// the one tonic gives before the handler runs: a request message over the size limit is
/// `RESOURCE_EXHAUSTED` (tonic: `OUT_OF_RANGE`), and one that is not valid protobuf (bytes
/// no client library writes, a string that is not UTF-8) is `INVALID_ARGUMENT` (tonic:
/// `INTERNAL`, which says the server failed). Both are answered before any response
/// message, so the status is in the response's headers.
///
/// It also bounds `Publish` in time, from the request's first byte (so a message that
/// trickles in is covered too): past `publish_timeout` the answer is `DEADLINE_EXCEEDED`.
/// `PublishStream` bounds its own waits instead (a stream may rightly last long).
#[derive(Clone, Debug)]
pub struct ClientErrors<S> {
    inner: S,
    publish_timeout: Duration,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for ClientErrors<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for ClientErrors<S>
where
    S: tonic::codegen::Service<
            tonic::codegen::http::Request<B>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        >,
    S::Future: Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: tonic::codegen::http::Request<B>) -> Self::Future {
        let deadline = (request.uri().path() == PUBLISH_PATH).then_some(self.publish_timeout);
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answered = match deadline {
                Some(limit) => tokio::time::timeout(limit, answer).await,
                None => Ok(answer.await),
            };
            let Ok(answered) = answered else {
                let status = Status::deadline_exceeded(format!(
                    "Publish took longer than {} ms (INGEST_GRPC_REQUEST_TIMEOUT_MS); the \
                     events may or may not have been appended (retry with the same \
                     idempotency-key)",
                    deadline.unwrap_or_default().as_millis()
                ));
                return Ok(status.into_http());
            };
            let mut response = answered?;
            correct_status(response.headers_mut());
            Ok(response)
        })
    }
}

/// The path of `Publish`, the call [`ClientErrors`] bounds in time.
const PUBLISH_PATH: &str = "/tickflow.v1.IngestService/Publish";

/// Rewrites the status in `headers` (see [`ClientErrors`]), if it is one to correct.
fn correct_status(headers: &mut tonic::codegen::http::HeaderMap) {
    let code = headers.get("grpc-status").map(|v| v.as_bytes());
    if code != Some(b"11") && code != Some(b"13") {
        return;
    }
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    if let Some(corrected) = corrected(&status) {
        headers.remove("grpc-message");
        headers.remove("grpc-status-details");
        if corrected.add_header(headers).is_err() {
            tracing::warn!(status = ?corrected, "could not correct a gRPC status");
        }
    }
}

/// The status a client should get instead of `status`, if it is one tonic gets wrong.
fn corrected(status: &Status) -> Option<Status> {
    let message = status.message();
    match status.code() {
        tonic::Code::OutOfRange if message.contains("message length too large") => {
            Some(Status::resource_exhausted(message.to_owned()))
        }
        tonic::Code::Internal if message.starts_with("failed to decode Protobuf message") => {
            Some(Status::invalid_argument(format!(
                "the request is not a valid protobuf message: {message}"
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_requests_get_client_error_statuses() {
        let too_large = Status::out_of_range(
            "Error, decoded message length too large: found 5242923 bytes, the limit is: \
             4194304 bytes",
        );
        let mut headers = tonic::codegen::http::HeaderMap::new();
        headers.insert("content-type", "application/grpc".parse().unwrap());
        too_large.add_header(&mut headers).unwrap();
        correct_status(&mut headers);
        let status = Status::from_header_map(&headers).unwrap();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(status.message(), too_large.message());
        assert_eq!(headers.get_all("content-type").iter().count(), 1);

        let undecodable = Status::internal(
            "failed to decode Protobuf message: NewOrder.symbol: invalid string value: data is \
             not UTF-8 encoded",
        );
        let fixed = corrected(&undecodable).unwrap();
        assert_eq!(fixed.code(), tonic::Code::InvalidArgument);
        assert!(fixed.message().contains("not UTF-8"), "{fixed:?}");

        // Statuses the handlers give, and any other, are left alone.
        for status in [
            Status::internal("something else"),
            Status::out_of_range("something else"),
            Status::invalid_argument("event 0: `qty` must be a finite number > 0"),
            Status::resource_exhausted("transform is behind"),
        ] {
            assert!(corrected(&status).is_none(), "{status:?}");
            let mut headers = tonic::codegen::http::HeaderMap::new();
            status.add_header(&mut headers).unwrap();
            let before = headers.clone();
            correct_status(&mut headers);
            assert_eq!(headers, before);
        }
    }
}
