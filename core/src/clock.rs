//! The one place Stratus reads the wall clock.
//!
//! Under `cfg(madsim)` the simulator intercepts `clock_gettime`, so [`now_ms`] is simulated and
//! seeded; in the std build it is the real clock. Durations and deadlines use `tokio::time`, which
//! is simulated in the same way.

/// Milliseconds since the Unix epoch (simulated under madsim). Defined next to the timeouts in
/// `stratus-kvm-agent`, which the agent shares.
pub use stratus_kvm_agent::deadline::now_ms;
