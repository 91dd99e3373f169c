//! Continuous traffic for the resilience tests: long-lived TCP connections
//! doing request/reply in a loop (a reset or a stall shows), plus a stream
//! of new TCP connections and of UDP datagrams, each from a fresh source
//! port, so every one is a new flow through the datapath.
//!
//! Each flow runs on its own thread inside a network namespace (a pod's, a
//! node's, or the control plane's, which stands for the outside world) and
//! counts what it tried and what went wrong. Tests read the counters before
//! and after each disruption: the difference is that phase's tally.

use std::{
    collections::VecDeque,
    fmt,
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use weft_lab::podserver::{tcp_who, udp_who};

/// How long a new TCP connection (connect plus answer) may take: two SYN
/// retransmissions (after 1 s and 3 s) fit. Anything slower than [`SLOW`]
/// is counted as slow.
pub const TCP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a UDP datagram may wait for its answer. There is no
/// retransmission: a datagram the datapath dropped is a failure.
pub const UDP_TIMEOUT: Duration = Duration::from_secs(1);
/// A new connection slower than this needed a retransmission: a packet was
/// lost somewhere.
pub const SLOW: Duration = Duration::from_millis(900);

/// What a flow does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A new TCP connection per request (`who`).
    TcpNew,
    /// A UDP datagram per request, from a fresh socket.
    Udp,
    /// `n` connections opened once, each echoing a message every round.
    TcpEstablished(usize),
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::TcpNew => f.write_str("TCP new"),
            Kind::Udp => f.write_str("UDP"),
            Kind::TcpEstablished(n) => write!(f, "TCP {n} established"),
        }
    }
}

/// What the server at the other end speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Server {
    /// The lab's pod server: `who` and `echo` lines.
    #[default]
    Lab,
    /// agnhost's `netexec`, the server of Kubernetes' own e2e tests: HTTP
    /// `/hostname` and `/echo` (kept alive for established connections),
    /// and UDP `hostname`.
    Netexec,
}

/// One stream of traffic.
#[derive(Debug, Clone)]
pub struct Flow {
    /// Who sends, for reports (`client-1`, `outside`).
    pub from: String,
    /// The namespace it sends from.
    pub netns: PathBuf,
    pub to: SocketAddr,
    /// What `to` is, for reports (`ClusterIP`, `NodePort node2`).
    pub what: String,
    pub kind: Kind,
    pub server: Server,
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} {} ({})",
            self.from, self.what, self.to, self.kind
        )
    }
}

/// A flow's counters. For new connections and datagrams `tried` counts
/// requests; for established connections it counts round trips.
#[derive(Debug, Default)]
struct Counters {
    tried: AtomicU64,
    failed: AtomicU64,
    reset: AtomicU64,
    timeouts: AtomicU64,
    slow: AtomicU64,
    /// Established connections opened (the first ones and any reconnect).
    opened: AtomicU64,
}

/// A snapshot of a flow's counters, or the difference of two.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub tried: u64,
    /// Requests without a correct answer (including timeouts and resets).
    pub failed: u64,
    /// Established connections that broke (reset, closed, or stalled).
    pub reset: u64,
    pub timeouts: u64,
    /// New connections that needed more than [`SLOW`].
    pub slow: u64,
    pub opened: u64,
}

impl Tally {
    fn of(c: &Counters) -> Self {
        Self {
            tried: c.tried.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            reset: c.reset.load(Ordering::Relaxed),
            timeouts: c.timeouts.load(Ordering::Relaxed),
            slow: c.slow.load(Ordering::Relaxed),
            opened: c.opened.load(Ordering::Relaxed),
        }
    }

    /// Nothing went wrong.
    pub fn clean(&self) -> bool {
        self.failed == 0 && self.reset == 0 && self.timeouts == 0
    }
}

/// Counts of a span of time: the later tally minus the earlier.
impl std::ops::Sub for Tally {
    type Output = Tally;
    fn sub(self, earlier: Tally) -> Tally {
        Tally {
            tried: self.tried - earlier.tried,
            failed: self.failed - earlier.failed,
            reset: self.reset - earlier.reset,
            timeouts: self.timeouts - earlier.timeouts,
            slow: self.slow - earlier.slow,
            opened: self.opened - earlier.opened,
        }
    }
}

impl std::ops::Add for Tally {
    type Output = Tally;
    fn add(self, o: Tally) -> Tally {
        Tally {
            tried: self.tried + o.tried,
            failed: self.failed + o.failed,
            reset: self.reset + o.reset,
            timeouts: self.timeouts + o.timeouts,
            slow: self.slow + o.slow,
            opened: self.opened + o.opened,
        }
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tried {:>6}  failed {}  reset {}  timeouts {}  slow {}",
            self.tried, self.failed, self.reset, self.timeouts, self.slow
        )
    }
}

struct Running {
    flow: Flow,
    counters: Arc<Counters>,
    /// The most recent failures, with when they happened.
    errors: Arc<Mutex<VecDeque<(Instant, String)>>>,
}

