//! The scenario binary's heap: mimalloc's options for a long simulation, and a thread that
//! faults the heap's memory in ahead of the simulation, on the machine's other core.
//!
//! The simulation is one thread, and the first touch of each page of its heap is the kernel's
//! work on that thread: zeroing transparent huge pages is slow on this machine (`ci/memlat`),
//! and shows as system time in the scale runs (docs/perf-log.md). Pages are handed out by
//! mimalloc in 32 MiB segments from its arenas, in address order; the [`prefault`] thread
//! watches which segments it has begun to use and populates the next few before it gets there
//! (`MADV_POPULATE_WRITE`: page tables filled as a write would, contents untouched, so it is
//! safe beside the thread that owns the memory). The simulation reads nothing of it — same
//! seed, same trace.

use std::time::Duration;

/// Set mimalloc's options and start the [`prefault`] thread. Call first thing in `main`, before
/// the simulation starts (madsim refuses system threads inside it).
pub fn tune() {
    set_options();
    start_prefault();
}

/// mimalloc returns freed memory to the OS after a delay measured on the clock, and madsim
/// makes that clock the simulated one, which runs several times faster than wall time:
/// pages were returned and faulted in again, a visible part of the profile. Keep them.
///
/// Every 10,000 allocations that miss its fast path mimalloc also walks every page of the
/// heap to collect free ones; with a heap of several GiB that walk showed in profiles of the
/// 30,000-host run. Walk every 1,000,000 instead (its maximum): the same peak memory, less
/// wall time (docs/perf-log.md).
///
/// The workspace builds mimalloc 2 (libmimalloc-sys's `v2` feature), not its default 3: on a
/// 30,000-host run of 30,000 creates and 2 minutes of churn, run in turns, it took less wall
/// time and less peak memory (docs/perf-log.md).
fn set_options() {
    /// `mi_option_purge_delay` and `mi_option_generic_collect` in mimalloc 2.3's `mi_option_e`
    /// (libmimalloc-sys 0.1.49 does not name them; in mimalloc 3 the second is 34; check the
    /// enum when the crate is upgraded).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    const MI_OPTION_GENERIC_COLLECT: libmimalloc_sys::mi_option_t = 36;
    // SAFETY: sets process-wide allocator options; no allocation is in flight.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        libmimalloc_sys::mi_option_set(MI_OPTION_GENERIC_COLLECT, 1_000_000);
    };
}

/// mimalloc 2's segment: the unit its arenas hand out, aligned to its size.
const SEGMENT: usize = 32 << 20;
/// A transparent huge page. The first of each segment is left for mimalloc to touch (that its
/// first page is resident, `mincore`, is how the thread sees a segment in use), and the thread
/// populates one per call, so a call holds the address-space lock only briefly.
const HUGE_PAGE: usize = 2 << 20;
/// Segments populated past the last one in use (96 MiB). The thread populates far faster than
/// `datacenter-30k`'s heap grows once its hosts are made (that first jump, right after the
/// start, it cannot outrun), so a few segments ahead suffice (docs/perf-log.md). Peak memory
/// reads higher by more than this: a populated segment is resident whole, where mimalloc leaves
/// parts of segments untouched.
const AHEAD: usize = 3;
/// How often the thread looks.
const POLL: Duration = Duration::from_millis(1);

extern "C" {
    /// Start and size of arena `id` (1, 2, ...), or null when there is none (mimalloc.h; the
    /// bindings do not declare it).
    fn mi_arena_area(id: std::ffi::c_int, size: *mut usize) -> *mut std::ffi::c_void;
}

/// `STRATUS_PREFAULT=0` turns the thread off (to measure what it saves); so does a machine with
/// one core, where it would take time from the simulation.
fn start_prefault() {
    if std::env::var_os("STRATUS_PREFAULT").is_some_and(|v| v == "0") {
        return;
    }
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return;
    }
    if let Err(e) = std::thread::Builder::new()
        .name("prefault".into())
        .spawn(prefault)
    {
        eprintln!("stratus-scenario: no prefault thread ({e}); the run goes on without it");
    }
}

/// One arena as the thread sees it.
struct Arena {
    /// First segment boundary in the arena.
    start: usize,
    segments: usize,
    /// Segments `0..used` may be in use (the last one seen in use, plus one).
    used: usize,
    /// Segments `0..populated` have been populated (but for their heads).
    populated: usize,
}

impl Arena {
    /// The address of segment `i`.
    fn segment(&self, i: usize) -> usize {
        self.start + i * SEGMENT
    }

    /// Whether mimalloc has touched segment `i`.
    fn in_use(&self, i: usize) -> bool {
        resident(self.segment(i))
    }

    /// Note the segments mimalloc has begun to use.
    fn observe(&mut self) {
        // A segment beyond a gap may be in use (mimalloc gives a large object several
        // segments, and touches only the first): look as far as populated, and one beyond.
        let look = (self.populated.max(self.used) + 1).min(self.segments);
        for i in self.used..look {
            if self.in_use(i) {
                self.used = i + 1;
            }
        }
    }

