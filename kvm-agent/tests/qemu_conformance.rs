//! The `Hypervisor` conformance suite on the QEMU backend: real QEMU processes, qcow2 volumes
//! and a live migration between two backends on this machine. Needs root, QEMU and the test
//! guest (`ci/guest-image`), named by `STRATUS_TEST_QEMU_IMAGE`; `ci/e2e-kvm` sets it. Without
//! it the test says so and passes, except under CI, where it fails.
#![cfg(not(madsim))]

use std::path::PathBuf;
use stratus_agent_protocol::ImageRef;
use stratus_kvm_agent::conformance::{self, Fixture};
use stratus_kvm_agent::qemu::{Accel, QemuConfig, QemuHypervisor};
use uuid::Uuid;

async fn backend(dir: PathBuf, prefix: &str) -> QemuHypervisor {
    QemuHypervisor::open(QemuConfig {
        state_dir: dir,
        bridge_prefix: prefix.into(),
        qemu: "qemu-system-x86_64".into(),
        qemu_img: "qemu-img".into(),
        dnsmasq: "dnsmasq".into(),
        accel: Some(Accel::Tcg),
        migration_ip: "127.0.0.1".parse().unwrap(),
        token: "conformance".into(),
    })
    .await
    .expect("the QEMU backend opens")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_qemu_hypervisor_passes_the_conformance_suite() {
    let Ok(image) = std::env::var("STRATUS_TEST_QEMU_IMAGE") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "STRATUS_TEST_QEMU_IMAGE is not set under CI: run ci/e2e-kvm"
        );
        eprintln!("SKIPPED: STRATUS_TEST_QEMU_IMAGE is not set (ci/e2e-kvm sets it)");
        return;
    };
    let root =
        std::env::temp_dir().join(format!("stratus-qemu-conformance-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let _cleanup = Cleanup(root.clone());
    let (a, b) = (
        backend(root.join("a"), "qca").await,
        backend(root.join("b"), "qcb").await,
    );
    let fx = Fixture {
        image: ImageRef {
            uuid: Uuid::from_u128(0x1a6e),
            url: format!("file://{image}"),
            size_mib: 16,
            checksum: None,
        },
        ready_marker: Some("GUEST-READY".into()),
        peer_ip: "127.0.0.1".parse().unwrap(),
    };
    conformance::run_all(&a, &b, &fx).await;
}

/// Whatever happens to the test, the QEMUs it started (each in its own process group, so they
/// outlive it) and its state directories go.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let dir = self.0.display().to_string();
        let _ = std::process::Command::new("pkill")
            .args(["-9", "-f", &format!("{dir}/")])
            .status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
