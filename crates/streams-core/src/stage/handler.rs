//! What a stage's logic sees and returns: a [`Delivery`] in, [`Outputs`] (the effects applied
//! with the entry's acknowledgement) out, through the [`Handler`] trait.

use std::{borrow::Cow, future::Future, sync::Arc};

use crate::{envelope::Envelope, keys::Partition};

/// One input entry handed to a [`Handler`].
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The input partition (for [`Inputs::External`], the stream's index).
    pub partition: Partition,
    /// The Redis key of the stream it was read from.
    pub stream: Arc<str>,
    /// Its stream id.
    pub id: String,
    /// How many times it has been delivered, this time included.
    pub deliveries: u32,
    /// Its fields as read.
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
    /// The decoded envelope ([`InputFormat::Envelope`] stages only).
    pub envelope: Option<Envelope>,
}

impl Delivery {
    /// The value of field `name`, if present.
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(n, _)| n.as_slice() == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }
}

/// Why a handler could not handle an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// It may work later (a dependency is down): the entry stays pending and is delivered
    /// again; after `max_deliveries` it is dead-lettered.
    #[error("retryable: {0}")]
    Retry(String),
    /// It can never work (corrupt payload, ...): the entry is dead-lettered with this reason.
    #[error("{0}")]
    Permanent(String),
}

/// What handling one entry produces; applied atomically with the entry's acknowledgement.
#[derive(Debug, Default)]
pub struct Outputs {
    pub(super) ops: Vec<Op>,
}

#[derive(Debug)]
pub(crate) enum Op {
    /// XADD an envelope (encoded straight into the script call).
    AppendEnvelope { key: String, envelope: Envelope },
    /// XADD arbitrary fields (dead letters).
    Append {
        key: String,
        fields: Vec<(Cow<'static, [u8]>, Vec<u8>)>,
    },
    Command {
        name: &'static str,
        key: String,
        args: Vec<Vec<u8>>,
    },
}

impl Op {
    /// The key the op writes.
    pub(crate) fn key(&self) -> &str {
        match self {
            Op::AppendEnvelope { key, .. } | Op::Append { key, .. } | Op::Command { key, .. } => {
                key
            }
        }
    }
}

impl Outputs {
    /// Append `envelope` to the stream `key` (from [`KeySpace::stream`]).
    /// The entry carries the trace context of the span handling the input (when traced),
    /// so the next stage continues the trace.
    pub fn append(&mut self, key: impl Into<String>, envelope: &Envelope) {
        let mut envelope = envelope.clone();
        if let Some((traceparent, tracestate)) =
            crate::trace_context::headers_of(&tracing::Span::current())
        {
            envelope.traceparent = Some(traceparent);
            envelope.tracestate = tracestate;
        }
        self.ops.push(Op::AppendEnvelope {
            key: key.into(),
            envelope,
        });
    }

    /// Run `name key args...` if and only if the entry is acknowledged now. `name` is one of
    /// the commands whose failure ACK_FORWARD can rule out before its first write (see
    /// `COMMANDS` in `ack_forward.lua`: `SET` of one value, `HSET`, `HDEL`, `SADD`, `SREM`,
    /// `ZADD`, `ZREM`, `ZREMRANGEBYSCORE`, `DEL`); any other refuses the whole commit. The
    /// key should share the input partition's hash tag.
    pub fn command(&mut self, name: &'static str, key: impl Into<String>, args: Vec<Vec<u8>>) {
        self.ops.push(Op::Command {
            name,
            key: key.into(),
            args,
        });
    }

    /// How many effects there are.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// A stage's logic. It is called for one entry at a time, in the order read.
pub trait Handler: Send + Sync + 'static {
    /// Handle one entry, pushing what it produces into `out`. On error `out` is discarded.
    fn handle(
        &mut self,
        delivery: &Delivery,
        out: &mut Outputs,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// This consumer now owns `partition` (owned mode), before any of its entries arrive.
    /// A stateful stage loads the partition's state here.
    fn partition_acquired(
        &mut self,
        _partition: Partition,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        async { Ok(()) }
    }

    /// This consumer no longer owns `partition`; state held for it is stale from now on.
    fn partition_released(&mut self, _partition: Partition) {}

    /// Called once per partition after a batch's entries were handled, before the commit:
    /// effects pushed here (e.g. a snapshot of the partition's state) are applied in the
    /// same script call, if any entry of the batch is acknowledged by it.
    fn batch_effects(&mut self, _partition: Partition, _out: &mut Outputs) {}
}
