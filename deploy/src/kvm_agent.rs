//! `stratus-kvm-agent`: the agent of a real host. The agent server (`Agent`) on the QEMU
//! backend (`QemuHypervisor`): VMs are QEMU processes, volumes qcow2 files, networks Linux
//! bridges with dnsmasq. Runs as root (it makes bridges and taps). Stopping the agent leaves
//! the VMs running; the next start re-adopts them from `--state-dir`.

use crate::files;
use crate::logging::{self, LogFormat};
use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use stratus_kvm_agent::qemu::{Accel, QemuConfig, QemuHypervisor};
use stratus_kvm_agent::{Agent, AgentConfig, NoFaults};

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "stratus-kvm-agent",
    version,
    about = "Run a Stratus host: VMs in QEMU, volumes in qcow2, networks on Linux bridges"
)]
pub struct KvmAgentArgs {
    /// Where to listen for the management plane (the host is added as `http://ADDR`).
    #[arg(long, env = "STRATUS_AGENT_LISTEN", default_value = "0.0.0.0:7070")]
    pub listen: SocketAddr,
    /// Images, volumes, VM records and network records.
    #[arg(
        long,
        env = "STRATUS_AGENT_STATE_DIR",
        default_value = "/var/lib/stratus-agent"
    )]
    pub state_dir: PathBuf,
    /// A file holding the host's token (created with a random one when missing); give the same
    /// token when adding the host.
    #[arg(
        long,
        env = "STRATUS_AGENT_TOKEN_FILE",
        default_value = "/etc/stratus/agent-token"
    )]
    pub token_file: PathBuf,
    /// Put before every interface name the agent makes or looks up (bridges, taps, the L2's
    /// physical interface), so that two agents on one machine act as two hosts.
    #[arg(long, default_value = "")]
    pub bridge_prefix: String,
    /// How QEMU runs guests: `auto` takes KVM where it runs guests here, else TCG.
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: AccelArg,
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: String,
    #[arg(long, default_value = "qemu-img")]
    pub qemu_img: String,
    #[arg(long, default_value = "dnsmasq")]
    pub dnsmasq: String,
    #[arg(long, env = "STRATUS_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelArg {
    Auto,
    Kvm,
    Tcg,
}

/// Serve until SIGTERM or SIGINT.
pub async fn run(args: KvmAgentArgs) -> anyhow::Result<()> {
    logging::init(args.log_format);
    if let Some(dir) = args
        .token_file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        files::private_dir(dir)?;
    }
    let token = files::read_or_create(&args.token_file, files::random_secret)?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("cannot make {}", args.state_dir.display()))?;
    let state_dir = std::fs::canonicalize(&args.state_dir)
        .with_context(|| format!("cannot open {}", args.state_dir.display()))?;
    let cfg = QemuConfig {
        state_dir,
        bridge_prefix: args.bridge_prefix.clone(),
        qemu: args.qemu.clone(),
        qemu_img: args.qemu_img.clone(),
        dnsmasq: args.dnsmasq.clone(),
        accel: match args.accel {
            AccelArg::Auto => None,
            AccelArg::Kvm => Some(Accel::Kvm),
            AccelArg::Tcg => Some(Accel::Tcg),
        },
        // Migrations come in where the agent listens: the source reaches them at the address
        // the host was added with.
        migration_ip: args.listen.ip(),
        token: token.clone(),
    };
    let hv = QemuHypervisor::open(cfg)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the QEMU backend: {e}"))?;
    let accel = hv.accel();
    let agent = Agent::new(hv, AgentConfig::new(token), Arc::new(NoFaults));
    let addr = agent
        .serve(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(
        url = %format!("http://{addr}"),
        accel = accel.as_str(),
        state_dir = %args.state_dir.display(),
        token_file = %args.token_file.display(),
        "stratus-kvm-agent: ready"
    );
    let signal = crate::signal::stop().await?;
    tracing::info!(signal, "stopped; the VMs keep running");
    Ok(())
}
