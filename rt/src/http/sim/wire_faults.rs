//! Faults of the simulated wire: a request delivered a second time, later (a retransmission, a
//! proxy's retry), or held back so that requests sent after it on other connections arrive
//! first. Requests under a path prefix the caller names are left alone (Stratus spares its
//! API: its clients are people and tools, and their retries are theirs).
//!
//! One setting per process, as the simulation runs one datacenter at a time; the draws come
//! from madsim's seeded generator, and none is made while every rate is 0, so a run without
//! wire faults draws what it drew before they existed.

use bytes::Bytes;
use hyper::Request;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Per request: the chance it is delivered again, and the chance it is held back, each by up to
/// `max_delay`; requests whose path starts with `spare` are left alone.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WireFaults {
    pub duplicate: f64,
    pub reorder: f64,
    pub max_delay: Duration,
    pub spare: Option<&'static str>,
}

static FAULTS: Mutex<WireFaults> = Mutex::new(WireFaults {
    duplicate: 0.0,
    reorder: 0.0,
    max_delay: Duration::ZERO,
    spare: None,
});
static DUPLICATED: AtomicU64 = AtomicU64::new(0);
static HELD: AtomicU64 = AtomicU64::new(0);

/// Set the wire's faults (all zero: none); the counts of [`wire_faults_fired`] start again.
pub fn set_wire_faults(f: WireFaults) {
    assert!(
        (0.0..=1.0).contains(&f.duplicate) && (0.0..=1.0).contains(&f.reorder),
        "wire fault rates are probabilities: {f:?}"
    );
    *FAULTS.lock().unwrap_or_else(|e| e.into_inner()) = f;
    DUPLICATED.store(0, Ordering::Relaxed);
    HELD.store(0, Ordering::Relaxed);
}

/// Requests duplicated and requests held back since the faults were set.
pub fn wire_faults_fired() -> (u64, u64) {
    (
        DUPLICATED.load(Ordering::Relaxed),
        HELD.load(Ordering::Relaxed),
    )
}

/// What the wire does to one request.
pub(super) struct Fate {
    /// Delivered again this long after the original arrives.
    pub copy_after: Option<Duration>,
    /// Held this long before it is delivered.
    pub hold: Duration,
}

pub(super) fn fate(path: &str) -> Fate {
    let f = *FAULTS.lock().unwrap_or_else(|e| e.into_inner());
    let mut fate = Fate {
        copy_after: None,
        hold: Duration::ZERO,
    };
    if (f.duplicate <= 0.0 && f.reorder <= 0.0) || f.spare.is_some_and(|p| path.starts_with(p)) {
        return fate;
    }
    let delay = || f.max_delay.mul_f64(madsim::rand::random::<f64>());
    if madsim::rand::random::<f64>() < f.duplicate {
        fate.copy_after = Some(delay());
        DUPLICATED.fetch_add(1, Ordering::Relaxed);
    }
    if madsim::rand::random::<f64>() < f.reorder {
        fate.hold = delay();
        HELD.fetch_add(1, Ordering::Relaxed);
    }
    fate
}

/// A copy of `req` as it travelled: method, path, headers and body.
pub(super) fn copy(req: &Request<Bytes>) -> Request<Bytes> {
    let mut copy = Request::new(req.body().clone());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.headers_mut() = req.headers().clone();
    copy
}
