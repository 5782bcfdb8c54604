//! Test support: real, throw-away `redis-server` processes and key namespaces.
//!
//! The tickflow test suites run against a real Redis, never a mock: consumer
//! groups, `XAUTOCLAIM`, Lua scripts and AOF recovery are exactly the things a
//! mock would get wrong. [`RedisServer`] starts a private `redis-server` child
//! process on a free `127.0.0.1` port, in its own temporary directory, and
//! kills it when dropped. It can also be crashed ([`RedisServer::kill`]) and
//! brought back ([`RedisServer::restart`]) on the same port and directory, so
//! that with [`RedisOptions::aof`] enabled the data written before the crash is
//! reloaded, which is how the recovery paths are tested.
//!
//! [`unique_namespace`] gives every test its own key prefix, so tests sharing a
//! server never see each other's streams.
//!
//! `redis-server` must be on `PATH` (`apt-get install redis-server`); when it
//! is missing, [`RedisServer::start`] panics instead of skipping the test.
//!
//! The module is compiled for this crate's own tests and, for other crates,
//! behind the `test-util` feature.
//!
//! All functions here block (they poll with `std::thread::sleep`), so they can
//! be called from both sync and async tests; in an async test the short block
//! while the server starts is harmless.
//!
//! ```no_run
//! use streams_core::testing::{RedisOptions, RedisServer, unique_namespace};
//!
//! let mut redis = RedisServer::start_with(RedisOptions { aof: true });
//! let ns = unique_namespace("recovery");
//! // ... connect to `redis.url()`, write under `ns` ...
//! redis.kill();
//! redis.restart(); // same port, same data
//! ```

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Name of the server binary looked up on `PATH`.
const REDIS_BIN: &str = "redis-server";
/// How long a (re)started server gets to answer `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`RedisServer::restart`] keeps retrying to bind the old port.
const REBIND_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval while waiting for the server.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How many fresh ports [`RedisServer::start_with`] tries.
const START_ATTEMPTS: usize = 5;
/// Name of the log file inside the server's directory.
const LOG_FILE: &str = "redis.log";
/// Where the server's own stdout/stderr go (early start-up errors).
const STDIO_FILE: &str = "redis.stdio";

