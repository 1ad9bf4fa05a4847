//! The conformance suite of the [`Hypervisor`] trait: what every backend must do, the simulated
//! one and QEMU alike, so that the simulation's model of a host stays honest. Each backend's
//! test crate calls [`run_all`] with two fresh hypervisors (a migration needs two hosts) and a
//! [`Fixture`]. Cases panic on a breach.

use crate::Hypervisor;
use std::net::IpAddr;
use std::time::Duration;
use stratus_agent_protocol::*;
use uuid::Uuid;

/// What the suite needs of a backend.
pub struct Fixture {
    /// An image root volumes can be made from.
    pub image: ImageRef,
    /// A text the VM's console shows once the guest is up (QEMU), before the suite asks the
    /// guest for anything (a disk unplug); `None` when the console says nothing to wait for.
    pub ready_marker: Option<String>,
    /// The destination's address for a migration between the two hypervisors.
    pub peer_ip: IpAddr,
}

/// A fresh id (the suite's own: no randomness, so the simulation stays deterministic).
fn id() -> Uuid {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    Uuid::from_u64_pair(0xc0f0_5eed, NEXT.fetch_add(1, Ordering::Relaxed))
}

fn spec(vm: Uuid, root: Uuid) -> VmSpec {
    VmSpec {
        uuid: vm,
        name: format!("conf-{}", &vm.simple().to_string()[24..]),
        cpu: 1,
        memory_mib: 128,
        disks: vec![DiskSpec {
            volume: root,
            device: 0,
            size_mib: 16,
        }],
        nics: vec![],
    }
}

async fn state<H: Hypervisor>(hv: &H, vm: Uuid) -> Option<PowerState> {
    hv.vm_status(vm).await.map(|s| s.state)
}

async fn root<H: Hypervisor>(hv: &H, fx: &Fixture) -> Uuid {
    let v = id();
    let made = hv
        .create_volume(&CreateVolumeCmd {
            volume: v,
            size_mib: 16,
            image: Some(fx.image.clone()),
        })
        .await
        .expect("a root volume from the image");
    assert!(made.size_mib >= 16, "{made:?}");
    v
}

