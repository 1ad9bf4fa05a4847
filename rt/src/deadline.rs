//! [`timeout`]: the one timeout of Stratus. In the std build it is `tokio::time::timeout`; under
//! madsim it shares timer entries and lets go of the task when it ends ([`rings`]).
//!
//! madsim's timer cannot cancel an entry, and its `Sleep` adds a new entry, holding a clone of
//! the task's waker, every time it is polled while pending. Under madsim's
//! `tokio::time::timeout` the sleep is polled at every wake-up of the guarded future, and each
//! entry kept the task's allocation alive until the deadline: with the 30-minute bus timeout,
//! every job task of a scale run stayed in memory to the end (docs/perf-log.md). Every timeout
//! of Stratus goes through this function (both builds).

#[cfg(not(madsim))]
use std::future::Future;
#[cfg(not(madsim))]
use std::time::Duration;

/// The deadline passed before the future finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("deadline elapsed")]
pub struct Elapsed;

/// Run `fut`, giving up after `d`.
#[cfg(not(madsim))]
pub async fn timeout<F: Future>(d: Duration, fut: F) -> Result<F::Output, Elapsed> {
    tokio::time::timeout(d, fut).await.map_err(|_| Elapsed)
}

#[cfg(madsim)]
pub use rings::timeout;

#[cfg(madsim)]
mod rings;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_ready_future_wins() {
        assert_eq!(timeout(Duration::from_secs(1), async { 7 }).await, Ok(7));
    }

    #[tokio::test]
    async fn a_pending_future_times_out() {
        let never = std::future::pending::<()>();
        assert_eq!(
            timeout(Duration::from_millis(20), never).await,
            Err(Elapsed)
        );
    }

    #[tokio::test]
    async fn a_future_woken_many_times_still_finishes_or_times_out() {
        // Woken every 10 ms, done after 100 ms: within a 60 s timeout it finishes...
        let ticks = |n: u32| async move {
            for _ in 0..n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            n
        };
        assert_eq!(timeout(Duration::from_secs(60), ticks(10)).await, Ok(10));
        // ...and never within 30 ms.
        assert_eq!(
            timeout(Duration::from_millis(30), ticks(10)).await,
            Err(Elapsed)
        );
    }

    #[tokio::test]
    async fn a_timeout_too_long_for_an_instant_waits_instead_of_panicking() {
        assert_eq!(timeout(Duration::MAX, async { 7 }).await, Ok(7));
    }
}