/// How long a test's own connection ([`connect`]) waits for one reply. redis-rs'
/// default (500 ms) is not always enough on a loaded 2-core machine while a pipeline
/// under test keeps Redis busy, and a harness that times out reports a failure the
/// code under test did not cause.
pub const TEST_RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Options for [`RedisServer::start_with`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RedisOptions {
    /// Enable the append-only file with `appendfsync always`, so every
    /// acknowledged write survives a [`RedisServer::kill`].
    pub aof: bool,
}

/// A private `redis-server` child process, killed on drop.
///
/// See the [module documentation](self) for what it is for.
#[derive(Debug)]
pub struct RedisServer {
    /// `None` once killed. Behind a mutex only so that [`Self::is_running`]
    /// can take `&self` (checking a child's status needs `&mut Child`).
    child: Mutex<Option<Child>>,
    port: u16,
    options: RedisOptions,
    dir: TempDir,
}

/// Why one attempt to bring a server up failed.
#[derive(Debug)]
enum StartFailure {
    /// The process exited before answering (typically: port already in use).
    Exited(ExitStatus),
    /// The process is alive but did not answer in time.
    Timeout,
}

impl RedisServer {
    /// Starts a server without persistence (no AOF, no RDB snapshots).
    ///
    /// # Panics
    ///
    /// If `redis-server` is not on `PATH`, or the server does not come up.
    pub fn start() -> Self {
        Self::start_with(RedisOptions::default())
    }

    /// Starts a server with the given options on a fresh free port, and waits
    /// until it answers `PING`.
    ///
    /// # Panics
    ///
    /// If `redis-server` is not on `PATH`, or the server does not come up
    /// (the panic message carries the tail of its log).
    pub fn start_with(options: RedisOptions) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tickflow-redis-")
            .tempdir()
            .expect("create a temporary directory for redis-server");
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let mut child = spawn(dir.path(), port, options, &[]);
            match wait_ready(&mut child, port) {
                Ok(()) => {
                    return Self {
                        child: Mutex::new(Some(child)),
                        port,
                        options,
                        dir,
                    };
                }
                // Most likely someone grabbed the port between our probe and
                // redis' bind: try another one.
                Err(StartFailure::Exited(status)) => {
                    failures.push(format!("port {port}: exited with {status}"));
                }
                Err(StartFailure::Timeout) => {
                    reap(&mut child);
                    panic!(
                        "redis-server on port {port} did not answer PING within {READY_TIMEOUT:?}\n{}",
                        log_tail(dir.path())
                    );
                }
            }
        }
        panic!(
            "redis-server failed to start after {START_ATTEMPTS} attempts ({})\n{}",
            failures.join("; "),
            log_tail(dir.path())
        );
    }

    /// The connection URL, `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The TCP port the server listens on (stable across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The options the server was started with.
    pub fn options(&self) -> RedisOptions {
        self.options
    }

    /// The server's working directory (`--dir`), holding its AOF/RDB files
    /// and its log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(LOG_FILE)
    }

    /// Whether the child process is still alive (not killed, not exited).
    pub fn is_running(&self) -> bool {
        let mut child = self.lock_child();
        match child.as_mut() {
            None => false,
            Some(c) => matches!(c.try_wait(), Ok(None)),
        }
    }

    /// Kills the server with `SIGKILL` (a crash: no shutdown save) and waits
    /// for it to exit. Does nothing if it is already killed.
    pub fn kill(&mut self) {
        let child = self
            .child
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(mut c) = child.take() {
            reap(&mut c);
        }
    }

    /// Starts the server again on the same port and in the same directory, so
    /// that with AOF enabled the data is reloaded; waits until it answers
    /// `PING` (which Redis refuses while still loading). A running server is
    /// killed first, so this also works as "crash and recover".
    ///
    /// Binding the old port is retried for up to 10 s.
    ///
    /// # Panics
    ///
    /// If the server cannot be brought back (the message carries its log tail).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + REBIND_TIMEOUT;
        loop {
            let mut child = spawn(self.dir.path(), self.port, self.options, &[]);
            match wait_ready(&mut child, self.port) {
                Ok(()) => {
                    *self
                        .child
                        .get_mut()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(child);
                    return;
                }
                Err(StartFailure::Exited(status)) => {
                    if Instant::now() >= deadline {
                        panic!(
                            "redis-server could not be restarted on port {} within {REBIND_TIMEOUT:?} \
                             (last attempt exited with {status})\n{}",
                            self.port,
                            log_tail(self.dir.path())
                        );
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(StartFailure::Timeout) => {
                    reap(&mut child);
                    panic!(
                        "restarted redis-server on port {} did not answer PING within {READY_TIMEOUT:?}\n{}",
                        self.port,
                        log_tail(self.dir.path())
                    );
                }
            }
        }
    }

    /// Kills the server, deletes its persisted data (the `appendonlydir`
    /// directory, `*.aof` and `*.rdb` files) and starts it again on the same
    /// port: a server that lost everything.
    ///
    /// # Panics
    ///
    /// If the files cannot be deleted or the server cannot be brought back.
    pub fn restart_empty(&mut self) {
        self.kill();
        let dir = self.dir.path();
        let entries =
            fs::read_dir(dir).unwrap_or_else(|e| panic!("read redis dir {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.expect("read redis dir entry").path();
            let is_data = path.file_name().is_some_and(|n| n == "appendonlydir")
                || path
                    .extension()
                    .is_some_and(|ext| ext == "rdb" || ext == "aof");
            if !is_data {
                continue;
            }
            let removed = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.unwrap_or_else(|e| panic!("delete {}: {e}", path.display()));
        }
        self.restart();
    }

    /// A connection for test code: see [`connect`].
    ///
    /// # Panics
    ///
    /// If the server does not accept it.
    pub async fn connect(&self) -> redis::aio::MultiplexedConnection {
        connect(&self.url())
            .await
            .unwrap_or_else(|e| panic!("connect to the test redis-server at {}: {e}", self.url()))
    }

    fn lock_child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster node's bus port is its client port plus this (Redis's fixed offset).
const CLUSTER_BUS_OFFSET: u16 = 10_000;
/// Masters of a [`RedisCluster`]; each has one replica.
pub const CLUSTER_MASTERS: usize = 3;
/// `cluster-node-timeout` of a [`RedisCluster`]: a master unreachable this long is failed
/// over (its replica is promoted about a second later).
pub const CLUSTER_NODE_TIMEOUT: Duration = Duration::from_millis(2_000);
/// How long a cluster gets to form, fail over or take a node back.
const CLUSTER_STABLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Redis Cluster's slot count.
const CLUSTER_SLOT_COUNT: usize = 16_384;
/// The cluster tool looked up on `PATH` (Debian's `redis-tools`, installed with
/// `redis-server`).
const REDIS_CLI_BIN: &str = "redis-cli";

/// A private Redis Cluster of [`CLUSTER_MASTERS`] masters with one replica each: real
/// `redis-server --cluster-enabled yes` processes on free `127.0.0.1` ports below 55 536
/// (each node's bus port, its port + 10 000, is free too), each in its own directory with
/// an append-only file, joined by `redis-cli --cluster create`. All of them are killed when
/// it is dropped.
///
/// [`Self::start`] returns once every node reports `cluster_state:ok` with all 16 384
/// slots served, sees the same live nodes, and every replica's link to its master is up
/// (about 2-3 s). [`Self::kill_master_serving`] crashes the master of a key's slot; its
/// replica takes over after [`CLUSTER_NODE_TIMEOUT`] and a second or so, which
/// [`Self::wait_until_stable`] waits for.
///
/// `redis-server` and `redis-cli` must be on `PATH` (`apt-get install redis-server`
/// brings both); when one is missing, [`Self::start`] panics instead of skipping the test.
///
/// ```no_run
/// use streams_core::testing::RedisCluster;
///
/// let mut cluster = RedisCluster::start();
/// // ... `TICKFLOW_REDIS_MODE=cluster`, `REDIS_URL=cluster.seeds()` ...
/// let old_master = cluster.kill_master_serving("{3}:s:inbound");
/// cluster.wait_until_stable();
/// assert_ne!(cluster.node_for_key("{3}:s:inbound"), old_master);
/// ```
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<ClusterNode>,
    dir: TempDir,
}

/// One node of a [`RedisCluster`].
#[derive(Debug)]
struct ClusterNode {
    port: u16,
    dir: PathBuf,
    /// `None` once killed.
    child: Option<Child>,
}

