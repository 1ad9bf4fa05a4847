//! Inject a failure at exactly one step of each VM workflow — before the step runs, and after
//! it ran — and show complete rollback: host capacity, IPs, NICs, volumes, primary-storage
//! space and the VM row as before, no orphan VM or volume on a host. Steps past an operation's
//! point of no return are retried instead, so there the operation completes. The steps come
//! from the chains themselves (`chain_catalogue`): a step added to a chain is covered without
//! editing these tests. Agent failures (before and after the host did the work) are injected
//! the same way.
#![cfg(madsim)]

use serde_json::{json, Value};
use std::future::Future;
use std::time::Duration;
use stratus_agent_protocol::CommandKind;
use stratus_core::error::Error;
use stratus_core::flow::{FaultWhen, FlowInfo};
use stratus_core::services::vm::chain_catalogue;
use stratus_sim_world::invariants::{census, settled_and_sound};
use stratus_sim_world::{World, WorldSpec};
use uuid::Uuid;

fn uuid(v: &Value) -> Uuid {
    Uuid::parse_str(v["uuid"].as_str().expect("uuid")).unwrap()
}

enum Fault {
    Flow(&'static str, &'static str, FaultWhen),
    AgentBefore(CommandKind),
    AgentAfter(CommandKind),
}

impl Fault {
    fn arm(&self, w: &World) {
        match self {
            Fault::Flow(chain, flow, when) => w.flow_faults.arm(chain, flow, *when, 1),
            Fault::AgentBefore(k) => w.faults.fail_next(*k, 1),
            Fault::AgentAfter(k) => w.faults.fail_after_next(*k, 1),
        }
    }
    fn label(&self) -> String {
        match self {
            Fault::Flow(c, f, w) => format!("{c}/{f} ({w:?})"),
            Fault::AgentBefore(k) => format!("agent {} fails", k.as_str()),
            Fault::AgentAfter(k) => format!("agent {} fails after doing it", k.as_str()),
        }
    }
}

/// The steps of `chain`, as the chain itself declares them.
fn steps(chain: &str) -> Vec<FlowInfo> {
    let all = chain_catalogue();
    let found = all.into_iter().find(|(c, _)| *c == chain);
    found.unwrap_or_else(|| panic!("no chain {chain}")).1
}

/// A fault before and one after each step of `chain` that rolls back (`forward` false), or
/// each step past the point of no return, which is retried instead (`forward` true).
fn faults(chain: &'static str, forward: bool) -> Vec<Fault> {
    steps(chain)
        .into_iter()
        .filter(|f| f.forward_only == forward)
        .flat_map(|f| {
            [
                Fault::Flow(chain, f.name, FaultWhen::Before),
                Fault::Flow(chain, f.name, FaultWhen::After),
            ]
        })
        .collect()
}

async fn settle_and_check(w: &World, what: &str) {
    settled_and_sound(w, Duration::from_secs(300))
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
}

/// Arm `fault`, run `op`; a failed op must leave the census as it was.
async fn case<F, Fut>(w: &World, fault: &Fault, op: F) -> Result<Value, Error>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Value, Error>>,
{
    let before = census(w).await.unwrap();
    let fired_before = w.flow_faults.fired() + w.faults.fired().values().sum::<u64>();
    fault.arm(w);
    let out = op().await;
    settle_and_check(w, &fault.label()).await;
    let fired = w.flow_faults.fired() + w.faults.fired().values().sum::<u64>() - fired_before;
    assert_eq!(fired, 1, "{}: the fault did not fire", fault.label());
    if out.is_err() {
        assert_eq!(
            census(w).await.unwrap(),
            before,
            "{}: not rolled back completely",
            fault.label()
        );
    }
    w.flow_faults.clear();
    w.faults.clear();
    out
}

fn spec(seed: u64) -> WorldSpec {
    WorldSpec {
        seed,
        hosts_per_cluster: 3,
        ..Default::default()
    }
}

