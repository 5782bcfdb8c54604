//! Chaos on a Redis Cluster (3 masters, a replica each): a deterministic order flow goes in
//! through gRPC `Publish` (each request under its own idempotency key, retried until it is
//! answered) while the master serving the busiest partition dies. Its replica takes over
//! after `cluster-node-timeout`; the old master is then started again and comes back as
//! the new one's replica. The outcome is compared with an undisturbed run of the same flow
//! on one redis-server: trades and execution reports per symbol, in order, and analytics'
//! trades, volume and VWAP.
//!
//! - A master killed mid-flow, `TICKFLOW_WAIT_REPLICAS=1`: identical, nothing pending.
//! - Replication cut first (the replica frozen and its link dropped, as in a network
//!   partition), then the master killed: with `TICKFLOW_WAIT_REPLICAS=1` nothing that was
//!   written after the cut counted as done, so nothing is lost; with `0` the events ingest
//!   accepted after the cut are gone, although their requests were answered.
//!
//! A plain SIGKILL with `TICKFLOW_WAIT_REPLICAS=0` lost nothing in the runs measured
//! (README, "Guarantees"): on one machine a replica is rarely more than a millisecond
//! behind, which is why the cut is what shows the difference, deterministically.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use e2e::{Options, Pipeline, RedisKind, Role, processes::metric_sum};
use tickflow_proto::{
    topology,
    v1::{self, event::Kind},
};
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    chaos::{Progress, publish},
    replicas::{Outcome, assert_busy, assert_same, flow, outcome, reference},
    support::{WAIT, assert_close},
};

