//! The small server every lab pod runs, and the client side of it.
//!
//! TCP: the client sends one line; `who` is answered with the pod's name and
//! the peer address it saw, `bytes N` with the pod's name on a line and then
//! N bytes of data, `echo` by echoing everything until the client closes. UDP: every datagram is answered with
//! the pod's name and the peer address.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};

/// Serves TCP and UDP on `port` until the process is stopped.
pub async fn serve(name: String, port: u16) -> anyhow::Result<()> {
    let tcp = tokio::net::TcpListener::bind(("0.0.0.0", port))
        .await
        .context("binding TCP")?;
    let udp = tokio::net::UdpSocket::bind(("0.0.0.0", port))
        .await
        .context("binding UDP")?;
    let udp_name = name.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        loop {
            let Ok((_, peer)) = udp.recv_from(&mut buf).await else {
                continue;
            };
            let reply = format!("{udp_name} {peer}\n");
            let _ = udp.send_to(reply.as_bytes(), peer).await;
        }
    });
    loop {
        let (stream, peer) = tcp.accept().await?;
        let name = name.clone();
        tokio::spawn(async move {
            let _ = handle(stream, peer, &name).await;
        });
    }
}

async fn handle(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    name: &str,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = tokio::io::BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let line = line.trim();
    if let Some(n) = line.strip_prefix("bytes ") {
        reader
            .get_mut()
            .write_all(format!("{name}\n").as_bytes())
            .await?;
        let mut left: u64 = n.parse().unwrap_or(0);
        let chunk = vec![b'x'; 64 * 1024];
        while left > 0 {
            let k = left.min(chunk.len() as u64) as usize;
            reader.get_mut().write_all(&chunk[..k]).await?;
            left -= k as u64;
        }
    } else if line == "echo" {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            reader.get_mut().write_all(&buf[..n]).await?;
        }
    } else {
        reader
            .get_mut()
            .write_all(format!("{name} {peer}\n").as_bytes())
            .await?;
    }
    reader.get_mut().shutdown().await
}

/// One TCP `who` request from the current thread's namespace: the name of
/// the pod that answered.
pub fn tcp_who(addr: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"who\n")?;
    let mut reply = String::new();
    BufReader::new(&mut s).read_line(&mut reply)?;
    let name = reply
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    if name.is_empty() {
        bail!("empty reply from {addr}");
    }
    Ok(name)
}

/// One UDP datagram from a fresh socket (a fresh source port, so a fresh
/// flow): the name of the pod that answered.
pub fn udp_who(addr: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    let reply = udp_ask(addr, b"who\n", timeout)?;
    Ok(reply
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// Sends `request` in one datagram from a fresh socket and returns the
/// answer, which must come from `addr` itself (a reply from the backend's
/// address means reverse translation failed).
pub fn udp_ask(addr: SocketAddr, request: &[u8], timeout: Duration) -> anyhow::Result<String> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(timeout))?;
    s.send_to(request, addr)?;
    let mut buf = [0u8; 512];
    let (n, from) = s
        .recv_from(&mut buf)
        .with_context(|| format!("no UDP reply from {addr}"))?;
    if from != addr {
        bail!("UDP reply came from {from}, not {addr}: reverse translation failed");
    }
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Opens a `bytes N` download over TCP; the returned stream has read the
/// serving pod's name line and the data follows.
pub fn tcp_download_start(
    addr: SocketAddr,
    n: u64,
    timeout: Duration,
) -> anyhow::Result<(String, BufReader<TcpStream>)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(format!("bytes {n}\n").as_bytes())?;
    let mut reader = BufReader::new(s);
    let mut name = String::new();
    reader.read_line(&mut name)?;
    Ok((name.trim().to_string(), reader))
}

/// Reads the rest of a download, at most `chunk` bytes per `pause`;
/// returns how many bytes arrived.
pub fn tcp_download_finish(
    mut reader: BufReader<TcpStream>,
    chunk: usize,
    pause: Duration,
) -> anyhow::Result<u64> {
    let mut total = 0u64;
    let mut buf = vec![0u8; chunk.max(1)];
    loop {
        let k = reader.read(&mut buf)?;
        if k == 0 {
            break;
        }
        total += k as u64;
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
    Ok(total)
}

/// One `who` request from a fixed source port, so the same flow can be
/// replayed later (for consistent hashing).
pub fn tcp_who_from(
    local_port: u16,
    addr: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<String> {
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrIn, sockopt};
    let SocketAddr::V4(dst) = addr else {
        bail!("IPv4 only")
    };
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        // Close-on-exec: a process another thread forks meanwhile would
        // otherwise keep this socket open in CLOSE_WAIT, and the next
        // connect from the same port to the same backend would fail.
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    socket::bind(raw, &SockaddrIn::new(0, 0, 0, 0, local_port))
        .with_context(|| format!("binding source port {local_port}"))?;
    socket::connect(raw, &SockaddrIn::from(dst))
        .with_context(|| format!("connecting to {addr} from port {local_port}"))?;
    let mut s = TcpStream::from(fd);
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"who\n")?;
    let mut reply = String::new();
    let mut reader = BufReader::new(&mut s);
    reader.read_line(&mut reply)?;
    // Wait for the server's FIN before closing: the server is then the
    // active closer and holds TIME_WAIT, so this fixed source port can
    // connect to the same backend again at once (a client-side TIME_WAIT
    // would refuse it with EADDRNOTAVAIL).
    std::io::copy(&mut reader, &mut std::io::sink())?;
    let name = reply
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    if name.is_empty() {
        bail!("empty reply from {addr}");
    }
    Ok(name)
}

/// A `who` request answered with the pod's name and the source address the
/// pod saw (to tell whether the client's address was preserved).
pub fn tcp_who_peer(addr: SocketAddr, timeout: Duration) -> anyhow::Result<(String, SocketAddr)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"who\n")?;
    let mut reply = String::new();
    BufReader::new(&mut s).read_line(&mut reply)?;
    let mut parts = reply.split_whitespace();
    let name = parts.next().unwrap_or_default().to_string();
    let peer = parts
        .next()
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("reply {reply:?}"))?;
    Ok((name, peer))
}

/// Runs `f` inside the pod's network namespace and returns its result.
pub fn in_pod<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    weft_common::netns::run_in(netns, f)
}
