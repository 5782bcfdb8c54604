//! Reading and printing stream entries, for `tickflow tail` and `tickflow dlq`: one
//! decoder ([`streams_core::inspect::EntryView`] with `tickflow_proto::display` for the
//! payloads), one line format, one JSON form.

use std::time::{SystemTime, UNIX_EPOCH};

use redis::Value;
use serde_json::{Map, Value as Json};
use streams_core::{RawEntry, inspect::EntryView};

use crate::format::{Paint, age, time_us};

/// An entry read from one stream, with where it came from.
#[derive(Debug, Clone)]
pub struct Read {
    /// The stream's key.
    pub stream: String,
    /// Its partition, when it is a partition of a logical stream.
    pub partition: Option<u32>,
    /// The entry.
    pub entry: RawEntry,
}

impl Read {
    /// The entry decoded for display.
    pub fn view(&self) -> EntryView {
        EntryView::decode(&self.entry, &|event_type, payload| {
            tickflow_proto::display::payload_json(event_type, payload).map_err(|e| e.to_string())
        })
    }

    /// The entry's id, ordered as Redis orders ids.
    pub fn order(&self) -> (u64, u64) {
        id_order(&self.entry.id)
    }

    /// One JSON object: the decoded entry (`id`, `type`, `key`, `origin_us`, `trace_id`,
    /// `traceparent`, `payload`, or `fields`; `dlq`; `error`) plus `stream`, `partition`,
    /// `origin` (RFC 3339) and `age_ms`.
    pub fn json(&self) -> Json {
        let view = self.view();
        let mut object = match serde_json::to_value(&view) {
            Ok(Json::Object(object)) => object,
            _ => Map::new(),
        };
        object.insert("stream".into(), Json::from(self.stream.clone()));
        object.insert("partition".into(), Json::from(self.partition));
        if let Some(envelope) = &view.envelope {
            object.insert("origin".into(), Json::from(time_us(envelope.origin_us)));
            object.insert(
                "age_ms".into(),
                Json::from(now_us().saturating_sub(envelope.origin_us) / 1000),
            );
        }
        Json::Object(object)
    }

    /// One line for people: id, partition, type, key, origin and age, trace id, the
    /// payload's fields (or the entry's own), and a dead letter's reason.
    pub fn line(&self, paint: Paint) -> String {
        let view = self.view();
        let mut line = paint.dim(&self.entry.id);
        if let Some(p) = self.partition {
            line.push_str(&format!(" p{p}"));
        }
        if let Some(e) = &view.envelope {
            line.push_str(&format!(
                " {} {} {} (age {})",
                paint.bold(&e.event_type),
                e.key,
                time_us(e.origin_us),
                age(now_us().saturating_sub(e.origin_us) / 1000)
            ));
            if let Some(trace) = &e.trace_id {
                line.push_str(&format!(" trace {trace}"));
            }
            if let Some(payload) = &e.payload {
                line.push_str(&format!(" {}", fields_text(payload)));
            }
        }
        if !view.fields.is_empty() {
            let fields: Vec<String> = view
                .fields
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            line.push_str(&format!(" {}", fields.join(" ")));
        }
        if let Some(error) = &view.error {
            line.push_str(&paint.warn(&format!(" (undecodable: {error})")));
        }
        if let Some(dlq) = &view.dlq {
            line.push_str(&paint.warn(&format!(" dlq.reason={:?}", dlq.reason)));
            line.push_str(&format!(
                " dlq.group={} dlq.deliveries={} dlq.source_id={}",
                dlq.group,
                dlq.deliveries.map_or("?".into(), |d| d.to_string()),
                dlq.source_id
            ));
        }
        line
    }
}

/// A payload's top-level fields as `name=value`; nested values stay JSON.
pub fn fields_text(payload: &Json) -> String {
    match payload {
        Json::Object(fields) => fields
            .iter()
            .map(|(name, value)| match value {
                Json::String(s) => format!("{name}={s}"),
                other => format!("{name}={other}"),
            })
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    }
}

/// `ms-seq` as a pair that orders as Redis orders ids (`(0, 0)` for garbage).
pub fn id_order(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// Reads entries of `stream` from `start` to `end` (XRANGE; `reverse`: XREVRANGE from
/// `end` down to `start`), at most `count`.
pub async fn range(
    conn: &mut (impl redis::aio::ConnectionLike + Send),
    stream: &str,
    start: &str,
    end: &str,
    count: usize,
    reverse: bool,
) -> anyhow::Result<Vec<RawEntry>> {
    let reply: Value = if reverse {
        redis::cmd("XREVRANGE")
            .arg(stream)
            .arg(end)
            .arg(start)
            .arg("COUNT")
            .arg(count)
            .query_async(conn)
            .await?
    } else {
        redis::cmd("XRANGE")
            .arg(stream)
            .arg(start)
            .arg(end)
            .arg("COUNT")
            .arg(count)
            .query_async(conn)
            .await?
    };
    Ok(streams_core::parse_entries(reply)?)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_order_as_redis_orders_them_and_payloads_read_as_fields() {
        assert!(id_order("10-2") > id_order("10-1"));
        assert!(id_order("11-0") > id_order("10-99"));
        assert_eq!(
            fields_text(&serde_json::json!({"symbol": "AAPL", "qty": 5, "x": {"a": 1}})),
            "qty=5 symbol=AAPL x={\"a\":1}"
        );
    }
}
