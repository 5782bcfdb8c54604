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

/// The tonic server for the ingest service.
pub fn service(publisher: Publisher, max_events: usize) -> IngestServiceServer<Ingest> {
    IngestServiceServer::new(Ingest {
        publisher,
        max_events,
    })
}

#[tonic::async_trait]
impl IngestService for Ingest {
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        let (traceparent, tracestate) = trace_context(request.metadata());
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
        let ids = self
            .publisher
            .publish(
                "tickflow.v1.IngestService/Publish",
                &events,
                traceparent.as_deref(),
                tracestate.as_deref(),
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(PublishResponse {
            accepted: ids.len() as u32,
            ids,
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
        ids.extend(appended);
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
        PublishError::Redis(e) => {
            tracing::warn!(error = %e, "publish failed");
            Status::unavailable("the pipeline's Redis is unavailable; nothing was accepted")
        }
    }
}

fn trace_context(metadata: &tonic::metadata::MetadataMap) -> (Option<String>, Option<String>) {
    let traceparent = metadata
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|t| crate::http::is_valid_traceparent(t))
        .map(str::to_owned);
    let tracestate = traceparent.as_ref().and(
        metadata
            .get("tracestate")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    );
    (traceparent, tracestate)
}
