//! 500 VMs created concurrently on a 100-host cluster; coded errors for bad input; host
//! operations (maintenance, enable/disable, cascade deletes) and state sync (VM crash reports,
//! orphans, a host coming back after a crash).
#![cfg(madsim)]

use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use stratus_core::ErrorCode;
use stratus_sim_world::invariants::{census, settled_and_sound};
use stratus_sim_world::{HostProfile, World, WorldSpec};
use uuid::Uuid;

fn uuid(v: &Value) -> Uuid {
    Uuid::parse_str(v["uuid"].as_str().expect("uuid")).unwrap()
}

async fn settle_and_check(w: &World, what: &str) {
    settled_and_sound(w, Duration::from_secs(600))
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
}

#[test]
fn five_hundred_vms_at_once_on_a_hundred_hosts() {
    let wall = Instant::now();
    let spec = WorldSpec {
        seed: 41,
        hosts_per_cluster: 100,
        host: HostProfile {
            cpu_cores: 16,
            memory_mib: 32_768,
            disk_mib: 500_000,
        },
        ips_per_zone: 600,
        ..Default::default()
    };
    World::run(spec, move |w| async move {
        let t0 = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for i in 0..500 {
            let c = w.client.clone();
            let body = w.vm_request(&format!("vm-{i}"), "medium");
            tasks.push(tokio::spawn(async move { c.create("vms", body).await }));
        }
        let mut ok = 0;
        for t in tasks {
            let v = t.await.unwrap().expect("every create succeeds");
            assert_eq!(v["state"], "Running");
            ok += 1;
        }
        let sim = t0.elapsed();
        assert_eq!(ok, 500);
        settle_and_check(&w, "after 500 creates").await;
        let vms = w.client.list("vms", &["state=Running"]).await.unwrap();
        assert_eq!(vms.len(), 500);
        let nics = w.client.list("vm-nics", &[]).await.unwrap();
        let ips: BTreeSet<&str> = nics.iter().map(|n| n["ip"].as_str().unwrap()).collect();
        assert_eq!(ips.len(), 500, "every IP unique");
        // No host over capacity (also in the invariants), and the load is spread.
        let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
        for v in &vms {
            *per_host
                .entry(v["host_uuid"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        let max = per_host.values().max().copied().unwrap_or(0);
        // 32 GiB − 1 GiB reserved fits 7 VMs of 4 GiB.
        assert!(max <= 7, "a host took {max} VMs");
        eprintln!(
            "500 concurrent creates on 100 hosts: {:.1} s simulated, {} hosts used, max {max} per host",
            sim.as_secs_f64(),
            per_host.len()
        );
    });
    eprintln!(
        "500-VM test wall time: {:.1} s",
        wall.elapsed().as_secs_f64()
    );
}

#[test]
fn bad_input_gets_coded_errors() {
    World::run(
        WorldSpec {
            seed: 42,
            hosts_per_cluster: 2,
            ..Default::default()
        },
        |w| async move {
            let c = &w.client;
            let ghost = Uuid::from_u128(0xdead);
            let code = |r: Result<Value, stratus_core::Error>| r.expect_err("must fail").code;
            // Unknown uuid.
            assert_eq!(code(c.one("vms", ghost).await), ErrorCode::NotFound);
            assert_eq!(
                code(c.action("vms", ghost, "start", json!({})).await),
                ErrorCode::NotFound
            );
            let mut req = w.vm_request("x", "small");
            req["image_uuid"] = json!(ghost);
            assert_eq!(code(c.create("vms", req).await), ErrorCode::NotFound);
            // Wrong state, with the state and the allowed operations in the message.
            let vm = uuid(&w.create_vm("vm", "small").await.unwrap());
            let e = c.action("vms", vm, "start", json!({})).await.unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidState);
            assert!(
                e.message.contains("is Running") && e.message.contains("you can: stop"),
                "{e}"
            );
            // Out of capacity: an offering no host can take.
            let e = w.create_vm("huge", "huge").await.unwrap_err();
            assert_eq!(e.code, ErrorCode::CapacityExhausted, "{e}");
            // Overlapping ranges; a gateway outside the CIDR.
            let l3 = w.dc.zones[0].l3;
            let (first, _) = w.dc.zones[0].ip_range;
            let e = c
            .create("ip-ranges", json!({"l3_uuid": l3, "start_ip": first.to_string(), "end_ip": first.to_string(), "gateway": "100.64.0.1", "prefix_len": 22}))
            .await
            .unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument);
            assert!(e.message.contains("overlaps"), "{e}");
            let e = c
            .create("ip-ranges", json!({"l3_uuid": l3, "start_ip": "192.168.0.10", "end_ip": "192.168.0.20", "gateway": "10.0.0.1", "prefix_len": 24}))
            .await
            .unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument);
            assert!(e.message.contains("outside"), "{e}");
            // Deleting an offering in use.
            let e = c
                .delete("instance-offerings", w.dc.offering("small"), false)
                .await
                .unwrap_err();
            assert_eq!(e.code, ErrorCode::InUse, "{e}");
            // A host added twice.
            let h = &w.hosts[0];
            let e = c
            .create("hosts", json!({"cluster_uuid": h.cluster, "name": "again", "address": format!("{}:7070", h.ip), "token": h.token}))
            .await
            .unwrap_err();
            assert_eq!(e.code, ErrorCode::AlreadyExists, "{e}");
            // A host with the wrong token is refused and leaves nothing.
            let before = c.count("hosts", &[]).await.unwrap();
            let e = c
            .create("hosts", json!({"cluster_uuid": h.cluster, "name": "bad", "address": "10.9.9.9:7070", "token": "x"}))
            .await
            .unwrap_err();
            assert_eq!(e.code, ErrorCode::HostUnreachable, "{e}");
            assert_eq!(c.count("hosts", &[]).await.unwrap(), before);
            // Malformed bodies, queries and config.
            assert_eq!(
                code(c.create("zones", json!({"nme": 1})).await),
                ErrorCode::InvalidArgument
            );
            assert_eq!(
                code(c.list("vms", &["nope=1"]).await.map(|_| Value::Null)),
                ErrorCode::InvalidArgument
            );
            assert_eq!(
                code(c.list("vms", &["cpu>lots"]).await.map(|_| Value::Null)),
                ErrorCode::InvalidArgument
            );
            let e = c.set_config("host.ping.interval", "0").await.unwrap_err();
            assert!(
                e.message.contains("host.ping.interval") && e.message.contains("from 1s"),
                "{e}"
            );
            settle_and_check(&w, "after the errors").await;
        },
    );
}

