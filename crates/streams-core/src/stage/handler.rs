//! What a stage's logic sees and returns: a [`Delivery`] in, [`Outputs`] (the effects applied
//! with the entry's acknowledgement) out, through the [`Handler`] trait.

use std::{borrow::Cow, future::Future, sync::Arc};

use crate::{envelope::Envelope, keys::Partition, scripts::MAX_ENTRY_FIELDS};

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

/// The commands an effect may run ([`Outputs::command`]); the commit script knows each one's
/// key type and argument shape, which it checks before its first write.
pub const EFFECT_COMMANDS: &[&str] = &[
    "HSET",
    "HDEL",
    "SADD",
    "SREM",
    "ZADD",
    "ZREM",
    "ZREMRANGEBYSCORE",
    "SET",
    "DEL",
    "UNLINK",
];

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

impl Op {
    /// The type of key the op needs (the commit script's code: `s` stream, `h` hash, `S`
    /// set, `z` sorted set, `t` string, `*` any), or why the op is not one the commit can
    /// apply whole: a command outside [`EFFECT_COMMANDS`], arguments of the wrong shape, an
    /// entry with more fields than one XADD can take from a script.
    pub(crate) fn key_type(&self) -> Result<char, String> {
        let (name, args) = match self {
            Op::AppendEnvelope { .. } => return Ok('s'),
            Op::Append { fields, .. } => {
                return if fields.is_empty() || fields.len() > MAX_ENTRY_FIELDS {
                    Err(format!(
                        "an entry of {} fields (1 to {MAX_ENTRY_FIELDS})",
                        fields.len()
                    ))
                } else {
                    Ok('s')
                };
            }
            Op::Command { name, args, .. } => (*name, args),
        };
        let pairs = !args.is_empty() && args.len() % 2 == 0;
        let shape_ok = match name {
            "HSET" => pairs,
            "HDEL" | "SADD" | "SREM" | "ZREM" => !args.is_empty(),
            "ZADD" => pairs && args.iter().step_by(2).all(|score| is_score(score)),
            "ZREMRANGEBYSCORE" => args.len() == 2 && args.iter().all(|b| is_bound(b)),
            "SET" => args.len() == 1,
            "DEL" | "UNLINK" => args.is_empty(),
            _ => return Err(format!("{name} is not an effect command")),
        };
        if !shape_ok {
            return Err(format!(
                "{name} with {} arguments of the wrong shape",
                args.len()
            ));
        }
        Ok(match name {
            "HSET" | "HDEL" => 'h',
            "SADD" | "SREM" => 'S',
            "ZADD" | "ZREM" | "ZREMRANGEBYSCORE" => 'z',
            "SET" => 't',
            _ => '*',
        })
    }
}

/// A sorted-set score as Redis takes it: a number (not NaN) or `±inf`.
fn is_score(text: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(text) else {
        return false;
    };
    matches!(text, "inf" | "+inf" | "-inf") || text.parse::<f64>().is_ok_and(|x| !x.is_nan())
}

/// A score range bound: a score, optionally exclusive (`(`).
fn is_bound(text: &[u8]) -> bool {
    is_score(text.strip_prefix(b"(").unwrap_or(text))
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
    /// [`EFFECT_COMMANDS`] (the commit refuses any other before writing anything); the
    /// arguments may be as many as needed (they are sent in chunks). The key should share
    /// the input partition's hash tag.
    pub fn command(&mut self, name: &'static str, key: impl Into<String>, args: Vec<Vec<u8>>) {
        debug_assert!(
            EFFECT_COMMANDS.contains(&name),
            "{name} is not an effect command"
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    fn command(name: &'static str, args: &[&str]) -> Op {
        Op::Command {
            name,
            key: "k".into(),
            args: args.iter().map(|a| a.as_bytes().to_vec()).collect(),
        }
    }

    #[test]
    fn every_effect_command_has_a_key_type_and_a_shape() {
        let valid = [
            ("HSET", &["f", "v"][..], 'h'),
            ("HDEL", &["f"][..], 'h'),
            ("SADD", &["m"][..], 'S'),
            ("SREM", &["m"][..], 'S'),
            ("ZADD", &["1.5", "m", "-inf", "n"][..], 'z'),
            ("ZREM", &["m"][..], 'z'),
            ("ZREMRANGEBYSCORE", &["-inf", "(12"][..], 'z'),
            ("SET", &["v"][..], 't'),
            ("DEL", &[][..], '*'),
            ("UNLINK", &[][..], '*'),
        ];
        assert_eq!(valid.len(), EFFECT_COMMANDS.len());
        for (name, args, wanted) in valid {
            assert!(EFFECT_COMMANDS.contains(&name));
            assert_eq!(command(name, args).key_type(), Ok(wanted), "{name}");
        }
        for (name, args) in [
            ("HSET", &["f"][..]),
            ("HDEL", &[][..]),
            ("ZADD", &["nan", "m"][..]),
            ("ZADD", &["NX", "1", "m"][..]),
            ("ZREMRANGEBYSCORE", &["a", "b"][..]),
            ("SET", &["v", "NX"][..]),
            ("DEL", &["x"][..]),
            ("UNLINK", &["x"][..]),
            ("FLUSHALL", &[][..]),
            ("HINCRBY", &["f", "1"][..]),
        ] {
            assert!(command(name, args).key_type().is_err(), "{name} {args:?}");
        }
    }
}