    /// Populate up to [`AHEAD`] segments past those in use. False when the kernel cannot
    /// (`MADV_POPULATE_WRITE` came with Linux 5.14; older kernels refuse it as invalid).
    fn populate_ahead(&mut self) -> bool {
        let target = (self.used + AHEAD).min(self.segments);
        while self.populated < target {
            let seg = self.segment(self.populated);
            for off in (HUGE_PAGE..SEGMENT).step_by(HUGE_PAGE) {
                // SAFETY: populating changes no byte of the memory (a page not yet there comes
                // in zeroed, as a first write would find it) and the range is inside the
                // arena's mapping. A range mimalloc has not made writable fails, harmlessly.
                let r = unsafe {
                    libc::madvise(
                        (seg + off) as *mut libc::c_void,
                        HUGE_PAGE,
                        libc::MADV_POPULATE_WRITE,
                    )
                };
                if r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                    return false;
                }
            }
            self.populated += 1;
        }
        true
    }
}

/// Whether the page at `addr` (page-aligned, mapped) is in memory.
fn resident(addr: usize) -> bool {
    let mut v = [0u8; 1];
    // SAFETY: `mincore` only reads the page tables; the callers pass a page-aligned address
    // inside a mapping that is never unmapped (mimalloc's arenas: purging is off), and `v`
    // holds one byte for the one page asked about.
    let r = unsafe { libc::mincore(addr as *mut libc::c_void, 1, v.as_mut_ptr()) };
    r == 0 && v[0] & 1 == 1
}

/// The thread: look at mimalloc's arenas every [`POLL`] until the process ends (it stops at
/// once on a kernel that cannot populate).
fn prefault() {
    let mut arenas: Vec<Arena> = Vec::new();
    loop {
        // Arenas are numbered from 1 and never go away; mimalloc adds one when the others fill.
        loop {
            let mut size = 0usize;
            // SAFETY: reads mimalloc's table of arenas (an atomic load); any id may be asked.
            let p = unsafe { mi_arena_area(arenas.len() as std::ffi::c_int + 1, &mut size) };
            if p.is_null() {
                break;
            }
            let start = (p as usize).next_multiple_of(SEGMENT);
            let end = p as usize + size;
            arenas.push(Arena {
                start,
                segments: end.saturating_sub(start) / SEGMENT,
                used: 0,
                populated: 0,
            });
        }
        for a in &mut arenas {
            a.observe();
        }
        // mimalloc takes segments from the first arena with room and adds an arena when none
        // has, so the last arena is where the heap grows.
        if let Some(a) = arenas.last_mut() {
            if !a.populate_ahead() {
                return;
            }
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_in_use_are_seen_and_the_next_ones_populated_but_for_their_heads() {
        let len = 7 * SEGMENT;
        // SAFETY: a fresh private anonymous mapping, unmapped at the end of the test.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let start = (p as usize).next_multiple_of(SEGMENT);
        let mut a = Arena {
            start,
            segments: 6,
            used: 0,
            populated: 0,
        };
        let seg = |i: usize| start + i * SEGMENT;
        let byte = |addr: usize| addr as *mut u8;

        a.observe();
        assert_eq!(a.used, 0, "nothing touched yet");
        // SAFETY (the writes and reads below): inside the mapping.
        unsafe { byte(seg(0)).write(1) };
        // A byte written before its page is populated keeps its value.
        unsafe { byte(seg(1) + HUGE_PAGE + 100).write(0xAB) };
        a.observe();
        assert_eq!(a.used, 1);
        assert!(a.populate_ahead(), "this kernel populates");
        assert_eq!(a.populated, 1 + AHEAD);
        for i in 1..1 + AHEAD {
            assert!(resident(seg(i) + HUGE_PAGE), "segment {i}'s body populated");
            assert!(
                resident(seg(i) + SEGMENT - 4096),
                "segment {i}'s end populated"
            );
            assert!(!resident(seg(i)), "segment {i}'s head left to its user");
        }
        assert!(
            !resident(seg(1 + AHEAD) + HUGE_PAGE),
            "no further than AHEAD"
        );
        assert_eq!(unsafe { byte(seg(1) + HUGE_PAGE + 100).read() }, 0xAB);
        assert_eq!(unsafe { byte(seg(2) + HUGE_PAGE + 100).read() }, 0);

        // A segment in use past a gap (a large object's first) is seen too, and the
        // populating stops at the arena's end.
        unsafe { byte(seg(3)).write(1) };
        a.observe();
        assert_eq!(a.used, 4);
        assert!(a.populate_ahead());
        assert_eq!(a.populated, 6);
        assert!(resident(seg(5) + HUGE_PAGE));
        assert!(
            !resident(seg(6) + HUGE_PAGE),
            "the mapping past the arena untouched"
        );

        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(p, len) };
    }
}
