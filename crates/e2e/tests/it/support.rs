//! Helpers shared by the end-to-end tests: event builders, report and trade views, waits.

use std::{collections::BTreeMap, time::Duration};

use e2e::Pipeline;
use serde_json::{Value, json};
use tickflow_proto::v1::{self, event::Kind};

/// How long any single asynchronous effect may take. Generous: a loaded CI machine runs
/// several pipelines at once; a passing run waits a fraction of a second.
pub(crate) const WAIT: Duration = Duration::from_secs(30);

/// A limit order as the HTTP API takes it.
pub(crate) fn limit_json(symbol: &str, side: &str, price: f64, qty: u64, id: &str) -> Value {
    json!({ "symbol": symbol, "side": side, "price": price, "qty": qty, "client_order_id": id })
}

/// A limit order event for gRPC.
pub(crate) fn limit(symbol: &str, side: v1::Side, price: f64, qty: f64, id: &str) -> v1::Event {
    v1::Event {
        kind: Some(Kind::NewOrder(v1::NewOrder {
            symbol: symbol.into(),
            side: side as i32,
            r#type: v1::OrderType::Limit as i32,
            price,
            qty,
            client_order_id: id.into(),
        })),
    }
}

/// A market order event for gRPC.
pub(crate) fn market(symbol: &str, side: v1::Side, qty: f64, id: &str) -> v1::Event {
    v1::Event {
        kind: Some(Kind::NewOrder(v1::NewOrder {
            symbol: symbol.into(),
            side: side as i32,
            r#type: v1::OrderType::Market as i32,
            price: 0.0,
            qty,
            client_order_id: id.into(),
        })),
    }
}

/// A cancel event for gRPC.
pub(crate) fn cancel(symbol: &str, id: &str) -> v1::Event {
    v1::Event {
        kind: Some(Kind::Cancel(v1::CancelOrder {
            symbol: symbol.into(),
            client_order_id: id.into(),
        })),
    }
}

/// A tick event for gRPC.
pub(crate) fn tick(symbol: &str, price: f64, qty: f64) -> v1::Event {
    v1::Event {
        kind: Some(Kind::Tick(v1::MarketTick {
            symbol: symbol.into(),
            price,
            qty,
        })),
    }
}

/// `FILLED` for `EXEC_STATUS_FILLED`.
pub(crate) fn status_name(status: i32) -> String {
    v1::ExecStatus::try_from(status)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("EXEC_STATUS_")
                .to_owned()
        })
        .unwrap_or_else(|_| format!("UNKNOWN({status})"))
}

/// A trade as the tests compare it: symbol, price, qty, buy id, sell id, sequence.
pub(crate) type TradeView = (String, i64, u64, String, String, u64);

pub(crate) fn trade_view(t: &v1::Trade) -> TradeView {
    (
        t.symbol.clone(),
        t.price_e6,
        t.qty,
        t.buy_order_id.clone(),
        t.sell_order_id.clone(),
        t.sequence,
    )
}

/// An expected trade.
pub(crate) fn trade(
    symbol: &str,
    price_e6: i64,
    qty: u64,
    buy: &str,
    sell: &str,
    seq: u64,
) -> TradeView {
    (symbol.into(), price_e6, qty, buy.into(), sell.into(), seq)
}

/// An execution report as the tests compare it: id, status, last qty, last price, cum
/// qty, leaves qty, sequence.
pub(crate) type ReportView = (String, String, u64, i64, u64, u64, u64);

pub(crate) fn report_view(r: &v1::ExecutionReport) -> ReportView {
    (
        r.client_order_id.clone(),
        status_name(r.status),
        r.last_qty,
        r.last_price_e6,
        r.cum_qty,
        r.leaves_qty,
        r.sequence,
    )
}

/// An expected report.
pub(crate) fn report(
    id: &str,
    status: &str,
    last_qty: u64,
    last_price_e6: i64,
    cum_qty: u64,
    leaves_qty: u64,
    seq: u64,
) -> ReportView {
    (
        id.into(),
        status.into(),
        last_qty,
        last_price_e6,
        cum_qty,
        leaves_qty,
        seq,
    )
}

/// The reports of `symbol`, in the order the pipeline wrote them.
pub(crate) fn reports_of(reports: &[v1::ExecutionReport], symbol: &str) -> Vec<ReportView> {
    reports
        .iter()
        .filter(|r| r.symbol == symbol)
        .map(report_view)
        .collect()
}

/// The last status reported for each order id.
pub(crate) fn final_statuses(reports: &[v1::ExecutionReport]) -> BTreeMap<String, String> {
    reports
        .iter()
        .map(|r| (r.client_order_id.clone(), status_name(r.status)))
        .collect()
}

/// Waits until some execution report of order `id` has status `status`; returns it.
pub(crate) async fn wait_report(p: &Pipeline, id: &str, status: &str) -> v1::ExecutionReport {
    p.wait_for(WAIT, async || {
        let reports = p.execution_reports().await;
        reports
            .iter()
            .find(|r| r.client_order_id == id && status_name(r.status) == status)
            .cloned()
            .ok_or_else(|| {
                let seen: Vec<ReportView> = reports
                    .iter()
                    .filter(|r| r.client_order_id == id)
                    .map(report_view)
                    .collect();
                format!("a {status} report of {id} (seen: {seen:?})")
            })
    })
    .await
}

/// Waits until `symbol` has at least `count` trades; returns them all (every symbol).
pub(crate) async fn wait_trades(p: &Pipeline, symbol: &str, count: usize) -> Vec<v1::Trade> {
    p.wait_for(WAIT, async || {
        let trades = p.trades().await;
        let seen = trades.iter().filter(|t| t.symbol == symbol).count();
        if seen >= count {
            Ok(trades)
        } else {
            Err(format!("{count} trades of {symbol} (seen {seen})"))
        }
    })
    .await
}

/// Approximate equality of floats in JSON answers.
#[track_caller]
pub(crate) fn assert_close(actual: &Value, expected: f64, what: &str) {
    let actual = actual
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: not a number: {actual}"));
    assert!(
        (actual - expected).abs() < 1e-6,
        "{what}: {actual} != {expected}"
    );
}
