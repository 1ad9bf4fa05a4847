//! `stratus`: the management node and its CLI. Neither `stratus serve` nor the CLI is built yet;
//! today the management stack runs inside the simulation (`stratus-scenario`, `stratus-model`).

fn main() {
    eprintln!("stratus: `serve` and the CLI are not built yet; see the README for the simulation");
    std::process::exit(2);
}
