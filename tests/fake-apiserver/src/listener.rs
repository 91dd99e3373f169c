//! The accept loop, and taking the server off the network and back: what a
//! crashed or restarted API server looks like to its clients.
//!
//! While away, the port stays bound by a socket that does not listen, so a
//! connection is refused at once (as from a stopped process) and no other
//! process can take the port meanwhile. Every open connection is cut when
//! the server goes away, mid-request or not.

use std::{io, net::SocketAddr};

use axum::Router;
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::{mpsc, oneshot},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

/// How deep the accept queue is once listening again.
const BACKLOG: u32 = 1024;

/// What the test asks of the accept loop.
pub(crate) enum Control {
    /// Close the listener and every connection; acknowledged once closed.
    Away(oneshot::Sender<()>),
    /// Listen again on the same port; acknowledged once listening.
    Back(oneshot::Sender<io::Result<()>>),
}

/// Serves `app` on `listener` until `stop`, going away and coming back as
/// `control` says.
pub(crate) async fn run(
    listener: TcpListener,
    app: Router,
    mut control: mpsc::UnboundedReceiver<Control>,
    stop: CancellationToken,
) {
    let mut listener = listener;
    loop {
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "fake API server: no local address");
                return;
            }
        };
        let Some(ack) = serve(listener, &app, &mut control, &stop).await else {
            return;
        };
        // The port stays ours, bound but not listening: connections are
        // refused.
        let parked = park(addr);
        let _ = ack.send(());
        let parked = match parked {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(%addr, error = %e, "fake API server: cannot hold its port");
                return;
            }
        };
        let back = loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                c = control.recv() => match c {
                    None => return,
                    Some(Control::Away(ack)) => { let _ = ack.send(()); }
                    Some(Control::Back(ack)) => break ack,
                },
            }
        };
        match parked.listen(BACKLOG) {
            Ok(l) => {
                let _ = back.send(Ok(()));
                listener = l;
            }
            Err(e) => {
                let _ = back.send(Err(e));
                return;
            }
        }
    }
}

/// A socket bound to `addr` that does not listen.
fn park(addr: SocketAddr) -> io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// Accepts and serves connections until `stop` (None) or an `Away`
/// request (its acknowledgement, sent by the caller once the port is
/// parked). Every connection is cut on the way out.
async fn serve(
    listener: TcpListener,
    app: &Router,
    control: &mut mpsc::UnboundedReceiver<Control>,
    stop: &CancellationToken,
) -> Option<oneshot::Sender<()>> {
    let mut connections = JoinSet::new();
    let away = loop {
        tokio::select! {
            _ = stop.cancelled() => break None,
            c = control.recv() => match c {
                None => break None,
                Some(Control::Away(ack)) => break Some(ack),
                Some(Control::Back(ack)) => { let _ = ack.send(Ok(())); }
            },
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "fake API server: accept failed");
                        continue;
                    }
                };
                let service = TowerToHyperService::new(app.clone());
                connections.spawn(async move {
                    let served = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    if let Err(e) = served {
                        tracing::debug!(error = %e, "fake API server: connection ended");
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    };
    drop(listener);
    connections.abort_all();
    while connections.join_next().await.is_some() {}
    away
}
