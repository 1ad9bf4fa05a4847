//! The machine's clock, read from inside the simulation for the report.
//!
//! madsim answers `clock_gettime` from the simulated clock inside the simulation (that is what
//! makes a run repeatable), so `Instant::now()` there is simulated time. How long each phase
//! took in real time is still worth reporting; [`now_s`] reads the kernel's monotonic clock by
//! a system call, which madsim does not intercept. Its readings go to the progress lines and the
//! report only: nothing the simulation decides depends on them, and the trace does not see them.

/// Seconds on the kernel's monotonic clock (0 where the call fails).
pub fn now_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock_gettime` writes one `timespec`, the one passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clock_gettime,
            libc::CLOCK_MONOTONIC,
            &mut ts as *mut libc::timespec,
        )
    };
    if r != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

#[cfg(test)]
mod tests {
    use super::now_s;
    use std::time::Duration;

    /// An hour of simulated sleep is not an hour on the machine's clock: inside the simulation
    /// the clock advances no more than real time does around it (measured outside, where
    /// `Instant` is real), and does not go back.
    #[test]
    fn reads_the_machines_clock_not_the_simulated_one() {
        let outside = std::time::Instant::now();
        let (wall, sim) = madsim::runtime::Runtime::new().block_on(async {
            let (w0, s0) = (now_s(), std::time::Instant::now());
            tokio::time::sleep(Duration::from_secs(3600)).await;
            (now_s() - w0, s0.elapsed())
        });
        let real = outside.elapsed().as_secs_f64();
        assert!(sim >= Duration::from_secs(3600), "{sim:?}");
        assert!(
            wall >= 0.0 && wall <= real,
            "{wall} s inside, {real} s outside"
        );
    }
}
