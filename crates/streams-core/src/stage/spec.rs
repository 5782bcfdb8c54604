//! What a stage is: its group, its inputs, how replicas share them, and the resolved input
//! streams ([`Source`]) that the loop, maintenance, admin operations and stats all use.

use std::sync::Arc;

use crate::keys::{KeySpace, Partition};

/// How a stage's replicas share the partitions of its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsumeMode {
    /// Every consumer reads every partition through the group: the fastest way when the
    /// order of events does not matter.
    Shared,
    /// Each partition is read by exactly one consumer at a time, holding a lease; events of
    /// one partition leave the stage in the order they entered it, across crashes and
    /// rebalancing.
    Owned,
}

/// What a stage's input entries are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputFormat {
    /// tickflow [`Envelope`]s; an entry that is not one is dead-lettered.
    Envelope,
    /// Arbitrary flat fields, as an outside producer XADDs them.
    Raw,
}

/// Which streams a stage reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inputs {
    /// Every partition of a logical tickflow stream.
    Partitioned(String),
    /// Streams named outside tickflow's key layout (one partition each, in order), such as
    /// an `ingest_stream` that other programs XADD to. Each gets `<key>:dlq`.
    External(Vec<String>),
}

/// A stage's shape: its group, its inputs, how replicas share them, and the input format.
#[derive(Clone, Debug)]
pub struct StageSpec {
    /// The consumer group, also the stage's name in metrics and admin status.
    pub group: String,
    /// The streams it consumes.
    pub inputs: Inputs,
    /// Shared or owned partitions.
    pub mode: ConsumeMode,
    /// Envelopes or raw fields.
    pub format: InputFormat,
}

/// A resolved input stream.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    pub(crate) partition: Partition,
    /// The logical stream (or external key) it is a partition of.
    pub(crate) logical: Arc<str>,
    pub(crate) stream: Arc<str>,
    pub(crate) dead_letter: String,
    pub(crate) lease: String,
}

impl StageSpec {
    /// The Redis keys this stage reads, with their dead-letter and lease keys.
    pub(crate) fn sources(&self, keys: &KeySpace) -> Vec<Source> {
        match &self.inputs {
            Inputs::Partitioned(logical) => keys
                .all_partitions()
                .map(|p| Source {
                    partition: p,
                    logical: logical.as_str().into(),
                    stream: keys.stream(logical, p).into(),
                    dead_letter: keys.dead_letter(logical, p),
                    lease: keys.lease(&self.group, p),
                })
                .collect(),
            Inputs::External(streams) => streams
                .iter()
                .enumerate()
                .map(|(i, key)| Source {
                    partition: i as Partition,
                    logical: key.as_str().into(),
                    stream: key.as_str().into(),
                    dead_letter: format!("{key}:dlq"),
                    lease: format!("{key}:lease:{}", self.group),
                })
                .collect(),
        }
    }
}
