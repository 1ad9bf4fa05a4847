//! `stratus-load`: create VMs through a running node's API and say how fast: each create is
//! submitted as a job (`202`), `--concurrency` at a time, and the run ends when every VM is
//! `Running` or its job failed. Prints the accept latency (submit to `202`) p50/p90/p99, jobs
//! done per second, and the failures by code. Uses the saved login (`stratus login`) or
//! `--server`/`--token`.

use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use stratus_core::client::StratusClient;

#[derive(Debug, Parser)]
#[command(
    name = "stratus-load",
    about = "Create VMs through the API and measure"
)]
pub struct LoadArgs {
    /// VMs to create.
    #[arg(long, default_value_t = 1000)]
    pub vms: usize,
    /// Creates in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    #[arg(long, default_value = "small")]
    pub offering: String,
    #[arg(long, default_value = "tiny")]
    pub image: String,
    #[arg(long, default_value = "net1")]
    pub l3: String,
    /// Names are PREFIX-<i>.
    #[arg(long, default_value = "load")]
    pub prefix: String,
    #[arg(long, env = "STRATUS_URL")]
    pub server: Option<String>,
    #[arg(long, env = "STRATUS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// What a run measured.
#[derive(Debug)]
pub struct LoadReport {
    pub vms: usize,
    pub running: usize,
    pub failed: BTreeMap<String, usize>,
    pub wall: Duration,
    pub accept_ms: [f64; 3],
    pub job_ms: [f64; 3],
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.wall.as_secs_f64();
        writeln!(f, "VMs asked:            {}", self.vms)?;
        writeln!(f, "Running:              {}", self.running)?;
        writeln!(f, "failed:               {:?}", self.failed)?;
        writeln!(f, "wall:                 {secs:.2} s")?;
        writeln!(f, "VMs/s to Running:     {:.1}", self.running as f64 / secs)?;
        let [a50, a90, a99] = self.accept_ms;
        writeln!(f, "accept p50/p90/p99:   {a50:.1} / {a90:.1} / {a99:.1} ms")?;
        let [j50, j90, j99] = self.job_ms;
        write!(f, "job p50/p90/p99:      {j50:.0} / {j90:.0} / {j99:.0} ms")
    }
}

pub async fn run(client: StratusClient, a: &LoadArgs) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(
        a.vms > 0 && a.concurrency > 0,
        "--vms and --concurrency must be positive"
    );
    let find = |kind: &'static str, name: &str| {
        let (c, name) = (client.clone(), name.to_string());
        async move {
            c.resolve(kind, &name)
                .await
                .map_err(|e| anyhow::anyhow!("{kind} {name}: {e}"))
        }
    };
    let offering = find("instance-offerings", &a.offering).await?;
    let image = find("images", &a.image).await?;
    let l3 = find("l3-networks", &a.l3).await?;
    let accept = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let job = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let failed = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..a.concurrency.min(a.vms) {
        let (c, accept, job, failed, next) = (
            client.clone(),
            accept.clone(),
            job.clone(),
            failed.clone(),
            next.clone(),
        );
        let (offering, image, l3, prefix, total) = (offering, image, l3, a.prefix.clone(), a.vms);
        workers.push(tokio::spawn(async move {
            let mut running = 0usize;
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return running;
                }
                let body = json!({"name": format!("{prefix}-{i}"), "instance_offering_uuid": offering,
                                  "image_uuid": image, "l3_network_uuids": [l3]});
                let t0 = Instant::now();
                let sub = c.submit("POST", "/v1/vms", Some(&body)).await;
                let took = t0.elapsed().as_micros() as u64;
                let _ = accept.lock().unwrap_or_else(|e| e.into_inner()).record(took.max(1));
                let outcome = match sub {
                    Ok(s) => c.wait_job(s.job).await.map(drop),
                    Err(e) => Err(e),
                };
                let _ = job
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record((t0.elapsed().as_millis() as u64).max(1));
                match outcome {
                    Ok(()) => running += 1,
                    Err(e) => {
                        *failed
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .entry(e.code.as_str().to_string())
                            .or_default() += 1
                    }
                }
            }
        }));
    }
    let mut running = 0;
    for w in workers {
        running += w.await?;
    }
    let wall = started.elapsed();
    let q = |h: &Histogram<u64>, scale: f64| {
        [0.5, 0.9, 0.99].map(|p| h.value_at_quantile(p) as f64 / scale)
    };
    let accept_ms = q(&accept.lock().unwrap_or_else(|e| e.into_inner()), 1000.0);
    let job_ms = q(&job.lock().unwrap_or_else(|e| e.into_inner()), 1.0);
    let failed = failed.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(LoadReport {
        vms: a.vms,
        running,
        failed,
        wall,
        accept_ms,
        job_ms,
    })
}
