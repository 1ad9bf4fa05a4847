//! The workflow contract's third part: the management node killed at each step of every chain,
//! with the hosts' commands slow (so one is under way when the node dies), ends — after the
//! restart's recovery — in the clean slate or the finished operation, with nothing on a host
//! that the database does not know. Driven by the chains' own step lists (`chain_catalogue`):
//! a step added to a chain is covered without editing this file, and a chain added without a
//! driver here fails the test.
#![cfg(madsim)]

use serde_json::{json, Value};
use std::time::Duration;
use stratus_agent_protocol::CommandKind;
use stratus_core::flow::FaultWhen;
use stratus_core::services::vm::chain_catalogue;
use stratus_sim_world::invariants::settled_and_sound;
use stratus_sim_world::{World, WorldSpec};
use uuid::Uuid;

fn uuid(v: &Value) -> Uuid {
    Uuid::parse_str(v["uuid"].as_str().expect("uuid")).unwrap()
}

fn spec(seed: u64) -> WorldSpec {
    WorldSpec {
        seed,
        hosts_per_cluster: 3,
        ..Default::default()
    }
}

/// Slower than the kill comes, faster than the world's agent timeouts (60 s).
const SLOW: Duration = Duration::from_secs(5);

/// What a case acts on, and the states it may end in.
struct Case {
    /// The API call, submitted as a job: method and path.
    call: (&'static str, String),
    body: Option<Value>,
    /// Where the outcome shows: a VM's `state`, or a volume's `vm_uuid` (`Null`: gone).
    watch: (&'static str, Uuid, &'static str),
    /// The watched value before and after the operation (`Null`: the resource is gone).
    ends: [Value; 2],
}

/// Set up what `chain` acts on (case `i`), in the state the operation starts from.
async fn prepare(w: &World, chain: &str, i: usize) -> Case {
    let vm_named = |name: String| async move { uuid(&w.create_vm(&name, "small").await.unwrap()) };
    let act = |vm: Uuid, a: &'static str| async move {
        w.client.action("vms", vm, a, json!({})).await.unwrap();
    };
    let volume = |name: String| async move {
        let body = json!({"name": name, "disk_offering_uuid": w.dc.disk_offering});
        uuid(&w.client.create("volumes", body).await.unwrap())
    };
    let vm_case = |vm: Uuid, action: &str, from: &str, to: Value| Case {
        call: ("POST", format!("/v1/vms/{vm}/actions/{action}")),
        body: Some(json!({})),
        watch: ("vms", vm, "state"),
        ends: [json!(from), to],
    };
    match chain {
        "vm.create" => {
            // The VM's uuid is chosen here, so the case can find it whichever way it ends.
            let vm = Uuid::from_u128(0x7e57_0000 + i as u128);
            let mut body = w.vm_request(&format!("k-{i}"), "small");
            body["uuid"] = json!(vm);
            Case {
                call: ("POST", "/v1/vms".into()),
                body: Some(body),
                watch: ("vms", vm, "state"),
                ends: [Value::Null, json!("Running")],
            }
        }
        "vm.start" => {
            let vm = vm_named(format!("k-{i}")).await;
            act(vm, "stop").await;
            vm_case(vm, "start", "Stopped", json!("Running"))
        }
        "vm.stop" => {
            let vm = vm_named(format!("k-{i}")).await;
            vm_case(vm, "stop", "Running", json!("Stopped"))
        }
        "vm.reboot" => {
            let vm = vm_named(format!("k-{i}")).await;
            vm_case(vm, "reboot", "Running", json!("Running"))
        }
        "vm.migrate" => {
            let vm = vm_named(format!("k-{i}")).await;
            vm_case(vm, "migrate", "Running", json!("Running"))
        }
        "vm.destroy" => {
            let vm = vm_named(format!("k-{i}")).await;
            vm_case(vm, "destroy", "Running", json!("Destroyed"))
        }
        "vm.recover" => {
            let vm = vm_named(format!("k-{i}")).await;
            act(vm, "destroy").await;
            vm_case(vm, "recover", "Destroyed", json!("Stopped"))
        }
        "vm.expunge" => {
            let vm = vm_named(format!("k-{i}")).await;
            act(vm, "destroy").await;
            vm_case(vm, "expunge", "Destroyed", Value::Null)
        }
        "volume.attach" | "volume.detach" | "volume.delete" => {
            let vm = vm_named(format!("k-{i}")).await;
            let vol = volume(format!("d-{i}")).await;
            let attach = json!({"vm_uuid": vm});
            w.client
                .action("volumes", vol, "attach", attach.clone())
                .await
                .unwrap();
            let path = |a: &str| format!("/v1/volumes/{vol}/actions/{a}");
            let watch = ("volumes", vol, "vm_uuid");
            match chain {
                "volume.attach" => {
                    w.client
                        .action("volumes", vol, "detach", json!({}))
                        .await
                        .unwrap();
                    Case {
                        call: ("POST", path("attach")),
                        body: Some(attach),
                        watch,
                        ends: [Value::Null, json!(vm)],
                    }
                }
                "volume.detach" => Case {
                    call: ("POST", path("detach")),
                    body: Some(json!({})),
                    watch,
                    ends: [json!(vm), Value::Null],
                },
                _ => {
                    w.client
                        .action("volumes", vol, "detach", json!({}))
                        .await
                        .unwrap();
                    // Detached: its row has no VM; gone, it has no row. Watch its state.
                    Case {
                        call: ("DELETE", format!("/v1/volumes/{vol}")),
                        body: None,
                        watch: ("volumes", vol, "state"),
                        ends: [json!("Ready"), Value::Null],
                    }
                }
            }
        }
        other => panic!("no driver for chain {other}: add one to this test"),
    }
}

