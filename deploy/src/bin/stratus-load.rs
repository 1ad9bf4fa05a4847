//! `stratus-load`: create VMs through a node's API and say how fast (std build only).

#[cfg(not(madsim))]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    use clap::Parser;
    use stratus_deploy::cli::Login;
    use stratus_deploy::load::{run, LoadArgs};
    let a = LoadArgs::parse();
    let (url, token) = Login::resolve(a.server.clone(), a.token.clone())?;
    let mut client = stratus_core::client::StratusClient::from_url(&url)?;
    if let Some(t) = token {
        client = client.with_token(&t);
    }
    let report = run(client, &a).await?;
    println!("{report}");
    // A run where VMs failed measured something else than it says: it fails.
    anyhow::ensure!(
        report.running == report.vms,
        "{} of {} VMs did not reach Running",
        report.vms - report.running,
        report.vms
    );
    Ok(())
}

#[cfg(madsim)]
fn main() {
    eprintln!("stratus-load runs in the std build; build it without --cfg madsim");
    std::process::exit(2);
}
