//! Inject a failure at exactly one step of create, start, stop, migrate and destroy — before
//! the step runs, and after it ran — and show complete rollback: host capacity, IPs, NICs,
//! volumes, primary-storage space and the VM row as before, no orphan VM or volume on a host.
//! Steps past an operation's point of no return are retried instead, so there the operation
//! completes. Agent failures (before and after the host did the work) are injected the same way.
#![cfg(madsim)]

use serde_json::{json, Value};
use std::future::Future;
use std::time::Duration;
use stratus_agent_protocol::CommandKind;
use stratus_core::error::Error;
use stratus_core::flow::FaultWhen;
use stratus_sim_world::invariants::{census, check};
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

fn flows(chain: &'static str, names: &[&'static str]) -> Vec<Fault> {
    names
        .iter()
        .flat_map(|f| {
            [
                Fault::Flow(chain, f, FaultWhen::Before),
                Fault::Flow(chain, f, FaultWhen::After),
            ]
        })
        .collect()
}

async fn settle_and_check(w: &World, what: &str) {
    w.settle(Duration::from_secs(300))
        .await
        .unwrap_or_else(|b| panic!("{what}: not settled: {b}"));
    let bad = check(w).await;
    assert!(
        bad.is_empty(),
        "{what}: invariants broken:\n{}",
        bad.join("\n")
    );
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

const CREATE_STEPS: &[&str] = &[
    "vm-record",
    "select-backup-storage",
    "allocate-host",
    "allocate-volumes",
    "create-nics",
    "allocate-ips",
    "instantiate-volumes",
    "network-services",
    "start-on-hypervisor",
    "mark-running",
];

#[test]
fn create_rolls_back_completely_at_every_step() {
    World::run(spec(21), |w| async move {
        let mut faults = flows("vm.create", CREATE_STEPS);
        faults.push(Fault::AgentBefore(CommandKind::VolumeCreate));
        faults.push(Fault::AgentAfter(CommandKind::VolumeCreate));
        faults.push(Fault::AgentBefore(CommandKind::VmStart));
        faults.push(Fault::AgentAfter(CommandKind::VmStart));
        for (i, f) in faults.iter().enumerate() {
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
        let mut faults = flows(
            "vm.start",
            &[
                "starting",
                "allocate-host",
                "start-on-hypervisor",
                "mark-running",
            ],
        );
        faults.push(Fault::AgentBefore(CommandKind::VmStart));
        faults.push(Fault::AgentAfter(CommandKind::VmStart));
        for f in &faults {
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
        let reversible = flows("vm.stop", &["stopping", "stop-on-hypervisor"]);
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
        for f in flows("vm.stop", &["release-host", "mark-stopped"]) {
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
        let mut faults = flows(
            "vm.migrate",
            &["migrating", "allocate-destination", "migrate-on-hypervisor"],
        );
        faults.push(Fault::AgentBefore(CommandKind::VmMigrate));
        faults.push(Fault::AgentBefore(CommandKind::VmReceive));
        for f in &faults {
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
        // The host did move the VM but reported failure: the destination is asked, the
        // migration completes.
        let f = Fault::AgentAfter(CommandKind::VmMigrate);
        let src = host_of(&w.client.one("vms", vm).await.unwrap());
        let out = case(&w, &f, || w.client.action("vms", vm, "migrate", json!({})))
            .await
            .expect("completes");
        assert_ne!(host_of(&out), src);
        // Past the point of no return, failures are retried.
        let f = Fault::Flow("vm.migrate", "switch-host", FaultWhen::Before);
        let out = case(&w, &f, || w.client.action("vms", vm, "migrate", json!({})))
            .await
            .expect("completes");
        assert_eq!(out["state"], "Running");
        settle_and_check(&w, "final").await;
    });
}

#[test]
fn destroy_rolls_back_before_the_host_destroys_and_completes_after() {
    World::run(spec(25), |w| async move {
        let vm = uuid(&w.create_vm("vm", "small").await.unwrap());
        let mut faults = flows("vm.destroy", &["destroying", "destroy-on-hypervisor"]);
        faults.push(Fault::AgentBefore(CommandKind::VmDestroy));
        faults.push(Fault::AgentAfter(CommandKind::VmDestroy));
        for f in &faults {
            let out = case(&w, f, || w.client.action("vms", vm, "destroy", json!({}))).await;
            assert!(out.is_err(), "{}: destroy should fail", f.label());
            assert_eq!(
                w.client.one("vms", vm).await.unwrap()["state"],
                "Running",
                "{}",
                f.label()
            );
        }
        for (i, step) in [
            "release-host",
            "release-ips",
            "detach-data-volumes",
            "mark-destroyed",
        ]
        .iter()
        .enumerate()
        {
            let f = Fault::Flow(
                "vm.destroy",
                step,
                if i % 2 == 0 {
                    FaultWhen::Before
                } else {
                    FaultWhen::After
                },
            );
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
