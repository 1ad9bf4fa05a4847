//! One direction of a simulated connection once it is open: messages in order, each after a
//! latency drawn as madsim's network draws it, and held back with madsim's backoff while either
//! end's node is cut off — without asking madsim's network about every message. madsim's
//! channels look up both nodes, the destination's address and its sockets in maps of every node
//! for each message (`Network::try_send`); with 30,000 hosts those lookups missed the caches and
//! showed in the run's profiles (docs/perf-log.md).
//!
//! A partition must therefore be made through [`clog_node`] (which clogs the node in madsim too,
//! for new connections) so that open connections see it; madsim's `clog_link`,
//! `clog_node_in`/`clog_node_out` and its latency and loss settings reach new connections only.

use crate::runtime_local::RuntimeLocal;
use madsim::net::NetSim;
use madsim::rand::Rng;
use madsim::task::NodeId;
use madsim::time::Instant;
use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::Duration;

/// madsim's default per-message latency (`net::Config::send_latency`, drawn the same way).
/// Links do not follow `NetSim::update_config` (nothing here changes it).
const LATENCY: std::ops::Range<Duration> = Duration::from_millis(1)..Duration::from_millis(10);
/// madsim's backoff while a link is clogged: from 1 ms, doubling, at most 10 s.
const FIRST_BACKOFF: Duration = Duration::from_millis(1);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

thread_local! {
    /// The nodes cut off, for the runtime running on this thread.
    static CLOGGED: RefCell<Option<RuntimeLocal<HashSet<NodeId>>>> = const { RefCell::new(None) };
}

/// Cut `node` off the network: madsim refuses new connections to and from it, and messages on
/// open connections wait until [`unclog_node`].
pub fn clog_node(node: NodeId) {
    NetSim::current().clog_node(node);
    CLOGGED.with(|c| RuntimeLocal::current(&mut c.borrow_mut(), HashSet::new).insert(node));
}

/// Undo [`clog_node`].
pub fn unclog_node(node: NodeId) {
    NetSim::current().unclog_node(node);
    CLOGGED.with(|c| RuntimeLocal::current(&mut c.borrow_mut(), HashSet::new).remove(&node));
}

fn clogged(a: NodeId, b: NodeId) -> bool {
    CLOGGED.with(|c| {
        // Nothing is cut off nearly all the time: no lookup of the runtime then.
        c.borrow()
            .as_ref()
            .is_some_and(|r| (r.value.contains(&a) || r.value.contains(&b)) && r.is_current())
    })
}

/// When a message sent now between `a` and `b` arrives, or `None` while the link is clogged.
fn arrival(a: NodeId, b: NodeId) -> Option<Instant> {
    if clogged(a, b) {
        return None;
    }
    Some(Instant::now() + madsim::rand::thread_rng().gen_range(LATENCY))
}

struct State<T> {
    /// Messages not yet received, each with its arrival (`None`: sent while clogged). Only
    /// the first is ever taken, once it has arrived: none overtakes the one before it.
    queue: VecDeque<(Option<Instant>, T)>,
    receiver: Option<Waker>,
    /// A sender waiting in [`Tx::closed`].
    sender: Option<Waker>,
    tx_gone: bool,
    rx_gone: bool,
}

struct Shared<T> {
    from: NodeId,
    to: NodeId,
    state: Mutex<State<T>>,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sending end.
pub(super) struct Tx<T>(Arc<Shared<T>>);
/// The receiving end.
pub(super) struct Rx<T>(Arc<Shared<T>>);

/// A link from node `from` to node `to`.
pub(super) fn link<T>(from: NodeId, to: NodeId) -> (Tx<T>, Rx<T>) {
    let shared = Arc::new(Shared {
        from,
        to,
        state: Mutex::new(State {
            queue: VecDeque::new(),
            receiver: None,
            sender: None,
            tx_gone: false,
            rx_gone: false,
        }),
    });
    (Tx(shared.clone()), Rx(shared))
}

impl<T> Tx<T> {
    /// Send `msg`; gives it back when the receiver is gone.
    pub(super) fn send(&self, msg: T) -> Result<(), T> {
        let at = arrival(self.0.from, self.0.to);
        let waiting = {
            let mut s = self.0.lock();
            if s.rx_gone {
                return Err(msg);
            }
            s.queue.push_back((at, msg));
            s.receiver.take()
        };
        if let Some(w) = waiting {
            w.wake();
        }
        Ok(())
    }