/// Traffic running until [`Load::stop`].
pub struct Load {
    stop: Arc<AtomicBool>,
    flows: Vec<Running>,
    threads: Vec<JoinHandle<()>>,
    started: Instant,
}

const KEEP_ERRORS: usize = 32;

fn note(errors: &Mutex<VecDeque<(Instant, String)>>, e: String) {
    let mut errors = errors.lock().unwrap_or_else(|p| p.into_inner());
    if errors.len() == KEEP_ERRORS {
        errors.pop_front();
    }
    errors.push_back((Instant::now(), e));
}

impl Load {
    /// Starts every flow, each on its own thread in its namespace. The
    /// established connections are open when this returns.
    pub fn start(flows: Vec<Flow>, pause: Duration) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut running = Vec::new();
        let mut threads = Vec::new();
        for flow in flows {
            let counters = Arc::new(Counters::default());
            let errors = Arc::new(Mutex::new(VecDeque::new()));
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
            let thread = {
                let (flow, counters, errors, stop) =
                    (flow.clone(), counters.clone(), errors.clone(), stop.clone());
                std::thread::Builder::new()
                    .name(format!("load {flow}"))
                    .spawn(move || {
                        let netns = flow.netns.clone();
                        let ready = ready_tx.clone();
                        let result = weft_common::netns::run_in(&netns, move || {
                            run_flow(&flow, &counters, &errors, &stop, pause, ready_tx);
                            Ok(())
                        });
                        if let Err(e) = result {
                            let _ = ready.send(Err(e));
                        }
                    })?
            };
            match ready_rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    stop.store(true, Ordering::Relaxed);
                    anyhow::bail!("starting {flow}: {e:#}");
                }
                Err(_) => {
                    stop.store(true, Ordering::Relaxed);
                    anyhow::bail!("starting {flow}: no answer");
                }
            }
            threads.push(thread);
            running.push(Running {
                flow,
                counters,
                errors,
            });
        }
        Ok(Self {
            stop,
            flows: running,
            threads,
            started: Instant::now(),
        })
    }

    /// Every flow's counters now.
    pub fn snapshot(&self) -> Vec<Tally> {
        self.flows.iter().map(|r| Tally::of(&r.counters)).collect()
    }

    pub fn flows(&self) -> impl Iterator<Item = &Flow> {
        self.flows.iter().map(|r| &r.flow)
    }

    /// The failures each flow saw after `since`, for a report.
    pub fn errors_since(&self, since: Instant) -> Vec<String> {
        let mut out = Vec::new();
        for r in &self.flows {
            let errors = r.errors.lock().unwrap_or_else(|p| p.into_inner());
            for (at, e) in errors.iter().filter(|(at, _)| *at >= since) {
                out.push(format!(
                    "{:>7.2}s {}: {e}",
                    at.duration_since(self.started).as_secs_f64(),
                    r.flow
                ));
            }
        }
        out
    }

    /// Seconds since the load started, for reports.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops every flow and returns the final counters.
    pub fn stop(mut self) -> Vec<Tally> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.snapshot()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A table of per-flow tallies between two snapshots, and the total.
pub fn report(load: &Load, before: &[Tally], after: &[Tally]) -> (String, Tally) {
    let mut out = String::new();
    let mut total = Tally::default();
    for ((flow, b), a) in load.flows().zip(before).zip(after) {
        let t = *a - *b;
        total = total + t;
        out.push_str(&format!("    {:<58} {t}\n", flow.to_string()));
    }
    (out, total)
}

