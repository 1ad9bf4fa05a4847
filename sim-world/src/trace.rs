//! Trace hashes: a run's fingerprint. Two runs from the same seed must give the same hash; the
//! hash goes into every scenario report and is compared by the determinism checks.

use std::sync::{Arc, Mutex};
use stratus_core::hashring::hash64;

#[derive(Debug, Default)]
struct State {
    hash: u64,
    events: u64,
}

/// A shared, order-sensitive hash of events. Cheap to clone.
#[derive(Clone, Default)]
pub struct Trace {
    inner: Arc<Mutex<State>>,
}

impl Trace {
    pub fn new() -> Self {
        Trace::default()
    }

    /// Fold one event (its text and the simulated time it happened at) into the hash.
    pub fn record(&self, at_nanos: u128, event: &str) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut buf = Vec::with_capacity(event.len() + 24);
        buf.extend_from_slice(&s.hash.to_le_bytes());
        buf.extend_from_slice(&at_nanos.to_le_bytes());
        buf.extend_from_slice(event.as_bytes());
        s.hash = hash64(&buf);
        s.events += 1;
    }

    pub fn hash(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).hash
    }

    pub fn events(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_and_time_change_the_hash() {
        let a = Trace::new();
        a.record(1, "x");
        a.record(2, "y");
        let b = Trace::new();
        b.record(1, "x");
        b.record(2, "y");
        assert_eq!(a.hash(), b.hash());
        let c = Trace::new();
        c.record(2, "y");
        c.record(1, "x");
        assert_ne!(a.hash(), c.hash());
        let d = Trace::new();
        d.record(1, "x");
        d.record(3, "y");
        assert_ne!(a.hash(), d.hash());
        assert_eq!(a.events(), 2);
    }
}
