//! The real agent server on the simulated hypervisor, over simulated HTTP: connect, ping, long
//! commands with callbacks, tokens, duplicate task ids, migration between two hosts, where
//! reports go after pings with and without a report URL, and a kept connection to a host that
//! restarted.
#![cfg(madsim)]

use axum::routing::post;
use axum::Router;
use madsim::runtime::{Handle, Runtime};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stratus_agent_protocol::*;
use stratus_kvm_agent::{Agent, AgentConfig, Faults, NoFaults};
use stratus_rt::http::{spawn_server, HttpClient};
use stratus_sim_world::{HostProfile, LatencyProfile, SimFaults, SimHostState, SimHypervisor};
use uuid::Uuid;

const PROFILE: HostProfile = HostProfile {
    cpu_cores: 16,
    memory_mib: 65536,
    disk_mib: 1_000_000,
};

/// A host node at `ip` running the real agent on `hv` (the test may keep a clone of `hv` to
/// crash VMs).
fn host_node(ip: &str, token: &'static str, hv: SimHypervisor) {
    host_node_with(ip, token, hv, Arc::new(NoFaults));
}

/// [`host_node`] with fault hooks.
fn host_node_with(ip: &str, token: &'static str, hv: SimHypervisor, faults: Arc<dyn Faults>) {
    Handle::current()
        .create_node()
        .name(ip)
        .ip(ip.parse().unwrap())
        .init(move || {
            let (hv, faults) = (hv.clone(), faults.clone());
            async move {
                let agent = Agent::new(hv, AgentConfig::new(token), faults);
                agent.serve("0.0.0.0:7070".parse().unwrap()).await.unwrap();
                // A node exits when its init task returns.
                std::future::pending::<()>().await;
            }
        })
        .build();
}

/// [`host_node`] on a hypervisor whose commands take no time; returns it.
fn instant_host(ip: &str, token: &'static str) -> SimHypervisor {
    let state = Arc::new(Mutex::new(SimHostState::new(PROFILE)));
    let hv = SimHypervisor::new(state, LatencyProfile::zero(), 7);
    host_node(ip, token, hv.clone());
    hv
}

/// The management node (10.0.0.1), on which a test runs its side.
fn mgmt_node() -> madsim::runtime::NodeHandle {
    Handle::current()
        .create_node()
        .name("mgmt")
        .ip("10.0.0.1".parse().unwrap())
        .build()
}

/// Serve `app` on the management node's port 8080, then give the host nodes time to start.
async fn serve_mgmt(app: Router) {
    spawn_server("0.0.0.0:8080".parse().unwrap(), app)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// The management side's callback endpoint: every task result posted to `/cb` lands in
/// `results`.
fn callback_sink(results: Arc<Mutex<Vec<TaskResult>>>) -> Router {
    Router::new().route(
        "/cb",
        post(move |body: axum::body::Bytes| {
            let results = results.clone();
            async move {
                results
                    .lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap());
                "ok"
            }
        }),
    )
}