#[test]
fn host_operations_cascades_and_state_sync() {
    World::run(
        WorldSpec {
            seed: 43,
            hosts_per_cluster: 3,
            ..Default::default()
        },
        |w| async move {
            let c = &w.client;
            let vms: Vec<Uuid> = {
                let mut v = Vec::new();
                for i in 0..4 {
                    v.push(uuid(
                        &w.create_vm(&format!("vm-{i}"), "small").await.unwrap(),
                    ));
                }
                v
            };
            // Maintenance moves every VM off the host.
            let vm0 = c.one("vms", vms[0]).await.unwrap();
            let h0 = Uuid::parse_str(vm0["host_uuid"].as_str().unwrap()).unwrap();
            let h = c
                .action("hosts", h0, "maintenance", json!({}))
                .await
                .unwrap();
            assert_eq!(h["state"], "Maintenance");
            assert_eq!(
                c.count("vms", &[&format!("host_uuid={h0}")]).await.unwrap(),
                0
            );
            settle_and_check(&w, "after maintenance").await;
            // A disabled host takes no new VM; enabling brings it back.
            c.action("hosts", h0, "enable", json!({})).await.unwrap();
            for x in &w.hosts {
                if x.uuid != Some(h0) {
                    c.action("hosts", x.uuid.unwrap(), "disable", json!({}))
                        .await
                        .unwrap();
                }
            }
            let v = w.create_vm("on-h0", "small").await.unwrap();
            assert_eq!(v["host_uuid"], h0.to_string());
            for x in &w.hosts {
                c.action("hosts", x.uuid.unwrap(), "enable", json!({}))
                    .await
                    .unwrap();
            }
            // A designated host takes the VM; not while its cluster is disabled.
            let h1 = w.hosts[1].uuid.unwrap();
            let mut body = w.vm_request("on-h1", "small");
            body["host_uuid"] = json!(h1);
            let v = c.create("vms", body.clone()).await.unwrap();
            assert_eq!(v["host_uuid"], h1.to_string());
            let cl = w.hosts[1].cluster;
            c.action("clusters", cl, "disable", json!({}))
                .await
                .unwrap();
            body["name"] = json!("on-h1-disabled");
            let e = c.create("vms", body).await.unwrap_err();
            assert_eq!(e.code, ErrorCode::CapacityExhausted, "{e}");
            c.action("clusters", cl, "enable", json!({})).await.unwrap();
            // A VM that crashes on its host is reported; stopping it works.
            let v1 = c.one("vms", vms[1]).await.unwrap();
            let hi = w
                .hosts
                .iter()
                .position(|x| x.uuid.map(|u| u.to_string()).as_deref() == v1["host_uuid"].as_str())
                .unwrap();
            assert!(w.crash_vm(hi, vms[1]));
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert_eq!(c.one("vms", vms[1]).await.unwrap()["state"], "Crashed");
            c.action("vms", vms[1], "stop", json!({})).await.unwrap();
            // An orphan VM on a host (unknown to the database) is destroyed by state sync.
            let orphan = Uuid::from_u128(0x0_4fa4);
            w.hosts[hi].state().vms.insert(
                orphan,
                stratus_sim_world::hypervisor::SimVm {
                    spec: stratus_agent_protocol::VmSpec {
                        uuid: orphan,
                        name: "ghost".into(),
                        cpu: 1,
                        memory_mib: 1,
                        disks: vec![],
                        nics: vec![],
                    },
                    state: stratus_agent_protocol::PowerState::Running,
                },
            );
            tokio::time::sleep(Duration::from_secs(25)).await;
            assert!(
                !w.hosts[hi].state().vms.contains_key(&orphan),
                "orphan destroyed"
            );
            // A host that crashes and comes back: its VMs end Stopped, capacity returned.
            let v2 = c.one("vms", vms[2]).await.unwrap();
            let hj = w
                .hosts
                .iter()
                .position(|x| x.uuid.map(|u| u.to_string()).as_deref() == v2["host_uuid"].as_str())
                .unwrap();
            w.crash_host(hj);
            tokio::time::sleep(Duration::from_secs(60)).await;
            assert_eq!(c.one("vms", vms[2]).await.unwrap()["state"], "Unknown");
            w.restart_host(hj);
            tokio::time::sleep(Duration::from_secs(30)).await;
            assert_eq!(c.one("vms", vms[2]).await.unwrap()["state"], "Stopped");
            settle_and_check(&w, "after the host came back").await;
            // Deleting a zone with VMs is refused; forced, everything under it goes.
            let zone = w.dc.zones[0].zone;
            let e = c.delete("zones", zone, false).await.unwrap_err();
            assert_eq!(e.code, ErrorCode::InUse, "{e}");
            let r = c.delete("zones", zone, true).await.unwrap();
            eprintln!("forced zone delete: {r}");
            settle_and_check(&w, "after the forced delete").await;
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
            assert_eq!(c.count("hosts", &[]).await.unwrap(), 0);
            assert_eq!(c.count("clusters", &[]).await.unwrap(), 0);
            assert_eq!(cen.host_vms, 0, "{cen:?}");
        },
    );
}

