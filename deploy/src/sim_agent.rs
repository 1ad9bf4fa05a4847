//! `stratus-sim-agent`: N simulated hosts in one process, over real HTTP. Each host is the real
//! agent server (`Agent`) on the simulated hypervisor, its routes under `/h/<i>` of one
//! listener, so host `i` is added to Stratus as `http://LISTEN/h/<i>`. Load tests and demos of
//! the real binary run against it.

use crate::files;
use crate::logging::{self, LogFormat};
use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use stratus_kvm_agent::{Agent, AgentConfig, Faults, NoFaults};
use stratus_sim_world::{
    FaultRates, HostProfile, LatencyProfile, SimFaults, SimHostState, SimHypervisor,
};

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "stratus-sim-agent",
    version,
    about = "Serve simulated hosts to a Stratus management node over HTTP"
)]
pub struct SimAgentArgs {
    /// How many hosts.
    #[arg(long, env = "STRATUS_SIM_HOSTS", default_value_t = 1)]
    pub hosts: usize,
    /// Where to listen; host `i` is `http://LISTEN/h/<i>`.
    #[arg(long, env = "STRATUS_SIM_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// A file holding the hosts' token (created with a random one when missing).
    #[arg(
        long,
        env = "STRATUS_SIM_TOKEN_FILE",
        default_value = "sim-agent-token"
    )]
    pub token_file: PathBuf,
    /// CPU cores of each host.
    #[arg(long, default_value_t = 64)]
    pub cpu: u32,
    /// Memory of each host, MiB.
    #[arg(long, default_value_t = 262_144)]
    pub memory_mib: u64,
    /// Local disk of each host, MiB.
    #[arg(long, default_value_t = 4_194_304)]
    pub disk_mib: u64,
    /// How long commands take: `zero`, or `sim` (the simulation's defaults, e.g. a VM start
    /// 0.3–1.5 s).
    #[arg(long, value_enum, default_value = "sim")]
    pub latency: Latency,
    /// The share of commands that fail before doing anything (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// Seed of latencies and faults.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, env = "STRATUS_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Latency {
    Zero,
    Sim,
}

/// Serve until SIGTERM or SIGINT.
pub async fn run(args: SimAgentArgs) -> anyhow::Result<()> {
    logging::init(args.log_format);
    anyhow::ensure!(
        (1..=100_000).contains(&args.hosts),
        "--hosts must be 1 to 100000"
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.fail_rate),
        "--fail-rate must be 0 to 1"
    );
    let token = files::read_or_create(&args.token_file, files::random_secret)?;
    let profile = HostProfile {
        cpu_cores: args.cpu,
        memory_mib: args.memory_mib,
        disk_mib: args.disk_mib,
    };
    let latency = match args.latency {
        Latency::Zero => LatencyProfile::zero(),
        Latency::Sim => LatencyProfile::default(),
    };
    let faults: Arc<dyn Faults> = if args.fail_rate > 0.0 {
        let f = SimFaults::new(args.seed);
        f.set_rates(FaultRates {
            fail: args.fail_rate,
            ..FaultRates::default()
        });
        Arc::new(f)
    } else {
        Arc::new(NoFaults)
    };
    let mut app = axum::Router::new();
    for i in 0..args.hosts {
        let state = Arc::new(Mutex::new(SimHostState::new(profile)));
        let hv = SimHypervisor::new(state, latency.clone(), args.seed.wrapping_add(i as u64));
        let agent = Agent::new(hv, AgentConfig::new(token.clone()), faults.clone());
        app = app.nest(&format!("/h/{i}"), agent.routes());
    }
    let addr = stratus_rt::http::spawn_server(args.listen, app)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(
        hosts = args.hosts,
        first = %format!("http://{addr}/h/0"),
        last = %format!("http://{addr}/h/{}", args.hosts - 1),
        token_file = %args.token_file.display(),
        "stratus-sim-agent: ready"
    );
    let signal = crate::signal::stop().await?;
    tracing::info!(signal, "stopped");
    Ok(())
}
