//! Agent-level faults, shared by every simulated host: fail or slow the next N commands of a
//! kind, drop or duplicate callbacks, and random rates of each drawn from the seed.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;
use stratus_agent_protocol::CommandKind;
use stratus_kvm_agent::{CallbackFate, CommandFault, Faults};

/// Random fault rates (per command), for scenarios.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FaultRates {
    /// Commands that fail before doing anything.
    #[serde(default)]
    pub fail: f64,
    /// Commands that do their work, then report failure.
    #[serde(default)]
    pub fail_after: f64,
    /// Commands that take `slow_ms` longer.
    #[serde(default)]
    pub slow: f64,
    #[serde(default)]
    pub slow_ms: u64,
    #[serde(default)]
    pub drop_callback: f64,
    #[serde(default)]
    pub duplicate_callback: f64,
}

#[derive(Default)]
struct State {
    fail_next: BTreeMap<CommandKind, u32>,
    fail_after_next: BTreeMap<CommandKind, u32>,
    slow_next: BTreeMap<CommandKind, (u32, Duration)>,
    drop_next: BTreeMap<CommandKind, u32>,
    dup_next: BTreeMap<CommandKind, u32>,
    rates: FaultRates,
    /// Faults that fired, by name.
    fired: BTreeMap<String, u64>,
}

/// The fault plan of a simulated datacenter's agents.
pub struct SimFaults {
    state: Mutex<State>,
    rng: Mutex<ChaCha8Rng>,
}

fn take(map: &mut BTreeMap<CommandKind, u32>, kind: CommandKind) -> bool {
    match map.get_mut(&kind) {
        Some(n) if *n > 0 => {
            *n -= 1;
            true
        }
        _ => false,
    }
}

impl SimFaults {
    pub fn new(seed: u64) -> Self {
        SimFaults {
            state: Mutex::new(State::default()),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn roll(&self, p: f64) -> bool {
        p > 0.0
            && self
                .rng
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .gen_bool(p.min(1.0))
    }

    /// The next `n` commands of `kind` fail without running.
    pub fn fail_next(&self, kind: CommandKind, n: u32) {
        *self.lock().fail_next.entry(kind).or_default() += n;
    }

    /// The next `n` commands of `kind` run, then report failure.
    pub fn fail_after_next(&self, kind: CommandKind, n: u32) {
        *self.lock().fail_after_next.entry(kind).or_default() += n;
    }

    pub fn slow_next(&self, kind: CommandKind, n: u32, by: Duration) {
        self.lock().slow_next.insert(kind, (n, by));
    }

    /// The results of the next `n` commands of `kind` are never delivered.
    pub fn drop_callbacks(&self, kind: CommandKind, n: u32) {
        *self.lock().drop_next.entry(kind).or_default() += n;
    }

    pub fn duplicate_callbacks(&self, kind: CommandKind, n: u32) {
        *self.lock().dup_next.entry(kind).or_default() += n;
    }

    pub fn set_rates(&self, rates: FaultRates) {
        self.lock().rates = rates;
    }

    /// Forget every armed fault (rates included).
    pub fn clear(&self) {
        let fired = std::mem::take(&mut self.lock().fired);
        *self.lock() = State {
            fired,
            ..State::default()
        };
    }

    /// Faults that fired so far, by name.
    pub fn fired(&self) -> BTreeMap<String, u64> {
        self.lock().fired.clone()
    }

    fn note(&self, s: &mut State, what: &str, kind: CommandKind) {
        *s.fired
            .entry(format!("{what}:{}", kind.as_str()))
            .or_default() += 1;
    }
}

impl Faults for SimFaults {
    fn command(&self, kind: CommandKind) -> CommandFault {
        let mut f = CommandFault::default();
        let rates = self.lock().rates.clone();
        let random_fail = self.roll(rates.fail);
        let random_fail_after = self.roll(rates.fail_after);
        let random_slow = self.roll(rates.slow);
        let mut s = self.lock();
        if take(&mut s.fail_next, kind) || random_fail {
            f.fail_before = true;
            self.note(&mut s, "agent_fail", kind);
        } else if take(&mut s.fail_after_next, kind) || random_fail_after {
            f.fail_after = true;
            self.note(&mut s, "agent_fail_after", kind);
        }
        if let Some((n, by)) = s.slow_next.get_mut(&kind) {
            if *n > 0 {
                *n -= 1;
                f.delay = *by;
            }
        }
        if f.delay.is_zero() && random_slow {
            f.delay = Duration::from_millis(rates.slow_ms);
        }
        if !f.delay.is_zero() {
            self.note(&mut s, "agent_slow", kind);
        }
        f
    }

    fn callback(&self, kind: CommandKind) -> CallbackFate {
        let rates = self.lock().rates.clone();
        let random_drop = self.roll(rates.drop_callback);
        let random_dup = self.roll(rates.duplicate_callback);
        let mut s = self.lock();
        if take(&mut s.drop_next, kind) || random_drop {
            self.note(&mut s, "callback_lost", kind);
            CallbackFate::Drop
        } else if take(&mut s.dup_next, kind) || random_dup {
            self.note(&mut s, "callback_duplicated", kind);
            CallbackFate::Duplicate
        } else {
            CallbackFate::Deliver
        }
    }
}