#[test]
fn create_rolls_back_completely_at_every_step() {
    World::run(spec(21), |w| async move {
        assert!(
            faults("vm.create", true).is_empty(),
            "cover create's forward steps"
        );
        let mut cases = faults("vm.create", false);
        cases.push(Fault::AgentBefore(CommandKind::VolumeCreate));
        cases.push(Fault::AgentAfter(CommandKind::VolumeCreate));
        cases.push(Fault::AgentBefore(CommandKind::VmStart));
        cases.push(Fault::AgentAfter(CommandKind::VmStart));
        for (i, f) in cases.iter().enumerate() {
            let body = {
                let mut b = w.vm_request(&format!("vm-{i}"), "small");
                b["data_disk_offering_uuids"] = json!([w.dc.disk_offering]);
                b
            };
            let out = case(&w, f, || w.client.create("vms", body)).await;
            let e = out.expect_err(&format!("{}: create should fail", f.label()));
            assert!(
                e.message.contains("fault injected") || e.message.contains("failed"),
                "{}: {e}",
                f.label()
            );
        }
        // And with nothing armed it works.
        let ok = w.create_vm("after", "small").await.unwrap();
        assert_eq!(ok["state"], "Running");
        settle_and_check(&w, "final").await;
    });
}

#[test]
fn start_rolls_back_completely_at_every_step() {
    World::run(spec(22), |w| async move {
        let vm = uuid(&w.create_vm("vm", "small").await.unwrap());
        w.client.action("vms", vm, "stop", json!({})).await.unwrap();
        assert!(
            faults("vm.start", true).is_empty(),
            "cover start's forward steps"
        );
        let mut cases = faults("vm.start", false);
        cases.push(Fault::AgentBefore(CommandKind::VmStart));
        cases.push(Fault::AgentAfter(CommandKind::VmStart));
        for f in &cases {
            let out = case(&w, f, || w.client.action("vms", vm, "start", json!({}))).await;
            assert!(out.is_err(), "{}: start should fail", f.label());
            assert_eq!(
                w.client.one("vms", vm).await.unwrap()["state"],
                "Stopped",
                "{}",
                f.label()
            );
        }
        assert_eq!(
            w.client
                .action("vms", vm, "start", json!({}))
                .await
                .unwrap()["state"],
            "Running"
        );
        settle_and_check(&w, "final").await;
    });
}

#[test]
fn stop_rolls_back_before_the_host_stops_and_completes_after() {
    World::run(spec(23), |w| async move {
        let vm = uuid(&w.create_vm("vm", "small").await.unwrap());
        let reversible = faults("vm.stop", false);
        for f in reversible.iter().chain(
            [
                Fault::AgentBefore(CommandKind::VmStop),
                Fault::AgentAfter(CommandKind::VmStop),
            ]
            .iter(),
        ) {
            let out = case(&w, f, || w.client.action("vms", vm, "stop", json!({}))).await;
            assert!(out.is_err(), "{}: stop should fail", f.label());
            assert_eq!(
                w.client.one("vms", vm).await.unwrap()["state"],
                "Running",
                "{}",
                f.label()
            );
        }
        for f in faults("vm.stop", true) {
            let out = case(&w, &f, || w.client.action("vms", vm, "stop", json!({}))).await;
            assert_eq!(
                out.unwrap_or_else(|e| panic!("{}: {e}", f.label()))["state"],
                "Stopped",
                "{}: retried to completion",
                f.label()
            );
            w.client
                .action("vms", vm, "start", json!({}))
                .await
                .unwrap();
        }
        settle_and_check(&w, "final").await;
    });
}