/// A small range filled to the last address: every address is handed out once, never an excluded
/// one or the gateway; when none is left the create fails with a count; an address given back is
/// found again wherever it is in the range (the allocator reads the range in windows from a random
/// start, so this also covers the wrap-around and the short last window).
#[test]
fn a_range_fills_to_its_last_address_and_reuses_one_given_back() {
    World::run(
        WorldSpec {
            seed: 43,
            hosts_per_cluster: 4,
            ..Default::default()
        },
        |w| async move {
            let c = &w.client;
            let l3 = uuid(
                &c.create(
                    "l3-networks",
                    json!({"l2_uuid": w.dc.zones[0].l2, "name": "small-l3"}),
                )
                .await
                .unwrap(),
            );
            // 40 addresses, of which the gateway (.1) and three excluded ones are never handed out.
            let excluded = ["172.20.0.5", "172.20.0.17", "172.20.0.33"];
            c.create(
                "ip-ranges",
                json!({"l3_uuid": l3, "start_ip": "172.20.0.1", "end_ip": "172.20.0.40",
                       "gateway": "172.20.0.1", "prefix_len": 24, "excluded": excluded}),
            )
            .await
            .unwrap();
            let request = |name: String| {
                let mut r = w.vm_request(&name, "small");
                r["l3_network_uuids"] = json!([l3]);
                r
            };
            let mut tasks = Vec::new();
            for i in 0..36 {
                let (c, body) = (c.clone(), request(format!("vm-{i}")));
                tasks.push(tokio::spawn(async move { c.create("vms", body).await }));
            }
            let mut vms = Vec::new();
            for t in tasks {
                vms.push(t.await.unwrap().expect("36 addresses for 36 VMs"));
            }
            let nics = c
                .list("vm-nics", &[&format!("l3_uuid={l3}")])
                .await
                .unwrap();
            let ips: BTreeSet<String> = nics
                .iter()
                .map(|n| n["ip"].as_str().unwrap().to_string())
                .collect();
            let free: BTreeSet<String> = (2..=40)
                .map(|i| format!("172.20.0.{i}"))
                .filter(|ip| !excluded.contains(&ip.as_str()))
                .collect();
            assert_eq!(ips, free, "every address handed out once");

            let e = c
                .create("vms", request("one-too-many".into()))
                .await
                .unwrap_err();
            assert_eq!(e.code, ErrorCode::CapacityExhausted, "{e}");
            assert!(e.message.contains("36 of 36 addresses in use"), "{e}");

            // Give one back from the middle of the range; the next VM gets exactly that one.
            let nic = nics.iter().find(|n| n["ip"] == "172.20.0.23").unwrap();
            let vm: Uuid = serde_json::from_value(nic["vm_uuid"].clone()).unwrap();
            c.action("vms", vm, "destroy", json!({})).await.unwrap();
            let v = c.create("vms", request("again".into())).await.unwrap();
            let again = c
                .list("vm-nics", &[&format!("vm_uuid={}", uuid(&v))])
                .await
                .unwrap();
            assert_eq!(again[0]["ip"], "172.20.0.23");
            settle_and_check(&w, "after filling the range").await;
        },
    );
}