/// The watched value now (`Null` when the resource is gone).
async fn watched(w: &World, (res, id, field): (&'static str, Uuid, &'static str)) -> Value {
    match w.client.one(res, id).await {
        Ok(v) => v[field].clone(),
        Err(e) if e.code == stratus_core::ErrorCode::NotFound => Value::Null,
        Err(e) => panic!("cannot read {res} {id}: {e}"),
    }
}

/// Let state sync run, then require quiet and every invariant (the database and the hosts
/// agree: nothing on a host the database does not know).
async fn settle_and_check(w: &World, what: &str) {
    tokio::time::sleep(Duration::from_secs(40)).await;
    settled_and_sound(w, Duration::from_secs(600))
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
}

#[test]
fn a_node_killed_at_any_step_with_a_command_under_way_ends_clean_or_finished() {
    World::run(spec(41), |w| async move {
        let mut i = 0;
        let mut ended = [0usize; 2];
        for (chain, flows) in chain_catalogue() {
            for f in flows {
                i += 1;
                let label = format!("{chain}/{}", f.name);
                let case = prepare(&w, chain, i).await;
                assert_eq!(
                    watched(&w, case.watch).await,
                    case.ends[0],
                    "{label}: set-up"
                );
                for kind in CommandKind::ALL {
                    w.faults.slow_next(kind, 1, SLOW);
                }
                let fired = w.flow_faults.fired();
                w.flow_faults.arm(chain, f.name, FaultWhen::Starts, 1);
                let (method, path) = &case.call;
                let job = w
                    .client
                    .submit(method, path, case.body.as_ref())
                    .await
                    .unwrap_or_else(|e| panic!("{label}: not submitted: {e}"))
                    .job;
                let mut waited = 0;
                while w.flow_faults.fired() == fired {
                    waited += 1;
                    assert!(waited < 1_200, "{label}: the step never started");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                // The step has started; its command (if it sends one) is under way and slow.
                tokio::time::sleep(Duration::from_millis(500)).await;
                w.kill_mgmt();
                w.flow_faults.clear();
                w.faults.clear();
                tokio::time::sleep(Duration::from_secs(2)).await;
                w.restart_mgmt();
                settle_and_check(&w, &label).await;
                let now = watched(&w, case.watch).await;
                let end = case.ends.iter().position(|e| *e == now);
                let end = end.unwrap_or_else(|| {
                    panic!(
                        "{label}: ended at {now}, neither {} nor {}",
                        case.ends[0], case.ends[1]
                    )
                });
                ended[end] += 1;
                // The job says what recovery did with its chain (where the two ends differ).
                if case.ends[0] != case.ends[1] {
                    let j = w.client.get(&format!("/v1/jobs/{job}")).await.unwrap();
                    assert_eq!(
                        j["state"],
                        ["Failed", "Succeeded"][end],
                        "{label}: the resource ended at {now}, but its job is {j}"
                    );
                }
            }
        }
        // Both outcomes occur: recovery rolls back early steps and finishes the chains that
        // finish when interrupted (expunge, volume delete).
        assert!(ended[0] > 0 && ended[1] > 0, "{ended:?}");
    });
}
