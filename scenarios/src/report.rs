//! The report of a run: `summary.json` (machine-readable), `report.md` (for people) and SVG
//! plots, written to `reports/<scenario>/<seed>/`.

use crate::stats::{OpSummary, Recorder, BUCKET};
use crate::svg;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// What one workload phase took.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PhaseFigures {
    pub name: String,
    /// Simulated seconds.
    pub sim_s: f64,
    /// Seconds on the machine's clock.
    pub wall_s: f64,
    /// Operations it ran.
    pub operations: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub scenario: String,
    pub seed: u64,
    pub hosts: usize,
    pub vms_at_end: u64,
    pub operations: BTreeMap<String, OpSummary>,
    pub ops_ok: u64,
    pub ops_failed: u64,
    /// Operations finished per simulated second over the whole run.
    pub throughput_per_sim_s: f64,
    pub faults: BTreeMap<String, u64>,
    /// State sync's corrections by kind: what the faults left behind.
    #[serde(default)]
    pub repairs: BTreeMap<String, u64>,
    pub checks: Vec<Check>,
    pub passed: bool,
    pub sim_time_s: f64,
    pub wall_time_s: f64,
    /// Simulated seconds per wall second.
    pub speed_up: f64,
    pub peak_memory_mib: f64,
    pub trace_hash: String,
    /// Wall seconds spent building the datacenter (hosts added and connected) before the
    /// first phase.
    pub build_wall_s: f64,
    /// The workload phases in order. What is left of the wall time after the build and the
    /// phases went to settling and checking.
    pub phases: Vec<PhaseFigures>,
}

/// Peak resident memory of this process (VmHWM), in MiB; 0 where /proc is missing.
pub fn peak_memory_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

pub fn markdown(s: &Summary) -> String {
    let mut m = format!(
        "# Scenario `{}` (seed {})\n\n**{}** — {} hosts, {} VMs at the end.\n\n\
         | | |\n|---|---|\n\
         | simulated time | {:.1} s |\n| wall time | {:.1} s |\n| speed-up | {:.1}× |\n\
         | peak memory | {:.0} MiB |\n| operations | {} ok, {} failed |\n\
         | throughput | {:.1} ops per simulated second |\n| trace hash | `{}` |\n\n",
        s.scenario,
        s.seed,
        if s.passed { "PASSED" } else { "FAILED" },
        s.hosts,
        s.vms_at_end,
        s.sim_time_s,
        s.wall_time_s,
        s.speed_up,
        s.peak_memory_mib,
        s.ops_ok,
        s.ops_failed,
        s.throughput_per_sim_s,
        s.trace_hash
    );
    m.push_str("## Checks\n\n| check | result | detail |\n|---|---|---|\n");
    for c in &s.checks {
        m.push_str(&format!(
            "| {} | {} | {} |\n",
            c.name,
            if c.ok { "ok" } else { "**FAILED**" },
            c.detail.replace('|', "\\|").replace('\n', "<br>")
        ));
    }
    m.push_str("\n## Phases\n\n| phase | simulated s | wall s | operations |\n|---|---|---|---|\n");
    m.push_str(&format!(
        "| building the datacenter | | {:.1} | |\n",
        s.build_wall_s
    ));
    let mut rest = s.wall_time_s - s.build_wall_s;
    for p in &s.phases {
        m.push_str(&format!(
            "| {} | {:.1} | {:.1} | {} |\n",
            p.name, p.sim_s, p.wall_s, p.operations
        ));
        rest -= p.wall_s;
    }
    m.push_str(&format!(
        "| settling and checks | | {:.1} | |\n",
        rest.max(0.0)
    ));
    m.push_str(
        "\n## Operations (latency in simulated seconds, successful operations)\n\n\
         | operation | ok | failed | p50 | p90 | p99 | p99.9 | max | errors |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for (k, o) in &s.operations {
        let errors: Vec<String> = o.errors.iter().map(|(c, n)| format!("{c}: {n}")).collect();
        m.push_str(&format!(
            "| {k} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} |\n",
            o.ok,
            o.failed,
            o.p50_s,
            o.p90_s,
            o.p99_s,
            o.p999_s,
            o.max_s,
            errors.join(", ")
        ));
    }
    m.push_str("\n## Faults injected\n\n| fault | count |\n|---|---|\n");
    for (k, n) in &s.faults {
        m.push_str(&format!("| {k} | {n} |\n"));
    }
    m.push_str("\n## State-sync repairs\n\n| repair | count |\n|---|---|\n");
    for (k, n) in &s.repairs {
        m.push_str(&format!("| {k} | {n} |\n"));
    }
    m.push_str(
        "\n## Plots\n\n![latency](latency.svg)\n\n![operations over time](operations.svg)\n\n\
         ![hosts connected](hosts.svg)\n",
    );
    m
}

