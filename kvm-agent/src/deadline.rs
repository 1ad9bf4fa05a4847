//! [`timeout`]: `tokio::time::timeout` that costs one timer registration per 5 s it waits
//! (`HOP`), leaves no timer entry far behind it, and does not keep a finished task alive.
//!
//! madsim's timer cannot cancel an entry, and its `Sleep` adds a new entry, holding a clone of
//! the task's waker, every time it is polled while pending. Under `tokio::time::timeout` the
//! sleep is polled at every wake-up of the guarded future, and each entry kept the task's
//! allocation alive until the deadline: with the 30-minute bus timeout, every job task of a
//! scale run stayed in memory to the end (heaptrack of the 3,000-host probe). Here the sleep is
//! polled once, with a waker of its own that holds the task's waker only while the guarded
//! future is pending. Every timeout of Stratus goes through this function (both builds).

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch: the one place Stratus reads the wall clock (simulated and
/// seeded under madsim, which intercepts `clock_gettime`).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The deadline passed before the future finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("deadline elapsed")]
pub struct Elapsed;

/// What the timer wakes: it marks that it rang and wakes the waiting task, if any still waits.
#[derive(Default)]
struct Alarm {
    rang: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Alarm {
    fn task(&self) -> std::sync::MutexGuard<'_, Option<Waker>> {
        self.task.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remember `w` as the task to wake (unless it is the same task already).
    fn set_task(&self, w: &Waker) {
        let mut t = self.task();
        if !t.as_ref().is_some_and(|old| old.will_wake(w)) {
            *t = Some(w.clone());
        }
    }
}

impl Wake for Alarm {
    fn wake(self: Arc<Self>) {
        self.rang.store(true, Ordering::Release);
        let task = self.task().take();
        if let Some(t) = task {
            t.wake();
        }
    }
}

/// Lets go of the task's waker when the timeout ends, however it ends: the timer entry keeps
/// only the small [`Alarm`] until its deadline.
struct Disarm(Option<Arc<Alarm>>);

impl Drop for Disarm {
    fn drop(&mut self) {
        if let Some(a) = &self.0 {
            a.task().take();
        }
    }
}

/// A pending timeout keeps one entry in the runtime's timer for at most this long; a longer
/// timeout sets a new entry each time one rings (polling the guarded future once more, which
/// every future allows). madsim's timer keeps an entry until its deadline, finished or not: with
/// the 30-minute bus timeout and the scenarios' one-hour job waits, every message and operation
/// of a scale run left an entry in the timer's heap to the end (millions at 30,000 hosts).
/// Now an entry outlives its timeout by at most this hop.
const HOP: Duration = Duration::from_secs(5);

/// Run `fut`, giving up after `d`.
pub async fn timeout<F: Future>(d: Duration, fut: F) -> Result<F::Output, Elapsed> {
    timeout_in_hops(d, HOP, fut).await
}

async fn timeout_in_hops<F: Future>(
    d: Duration,
    hop: Duration,
    fut: F,
) -> Result<F::Output, Elapsed> {
    let now = tokio::time::Instant::now();
    // A duration past what an Instant can hold waits "forever" (30 years), as tokio's does.
    let deadline = now
        .checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 86_400));
    let next_ring = move |now: tokio::time::Instant| deadline.min(now + hop);
    let mut fut = pin!(fut);
    let mut sleep = pin!(tokio::time::sleep_until(next_ring(now)));
    let mut armed = Disarm(None);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        let alarm = match &armed.0 {
            Some(a) => {
                a.set_task(cx.waker());
                if !a.rang.swap(false, Ordering::AcqRel) {
                    return Poll::Pending;
                }
                a.clone()
            }
            None => {
                let a = Arc::new(Alarm::default());
                a.set_task(cx.waker());
                armed.0 = Some(a.clone());
                a
            }
        };
        // First poll, or the alarm rang: look at the sleep (with the alarm's waker, so that a
        // sleep not yet elapsed wakes the alarm and not this task directly).
        let w = Waker::from(alarm);
        loop {
            match sleep.as_mut().poll(&mut Context::from_waker(&w)) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => {
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        return Poll::Ready(Err(Elapsed));
                    }
                    sleep.set(tokio::time::sleep_until(next_ring(now)));
                }
            }
        }
    })
    .await
}

#[cfg(all(test, not(madsim)))]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn a_timeout_of_many_hops_rings_at_its_deadline_and_not_before() {
        let hop = Duration::from_millis(10);
        let start = tokio::time::Instant::now();
        let never = std::future::pending::<()>();
        let long = Duration::from_millis(45);
        assert_eq!(timeout_in_hops(long, hop, never).await, Err(Elapsed));
        assert!(start.elapsed() >= long);
        // A future that finishes after several hops still wins.
        let late = tokio::time::sleep(Duration::from_millis(35));
        assert_eq!(
            timeout_in_hops(Duration::from_secs(60), hop, late).await,
            Ok(())
        );
    }

    #[test]
    fn the_task_waker_is_released_when_the_timeout_ends() {
        let a = Arc::new(Alarm::default());
        let task = Arc::new(Alarm::default());
        a.set_task(&Waker::from(task.clone()));
        assert_eq!(Arc::strong_count(&task), 2, "the alarm holds the task");
        drop(Disarm(Some(a.clone())));
        assert!(a.task().is_none());
        assert_eq!(Arc::strong_count(&task), 1, "and lets go of it");
    }
}
