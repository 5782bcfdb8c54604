//! A local pipeline: the four services as `tickflow serve …` processes on one Redis, each
//! on free `127.0.0.1` ports, with its output in a log file of its own. `tickflow bench`
//! runs its measurements on one; the tests start one to attach the benchmark to.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// The services, in pipeline order.
pub const SERVICES: [&str; 4] = ["ingest", "transform", "engine", "analytics"];

/// How long each service gets to answer `/readyz`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long each service gets to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Four running service processes; killed when dropped, stopped gracefully by
/// [`LocalPipeline::stop`]. One can be stopped and started again
/// ([`LocalPipeline::stop_service`], [`LocalPipeline::start_service`]), as an operator
/// would, to let a backlog build.
#[derive(Debug)]
pub struct LocalPipeline {
    services: Vec<Service>,
    grpc_port: u16,
    logs: PathBuf,
    exe: PathBuf,
    env: Vec<(String, String)>,
}

/// One service process (none while it is stopped).
#[derive(Debug)]
struct Service {
    name: &'static str,
    child: Option<Child>,
    http_port: u16,
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// CPU seconds (user + system) and peak resident memory of one process.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// User + system CPU seconds so far.
    pub cpu_seconds: f64,
    /// Peak resident set (`VmHWM`), MiB.
    pub peak_rss_mib: f64,
}

impl LocalPipeline {
    /// Starts `exe serve NAME` for every service with `env` (which must name `REDIS_URL`,
    /// `TICKFLOW_NAMESPACE`, …; the reference data must already be in Redis), each with its
    /// own `HTTP_ADDR`, one `GRPC_ADDR` for ingest, and `CONSUMER_NAME` `NAME-1`; logs go
    /// to `logs/NAME.log`. Waits until every service answers `/readyz`.
    pub async fn start(exe: &Path, env: &[(String, String)], logs: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(logs)?;
        let mut pipeline = Self {
            services: SERVICES
                .iter()
                .map(|name| Service {
                    name,
                    child: None,
                    http_port: streams_core::testing::free_port(),
                })
                .collect(),
            grpc_port: streams_core::testing::free_port(),
            logs: logs.to_owned(),
            exe: exe.to_owned(),
            env: env.to_vec(),
        };
        for index in 0..pipeline.services.len() {
            pipeline.spawn(index)?;
        }
        pipeline.wait_ready().await?;
        Ok(pipeline)
    }

    /// Starts service `index` (its log is appended to).
    fn spawn(&mut self, index: usize) -> anyhow::Result<()> {
        let service = &mut self.services[index];
        let name = service.name;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{name}.log")))?;
        // Only what it is given: nothing of the caller's environment (OTEL_*, tuning)
        // changes what is measured or tested.
        let child = Command::new(&self.exe)
            .args(["serve", name])
            .env_clear()
            .envs(self.env.iter().cloned())
            .env("HTTP_ADDR", format!("127.0.0.1:{}", service.http_port))
            .env("GRPC_ADDR", format!("127.0.0.1:{}", self.grpc_port))
            .env("CONSUMER_NAME", format!("{name}-1"))
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        service.child = Some(child);
        Ok(())
    }

    fn index_of(&self, name: &str) -> anyhow::Result<usize> {
        self.services
            .iter()
            .position(|s| s.name == name)
            .with_context(|| format!("no service {name:?}; the services are {SERVICES:?}"))
    }

    /// Stops `name` with SIGTERM (it finishes its batch and leaves its group's
    /// membership) and waits until it has exited.
    pub async fn stop_service(&mut self, name: &str) -> anyhow::Result<()> {
        let index = self.index_of(name)?;
        let service = &mut self.services[index];
        let Some(mut child) = service.child.take() else {
            return Ok(());
        };
        terminate(name, &mut child).await;
        Ok(())
    }

    /// Starts `name` again after [`LocalPipeline::stop_service`], on the same ports, and
    /// waits until it is ready.
    pub async fn start_service(&mut self, name: &str) -> anyhow::Result<()> {
        let index = self.index_of(name)?;
        if self.services[index].child.is_none() {
            self.spawn(index)?;
        }
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let http = reqwest::Client::builder().no_proxy().build()?;
        let ready_by = Instant::now() + READY_TIMEOUT;
        let logs = &self.logs;
        for service in &mut self.services {
            let Some(child) = &mut service.child else {
                continue;
            };
            let url = format!("http://127.0.0.1:{}/readyz", service.http_port);
            loop {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "{} exited with {status}; see {}",
                        service.name,
                        logs.display()
                    );
                }
                if http
                    .get(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
                {
                    break;
                }
                if Instant::now() > ready_by {
                    bail!(
                        "{} not ready after {READY_TIMEOUT:?}; see {}",
                        service.name,
                        logs.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Ingest's gRPC URL, `http://127.0.0.1:PORT`.
    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// The HTTP base URL of `service` (one of [`SERVICES`]), `http://127.0.0.1:PORT`.
    pub fn http_url(&self, service: &str) -> String {
        let port = self
            .services
            .iter()
            .find(|s| s.name == service)
            .map_or(0, |s| s.http_port);
        format!("http://127.0.0.1:{port}")
    }

    /// Where the services' logs are.
    pub fn logs(&self) -> &Path {
        &self.logs
    }

    /// Each service's CPU time and peak memory so far, in pipeline order.
    pub fn usage(&self) -> Vec<(&'static str, Usage)> {
        self.services
            .iter()
            .filter_map(|s| Some((s.name, process_usage(s.child.as_ref()?.id()))))
            .collect()
    }

    /// Stops every service with SIGTERM (each finishes its batch and flushes its spans)
    /// and waits for it to exit; one still running after [`STOP_TIMEOUT`] is killed.
    pub async fn stop(mut self) {
        let mut running: Vec<(&'static str, Child)> = self
            .services
            .iter_mut()
            .filter_map(|s| Some((s.name, s.child.take()?)))
            .collect();
        for (_, child) in &running {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        for (name, child) in &mut running {
            terminate(name, child).await;
        }
    }
}

/// Sends SIGTERM to `child` (again, if it had it) and waits for it to exit; kills it after
/// [`STOP_TIMEOUT`].
async fn terminate(name: &str, child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + STOP_TIMEOUT;
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if matches!(child.try_wait(), Ok(None)) {
        eprintln!("{name} did not stop within {STOP_TIMEOUT:?} of SIGTERM; killing it");
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// CPU seconds and peak resident memory of a process, from /proc.
fn process_usage(pid: u32) -> Usage {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of /proc/PID/stat: 11 and 12 after the name.
    let cpu_seconds = (ticks(11) + ticks(12)) / clock_ticks_per_second();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    Usage {
        cpu_seconds,
        peak_rss_mib: peak_kib as f64 / 1024.0,
    }
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}
