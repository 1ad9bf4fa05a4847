//! The simulation's [`timeout`]: timeouts share madsim's timer entries ("rings") and leave them
//! when they end.
//!
//! madsim's timer cannot cancel an entry: one set for a timeout that ends early stays in its
//! heap until its time. A timeout therefore never sets one for its whole duration (the bus waits
//! 30 minutes, the scenarios' job waits an hour): it waits for rings 4 to 5 s ahead ([`HOP`]),
//! which fall on whole seconds and are shared by every timeout waiting at that moment, and joins
//! the next one when a ring comes before its deadline. Only the last wait, for the deadline
//! itself (to the millisecond), has a ring of its own. A ring holds the wakers of the tasks that
//! joined it, and a timeout that ends takes its waker out, so a finished task is not kept alive.
//!
//! Before, each timeout set an entry of its own (a boxed callback and an alarm) that stayed up
//! to 5 s after it ended: timeouts made a large share of the entries `datacenter-30k` put in
//! madsim's timer, and popping its heap showed in that run's profiles (docs/perf-log.md).

use super::Elapsed;
use crate::runtime_local::RuntimeLocal;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;
use tokio::time::Instant;

/// How far ahead a shared ring is set (rounded down to [`SHARED_GRAIN_MS`]).
const HOP: Duration = Duration::from_secs(5);

/// Shared rings fall on multiples of this since the runtime's first timeout.
const SHARED_GRAIN_MS: u64 = 1_000;

/// One entry in madsim's timer, with the tasks waiting for it.
#[derive(Default)]
struct Ring {
    rang: AtomicBool,
    waiting: Mutex<Waiting>,
}

/// The wakers of the timeouts waiting for a ring, by slot; a slot is reused once left.
#[derive(Default)]
struct Waiting {
    tasks: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl Ring {
    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn rang(&self) -> bool {
        self.rang.load(Ordering::Acquire)
    }

    /// Wait for the ring: `w` is woken when it rings. Returns the slot to leave it by.
    fn join(&self, w: &Waker) -> usize {
        let mut g = self.waiting();
        match g.free.pop() {
            Some(slot) => {
                g.tasks[slot] = Some(w.clone());
                slot
            }
            None => {
                g.tasks.push(Some(w.clone()));
                g.tasks.len() - 1
            }
        }
    }

    /// The task polling now is the one to wake (it may have moved).
    fn still(&self, slot: usize, w: &Waker) {
        let mut g = self.waiting();
        if let Some(t) = g.tasks.get_mut(slot) {
            if !t.as_ref().is_some_and(|old| old.will_wake(w)) {
                *t = Some(w.clone());
            }
        }
    }

    /// Stop waiting (a no-op once the ring rang: its wakers are gone then).
    fn leave(&self, slot: usize) {
        let mut g = self.waiting();
        if let Some(t) = g.tasks.get_mut(slot) {
            if t.take().is_some() {
                g.free.push(slot);
            }
        }
    }
}

impl Wake for Ring {
    /// Called by madsim's timer (with the timer locked: nothing here may set a timer).
    fn wake(self: Arc<Self>) {
        self.rang.store(true, Ordering::Release);
        let tasks = {
            let mut g = self.waiting();
            g.free.clear();
            std::mem::take(&mut g.tasks)
        };
        for t in tasks.into_iter().flatten() {
            t.wake();
        }
    }
}

/// The rings of one runtime that have not rung, by milliseconds since `base` (a ring set in a
/// runtime that has ended never rings: each runtime has its own).
struct Rings {
    base: Instant,
    pending: BTreeMap<u64, Arc<Ring>>,
}

thread_local! {
    static RINGS: RefCell<Option<RuntimeLocal<Rings>>> = const { RefCell::new(None) };
}

fn ceil_ms(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// The ring a timeout ending at `deadline` waits for now: the shared one 4 to 5 s ahead, or
/// its own at the deadline when that comes first. Set in madsim's timer when new.
fn ring_for(now: Instant, deadline: Instant) -> Arc<Ring> {
    RINGS.with(|cell| {
        let mut cell = cell.borrow_mut();
        let r = RuntimeLocal::current(&mut cell, || Rings {
            base: now,
            pending: BTreeMap::new(),
        });
        // A ring whose time has come rang (or is ringing): nobody joins it again.
        let now_ms = now.duration_since(r.base).as_millis() as u64;
        while let Some(e) = r.pending.first_entry() {
            if *e.key() > now_ms {
                break;
            }
            e.remove();
        }
        // Whole seconds since `base`, 4 to 5 s ahead (after now: HOP is longer than a grain).
        let ahead = (now + HOP).duration_since(r.base).as_millis() as u64;
        let shared = ahead / SHARED_GRAIN_MS * SHARED_GRAIN_MS;
        let own = ceil_ms(deadline.duration_since(r.base));
        let at = own.min(shared);
        let base = r.base;
        r.pending
            .entry(at)
            .or_insert_with(|| set(base + Duration::from_millis(at)))
            .clone()
    })
}

/// A new ring in madsim's timer at `at` (after now).
fn set(at: Instant) -> Arc<Ring> {
    let ring = Arc::new(Ring::default());
    let waker = Waker::from(ring.clone());
    let sleep = pin!(tokio::time::sleep_until(at));
    // Pending (`at` is ahead): the timer now holds the ring's waker until `at`.
    let _ = sleep.poll(&mut Context::from_waker(&waker));
    ring
}

/// The ring a timeout waits for; left when the timeout ends, however it ends.
struct Waits(Option<(Arc<Ring>, usize)>);

impl Waits {
    fn leave(&mut self) {
        if let Some((ring, slot)) = self.0.take() {
            ring.leave(slot);
        }
    }
}

impl Drop for Waits {
    fn drop(&mut self) {
        self.leave();
    }
}

/// Run `fut`, giving up after `d`.
pub async fn timeout<F: Future>(d: Duration, fut: F) -> Result<F::Output, Elapsed> {
    let now = Instant::now();
    // A duration past what an Instant can hold waits "forever" (30 years), as tokio's does.
    let deadline = now
        .checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 86_400));
    let mut fut = pin!(fut);
    let mut waits = Waits(None);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        if let Some((ring, slot)) = &waits.0 {
            if !ring.rang() {
                ring.still(*slot, cx.waker());
                return Poll::Pending;
            }
        }
        // First poll, or the ring rang: the deadline, or the next ring.
        waits.leave();
        let now = Instant::now();
        if now >= deadline {
            return Poll::Ready(Err(Elapsed));
        }
        let ring = ring_for(now, deadline);
        let slot = ring.join(cx.waker());
        waits.0 = Some((ring, slot));
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending_rings() -> usize {
        RINGS.with(|c| c.borrow().as_ref().map_or(0, |r| r.value.pending.len()))
    }

