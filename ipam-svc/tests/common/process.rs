//! Runs a service binary as a real process for integration tests: a fresh
//! loopback port per start, logs appended to a file, readiness through the
//! standard health service. Shared by ipam-svc and identity-svc (identity-svc
//! includes this file by path).

#![allow(dead_code, unreachable_pub)]

use std::{
    fs::OpenOptions,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// One running service process; killed when dropped.
pub struct Proc {
    child: Child,
    pub addr: String,
    pub metrics_addr: String,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `bin` with `args` plus `--listen`/`--metrics-listen` on fresh
    /// ports; logs go to `log` (appended, so restarts keep the history).
    pub fn start(bin: &str, args: &[String], log: &Path) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = Command::new(bin)
            .args(args)
            .arg("--listen")
            .arg(&addr)
            .arg("--metrics-listen")
            .arg(&metrics_addr)
            .env("WEFT_LOG_LEVEL", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn service binary");
        Self {
            child,
            addr,
            metrics_addr,
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// A channel to the service's gRPC address.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect_lazy()
    }

    /// Waits until the health service reports SERVING.
    pub async fn wait_serving(&mut self) -> Channel {
        let deadline = Instant::now() + Duration::from_secs(15);
        let channel = self.channel().await;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("service exited early with {status}; log:\n{}", self.logs());
            }
            let mut health = HealthClient::new(channel.clone());
            if let Ok(r) = health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                && r.into_inner().status() == ServingStatus::Serving
            {
                return channel;
            }
            assert!(
                Instant::now() < deadline,
                "service not SERVING in time; log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `limit` for the exit.
    pub async fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("send SIGTERM");
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The text of `/metrics`, fetched with a bare HTTP/1.0 request.
    pub async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = tokio::net::TcpStream::connect(&self.metrics_addr)
            .await
            .expect("connect to metrics");
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .await
            .expect("request metrics");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read metrics");
        out
    }

    /// The value of one metric sample line that starts with `name`.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        self.metrics().await.lines().find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == name).then(|| v.parse().ok())?
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `check` until it returns `Some`, or panics after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The health of `service` (`""` for the server), asked with a one-second
/// deadline: health must answer at once, whatever the store is doing.
pub async fn health(channel: &Channel, service: &str) -> ServingStatus {
    let mut client = HealthClient::new(channel.clone());
    let answer = tokio::time::timeout(
        Duration::from_secs(1),
        client.check(HealthCheckRequest {
            service: service.into(),
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("health of {service:?} did not answer within 1 s"))
    .expect("health check");
    answer.into_inner().status()
}

/// Polls until the health of `service` and of the server (`""`) are both
/// `want`; how long that took. Panics after `limit`.
pub async fn health_becomes(
    channel: &Channel,
    service: &str,
    want: ServingStatus,
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let overall = health(channel, "").await;
        let named = health(channel, service).await;
        if overall == want && named == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "health not {want:?} within {limit:?}: \"\" {overall:?}, {service} {named:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
