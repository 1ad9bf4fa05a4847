//! `stratus-scenario FILE [--seed S] [--reports DIR] [--quiet]`: run a scenario in the
//! simulated datacenter and write its report. Exit status 0 when every check passed, 1 when one
//! failed, 2 for a bad file or arguments. `ci/scenario` builds and runs it.

// mimalloc: glibc's allocator (malloc, free, consolidation) was a large part of the scale run's
// time in profiles (docs/perf-log.md).
// `--features system-alloc` keeps the system allocator, for heap profilers that hook malloc.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(not(madsim))]
fn main() {
    eprintln!(
        "stratus-scenario runs in the simulation build: use ci/scenario (RUSTFLAGS=\"--cfg madsim\")"
    );
    std::process::exit(2);
}

#[cfg(madsim)]
fn main() {
    std::process::exit(sim::main());
}

// The allocator's tuning (mimalloc only).
#[cfg(all(madsim, not(feature = "system-alloc")))]
mod heap;

#[cfg(madsim)]
mod sim {
    use std::path::PathBuf;
    use stratus_scenario::draw::draw;
    use stratus_scenario::report::{self, Summary};
    use stratus_scenario::run::run;
    use stratus_scenario::wall;

    const USAGE: &str = "usage: stratus-scenario FILE [--seed S] [--reports DIR] [--quiet]\n\
        FILE may leave values open (ranges, choices: see draw.rs); the seed draws them, and the\n\
        drawn scenario is written beside the report as scenario.toml";

    pub fn main() -> i32 {
        #[cfg(not(feature = "system-alloc"))]
        super::heap::tune();
        // Logs of the management stack, off unless RUST_LOG asks (e.g. stratus_core=debug). No
        // subscriber at all without it: madsim gives every task its node's span, and a
        // subscriber that records spans costs time on every poll.
        if std::env::var_os("RUST_LOG").is_some() {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_writer(std::io::stderr)
                .init();
        }
        let mut file: Option<PathBuf> = None;
        let mut seed: Option<u64> = None;
        let mut reports = PathBuf::from("reports");
        let mut quiet = false;
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--seed" => match args.next().and_then(|v| v.parse().ok()) {
                    Some(s) => seed = Some(s),
                    None => {
                        eprintln!("stratus-scenario: --seed needs a number\n{USAGE}");
                        return 2;
                    }
                },
                "--reports" => match args.next() {
                    Some(d) => reports = d.into(),
                    None => {
                        eprintln!("stratus-scenario: --reports needs a directory\n{USAGE}");
                        return 2;
                    }
                },
                "--quiet" => quiet = true,
                "-h" | "--help" => {
                    println!("{USAGE}");
                    return 0;
                }
                f if !f.starts_with('-') && file.is_none() => file = Some(f.into()),
                other => {
                    eprintln!("stratus-scenario: unknown argument {other:?}\n{USAGE}");
                    return 2;
                }
            }
        }
        let Some(file) = file else {
            eprintln!("{USAGE}");
            return 2;
        };
        let drawn = match std::fs::read_to_string(&file) {
            Ok(text) => draw(&file.display().to_string(), &text, seed),
            Err(e) => {
                eprintln!("stratus-scenario: {}: {e}", file.display());
                return 2;
            }
        };
        let drawn = match drawn {
            Ok(d) => d,
            Err(e) => {
                eprintln!("stratus-scenario: {e}");
                return 2;
            }
        };
        let sc = &drawn.scenario;
        if drawn.open && !quiet {
            println!("drawn for seed {}:\n{}", sc.seed, drawn.toml);
        }
        let d = &sc.datacenter;
        println!(
            "scenario {} (seed {}): {} zones × {} clusters × {} hosts, {} phases",
            sc.name,
            sc.seed,
            d.zones,
            d.clusters_per_zone,
            d.hosts_per_cluster,
            sc.phases.len()
        );
        let started = wall::now_s();
        let out = run(sc, quiet);
        let wall_s = wall::now_s() - started;
        let (ok, failed) = out.recorder.total();
        let sim_s = out.sim_time.as_secs_f64();
        let passed = out.checks.iter().all(|c| c.ok);
        let summary = Summary {
            scenario: sc.name.clone(),
            seed: sc.seed,
            hosts: out.hosts,
            vms_at_end: out.vms_at_end,
            operations: out.recorder.summaries(),
            ops_ok: ok,
            ops_failed: failed,
            throughput_per_sim_s: (ok + failed) as f64 / sim_s.max(1e-9),
            faults: out.faults.clone(),
            repairs: out.repairs.clone(),
            checks: out.checks.clone(),
            passed,
            sim_time_s: sim_s,
            wall_time_s: wall_s,
            speed_up: sim_s / wall_s.max(1e-9),
            peak_memory_mib: report::peak_memory_mib(),
            trace_hash: format!("{:016x}", out.trace_hash),
            build_wall_s: out.build_wall_s,
            phases: out.phases.clone(),
        };
        let written = report::write(&reports, &summary, &out.recorder)
            .and_then(|dir| std::fs::write(dir.join("scenario.toml"), &drawn.toml).map(|_| dir));
        let dir = match written {
            Ok(d) => d,
            Err(e) => {
                eprintln!("stratus-scenario: cannot write the report: {e}");
                return 2;
            }
        };
        println!(
            "{}: {} operations ({} failed), {:.1} s simulated in {:.1} s wall ({:.1}×), peak {:.0} MiB, trace {}",
            if passed { "PASSED" } else { "FAILED" },
            ok + failed,
            failed,
            sim_s,
            wall_s,
            summary.speed_up,
            summary.peak_memory_mib,
            summary.trace_hash
        );
        for (k, o) in &summary.operations {
            println!(
                "  {k:<18} ok {:>7} failed {:>5}  p50 {:>7.3}  p99 {:>7.3}  max {:>7.3} s",
                o.ok, o.failed, o.p50_s, o.p99_s, o.max_s
            );
        }
        for c in &summary.checks {
            println!(
                "  check {:<20} {}  {}",
                c.name,
                if c.ok { "ok    " } else { "FAILED" },
                c.detail.lines().next().unwrap_or("")
            );
        }
        println!("report: {}", dir.display());
        if passed {
            0
        } else {
            1
        }
    }
}
