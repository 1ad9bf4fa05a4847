//! `stratus-sim-agent`: simulated hosts over real HTTP (std build only).

#[cfg(not(madsim))]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    use clap::Parser;
    stratus_deploy::sim_agent::run(stratus_deploy::sim_agent::SimAgentArgs::parse()).await
}

#[cfg(madsim)]
fn main() {
    eprintln!("stratus-sim-agent runs in the std build; build it without --cfg madsim");
    std::process::exit(2);
}
