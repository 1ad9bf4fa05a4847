//! Two accounts on one real node (std build, TCP on loopback, SQLite) with in-process simulated
//! hosts: each sees and touches only its own resources, lists count right under `limit` and
//! `offset`, another account's uuid answers 404, and a quota holds under 100 concurrent
//! creates — then frees up as VMs are expunged.
#![cfg(not(madsim))]

use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stratus_core::auth::ADMIN;
use stratus_core::client::StratusClient;
use stratus_core::extension::Extensions;
use stratus_core::model::root_account;
use stratus_core::node::{ManagementNode, NodeConfig};
use stratus_core::services::audit::StoreAudit;
use stratus_core::ErrorCode;
use stratus_kvm_agent::{Agent, AgentConfig, NoFaults};
use stratus_sim_world::{HostProfile, LatencyProfile, SimHostState, SimHypervisor};
use stratus_store::sql::SqlStore;
use stratus_store::{Db, Store};
use uuid::Uuid;

const HOSTS: usize = 4;

struct Cloud {
    admin: StratusClient,
    admin_token: String,
    node: ManagementNode,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn id(v: &Value) -> Uuid {
    Uuid::parse_str(v["uuid"].as_str().expect("a uuid")).unwrap()
}

async fn start(name: &str) -> Cloud {
    stratus_deploy::logging::init(stratus_deploy::logging::LogFormat::Text);
    let dir = std::env::temp_dir().join(format!("stratus-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = SqlStore::open_sqlite(&dir.join("db.sqlite"), stratus_core::model::schema())
        .await
        .unwrap();
    let store: Arc<dyn Store> = Arc::new(store);
    let mut cfg = NodeConfig::new(Uuid::from_u128(1), "127.0.0.1:0".parse().unwrap());
    let audit = StoreAudit::new(Db::new(store.clone()), Duration::from_secs(86_400));
    cfg.extensions = Extensions::builder().audit(audit).build();
    let node = ManagementNode::start(store, cfg).await.unwrap();
    node.cloud.auth.bootstrap_admin(None).await.unwrap();
    let t = node
        .cloud
        .auth
        .issue_for(ADMIN, Duration::from_secs(3600), "test")
        .await
        .unwrap();
    let admin = StratusClient::new(node.addr).with_token(&t.token);
    // The hosts: agents under /h/<i> of one in-process server.
    let mut app = axum::Router::new();
    for i in 0..HOSTS {
        let profile = HostProfile {
            cpu_cores: 64,
            memory_mib: 262_144,
            disk_mib: 4_194_304,
        };
        let state = Arc::new(Mutex::new(SimHostState::new(profile)));
        let hv = SimHypervisor::new(state, LatencyProfile::zero(), i as u64);
        let agent = Agent::new(hv, AgentConfig::new("t0ken"), Arc::new(NoFaults));
        app = app.nest(&format!("/h/{i}"), agent.routes());
    }
    let agents = stratus_rt::http::spawn_server("127.0.0.1:0".parse().unwrap(), app)
        .await
        .unwrap();
    let c = &admin;
    let zone = id(&c.create("zones", json!({"name": "z"})).await.unwrap());
    let cluster = id(&c
        .create("clusters", json!({"name": "c", "zone_uuid": zone}))
        .await
        .unwrap());
    for i in 0..HOSTS {
        c.create(
            "hosts",
            json!({"name": format!("h{i}"), "cluster_uuid": cluster,
                   "address": format!("http://{agents}/h/{i}"), "token": "t0ken"}),
        )
        .await
        .unwrap();
    }
    let bs = id(&c
        .create("backup-storages", json!({"name": "bs", "url": "file:///i"}))
        .await
        .unwrap());
    c.action(
        "backup-storages",
        bs,
        "attach-zone",
        json!({"zone_uuid": zone}),
    )
    .await
    .unwrap();
    let ps = id(&c
        .create("primary-storages", json!({"name": "ps", "zone_uuid": zone}))
        .await
        .unwrap());
    c.action(
        "primary-storages",
        ps,
        "attach-cluster",
        json!({"cluster_uuid": cluster}),
    )
    .await
    .unwrap();
    let l2 = id(&c
        .create("l2-networks", json!({"name": "l2", "zone_uuid": zone}))
        .await
        .unwrap());
    c.action(
        "l2-networks",
        l2,
        "attach-cluster",
        json!({"cluster_uuid": cluster}),
    )
    .await
    .unwrap();
    let l3 = id(&c
        .create("l3-networks", json!({"name": "net", "l2_uuid": l2}))
        .await
        .unwrap());
    c.create(
        "ip-ranges",
        json!({"l3_uuid": l3, "start_ip": "10.1.0.2", "end_ip": "10.1.3.250",
               "gateway": "10.1.0.1", "prefix_len": 22}),
    )
    .await
    .unwrap();
    c.create(
        "images",
        json!({"name": "img", "bs_uuid": bs, "url": "file:///i/img", "size_mib": 10}),
    )
    .await
    .unwrap();
    c.create(
        "instance-offerings",
        json!({"name": "small", "cpu": 1, "memory_mib": 128}),
    )
    .await
    .unwrap();
    Cloud {
        admin,
        admin_token: t.token.clone(),
        node,
        _dir: TempDir(dir),
    }
}

impl Cloud {
    /// An account with `limits`, and a client logged in as its one user.
    async fn tenant(&self, name: &str, limits: Value) -> (Uuid, StratusClient) {
        let mut body = json!({"name": name});
        body.as_object_mut()
            .unwrap()
            .extend(limits.as_object().unwrap().clone());
        let acct = id(&self.admin.create("accounts", body).await.unwrap());
        let password = format!("{name}-password");
        self.admin
            .create(
                "users",
                json!({"name": name, "account_uuid": acct, "password": password}),
            )
            .await
            .unwrap();
        let ttl = Duration::from_secs(3600);
        let t = self
            .node
            .cloud
            .auth
            .login(name, &password, ttl)
            .await
            .unwrap();
        (
            acct,
            StratusClient::new(self.node.addr).with_token(&t.token),
        )
    }

    async fn uuid_of(&self, kind: &str, name: &str) -> Uuid {
        id(&self
            .admin
            .list(kind, &[&format!("name={name}")])
            .await
            .unwrap()[0])
    }

    async fn vm_body(&self, name: &str) -> Value {
        json!({"name": name,
               "instance_offering_uuid": self.uuid_of("instance-offerings", "small").await,
               "image_uuid": self.uuid_of("images", "img").await,
               "l3_network_uuids": [self.uuid_of("l3-networks", "net").await]})
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_account_sees_and_touches_only_its_own() {
    let cloud = start("isolation").await;
    let (a_acct, a) = cloud.tenant("alice", json!({})).await;
    let (b_acct, b) = cloud.tenant("bob", json!({})).await;
    // The root account's image and network are shared: both may use them.
    let image = cloud.uuid_of("images", "img").await;
    assert_eq!(
        a.one("images", image).await.unwrap()["account_uuid"],
        json!(root_account())
    );
    // A host path is an admin's to name: an agent reads it as root.
    let bs = cloud.uuid_of("backup-storages", "bs").await;
    let e = a
        .create(
            "images",
            json!({"name": "mine", "bs_uuid": bs, "url": "file:///etc/shadow", "size_mib": 1}),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Forbidden, "{e}");
    a.create(
        "images",
        json!({"name": "mine", "bs_uuid": bs, "url": "http://10.0.0.1/i.qcow2", "size_mib": 1}),
    )
    .await
    .expect("an http:// image of one's own");
    let mut alice_vms = Vec::new();
    for i in 0..5 {
        let vm = a
            .create("vms", cloud.vm_body(&format!("a{i}")).await)
            .await
            .unwrap();
        assert_eq!(vm["account_uuid"], json!(a_acct));
        alice_vms.push(id(&vm));
    }
    let bob_vm = id(&b.create("vms", cloud.vm_body("b0").await).await.unwrap());

    // Lists, counts and pages hold only one's own.
    assert_eq!(a.count("vms", &[]).await.unwrap(), 5);
    assert_eq!(b.count("vms", &[]).await.unwrap(), 1);
    assert_eq!(cloud.admin.count("vms", &[]).await.unwrap(), 6);
    let page = a
        .get("/v1/vms?limit=2&offset=4&count=true&sort=name")
        .await
        .unwrap();
    assert_eq!(page["total"], 5);
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_eq!(page["items"][0]["name"], "a4");
    assert_eq!(b.count("vm-nics", &[]).await.unwrap(), 1);
    assert_eq!(a.count("volumes", &[]).await.unwrap(), 5);
    assert_eq!(b.list("jobs", &[]).await.unwrap().len(), 1);

    // Another account's VM is not there: read, act, delete, attach all answer not_found.
    let e = b.one("vms", alice_vms[0]).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    let e = b
        .action("vms", alice_vms[0], "stop", json!({}))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    let e = b.delete("vms", alice_vms[0], false).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    let vol = id(&b
        .create("volumes", json!({"name": "d", "size_mib": 10}))
        .await
        .unwrap());
    let e = b
        .action("volumes", vol, "attach", json!({"vm_uuid": alice_vms[0]}))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    // The infrastructure is the operator's.
    for kind in ["hosts", "zones", "accounts", "users", "reservations"] {
        let e = a.list(kind, &[]).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Forbidden, "{kind}");
    }
    let e = a
        .create("zones", json!({"name": "mine"}))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Forbidden);
    let mut placed = cloud.vm_body("placed").await;
    placed["host_uuid"] = json!(cloud.uuid_of("hosts", "h0").await);
    assert_eq!(
        a.create("vms", placed).await.unwrap_err().code,
        ErrorCode::Forbidden
    );
    // Nor may one create for another account.
    let mut theirs = cloud.vm_body("theirs").await;
    theirs["account_uuid"] = json!(a_acct);
    assert_eq!(
        b.create("vms", theirs).await.unwrap_err().code,
        ErrorCode::Forbidden
    );
    // Bob's own work goes on.
    b.action("vms", bob_vm, "stop", json!({})).await.unwrap();
    b.action("volumes", vol, "attach", json!({"vm_uuid": bob_vm}))
        .await
        .unwrap();

    // The audit log has each change asked for, who asked, and how it was answered; only an
    // admin reads it.
    assert_eq!(
        a.list("audit", &[]).await.unwrap_err().code,
        ErrorCode::Forbidden
    );
    let stop = format!("/v1/vms/{bob_vm}/actions/stop");
    let rows = cloud
        .admin
        .list("audit", &[&format!("path={stop}")])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let r = &rows[0];
    assert_eq!(
        (r["method"].as_str(), r["status"].as_i64()),
        (Some("POST"), Some(200))
    );
    assert_eq!(r["account_uuid"], json!(b_acct));
    assert_eq!(r["resource_uuid"], json!(bob_vm));
    assert!(r["job_uuid"].is_string(), "{r}");
    assert!(
        r["client"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{r}"
    );
    let refused = cloud
        .admin
        .list("audit", &["code=not_found", "method=DELETE"])
        .await
        .unwrap();
    assert_eq!(refused.len(), 1, "bob's delete of alice's VM: {refused:?}");
    assert_eq!(refused[0]["status"], 404);
    // A change asked for with a forged token is refused, and the refusal is on the record.
    let forged =
        stratus_core::client::StratusClient::from_url(&format!("http://{}", cloud.node.addr))
            .unwrap()
            .with_token(&"0".repeat(64));
    let e = forged
        .submit("POST", "/v1/zones", Some(&json!({"name": "x"})))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Unauthorized);
    let unauthorized = cloud
        .admin
        .list("audit", &["code=unauthorized"])
        .await
        .unwrap();
    assert_eq!(unauthorized.len(), 1, "{unauthorized:?}");
    assert_eq!(unauthorized[0]["status"], 401);
    assert!(unauthorized[0]["account_uuid"].is_null());
    // Reads are not changes.
    assert_eq!(
        cloud.admin.count("audit", &["method=GET"]).await.unwrap(),
        0
    );

    // The metrics count what happened; only an admin reads them.
    let http = stratus_rt::http::HttpClient::new(1);
    let scrape = |token: &str| {
        let (http, addr) = (http.clone(), cloud.node.addr);
        let auth = format!("Bearer {token}");
        async move {
            let h = [("authorization", auth.as_str())];
            let r = http
                .get(addr, "/metrics", &h, Duration::from_secs(30))
                .await;
            let r = r.unwrap();
            (r.status, String::from_utf8(r.body.to_vec()).unwrap())
        }
    };
    let (status, text) = scrape(&cloud.admin_token).await;
    assert_eq!(status, 200);
    for line in [
        r#"stratus_api_requests_total{route="/v1/vms",method="POST",status="200"} 6"#,
        r#"stratus_api_requests_total{route="/v1/vms/{id}",method="GET",status="404"} 1"#,
        r#"stratus_job_seconds_count{operation="vm.create",outcome="ok"} 6"#,
        r#"stratus_agent_commands_total{command="vm_start",outcome="ok"} 6"#,
        "stratus_hosts_tracked 4",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
    }
    let auth = &cloud.node.cloud.auth;
    let bob_token = auth
        .issue_for("bob", Duration::from_secs(60), "t")
        .await
        .unwrap()
        .token;
    assert_eq!(scrape(&bob_token).await.0, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_holds_under_100_concurrent_creates_and_frees_on_expunge() {
    let cloud = start("quota").await;
    let (acct, t) = cloud
        .tenant("capped", json!({"vm_limit": 7, "vcpu_limit": 100}))
        .await;
    let body = cloud.vm_body("x").await;
    let mut tasks = Vec::new();
    for i in 0..100 {
        let (t, mut body) = (t.clone(), body.clone());
        body["name"] = json!(format!("vm-{i}"));
        tasks.push(tokio::spawn(async move { t.create("vms", body).await }));
    }
    let (mut ok, mut over) = (Vec::new(), 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(v) => ok.push(id(&v)),
            Err(e) if e.code == ErrorCode::QuotaExceeded => over += 1,
            Err(e) => panic!("unexpected failure: {e}"),
        }
    }
    assert_eq!((ok.len(), over), (7, 93));
    let a = cloud.admin.one("accounts", acct).await.unwrap();
    assert_eq!(
        (a["vms_used"].as_i64(), a["volumes_used"].as_i64()),
        (Some(7), Some(7))
    );
    assert_eq!(t.count("vms", &[]).await.unwrap(), 7);
    // Destroyed, a VM still holds its quota; expunged, it gives it back.
    t.action("vms", ok[0], "destroy", json!({})).await.unwrap();
    let e = t.create("vms", body.clone()).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::QuotaExceeded);
    assert!(e.message.contains("VMs"), "{}", e.message);
    t.action("vms", ok[0], "expunge", json!({})).await.unwrap();
    t.create("vms", body.clone()).await.unwrap();
    // The admin raises the limit.
    let limits = json!({"vm_limit": 8});
    cloud.admin.update("accounts", acct, limits).await.unwrap();
    t.create("vms", body).await.unwrap();
    let a = cloud.admin.one("accounts", acct).await.unwrap();
    assert_eq!(
        (a["vms_used"].as_i64(), a["vcpus_used"].as_i64()),
        (Some(8), Some(8))
    );
}
