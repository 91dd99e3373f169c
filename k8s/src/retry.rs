//! weft's one retry policy for the Kubernetes API, and what it learns about
//! the API's reachability on the way.
//!
//! kube's client has a retry layer of its own (429, 503 and 504, fifteen
//! times, backing off towards minutes); [`crate::client::connect`] builds
//! the client without it, so that a call fails or succeeds within the
//! budget given here and no lock or caller is held longer than that.
//!
//! - [`retrying`] runs one call until it gives a real answer, backing off
//!   over transient trouble for at most the [`RetryPolicy`]'s budget. Once
//!   the API has been failing for longer than the budget, a new call tries
//!   once: writes queued behind a failing one then fail one after the
//!   other at once, instead of each waiting a whole budget.
//! - [`ApiHealth`] records every outcome (the calls' and the watches'), and
//!   [`ApiHealth::report`] turns "failing for longer than a bound" into a
//!   [`Readiness`] for the gRPC health service.
//! - [`backed_off`] is the back-off of the kube-runtime watchers: low and
//!   capped, so a watch is current again within about a second of the API
//!   server's return however long it was gone, and none after 410 Gone.

use std::{fmt, future::Future, time::Duration};

use futures::{Stream, StreamExt as _};
use kube::runtime::watcher;

use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;
use weft_common::{
    backoff::{Backoff, sleep_until},
    readiness::Readiness,
};

use crate::{
    api::status_code,
    observe::{Observer, Outcome},
};

/// How long one call is retried over transient trouble by default.
pub const DEFAULT_BUDGET: Duration = Duration::from_secs(60);

/// The least time one attempt gets, even when the budget is spent: enough
/// for an answer from a healthy server, short of holding anyone for long.
const MIN_ATTEMPT: Duration = Duration::from_secs(2);

/// How [`retrying`] backs off between attempts.
const FIRST_DELAY: Duration = Duration::from_millis(50);
const MAX_DELAY: Duration = Duration::from_secs(2);

/// The back-off of a watch: from 100 ms, doubling to 1 s (plus up to 20%
/// jitter), reset by every event. kube-runtime's default (800 ms to 30 s,
/// reset only after two quiet minutes) left svc-watcher a minute behind
/// after a 30 s outage.
const WATCH_FIRST_DELAY: Duration = Duration::from_millis(100);
const WATCH_MAX_DELAY: Duration = Duration::from_secs(1);

/// Whether an error is worth retrying: transport trouble (no answer at all)
/// and the server's "try again" answers (429 and every 5xx). Everything
/// else is a real answer.
pub fn transient(e: &kube::Error) -> bool {
    match status_code(e) {
        None => true,
        Some(code) => code == 429 || code >= 500,
    }
}

/// Whether a watch error means the API did not answer (as against an
/// answer such as 410 Gone, after which the watcher lists again).
pub fn watch_unreachable(e: &watcher::Error) -> bool {
    use watcher::Error as W;
    match e {
        W::InitialListFailed(e) | W::WatchStartFailed(e) | W::WatchFailed(e) => transient(e),
        W::WatchError(s) => s.code == 429 || s.code >= 500,
        W::NoResourceVersion => false,
    }
}

/// How long a call keeps trying over transient trouble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub budget: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            budget: DEFAULT_BUDGET,
        }
    }
}

/// The API as the calls found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// The last call got an answer.
    Reachable,
    /// Calls have failed since `since`, the latest with `error`.
    Failing { since: Instant, error: String },
}

/// What calls and watches learn about the API's reachability, shared by
/// everything one service sends to it.
#[derive(Debug, Clone)]
pub struct ApiHealth {
    reach: watch::Sender<Reach>,
}

impl Default for ApiHealth {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiHealth {
    pub fn new() -> Self {
        Self {
            reach: watch::Sender::new(Reach::Reachable),
        }
    }

    /// A call or a watch got an answer.
    pub fn succeeded(&self) {
        self.reach.send_if_modified(|r| {
            let was_failing = matches!(r, Reach::Failing { .. });
            if was_failing {
                tracing::info!("the Kubernetes API answers again");
            }
            *r = Reach::Reachable;
            was_failing
        });
    }

    /// A call or a watch met transient trouble. Only the start of a failure
    /// wakes anyone; later errors just replace the text.
    pub fn failed(&self, error: &dyn fmt::Display) {
        let error = error.to_string();
        self.reach.send_if_modified(|r| match r {
            Reach::Reachable => {
                *r = Reach::Failing {
                    since: Instant::now(),
                    error,
                };
                true
            }
            Reach::Failing { error: last, .. } => {
                *last = error;
                false
            }
        });
    }