#[test]
fn migrate_rolls_back_completely_at_every_step() {
    World::run(spec(24), |w| async move {
        let vm = uuid(&w.create_vm("vm", "small").await.unwrap());
        let host_of = |v: &Value| v["host_uuid"].as_str().unwrap().to_string();
        let mut cases = faults("vm.migrate", false);
        cases.push(Fault::AgentBefore(CommandKind::VmMigrate));
        cases.push(Fault::AgentBefore(CommandKind::VmReceive));
        // The host moved the VM but reported failure: the migration is undone all the same
        // (the VM is brought back), as one whose answer was lost is.
        cases.push(Fault::AgentAfter(CommandKind::VmMigrate));
        for f in &cases {
            let src = host_of(&w.client.one("vms", vm).await.unwrap());
            let out = case(&w, f, || w.client.action("vms", vm, "migrate", json!({}))).await;
            assert!(out.is_err(), "{}: migrate should fail", f.label());
            let now = w.client.one("vms", vm).await.unwrap();
            assert_eq!(
                (now["state"].as_str(), host_of(&now)),
                (Some("Running"), src),
                "{}",
                f.label()
            );
        }
        // Past the point of no return, failures are retried.
        for f in faults("vm.migrate", true) {
            let src = host_of(&w.client.one("vms", vm).await.unwrap());
            let out = case(&w, &f, || w.client.action("vms", vm, "migrate", json!({})))
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", f.label()));
            assert_eq!(out["state"], "Running", "{}", f.label());
            assert_ne!(host_of(&out), src, "{}", f.label());
        }
        settle_and_check(&w, "final").await;
    });
}

#[test]
fn destroy_rolls_back_before_the_host_destroys_and_completes_after() {
    World::run(spec(25), |w| async move {
        let vm = uuid(&w.create_vm("vm", "small").await.unwrap());
        let mut cases = faults("vm.destroy", false);
        cases.push(Fault::AgentBefore(CommandKind::VmDestroy));
        cases.push(Fault::AgentAfter(CommandKind::VmDestroy));
        for f in &cases {
            let out = case(&w, f, || w.client.action("vms", vm, "destroy", json!({}))).await;
            assert!(out.is_err(), "{}: destroy should fail", f.label());
            assert_eq!(
                w.client.one("vms", vm).await.unwrap()["state"],
                "Running",
                "{}",
                f.label()
            );
        }
        for f in faults("vm.destroy", true) {
            let out = case(&w, &f, || w.client.action("vms", vm, "destroy", json!({}))).await;
            assert_eq!(
                out.unwrap_or_else(|e| panic!("{}: {e}", f.label()))["state"],
                "Destroyed",
                "{}",
                f.label()
            );
            w.client
                .action("vms", vm, "recover", json!({}))
                .await
                .unwrap();
            w.client
                .action("vms", vm, "start", json!({}))
                .await
                .unwrap();
        }
        settle_and_check(&w, "final").await;
    });
}

#[test]
fn reboot_rolls_back_before_the_host_reboots_and_completes_after() {
    World::run(spec(26), |w| async move {
        let vm = uuid(&w.create_vm("vm", "small").await.unwrap());
        let mut cases = faults("vm.reboot", false);
        cases.push(Fault::AgentBefore(CommandKind::VmReboot));
        for f in &cases {
            let out = case(&w, f, || w.client.action("vms", vm, "reboot", json!({}))).await;
            assert!(out.is_err(), "{}: reboot should fail", f.label());
            let now = w.client.one("vms", vm).await.unwrap();
            assert_eq!(now["state"], "Running", "{}", f.label());
        }
        for f in faults("vm.reboot", true) {
            let out = case(&w, &f, || w.client.action("vms", vm, "reboot", json!({}))).await;
            let out = out.unwrap_or_else(|e| panic!("{}: {e}", f.label()));
            assert_eq!(out["state"], "Running", "{}", f.label());
        }
        settle_and_check(&w, "final").await;
    });
}

