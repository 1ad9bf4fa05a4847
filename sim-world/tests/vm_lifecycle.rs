//! A VM's whole life through the REST API against simulated hosts: the happy path of every
//! operation, with the invariants checked after each.
#![cfg(madsim)]

use serde_json::{json, Value};
use std::time::Duration;
use stratus_sim_world::invariants::{census, settled_and_sound};
use stratus_sim_world::{World, WorldSpec};
use uuid::Uuid;

fn uuid(v: &Value) -> Uuid {
    Uuid::parse_str(v["uuid"].as_str().expect("uuid")).unwrap()
}

async fn assert_clean(w: &World, when: &str) {
    settled_and_sound(w, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("{when}: {e}"));
}

#[test]
fn every_vm_operation_works_and_keeps_the_invariants() {
    World::run(
        WorldSpec {
            seed: 11,
            ..Default::default()
        },
        |w| async move {
            assert_clean(&w, "after build").await;
            let c = &w.client;
            let vm = w.create_vm("web-1", "medium").await.expect("create");
            let id = uuid(&vm);
            assert_eq!(vm["state"], "Running", "{vm}");
            let host = Uuid::parse_str(vm["host_uuid"].as_str().unwrap()).unwrap();
            assert_clean(&w, "after create").await;
            let nics = c
                .list("vm-nics", &[&format!("vm_uuid={id}")])
                .await
                .unwrap();
            assert_eq!(nics.len(), 1);
            assert!(nics[0]["ip"].is_string(), "{nics:?}");
            // Query through a relation.
            let ip = nics[0]["ip"].as_str().unwrap();
            let found = c.list("vms", &[&format!("nics.ip={ip}")]).await.unwrap();
            assert_eq!(found.len(), 1);

            // The console comes from the VM's host (a simulated one says what it knows).
            let con = c
                .get(&format!("/v1/vms/{id}/console?bytes=4096"))
                .await
                .unwrap();
            assert!(con["text"].as_str().unwrap().contains("Running"), "{con}");
            assert!(con["total_bytes"].as_u64().unwrap() > 0, "{con}");
            let e = c
                .get(&format!("/v1/vms/{id}/console?bytes=0"))
                .await
                .unwrap_err();
            assert_eq!(e.code.as_str(), "invalid_argument", "{e}");

            let v = c.action("vms", id, "stop", json!({})).await.unwrap();
            assert_eq!(v["state"], "Stopped");
            let e = c.get(&format!("/v1/vms/{id}/console")).await.unwrap_err();
            assert_eq!(
                e.code.as_str(),
                "conflict",
                "a stopped VM is on no host: {e}"
            );
            assert_clean(&w, "after stop").await;
            let v = c.action("vms", id, "start", json!({})).await.unwrap();
            assert_eq!(v["state"], "Running");
            assert_eq!(
                v["host_uuid"],
                host.to_string(),
                "local storage: starts on its volumes' host"
            );
            let v = c.action("vms", id, "reboot", json!({})).await.unwrap();
            assert_eq!(v["state"], "Running");
            assert_clean(&w, "after start and reboot").await;

            // A data volume, attached while running, detached, deleted.
            let vol = c
            .create("volumes", json!({"name": "data-1", "disk_offering_uuid": w.dc.disk_offering, "vm_uuid": id}))
            .await
            .unwrap();
            assert_eq!(vol["state"], "Ready");
            assert_eq!(vol["vm_uuid"], id.to_string());
            assert_clean(&w, "after volume create+attach").await;
            let vol_id = uuid(&vol);
            let v = c
                .action("volumes", vol_id, "detach", json!({}))
                .await
                .unwrap();
            assert!(v["vm_uuid"].is_null());
            let v = c
                .action("volumes", vol_id, "attach", json!({"vm_uuid": id}))
                .await
                .unwrap();
            assert_eq!(v["vm_uuid"], id.to_string());
            c.action("volumes", vol_id, "detach", json!({}))
                .await
                .unwrap();
            c.delete("volumes", vol_id, false).await.unwrap();
            assert_clean(&w, "after volume detach+delete").await;

            // Live migration within the cluster: the VM and its local volumes move.
            let v = c.action("vms", id, "migrate", json!({})).await.unwrap();
            assert_eq!(v["state"], "Running");
            let dest = Uuid::parse_str(v["host_uuid"].as_str().unwrap()).unwrap();
            assert_ne!(dest, host);
            let sim = w.host_by_uuid(dest).unwrap();
            assert!(sim.state().vms.contains_key(&id));
            assert_clean(&w, "after migrate").await;

            // Destroy (recoverable), recover, destroy, expunge.
            let v = c.action("vms", id, "destroy", json!({})).await.unwrap();
            assert_eq!(v["state"], "Destroyed");
            assert_clean(&w, "after destroy").await;
            let v = c.action("vms", id, "recover", json!({})).await.unwrap();
            assert_eq!(v["state"], "Stopped");
            assert_clean(&w, "after recover").await;
            let v = c.action("vms", id, "start", json!({})).await.unwrap();
            assert_eq!(v["state"], "Running");
            c.action("vms", id, "destroy", json!({})).await.unwrap();
            c.action("vms", id, "expunge", json!({})).await.unwrap();
            assert_clean(&w, "after expunge").await;
            let cen = census(&w).await.unwrap();
            assert_eq!(
                (
                    cen.vms,
                    cen.nics,
                    cen.used_ips,
                    cen.volumes,
                    cen.reservations
                ),
                (0, 0, 0, 0, 0),
                "{cen:?}"
            );
            assert_eq!(
                (
                    cen.cpu_used,
                    cen.memory_used,
                    cen.disk_used,
                    cen.host_vms,
                    cen.host_volumes
                ),
                (0, 0, 0, 0, 0),
                "{cen:?}"
            );
        },
    );
}

