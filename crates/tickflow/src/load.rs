//! `tickflow load [--grpc URL] [--rate N] [--seconds S] [--symbols A,B,..]`: a steady demo
//! load of limit and market orders, cancels and ticks around a drifting mid price per
//! symbol, through ingest's gRPC `PublishStream`. Runs until Ctrl-C (or `--seconds`).

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng, rngs::StdRng};
use tickflow_proto::v1::{self, event::Kind, ingest_service_client::IngestServiceClient};

/// `tickflow load`'s options.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:
  tickflow load                                  # 200 events/s to ingest on 127.0.0.1:50051
  tickflow load --rate 1000 --seconds 60 --symbols AAPL,MSFT
  INGEST_GRPC=http://ingest:50051 tickflow load")]
pub struct LoadOptions {
    /// Ingest's gRPC URL.
    #[arg(
        long,
        env = "INGEST_GRPC",
        default_value = "http://127.0.0.1:50051",
        value_name = "URL"
    )]
    grpc: String,
    /// Events per second.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    rate: u64,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    seconds: Option<u64>,
    /// The symbols to trade, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        num_args = 1..,
        default_value = "AAPL,MSFT,NVDA,TSLA,AMZN"
    )]
    symbols: Vec<String>,
    /// The random seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// One symbol's random walk.
struct Market {
    symbol: String,
    mid_cents: i64,
    resting: Vec<String>,
}

fn next_event(market: &mut Market, rng: &mut StdRng, counter: &mut u64) -> v1::Event {
    market.mid_cents = (market.mid_cents + rng.random_range(-3..=3)).max(1000);
    let roll: u32 = rng.random_range(0..100);
    let kind = if roll < 10 {
        Kind::Tick(v1::MarketTick {
            symbol: market.symbol.clone(),
            price: market.mid_cents as f64 / 100.0,
            qty: rng.random_range(1..100) as f64,
        })
    } else if roll < 15 && !market.resting.is_empty() {
        let index = rng.random_range(0..market.resting.len());
        Kind::Cancel(v1::CancelOrder {
            symbol: market.symbol.clone(),
            client_order_id: market.resting.swap_remove(index),
        })
    } else {
        *counter += 1;
        let id = format!("load-{counter}");
        let buy = rng.random_bool(0.5);
        let market_order = roll >= 95;
        let offset = rng.random_range(-10..=10);
        if !market_order {
            market.resting.push(id.clone());
            if market.resting.len() > 200 {
                market.resting.remove(0);
            }
        }
        Kind::NewOrder(v1::NewOrder {
            symbol: market.symbol.clone(),
            side: if buy { v1::Side::Buy } else { v1::Side::Sell } as i32,
            r#type: if market_order {
                v1::OrderType::Market
            } else {
                v1::OrderType::Limit
            } as i32,
            price: if market_order {
                0.0
            } else {
                (market.mid_cents + offset) as f64 / 100.0
            },
            qty: rng.random_range(1..50) as f64,
            client_order_id: id,
        })
    };
    v1::Event { kind: Some(kind) }
}

/// Sends the demo load until Ctrl-C or `--seconds`.
pub async fn load(options: LoadOptions) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut markets: Vec<Market> = options
        .symbols
        .iter()
        .map(|s| Market {
            symbol: s.clone(),
            mid_cents: rng.random_range(5_000..50_000),
            resting: Vec::new(),
        })
        .collect();
    let mut client = loop {
        match IngestServiceClient::connect(options.grpc.clone()).await {
            Ok(client) => break client,
            Err(e) => {
                eprintln!("waiting for ingest at {}: {e}", options.grpc);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    println!(
        "tickflow load: {} events/s over {:?} to {}",
        options.rate, options.symbols, options.grpc
    );
    let started = Instant::now();
    let mut counter = 0u64;
    let mut sent = 0u64;
    // Send in 100 ms slices through unary Publish calls: one round trip per slice.
    let slice = Duration::from_millis(100);
    let per_slice = (options.rate / 10).max(1);
    let mut next = Instant::now();
    loop {
        if options
            .seconds
            .is_some_and(|s| started.elapsed() >= Duration::from_secs(s))
        {
            break;
        }
        let events: Vec<v1::Event> = (0..per_slice)
            .map(|i| {
                let market = &mut markets[(sent + i) as usize % options.symbols.len()];
                next_event(market, &mut rng, &mut counter)
            })
            .collect();
        tokio::select! {
            result = client.publish(v1::PublishRequest { events }) => match result {
                Ok(reply) => sent += u64::from(reply.into_inner().accepted),
                Err(status) => eprintln!("publish refused: {}: {}", status.code(), status.message()),
            },
            _ = tokio::signal::ctrl_c() => break,
        }
        next += slice;
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        if sent > 0 && sent % (options.rate * 10) < per_slice {
            println!(
                "sent {sent} events in {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    println!(
        "sent {sent} events in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