#[test]
fn recover_rolls_back_completely_at_every_step() {
    World::run(spec(27), |w| async move {
        let vm = uuid(&w.create_vm("vm", "small").await.unwrap());
        w.client
            .action("vms", vm, "destroy", json!({}))
            .await
            .unwrap();
        assert!(
            faults("vm.recover", true).is_empty(),
            "cover recover's forward steps"
        );
        for f in &faults("vm.recover", false) {
            let out = case(&w, f, || w.client.action("vms", vm, "recover", json!({}))).await;
            assert!(out.is_err(), "{}: recover should fail", f.label());
            let now = w.client.one("vms", vm).await.unwrap();
            assert_eq!(now["state"], "Destroyed", "{}", f.label());
        }
        let out = w.client.action("vms", vm, "recover", json!({})).await;
        assert_eq!(out.unwrap()["state"], "Stopped");
        settle_and_check(&w, "final").await;
    });
}

#[test]
fn expunge_rolls_back_before_it_deletes_and_completes_after() {
    World::run(spec(28), |w| async move {
        let destroyed = |name: String| {
            let w = &w;
            async move {
                let vm = uuid(&w.create_vm(&name, "small").await.unwrap());
                w.client
                    .action("vms", vm, "destroy", json!({}))
                    .await
                    .unwrap();
                vm
            }
        };
        let vm = destroyed("vm".into()).await;
        for f in &faults("vm.expunge", false) {
            let out = case(&w, f, || w.client.action("vms", vm, "expunge", json!({}))).await;
            assert!(out.is_err(), "{}: expunge should fail", f.label());
            let now = w.client.one("vms", vm).await.unwrap();
            assert_eq!(now["state"], "Destroyed", "{}", f.label());
        }
        for (i, f) in faults("vm.expunge", true).iter().enumerate() {
            let vm = destroyed(format!("gone-{i}")).await;
            let out = case(&w, f, || w.client.action("vms", vm, "expunge", json!({}))).await;
            out.unwrap_or_else(|e| panic!("{}: {e}", f.label()));
            let e = w.client.one("vms", vm).await.unwrap_err();
            assert_eq!(e.code, stratus_core::ErrorCode::NotFound, "{}", f.label());
        }
        settle_and_check(&w, "final").await;
    });
}

#[test]
fn volume_attach_and_detach_roll_back_completely_at_every_step() {
    World::run(spec(29), |w| async move {
        let vm = uuid(&w.create_vm("vm", "small").await.unwrap());
        let body = json!({"name": "data", "disk_offering_uuid": w.dc.disk_offering});
        let vol = uuid(&w.client.create("volumes", body).await.unwrap());
        let attached_to = |v: Value| v["vm_uuid"].as_str().map(str::to_string);
        let attach = || {
            w.client
                .action("volumes", vol, "attach", json!({"vm_uuid": vm}))
        };
        let detach = || w.client.action("volumes", vol, "detach", json!({}));

        assert!(
            faults("volume.attach", true).is_empty(),
            "cover attach's forward steps"
        );
        let mut cases = faults("volume.attach", false);
        cases.push(Fault::AgentBefore(CommandKind::VolumeCreate));
        cases.push(Fault::AgentBefore(CommandKind::VolumeAttach));
        for f in &cases {
            let out = case(&w, f, attach).await;
            assert!(out.is_err(), "{}: attach should fail", f.label());
            let now = w.client.one("volumes", vol).await.unwrap();
            assert_eq!(attached_to(now), None, "{}", f.label());
        }
        let out = attach().await.unwrap();
        assert_eq!(attached_to(out), Some(vm.to_string()));

        assert!(
            faults("volume.detach", true).is_empty(),
            "cover detach's forward steps"
        );
        let mut cases = faults("volume.detach", false);
        cases.push(Fault::AgentBefore(CommandKind::VolumeDetach));
        for f in &cases {
            let out = case(&w, f, detach).await;
            assert!(out.is_err(), "{}: detach should fail", f.label());
            let now = w.client.one("volumes", vol).await.unwrap();
            assert_eq!(attached_to(now), Some(vm.to_string()), "{}", f.label());
        }
        let out = detach().await.unwrap();
        assert_eq!(attached_to(out), None);

        // Delete: a fault at a step that rolls back leaves the volume as it was; one at a step
        // past the point of no return is retried, and the volume goes.
        let was = w.client.one("volumes", vol).await.unwrap()["state"].clone();
        for f in &faults("volume.delete", false) {
            let out = case(&w, f, || w.client.delete("volumes", vol, false)).await;
            assert!(out.is_err(), "{}: delete should fail", f.label());
            let now = w.client.one("volumes", vol).await.unwrap();
            assert_eq!(now["state"], was, "{}", f.label());
        }
        let forward = faults("volume.delete", true);
        assert!(!forward.is_empty(), "delete has a forward step");
        for (i, f) in forward.iter().enumerate() {
            let body =
                json!({"name": format!("gone-{i}"), "disk_offering_uuid": w.dc.disk_offering});
            let gone = uuid(&w.client.create("volumes", body).await.unwrap());
            let out = case(&w, f, || w.client.delete("volumes", gone, false)).await;
            out.unwrap_or_else(|e| panic!("{}: {e}", f.label()));
            let e = w.client.one("volumes", gone).await.unwrap_err();
            assert_eq!(e.code, stratus_core::ErrorCode::NotFound, "{}", f.label());
        }
        w.client.delete("volumes", vol, false).await.unwrap();
        settle_and_check(&w, "final").await;
    });
}