    /// Since when calls have been failing, if they are.
    pub fn failing_since(&self) -> Option<Instant> {
        match &*self.reach.borrow() {
            Reach::Reachable => None,
            Reach::Failing { since, .. } => Some(*since),
        }
    }

    pub fn reach(&self) -> Reach {
        self.reach.borrow().clone()
    }

    /// An observer for the client (see [`crate::observe`]): every request's
    /// outcome is recorded here, resumed watches included.
    pub fn observer(&self) -> Observer {
        let health = self.clone();
        Observer::new(move |_, _, outcome| match outcome {
            Outcome::Answered(code) if code.as_u16() == 429 || code.is_server_error() => {
                health.failed(&format_args!("the API server answered {code}"));
            }
            Outcome::Answered(_) => health.succeeded(),
            Outcome::Failed(e) => health.failed(&e),
        })
    }

    /// Keeps `readiness` NotReady while the API has been failing for longer
    /// than `bound`, Ready otherwise, until `shutdown`.
    pub async fn report(
        self,
        bound: Duration,
        readiness: watch::Sender<Readiness>,
        shutdown: CancellationToken,
    ) {
        let mut reach = self.reach.subscribe();
        loop {
            let now = reach.borrow_and_update().clone();
            // When a failure that is not yet long enough will be.
            let due = match now {
                Reach::Reachable => {
                    readiness.send_if_modified(|r| set(r, Readiness::Ready));
                    None
                }
                Reach::Failing { since, error } if since + bound <= Instant::now() => {
                    let why = format!(
                        "the Kubernetes API has been failing for {:.1} s: {error}",
                        since.elapsed().as_secs_f64()
                    );
                    readiness.send_if_modified(|r| set(r, Readiness::NotReady(why)));
                    None
                }
                Reach::Failing { since, .. } => Some(since + bound),
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = reach.changed() => if changed.is_err() { return },
                _ = sleep_until(due), if due.is_some() => {}
            }
        }
    }
}

/// Sets `slot` to `to`; true when that changed whether it is ready.
fn set(slot: &mut Readiness, to: Readiness) -> bool {
    let changed = slot.is_ready() != to.is_ready();
    *slot = to;
    changed
}

/// The error of an attempt that got no answer in time.
fn timed_out(what: &str, after: Duration) -> kube::Error {
    kube::Error::Service(Box::new(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what}: no answer from the Kubernetes API within {after:?}"),
    )))
}

/// Runs `call` until it gives a real answer, backing off over transient
/// errors within `policy`'s budget (see the module doc for the budget of a
/// call made while the API is already failing). Every outcome goes to
/// `health`.
pub async fn retrying<T, F, Fut>(
    health: &ApiHealth,
    policy: RetryPolicy,
    what: &str,
    mut call: F,
) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let start = Instant::now();
    let deadline = match health.failing_since() {
        Some(since) => (since + policy.budget).max(start),
        None => start + policy.budget,
    };
    let mut backoff = Backoff::new(FIRST_DELAY, MAX_DELAY);
    let mut attempts = 0u32;
    loop {
        let allowed = deadline
            .saturating_duration_since(Instant::now())
            .max(MIN_ATTEMPT);
        let result = match tokio::time::timeout(allowed, call()).await {
            Ok(r) => r,
            Err(_) => Err(timed_out(what, allowed)),
        };
        match result {
            Err(e) if transient(&e) => {
                health.failed(&e);
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    tracing::warn!(error = %e, attempts, budget = ?policy.budget, "{what}: Kubernetes API trouble; giving up");
                    return Err(e);
                }
                if attempts == 0 {
                    tracing::warn!(error = %e, "{what}: Kubernetes API trouble; retrying");
                } else {
                    tracing::debug!(error = %e, attempts, "{what}: Kubernetes API trouble; retrying");
                }
                attempts += 1;
                tokio::time::sleep(backoff.next_delay().min(left)).await;
            }
            other => {
                health.succeeded();
                return other;
            }
        }
    }
}