/// Events per second the flow is sent at: the plain kill lands while it runs.
const RATE: u64 = 400;
/// Events per second of the flow around a cut: a third of it goes in well within
/// [`FROZEN`].
const CUT_RATE: u64 = 1_000;
/// Writes replicas did not confirm in time, per `operation` (`append`, `commit`).
const UNCONFIRMED: &str = "tickflow_replica_wait_unconfirmed_total";
/// How long the replica stays frozen after the cut: long enough for the master to take
/// writes and be killed before the replica wakes.
const FROZEN: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_wait_replicas_1_a_master_killed_mid_flow_loses_and_doubles_nothing() {
    let events = flow(18, 1_200);
    let expected = reference(&events).await;
    assert_busy(&expected);
    let mut p = cluster_pipeline("failover", 1, false).await;
    let busiest = busiest_stream(&p, &events);

    let mut publisher = Publisher::start(&p, events.clone(), RATE);
    p.wait_until(WAIT, "a third of the flow accepted", async || {
        publisher.accepted() >= events.len() / 3
    })
    .await;
    let cluster = p.backend_mut().cluster_mut();
    let killed = cluster.kill_master_serving(&busiest);
    let at = publisher.accepted();
    eprintln!("failover: killed {killed}, the master of {busiest}, at {at} events accepted");
    assert!(at < events.len(), "the flow was over before the kill");
    tokio::task::block_in_place(|| cluster.wait_until_stable());
    let promoted = cluster.node_for_key(&busiest);
    assert_ne!(promoted, killed);
    // The promoted replica has no replica of its own: until the old master is back as
    // one, nothing written to that partition is confirmed (appends are refused, commits
    // retried).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cluster = p.backend_mut().cluster_mut();
    tokio::task::block_in_place(|| {
        cluster.restart_node(killed);
        cluster.wait_until_stable();
    });
    assert_eq!(cluster.node_for_key(&busiest), promoted);

    let (ids, retries) = publisher.finish().await;
    eprintln!("failover: {retries} requests retried");
    assert_eq!(ids.len(), events.len(), "every event accepted once");
    p.wait_settled(Duration::from_secs(60)).await;
    assert_same(&outcome(&p).await, &expected);
    assert_stats(&p, &expected).await;
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_wait_replicas_1_a_failover_after_replication_was_cut_loses_nothing() {
    let events = flow(19, 900);
    let expected = reference(&events).await;
    assert_busy(&expected);
    // Leases outlive the failover: the stages keep their partitions, and learn only from
    // their commits (entries no longer pending, or older ones pending again) that the
    // promoted replica lacks what they handled after the cut, and reload.
    let mut p = cluster_pipeline("cut-wait-1", 1, true).await;
    let cut = cut_and_fail_over(&mut p, &events, 1).await;
    // Nothing sent after the cut was confirmed before the failover: the client was
    // refused and sent it again.
    assert!(cut.retries > 0, "no request was refused after the cut");
    // (The recorder is the process's: other pipelines may have counted too.)
    let metrics = p.metrics(Role::Ingest, 0).await;
    assert!(
        metric_sum(&metrics, UNCONFIRMED, &[("operation", "append")]) > 0.0,
        "{metrics}"
    );
    assert!(
        cut.missing.is_empty(),
        "accepted, then lost: {:?}",
        cut.missing
    );
    assert_same(&cut.outcome, &expected);
    assert_stats(&p, &expected).await;
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_wait_replicas_0_a_failover_after_replication_was_cut_loses_accepted_events() {
    let events = flow(19, 900);
    let expected = reference(&events).await;
    let mut p = cluster_pipeline("cut-wait-0", 0, true).await;
    let cut = cut_and_fail_over(&mut p, &events, 0).await;
    eprintln!(
        "cut, WAIT 0: {} accepted events lost; trades differ from the reference: {}",
        cut.missing.len(),
        cut.outcome.trades != expected.trades
    );
    assert!(
        !cut.missing.is_empty(),
        "every event accepted after the cut survived the failover"
    );
    assert_ne!(cut.outcome, expected);
    p.shutdown().await;
}

/// A pipeline on a Redis Cluster whose commits and appends wait for `wait_replicas`, with
/// the harness's short leases (600 ms) or, with `long_leases`, leases that outlive a
/// failover.
async fn cluster_pipeline(name: &str, wait_replicas: u32, long_leases: bool) -> Pipeline {
    let mut env = vec![
        ("TICKFLOW_WAIT_REPLICAS".into(), wait_replicas.to_string()),
        ("TICKFLOW_WAIT_TIMEOUT_MS".into(), "500".into()),
    ];
    if long_leases {
        env.push(("TICKFLOW_LEASE_TTL_MS".into(), "30000".into()));
    }
    Pipeline::start_with(Options {
        backend: RedisKind::OwnCluster,
        name: name.into(),
        env,
        ..Options::default()
    })
    .await
}

/// What a failover after a replication cut left.
struct AfterCut {
    outcome: Outcome,
    /// Requests the client sent again after an error.
    retries: usize,
    /// Ids ingest answered with for the busiest partition that its inbound stream lacks.
    missing: Vec<String>,
}

/// Sends `events`; once a third is in, cuts replication from the master of the busiest
/// partition ([`FROZEN`]) and kills that master when the next third is in (`WAIT 0`:
/// accepted) or, with `WAIT 1`, when the first request after the cut is appended on the
/// master and refused (not confirmed); then waits for the failover, starts the old
/// master again as a replica, lets the flow finish and the pipeline settle.
async fn cut_and_fail_over(p: &mut Pipeline, events: &[v1::Event], wait_replicas: u32) -> AfterCut {
    let busiest = busiest_stream(p, events);
    let third = events.len() / 3;
    let mut publisher = Publisher::start(p, events.to_vec(), CUT_RATE);
    p.wait_until(WAIT, "a third of the flow accepted", async || {
        publisher.accepted() >= third
    })
    .await;
    let (master, replica) = p
        .backend_mut()
        .cluster_mut()
        .cut_replication(&busiest, FROZEN);
    if wait_replicas == 0 {
        p.wait_until(WAIT, "two thirds of the flow accepted", async || {
            publisher.accepted() >= 2 * third
        })
        .await;
    } else {
        // A request refused as not confirmed: its events are on the master only.
        let before = publisher.retries();
        p.wait_until(WAIT, "a request refused after the cut", async || {
            publisher.retries() > before
        })
        .await;
    }
    let cluster = p.backend_mut().cluster_mut();
    cluster.kill_node(master);
    eprintln!(
        "cut: {master} killed with its replica {replica} frozen, {} events accepted",
        publisher.accepted()
    );
    tokio::task::block_in_place(|| cluster.wait_until_stable());
    assert_eq!(cluster.node_for_key(&busiest), replica);
    tokio::task::block_in_place(|| {
        cluster.restart_node(master);
        cluster.wait_until_stable();
    });

    let (ids, retries) = publisher.finish().await;
    assert_eq!(ids.len(), events.len(), "every event accepted once");
    p.wait_settled(Duration::from_secs(60)).await;
    let stored: BTreeSet<String> = p.xrange(&busiest).await.into_iter().map(|e| e.0).collect();
    let missing = events
        .iter()
        .zip(&ids)
        .filter(|(event, _)| inbound_stream(p, event) == busiest)
        .map(|(_, id)| id)
        .filter(|id| !stored.contains(*id))
        .cloned()
        .collect();
    AfterCut {
        outcome: outcome(p).await,
        retries,
        missing,
    }
}

/// The flow's sender: [`publish`] in a task, and how far it got.
struct Publisher {
    progress: Arc<Progress>,
    task: JoinHandle<(Vec<String>, usize)>,
    // Kept so that the sender's address never "changes" (ingest is never restarted here).
    _ingest: watch::Sender<std::net::SocketAddr>,
}

impl Publisher {
    fn start(p: &Pipeline, events: Vec<v1::Event>, rate: u64) -> Self {
        let ingest = p
            .service(Role::Ingest, 0)
            .grpc_addr()
            .expect("ingest has a gRPC address");
        let (sender, receiver) = watch::channel(ingest);
        let progress = Arc::new(Progress::default());
        let task = tokio::spawn(publish(events, rate, receiver, progress.clone()));
        Self {
            progress,
            task,
            _ingest: sender,
        }
    }

    /// Events accepted so far (whole requests).
    fn accepted(&self) -> usize {
        self.progress.accepted.load(Ordering::Relaxed)
    }

    /// Requests sent again so far, after an error.
    fn retries(&self) -> usize {
        self.progress.retries.load(Ordering::Relaxed)
    }

    /// Every id ingest answered, in order, and how many requests were sent again.
    async fn finish(&mut self) -> (Vec<String>, usize) {
        (&mut self.task).await.expect("the publisher")
    }
}

/// The symbol an event is for.
fn symbol_of(event: &v1::Event) -> &str {
    match &event.kind {
        Some(Kind::NewOrder(order)) => &order.symbol,
        Some(Kind::Cancel(cancel)) => &cancel.symbol,
        Some(Kind::Tick(tick)) => &tick.symbol,
        None => "",
    }
}

/// The inbound stream (partition) an event goes to.
fn inbound_stream(p: &Pipeline, event: &v1::Event) -> String {
    let partition = p.keys().partition_for(symbol_of(event).as_bytes());
    p.keys().stream(topology::INBOUND, partition)
}

/// The inbound stream of the partition with the most events. Every stream of a partition
/// shares its slot, so the partition's whole path through the pipeline is on one master.
fn busiest_stream(p: &Pipeline, events: &[v1::Event]) -> String {
    let mut per_stream: BTreeMap<String, usize> = BTreeMap::new();
    for event in events {
        *per_stream.entry(inbound_stream(p, event)).or_default() += 1;
    }
    per_stream
        .into_iter()
        .max_by_key(|(_, count)| *count)
        .map(|(stream, _)| stream)
        .expect("events")
}

/// Analytics' trades, volume and VWAP of every symbol are those of `expected`'s trades.
async fn assert_stats(p: &Pipeline, expected: &Outcome) {
    for (symbol, trades) in &expected.trades {
        let stats = p.stats(symbol).await;
        let volume: u64 = trades.iter().map(|t| t.2).sum();
        let notional: f64 = trades.iter().map(|t| t.1 as f64 / 1e6 * t.2 as f64).sum();
        assert_eq!(stats["trades"], trades.len(), "{symbol}: {stats}");
        assert_eq!(stats["volume"], volume, "{symbol}: {stats}");
        assert_close(&stats["vwap"], notional / volume as f64, symbol);
    }
}
