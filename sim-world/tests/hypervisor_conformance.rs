//! The `Hypervisor` conformance suite on the simulated backend (runs in both builds). The QEMU
//! backend runs the same suite (`kvm-agent/tests/qemu_conformance.rs`).

use std::sync::{Arc, Mutex};
use stratus_agent_protocol::ImageRef;
use stratus_kvm_agent::conformance::{self, Fixture};
use stratus_sim_world::{HostProfile, LatencyProfile, SimHostState, SimHypervisor};
use uuid::Uuid;

fn host(seed: u64) -> SimHypervisor {
    let profile = HostProfile {
        cpu_cores: 8,
        memory_mib: 16_384,
        disk_mib: 100_000,
    };
    SimHypervisor::new(
        Arc::new(Mutex::new(SimHostState::new(profile))),
        LatencyProfile::zero(),
        seed,
    )
}

#[tokio::test]
async fn the_simulated_hypervisor_passes_the_conformance_suite() {
    let fx = Fixture {
        image: ImageRef {
            uuid: Uuid::from_u128(1),
            url: "file:///images/any.qcow2".into(),
            size_mib: 16,
            checksum: None,
        },
        ready_marker: None,
        peer_ip: "10.0.0.2".parse().unwrap(),
    };
    conformance::run_all(&host(1), &host(2), &fx).await;
}