/// The arguments that make a `redis-server` a cluster node (its `nodes.conf` lands in its
/// `--dir`). A master waits `repl-diskless-sync-delay` (5 s by default) for more replicas
/// before it sends the first one its data; with one replica each that is 5 s of waiting in
/// every cluster start, so it is 0.
const CLUSTER_NODE_ARGS: &[&str] = &[
    "--cluster-enabled",
    "yes",
    "--cluster-config-file",
    "nodes.conf",
    "--cluster-node-timeout",
    "2000",
    "--appendonly",
    "yes",
    "--repl-diskless-sync-delay",
    "0",
    // DEBUG SLEEP freezes a replica in RedisCluster::cut_replication; loopback only.
    "--enable-debug-command",
    "local",
];

impl RedisCluster {
    /// Starts the nodes, creates the cluster and waits until it is stable (see the type's
    /// docs).
    ///
    /// # Panics
    ///
    /// If `redis-server` or `redis-cli` is missing, or the cluster does not form within
    /// 30 s (the message carries each node's view and log tail).
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tickflow-cluster-")
            .tempdir()
            .expect("create a temporary directory for the cluster");
        // Built first, so that a panic below still kills the nodes started so far.
        let mut cluster = Self {
            nodes: Vec::new(),
            dir,
        };
        for _ in 0..CLUSTER_MASTERS * 2 {
            let node = cluster.start_node();
            cluster.nodes.push(node);
        }
        cluster.create();
        cluster.wait_until_stable();
        cluster
    }

    /// The process's shared cluster, started on first use and kept until the process
    /// exits: for tests that need a cluster but neither kill nor restart its nodes, each in
    /// a namespace of its own ([`unique_namespace`]), so that a test binary starts one
    /// cluster rather than one per test. Its methods that take `&mut self` (killing,
    /// restarting) are out of reach: a test that fails a node over starts its own.
    ///
    /// A static is never dropped, so its nodes would outlive the process: a watchdog
    /// (`sh`, reading a pipe whose only writer is this process) kills them and removes
    /// their directory when the process exits, however it exits.
    ///
    /// # Panics
    ///
    /// As [`Self::start`], or if `sh` cannot be run.
    pub fn shared() -> &'static Self {
        static SHARED: std::sync::OnceLock<(RedisCluster, Mutex<Child>)> =
            std::sync::OnceLock::new();
        let (cluster, _watchdog) = SHARED.get_or_init(|| {
            let cluster = Self::start();
            let pids: Vec<String> = cluster
                .nodes
                .iter()
                .filter_map(|node| node.child.as_ref())
                .map(|child| child.id().to_string())
                .collect();
            // `cat` returns when the pipe's write end closes: when this process is gone
            // (the pipe is close-on-exec, so no other child holds it open).
            let watchdog = Command::new("sh")
                .arg("-c")
                .arg(
                    r#"cat > /dev/null; kill -9 "$@" 2> /dev/null; sleep 1; rm -rf "$CLUSTER_DIR""#,
                )
                .arg("tickflow-cluster-watchdog")
                .args(&pids)
                .env("CLUSTER_DIR", cluster.dir.path())
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("start the shared cluster's watchdog (sh): {e}"));
            (cluster, Mutex::new(watchdog))
        });
        cluster
    }

    /// `REDIS_URL` for cluster mode: every node's URL, comma-separated.
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|node| format!("redis://127.0.0.1:{}", node.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every node's port, whether running or not.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|node| node.port).collect()
    }

    /// The port of the master serving `key`'s slot (hash tags honoured), as a running node
    /// sees it now.
    ///
    /// # Panics
    ///
    /// If no running node answers, or none knows a live master for the slot (during a
    /// failover: call [`Self::wait_until_stable`] first).
    pub fn node_for_key(&self, key: &str) -> u16 {
        let port = self.running_ports()[0];
        let slot: usize = blocking_connection(port)
            .and_then(|mut c| {
                redis::cmd("CLUSTER")
                    .arg("KEYSLOT")
                    .arg(key)
                    .query(&mut c)
                    .map_err(io::Error::other)
            })
            .unwrap_or_else(|e| panic!("CLUSTER KEYSLOT on port {port}: {e}"));
        let view = parse_cluster_nodes(&text_command(port, "CLUSTER NODES"));
        view.iter()
            .find(|node| node.is_live() && node.is_master() && node.serves(slot))
            .map(|node| node.port)
            .unwrap_or_else(|| panic!("no live master serves slot {slot} of {key:?}:\n{view:#?}"))
    }

    /// Crashes (`SIGKILL`) the master serving `key`'s slot and returns its port. Its replica
    /// is promoted after [`CLUSTER_NODE_TIMEOUT`] and a second or so; until then that
    /// slot's commands fail (`CLUSTERDOWN` once the cluster noticed). Writes the replica had
    /// not received are lost, as in production.
    pub fn kill_master_serving(&mut self, key: &str) -> u16 {
        let port = self.node_for_key(key);
        self.node_mut(port).kill();
        port
    }

    /// Cuts replication from the master serving `key`'s slot to its replica, as a network
    /// partition between the two would: the replica is frozen for `frozen` (`DEBUG SLEEP`),
    /// then the master drops its link to it (`CLIENT KILL TYPE replica`). Whatever the
    /// master takes from then on never reaches that replica, unless the master still runs
    /// when the replica wakes (it then reconnects and catches up). Kill the master within
    /// `frozen`, and the replica promoted once it wakes lacks every write made after the
    /// cut, as after a partition in production. Returns the master's port and the
    /// replica's.
    ///
    /// # Panics
    ///
    /// If the master has no replica attached, or the replica does not freeze.
    pub fn cut_replication(&self, key: &str, frozen: Duration) -> (u16, u16) {
        let master = self.node_for_key(key);
        let replication = text_command(master, "INFO replication");
        let replica: u16 = replication
            .lines()
            .find_map(|line| line.strip_prefix("slave0:"))
            .and_then(|fields| {
                fields
                    .split(',')
                    .find_map(|field| field.strip_prefix("port="))
            })
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("master {master} has no replica:\n{replication}"));
        let mut sleeper = blocking_connection(replica)
            .unwrap_or_else(|e| panic!("connect to replica {replica}: {e}"));
        let seconds = format!("{:.3}", frozen.as_secs_f64());
        // The reply comes when the replica wakes; nobody waits for it.
        std::thread::spawn(move || {
            let _: redis::RedisResult<redis::Value> = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg(seconds)
                .query(&mut sleeper);
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while answers_within(replica, Duration::from_millis(100)) {
            assert!(
                Instant::now() < deadline,
                "replica {replica} did not freeze (DEBUG SLEEP)"
            );
        }
        let killed: i64 = blocking_connection(master)
            .and_then(|mut c| {
                redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("TYPE")
                    .arg("replica")
                    .query(&mut c)
                    .map_err(io::Error::other)
            })
            .unwrap_or_else(|e| panic!("CLIENT KILL TYPE replica on {master}: {e}"));
        assert_eq!(killed, 1, "master {master} dropped {killed} replica links");
        (master, replica)
    }

    /// Crashes (`SIGKILL`) the node on `port`, whatever it is now.
    ///
    /// # Panics
    ///
    /// If `port` is not a node's.
    pub fn kill_node(&mut self, port: u16) {
        self.node_mut(port).kill();
    }

    /// Starts the node on `port` again (killing it first if it runs), with its data and its
    /// `nodes.conf`: it rejoins the cluster, as a replica if it was failed over meanwhile.
    /// Follow with [`Self::wait_until_stable`].
    ///
    /// # Panics
    ///
    /// If `port` is not a node's, or the node does not come back within 10 s.
    pub fn restart_node(&mut self, port: u16) {
        let node = self.node_mut(port);
        node.kill();
        let deadline = Instant::now() + REBIND_TIMEOUT;
        loop {
            let mut child = spawn(&node.dir, port, RedisOptions::default(), CLUSTER_NODE_ARGS);
            match wait_ready(&mut child, port) {
                Ok(()) => {
                    node.child = Some(child);
                    return;
                }
                Err(StartFailure::Exited(status)) if Instant::now() < deadline => {
                    let _ = status;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(failure) => {
                    reap(&mut child);
                    panic!(
                        "cluster node {port} did not come back ({failure:?})\n{}",
                        log_tail(&node.dir)
                    );
                }
            }
        }
    }

    /// Whether the node on `port` runs.
    pub fn is_running(&self, port: u16) -> bool {
        self.nodes
            .iter()
            .any(|node| node.port == port && node.child.is_some())
    }

    /// Waits until the cluster is whole again with the nodes that run: every running node
    /// reports `cluster_state:ok` with all 16 384 slots served and sees exactly the running
    /// nodes as live, [`CLUSTER_MASTERS`] of them masters that serve every slot, the others
    /// replicas whose link to their master is up. After [`Self::kill_master_serving`] that
    /// is the failover done (its replica promoted); after [`Self::restart_node`], the node
    /// back as a replica.
    ///
    /// # Panics
    ///
    /// After 30 s, with what the last check found and each running node's view.
    pub fn wait_until_stable(&self) {
        let deadline = Instant::now() + CLUSTER_STABLE_TIMEOUT;
        loop {
            let problem = match self.instability() {
                None => return,
                Some(problem) => problem,
            };
            if Instant::now() >= deadline {
                let mut report = String::new();
                for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                    report.push_str(&format!(
                        "--- CLUSTER NODES on {} ---\n{}\n{}",
                        node.port,
                        text_command(node.port, "CLUSTER NODES"),
                        log_tail(&node.dir)
                    ));
                }
                panic!(
                    "the cluster was not stable within {CLUSTER_STABLE_TIMEOUT:?}: {problem}\n{report}"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What keeps the cluster from being stable, or `None` (see [`Self::wait_until_stable`]).
    fn instability(&self) -> Option<String> {
        self.running_ports()
            .into_iter()
            .find_map(|port| self.node_instability(port).err())
    }

    /// Why the node on `port` does not see a stable cluster yet.
    fn node_instability(&self, port: u16) -> Result<(), String> {
        let running: BTreeSet<u16> = self.running_ports().into_iter().collect();
        let ask = |command: &str| {
            try_text_command(port, command).map_err(|e| format!("node {port}: {command}: {e}"))
        };
        let info = ask("CLUSTER INFO")?;
        if !info.contains("cluster_state:ok")
            || !info.contains(&format!("cluster_slots_ok:{CLUSTER_SLOT_COUNT}"))
        {
            return Err(format!("node {port}: not ok or not every slot served"));
        }
        let view = parse_cluster_nodes(&ask("CLUSTER NODES")?);
        let live: BTreeSet<u16> = view
            .iter()
            .filter(|n| n.is_live())
            .map(|n| n.port)
            .collect();
        if live != running {
            return Err(format!("node {port} sees {live:?} live, {running:?} run"));
        }
        let masters: Vec<&ViewedNode> = view
            .iter()
            .filter(|n| n.is_live() && n.is_master())
            .collect();
        let served: usize = masters.iter().map(|n| n.slot_count()).sum();
        if masters.len() != CLUSTER_MASTERS || served != CLUSTER_SLOT_COUNT {
            return Err(format!(
                "node {port} sees {} masters serving {served} slots",
                masters.len()
            ));
        }
        let is_master = view
            .iter()
            .find(|n| n.flags.iter().any(|f| f == "myself"))
            .ok_or_else(|| format!("node {port} does not list itself"))?
            .is_master();
        if !is_master && !ask("INFO replication")?.contains("master_link_status:up") {
            return Err(format!("replica {port}: link to its master not up"));
        }
        Ok(())
    }

    fn running_ports(&self) -> Vec<u16> {
        let ports: Vec<u16> = self
            .nodes
            .iter()
            .filter(|node| node.child.is_some())
            .map(|node| node.port)
            .collect();
        assert!(!ports.is_empty(), "no node of the cluster runs");
        ports
    }

    fn node_mut(&mut self, port: u16) -> &mut ClusterNode {
        self.nodes
            .iter_mut()
            .find(|node| node.port == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    /// Starts one node on a fresh port pair in its own directory.
    fn start_node(&self) -> ClusterNode {
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_cluster_port();
            let dir = self.dir.path().join(format!("node-{port}"));
            fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
            let mut child = spawn(&dir, port, RedisOptions::default(), CLUSTER_NODE_ARGS);
            match wait_ready(&mut child, port) {
                Ok(()) => {
                    return ClusterNode {
                        port,
                        dir,
                        child: Some(child),
                    };
                }
                Err(StartFailure::Exited(status)) => {
                    failures.push(format!("port {port}: exited with {status}"));
                }
                Err(StartFailure::Timeout) => {
                    reap(&mut child);
                    panic!(
                        "cluster node on port {port} did not answer PING within {READY_TIMEOUT:?}\n{}",
                        log_tail(&dir)
                    );
                }
            }
        }
        panic!(
            "no cluster node started after {START_ATTEMPTS} attempts ({})",
            failures.join("; ")
        );
    }

    /// `redis-cli --cluster create` over every node, one replica per master.
    fn create(&self) {
        let mut cmd = Command::new(REDIS_CLI_BIN);
        cmd.args(["--cluster", "create"]);
        for node in &self.nodes {
            cmd.arg(format!("127.0.0.1:{}", node.port));
        }
        cmd.args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null());
        let output = match cmd.output() {
            Ok(output) => output,
            Err(e) if e.kind() == io::ErrorKind::NotFound => panic!(
                "`{REDIS_CLI_BIN}` was not found on PATH. The cluster tests need it: install \
                 it (e.g. `sudo apt-get install redis-server`, which brings redis-tools)."
            ),
            Err(e) => panic!("failed to run `{REDIS_CLI_BIN}`: {e}"),
        };
        if !output.status.success() {
            panic!(
                "`redis-cli --cluster create` failed ({}):\n{}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }
}

impl ClusterNode {
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            reap(&mut child);
        }
    }
}

/// One line of `CLUSTER NODES`: `<id> <ip:port@bus[,host]> <flags> <master> <ping-sent>
/// <pong-recv> <epoch> <link> <slot or range>…`.
#[derive(Debug)]
struct ViewedNode {
    port: u16,
    flags: Vec<String>,
    /// Inclusive slot ranges served (importing/migrating markers `[…]` left out).
    slots: Vec<(usize, usize)>,
}

impl ViewedNode {
    fn is_master(&self) -> bool {
        self.flags.iter().any(|f| f == "master")
    }

    /// Neither failed, suspected, still joining nor without an address.
    fn is_live(&self) -> bool {
        !self
            .flags
            .iter()
            .any(|f| matches!(f.as_str(), "fail" | "fail?" | "handshake" | "noaddr"))
    }

    fn serves(&self, slot: usize) -> bool {
        self.slots
            .iter()
            .any(|(low, high)| (*low..=*high).contains(&slot))
    }

    fn slot_count(&self) -> usize {
        self.slots.iter().map(|(low, high)| high - low + 1).sum()
    }
}

fn parse_cluster_nodes(text: &str) -> Vec<ViewedNode> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let address = fields.get(1)?.split(['@', ',']).next()?;
            let port = address.rsplit(':').next()?.parse().ok()?;
            let slots = fields
                .get(8..)
                .unwrap_or_default()
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((low, high)) => Some((low.parse().ok()?, high.parse().ok()?)),
                    None => s.parse().ok().map(|slot| (slot, slot)),
                })
                .collect();
            Some(ViewedNode {
                port,
                flags: fields.get(2)?.split(',').map(str::to_owned).collect(),
                slots,
            })
        })
        .collect()
}

