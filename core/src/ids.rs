//! Identifier and randomness source.
//!
//! All randomness in Stratus comes from a seeded `ChaCha8Rng`. Under madsim the seed is drawn from
//! the simulation's own generator (so a run is reproducible from its seed); in the std build from
//! the OS. Never call `thread_rng()` in logic.

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Mutex;
use uuid::Uuid;

/// A seeded source of UUIDs and random numbers, safe to share.
pub struct Ids {
    rng: Mutex<ChaCha8Rng>,
    /// Last (millisecond, sequence) handed out, for monotonic UUIDs.
    last: Mutex<(u64, u16)>,
}

impl Ids {
    /// Seeded from the simulation seed under madsim, from the OS otherwise.
    pub fn new() -> Self {
        Ids::from_seed(madsim::rand::random::<u64>())
    }

    pub fn from_seed(seed: u64) -> Self {
        Ids {
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
            last: Mutex::new((0, 0)),
        }
    }

    /// A time-ordered (version 7) UUID: the clock's milliseconds (simulated under madsim), a
    /// 12-bit sequence that keeps one generator's UUIDs strictly increasing within a
    /// millisecond, then 62 bits from the seeded generator. Ordered keys keep database indexes
    /// append-mostly.
    pub fn uuid(&self) -> Uuid {
        let now = stratus_rt::clock::now_ms().max(0) as u64;
        let (ms, seq) = {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            *last = if now > last.0 {
                (now, 0)
            } else if last.1 < 0x0fff {
                (last.0, last.1 + 1)
            } else {
                (last.0 + 1, 0)
            };
            *last
        };
        let mut bytes = [0u8; 10];
        self.lock().fill_bytes(&mut bytes[2..]);
        // rand_a (12 bits, below the version nibble) carries the sequence.
        bytes[0..2].copy_from_slice(&seq.to_be_bytes());
        uuid::Builder::from_unix_timestamp_millis(ms, &bytes).into_uuid()
    }

    /// 32 bytes for a secret (a token, a salt): from the operating system's generator in the std
    /// build (the seeded one must not make secrets guessable from a seed), from the simulation's
    /// under madsim (so a run repeats).
    pub fn secret(&self) -> [u8; 32] {
        madsim::rand::random::<[u8; 32]>()
    }

    pub fn next_u64(&self) -> u64 {
        self.lock().next_u64()
    }

    /// A float uniformly drawn from `[0, 1)`.
    pub fn unit(&self) -> f64 {
        self.lock().gen::<f64>()
    }

    /// Run `f` with exclusive use of the generator (for many draws at once).
    pub fn with_rng<T>(&self, f: impl FnOnce(&mut ChaCha8Rng) -> T) -> T {
        f(&mut self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ChaCha8Rng> {
        self.rng.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for Ids {
    fn default() -> Self {
        Ids::new()
    }
}

/// A deterministic UUID derived from a name (for singleton rows such as config entries).
pub fn name_uuid(namespace: &str, name: &str) -> Uuid {
    let a = crate::hashring::hash64(namespace.as_bytes());
    let b = crate::hashring::hash64(name.as_bytes());
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&a.to_be_bytes());
    bytes[8..].copy_from_slice(&(b ^ a.rotate_left(17)).to_be_bytes());
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_random_part_different_seed_different_uuids() {
        // The time part follows the clock; the rest follows the seed.
        let tail = |u: Uuid| u.as_bytes()[9..].to_vec();
        let a = Ids::from_seed(7);
        let b = Ids::from_seed(7);
        let c = Ids::from_seed(8);
        let xa: Vec<_> = (0..5).map(|_| tail(a.uuid())).collect();
        let xb: Vec<_> = (0..5).map(|_| tail(b.uuid())).collect();
        let xc: Vec<_> = (0..5).map(|_| tail(c.uuid())).collect();
        assert_eq!(xa, xb);
        assert_ne!(xa, xc);
        let u = a.uuid();
        assert_eq!(u.get_version_num(), 7);
        assert!(
            a.uuid().as_bytes()[..6] >= u.as_bytes()[..6],
            "time-ordered"
        );
    }

    #[test]
    fn name_uuid_is_stable_and_distinct() {
        assert_eq!(name_uuid("config", "a"), name_uuid("config", "a"));
        assert_ne!(name_uuid("config", "a"), name_uuid("config", "b"));
        assert_ne!(name_uuid("config", "a"), name_uuid("other", "a"));
    }
}