/// A kube-runtime watcher stream with weft's back-off: after an error the
/// stream pauses (from 100 ms, doubling to about a second; reset by every
/// event), except after 410 Gone, which is an answer: the watcher lists
/// again at once. kube-runtime's `StreamBackoff` pauses after every error,
/// 410 included, so after an outage that lost the API server's history a
/// watch waited out a whole grown back-off before listing again.
pub fn backed_off<K, S>(
    events: S,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    K: Send + 'static,
{
    let state = (Box::pin(events), watch_backoff(), None::<Duration>);
    futures::stream::unfold(state, |(mut events, mut backoff, pause)| async move {
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
        let item = events.next().await?;
        let pause = match &item {
            Ok(_) => {
                backoff.reset();
                None
            }
            Err(watcher::Error::WatchError(s)) if s.code == 410 => {
                backoff.reset();
                None
            }
            Err(_) => Some(backoff.next_delay()),
        };
        Some((item, (events, backoff, pause)))
    })
}

/// The pauses of [`backed_off`].
fn watch_backoff() -> Backoff {
    Backoff::new(WATCH_FIRST_DELAY, WATCH_MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(
            kube::core::Status::failure("test", "Test").with_code(code),
        ))
    }

    #[test]
    fn transient_errors_are_the_try_again_ones() {
        assert!(transient(&api_error(503)));
        assert!(transient(&api_error(429)));
        assert!(transient(&timed_out("x", Duration::ZERO)));
        assert!(!transient(&api_error(409)));
        assert!(!transient(&api_error(404)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_pauses_a_second_at_most_and_not_after_410() {
        use kube::runtime::watcher::{Error as W, Event};
        let unreachable = || Err(W::WatchFailed(timed_out("watch", Duration::ZERO)));
        let gone = || {
            Err(W::WatchError(Box::new(
                kube::core::Status::failure("too old", "Expired").with_code(410),
            )))
        };
        let items: Vec<Result<Event<()>, W>> = (0..8)
            .map(|_| unreachable())
            .chain([
                gone(),
                Ok(Event::InitDone),
                unreachable(),
                Ok(Event::InitDone),
            ])
            .collect();
        let mut stream = std::pin::pin!(backed_off(futures::stream::iter(items)));
        let mut gaps = Vec::new();
        let mut last = Instant::now();
        while let Some(item) = stream.next().await {
            gaps.push((item.is_ok(), last.elapsed()));
            last = Instant::now();
        }
        let pauses: Vec<Duration> = gaps.iter().map(|(_, d)| *d).collect();
        assert_eq!(pauses[0], Duration::ZERO, "{pauses:?}");
        assert!(pauses[1] < Duration::from_millis(150), "{pauses:?}");
        assert!(
            pauses.iter().all(|d| *d <= Duration::from_millis(1200)),
            "{pauses:?}"
        );
        assert!(pauses[7] >= Duration::from_secs(1), "grown: {pauses:?}");
        // After 410 Gone the list comes at once; after an event the back-off
        // starts small again.
        assert_eq!(pauses[9], Duration::ZERO, "{pauses:?}");
        assert!(pauses[11] < Duration::from_millis(150), "{pauses:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_gives_up_within_its_budget_and_the_next_tries_once() {
        let health = ApiHealth::new();
        let policy = RetryPolicy {
            budget: Duration::from_secs(5),
        };
        let calls = Arc::new(AtomicUsize::new(0));
        let failing = || {
            let calls = calls.clone();
            move || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err::<(), _>(api_error(503)) }
            }
        };
        let start = Instant::now();
        let err = retrying(&health, policy, "test", failing()).await;
        assert!(err.is_err());
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(5) && took < Duration::from_millis(5100),
            "{took:?}"
        );
        assert!(calls.load(Ordering::SeqCst) > 3);
        assert!(health.failing_since().is_some());

        // The API has failed for a whole budget: the next call tries once.
        calls.store(0, Ordering::SeqCst);
        let start = Instant::now();
        assert!(retrying(&health, policy, "test", failing()).await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(start.elapsed() < Duration::from_millis(10));

        // An answer, even a refusal, is reachability.
        let refused = retrying(&health, policy, "test", || async {
            Err::<(), _>(api_error(409))
        })
        .await;
        assert!(refused.is_err());
        assert_eq!(health.reach(), Reach::Reachable);
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_follows_a_failure_longer_than_the_bound() {
        let health = ApiHealth::new();
        let (tx, mut rx) = watch::channel(Readiness::Ready);
        let stop = CancellationToken::new();
        let task = tokio::spawn(
            health
                .clone()
                .report(Duration::from_secs(3), tx, stop.clone()),
        );
        health.failed(&"connection refused");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(rx.borrow().is_ready(), "not before the bound");
        rx.changed().await.expect("NotReady");
        let reason = rx.borrow().reason().to_string();
        assert!(reason.contains("connection refused"), "{reason}");
        health.succeeded();
        rx.changed().await.expect("Ready");
        assert!(rx.borrow().is_ready());
        // A short blip never shows.
        health.failed(&"blip");
        tokio::time::sleep(Duration::from_secs(1)).await;
        health.succeeded();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(rx.borrow().is_ready());
        stop.cancel();
        task.await.expect("report ends");
    }
}
