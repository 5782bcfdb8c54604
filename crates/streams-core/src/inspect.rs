//! Looking at a pipeline from outside: typed `XINFO GROUPS` / `XINFO CONSUMERS` replies,
//! the inputs of a stage with their dead letters and leases, dead-letter replay, and the
//! one decoder that turns a stream entry into something a person (or a script) can read.
//!
//! The operator CLI (`tickflow status`, `tail`, `dlq`, `groups`, `top`), producers'
//! backpressure and the benchmark read groups through [`GroupInfo`] and consumers through
//! [`ConsumerInfo`]; nothing else parses those replies.
//!
//! [`EntryView`] decodes an entry for display: the envelope's header (type, key, origin
//! time, trace context), its payload through a decoder the caller gives (streams-core
//! knows the envelope, not the messages inside it: `tickflow_proto::display` decodes
//! tickflow's), the `dlq.*` fields of a dead letter, and the plain fields of an entry that
//! is no envelope (an external stream's).

use std::collections::BTreeMap;

use redis::{Value, aio::ConnectionLike};
use serde::Serialize;

use crate::{
    admin_ops::{self, bounded_lag, xinfo_records},
    connection::Redis,
    envelope::Envelope,
    error::Result,
    keys::{KeySpace, Partition},
    scripts::RawEntry,
    stage::{ConsumeMode, StageSpec, spec::Source},
};

/// One consumer group of a stream, as `XINFO GROUPS` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupInfo {
    /// The group's name.
    pub name: String,
    /// How many consumers it has.
    pub consumers: u64,
    /// Entries delivered to it and not yet acknowledged.
    pub pending: u64,
    /// The last entry delivered to it.
    pub last_delivered_id: String,
    /// Entries it has read (Redis ≥ 7.0; `None` when Redis cannot tell).
    pub entries_read: Option<u64>,
    /// Entries not yet delivered to it (Redis ≥ 7.0). `None` when Redis cannot tell:
    /// after undelivered entries were trimmed or deleted, or after `XGROUP SETID` to an
    /// arbitrary id.
    pub lag: Option<u64>,
}

impl GroupInfo {
    /// The command that reads every group of `stream`.
    pub fn command(stream: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("XINFO");
        cmd.arg("GROUPS").arg(stream);
        cmd
    }

    /// Every group in an `XINFO GROUPS` reply (RESP2 or RESP3).
    pub fn parse(reply: Value) -> Vec<Self> {
        xinfo_records(reply)
            .into_iter()
            .map(|fields| {
                let number = |name: &str| fields.get(name).and_then(|v| v.parse::<u64>().ok());
                Self {
                    name: fields.get("name").cloned().unwrap_or_default(),
                    consumers: number("consumers").unwrap_or(0),
                    pending: number("pending").unwrap_or(0),
                    last_delivered_id: fields.get("last-delivered-id").cloned().unwrap_or_default(),
                    entries_read: number("entries-read"),
                    lag: number("lag"),
                }
            })
            .collect()
    }

    /// The group named `group` in an `XINFO GROUPS` reply.
    pub fn find(reply: Value, group: &str) -> Option<Self> {
        Self::parse(reply).into_iter().find(|g| g.name == group)
    }

    /// Every group of `stream`; none when the stream does not exist.
    pub async fn read(conn: &mut impl ConnectionLike, stream: &str) -> Result<Vec<Self>> {
        match Self::command(stream).query_async::<Value>(conn).await {
            Ok(reply) => Ok(Self::parse(reply)),
            Err(e) if is_missing(&e) => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }

    /// The lag, but never more than the stream holds (`length`): Redis's counters can be
    /// left too high after an AOF reload.
    pub fn bounded_lag(&self, length: u64) -> Option<u64> {
        bounded_lag(self.lag, length)
    }

    /// What the group has still to handle in a stream of `length` entries: its lag plus
    /// its pending entries; `None` when Redis cannot tell the lag.
    pub fn backlog(&self, length: u64) -> Option<u64> {
        self.bounded_lag(length).map(|lag| lag + self.pending)
    }
}

/// One consumer of a group, as `XINFO CONSUMERS` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsumerInfo {
    /// Its name.
    pub name: String,
    /// Entries delivered to it and not yet acknowledged.
    pub pending: u64,
    /// Milliseconds since it last tried to read or claim.
    pub idle_ms: u64,
    /// Milliseconds since it last read or claimed an entry (Redis ≥ 7.2).
    pub inactive_ms: Option<u64>,
}

