//! Whether svc-watcher's view of the cluster is current, kind by kind, and
//! the readiness that follows from it.
//!
//! Not ready until the source has read the complete state once; after
//! that, not ready while the watch of some kind has been broken for longer
//! than the bound (`--unready-after`). A kind is broken from its first
//! watch error on, and working again as soon as the API answers its list
//! or watch, or any of its events arrives. Short breaks (a watch cut and
//! resumed, a relist) never show.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;
use weft_common::readiness::Readiness;
use weft_proto::watcher::v1::Kind;

use crate::convert::kind_name;

/// What is known of the source's watches.
#[derive(Debug, Clone, Default)]
struct State {
    synced: bool,
    broken: BTreeMap<Kind, Broken>,
}

#[derive(Debug, Clone)]
struct Broken {
    since: Instant,
    error: String,
}

/// Shared by the source (which reports) and the readiness task.
#[derive(Debug, Clone)]
pub struct WatchHealth {
    state: watch::Sender<State>,
}

impl Default for WatchHealth {
    fn default() -> Self {
        Self::new()
    }
}

/// Why not ready before the first complete list.
pub const WAITING: &str = "waiting for the first complete list of the cluster state";

impl WatchHealth {
    pub fn new() -> Self {
        Self {
            state: watch::Sender::new(State::default()),
        }
    }

    /// The source holds the complete state.
    pub fn synced(&self) {
        self.state
            .send_if_modified(|s| !std::mem::replace(&mut s.synced, true));
    }

    /// The watch of `kind` failed; it stays broken, from the first failure
    /// on, until [`WatchHealth::working`].
    pub fn broken(&self, kind: Kind, error: &str) {
        self.state
            .send_if_modified(|s| match s.broken.get_mut(&kind) {
                Some(b) => {
                    b.error = error.to_string();
                    false
                }
                None => {
                    s.broken.insert(
                        kind,
                        Broken {
                            since: Instant::now(),
                            error: error.to_string(),
                        },
                    );
                    true
                }
            });
    }

    /// The API answered for `kind`.
    pub fn working(&self, kind: Kind) {
        self.state
            .send_if_modified(|s| s.broken.remove(&kind).is_some());
    }

    /// The readiness now, given `bound`; with when it may change by itself.
    fn readiness(&self, bound: Duration) -> (Readiness, Option<Instant>) {
        let state = self.state.borrow();
        if !state.synced {
            return (Readiness::NotReady(WAITING.to_string()), None);
        }
        let now = Instant::now();
        let mut late: Vec<(Kind, &Broken)> = Vec::new();
        let mut next: Option<Instant> = None;
        for (kind, b) in &state.broken {
            let due = b.since + bound;
            if due <= now {
                late.push((*kind, b));
            } else {
                next = Some(next.map_or(due, |n: Instant| n.min(due)));
            }
        }
        let Some(oldest) = late.iter().min_by_key(|(_, b)| b.since) else {
            return (Readiness::Ready, next);
        };
        let mut why = String::from("the watch of ");
        for (i, (kind, _)) in late.iter().enumerate() {
            if i > 0 {
                why.push_str(", ");
            }
            why.push_str(kind_name(*kind));
        }
        let _ = write!(
            why,
            " has been broken for {:.1} s: {}",
            now.duration_since(oldest.1.since).as_secs_f64(),
            oldest.1.error
        );
        (Readiness::NotReady(why), next)
    }

    /// The readiness right now, with a reason that says how long (for
    /// `Status`).
    pub fn current(&self, bound: Duration) -> Readiness {
        self.readiness(bound).0
    }

    /// Keeps `readiness` up to date until `shutdown`.
    pub async fn report(
        self,
        bound: Duration,
        readiness: watch::Sender<Readiness>,
        shutdown: CancellationToken,
    ) {
        let mut changes = self.state.subscribe();
        loop {
            changes.borrow_and_update();
            let (now, next) = self.readiness(bound);
            readiness.send_if_modified(|r| {
                let changed = r.is_ready() != now.is_ready();
                if changed || !now.is_ready() {
                    *r = now;
                }
                changed
            });
            let wake = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = wake => {}
                changed = changes.changed() => if changed.is_err() { return },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn not_ready_before_the_first_list_and_while_broken_beyond_the_bound() {
        let health = WatchHealth::new();
        let (tx, mut rx) = watch::channel(Readiness::NotReady(WAITING.into()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(
            health
                .clone()
                .report(Duration::from_secs(5), tx, stop.clone()),
        );
        // A kind breaking before the first list changes nothing yet.
        health.broken(Kind::Pod, "connection refused");
        tokio::task::yield_now().await;
        assert_eq!(rx.borrow().reason(), WAITING);
        health.working(Kind::Pod);
        health.synced();
        rx.changed().await.expect("ready");
        assert!(rx.borrow().is_ready());

        health.broken(Kind::Service, "503");
        tokio::time::sleep(Duration::from_secs(4)).await;
        health.broken(Kind::Service, "still 503");
        assert!(rx.borrow().is_ready(), "not before the bound");
        rx.changed().await.expect("not ready");
        let reason = rx.borrow().reason().to_string();
        assert!(
            reason.starts_with("the watch of Service has been broken for 5.0 s: still 503"),
            "{reason}"
        );
        health.working(Kind::Service);
        rx.changed().await.expect("ready again");
        assert!(rx.borrow().is_ready());
        stop.cancel();
        task.await.expect("ends");
    }
}