/// The text an inline command (`CLUSTER NODES`, `INFO replication`) answers on `port`.
fn try_text_command(port: u16, command: &str) -> io::Result<String> {
    let mut conn = blocking_connection(port)?;
    let mut cmd = redis::Cmd::new();
    for word in command.split_whitespace() {
        cmd.arg(word);
    }
    cmd.query::<String>(&mut conn).map_err(io::Error::other)
}

/// [`try_text_command`], or the error as text (for panic messages and views that must be
/// there).
fn text_command(port: u16, command: &str) -> String {
    try_text_command(port, command).unwrap_or_else(|e| format!("({command} on {port}: {e})"))
}

/// A multiplexed connection to `url` for test and benchmark code (asserting, seeding,
/// counting), whose replies may take up to [`TEST_RESPONSE_TIMEOUT`].
pub async fn connect(url: &str) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(TEST_RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(Duration::from_secs(5)));
    crate::connection::client(url)?
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// Returns a key prefix no other test (in this or another process) uses:
/// `t-<prefix>-<pid>-<counter>-<random>`.
pub fn unique_namespace(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let random: u32 = rand::random();
    format!("t-{prefix}-{}-{n}-{random:08x}", std::process::id())
}

/// A `127.0.0.1` port for a server a test (or the benchmark) is about to start, the
/// redis harness's own and a child process's `HTTP_ADDR`/`GRPC_ADDR` alike.
///
/// The usual trick, binding port 0 and releasing what the kernel picked, has a race that
/// CI once hit ("engine: cannot listen on HTTP_ADDR=127.0.0.1:43193: Address already in
/// use"): that port lies in the kernel's ephemeral range, so the very next outgoing
/// connection from any process (a Redis client, say) may get it as its local port before
/// the child binds it. This picks at random *outside* that range
/// (`/proc/sys/net/ipv4/ip_local_port_range`), checks that it can be bound right now, and
/// never hands the same port out twice in one process. Two processes picking at once
/// could still meet, one time in tens of thousands. On a host whose ephemeral range leaves
/// (almost) nothing outside it, it falls back to the kernel's pick.
///
/// # Panics
///
/// If no port can be bound at all (the loopback interface is unusable).
pub fn free_port() -> u16 {
    free_port_in(&outside_ephemeral(&ephemeral_port_range()), None)
}