fn run_flow(
    flow: &Flow,
    counters: &Counters,
    errors: &Mutex<VecDeque<(Instant, String)>>,
    stop: &AtomicBool,
    pause: Duration,
    ready: std::sync::mpsc::Sender<anyhow::Result<()>>,
) {
    match flow.kind {
        Kind::TcpNew | Kind::Udp => {
            let _ = ready.send(Ok(()));
            while !stop.load(Ordering::Relaxed) {
                counters.tried.fetch_add(1, Ordering::Relaxed);
                let started = Instant::now();
                let result = match (flow.server, flow.kind) {
                    (Server::Lab, Kind::Udp) => udp_who(flow.to, UDP_TIMEOUT),
                    (Server::Lab, _) => tcp_who(flow.to, TCP_TIMEOUT),
                    (Server::Netexec, Kind::Udp) => netexec::udp_hostname(flow.to, UDP_TIMEOUT),
                    (Server::Netexec, _) => netexec::http_hostname(flow.to, TCP_TIMEOUT),
                };
                let took = started.elapsed();
                match result {
                    Ok(_) if took > SLOW => {
                        counters.slow.fetch_add(1, Ordering::Relaxed);
                        note(errors, format!("slow: answered after {took:?}"));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        if is_timeout(&e) {
                            counters.timeouts.fetch_add(1, Ordering::Relaxed);
                        }
                        note(errors, format!("after {took:?}: {e:#}"));
                    }
                }
                std::thread::sleep(pause);
            }
        }
        Kind::TcpEstablished(n) => {
            let mut conns: Vec<Option<TcpStream>> = Vec::with_capacity(n);
            for _ in 0..n {
                match open_echo(flow.server, flow.to) {
                    Ok(s) => {
                        counters.opened.fetch_add(1, Ordering::Relaxed);
                        conns.push(Some(s));
                    }
                    Err(e) => {
                        let _ = ready.send(Err(anyhow::anyhow!("opening a connection: {e}")));
                        return;
                    }
                }
            }
            let _ = ready.send(Ok(()));
            let mut round: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                for (i, slot) in conns.iter_mut().enumerate() {
                    let Some(conn) = slot.as_mut() else {
                        // Broken earlier: open a replacement, so later
                        // phases still have established connections.
                        match open_echo(flow.server, flow.to) {
                            Ok(s) => {
                                counters.opened.fetch_add(1, Ordering::Relaxed);
                                *slot = Some(s);
                            }
                            Err(e) => {
                                counters.failed.fetch_add(1, Ordering::Relaxed);
                                note(errors, format!("reconnecting #{i}: {e}"));
                            }
                        }
                        continue;
                    };
                    counters.tried.fetch_add(1, Ordering::Relaxed);
                    let echoed = match flow.server {
                        Server::Lab => echo_once(conn, round, i),
                        Server::Netexec => netexec::http_echo(conn, round, i),
                    };
                    if let Err(e) = echoed {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        counters.reset.fetch_add(1, Ordering::Relaxed);
                        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                            counters.timeouts.fetch_add(1, Ordering::Relaxed);
                        }
                        note(errors, format!("connection #{i} broke: {e}"));
                        *slot = None;
                    }
                }
                std::thread::sleep(pause);
            }
        }
    }
}

fn is_timeout(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| matches!(io.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut))
    })
}

/// An established connection: in the pod server's echo mode, or an HTTP
/// connection kept alive.
fn open_echo(server: Server, to: SocketAddr) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&to, TCP_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(TCP_TIMEOUT))?;
    s.set_write_timeout(Some(TCP_TIMEOUT))?;
    if server == Server::Lab {
        s.write_all(b"echo\n")?;
    }
    Ok(s)
}

/// One round trip: a message out, the same message back.
fn echo_once(s: &mut TcpStream, round: u64, conn: usize) -> std::io::Result<()> {
    let msg = format!("{round:012}:{conn:03}\n");
    s.write_all(msg.as_bytes())?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    if back != msg.as_bytes() {
        return Err(std::io::Error::other(format!(
            "echo mismatch: sent {msg:?}, got {:?}",
            String::from_utf8_lossy(&back)
        )));
    }
    Ok(())
}

/// The client side of agnhost netexec, enough for the load: one HTTP/1.1
/// request and its response, and the UDP `hostname` command.
pub mod netexec {
    use std::{
        io::{BufRead as _, BufReader, Read as _, Write as _},
        net::{SocketAddr, TcpStream},
        time::Duration,
    };

    use anyhow::{Context as _, bail};

    /// `GET /hostname` on a new connection: the answering pod's name.
    pub fn http_hostname(addr: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(timeout))?;
        let body = request(&mut s, "/hostname", true)?;
        if body.trim().is_empty() {
            bail!("empty hostname from {addr}");
        }
        Ok(body.trim().to_string())
    }

    /// `GET /echo?msg=...` on a kept-alive connection.
    pub fn http_echo(s: &mut TcpStream, round: u64, conn: usize) -> std::io::Result<()> {
        let msg = format!("{round:012}-{conn:03}");
        let body = request(s, &format!("/echo?msg={msg}"), false).map_err(std::io::Error::other)?;
        if body != msg {
            return Err(std::io::Error::other(format!(
                "echo mismatch: sent {msg:?}, got {body:?}"
            )));
        }
        Ok(())
    }

    fn request(s: &mut TcpStream, path: &str, close: bool) -> anyhow::Result<String> {
        let connection = if close { "close" } else { "keep-alive" };
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: netexec\r\nConnection: {connection}\r\n\r\n")
                .as_bytes(),
        )?;
        let mut reader = BufReader::new(s);
        let mut status = String::new();
        reader.read_line(&mut status)?;
        if !status.starts_with("HTTP/1.1 200") {
            bail!("HTTP answer {:?}", status.trim());
        }
        let mut length = None;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                bail!("connection closed in the headers");
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse::<usize>().ok();
            }
        }
        let length = length.context("no Content-Length")?;
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// The UDP `hostname` command from a fresh socket.
    pub fn udp_hostname(addr: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
        let name = weft_lab::podserver::udp_ask(addr, b"hostname", timeout)?
            .trim()
            .to_string();
        if name.is_empty() {
            bail!("empty UDP reply from {addr}");
        }
        Ok(name)
    }
}
