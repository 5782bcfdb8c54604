//! End-to-end tests of tickflow: the four services in one process (or, where something
//! process-global is tested, as four processes), against a real redis-server per pipeline
//! or, for every test whose behaviour could differ there, a real Redis Cluster too
//! ([`on_both_backends!`]; see the `e2e` harness). One test binary; one module per area.

/// Runs each named test on both backends: `<name>::on_one_server`, on a redis-server of its
/// own, and `<name>::on_a_redis_cluster`, on the test binary's shared Redis Cluster
/// (3 masters, 3 replicas; each pipeline in a namespace of its own). The test is an
/// `async fn <name>(backend: RedisKind)` that starts its pipeline on `backend`. Tests that
/// fail a cluster over start one of their own instead (`RedisKind::OwnCluster`).
macro_rules! on_both_backends {
    ($($test:ident),+ $(,)?) => {$(
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn on_one_server() {
                super::$test(e2e::RedisKind::Server).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn on_a_redis_cluster() {
                super::$test(e2e::RedisKind::SharedCluster).await;
            }
        }
    )+};
}

mod backpressure;
mod bad_input_sweep;
mod bad_inputs;
mod bars;
mod chaos;
mod chaos_cluster;
mod idempotency;
mod large_inputs;
mod limits;
mod process_metrics;
mod replicas;
mod scripted;
mod support;
mod symbols;
mod traces;
