//! The connection-rate load generator: closed-loop workers inside a client
//! pod's namespace, each opening a TCP connection, sending one request,
//! reading the reply to the end and closing, as fast as it can.
//!
//! A request's latency runs from before `connect()` to the end of the
//! reply (the server closes after answering), so it covers the handshake,
//! the translation of the first packet and the reverse translation of the
//! replies. Only requests started after the warm-up count.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use crate::stats::Summary;

#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Where to connect, in turn (one address, or each backend pod for the
    /// floor, so the same servers share the load as behind a Service).
    pub targets: Vec<SocketAddr>,
    /// Connections in flight at once (one per worker thread).
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    /// Requests answered in the measured window.
    pub completed: u64,
    /// Requests that failed (refused, timed out, empty reply).
    pub errors: u64,
    pub window: Duration,
    pub latency: Summary,
    /// Which backend answered, by name, in the measured window.
    pub answered_by: BTreeMap<String, u64>,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
}

impl LoadResult {
    /// Connections (each with one request and reply) per second.
    pub fn rate(&self) -> f64 {
        if self.window.is_zero() {
            return 0.0;
        }
        self.completed as f64 / self.window.as_secs_f64()
    }
}

struct Worker {
    latencies: Vec<Duration>,
    errors: u64,
    answered_by: BTreeMap<String, u64>,
    first_error: Option<String>,
}

const TIMEOUT: Duration = Duration::from_secs(2);

/// One request on a fresh connection: the name of the backend that
/// answered.
fn request(target: SocketAddr, buf: &mut Vec<u8>) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&target, TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(b"who\n")?;
    buf.clear();
    s.read_to_end(buf)?;
    let name = buf
        .split(|b| *b == b' ' || *b == b'\n')
        .next()
        .unwrap_or_default();
    if name.is_empty() {
        return Err(std::io::Error::other("empty reply"));
    }
    Ok(String::from_utf8_lossy(name).into_owned())
}

/// Runs the load from inside the network namespace at `netns`.
pub fn run(netns: &Path, spec: &LoadSpec) -> anyhow::Result<LoadResult> {
    anyhow::ensure!(!spec.targets.is_empty(), "no target to load");
    let spec = spec.clone();
    weft_common::netns::run_in(netns, move || {
        let start = Instant::now();
        let measure_from = start + spec.warmup;
        let end = measure_from + spec.duration;
        // Threads spawned here inherit this thread's network namespace.
        let workers: Vec<Worker> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..spec.concurrency.max(1))
                .map(|k| {
                    let targets = spec.targets.clone();
                    scope.spawn(move || {
                        let mut w = Worker {
                            latencies: Vec::with_capacity(200_000),
                            errors: 0,
                            answered_by: BTreeMap::new(),
                            first_error: None,
                        };
                        let mut buf = Vec::with_capacity(128);
                        let mut next = k;
                        loop {
                            let t0 = Instant::now();
                            if t0 >= end {
                                break;
                            }
                            let target = targets[next % targets.len()];
                            next += 1;
                            let result = request(target, &mut buf);
                            if t0 < measure_from {
                                continue;
                            }
                            match result {
                                Ok(name) => {
                                    w.latencies.push(t0.elapsed());
                                    match w.answered_by.get_mut(&name) {
                                        Some(n) => *n += 1,
                                        None => {
                                            w.answered_by.insert(name, 1);
                                        }
                                    }
                                }
                                Err(e) => {
                                    w.errors += 1;
                                    if w.first_error.is_none() {
                                        w.first_error = Some(e.to_string());
                                    }
                                }
                            }
                        }
                        w
                    })
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        let mut out = LoadResult {
            window: spec.duration,
            ..Default::default()
        };
        let mut all = Vec::new();
        for w in workers {
            out.errors += w.errors;
            if out.first_error.is_none() {
                out.first_error = w.first_error;
            }
            for (k, v) in w.answered_by {
                *out.answered_by.entry(k).or_default() += v;
            }
            all.extend(w.latencies);
        }
        out.completed = all.len() as u64;
        out.latency = Summary::of(&mut all);
        Ok(out)
    })
}