impl ConsumerInfo {
    /// The command that reads every consumer of `group` on `stream`.
    pub fn command(stream: &str, group: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("XINFO");
        cmd.arg("CONSUMERS").arg(stream).arg(group);
        cmd
    }

    /// Every consumer in an `XINFO CONSUMERS` reply (RESP2 or RESP3).
    pub fn parse(reply: Value) -> Vec<Self> {
        xinfo_records(reply)
            .into_iter()
            .map(|fields| {
                let number = |name: &str| fields.get(name).and_then(|v| v.parse::<u64>().ok());
                Self {
                    name: fields.get("name").cloned().unwrap_or_default(),
                    pending: number("pending").unwrap_or(0),
                    idle_ms: number("idle").unwrap_or(0),
                    inactive_ms: number("inactive"),
                }
            })
            .collect()
    }

    /// Every consumer of `group` on `stream`; none when either does not exist.
    pub async fn read(
        conn: &mut impl ConnectionLike,
        stream: &str,
        group: &str,
    ) -> Result<Vec<Self>> {
        match Self::command(stream, group)
            .query_async::<Value>(conn)
            .await
        {
            Ok(reply) => Ok(Self::parse(reply)),
            Err(e) if is_missing(&e) => Ok(Vec::new()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Whether `e` says the stream or the group does not exist (yet).
fn is_missing(e: &redis::RedisError) -> bool {
    e.code() == Some("NOGROUP") || e.to_string().contains("no such key")
}

/// One input of a stage: a partition of its logical stream (or one external stream), with
/// the keys that go with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StageInput {
    /// The partition (for external streams, the stream's index in the list).
    pub partition: Partition,
    /// The stream the stage reads.
    pub stream: String,
    /// Its dead-letter stream.
    pub dead_letter: String,
    /// The lease key of the partition, for an owned stage.
    pub lease: Option<String>,
    /// The logical stream (or the external stream's key), for replays into it.
    pub logical: String,
}

/// The inputs of the stage `spec` describes, in partition order: exactly the keys the
/// stage itself reads, dead-letters to and leases.
pub fn stage_inputs(spec: &StageSpec, keys: &KeySpace) -> Vec<StageInput> {
    let owned = spec.mode == ConsumeMode::Owned;
    spec.sources(keys)
        .into_iter()
        .map(|source| StageInput {
            partition: source.partition,
            stream: source.stream.to_string(),
            dead_letter: source.dead_letter.clone(),
            lease: owned.then(|| source.lease.clone()),
            logical: source.logical.to_string(),
        })
        .collect()
}

impl StageInput {
    fn source(&self) -> Source {
        Source {
            partition: self.partition,
            logical: self.logical.as_str().into(),
            stream: self.stream.as_str().into(),
            dead_letter: self.dead_letter.clone(),
            lease: self.lease.clone().unwrap_or_else(|| self.stream.clone()),
        }
    }
}

/// Moves up to `count` dead letters of `input`, oldest first, back into its stream
/// without their `dlq.*` fields: the admin API's replay (`POST /admin/dlq/replay`), one
/// script call, all or nothing. Returns how many it moved.
pub async fn replay_dead_letters(redis: &Redis, input: &StageInput, count: u64) -> Result<u64> {
    admin_ops::replay_dead_letters(redis, &input.source(), count).await
}

/// Moves the one dead letter `id` of `input` back into its stream, as
/// [`replay_dead_letters`] moves the oldest: its fields without `dlq.*`, appended with a
/// new id, and deleted from the dead-letter stream, in one `MULTI`/`EXEC` that does
/// nothing if the entry changed meanwhile (`WATCH`, on a connection of its own to the
/// slot's master). On a Redis Cluster, an external stream and its dead letters are in two
/// slots: there the dead letter is appended once through a dedupe gate in the stream's
/// slot, then deleted, as [`replay_dead_letters`] does.
pub async fn replay_dead_letter(redis: &Redis, input: &StageInput, id: &str) -> Result<OneReplay> {
    let source = input.source();
    if admin_ops::replays_across_slots(redis, &source) {
        let (replayed, kept) =
            admin_ops::replay_across_slots(redis, &source, admin_ops::Replay::One(id)).await?;
        return Ok(match (replayed, kept) {
            (0, 0) => OneReplay::Missing,
            (0, _) => OneReplay::Kept,
            _ => OneReplay::Moved,
        });
    }
    // WATCH belongs to a connection: one of our own, to the master of the slot.
    let mut conn = redis
        .dedicated_for(&input.dead_letter, std::time::Duration::ZERO)
        .await?;
    let conn = &mut conn;
    let _: () = redis::cmd("WATCH")
        .arg(&input.dead_letter)
        .query_async(conn)
        .await?;
    let reply: Value = redis::cmd("XRANGE")
        .arg(&input.dead_letter)
        .arg(id)
        .arg(id)
        .query_async(conn)
        .await?;
    let Some(entry) = crate::scripts::parse_entries(reply)?.into_iter().next() else {
        let _: () = redis::cmd("UNWATCH").query_async(conn).await?;
        return Ok(OneReplay::Missing);
    };
    if entry
        .fields
        .iter()
        .any(|(name, _)| name == b"dlq.fields_dropped")
    {
        let _: () = redis::cmd("UNWATCH").query_async(conn).await?;
        return Ok(OneReplay::Kept);
    }
    let fields: Vec<&(Vec<u8>, Vec<u8>)> = entry
        .fields
        .iter()
        .filter(|(name, _)| !name.starts_with(b"dlq."))
        .collect();
    let mut transaction = redis::pipe();
    transaction.atomic();
    if !fields.is_empty() {
        let append = transaction.cmd("XADD").arg(&input.stream).arg("*");
        for (name, value) in fields {
            append.arg(name.as_slice()).arg(value.as_slice());
        }
        append.ignore();
    }
    transaction
        .cmd("XDEL")
        .arg(&input.dead_letter)
        .arg(id)
        .ignore();
    // EXEC answers nil when the dead-letter stream changed since WATCH: nothing was done.
    let done: Option<()> = transaction.query_async(conn).await?;
    Ok(match done {
        Some(()) => OneReplay::Moved,
        None => OneReplay::Changed,
    })
}

/// What [`replay_dead_letter`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OneReplay {
    /// The entry is back in its stream.
    Moved,
    /// No dead letter has that id.
    Missing,
    /// The dead-letter stream changed meanwhile; nothing was done (try again).
    Changed,
    /// It cannot go back whole (it kept only the first fields of its entry, or on a
    /// cluster has more than one append takes): it stays.
    Kept,
}

/// The `dlq.*` fields of a dead letter: why, and where it came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeadLetterInfo {
    /// Why it was dead-lettered.
    pub reason: String,
    /// The group that dead-lettered it.
    pub group: String,
    /// How often it had been delivered.
    pub deliveries: Option<u64>,
    /// Its id in the stream it came from.
    pub source_id: String,
    /// That stream.
    pub stream: String,
    /// When, µs since the Unix epoch.
    pub at_us: Option<u64>,
}

/// An envelope's header and decoded payload.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EnvelopeView {
    /// The event type, e.g. `order.new`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The partition key (the symbol).
    pub key: String,
    /// When the event entered the pipeline, µs since the Unix epoch.
    pub origin_us: u64,
    /// The W3C trace id, when the entry is traced.
    pub trace_id: Option<String>,
    /// The whole W3C `traceparent`.
    pub traceparent: Option<String>,
    /// The payload's fields, as the caller's decoder read them.
    pub payload: Option<serde_json::Value>,
}

