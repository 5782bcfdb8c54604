//! `engine`: tickflow's matching engine, as a pure library.
//!
//! This crate is the deterministic core of the engine stage: one limit order book per
//! symbol, matched by price-time priority, with no Redis, no I/O, no clocks and no floats.
//! The stage around it ([`stage`]) feeds each owned partition's validated entries, in
//! stream order, to that partition's [`Books`] ([`stage::apply`]) and forwards the returned
//! [`Event`]s. In the same atomic step that acknowledges a batch and appends its events,
//! it writes what the batch changed in the books (each touched book's band, last price and
//! sequence, and each changed resting order): the stored books are always the snapshot as
//! of the last acknowledged entry. Because the same entries always produce the same events
//! and state, a replica that takes over a partition (or a restarted one) loads that
//! snapshot ([`stage::load_books`]), then replays the entries after it — exactly the
//! entries still pending, which it must handle first, in order — and continues exactly
//! where the previous owner was.
//!
//! # Layout
//!
//! - [`book`]: everything. [`OrderBook`] (one symbol), [`Books`] (one partition:
//!   symbol → book, driven by [`Command`]s), the order types ([`NewOrder`], [`Side`],
//!   [`OrderKind`], [`Resting`]) and the output ([`Event`], [`RejectReason`],
//!   [`CancelReason`]). All are re-exported here.
//!
//! # Units
//!
//! A [`Price`] is an `i64` in micro-units (`price × 1_000_000`, [`PRICE_SCALE`]); a
//! [`Qty`] is a `u64` count of whole lots (lot normalization happens upstream).
//!
//! # Rules
//!
//! - **Validation**, in this order, each a [`Event::Rejected`] that leaves the book as it
//!   was: quantity zero ([`RejectReason::ZeroQuantity`]); a *live* (resting) order has the
//!   same client order id ([`RejectReason::DuplicateOrderId`]; ids of filled or cancelled
//!   orders may be reused); a limit price outside the price band
//!   ([`RejectReason::OutsidePriceBand`]); a market order with nothing to execute against
//!   ([`RejectReason::NoLiquidity`]).
//! - **Price band**: `band_bps` basis points either side of the reference price, edges
//!   included (see [`OrderBook::band`]). The reference price is the last trade's price or
//!   the last [`OrderBook::on_tick`], whichever came last. There is no band when
//!   `band_bps` is 0 or when there is no reference price yet. The band is taken once, when
//!   an order arrives; it does not move while that order executes. Resting orders are
//!   never re-checked against a moved band.
//! - **Limit orders** execute while they cross the best opposite level, then rest the
//!   remainder at their price, behind the orders already there.
//! - **Market orders** execute level by level but never beyond the band edge (the high edge
//!   for a buy, the low edge for a sell) when a band applies; they never rest: the unfilled
//!   remainder is cancelled ([`CancelReason::MarketRemainder`]). A market order that could
//!   not execute at all, because the other side is empty or has nothing within the band,
//!   is rejected with [`RejectReason::NoLiquidity`] instead of accepted and cancelled.
//! - **Execution price**: always the resting (maker) order's price.
//! - **Self-trade**: allowed. The book has no notion of an account or owner, so two orders
//!   of the same trader match like any others; self-trade prevention, if wanted, belongs
//!   upstream (where the owner is known) or in a later version of this crate.
//! - **Cancel** of an order that is not live (unknown, filled, already cancelled) is
//!   rejected with [`RejectReason::UnknownOrder`].
//!
//! # Events
//!
//! Every event carries `seq`, the book's sequence number: it grows by one per event and
//! never repeats, so `(symbol, seq)` identifies an event. A submit yields `Accepted` or
//! `Rejected`; after `Accepted`, each execution yields `Trade`, then the taker's `Fill`,
//! then the maker's `Fill` (a `Fill` with `leaves_qty == 0` completes its order); a market
//! order's remainder ends with `Cancelled`. A cancel yields `Cancelled` or `Rejected`.
//! A tick yields nothing.
//!
//! # Snapshots
//!
//! [`OrderBook`] and [`Books`] implement `Serialize`/`Deserialize`; the snapshot is the
//! whole state: `band_bps`, `last_price`, `sequence`, and `bids`/`asks` as lists of
//! [`Resting`] orders in priority order (best price first, then arrival). The cancel index
//! is not stored: it is rebuilt from the levels. Deserializing checks the snapshot (sides,
//! quantities, price order, unique ids, not crossed) and fails with a [`SnapshotError`]
//! message rather than restoring a book the matching code could trip over.

pub mod book;
pub mod stage;
pub mod store;

use streams_core::{App, ConsumeMode, InputFormat, Inputs, StageSpec};
use tickflow_proto::topology;

/// The engine stage's spec: owned partitions of the validated stream.
pub fn spec() -> StageSpec {
    StageSpec {
        group: topology::ENGINE_GROUP.into(),
        inputs: Inputs::Partitioned(topology::VALIDATED.into()),
        mode: ConsumeMode::Owned,
        format: InputFormat::Envelope,
    }
}

/// Runs the engine until shutdown, serving the admin router on `http`.
pub async fn run(app: App, http: tokio::net::TcpListener) -> anyhow::Result<()> {
    let stage = app.stage(
        spec(),
        stage::Matching::new(app.config.keys.clone(), app.redis.clone()),
    );
    app.serve(
        http,
        axum::Router::new(),
        async move { Ok(stage.run().await?) },
    )
    .await
}

pub use book::{
    Books, CancelReason, Command, Event, NewOrder, OrderBook, OrderKind, PRICE_SCALE, Price, Qty,
    RejectReason, Resting, Side, SnapshotError,
};

/// Where the service listens for HTTP unless `HTTP_ADDR` says otherwise.
pub const DEFAULT_HTTP_ADDR: &str = "0.0.0.0:8082";

/// The whole service as its binary runs it: configuration from `env`, then [`run`] until
/// `shutdown`.
pub async fn main_with(
    env: streams_core::Env,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let app = App::init("engine", env, DEFAULT_HTTP_ADDR, shutdown)?;
    let http = app.bind().await?;
    run(app, http).await
}
