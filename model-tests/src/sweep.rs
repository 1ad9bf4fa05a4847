//! Many cases from one seed, through proptest: generation from the reference model, a fresh
//! simulation per case, and shrinking of a failing case to a short sequence that still fails
//! (simulation build only).

use crate::case::Case;
use crate::model::Model;
use crate::runner::{run_case, Outcome};
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};
use proptest_state_machine::ReferenceStateMachine;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct SweepConfig {
    pub cases: u32,
    /// Seeds the generator (and through it every case's madsim seed).
    pub seed: u64,
    pub max_ops: usize,
    pub planted_bug: bool,
    /// Where a failing case is written.
    pub failure_file: PathBuf,
    pub max_shrink_iters: u32,
    /// Print a line per case.
    pub verbose: bool,
}

impl Default for SweepConfig {
    fn default() -> Self {
        SweepConfig {
            cases: 64,
            seed: 1,
            max_ops: 60,
            planted_bug: false,
            failure_file: PathBuf::from("target/model-failure.json"),
            max_shrink_iters: 400,
            verbose: false,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct SweepReport {
    /// Cases run (generated ones and shrinking attempts).
    pub runs: u64,
    pub ops: u64,
    pub by_kind: BTreeMap<String, (u64, u64, u64)>,
    pub faults: BTreeMap<String, u64>,
    pub wall: Duration,
    /// The slowest case: wall time, its seed and its length.
    pub longest: (Duration, u64, usize),
    pub sim_time: Duration,
    /// The shrunk failing case, also written to `failure_file`.
    pub failure: Option<Case>,
}

impl SweepReport {
    fn add(&mut self, o: &Outcome, wall: Duration, seed: u64, len: usize) {
        self.runs += 1;
        self.ops += o.ops_run as u64;
        self.sim_time += o.sim_time;
        for (k, (a, b, c)) in &o.by_kind {
            let e = self.by_kind.entry(k.clone()).or_default();
            e.0 += a;
            e.1 += b;
            e.2 += c;
        }
        for (k, n) in &o.faults {
            *self.faults.entry(k.clone()).or_default() += n;
        }
        if wall > self.longest.0 {
            self.longest = (wall, seed, len);
        }
    }

    /// The human summary `ci/model` prints.
    pub fn render(&self) -> String {
        let secs = self.wall.as_secs_f64().max(1e-9);
        let mut s = format!(
            "{} cases in {:.1} s wall ({:.2} cases/s), {} operations, {:.0} s simulated\n\
             longest case: {:.1} s wall (seed {}, {} operations)\n",
            self.runs,
            secs,
            self.runs as f64 / secs,
            self.ops,
            self.sim_time.as_secs_f64(),
            self.longest.0.as_secs_f64(),
            self.longest.1,
            self.longest.2
        );
        s.push_str("operations (ok / failed / skipped):\n");
        for (k, (a, b, c)) in &self.by_kind {
            s.push_str(&format!("  {k:<24} {a:>6} {b:>6} {c:>6}\n"));
        }
        s.push_str("faults injected:\n");
        for (k, n) in &self.faults {
            s.push_str(&format!("  {k:<32} {n:>6}\n"));
        }
        match &self.failure {
            None => s.push_str("failures: none\n"),
            Some(c) => s.push_str(&format!(
                "FAILURE (seed {}, {} operations): {}\n{}\n",
                c.seed,
                c.ops.len(),
                c.failure.as_deref().unwrap_or(""),
                c.ops
                    .iter()
                    .enumerate()
                    .map(|(i, o)| format!("  {i:>2}. {o}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )),
        }
        s
    }
}

fn rng(seed: u64) -> TestRng {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    bytes[8..16].copy_from_slice(&0x0053_5452_4154_5553_u64.to_le_bytes());
    TestRng::from_seed(RngAlgorithm::ChaCha, &bytes)
}

/// Run `cfg.cases` generated cases; on a failure, shrink it, write it, and report it.
pub fn sweep(cfg: &SweepConfig) -> SweepReport {
    let started = Instant::now();
    let report = RefCell::new(SweepReport::default());
    // The last failing run: its operations and the step it failed after.
    let last_failure: RefCell<Option<(Vec<crate::ops::Op>, usize)>> = RefCell::new(None);
    let config = Config {
        cases: cfg.cases,
        failure_persistence: None,
        max_shrink_iters: cfg.max_shrink_iters,
        // Shrinking stops by iterations, not by the clock, so it is repeatable.
        max_shrink_time: 0,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(config, rng(cfg.seed));
    let strategy = Model::sequential_strategy(1..=cfg.max_ops);
    let result = runner.run(&strategy, |(state, ops, seen)| {
        let case = Case {
            seed: state.seed,
            planted_bug: cfg.planted_bug,
            ops,
            failure: None,
        };
        let t = Instant::now();
        let o = run_case(&case);
        let wall = t.elapsed();
        report.borrow_mut().add(&o, wall, case.seed, case.ops.len());
        if cfg.verbose {
            eprintln!(
                "case seed {:>20}: {:>2} ops, {:>6.1} s sim, {:>5.2} s wall{}",
                case.seed,
                case.ops.len(),
                o.sim_time.as_secs_f64(),
                wall.as_secs_f64(),
                o.violation
                    .as_ref()
                    .map(|v| format!(", FAILED {v}"))
                    .unwrap_or_default()
            );
        }
        if let Some(seen) = seen {
            seen.store(o.ops_run, Ordering::SeqCst);
        }
        match o.violation {
            None => Ok(()),
            Some(v) => {
                *last_failure.borrow_mut() = Some((case.ops.clone(), v.step));
                Err(TestCaseError::fail(v.to_string()))
            }
        }
    });
    let mut report = report.into_inner();
    if let Err(e) = result {
        let (message, mut ops, seed) = match e {
            TestError::Fail(why, (state, ops, _)) => (why.to_string(), ops, state.seed),
            TestError::Abort(why) => (format!("aborted: {why}"), Vec::new(), 0),
        };
        // Operations after the one the violation was found after never ran: the same run
        // without them fails the same way (runs are deterministic).
        if let Some((failed, step)) = last_failure.into_inner() {
            if failed == ops && step + 1 < ops.len() {
                ops.truncate(step + 1);
            }
        }
        let case = Case {
            seed,
            planted_bug: cfg.planted_bug,
            ops,
            failure: Some(message),
        };
        if let Err(e) = case.save(&cfg.failure_file) {
            eprintln!("could not write the failing case: {e}");
        }
        report.failure = Some(case);
    }
    report.wall = started.elapsed();
    report
}