/// Run `op` with step `flow` of `chain` run twice; it must succeed, and the fault must fire.
async fn twice<F, Fut>(w: &World, chain: &'static str, flow: &'static str, op: F) -> Value
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Value, Error>>,
{
    let fired = w.flow_faults.fired();
    w.flow_faults.arm(chain, flow, FaultWhen::Twice, 1);
    let out = op()
        .await
        .unwrap_or_else(|e| panic!("{chain}/{flow} run twice: {e}"));
    assert_eq!(
        w.flow_faults.fired(),
        fired + 1,
        "{chain}/{flow}: not run twice"
    );
    w.flow_faults.clear();
    settle_and_check(w, &format!("{chain}/{flow} run twice")).await;
    out
}

/// Fail `chain` after its last step that rolls back, with each undo in turn run twice: `op`
/// must fail and leave the census as before.
async fn every_undo_twice<F, Fut>(w: &World, chain: &'static str, op: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Value, Error>>,
{
    let reversible: Vec<FlowInfo> = steps(chain)
        .into_iter()
        .filter(|f| !f.forward_only)
        .collect();
    let last = reversible.last().expect("a step that rolls back").name;
    for f in reversible.iter().filter(|f| f.undoes) {
        let label = format!("{chain}/{} undone twice", f.name);
        let before = census(w).await.unwrap();
        let fired = w.flow_faults.fired();
        w.flow_faults.arm(chain, last, FaultWhen::After, 1);
        w.flow_faults.arm(chain, f.name, FaultWhen::UndoTwice, 1);
        assert!(op().await.is_err(), "{label}: should fail");
        assert_eq!(w.flow_faults.fired(), fired + 2, "{label}: did not fire");
        w.flow_faults.clear();
        settle_and_check(w, &label).await;
        assert_eq!(census(w).await.unwrap(), before, "{label}: not rolled back");
    }
}

/// Every step of VM creation run twice ends as a single run does; every undo run twice ends
/// as before.
#[test]
fn create_steps_and_undos_are_idempotent() {
    World::run(spec(31), |w| async move {
        let remove = |vm: Uuid| {
            let w = &w;
            async move {
                w.client
                    .action("vms", vm, "destroy", json!({}))
                    .await
                    .unwrap();
                w.client
                    .action("vms", vm, "expunge", json!({}))
                    .await
                    .unwrap();
                settle_and_check(w, "removed").await;
            }
        };
        let base = census(&w).await.unwrap();
        let once = uuid(&w.create_vm("once", "small").await.unwrap());
        settle_and_check(&w, "created once").await;
        let after_once = census(&w).await.unwrap();
        remove(once).await;
        assert_eq!(census(&w).await.unwrap(), base);
        for (i, f) in steps("vm.create").iter().enumerate() {
            let name = format!("twice-{i}");
            let vm = twice(&w, "vm.create", f.name, || w.create_vm(&name, "small")).await;
            assert_eq!(vm["state"], "Running", "{}", f.name);
            assert_eq!(
                census(&w).await.unwrap(),
                after_once,
                "{}: not as once",
                f.name
            );
            remove(uuid(&vm)).await;
        }
        every_undo_twice(&w, "vm.create", || w.create_vm("undone", "small")).await;
    });
}

/// The power chains and migration, each step run twice, end as once; their undos run twice
/// end as before.
#[test]
fn power_and_migrate_steps_and_undos_are_idempotent() {
    World::run(spec(32), |w| async move {
        let vm = uuid(&w.create_vm("vm", "small").await.unwrap());
        let act = |a: &'static str| w.client.action("vms", vm, a, json!({}));
        settle_and_check(&w, "running").await;
        let running = census(&w).await.unwrap();
        act("stop").await.unwrap();
        settle_and_check(&w, "stopped").await;
        let stopped = census(&w).await.unwrap();
        act("start").await.unwrap();
        for f in steps("vm.stop") {
            let out = twice(&w, "vm.stop", f.name, || act("stop")).await;
            assert_eq!(out["state"], "Stopped", "{}", f.name);
            assert_eq!(
                census(&w).await.unwrap(),
                stopped,
                "{}: not as once",
                f.name
            );
            act("start").await.unwrap();
        }
        for f in steps("vm.start") {
            act("stop").await.unwrap();
            let out = twice(&w, "vm.start", f.name, || act("start")).await;
            assert_eq!(out["state"], "Running", "{}", f.name);
            assert_eq!(
                census(&w).await.unwrap(),
                running,
                "{}: not as once",
                f.name
            );
        }
        for chain in ["vm.reboot", "vm.migrate"] {
            let action = if chain == "vm.reboot" {
                "reboot"
            } else {
                "migrate"
            };
            for f in steps(chain) {
                let out = twice(&w, chain, f.name, || act(action)).await;
                assert_eq!(out["state"], "Running", "{chain}/{}", f.name);
                assert_eq!(census(&w).await.unwrap(), running, "{chain}/{}", f.name);
            }
        }
        every_undo_twice(&w, "vm.stop", || act("stop")).await;
        every_undo_twice(&w, "vm.reboot", || act("reboot")).await;
        every_undo_twice(&w, "vm.migrate", || act("migrate")).await;
        act("stop").await.unwrap();
        every_undo_twice(&w, "vm.start", || act("start")).await;
    });
}

/// Destroy, recover and expunge, each step run twice, end as once; their undos run twice end
/// as before.
#[test]
fn lifecycle_steps_and_undos_are_idempotent() {
    World::run(spec(33), |w| async move {
        let vm = uuid(&w.create_vm("vm", "small").await.unwrap());
        let act = |vm: Uuid, a: &'static str| w.client.action("vms", vm, a, json!({}));
        act(vm, "destroy").await.unwrap();
        settle_and_check(&w, "destroyed").await;
        let destroyed = census(&w).await.unwrap();
        act(vm, "recover").await.unwrap();
        settle_and_check(&w, "recovered").await;
        let recovered = census(&w).await.unwrap();
        act(vm, "start").await.unwrap();
        for f in steps("vm.destroy") {
            let out = twice(&w, "vm.destroy", f.name, || act(vm, "destroy")).await;
            assert_eq!(out["state"], "Destroyed", "{}", f.name);
            assert_eq!(
                census(&w).await.unwrap(),
                destroyed,
                "{}: not as once",
                f.name
            );
            act(vm, "recover").await.unwrap();
            act(vm, "start").await.unwrap();
        }
        act(vm, "destroy").await.unwrap();
        for f in steps("vm.recover") {
            let out = twice(&w, "vm.recover", f.name, || act(vm, "recover")).await;
            assert_eq!(out["state"], "Stopped", "{}", f.name);
            assert_eq!(
                census(&w).await.unwrap(),
                recovered,
                "{}: not as once",
                f.name
            );
            act(vm, "destroy").await.unwrap();
        }
        every_undo_twice(&w, "vm.recover", || act(vm, "recover")).await;
        every_undo_twice(&w, "vm.expunge", || act(vm, "expunge")).await;
        act(vm, "expunge").await.unwrap();
        settle_and_check(&w, "expunged").await;
        let gone = census(&w).await.unwrap();
        for (i, f) in steps("vm.expunge").iter().enumerate() {
            let vm = uuid(&w.create_vm(&format!("gone-{i}"), "small").await.unwrap());
            act(vm, "destroy").await.unwrap();
            twice(&w, "vm.expunge", f.name, || act(vm, "expunge")).await;
            assert_eq!(census(&w).await.unwrap(), gone, "{}: not as once", f.name);
        }
        let vm = uuid(&w.create_vm("undone", "small").await.unwrap());
        every_undo_twice(&w, "vm.destroy", || act(vm, "destroy")).await;
    });
}

/// Volume attach and detach, each step run twice, end as once; their undos run twice end as
/// before.
#[test]
fn volume_steps_and_undos_are_idempotent() {
    World::run(spec(34), |w| async move {
        let vm = uuid(&w.create_vm("vm", "small").await.unwrap());
        let body = json!({"name": "data", "disk_offering_uuid": w.dc.disk_offering});
        let vol = uuid(&w.client.create("volumes", body).await.unwrap());
        let attach = || {
            w.client
                .action("volumes", vol, "attach", json!({"vm_uuid": vm}))
        };
        let detach = || w.client.action("volumes", vol, "detach", json!({}));
        attach().await.unwrap();
        settle_and_check(&w, "attached").await;
        let attached = census(&w).await.unwrap();
        detach().await.unwrap();
        settle_and_check(&w, "detached").await;
        let detached = census(&w).await.unwrap();
        for f in steps("volume.attach") {
            let out = twice(&w, "volume.attach", f.name, attach).await;
            assert_eq!(out["vm_uuid"], vm.to_string(), "{}", f.name);
            assert_eq!(
                census(&w).await.unwrap(),
                attached,
                "{}: not as once",
                f.name
            );
            detach().await.unwrap();
        }
        for f in steps("volume.detach") {
            attach().await.unwrap();
            let out = twice(&w, "volume.detach", f.name, detach).await;
            assert!(out["vm_uuid"].is_null(), "{}", f.name);
            assert_eq!(
                census(&w).await.unwrap(),
                detached,
                "{}: not as once",
                f.name
            );
        }
        every_undo_twice(&w, "volume.attach", attach).await;
        attach().await.unwrap();
        every_undo_twice(&w, "volume.detach", detach).await;
        detach().await.unwrap();
        every_undo_twice(&w, "volume.delete", || {
            w.client.delete("volumes", vol, false)
        })
        .await;
        // Each step of a deletion run twice: the volume is gone, on its host too, as once.
        let before = census(&w).await.unwrap();
        for (i, f) in steps("volume.delete").iter().enumerate() {
            let body =
                json!({"name": format!("twice-{i}"), "disk_offering_uuid": w.dc.disk_offering});
            let v = uuid(&w.client.create("volumes", body).await.unwrap());
            w.client
                .action("volumes", v, "attach", json!({"vm_uuid": vm}))
                .await
                .unwrap();
            w.client
                .action("volumes", v, "detach", json!({}))
                .await
                .unwrap();
            twice(&w, "volume.delete", f.name, || {
                w.client.delete("volumes", v, false)
            })
            .await;
            assert_eq!(census(&w).await.unwrap(), before, "{}: not as once", f.name);
        }
    });
}
