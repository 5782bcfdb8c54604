//! The ingest gRPC service (`tickflow.v1.IngestService`).

use futures::StreamExt;
use tickflow_proto::v1::{
    self, PublishRequest, PublishResponse,
    ingest_service_server::{IngestService, IngestServiceServer},
};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    publish::{PublishError, Publisher},
    validate,
};

/// Events appended per Redis round trip on `PublishStream`.
const STREAM_CHUNK: usize = 512;

/// The service implementation.
#[derive(Clone, Debug)]
pub struct Ingest {
    publisher: Publisher,
    max_events: usize,
}

/// The tonic server for the ingest service, answering malformed requests with the statuses
/// gRPC prescribes ([`ClientErrors`]).
pub fn service(
    publisher: Publisher,
    max_events: usize,
) -> ClientErrors<IngestServiceServer<Ingest>> {
    ClientErrors(IngestServiceServer::new(Ingest {
        publisher,
        max_events,
    }))
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
    ) -> Result<Response<PublishResponse>, Status> {
        let (traceparent, tracestate) = trace_context(request.metadata());
        let mut stream = request.into_inner();
        let mut ids = Vec::new();
        let mut chunk = Vec::with_capacity(STREAM_CHUNK);
        let mut index = 0usize;
        loop {
            // Take what has already arrived, up to a chunk, then append it in one round trip.
            let next = if chunk.is_empty() {
                stream.next().await
            } else {
                match futures::FutureExt::now_or_never(stream.next()) {
                    Some(item) => item,
                    None => {
                        self.flush(&mut chunk, &mut ids, &traceparent, &tracestate)
                            .await?;
                        continue;
                    }
                }
            };
            match next {
                Some(Ok(mut event)) => {
                    check(index, &mut event)?;
                    index += 1;
                    chunk.push(event);
                    if chunk.len() >= STREAM_CHUNK {
                        self.flush(&mut chunk, &mut ids, &traceparent, &tracestate)
                            .await?;
                    }
                }
                Some(Err(status)) => return Err(status),
                None => break,
            }
        }
        self.flush(&mut chunk, &mut ids, &traceparent, &tracestate)
            .await?;
        Ok(Response::new(PublishResponse {
            accepted: ids.len() as u32,
            ids,
        }))
    }
}

impl Ingest {
    async fn flush(
        &self,
        chunk: &mut Vec<v1::Event>,
        ids: &mut Vec<String>,
        traceparent: &Option<String>,
        tracestate: &Option<String>,
    ) -> Result<(), Status> {
        if chunk.is_empty() {
            return Ok(());
        }
        let appended = self
            .publisher
            .publish(
                "tickflow.v1.IngestService/PublishStream",
                chunk,
                traceparent.as_deref(),
                tracestate.as_deref(),
                None,
            )
            .await
            .map_err(|e| {
                let status = to_status(e);
                // Events before this chunk are in; say how many so the client can resume.
                Status::new(
                    status.code(),
                    format!("{} (accepted before this: {})", status.message(), ids.len()),
                )
            })?;
        ids.extend(appended.ids);
        chunk.clear();
        Ok(())
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
#[derive(Clone, Debug)]
pub struct ClientErrors<S>(S);

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
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: tonic::codegen::http::Request<B>) -> Self::Future {
        let answer = self.0.call(request);
        Box::pin(async move {
            let mut response = answer.await?;
            correct_status(response.headers_mut());
            Ok(response)
        })
    }
}

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