/// A stream entry, decoded for a person or a script: what `tickflow tail` and `tickflow
/// dlq` print.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EntryView {
    /// The entry's id.
    pub id: String,
    /// The envelope, when the entry is one and it decodes.
    #[serde(flatten)]
    pub envelope: Option<EnvelopeView>,
    /// The entry's own fields when it is no envelope (an external stream's flat fields) or
    /// one that does not decode; values that are not printable text are escaped.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, String>,
    /// The `dlq.*` fields, for a dead letter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dlq: Option<DeadLetterInfo>,
    /// Why the envelope or its payload did not decode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Decodes an envelope's payload (event type, bytes) into its fields.
pub type PayloadDecoder<'a> =
    &'a dyn Fn(&str, &[u8]) -> std::result::Result<serde_json::Value, String>;

impl EntryView {
    /// Decodes `entry`; `payload` reads an envelope's payload.
    pub fn decode(entry: &RawEntry, payload: PayloadDecoder<'_>) -> Self {
        let (meta, own): (Vec<_>, Vec<_>) = entry
            .fields
            .iter()
            .partition(|(name, _)| name.starts_with(b"dlq."));
        let dlq = (!meta.is_empty()).then(|| dead_letter_info(&meta));
        let mut view = Self {
            id: entry.id.clone(),
            envelope: None,
            fields: BTreeMap::new(),
            dlq,
            error: None,
        };
        let is_envelope = own
            .iter()
            .any(|(name, _)| name == b"h" || name == b"v" || name == b"payload");
        if is_envelope {
            match Envelope::from_fields(own.iter().map(|(n, v)| (n.as_slice(), v.as_slice()))) {
                Ok(envelope) => {
                    let decoded = payload(&envelope.event_type, &envelope.payload);
                    if let Err(e) = &decoded {
                        view.error = Some(format!("payload: {e}"));
                    }
                    view.envelope = Some(EnvelopeView {
                        trace_id: envelope
                            .traceparent
                            .as_deref()
                            .and_then(|t| t.split('-').nth(1))
                            .map(str::to_owned),
                        event_type: envelope.event_type,
                        key: envelope.partition_key,
                        origin_us: envelope.origin_us,
                        traceparent: envelope.traceparent,
                        payload: decoded.ok(),
                    });
                    return view;
                }
                Err(e) => view.error = Some(format!("envelope: {e}")),
            }
        }
        view.fields = own
            .iter()
            .map(|(name, value)| (printable(name), printable(value)))
            .collect();
        view
    }
}