/// A port for a Redis Cluster node: like [`free_port`], and its cluster bus port (the port
/// plus 10 000) is free and outside the ephemeral range too, so the port is below 55 536 (a
/// node whose bus port would pass 65 535 does not start). Neither is handed out again.
///
/// # Panics
///
/// If no such pair can be bound.
pub fn free_cluster_port() -> u16 {
    let outside = outside_ephemeral(&ephemeral_port_range());
    free_port_in(&cluster_port_ranges(&outside), Some(CLUSTER_BUS_OFFSET))
}

/// The ports P in `outside` whose bus port P + 10 000 is in `outside` too.
fn cluster_port_ranges(outside: &[std::ops::Range<u16>]) -> Vec<std::ops::Range<u16>> {
    let mut ranges = Vec::new();
    for port_range in outside {
        for bus_range in outside {
            let start = port_range
                .start
                .max(bus_range.start.saturating_sub(CLUSTER_BUS_OFFSET));
            let end = port_range
                .end
                .min(bus_range.end.saturating_sub(CLUSTER_BUS_OFFSET));
            if start < end {
                ranges.push(start..end);
            }
        }
    }
    ranges
}

/// [`free_port`] picking from `outside`; with `companion`, the port that far above the
/// pick must be free as well, and is handed out with it.
fn free_port_in(outside: &[std::ops::Range<u16>], companion: Option<u16>) -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let total: usize = outside.iter().map(|r| r.len()).sum();
    let candidates = std::iter::repeat_with(|| {
        // The n-th port of the ranges outside the ephemeral one.
        let mut n = rand::random_range(0..total.max(1));
        for range in outside {
            if n < range.len() {
                return range.start + n as u16;
            }
            n -= range.len();
        }
        0
    })
    .take(if total >= MIN_OUTSIDE_PORTS { 1000 } else { 0 });
    let port = first_free_port(candidates, &handed_out, companion).unwrap_or_else(|| {
        let kernel_pick = || -> io::Result<u16> {
            (0..100)
                .map(|_| {
                    TcpListener::bind("127.0.0.1:0")?
                        .local_addr()
                        .map(|a| a.port())
                })
                .find(|port| {
                    port.as_ref()
                        .is_ok_and(|p| first_free_port([*p], &handed_out, companion).is_some())
                })
                .unwrap_or_else(|| Err(io::Error::other("every pick was handed out already")))
        };
        kernel_pick().unwrap_or_else(|e| panic!("found no free 127.0.0.1 port: {e}"))
    });
    handed_out.insert(port);
    if let Some(offset) = companion {
        handed_out.insert(port + offset);
    }
    port
}

