//! madsim keeps a record of every task a node spawned until someone asks how many tasks it has;
//! `sweep_task_lists`, which every `World` runs, asks. Live heap bytes are counted by a global
//! allocator of this test binary.
#![cfg(madsim)]

use madsim::runtime::{Handle, Runtime};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Live bytes left behind by 20,000 tasks that ran to completion, with or without the sweep.
fn left_behind(sweep: bool) -> isize {
    let rt = Runtime::with_seed_and_config(1, madsim::Config::default());
    rt.block_on(async move {
        let node = Handle::current().create_node().name("n").build();
        node.spawn(async move {
            if sweep {
                tokio::spawn(stratus_sim_world::world::sweep_task_lists());
            }
            // Let the sweeper (if any) start and settle its own allocations.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let before = LIVE.load(Ordering::Relaxed);
            for _ in 0..20_000 {
                tokio::spawn(async {}).await.unwrap();
            }
            // Past two sweeps.
            let sweep = stratus_sim_world::world::TASK_LIST_SWEEP;
            tokio::time::sleep(2 * sweep + Duration::from_secs(1)).await;
            LIVE.load(Ordering::Relaxed) - before
        })
        .await
        .unwrap()
    })
}

#[test]
fn finished_tasks_leave_nothing_behind_once_swept() {
    let kept = left_behind(false);
    let swept = left_behind(true);
    eprintln!("left behind by 20,000 finished tasks: {kept} bytes unswept, {swept} swept");
    // Without the sweep each finished task leaves its record (well over 100 bytes).
    assert!(
        kept > 20_000 * 100,
        "madsim no longer keeps finished tasks' records ({kept} bytes): the sweep may go"
    );
    // With it, only the list's own capacity stays: a pointer a task, rounded up to a power
    // of two (262,144 bytes here).
    assert!(
        swept <= 20_000 * 16,
        "{swept} bytes left behind by 20,000 finished tasks despite the sweep (without: {kept})"
    );
}
