//! # stratus-scenario
//!
//! The scenario runner (to come): reads a declarative `scenarios/*.toml` (datacenter shape,
//! workload phases, fault profile, seed, checks), runs it against the simulated datacenter, and
//! writes `reports/<scenario>/<seed>/` (summary.json, report.md, SVG plots).

fn main() {
    eprintln!("stratus-scenario: no scenarios yet (issue 5)");
    std::process::exit(2);
}