/// The first candidate not in `handed_out` that binds now (with `companion`, the port that
/// far above it too).
fn first_free_port(
    candidates: impl IntoIterator<Item = u16>,
    handed_out: &BTreeSet<u16>,
    companion: Option<u16>,
) -> Option<u16> {
    let free = |port: u16| {
        port != 0 && !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok()
    };
    candidates.into_iter().find(|port| {
        free(*port) && companion.is_none_or(|offset| port.checked_add(offset).is_some_and(free))
    })
}

/// Below this many ports outside the ephemeral range, [`free_port`] lets the kernel pick.
const MIN_OUTSIDE_PORTS: usize = 1_000;

/// The ports [`free_port`] picks from: outside `ephemeral`, above the registered ports most
/// local daemons use (10 000), or above 1 024 if that leaves too few.
fn outside_ephemeral(ephemeral: &std::ops::RangeInclusive<u16>) -> Vec<std::ops::Range<u16>> {
    let (low, high) = (*ephemeral.start(), *ephemeral.end());
    let ranges = |floor: u16| {
        let below = floor..low.max(floor);
        let above = high.saturating_add(1).max(floor)..u16::MAX;
        [below, above]
            .into_iter()
            .filter(|r| !r.is_empty())
            .collect::<Vec<_>>()
    };
    let preferred = ranges(10_000);
    if preferred.iter().map(|r| r.len()).sum::<usize>() >= MIN_OUTSIDE_PORTS {
        preferred
    } else {
        ranges(1_024)
    }
}

