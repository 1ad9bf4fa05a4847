//! `stratus-kvm-agent`: the agent of a real host (std build only).

#[cfg(not(madsim))]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    use clap::Parser;
    stratus_deploy::kvm_agent::run(stratus_deploy::kvm_agent::KvmAgentArgs::parse()).await
}

#[cfg(madsim)]
fn main() {
    eprintln!("stratus-kvm-agent runs in the std build; build it without --cfg madsim");
    std::process::exit(2);
}