fn dead_letter_info(meta: &[&(Vec<u8>, Vec<u8>)]) -> DeadLetterInfo {
    let mut info = DeadLetterInfo::default();
    for (name, value) in meta {
        let value = printable(value);
        match name.as_slice() {
            b"dlq.reason" => info.reason = value,
            b"dlq.group" => info.group = value,
            b"dlq.deliveries" => info.deliveries = value.parse().ok(),
            b"dlq.source_id" => info.source_id = value,
            b"dlq.stream" => info.stream = value,
            b"dlq.at_us" => info.at_us = value.parse().ok(),
            _ => {}
        }
    }
    info
}

/// `bytes` as text: as they are when they are printable UTF-8, else escaped (`\x00`).
fn printable(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.chars().any(char::is_control) => text.to_owned(),
        _ => bytes.escape_ascii().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(pairs: &[(&str, &str)]) -> Value {
        Value::Array(
            pairs
                .iter()
                .flat_map(|(k, v)| {
                    let value = match v.parse::<i64>() {
                        Ok(n) => Value::Int(n),
                        Err(_) if *v == "nil" => Value::Nil,
                        Err(_) => Value::BulkString(v.as_bytes().to_vec()),
                    };
                    [Value::BulkString(k.as_bytes().to_vec()), value]
                })
                .collect(),
        )
    }

    #[test]
    fn groups_and_consumers_are_read_from_resp2_and_resp3_replies() {
        let engine = [
            ("name", "engine"),
            ("consumers", "2"),
            ("pending", "3"),
            ("last-delivered-id", "1700000000000-5"),
            ("entries-read", "9"),
            ("lag", "4"),
        ];
        let trimmed = [("name", "bench"), ("pending", "0"), ("lag", "nil")];
        let groups = GroupInfo::parse(Value::Array(vec![flat(&engine), flat(&trimmed)]));
        assert_eq!(
            groups[0],
            GroupInfo {
                name: "engine".into(),
                consumers: 2,
                pending: 3,
                last_delivered_id: "1700000000000-5".into(),
                entries_read: Some(9),
                lag: Some(4),
            }
        );
        assert_eq!(groups[0].backlog(100), Some(7));
        assert_eq!(
            groups[0].backlog(2),
            Some(5),
            "the lag is bounded by the length"
        );
        assert_eq!(groups[1].lag, None);
        assert_eq!(groups[1].backlog(10), None);

        let Value::Array(pairs) = flat(&engine) else {
            unreachable!()
        };
        let map = Value::Map(
            pairs
                .chunks(2)
                .map(|p| (p[0].clone(), p[1].clone()))
                .collect(),
        );
        assert_eq!(
            GroupInfo::find(Value::Array(vec![map]), "engine"),
            Some(groups[0].clone())
        );

        let consumers = ConsumerInfo::parse(Value::Array(vec![flat(&[
            ("name", "engine-0"),
            ("pending", "3"),
            ("idle", "1500"),
        ])]));
        assert_eq!(
            consumers,
            [ConsumerInfo {
                name: "engine-0".into(),
                pending: 3,
                idle_ms: 1500,
                inactive_ms: None,
            }]
        );
    }

    fn entry(fields: &[(&str, &[u8])]) -> RawEntry {
        RawEntry {
            id: "1-0".into(),
            fields: fields
                .iter()
                .map(|(n, v)| (n.as_bytes().to_vec(), v.to_vec()))
                .collect(),
        }
    }

    fn hex_payload(
        event_type: &str,
        payload: &[u8],
    ) -> std::result::Result<serde_json::Value, String> {
        if event_type == "broken" {
            return Err("not a message".into());
        }
        Ok(
            serde_json::json!({ "hex": payload.iter().map(|b| format!("{b:02x}")).collect::<String>() }),
        )
    }

    #[test]
    fn envelopes_dead_letters_and_flat_entries_decode_for_display() {
        let mut envelope = Envelope::new("order.new", "AAPL", vec![1u8, 2]);
        envelope.origin_us = 1_700_000_000_000_000;
        envelope.traceparent =
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        let fields = envelope.to_fields();
        let view = EntryView::decode(
            &entry(&[("h", &fields[0].1), ("p", &fields[1].1)]),
            &hex_payload,
        );
        let envelope_view = view.envelope.as_ref().unwrap();
        assert_eq!(envelope_view.event_type, "order.new");
        assert_eq!(envelope_view.key, "AAPL");
        assert_eq!(envelope_view.origin_us, 1_700_000_000_000_000);
        assert_eq!(
            envelope_view.trace_id.as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(
            envelope_view.payload,
            Some(serde_json::json!({"hex": "0102"}))
        );
        assert!(view.fields.is_empty() && view.dlq.is_none() && view.error.is_none());
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["type"], "order.new");
        assert_eq!(json["id"], "1-0");

        // A dead letter that is no envelope: its fields, escaped, and the reason.
        let garbage = EntryView::decode(
            &entry(&[
                ("h", b"9 nonsense"),
                ("p", b"\x00\xff"),
                ("dlq.reason", b"unsupported envelope version `9`"),
                ("dlq.deliveries", b"1"),
                ("dlq.group", b"engine"),
            ]),
            &hex_payload,
        );
        assert!(garbage.envelope.is_none());
        assert!(garbage.error.as_deref().unwrap().starts_with("envelope:"));
        assert_eq!(garbage.fields["p"], "\\x00\\xff");
        let dlq = garbage.dlq.unwrap();
        assert_eq!(dlq.reason, "unsupported envelope version `9`");
        assert_eq!((dlq.deliveries, dlq.group.as_str()), (Some(1), "engine"));

        // A payload the decoder refuses: the header still shows.
        let envelope = Envelope::new("broken", "X", vec![7u8]).to_fields();
        let broken = EntryView::decode(
            &entry(&[("h", &envelope[0].1), ("p", &envelope[1].1)]),
            &hex_payload,
        );
        assert_eq!(broken.envelope.unwrap().payload, None);
        assert_eq!(broken.error.as_deref(), Some("payload: not a message"));

        // An external stream's flat fields.
        let flat_entry =
            EntryView::decode(&entry(&[("symbol", b"AAPL"), ("qty", b"5")]), &hex_payload);
        assert!(flat_entry.envelope.is_none() && flat_entry.error.is_none());
        assert_eq!(flat_entry.fields["symbol"], "AAPL");
    }
}