/// The kernel's ephemeral port range (Linux's default when it cannot be read).
fn ephemeral_port_range() -> std::ops::RangeInclusive<u16> {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut bounds = text.split_whitespace().map(|n| n.parse::<u16>());
            match (bounds.next(), bounds.next()) {
                (Some(Ok(low)), Some(Ok(high))) => Some(low..=high),
                _ => None,
            }
        })
        .unwrap_or(32_768..=60_999)
}

fn spawn(dir: &Path, port: u16, options: RedisOptions, extra_args: &[&str]) -> Child {
    let stdio = File::options()
        .create(true)
        .append(true)
        .open(dir.join(STDIO_FILE))
        .expect("create redis stdio file");
    let stderr = stdio.try_clone().expect("clone redis stdio file");

    let mut cmd = Command::new(REDIS_BIN);
    cmd.arg("--port")
        .arg(port.to_string())
        .args(["--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(dir)
        .args(["--save", ""])
        .args(["--protected-mode", "no"])
        .args(["--daemonize", "no"])
        .arg("--logfile")
        .arg(dir.join(LOG_FILE));
    if options.aof {
        cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
    }
    cmd.args(extra_args);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(stdio))
        .stderr(Stdio::from(stderr));

    match cmd.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == io::ErrorKind::NotFound => panic!(
            "`{REDIS_BIN}` was not found on PATH. The tickflow tests need a real Redis: \
             install it (e.g. `sudo apt-get install redis-server`) and run the tests again."
        ),
        Err(e) => panic!("failed to spawn `{REDIS_BIN}`: {e}"),
    }
}

/// Waits until the server on `port` answers `PING` with `+PONG` *and* reports
/// our child's pid (so a foreign server that owns the port is never mistaken
/// for ours).
fn wait_ready(child: &mut Child, port: u16) -> Result<(), StartFailure> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Err(StartFailure::Exited(status)),
            Ok(None) => {}
            Err(e) => panic!("cannot check redis-server status: {e}"),
        }
        if probe(port).is_ok_and(|pid| pid == child.id()) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(StartFailure::Timeout);
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Sends `PING` then `INFO server` and returns the server's `process_id`.
fn probe(port: u16) -> io::Result<u32> {
    let mut conn = blocking_connection(port)?;
    let pong: String = redis::cmd("PING")
        .query(&mut conn)
        .map_err(io::Error::other)?;
    if pong != "PONG" {
        return Err(io::Error::other(format!("PING answered {pong:?}")));
    }
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query(&mut conn)
        .map_err(io::Error::other)?;
    info.lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
        .ok_or_else(|| io::Error::other("INFO server has no process_id"))
}

/// A blocking connection to the server on `port`, for the readiness probe and this
/// module's tests: the redis crate's, with short timeouts (a server that is still
/// starting is asked again soon).
fn blocking_connection(port: u16) -> io::Result<redis::Connection> {
    let client =
        redis::Client::open(format!("redis://127.0.0.1:{port}")).map_err(io::Error::other)?;
    let conn = client
        .get_connection_with_timeout(Duration::from_millis(500))
        .map_err(io::Error::other)?;
    conn.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(io::Error::other)?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))
        .map_err(io::Error::other)?;
    Ok(conn)
}

/// Whether the server on `port` answers an inline `PING` within `timeout` (a frozen one
/// does not). A bare socket, since a client's connection handshake would itself wait for
/// the frozen server.
fn answers_within(port: u16, timeout: Duration) -> bool {
    use std::io::{Read, Write};
    let Ok(mut socket) =
        std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout)
    else {
        return false;
    };
    let mut reply = [0u8; 7];
    socket.set_read_timeout(Some(timeout)).is_ok()
        && socket.write_all(b"PING\r\n").is_ok()
        && socket.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

/// `SIGKILL`s the child (if still alive) and waits for it.
fn reap(child: &mut Child) {
    // `kill` fails only if the process already exited; `wait` then reaps it.
    let _ = child.kill();
    let _ = child.wait();
}

