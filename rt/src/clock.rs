//! The one place Stratus reads the wall clock.
//!
//! Under `cfg(madsim)` the simulator intercepts `clock_gettime`, so [`now_ms`] is simulated and
//! seeded; in the std build it is the real clock. Durations and deadlines use `tokio::time`
//! (through [`crate::deadline`]), which is simulated in the same way.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (simulated and seeded under madsim).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
