//! Swarm sweeps: many seeds of one scenario template, each drawn ([`crate::draw`]) and run as a
//! plain scenario file in a process of its own (`stratus-scenario`), a few at a time. A failing
//! seed keeps its drawn file and report; failures are grouped by class (the failed check and
//! its first violation, uuids and numbers masked), and the first seed of each class is reduced:
//! fault kinds switched off one at a time, then the datacenter and the workload halved, keeping
//! every change after which the same class still fails.

use crate::draw::draw;
use crate::report::Summary;
use crate::spec::{Phase, Scenario, SpecError};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How one seed ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Passed,
    /// A check failed: its class and the first line of what it found.
    Failed {
        class: String,
        detail: String,
    },
}

/// One run of a drawn scenario file in its own process.
pub struct Runner {
    /// The `stratus-scenario` binary.
    pub exe: PathBuf,
    /// Longest a run may take on the machine's clock before it counts as hung.
    pub timeout: Duration,
}

impl Runner {
    /// Run the scenario file `file`, writing its report and log under `dir`.
    pub fn run(&self, file: &Path, dir: &Path) -> std::io::Result<Verdict> {
        std::fs::create_dir_all(dir)?;
        let log = std::fs::File::create(dir.join("log.txt"))?;
        let mut child = Command::new(&self.exe)
            .arg(file)
            .arg("--reports")
            .arg(dir)
            .arg("--quiet")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if started.elapsed() > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(Verdict::Failed {
                    class: "hung: no end within the time limit".into(),
                    detail: format!("killed after {} s", self.timeout.as_secs()),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        match status.code() {
            Some(0) => Ok(Verdict::Passed),
            Some(1) => Ok(failed_checks(dir)),
            _ => {
                let log = std::fs::read_to_string(dir.join("log.txt")).unwrap_or_default();
                let last = log
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("");
                Ok(Verdict::Failed {
                    class: format!("crashed: {}", mask(first_panic(&log).unwrap_or(last))),
                    detail: format!("{status}: {last}"),
                })
            }
        }
    }
}

/// The failed checks of the report under `dir` (one scenario, one seed).
fn failed_checks(dir: &Path) -> Verdict {
    let Some(summary) = read_summary(dir) else {
        return Verdict::Failed {
            class: "failed without a readable summary.json".into(),
            detail: dir.display().to_string(),
        };
    };
    let mut failed = summary.checks.iter().filter(|c| !c.ok);
    match failed.next() {
        Some(c) => {
            let first = c.detail.lines().next().unwrap_or("").to_string();
            Verdict::Failed {
                class: format!("{}: {}", c.name, mask(&first)),
                detail: first,
            }
        }
        None => Verdict::Failed {
            class: "failed with every check passed".into(),
            detail: dir.display().to_string(),
        },
    }
}

/// The state-sync repairs the run under `dir` counted (none when it left no readable report).
pub fn repairs_of(dir: &Path) -> std::collections::BTreeMap<String, u64> {
    read_summary(dir).map(|s| s.repairs).unwrap_or_default()
}

/// The report a run wrote under `dir`, if it wrote a readable one.
fn read_summary(dir: &Path) -> Option<Summary> {
    let text = std::fs::read_to_string(find_summary(dir)?).ok()?;
    serde_json::from_str(&text).ok()
}

/// `dir/<scenario>/<seed>/summary.json`, the one report a run writes under its own directory.
fn find_summary(dir: &Path) -> Option<PathBuf> {
    let subdirs = |d: &Path| {
        let entries = std::fs::read_dir(d).into_iter().flatten().flatten();
        entries.map(|e| e.path()).filter(|p| p.is_dir())
    };
    for scenario in subdirs(dir) {
        for seed in subdirs(&scenario) {
            let p = seed.join("summary.json");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

fn first_panic(log: &str) -> Option<&str> {
    log.lines().find(|l| l.contains("panicked at"))
}

/// A violation's text with what differs between runs masked: uuids, then numbers.
pub fn mask(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(n) = uuid_len(rest) {
            out.push_str("<uuid>");
            rest = &rest[n..];
        } else if rest.starts_with(|c: char| c.is_ascii_digit()) {
            let n = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            out.push('N');
            rest = &rest[n..];
        } else {
            let c = rest.chars().next().expect("not empty");
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// The length of a hyphenated uuid at the start of `s`.
fn uuid_len(s: &str) -> Option<usize> {
    let candidate = s.get(..36)?;
    uuid::Uuid::parse_str(candidate).ok().map(|_| 36)
}

/// Draw `template` for `seed` and write the drawn file to `path`.
pub fn write_drawn(
    template_file: &str,
    template: &str,
    seed: u64,
    path: &Path,
) -> Result<Scenario, SpecError> {
    let drawn = draw(template_file, template, Some(seed))?;
    std::fs::write(path, &drawn.toml).map_err(|e| SpecError::Parse {
        file: path.display().to_string(),
        message: e.to_string(),
    })?;
    Ok(drawn.scenario)
}

/// One step of a reduction: a smaller scenario, and what was taken away.
pub fn reductions(sc: &Scenario) -> Vec<(String, Scenario)> {
    let mut out = Vec::new();
    let mut probe = sc.clone();
    for (kind, rate) in probe.faults.kinds_mut() {
        if *rate > 0.0 {
            let mut smaller = sc.clone();
            for (k, r) in smaller.faults.kinds_mut() {
                if k == kind {
                    *r = 0.0;
                }
            }
            out.push((format!("without {kind}"), smaller));
        }
    }
    let d = &sc.datacenter;
    let mut halve = |what: &str, f: &dyn Fn(&mut Scenario) -> bool| {
        let mut smaller = sc.clone();
        if f(&mut smaller) {
            out.push((format!("half the {what}"), smaller));
        }
    };
    if d.hosts_per_cluster > 1 {
        halve("hosts per cluster", &|s| {
            s.datacenter.hosts_per_cluster /= 2;
            true
        });
    }
    if d.clusters_per_zone > 1 {
        halve("clusters per zone", &|s| {
            s.datacenter.clusters_per_zone /= 2;
            true
        });
    }
    if d.zones > 1 {
        halve("zones", &|s| {
            s.datacenter.zones /= 2;
            true
        });
    }
    halve("VMs created", &|s| {
        let mut changed = false;
        for p in &mut s.phases {
            if let Phase::CreateVms { count, .. } = p {
                if *count > 1 {
                    *count /= 2;
                    changed = true;
                }
            }
        }
        changed
    });
    halve("churn", &|s| {
        let mut changed = false;
        for p in &mut s.phases {
            if let Phase::Churn { minutes, .. } = p {
                if *minutes > 0.5 {
                    *minutes /= 2.0;
                    changed = true;
                }
            }
        }
        changed
    });
    out
}

/// Reduce the failing scenario `sc` (of class `class`): keep each reduction after which a run
/// still fails with the same class, until none does. Returns the smallest scenario found and
/// the reductions kept, in order.
pub fn reduce(
    runner: &Runner,
    sc: &Scenario,
    class: &str,
    work: &Path,
) -> std::io::Result<(Scenario, Vec<String>)> {
    let mut current = sc.clone();
    let mut kept = Vec::new();
    let mut tries = 0;
    'again: loop {
        for (what, smaller) in reductions(&current) {
            tries += 1;
            let dir = work.join(format!("try-{tries}"));
            std::fs::create_dir_all(&dir)?;
            let file = dir.join("scenario.toml");
            let text = toml::to_string(&smaller).map_err(std::io::Error::other)?;
            std::fs::write(&file, text)?;
            let verdict = runner.run(&file, &dir)?;
            let _ = std::fs::remove_dir_all(&dir);
            if matches!(&verdict, Verdict::Failed { class: c, .. } if c == class) {
                kept.push(what);
                current = smaller;
                continue 'again;
            }
        }
        return Ok((current, kept));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking_keeps_the_words_and_drops_what_varies() {
        let a = "volume 018291df-a815-7003-970b-557c8d834bfe is Ready on host \
                 018291df-9d4e-7000-8a6a-bf1824474320 in the database but not on the host";
        assert_eq!(
            mask(a),
            "volume <uuid> is Ready on host <uuid> in the database but not on the host"
        );
        assert_eq!(mask("used 12 of 10.5 GiB"), "used N of N GiB");
        assert_eq!(mask("no digits here"), "no digits here");
    }

    fn scenario() -> Scenario {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/smoke.toml")).unwrap();
        Scenario::parse("smoke.toml", &text).unwrap()
    }

    #[test]
    fn reductions_switch_each_fault_kind_off_and_halve_the_datacenter() {
        let sc = scenario();
        let on: Vec<&str> = sc
            .clone()
            .faults
            .kinds_mut()
            .into_iter()
            .filter(|(_, r)| **r > 0.0)
            .map(|(k, _)| k)
            .collect();
        assert!(!on.is_empty());
        let steps = reductions(&sc);
        for kind in &on {
            let (_, smaller) = steps
                .iter()
                .find(|(w, _)| *w == format!("without {kind}"))
                .unwrap_or_else(|| panic!("no step switches {kind} off"));
            let mut s = smaller.clone();
            let rates = s.faults.kinds_mut();
            for (k, r) in rates {
                if k == *kind {
                    assert_eq!(*r, 0.0);
                }
            }
        }
        let (_, half) = steps
            .iter()
            .find(|(w, _)| w == "half the hosts per cluster")
            .expect("hosts halved");
        assert_eq!(
            half.datacenter.hosts_per_cluster,
            sc.datacenter.hosts_per_cluster / 2
        );
        // Every reduced scenario is still a valid file.
        for (what, s) in &steps {
            let text = toml::to_string(s).unwrap();
            Scenario::parse(what, &text).unwrap_or_else(|e| panic!("{what}: {e}"));
        }
    }
}
