//! Per-resource queues: the lock-free way to serialize work on one resource.
//!
//! Every operation on a resource runs under a signature (`vm-<uuid>`, `host-<uuid>`) with a
//! parallelism (1 for most resources, N for hosts). A task holds its slot across every await
//! until it finishes; when it returns, fails, panics or is cancelled, the slot passes to the next
//! waiter in FIFO order. The bookkeeping mutex is held only for a few instructions, never across
//! an await, and an idle signature takes no memory.

use crate::error::{broken_invariant, Error};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::oneshot;

struct QueueState {
    running: usize,
    parallelism: usize,
    waiters: VecDeque<oneshot::Sender<()>>,
}

#[derive(Default)]
struct Inner {
    queues: HashMap<String, QueueState>,
    completed: u64,
    running: usize,
    waiting: usize,
}

/// All queues of one management node. Cheap to clone.
#[derive(Clone, Default)]
pub struct Queues {
    inner: Arc<Mutex<Inner>>,
}

/// Depth of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct QueueDepth {
    pub running: usize,
    pub waiting: usize,
}

/// Totals over all queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct QueueStats {
    /// Signatures with running or waiting tasks.
    pub active_queues: usize,
    pub running: usize,
    pub waiting: usize,
    /// Tasks finished since start.
    pub completed: u64,
}

/// What a queued task's output is when the queue itself fails (a broken invariant): the task
/// does not run, and its caller sees the failure as it sees the task's own errors.
pub trait QueuedOutput {
    fn queue_failed(e: Error) -> Self;
}

impl<T, E: From<Error>> QueuedOutput for Result<T, E> {
    fn queue_failed(e: Error) -> Self {
        Err(e.into())
    }
}

/// A held slot. Dropping it releases the slot to the next waiter.
pub struct Slot {
    queues: Queues,
    sig: Option<String>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(sig) = self.sig.take() {
            self.queues.release(&sig);
        }
    }
}

/// A waiter that may be cancelled: if the slot was handed over just as it was dropped, the slot
/// is passed on instead of leaking.
struct Waiting {
    queues: Queues,
    sig: String,
    rx: Option<oneshot::Receiver<()>>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if rx.try_recv().is_ok() {
                self.queues.release(&self.sig);
            } else {
                self.queues.forget_waiter(&self.sig);
            }
        }
    }
}