    pub(super) fn is_closed(&self) -> bool {
        self.0.lock().rx_gone
    }

    /// Resolves when the receiver is gone.
    pub(super) async fn closed(&self) {
        poll_fn(|cx| {
            let mut s = self.0.lock();
            if s.rx_gone {
                Poll::Ready(())
            } else {
                s.sender = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

impl<T> Drop for Tx<T> {
    fn drop(&mut self) {
        let waiting = {
            let mut s = self.0.lock();
            s.tx_gone = true;
            s.receiver.take()
        };
        if let Some(w) = waiting {
            w.wake();
        }
    }
}

enum Next<T> {
    Message(T),
    Closed,
    Until(Instant),
    Clogged,
    Empty,
}

impl<T> Rx<T> {
    /// The next message once it has arrived; `None` when the sender is gone and nothing is left.
    pub(super) async fn recv(&mut self) -> Option<T> {
        let mut backoff = FIRST_BACKOFF;
        loop {
            match self.next() {
                Next::Message(m) => return Some(m),
                Next::Closed => return None,
                Next::Until(t) => madsim::time::sleep_until(t).await,
                Next::Clogged => {
                    madsim::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    if let Some(t) = arrival(self.0.from, self.0.to) {
                        if let Some(front) = self.0.lock().queue.front_mut() {
                            front.0 = Some(t);
                        }
                    }
                }
                Next::Empty => {
                    poll_fn(|cx| {
                        let mut s = self.0.lock();
                        if s.queue.is_empty() && !s.tx_gone {
                            s.receiver = Some(cx.waker().clone());
                            Poll::Pending
                        } else {
                            Poll::Ready(())
                        }
                    })
                    .await
                }
            }
        }
    }

    fn next(&self) -> Next<T> {
        let mut s = self.0.lock();
        match s.queue.front() {
            Some((Some(t), _)) if *t > Instant::now() => Next::Until(*t),
            Some((None, _)) => Next::Clogged,
            Some(_) => Next::Message(s.queue.pop_front().expect("a front").1),
            None if s.tx_gone => Next::Closed,
            None => Next::Empty,
        }
    }
}

impl<T> Drop for Rx<T> {
    fn drop(&mut self) {
        // What was not received is dropped, and the sender woken, after the lock is let go.
        let (unread, waiting) = {
            let mut s = self.0.lock();
            s.rx_gone = true;
            (std::mem::take(&mut s.queue), s.sender.take())
        };
        drop(unread);
        if let Some(w) = waiting {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use madsim::runtime::{Handle, Runtime};

    fn other_node() -> NodeId {
        Handle::current().create_node().build().id()
    }

    /// Whether `d` is one latency: madsim's clock also moves 50–100 ns at each poll.
    fn one_latency(d: Duration) -> bool {
        d >= LATENCY.start && d < LATENCY.end + Duration::from_millis(1)
    }

    #[madsim::test]
    async fn messages_arrive_in_order_each_after_a_latency() {
        let here = madsim::plugin::node();
        let (tx, mut rx) = link::<u32>(here, other_node());
        let t0 = Instant::now();
        for i in 0..20 {
            tx.send(i).unwrap();
        }
        for i in 0..20 {
            assert_eq!(rx.recv().await, Some(i));
            let took = Instant::now() - t0;
            assert!(one_latency(took), "message {i} after {took:?}");
        }
    }

    /// A message sent while node `cut` of the link is cut off arrives only after it heals.
    async fn held_while(cut: impl Fn(NodeId, NodeId) -> NodeId) {
        let (from, to) = (other_node(), other_node());
        let (tx, mut rx) = link::<&str>(from, to);
        let cut = cut(from, to);
        clog_node(cut);
        let t0 = Instant::now();
        tx.send("held").unwrap();
        madsim::task::spawn(async move {
            madsim::time::sleep(Duration::from_secs(5)).await;
            unclog_node(cut);
        });
        assert_eq!(rx.recv().await, Some("held"));
        let waited = Instant::now() - t0;
        assert!(waited >= Duration::from_secs(5), "arrived after {waited:?}");
        // The backoff doubles from 1 ms: the first look after 5 s is at 8.191 s.
        assert!(waited < Duration::from_secs(9), "arrived after {waited:?}");
        // Healed: the next one takes a latency only.
        let t1 = Instant::now();
        tx.send("free").unwrap();
        assert_eq!(rx.recv().await, Some("free"));
        assert!(one_latency(Instant::now() - t1));
    }

    #[madsim::test]
    async fn messages_wait_while_the_receiving_node_is_cut_off_and_arrive_after() {
        held_while(|_, to| to).await;
    }

    #[madsim::test]
    async fn messages_wait_while_the_sending_node_is_cut_off_and_arrive_after() {
        held_while(|from, _| from).await;
    }

    #[madsim::test]
    async fn a_message_on_its_way_when_a_node_is_cut_off_still_arrives() {
        let (from, to) = (other_node(), other_node());
        let (tx, mut rx) = link::<u32>(from, to);
        let t0 = Instant::now();
        tx.send(1).unwrap();
        clog_node(to);
        assert_eq!(rx.recv().await, Some(1));
        assert!(one_latency(Instant::now() - t0));
    }

    #[madsim::test]
    async fn a_waiting_receiver_is_woken_by_a_send_and_by_its_sender_leaving() {
        let here = madsim::plugin::node();
        let (tx, mut rx) = link::<u32>(here, other_node());
        let t0 = Instant::now();
        madsim::task::spawn(async move {
            madsim::time::sleep(Duration::from_secs(1)).await;
            tx.send(5).unwrap();
            madsim::time::sleep(Duration::from_secs(1)).await;
            drop(tx);
        });
        assert_eq!(rx.recv().await, Some(5));
        assert!(Instant::now() - t0 >= Duration::from_secs(1));
        assert_eq!(rx.recv().await, None);
        assert!(Instant::now() - t0 >= Duration::from_secs(2));
    }

    #[madsim::test]
    async fn a_waiting_sender_learns_when_its_receiver_leaves() {
        let here = madsim::plugin::node();
        let (tx, rx) = link::<u32>(here, other_node());
        let t0 = Instant::now();
        madsim::task::spawn(async move {
            madsim::time::sleep(Duration::from_secs(1)).await;
            drop(rx);
        });
        tx.closed().await;
        assert!(Instant::now() - t0 >= Duration::from_secs(1));
        assert!(tx.is_closed());
    }

    /// A node that dies drops its tasks, and with them their ends of the links: the peer sees
    /// the link closed, as it sees a madsim connection closed.
    #[madsim::test]
    async fn a_killed_node_closes_the_links_its_tasks_held() {
        let node = Handle::current().create_node().build();
        let (tx, mut rx) = link::<u32>(madsim::plugin::node(), node.id());
        node.spawn(async move { while rx.recv().await.is_some() {} });
        tx.send(1).unwrap();
        madsim::time::sleep(Duration::from_secs(1)).await;
        assert!(!tx.is_closed());
        Handle::current().kill(node.id());
        madsim::time::timeout(Duration::from_secs(10), tx.closed())
            .await
            .expect("the killed node's end of the link was dropped");
        assert_eq!(tx.send(2), Err(2));
    }

    #[madsim::test]
    async fn a_gone_receiver_closes_the_link_for_its_sender() {
        let here = madsim::plugin::node();
        let (tx, rx) = link::<u32>(here, other_node());
        assert!(!tx.is_closed());
        tx.send(1).unwrap();
        drop(rx);
        assert!(tx.is_closed());
        assert_eq!(tx.send(2), Err(2));
        // Resolves at once: a hang here fails the test by madsim's deadlock detection.
        tx.closed().await;
    }

    #[madsim::test]
    async fn a_gone_sender_ends_the_link_after_what_it_sent() {
        let here = madsim::plugin::node();
        let (tx, mut rx) = link::<u32>(here, other_node());
        tx.send(7).unwrap();
        drop(tx);
        assert_eq!(rx.recv().await, Some(7));
        assert_eq!(rx.recv().await, None);
    }

    /// A runtime that ends with a node cut off does not leave it cut off for the next one on
    /// the same thread (which numbers its nodes alike).
    #[test]
    fn a_cut_off_node_of_an_ended_runtime_is_not_cut_off_in_the_next() {
        let first = Runtime::new().block_on(async {
            let n = other_node();
            clog_node(n);
            assert!(clogged(n, n));
            n
        });
        Runtime::new().block_on(async move {
            let n = other_node();
            assert_eq!(n, first);
            assert!(!clogged(n, n));
            let (tx, mut rx) = link::<u32>(madsim::plugin::node(), n);
            tx.send(1).unwrap();
            assert_eq!(rx.recv().await, Some(1));
        });
    }
}
