//! Exponential back-off with jitter, for reconnect loops.

use std::time::Duration;

/// Doubles the delay on each failure up to a cap; `reset` after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            current: initial,
        }
    }

    /// The delay to wait now; the next one is longer.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.current;
        self.current = (self.current * 2).min(self.max);
        // Up to 20% jitter so that many nodes don't reconnect in lock-step.
        let jitter_ms = (delay.as_millis() as u64 / 5).max(1);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(0);
        delay + Duration::from_millis(nanos % jitter_ms)
    }

    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

/// The back-off of background work a store refused (writes during an API
/// outage): soon, then every five seconds at most, so the work is done
/// within seconds of the store's return.
pub fn store_retry() -> Backoff {
    Backoff::new(Duration::from_millis(500), Duration::from_secs(5))
}

/// Sleeps until `at`; without one, never returns (a `select!` arm that is
/// off).
pub async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Reloads shared state shortly after each tick of `changes` (another
/// replica changed the store; a burst of ticks costs one reload), retrying
/// a failed reload with [`store_retry`], until `shutdown`. `what` names the
/// state in the log. Without a change feed, waits for `shutdown`.
pub async fn resync_on_changes<E, F, Fut>(
    changes: Option<tokio::sync::watch::Receiver<u64>>,
    debounce: Duration,
    shutdown: tokio_util::sync::CancellationToken,
    what: &str,
    mut resync: F,
) where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    let Some(mut changes) = changes else {
        shutdown.cancelled().await;
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
        }
        let mut backoff = store_retry();
        let mut delay = debounce;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            changes.borrow_and_update();
            match resync().await {
                Ok(()) => break,
                Err(e) => {
                    delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "reloading {what} failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let d: Vec<_> = (0..4).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(100) && d[0] < Duration::from_millis(120));
        assert!(d[1] >= Duration::from_millis(200) && d[1] < Duration::from_millis(240));
        assert!(d[3] >= Duration::from_millis(400) && d[3] < Duration::from_millis(480));
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(120));
    }
}
