//! `stratus-model`: the model-based sweep from the command line (what `ci/model` runs).
//!
//! ```text
//! stratus-model [--cases N] [--seed S] [--max-ops M] [--planted-bug] [--out FILE] [--quiet]
//! stratus-model --replay FILE
//! ```
//! Exit status: 0 when every case held, 1 when one failed (it is shrunk and written to
//! `--out`), 2 for bad arguments.

#[cfg(madsim)]
fn main() {
    std::process::exit(sim::main());
}

#[cfg(not(madsim))]
fn main() {
    eprintln!(
        "stratus-model runs in the simulation build: use ci/model (RUSTFLAGS=\"--cfg madsim\")"
    );
    std::process::exit(2);
}

#[cfg(madsim)]
mod sim {
    use std::path::PathBuf;
    use stratus_model_tests::runner::run_case_logged;
    use stratus_model_tests::sweep::{sweep, SweepConfig};
    use stratus_model_tests::Case;

    const USAGE: &str = "usage: stratus-model [--cases N] [--seed S] [--max-ops M] [--planted-bug] [--out FILE] [--quiet]\n       stratus-model --replay FILE";

    fn num<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T, String> {
        let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
        v.parse()
            .map_err(|_| format!("{flag}: {v:?} is not a valid number"))
    }

    pub fn main() -> i32 {
        // The stack's logs (e.g. RUST_LOG=stratus_core=debug), as in stratus-scenario: no
        // subscriber at all without it (madsim gives every task a span).
        if std::env::var_os("RUST_LOG").is_some() {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_writer(std::io::stderr)
                .init();
        }
        let mut cfg = SweepConfig {
            verbose: true,
            ..SweepConfig::default()
        };
        let mut replay: Option<PathBuf> = None;
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let r = match a.as_str() {
                "--cases" => num(&a, args.next()).map(|n| cfg.cases = n),
                "--seed" => num(&a, args.next()).map(|n| cfg.seed = n),
                "--max-ops" => num(&a, args.next()).map(|n| cfg.max_ops = n),
                "--planted-bug" => {
                    cfg.planted_bug = true;
                    Ok(())
                }
                "--quiet" => {
                    cfg.verbose = false;
                    Ok(())
                }
                "--out" => args
                    .next()
                    .map(|f| cfg.failure_file = f.into())
                    .ok_or_else(|| "--out needs a file".to_string()),
                "--replay" => args
                    .next()
                    .map(|f| replay = Some(f.into()))
                    .ok_or_else(|| "--replay needs a file".to_string()),
                "-h" | "--help" => {
                    println!("{USAGE}");
                    return 0;
                }
                other => Err(format!("unknown argument {other:?}")),
            };
            if let Err(e) = r {
                eprintln!("stratus-model: {e}\n{USAGE}");
                return 2;
            }
        }
        if cfg.max_ops == 0 || cfg.cases == 0 {
            eprintln!("stratus-model: --cases and --max-ops must be at least 1");
            return 2;
        }
        match replay {
            Some(path) => replay_case(&path),
            None => {
                println!(
                    "model sweep: {} cases of up to {} operations, seed {}{}",
                    cfg.cases,
                    cfg.max_ops,
                    cfg.seed,
                    if cfg.planted_bug {
                        ", planted bug ON"
                    } else {
                        ""
                    }
                );
                let report = sweep(&cfg);
                print!("{}", report.render());
                match report.failure {
                    None => 0,
                    Some(_) => {
                        println!(
                            "the shrunk case is in {}; rerun it with: ci/model --replay {}",
                            cfg.failure_file.display(),
                            cfg.failure_file.display()
                        );
                        1
                    }
                }
            }
        }
    }

    fn replay_case(path: &std::path::Path) -> i32 {
        let case = match Case::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("stratus-model: {e}");
                return 2;
            }
        };
        println!(
            "replaying seed {} ({} operations{})",
            case.seed,
            case.ops.len(),
            if case.planted_bug {
                ", planted bug ON"
            } else {
                ""
            }
        );
        let o = run_case_logged(&case, true);
        println!(
            "{} operations, {:.1} s simulated, trace hash {:016x}",
            o.ops_run,
            o.sim_time.as_secs_f64(),
            o.hash
        );
        match o.violation {
            None => {
                println!("every invariant held");
                0
            }
            Some(v) => {
                println!("FAILED {v}");
                1
            }
        }
    }
}
