//! `stratus`: the management node and its CLI (to come with the services and the API).

fn main() {
    eprintln!("stratus: the management node arrives with the services (issue 3)");
    std::process::exit(2);
}
