//! `stratus-load`: create VMs through a node's API and say how fast (std build only).

#[cfg(not(madsim))]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    use clap::Parser;
    use stratus_deploy::cli::Login;
    use stratus_deploy::load::{run, LoadArgs};
    let a = LoadArgs::parse();
    let saved = Login::load()?;
    let url = a
        .server
        .clone()
        .or_else(|| saved.as_ref().map(|l| l.url.clone()))
        .ok_or_else(|| {
            anyhow::anyhow!("not logged in: run `stratus login URL` or give --server")
        })?;
    let token = a.token.clone().or_else(|| saved.map(|l| l.token));
    let mut client = stratus_core::client::StratusClient::from_url(&url)?;
    if let Some(t) = token {
        client = client.with_token(&t);
    }
    println!("{}", run(client, &a).await?);
    Ok(())
}

#[cfg(madsim)]
fn main() {
    eprintln!("stratus-load runs in the std build; build it without --cfg madsim");
    std::process::exit(2);
}