/// Write the report files; returns the directory.
pub fn write(base: &Path, s: &Summary, rec: &Recorder) -> std::io::Result<PathBuf> {
    let dir = base.join(&s.scenario).join(s.seed.to_string());
    std::fs::create_dir_all(&dir)?;
    let json = serde_json::to_string_pretty(s).map_err(std::io::Error::other)?;
    std::fs::write(dir.join("summary.json"), json + "\n")?;
    std::fs::write(dir.join("report.md"), markdown(s))?;
    let groups: Vec<(String, Vec<f64>)> = s
        .operations
        .iter()
        .filter(|(_, o)| o.ok > 0)
        .map(|(k, o)| (k.clone(), vec![o.p50_s, o.p90_s, o.p99_s, o.max_s]))
        .collect();
    std::fs::write(
        dir.join("latency.svg"),
        svg::bars(
            "Latency per operation (simulated)",
            "seconds",
            &["p50", "p90", "p99", "max"],
            &groups,
        ),
    )?;
    let per_s = BUCKET.as_secs_f64();
    let ops: Vec<(f64, f64)> = rec
        .timeline
        .iter()
        .enumerate()
        .map(|(i, n)| (i as f64 * per_s, *n as f64 / per_s))
        .collect();
    std::fs::write(
        dir.join("operations.svg"),
        svg::lines(
            "Operations finished over simulated time",
            "simulated seconds",
            "operations per second",
            &[("operations/s", ops)],
        ),
    )?;
    let hosts: Vec<(f64, f64)> = rec
        .hosts_connected
        .iter()
        .map(|(t, n)| (*t, *n as f64))
        .collect();
    std::fs::write(
        dir.join("hosts.svg"),
        svg::lines(
            "Hosts connected over simulated time",
            "simulated seconds",
            "hosts",
            &[("connected", hosts)],
        ),
    )?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_phase_table_splits_the_wall_time() {
        let phase = |name: &str, sim_s, wall_s, operations| PhaseFigures {
            name: name.into(),
            sim_s,
            wall_s,
            operations,
        };
        let s = Summary {
            scenario: "t".into(),
            seed: 1,
            hosts: 2,
            vms_at_end: 3,
            operations: BTreeMap::new(),
            ops_ok: 4,
            ops_failed: 0,
            throughput_per_sim_s: 1.0,
            faults: BTreeMap::new(),
            repairs: BTreeMap::new(),
            checks: Vec::new(),
            passed: true,
            sim_time_s: 900.0,
            wall_time_s: 100.0,
            speed_up: 9.0,
            peak_memory_mib: 1.0,
            trace_hash: "0".into(),
            build_wall_s: 4.5,
            phases: vec![
                phase("create_vms", 270.0, 26.5, 100),
                phase("churn", 600.0, 66.0, 400),
            ],
        };
        let m = markdown(&s);
        for row in [
            "| building the datacenter | | 4.5 | |",
            "| create_vms | 270.0 | 26.5 | 100 |",
            "| churn | 600.0 | 66.0 | 400 |",
            "| settling and checks | | 3.0 | |",
        ] {
            assert!(m.contains(row), "{row} missing from\n{m}");
        }
        let back: Summary = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
