//! State kept for the madsim runtime running on this thread (the simulation's timer rings, the
//! nodes a partition cut off). A thread runs one runtime at a time, but tests run several one
//! after another: what a runtime that has ended left must not reach the next (its timer entries
//! never fire, its partitions never heal).

use madsim::net::NetSim;
use std::sync::{Arc, Weak};

/// A value and the runtime it belongs to. The `Weak` keeps that runtime's address from being
/// reused while held, so comparing addresses tells the runtimes apart.
pub(crate) struct RuntimeLocal<T> {
    runtime: Weak<NetSim>,
    pub(crate) value: T,
}

impl<T> RuntimeLocal<T> {
    /// Whether this belongs to the runtime running now.
    pub(crate) fn is_current(&self) -> bool {
        std::ptr::eq(self.runtime.as_ptr(), Arc::as_ptr(&NetSim::current()))
    }

    /// The running runtime's value in `slot`, made by `fresh` when the slot is empty or holds
    /// another runtime's.
    pub(crate) fn current(slot: &mut Option<Self>, fresh: impl FnOnce() -> T) -> &mut T {
        if !slot.as_ref().is_some_and(Self::is_current) {
            *slot = Some(RuntimeLocal {
                runtime: Arc::downgrade(&NetSim::current()),
                value: fresh(),
            });
        }
        &mut slot.as_mut().expect("set above").value
    }
}