/// The last lines of the server's log and stdio, for panic messages.
fn log_tail(dir: &Path) -> String {
    const LINES: usize = 40;
    let mut out = String::new();
    for name in [LOG_FILE, STDIO_FILE] {
        let path = dir.join(name);
        let text = fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LINES)..];
        out.push_str(&format!("--- tail of {} ---\n", path.display()));
        for line in tail {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `cmd` on `server` and returns its reply.
    fn query<T: redis::FromRedisValue>(
        server: &RedisServer,
        cmd: &mut redis::Cmd,
    ) -> redis::RedisResult<T> {
        let mut conn = blocking_connection(server.port()).unwrap();
        cmd.query(&mut conn)
    }

    fn set_k(server: &RedisServer) {
        let ok: String = query(server, redis::cmd("SET").arg("k").arg("v")).unwrap();
        assert_eq!(ok, "OK");
    }

    fn get_k(server: &RedisServer) -> Option<Vec<u8>> {
        query(server, redis::cmd("GET").arg("k")).unwrap()
    }

    fn answers_ping(port: u16) -> bool {
        blocking_connection(port)
            .and_then(|mut c| {
                redis::cmd("PING")
                    .query::<String>(&mut c)
                    .map_err(io::Error::other)
            })
            .is_ok_and(|pong| pong == "PONG")
    }

    #[test]
    fn starts_answers_and_dies_on_kill() {
        let mut server = RedisServer::start();
        assert!(server.is_running());
        assert_eq!(server.url(), format!("redis://127.0.0.1:{}", server.port()));
        assert!(answers_ping(server.port()));
        set_k(&server);
        assert_eq!(get_k(&server), Some(b"v".to_vec()));

        server.kill();
        assert!(!server.is_running());
        assert!(!answers_ping(server.port()));
        server.kill(); // idempotent
        assert!(!server.is_running());
    }

    #[test]
    fn aof_data_survives_kill_and_restart_empty_loses_it() {
        let mut server = RedisServer::start_with(RedisOptions { aof: true });
        let port = server.port();
        set_k(&server);

        server.kill();
        assert!(!answers_ping(port));
        server.restart();
        assert!(server.is_running());
        assert_eq!(server.port(), port);
        assert_eq!(get_k(&server), Some(b"v".to_vec()));

        // restart() on a running server crashes it first; data still survives.
        server.restart();
        assert_eq!(get_k(&server), Some(b"v".to_vec()));

        server.restart_empty();
        assert!(server.is_running());
        assert_eq!(server.port(), port);
        assert_eq!(get_k(&server), None);
    }

    #[test]
    fn without_aof_restart_loses_data() {
        let mut server = RedisServer::start();
        set_k(&server);
        server.restart();
        assert_eq!(get_k(&server), None);
    }

    #[test]
    fn drop_kills_the_server() {
        let server = RedisServer::start();
        let port = server.port();
        assert!(answers_ping(port));
        drop(server);
        assert!(!answers_ping(port));
    }

    #[test]
    fn servers_get_distinct_ports_and_dirs() {
        let a = RedisServer::start();
        let b = RedisServer::start();
        assert_ne!(a.port(), b.port());
        assert_ne!(a.dir(), b.dir());
        assert!(a.log_path().exists());
    }

    #[test]
    fn free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let ephemeral = ephemeral_port_range();
        let outside = outside_ephemeral(&ephemeral);
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
        if outside.iter().map(|r| r.len()).sum::<usize>() >= MIN_OUTSIDE_PORTS {
            for port in ports {
                assert!(!ephemeral.contains(&port), "{port} is in {ephemeral:?}");
                assert!(outside.iter().any(|r| r.contains(&port)), "{port}");
            }
        }
    }

    #[test]
    fn the_ports_outside_the_ephemeral_range_are_above_10000_when_enough_are() {
        assert_eq!(
            outside_ephemeral(&(32_768..=60_999)),
            [10_000..32_768, 61_000..65_535]
        );
        // A range that leaves too little above 10 000 (a common tuning): from 1 024 up.
        assert_eq!(outside_ephemeral(&(10_500..=65_535)), vec![(1_024..10_500)]);
        assert_eq!(
            outside_ephemeral(&(1_024..=65_535)),
            Vec::<std::ops::Range<u16>>::new()
        );
        // With nothing outside, the kernel picks (bindable, not handed out twice).
        let picks: BTreeSet<u16> = (0..20).map(|_| free_port_in(&[], None)).collect();
        assert_eq!(picks.len(), 20);
        assert!(
            picks
                .iter()
                .all(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
        );
    }

    #[test]
    fn cluster_ports_and_their_bus_ports_are_outside_the_ephemeral_range() {
        let outside = outside_ephemeral(&(32_768..=60_999));
        assert_eq!(cluster_port_ranges(&outside), vec![(10_000..22_768)]);
        for _ in 0..20 {
            let port = free_cluster_port();
            assert!(port < 55_536, "{port}");
            assert!(TcpListener::bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET)).is_ok());
        }
    }

    #[test]
    fn a_port_in_use_or_handed_out_is_passed_over() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let held_port = held.local_addr().unwrap().port();
        let given = free_port();
        let wanted = free_port();
        let handed_out = BTreeSet::from([given]);
        assert_eq!(
            first_free_port([held_port, 0, given, wanted], &handed_out, None),
            Some(wanted)
        );
        assert_eq!(first_free_port([held_port], &handed_out, None), None);
        // A free port whose companion is taken is passed over too.
        let base = free_port();
        let (offset, _companion_held) = (1..100)
            .find_map(|offset| {
                TcpListener::bind(("127.0.0.1", base.checked_add(offset)?))
                    .ok()
                    .map(|listener| (offset, listener))
            })
            .unwrap();
        let nothing_handed_out = BTreeSet::new();
        assert_eq!(
            first_free_port([base], &nothing_handed_out, None),
            Some(base)
        );
        assert_eq!(
            first_free_port([base], &nothing_handed_out, Some(offset)),
            None
        );
    }

    #[test]
    fn namespaces_are_unique() {
        let a = unique_namespace("x");
        let b = unique_namespace("x");
        assert_ne!(a, b);
        let prefix = format!("t-x-{}-", std::process::id());
        assert!(a.starts_with(&prefix), "{a}");
    }

    #[test]
    fn error_replies_are_errors() {
        let server = RedisServer::start();
        assert!(query::<redis::Value>(&server, &mut redis::cmd("NOSUCHCOMMAND")).is_err());
        assert_eq!(
            query::<i64>(&server, redis::cmd("INCR").arg("n")).unwrap(),
            1
        );
    }
}