/// Records what VM hooks are told after each operation.
struct Seen(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

#[async_trait::async_trait]
impl stratus_core::extension::VmHook for Seen {
    fn name(&self) -> &'static str {
        "seen"
    }
    async fn after(
        &self,
        op: stratus_core::extension::VmOp,
        vm: &stratus_core::extension::VmInfo,
        outcome: Result<(), &stratus_core::error::Error>,
    ) {
        self.0
            .lock()
            .unwrap()
            .push(format!("{op} {} {}", vm.state, outcome.is_ok()));
    }
}

#[test]
fn vm_hooks_are_told_each_operation_with_the_vm_as_it_ended() {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let spec = WorldSpec {
        seed: 12,
        extensions: stratus_core::extension::Extensions::builder()
            .vm_hook(Seen(seen.clone()))
            .build(),
        ..Default::default()
    };
    World::run(spec, move |w| async move {
        let c = &w.client;
        let id = uuid(&w.create_vm("hooked", "small").await.expect("create"));
        for action in ["stop", "start", "reboot", "migrate", "destroy"] {
            c.action("vms", id, action, json!({}))
                .await
                .unwrap_or_else(|e| panic!("{action}: {e}"));
        }
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "create Running true",
                "stop Stopped true",
                "start Running true",
                "reboot Running true",
                "migrate Running true",
                "destroy Destroyed true",
            ]
        );
    });
}

/// An allocator plugin: keeps only the candidate host with the smallest uuid, or, once told to
/// refuse, none. Remembers the hosts it kept.
struct Narrow {
    kept: std::sync::Arc<std::sync::Mutex<Vec<Uuid>>>,
    refuse: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl stratus_core::extension::AllocatorFilter for Narrow {
    fn name(&self) -> &'static str {
        "narrow"
    }
    fn filter(
        &self,
        _spec: &stratus_core::extension::AllocationSpec,
        candidates: Vec<stratus_core::extension::HostCandidate>,
    ) -> Vec<stratus_core::extension::HostCandidate> {
        if self.refuse.load(std::sync::atomic::Ordering::SeqCst) {
            return Vec::new();
        }
        let first = candidates.into_iter().min_by_key(|h| h.host);
        self.kept
            .lock()
            .unwrap()
            .extend(first.iter().map(|h| h.host));
        first.into_iter().collect()
    }
}

#[test]
fn allocator_plugins_choose_among_the_candidates_and_name_themselves_when_none_is_left() {
    let kept = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let refuse = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spec = WorldSpec {
        seed: 13,
        extensions: stratus_core::extension::Extensions::builder()
            .allocator_filter(Narrow {
                kept: kept.clone(),
                refuse: refuse.clone(),
            })
            .build(),
        ..Default::default()
    };
    World::run(spec, move |w| async move {
        // The least loaded host would take the second VM elsewhere; the plugin keeps one host.
        let a = w.create_vm("narrow-a", "small").await.expect("create a");
        let b = w.create_vm("narrow-b", "small").await.expect("create b");
        let host = |v: &Value| Uuid::parse_str(v["host_uuid"].as_str().expect("host")).unwrap();
        assert_eq!(host(&a), host(&b));
        let kept = kept.lock().unwrap().clone();
        assert!(
            !kept.is_empty() && kept.iter().all(|&h| h == host(&a)),
            "{kept:?}"
        );
        refuse.store(true, std::sync::atomic::Ordering::SeqCst);
        let e = w.create_vm("narrow-c", "small").await.unwrap_err();
        assert_eq!(
            e.code,
            stratus_core::error::ErrorCode::CapacityExhausted,
            "{e}"
        );
        assert!(e.message.contains("narrow"), "{e}");
        assert_clean(&w, "after the refused create").await;
    });
}
