//! `stratus`: `stratus serve` runs a management node; every other command drives one.

#[cfg(not(madsim))]
#[tokio::main]
async fn main() {
    use clap::Parser;
    let cli = stratus_deploy::cli::Cli::parse();
    std::process::exit(stratus_deploy::cli::main(cli).await);
}

#[cfg(madsim)]
fn main() {
    eprintln!("stratus runs in the std build; build it without --cfg madsim");
    std::process::exit(2);
}
