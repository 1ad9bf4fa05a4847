//! `stratus-swarm TEMPLATE --seeds N [--from S] [--jobs J] [--reports DIR]`: run N seeds of a
//! scenario template, each drawn for its seed and run by `stratus-scenario` in a process of its
//! own, J at a time. A failing seed's drawn scenario, report and log go to
//! `DIR/<scenario>/<seed>/`, a line says why, and the first seed of each failure class is
//! reduced (`reduced.toml` beside it). Exit status 0 when every seed passed, 1 when one failed,
//! 2 for bad arguments or a bad template. `ci/swarm` builds and runs it.

use anyhow::{bail, Context};
use clap::Parser;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use stratus_scenario::draw::draw;
use stratus_scenario::spec::Scenario;
use stratus_scenario::swarm::{reduce, repairs_of, write_drawn, Runner, Verdict};

#[derive(Parser)]
#[command(about = "Run many seeds of a scenario template, each drawn for its seed")]
struct Args {
    /// The scenario template: values left open (ranges, choices) are drawn per seed.
    template: PathBuf,
    /// How many seeds to run.
    #[arg(long)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    from: u64,
    /// Runs at once (one process each).
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Where failing seeds' scenarios and reports go.
    #[arg(long, default_value = "reports/swarm")]
    reports: PathBuf,
    /// Longest a seed may run on the machine's clock.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// Do not reduce failing seeds.
    #[arg(long)]
    no_reduce: bool,
}

/// A failed seed.
struct Failure {
    seed: u64,
    scenario: Scenario,
    class: String,
    dir: PathBuf,
}

fn main() {
    let args = Args::parse();
    match sweep(&args) {
        Ok(true) => std::process::exit(0),
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("stratus-swarm: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Run the sweep; whether every seed passed.
fn sweep(args: &Args) -> anyhow::Result<bool> {
    if args.seeds == 0 || args.jobs == 0 {
        bail!("--seeds and --jobs must be at least 1");
    }
    let file = args.template.display().to_string();
    let template = std::fs::read_to_string(&args.template).with_context(|| file.clone())?;
    let first = draw(&file, &template, Some(args.from))?;
    let name = first.scenario.name.clone();
    let exe = std::env::current_exe()?.with_file_name("stratus-scenario");
    if !exe.is_file() {
        bail!("{} is missing (ci/swarm builds it)", exe.display());
    }
    let runner = Arc::new(Runner {
        exe,
        timeout: Duration::from_secs(args.timeout_s),
    });
    let work = std::env::temp_dir().join(format!("stratus-swarm-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let end = args
        .from
        .checked_add(args.seeds)
        .context("seed range overflows")?;
    println!(
        "swarm {name}: seeds {}..{} ({} at a time), drawn from {file}",
        args.from,
        end - 1,
        args.jobs
    );
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(args.from));
    let (tx, rx) = mpsc::channel();
    let mut workers = Vec::new();
    for _ in 0..args.jobs {
        let (next, tx, runner, work) = (next.clone(), tx.clone(), runner.clone(), work.clone());
        let (file, template) = (file.clone(), template.clone());
        workers.push(std::thread::spawn(move || loop {
            let seed = next.fetch_add(1, Ordering::Relaxed);
            if seed >= end {
                return;
            }
            let dir = work.join(seed.to_string());
            let outcome = std::fs::create_dir_all(&dir)
                .map_err(anyhow::Error::from)
                .and_then(|_| {
                    let drawn = write_drawn(&file, &template, seed, &dir.join("drawn.toml"));
                    drawn.with_context(|| format!("seed {seed} draws no valid scenario"))
                })
                .and_then(|sc| {
                    let verdict = runner.run(&dir.join("drawn.toml"), &dir.join("run"))?;
                    Ok((sc, verdict))
                });
            if tx.send((seed, dir, outcome)).is_err() {
                return;
            }
        }));
    }
    drop(tx);
    let mut failures: Vec<Failure> = Vec::new();
    let mut repairs: BTreeMap<String, u64> = BTreeMap::new();
    let mut done = 0u64;
    let mut next_progress = 100;
    for (seed, dir, outcome) in rx {
        done += 1;
        let outcome = outcome?;
        for (k, n) in repairs_of(&dir.join("run")) {
            *repairs.entry(k).or_default() += n;
        }
        match outcome {
            (_, Verdict::Passed) => {
                let _ = std::fs::remove_dir_all(&dir);
            }
            (scenario, Verdict::Failed { class, detail }) => {
                let kept = args.reports.join(&name).join(seed.to_string());
                keep(&dir, &kept)?;
                println!("seed {seed} FAILED: {detail}");
                println!(
                    "  replay: ci/scenario {}",
                    kept.join("scenario.toml").display()
                );
                failures.push(Failure {
                    seed,
                    scenario,
                    class,
                    dir: kept,
                });
            }
        }
        if done == next_progress {
            next_progress += 100;
            let s = started.elapsed().as_secs_f64();
            println!(
                "[{done}/{}] {} failed, {:.1} seeds/s",
                args.seeds,
                failures.len(),
                done as f64 / s
            );
        }
    }
    for w in workers {
        let _ = w.join();
    }
    let wall = started.elapsed().as_secs_f64();
    failures.sort_by_key(|f| f.seed);
    let mut classes: BTreeMap<&str, Vec<&Failure>> = BTreeMap::new();
    for f in &failures {
        classes.entry(&f.class).or_default().push(f);
    }
    if !args.no_reduce {
        for (class, fs) in &classes {
            let f = fs[0];
            let (smallest, kept) = reduce(&runner, &f.scenario, class, &work.join("reduce"))?;
            let path = f.dir.join("reduced.toml");
            std::fs::write(&path, toml::to_string(&smallest)?)?;
            println!(
                "seed {} reduced ({}): {}",
                f.seed,
                if kept.is_empty() {
                    "nothing taken away".into()
                } else {
                    kept.join(", ")
                },
                path.display()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    println!(
        "swarm {name}: {} seeds in {wall:.1} s ({:.2} seeds/s), {} passed, {} failed",
        args.seeds,
        args.seeds as f64 / wall.max(1e-9),
        args.seeds - failures.len() as u64,
        failures.len()
    );
    let total: u64 = repairs.values().sum();
    let by_kind: Vec<String> = repairs.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!(
        "  state-sync repairs: {total} ({})",
        if by_kind.is_empty() {
            "none".into()
        } else {
            by_kind.join(", ")
        }
    );
    for (class, fs) in &classes {
        let seeds: Vec<String> = fs.iter().take(10).map(|f| f.seed.to_string()).collect();
        let more = if fs.len() > 10 { ", …" } else { "" };
        println!(
            "  {:>5} × {class} (seeds {}{more})",
            fs.len(),
            seeds.join(", ")
        );
    }
    Ok(failures.is_empty())
}

/// Keep a failed seed's drawn scenario, report and log in `to`.
fn keep(dir: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    std::fs::copy(dir.join("drawn.toml"), to.join("scenario.toml"))?;
    let run = dir.join("run");
    if let Ok(log) = std::fs::read(run.join("log.txt")) {
        std::fs::write(to.join("log.txt"), log)?;
    }
    // The report: run/<scenario>/<seed>/*.
    for scenario in std::fs::read_dir(&run)?
        .flatten()
        .filter(|e| e.path().is_dir())
    {
        for seed in std::fs::read_dir(scenario.path())?.flatten() {
            for f in std::fs::read_dir(seed.path())?.flatten() {
                if f.file_name() != "scenario.toml" {
                    std::fs::copy(f.path(), to.join(f.file_name()))?;
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