async fn call<C: Command>(
    c: &HttpClient,
    host: &str,
    token: &str,
    cmd: &C,
    task: Option<Uuid>,
) -> (u16, serde_json::Value) {
    let addr: SocketAddr = format!("{host}:7070").parse().unwrap();
    let task_s = task.map(|t| t.to_string()).unwrap_or_default();
    let mut headers = vec![(H_TOKEN, token)];
    if task.is_some() {
        headers.push((H_TASK, task_s.as_str()));
        headers.push((H_CALLBACK, "http://10.0.0.1:8080/cb"));
    }
    let r = c
        .post(
            addr,
            C::PATH,
            &headers,
            serde_json::to_vec(cmd).unwrap(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    (
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null),
    )
}

/// Hand host 10.1.0.1 a volume create as task `task`, with one more header.
async fn create_volume_task(
    c: &HttpClient,
    volume: Uuid,
    task: Uuid,
    extra: (&'static str, &str),
) -> stratus_rt::http::HttpResponse {
    c.post(
        "10.1.0.1:7070".parse().unwrap(),
        CreateVolumeCmd::PATH,
        &[
            (H_TOKEN, "tok-a"),
            (H_TASK, &task.to_string()),
            (H_CALLBACK, "http://10.0.0.1:8080/cb"),
            extra,
        ],
        serde_json::to_vec(&CreateVolumeCmd {
            volume,
            size_mib: 10_240,
            image: None,
        })
        .unwrap(),
        Duration::from_secs(5),
    )
    .await
    .unwrap()
}

/// Hand host `src` (ip, token) a migration of `vm` to `dest` (ip or ip:port, token) as task
/// `task`, its sender waiting `wait_ms` for the result (`x-stratus-wait-until`).
async fn migrate_task(
    c: &HttpClient,
    src: (&str, &str),
    dest: (&str, &str),
    vm: Uuid,
    task: Uuid,
    wait_ms: i64,
) {
    let until = (stratus_rt::clock::now_ms() + wait_ms).to_string();
    let dest_address = if dest.0.contains(':') {
        dest.0.to_string()
    } else {
        format!("{}:7070", dest.0)
    };
    let r = c
        .post(
            format!("{}:7070", src.0).parse().unwrap(),
            MigrateVmCmd::PATH,
            &[
                (H_TOKEN, src.1),
                (H_TASK, &task.to_string()),
                (H_CALLBACK, "http://10.0.0.1:8080/cb"),
                (H_WAIT_UNTIL, &until),
            ],
            serde_json::to_vec(&MigrateVmCmd {
                vm,
                dest_address,
                dest_token: dest.1.to_string(),
            })
            .unwrap(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 202);
}

async fn wait_result(results: &Arc<Mutex<Vec<TaskResult>>>, task: Uuid) -> TaskResult {
    for _ in 0..200 {
        if let Some(r) = results.lock().unwrap().iter().find(|r| r.task == task) {
            return r.clone();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no callback for task {task}");
}

fn spec(vm: Uuid, vol: Uuid) -> VmSpec {
    VmSpec {
        uuid: vm,
        name: "web".into(),
        cpu: 2,
        memory_mib: 2048,
        disks: vec![DiskSpec {
            volume: vol,
            device: 0,
            size_mib: 10_240,
        }],
        nics: vec![],
    }
}

#[test]
fn agent_protocol_over_simulated_http() {
    let rt = Runtime::with_seed_and_config(3, madsim::Config::default());
    rt.block_on(async {
        let a = Arc::new(Mutex::new(SimHostState::new(PROFILE)));
        let b = Arc::new(Mutex::new(SimHostState::new(PROFILE)));
        let sim = |state: &Arc<Mutex<SimHostState>>| {
            SimHypervisor::new(state.clone(), LatencyProfile::default(), 7)
        };
        host_node("10.1.0.1", "tok-a", sim(&a));
        host_node("10.1.0.2", "tok-b", sim(&b));
        let results: Arc<Mutex<Vec<TaskResult>>> = Arc::default();
        let mgmt = mgmt_node();
        let r2 = results.clone();
        let host_a = a.clone();
        mgmt.spawn(async move {
            let results = r2;
            let app = callback_sink(results.clone());
            serve_mgmt(app).await;
            let c = HttpClient::default();
            let host = Uuid::from_u128(1);

            // Wrong token.
            let (status, body) = call(
                &c,
                "10.1.0.1",
                "nope",
                &PingCmd {
                    host_uuid: host,
                    report_url: String::new(),
                },
                None,
            )
            .await;
            assert_eq!(status, 401);
            assert_eq!(body["code"], "unauthorized");

            // Connect reports the hardware.
            let (status, facts) = call(
                &c,
                "10.1.0.1",
                "tok-a",
                &ConnectCmd {
                    host_uuid: host,
                    report_url: "http://10.0.0.1:8080/report".into(),
                },
                None,
            )
            .await;
            assert_eq!(status, 200);
            assert_eq!(facts["cpu_cores"], 16);
            assert_eq!(facts["host_uuid"], host.to_string());

            // A command that arrives after its deadline (a partition held it back while its
            // sender gave up) is refused and not run.
            let late_vol = Uuid::from_u128(12);
            let past = (stratus_rt::clock::now_ms() - 1).to_string();
            let r =
                create_volume_task(&c, late_vol, Uuid::from_u128(99), (H_DEADLINE, &past)).await;
            assert_eq!(r.status, 408);
            let e: AgentError = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(e.code, AgentErrorCode::Expired);
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(!host_a.lock().unwrap().volumes.contains_key(&late_vol));

            // A long command handed over in time whose sender stopped waiting for its result
            // before the work would start (a slow host) is not run: its task ends `expired`.
            let stale_vol = Uuid::from_u128(13);
            let stale_task = Uuid::from_u128(98);
            let r = create_volume_task(&c, stale_vol, stale_task, (H_WAIT_UNTIL, &past)).await;
            assert_eq!(r.status, 202);
            let e = wait_result(&results, stale_task).await.outcome.unwrap_err();
            assert_eq!(e.code, AgentErrorCode::Expired, "{e:?}");
            assert!(!host_a.lock().unwrap().volumes.contains_key(&stale_vol));

            // A long command without a task id is refused.
            let vm = Uuid::from_u128(10);
            let vol = Uuid::from_u128(11);
            let (status, _) = call(
                &c,
                "10.1.0.1",
                "tok-a",
                &StartVmCmd {
                    spec: spec(vm, vol),
                },
                None,
            )
            .await;
            assert_eq!(status, 400);

            // Create the volume, then start the VM; results come through the callback.
            let t1 = Uuid::from_u128(100);
            let (status, _) = call(
                &c,
                "10.1.0.1",
                "tok-a",
                &CreateVolumeCmd {
                    volume: vol,
                    size_mib: 10_240,
                    image: None,
                },
                Some(t1),
            )
            .await;
            assert_eq!(status, 202);
            assert!(wait_result(&results, t1).await.outcome.is_ok());
            let t2 = Uuid::from_u128(101);
            call(
                &c,
                "10.1.0.1",
                "tok-a",
                &StartVmCmd {
                    spec: spec(vm, vol),
                },
                Some(t2),
            )
            .await;
            assert!(wait_result(&results, t2).await.outcome.is_ok());
            // The same task id again: not run twice, the stored result is delivered again.
            let (status, body) = call(
                &c,
                "10.1.0.1",
                "tok-a",
                &StartVmCmd {
                    spec: spec(vm, vol),
                },
                Some(t2),
            )
            .await;
            assert_eq!((status, body["duplicate"].as_bool()), (202, Some(true)));
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(
                results
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|r| r.task == t2)
                    .count(),
                2
            );

            // Ping lists what runs.
            let (_, ping) = call(
                &c,
                "10.1.0.1",
                "tok-a",
                &PingCmd {
                    host_uuid: host,
                    report_url: "http://10.0.0.1:8080/report".into(),
                },
                None,
            )
            .await;
            assert_eq!(ping["vms"][0]["uuid"], vm.to_string());
            assert_eq!(ping["vms"][0]["state"], "running");

            // Migrate to host b: the VM and its disk move.
            let t3 = Uuid::from_u128(102);
            call(
                &c,
                "10.1.0.1",
                "tok-a",
                &MigrateVmCmd {
                    vm,
                    dest_address: "10.1.0.2:7070".into(),
                    dest_token: "tok-b".into(),
                },
                Some(t3),
            )
            .await;
            let r = wait_result(&results, t3).await;
            assert!(r.outcome.is_ok(), "{r:?}");

            // Keep-alive connections are closed once idle for IDLE_TIMEOUT, and the client
            // connects again when next used.
            let ping = PingCmd {
                host_uuid: host,
                report_url: String::new(),
            };
            assert_eq!(call(&c, "10.1.0.1", "tok-a", &ping, None).await.0, 200);
            assert!(c.idle_connections() > 0);
            tokio::time::sleep(stratus_rt::http::IDLE_TIMEOUT * 3).await;
            assert_eq!(c.idle_connections(), 0);
            let (status, _) = call(
                &c,
                "10.1.0.2",
                "tok-b",
                &PingCmd {
                    host_uuid: Uuid::from_u128(2),
                    report_url: String::new(),
                },
                None,
            )
            .await;
            assert_eq!(status, 200);
            assert_eq!(c.idle_connections(), 1);
        })
        .await
        .unwrap();
        let (a, b) = (a.lock().unwrap(), b.lock().unwrap());
        assert!(a.vms.is_empty() && a.volumes.is_empty(), "source let go");
        assert_eq!(b.vms.len(), 1);
        assert_eq!(b.volumes.len(), 1);
        assert_eq!(
            a.executed[&CommandKind::VmStart],
            1,
            "duplicate task not re-run"
        );
    });
}

/// State sync asks a VM's home host what it holds with a ping that carries no report URL: the
/// VM's owner need not own the host. Such a ping leaves the host's reports going where its
/// owner pointed them; a ping with a URL re-points them.
#[test]
fn a_ping_without_a_report_url_leaves_the_reports_where_they_went() {
    let rt = Runtime::with_seed_and_config(5, madsim::Config::default());
    rt.block_on(async {
        let hv = instant_host("10.1.0.3", "tok");
        let mgmt = mgmt_node();
        mgmt.spawn(async move {
            let results: Arc<Mutex<Vec<TaskResult>>> = Arc::default();
            // Reports, by the path they arrived at.
            let reports: Arc<Mutex<Vec<(String, Report)>>> = Arc::default();
            let rep = reports.clone();
            let app = callback_sink(results.clone()).route(
                "/{sink}",
                post(
                    move |axum::extract::Path(sink): axum::extract::Path<String>,
                          body: axum::body::Bytes| {
                        let rep = rep.clone();
                        async move {
                            rep.lock()
                                .unwrap()
                                .push((sink, serde_json::from_slice(&body).unwrap()));
                            "ok"
                        }
                    },
                ),
            );
            serve_mgmt(app).await;
            let c = HttpClient::default();
            let host = Uuid::from_u128(3);
            let ping = |url: &str| PingCmd {
                host_uuid: host,
                report_url: url.to_string(),
            };
            let connect = ConnectCmd {
                host_uuid: host,
                report_url: "http://10.0.0.1:8080/owner".into(),
            };
            assert_eq!(call(&c, "10.1.0.3", "tok", &connect, None).await.0, 200);
            // Two running VMs to crash.
            for n in 0..2u128 {
                let (vm, vol) = (Uuid::from_u128(20 + n), Uuid::from_u128(30 + n));
                let t = Uuid::from_u128(200 + 2 * n);
                let create = CreateVolumeCmd {
                    volume: vol,
                    size_mib: 10_240,
                    image: None,
                };
                call(&c, "10.1.0.3", "tok", &create, Some(t)).await;
                assert!(wait_result(&results, t).await.outcome.is_ok());
                let t = Uuid::from_u128(201 + 2 * n);
                let start = StartVmCmd {
                    spec: spec(vm, vol),
                };
                call(&c, "10.1.0.3", "tok", &start, Some(t)).await;
                assert!(wait_result(&results, t).await.outcome.is_ok());
            }
            let reports_at = |sink: &str| -> Vec<Uuid> {
                reports
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(s, _)| s == sink)
                    .filter_map(|(_, r)| match r.event {
                        ReportEvent::VmState { vm, .. } => Some(vm),
                        ReportEvent::HostStopping => None,
                    })
                    .collect()
            };

            // State sync's question: no URL. The crash still goes to the owner.
            assert_eq!(call(&c, "10.1.0.3", "tok", &ping(""), None).await.0, 200);
            assert!(hv.crash_vm(Uuid::from_u128(20)));
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(reports_at("owner"), vec![Uuid::from_u128(20)]);

            // The host's owner pings with its URL (a new owner after a rebalance): re-pointed.
            let new_owner = ping("http://10.0.0.1:8080/new-owner");
            assert_eq!(call(&c, "10.1.0.3", "tok", &new_owner, None).await.0, 200);
            assert!(hv.crash_vm(Uuid::from_u128(21)));
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(reports_at("new-owner"), vec![Uuid::from_u128(21)]);
            assert_eq!(reports_at("owner"), vec![Uuid::from_u128(20)]);
        })
        .await
        .unwrap();
    });
}

/// A migration hands its destination the time its sender stops waiting
/// (`x-stratus-wait-until`) as the receive's deadline: a destination that would only take the
/// VM after it (here a slow one) refuses, and the VM stays on the source, where the management
/// node, which rolled the migration back by then, expects it. In time, the same migration moves
/// the VM. A sender that waits longer than the source's own 60 s for a receive: the receive's
/// deadline is the source's.
#[test]
fn a_migration_receive_does_not_outlive_its_sender() {
    let rt = Runtime::with_seed_and_config(9, madsim::Config::default());
    rt.block_on(async {
        let a = Arc::new(Mutex::new(SimHostState::new(PROFILE)));
        let b = Arc::new(Mutex::new(SimHostState::new(PROFILE)));
        let sim = |state: &Arc<Mutex<SimHostState>>| {
            SimHypervisor::new(state.clone(), LatencyProfile::zero(), 7)
        };
        host_node("10.1.0.1", "tok-a", sim(&a));
        // The destination's next receive is held back 2 s.
        let slow = SimFaults::new(9);
        slow.slow_next(CommandKind::VmReceive, 1, Duration::from_secs(2));
        host_node_with("10.1.0.2", "tok-b", sim(&b), Arc::new(slow));
        let (host_a, host_b) = (a.clone(), b.clone());
        let mgmt = mgmt_node();
        mgmt.spawn(async move {
            let results: Arc<Mutex<Vec<TaskResult>>> = Arc::default();
            // The deadlines receives arrive with at the stand-in destination.
            let deadlines: Arc<Mutex<Vec<String>>> = Arc::default();
            let noted = deadlines.clone();
            let app = callback_sink(results.clone()).route(
                ReceiveVmCmd::PATH,
                post(move |headers: axum::http::HeaderMap| {
                    let noted = noted.clone();
                    async move {
                        let d = headers.get(H_DEADLINE).and_then(|v| v.to_str().ok());
                        noted.lock().unwrap().push(d.unwrap_or("").to_string());
                        "{}"
                    }
                }),
            );
            serve_mgmt(app).await;
            let c = HttpClient::default();
            let (vm, vol) = (Uuid::from_u128(40), Uuid::from_u128(41));
            let create = CreateVolumeCmd {
                volume: vol,
                size_mib: 10_240,
                image: None,
            };
            let t = Uuid::from_u128(400);
            call(&c, "10.1.0.1", "tok-a", &create, Some(t)).await;
            assert!(wait_result(&results, t).await.outcome.is_ok());
            let t = Uuid::from_u128(401);
            let start = StartVmCmd {
                spec: spec(vm, vol),
            };
            call(&c, "10.1.0.1", "tok-a", &start, Some(t)).await;
            assert!(wait_result(&results, t).await.outcome.is_ok());

            // The sender waits 1 s; the destination would take the VM after 2 s.
            let late = Uuid::from_u128(402);
            migrate_task(
                &c,
                ("10.1.0.1", "tok-a"),
                ("10.1.0.2", "tok-b"),
                vm,
                late,
                1_000,
            )
            .await;
            let e = wait_result(&results, late).await.outcome.unwrap_err();
            assert_eq!(e.code, AgentErrorCode::Expired, "{e:?}");
            tokio::time::sleep(Duration::from_secs(5)).await;
            assert!(host_a.lock().unwrap().vms.contains_key(&vm), "VM stays");
            assert!(
                host_b.lock().unwrap().vms.is_empty(),
                "destination took nothing"
            );

            // Waited for long enough, the same migration moves the VM.
            let in_time = Uuid::from_u128(403);
            migrate_task(
                &c,
                ("10.1.0.1", "tok-a"),
                ("10.1.0.2", "tok-b"),
                vm,
                in_time,
                30_000,
            )
            .await;
            let r = wait_result(&results, in_time).await;
            assert!(r.outcome.is_ok(), "{r:?}");
            assert!(host_a.lock().unwrap().vms.is_empty());
            assert!(host_b.lock().unwrap().vms.contains_key(&vm));

            // A sender that waits 10 minutes: the source waits for the receive only its own
            // 60 s, so that is the deadline the destination gets (here, a stand-in that notes
            // it), not the sender's.
            let sent = stratus_rt::clock::now_ms();
            let stand_in = ("10.0.0.1:8080", "tok-m");
            migrate_task(
                &c,
                ("10.1.0.2", "tok-b"),
                stand_in,
                vm,
                Uuid::from_u128(404),
                600_000,
            )
            .await;
            assert!(wait_result(&results, Uuid::from_u128(404))
                .await
                .outcome
                .is_ok());
            let got: i64 = deadlines.lock().unwrap()[0].parse().unwrap();
            assert!(
                (sent + 59_000..=sent + 61_000).contains(&got),
                "receive deadline {} ms after the send",
                got - sent
            );
        })
        .await
        .unwrap();
    });
}

/// A host that restarts drops its end of every connection: the management side's kept
/// connection to it is seen closed and not used again, and the next ping connects anew and is
/// answered by the restarted agent (on a connection left open it would wait out its timeout).
#[test]
fn a_kept_connection_to_a_restarted_host_is_not_used_again() {
    let rt = Runtime::with_seed_and_config(11, madsim::Config::default());
    rt.block_on(async {
        instant_host("10.1.0.1", "tok-a");
        mgmt_node()
            .spawn(async move {
                serve_mgmt(Router::new()).await;
                let c = HttpClient::with_idle_timeout(2, Duration::from_secs(600));
                let ping = PingCmd {
                    host_uuid: Uuid::from_u128(1),
                    report_url: String::new(),
                };
                assert_eq!(call(&c, "10.1.0.1", "tok-a", &ping, None).await.0, 200);
                assert_eq!(c.idle_connections(), 1);
                // As `World` does: the host dies (its tasks, the listener's among them, are
                // dropped), then comes back.
                Handle::current().kill("10.1.0.1");
                tokio::time::sleep(Duration::from_millis(100)).await;
                Handle::current().restart("10.1.0.1");
                tokio::time::sleep(Duration::from_secs(1)).await;
                let t0 = tokio::time::Instant::now();
                assert_eq!(call(&c, "10.1.0.1", "tok-a", &ping, None).await.0, 200);
                assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
                assert_eq!(
                    c.idle_connections(),
                    1,
                    "the closed one is gone, the new one kept"
                );
            })
            .await
            .unwrap();
    });
}

/// Fence `chain` at `epoch` on host 10.1.0.1; the number of its older tasks still running.
async fn fence(c: &HttpClient, chain: Uuid, epoch: u64) -> u32 {
    let cmd = FenceCmd {
        token: FenceToken { chain, epoch },
        until_ms: stratus_rt::clock::now_ms() + 60_000,
    };
    let (status, body) = call(c, "10.1.0.1", "tok-a", &cmd, None).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_value::<FenceReply>(body).unwrap().running
}

/// A fence counts its chain's older tasks until they end (work that started runs to its end),
/// and from then on refuses the chain's older commands — not its own epoch's, nor another
/// chain's.
#[test]
fn a_fence_waits_out_its_chains_older_tasks_and_refuses_their_late_copies() {
    let rt = Runtime::with_seed_and_config(5, madsim::Config::default());
    rt.block_on(async {
        let state = Arc::new(Mutex::new(SimHostState::new(PROFILE)));
        let hv = SimHypervisor::new(state.clone(), LatencyProfile::default(), 7);
        host_node("10.1.0.1", "tok-a", hv);
        let results: Arc<Mutex<Vec<TaskResult>>> = Arc::default();
        let r2 = results.clone();
        mgmt_node()
            .spawn(async move {
                let results = r2;
                serve_mgmt(callback_sink(results.clone())).await;
                let c = HttpClient::default();
                let (chain, other) = (Uuid::from_u128(5), Uuid::from_u128(6));
                let at = |chain: Uuid, epoch| FenceToken { chain, epoch }.header();

                // Running at epoch 0 when the fence comes: counted until it ends.
                let (vol, task) = (Uuid::from_u128(22), Uuid::from_u128(72));
                let r = create_volume_task(&c, vol, task, (H_FENCE, &at(chain, 0))).await;
                assert_eq!(r.status, 202);
                assert_eq!(fence(&c, chain, 1).await, 1, "the running task");
                let mut asked = 1;
                while fence(&c, chain, 1).await > 0 {
                    asked += 1;
                    assert!(asked < 120, "the task never ended");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                let done = wait_result(&results, task).await;
                assert!(
                    done.outcome.is_ok(),
                    "work that started ran to its end: {done:?}"
                );
                assert!(state.lock().unwrap().volumes.contains_key(&vol));

                // A late command of epoch 0: refused on arrival, never run.
                let late = Uuid::from_u128(23);
                let r = create_volume_task(&c, late, Uuid::from_u128(73), (H_FENCE, &at(chain, 0)))
                    .await;
                assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
                let e: AgentError = serde_json::from_slice(&r.body).unwrap();
                assert_eq!(e.code, AgentErrorCode::Fenced);
                // A fence token that does not parse is refused, not run unfenced.
                let r = create_volume_task(
                    &c,
                    Uuid::from_u128(26),
                    Uuid::from_u128(76),
                    (H_FENCE, "x:1"),
                )
                .await;
                assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
                // The fence's own epoch and another chain go on.
                let own = Uuid::from_u128(24);
                let r = create_volume_task(&c, own, Uuid::from_u128(74), (H_FENCE, &at(chain, 1)))
                    .await;
                assert_eq!(r.status, 202);
                let theirs = Uuid::from_u128(25);
                let r =
                    create_volume_task(&c, theirs, Uuid::from_u128(75), (H_FENCE, &at(other, 0)))
                        .await;
                assert_eq!(r.status, 202);
                for t in [74, 75] {
                    let done = wait_result(&results, Uuid::from_u128(t)).await;
                    assert!(done.outcome.is_ok(), "{done:?}");
                }
                let volumes = &state.lock().unwrap().volumes;
                assert!(!volumes.contains_key(&late), "a fenced command ran");
                assert!(volumes.contains_key(&own) && volumes.contains_key(&theirs));
            })
            .await
            .unwrap();
    });
}