impl Queues {
    pub fn new() -> Self {
        Queues::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait for a slot in queue `sig` (at most `parallelism` holders at once). A signature has
    /// one parallelism while it has holders or waiters; asking with another, or with 0, is a
    /// bug, and so is finding more holders than the parallelism.
    pub async fn acquire(&self, sig: &str, parallelism: usize) -> Result<Slot, Error> {
        if parallelism == 0 {
            return Err(Error::invariant(format!("queue {sig}: parallelism 0")));
        }
        let rx = {
            let mut g = self.lock();
            let inner = &mut *g;
            let q = inner
                .queues
                .entry(sig.to_string())
                .or_insert_with(|| QueueState {
                    running: 0,
                    parallelism,
                    waiters: VecDeque::new(),
                });
            if q.parallelism != parallelism {
                let held = q.parallelism;
                return Err(Error::invariant(format!(
                    "queue {sig}: asked with parallelism {parallelism} while it runs with {held}"
                )));
            }
            if q.running > q.parallelism {
                let running = q.running;
                return Err(Error::invariant(format!(
                    "queue {sig}: {running} running above its parallelism {parallelism}"
                )));
            }
            if q.running < q.parallelism && q.waiters.is_empty() {
                q.running += 1;
                inner.running += 1;
                None
            } else {
                let (tx, rx) = oneshot::channel();
                q.waiters.push_back(tx);
                inner.waiting += 1;
                Some(rx)
            }
        };
        if let Some(rx) = rx {
            let mut w = Waiting {
                queues: self.clone(),
                sig: sig.to_string(),
                rx: Some(rx),
            };
            let granted = w.rx.as_mut().expect("receiver present").await;
            // The sender is only dropped after a send or by `forget_waiter`, which drops only
            // closed ones (this waiter's is open while it waits).
            w.rx = None;
            if granted.is_err() {
                return Err(Error::invariant(format!(
                    "queue {sig}: a waiter's hand-off closed without a slot"
                )));
            }
        }
        Ok(Slot {
            queues: self.clone(),
            sig: Some(sig.to_string()),
        })
    }

    /// Run `task` in queue `sig`; the slot is held until the task's future completes (or is
    /// dropped, or panics). When the queue finds a broken invariant, the task does not run and
    /// its output is that failure ([`QueuedOutput`]).
    pub async fn run<T: QueuedOutput>(
        &self,
        sig: &str,
        parallelism: usize,
        task: impl Future<Output = T>,
    ) -> T {
        match self.acquire(sig, parallelism).await {
            Ok(_slot) => task.await,
            Err(e) => T::queue_failed(e),
        }
    }

    /// Pass the slot of `sig` to the next live waiter, or free it.
    fn release(&self, sig: &str) {
        let mut g = self.lock();
        let inner = &mut *g;
        inner.completed += 1;
        let Some(q) = inner.queues.get_mut(sig) else {
            broken_invariant(format!("queue {sig}: a slot released from no queue"));
            return;
        };
        while let Some(w) = q.waiters.pop_front() {
            inner.waiting -= 1;
            if w.send(()).is_ok() {
                return; // the slot moved to the waiter; running count unchanged
            }
        }
        if q.running == 0 || inner.running == 0 {
            broken_invariant(format!("queue {sig}: a slot released with none running"));
            return;
        }
        q.running -= 1;
        inner.running -= 1;
        if q.running == 0 {
            inner.queues.remove(sig);
        }
    }

    /// A cancelled waiter leaves; drop closed senders so the counts stay exact.
    fn forget_waiter(&self, sig: &str) {
        let mut g = self.lock();
        let inner = &mut *g;
        if let Some(q) = inner.queues.get_mut(sig) {
            let before = q.waiters.len();
            q.waiters.retain(|w| !w.is_closed());
            inner.waiting -= before - q.waiters.len();
            if q.running == 0 && q.waiters.is_empty() {
                inner.queues.remove(sig);
            }
        }
    }

    pub fn depth(&self, sig: &str) -> QueueDepth {
        self.lock()
            .queues
            .get(sig)
            .map(|q| QueueDepth {
                running: q.running,
                waiting: q.waiters.len(),
            })
            .unwrap_or_default()
    }

    pub fn stats(&self) -> QueueStats {
        let g = self.lock();
        QueueStats {
            active_queues: g.queues.len(),
            running: g.running,
            waiting: g.waiting,
            completed: g.completed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn tasks_of_one_signature_run_one_at_a_time_in_order() {
        let q = Queues::new();
        let log = Arc::new(Mutex::new(Vec::new()));
        let active = Arc::new(AtomicUsize::new(0));
        let first = q.acquire("vm-1", 1).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..5 {
            let (q2, log, active) = (q.clone(), log.clone(), active.clone());
            tasks.push(tokio::spawn(async move {
                q2.run("vm-1", 1, async {
                    assert_eq!(active.fetch_add(1, Ordering::SeqCst), 0, "overlap in queue");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    log.lock().unwrap().push(i);
                    active.fetch_sub(1, Ordering::SeqCst);
                    Ok::<(), Error>(())
                })
                .await
            }));
            // Wait until task i is queued, so the queue order is known.
            while q.depth("vm-1").waiting < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(first);
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(*log.lock().unwrap(), vec![0, 1, 2, 3, 4]);
        assert_eq!(q.stats().active_queues, 0, "idle queues are freed");
        assert_eq!(q.stats().completed, 6);
    }

    #[tokio::test]
    async fn parallelism_bounds_concurrency_and_depth_is_observable() {
        let q = Queues::new();
        let (release_tx, _) = tokio::sync::broadcast::channel::<()>(1);
        let peak = Arc::new(AtomicUsize::new(0));
        let now = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..7 {
            let (q, peak, now) = (q.clone(), peak.clone(), now.clone());
            let mut rx = release_tx.subscribe();
            tasks.push(tokio::spawn(async move {
                q.run("host-1", 3, async move {
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(n, Ordering::SeqCst);
                    let _ = rx.recv().await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    Ok::<(), Error>(())
                })
                .await
            }));
        }
        while q.depth("host-1")
            != (QueueDepth {
                running: 3,
                waiting: 4,
            })
        {
            tokio::task::yield_now().await;
        }
        assert_eq!(q.stats().running, 3);
        assert_eq!(q.stats().waiting, 4);
        while q.stats().completed < 7 {
            let _ = release_tx.send(());
            tokio::task::yield_now().await;
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 3);
        assert_eq!(q.depth("host-1"), QueueDepth::default());
    }

    #[tokio::test]
    async fn failing_and_panicking_tasks_release_their_slot() {
        let q = Queues::new();
        let r: Result<(), Error> = q
            .run("vm-2", 1, async { Err(Error::internal("failed")) })
            .await;
        assert!(r.is_err());
        let p = std::panic::AssertUnwindSafe(q.run("vm-2", 1, async {
            panic!("task panicked");
            #[allow(unreachable_code)]
            Ok::<(), Error>(())
        }))
        .catch_unwind()
        .await;
        assert!(p.is_err());
        // The queue is free again.
        assert_eq!(q.run("vm-2", 1, async { Ok::<_, Error>(7) }).await, Ok(7));
        assert_eq!(q.stats().active_queues, 0);
    }

    #[tokio::test]
    async fn a_cancelled_waiter_does_not_leak_the_slot() {
        let q = Queues::new();
        let holder = q.acquire("vm-3", 1).await.unwrap();
        // A waiter that gives up.
        let waiter = q.acquire("vm-3", 1);
        let gave_up = tokio::time::timeout(Duration::from_millis(10), waiter).await;
        assert!(gave_up.is_err());
        assert_eq!(
            q.depth("vm-3"),
            QueueDepth {
                running: 1,
                waiting: 0
            }
        );
        drop(holder);
        assert_eq!(q.stats().active_queues, 0);
        // Cancelled right after the hand-off: the slot is passed on, not lost.
        let holder = q.acquire("vm-3", 1).await.unwrap();
        let q2 = q.clone();
        let mut waiter = Box::pin(async move { q2.acquire("vm-3", 1).await });
        assert!(futures::poll!(waiter.as_mut()).is_pending());
        drop(holder); // hands the slot to the waiter...
        drop(waiter); // ...which is dropped before it looked
        assert_eq!(q.stats().active_queues, 0);
        assert_eq!(q.run("vm-3", 1, async { Ok::<_, Error>(1) }).await, Ok(1));
    }

    /// One signature, one parallelism: asking with another while the queue has a holder is a
    /// bug (a panic in tests; in release an internal error, and the task does not run).
    #[tokio::test]
    #[cfg_attr(
        debug_assertions,
        should_panic(
            expected = "invariant broken: queue vm-5: asked with parallelism 2 while it runs with 1"
        )
    )]
    async fn a_second_parallelism_for_a_held_queue_is_a_broken_invariant() {
        let q = Queues::new();
        let _holder = q.acquire("vm-5", 1).await.unwrap();
        let r: Result<(), Error> = q.run("vm-5", 2, async { unreachable!() }).await;
        assert_eq!(r.unwrap_err().code, crate::ErrorCode::Internal);
    }

    #[tokio::test]
    #[cfg_attr(
        debug_assertions,
        should_panic(expected = "invariant broken: queue vm-6: parallelism 0")
    )]
    async fn parallelism_zero_is_a_broken_invariant() {
        let q = Queues::new();
        let e = q.acquire("vm-6", 0).await.err().expect("refused");
        assert_eq!(e.code, crate::ErrorCode::Internal);
        assert_eq!(q.stats().active_queues, 0, "no queue left behind");
    }
}