    #[tokio::test]
    async fn timeouts_at_the_same_moment_share_one_ring() {
        let never = || std::future::pending::<()>();
        let start = Instant::now();
        let all = (0..100).map(|_| timeout(Duration::from_secs(3600), never()));
        let mut all: Vec<_> = all.map(Box::pin).collect();
        // Poll each once: all wait for the same shared ring.
        let w = futures::task::noop_waker();
        for t in &mut all {
            assert!(t.as_mut().poll(&mut Context::from_waker(&w)).is_pending());
        }
        assert_eq!(pending_rings(), 1);
        // One that ends leaves; the others wait on.
        drop(all.pop());
        tokio::time::sleep(Duration::from_secs(7)).await;
        assert!(start.elapsed() >= Duration::from_secs(7));
        drop(all);
    }

    #[tokio::test]
    async fn a_long_timeout_rings_at_its_deadline_to_the_millisecond() {
        let start = Instant::now();
        let never = std::future::pending::<()>();
        let d = Duration::from_millis(12_345);
        assert_eq!(timeout(d, never).await, Err(Elapsed));
        let took = start.elapsed();
        assert!(took >= d, "{took:?}");
        assert!(took < d + Duration::from_millis(2), "{took:?}");
        // A future that ends after several rings still wins.
        let late = tokio::time::sleep(Duration::from_millis(16_500));
        assert_eq!(timeout(Duration::from_secs(60), late).await, Ok(()));
    }

    #[test]
    fn a_ring_lets_go_of_a_task_that_left_and_wakes_the_others() {
        let ring = Arc::new(Ring::default());
        let gone = Arc::new(Ring::default());
        let stays = Arc::new(Ring::default());
        let a = ring.join(&Waker::from(gone.clone()));
        let b = ring.join(&Waker::from(stays.clone()));
        assert_eq!(Arc::strong_count(&gone), 2, "the ring holds the task");
        ring.leave(a);
        assert_eq!(Arc::strong_count(&gone), 1, "and lets go of it");
        // The slot is reused.
        assert_eq!(ring.join(&Waker::from(gone.clone())), a);
        ring.leave(a);
        Waker::from(ring.clone()).wake();
        assert!(ring.rang());
        assert!(stays.rang(), "the task still waiting was woken");
        assert!(!gone.rang(), "the one that left was not");
        assert_eq!(Arc::strong_count(&stays), 1);
        // Leaving after the ring rang is harmless.
        ring.leave(b);
    }

    #[test]
    fn a_new_runtime_on_the_same_thread_does_not_join_rings_of_the_last() {
        let never = || std::future::pending::<()>();
        let rt = madsim::runtime::Runtime::with_seed_and_config(1, Default::default());
        rt.block_on(async {
            // Leave the shared ring of 6.5 s pending when this runtime ends at 1.5 s.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let mut t = Box::pin(timeout(Duration::from_secs(60), never()));
            let w = futures::task::noop_waker();
            assert!(t.as_mut().poll(&mut Context::from_waker(&w)).is_pending());
        });
        drop(rt);
        let rt = madsim::runtime::Runtime::with_seed_and_config(2, Default::default());
        rt.block_on(async {
            // The same moment in a new runtime: a ring of the last one would never ring (madsim
            // would find no event left and panic); this one's rings at 6.5 s and at 9.5 s do.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            assert_eq!(timeout(Duration::from_secs(8), never()).await, Err(Elapsed));
        });
    }
}