async fn wait_ready<H: Hypervisor>(hv: &H, fx: &Fixture, vm: Uuid) {
    let Some(marker) = &fx.ready_marker else {
        return;
    };
    for _ in 0..600 {
        let c = hv.console(vm, 1 << 16).await.expect("console");
        if c.text.contains(marker.as_str()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("VM {vm} did not show {marker:?} on its console within 60 s");
}

/// Volumes: made once (a second create answers the first's size), listed, deleted once.
pub async fn volumes<H: Hypervisor>(hv: &H, fx: &Fixture) {
    let blank = id();
    let cmd = CreateVolumeCmd {
        volume: blank,
        size_mib: 8,
        image: None,
    };
    let a = hv.create_volume(&cmd).await.expect("a blank volume");
    assert_eq!(a.size_mib, 8);
    assert_eq!(
        hv.create_volume(&cmd).await.expect("again"),
        a,
        "idempotent"
    );
    assert!(hv.volumes().await.contains(&a));
    let huge = CreateVolumeCmd {
        volume: id(),
        size_mib: 1 << 40,
        image: None,
    };
    let e = hv.create_volume(&huge).await.expect_err("no room for it");
    assert_eq!(e.code, AgentErrorCode::InsufficientCapacity, "{e}");
    assert!(
        !hv.volumes().await.iter().any(|v| v.uuid == huge.volume),
        "a refused volume leaves nothing"
    );
    let r = root(hv, fx).await;
    hv.delete_volume(blank).await.expect("delete");
    hv.delete_volume(blank)
        .await
        .expect("an absent volume deletes fine");
    hv.delete_volume(r).await.expect("delete");
    let left: Vec<Uuid> = hv.volumes().await.into_iter().map(|v| v.uuid).collect();
    assert!(!left.contains(&blank) && !left.contains(&r), "{left:?}");
    let facts = hv.facts().await.expect("facts");
    assert!(
        facts.cpu_cores > 0 && facts.memory_mib > 0 && facts.disk_mib > 0,
        "{facts:?}"
    );
    assert!(!facts.hypervisor.is_empty());
}

/// A VM's life: start (twice is once), stop, start, reboot, console, destroy (twice is once).
pub async fn lifecycle<H: Hypervisor>(hv: &H, fx: &Fixture) {
    let vm = id();
    let missing = spec(vm, id());
    let e = hv
        .start_vm(&missing)
        .await
        .expect_err("its disk is not here");
    assert_eq!(e.code, AgentErrorCode::NotFound, "{e}");
    assert_eq!(state(hv, vm).await, None, "a failed start leaves no VM");

    let s = spec(vm, root(hv, fx).await);
    hv.start_vm(&s).await.expect("start");
    assert_eq!(state(hv, vm).await, Some(PowerState::Running));
    assert!(hv.vms().await.iter().any(|v| v.uuid == vm));
    hv.start_vm(&s)
        .await
        .expect("starting a running VM is a no-op");
    assert_eq!(state(hv, vm).await, Some(PowerState::Running));
    hv.console(vm, 4096)
        .await
        .expect("a running VM has a console");
    let e = hv.console(id(), 10).await.expect_err("no such VM");
    assert_eq!(e.code, AgentErrorCode::NotFound);

    hv.stop_vm(vm, Duration::from_secs(1), false)
        .await
        .expect("stop");
    assert_eq!(
        state(hv, vm).await,
        Some(PowerState::Stopped),
        "stopped VMs stay listed"
    );
    let e = hv
        .stop_vm(id(), Duration::ZERO, true)
        .await
        .expect_err("no such VM");
    assert_eq!(e.code, AgentErrorCode::NotFound);
    hv.start_vm(&s).await.expect("start again");
    assert_eq!(state(hv, vm).await, Some(PowerState::Running));
    hv.reboot_vm(vm).await.expect("reboot");
    assert_eq!(state(hv, vm).await, Some(PowerState::Running));

    let e = hv
        .delete_volume(s.disks[0].volume)
        .await
        .expect_err("a VM's disk is not deleted under it");
    assert_eq!(e.code, AgentErrorCode::Failed, "{e}");
    hv.destroy_vm(vm).await.expect("destroy");
    assert_eq!(state(hv, vm).await, None);
    hv.destroy_vm(vm)
        .await
        .expect("destroying an absent VM is fine");
    hv.delete_volume(s.disks[0].volume)
        .await
        .expect("its disk, after");
}

/// A data volume attached to and detached from a running VM.
pub async fn hotplug<H: Hypervisor>(hv: &H, fx: &Fixture) {
    let vm = id();
    let s = spec(vm, root(hv, fx).await);
    hv.start_vm(&s).await.expect("start");
    wait_ready(hv, fx, vm).await;
    let data = id();
    hv.create_volume(&CreateVolumeCmd {
        volume: data,
        size_mib: 8,
        image: None,
    })
    .await
    .expect("a data volume");
    let disk = DiskSpec {
        volume: data,
        device: 1,
        size_mib: 8,
    };
    let e = hv.attach_volume(id(), &disk).await.expect_err("no such VM");
    assert_eq!(e.code, AgentErrorCode::NotFound);
    let absent = DiskSpec {
        volume: id(),
        ..disk.clone()
    };
    let e = hv
        .attach_volume(vm, &absent)
        .await
        .expect_err("no such volume");
    assert_eq!(e.code, AgentErrorCode::NotFound);
    hv.attach_volume(vm, &disk).await.expect("attach");
    hv.attach_volume(vm, &disk)
        .await
        .expect("attaching twice is once");
    assert!(
        hv.delete_volume(data).await.is_err(),
        "attached: not deleted"
    );
    hv.detach_volume(vm, data).await.expect("detach");
    hv.detach_volume(vm, data)
        .await
        .expect("detaching twice is once");
    hv.detach_volume(id(), data)
        .await
        .expect("detaching from an absent VM is fine");
    hv.delete_volume(data).await.expect("detached: deleted");
    hv.destroy_vm(vm).await.expect("destroy");
    hv.delete_volume(s.disks[0].volume).await.expect("delete");
}

/// A running VM and its disks move from `a` to `b`: the destination makes ready (or takes it
/// whole), the source sends it and lets go of it.
pub async fn migration<H: Hypervisor>(a: &H, b: &H, fx: &Fixture) {
    let vm = id();
    let s = spec(vm, root(a, fx).await);
    a.start_vm(&s).await.expect("start");
    wait_ready(a, fx, vm).await;
    let sent = a.vm_spec(vm).await.expect("the spec to send");
    assert_eq!(sent.disks.len(), 1);
    assert!(
        sent.disks[0].size_mib >= 16,
        "disks travel with their sizes"
    );
    let ready = b.receive_vm(&sent).await.expect("receive");
    if ready.migration_port.is_some() {
        assert_eq!(
            b.receive_vm(&sent).await.expect("a repeated receive"),
            ready,
            "a repeated receive answers the same ports"
        );
        a.send_vm(vm, fx.peer_ip, &ready).await.expect("send");
        for _ in 0..100 {
            if state(b, vm).await == Some(PowerState::Running) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    a.release_migrated(vm).await.expect("release");
    a.release_migrated(vm)
        .await
        .expect("releasing twice is once");
    assert_eq!(state(a, vm).await, None, "gone from the source");
    assert_eq!(
        state(b, vm).await,
        Some(PowerState::Running),
        "running at the destination"
    );
    let root = s.disks[0].volume;
    assert!(
        !a.volumes().await.iter().any(|v| v.uuid == root),
        "the disk left the source"
    );
    assert!(
        b.volumes().await.iter().any(|v| v.uuid == root),
        "the disk is at the destination"
    );
    assert_eq!(
        b.receive_vm(&sent).await.expect("a receive after the fact"),
        ReceiveReply::default(),
        "a VM running here already is not received again"
    );
    b.destroy_vm(vm).await.expect("destroy");
    b.delete_volume(root).await.expect("delete");
}

/// Every case, in order, on fresh hypervisors `a` and `b`; each leaves them empty.
pub async fn run_all<H: Hypervisor>(a: &H, b: &H, fx: &Fixture) {
    volumes(a, fx).await;
    lifecycle(a, fx).await;
    hotplug(a, fx).await;
    migration(a, b, fx).await;
    for hv in [a, b] {
        assert!(hv.vms().await.is_empty(), "{:?}", hv.vms().await);
        assert!(hv.volumes().await.is_empty(), "{:?}", hv.volumes().await);
    }
}
