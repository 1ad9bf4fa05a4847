//! What a run records: latency histograms per operation kind (simulated time), ok/failed
//! counts, operations over simulated time, hosts connected over time.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// Width of a bucket of the "operations over time" series.
pub const BUCKET: Duration = Duration::from_secs(10);

pub struct OpStats {
    pub ok: u64,
    pub failed: u64,
    /// Microseconds of simulated time.
    pub latency: Histogram<u64>,
    /// Error code → count.
    pub errors: BTreeMap<String, u64>,
}

impl OpStats {
    fn new() -> Self {
        OpStats {
            ok: 0,
            failed: 0,
            latency: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            errors: BTreeMap::new(),
        }
    }
}

#[derive(Default)]
pub struct Recorder {
    pub ops: BTreeMap<String, OpStats>,
    /// Operations finished per bucket of simulated time since the start.
    pub timeline: Vec<u64>,
    /// (simulated seconds, hosts connected).
    pub hosts_connected: Vec<(f64, u64)>,
}

impl Recorder {
    /// One finished operation: its kind, when it finished (since the start), how long it took
    /// and its error code if it failed.
    pub fn record(&mut self, kind: &str, at: Duration, took: Duration, error: Option<&str>) {
        let s = self
            .ops
            .entry(kind.to_string())
            .or_insert_with(OpStats::new);
        match error {
            None => {
                s.ok += 1;
                s.latency
                    .saturating_record((took.as_micros() as u64).max(1));
            }
            Some(code) => {
                s.failed += 1;
                *s.errors.entry(code.to_string()).or_default() += 1;
            }
        }
        let b = (at.as_secs_f64() / BUCKET.as_secs_f64()) as usize;
        if self.timeline.len() <= b {
            self.timeline.resize(b + 1, 0);
        }
        self.timeline[b] += 1;
    }

    pub fn total(&self) -> (u64, u64) {
        self.ops
            .values()
            .fold((0, 0), |(a, b), s| (a + s.ok, b + s.failed))
    }

    pub fn summaries(&self) -> BTreeMap<String, OpSummary> {
        self.ops
            .iter()
            .map(|(k, s)| {
                let q = |p: f64| s.latency.value_at_quantile(p) as f64 / 1e6;
                (
                    k.clone(),
                    OpSummary {
                        ok: s.ok,
                        failed: s.failed,
                        errors: s.errors.clone(),
                        p50_s: q(0.5),
                        p90_s: q(0.9),
                        p99_s: q(0.99),
                        p999_s: q(0.999),
                        max_s: s.latency.max() as f64 / 1e6,
                        mean_s: s.latency.mean() / 1e6,
                    },
                )
            })
            .collect()
    }
}

/// Latency percentiles of successful operations, in simulated seconds.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct OpSummary {
    pub ok: u64,
    pub failed: u64,
    pub errors: BTreeMap<String, u64>,
    pub p50_s: f64,
    pub p90_s: f64,
    pub p99_s: f64,
    pub p999_s: f64,
    pub max_s: f64,
    pub mean_s: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_counts_and_buckets() {
        let mut r = Recorder::default();
        for i in 1..=100u64 {
            r.record(
                "create_vm",
                Duration::from_secs(i),
                Duration::from_millis(i * 10),
                None,
            );
        }
        r.record(
            "create_vm",
            Duration::from_secs(5),
            Duration::from_secs(1),
            Some("capacity_exhausted"),
        );
        let s = &r.summaries()["create_vm"];
        assert_eq!((s.ok, s.failed), (100, 1));
        assert_eq!(s.errors["capacity_exhausted"], 1);
        assert!((s.p50_s - 0.5).abs() < 0.01, "{}", s.p50_s);
        assert!((s.p99_s - 0.99).abs() < 0.01, "{}", s.p99_s);
        assert!((s.max_s - 1.0).abs() < 0.01);
        assert_eq!(r.timeline.len(), 11);
        assert_eq!(r.timeline.iter().sum::<u64>(), 101);
        assert_eq!(r.total(), (100, 1));
    }
}
