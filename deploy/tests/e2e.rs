//! The real deployment as processes over loopback: `stratus serve` (SQLite; PostgreSQL too when
//! `STRATUS_TEST_PG_URL` is set, as `ci/e2e` does) and `stratus-sim-agent` with 200 hosts,
//! driven through the `stratus` CLI and the API: the walk-through of the README, every VM
//! action, 500 VMs, a `kill -9` of `serve` while 200 VMs are being created, a restart that
//! finishes or rolls back what it left, the books checked through the API, the event log
//! followed over SSE across the kill (every number from 1, none twice) and delivered to a
//! webhook receiver here (every event, signed), and a graceful stop. Every wait is bounded.
//! Run by `ci/e2e` (ignored by a plain `cargo test`: it takes minutes).

#![cfg(not(madsim))]

use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use stratus_core::client::StratusClient;
use stratus_core::model::{VmState, VolumeState};
use stratus_core::services::webhook::{signature, H_SIGNATURE};

const STRATUS: &str = env!("CARGO_BIN_EXE_stratus");
const SIM_AGENT: &str = env!("CARGO_BIN_EXE_stratus-sim-agent");
const HOSTS: usize = 200;
/// Hosts added through the CLI, one process each; the API adds the others.
const CLI_HOSTS: usize = 10;
const WEBHOOK_SECRET: &str = "an e2e webhook secret";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `cmd` dies with the test process, even when that is killed outright.
fn tied(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Deployment {
    dir: PathBuf,
    api: String,
    agent: String,
    database: Option<String>,
    serve: Option<Proc>,
    _agent: Proc,
}

impl Deployment {
    fn start(name: &str, database: Option<String>) -> Deployment {
        let dir = std::env::temp_dir().join(format!("stratus-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let agent = format!("127.0.0.1:{}", free_port());
        let agent_proc = tied(&mut Command::new(SIM_AGENT))
            .args([
                "--hosts",
                &HOSTS.to_string(),
                "--listen",
                &agent,
                "--token-file",
            ])
            .arg(dir.join("agent-token"))
            .args(["--latency", "sim"])
            .stdout(Stdio::null())
            .stderr(log(&dir, "agent.log"))
            .spawn()
            .expect("stratus-sim-agent starts");
        let mut d = Deployment {
            api: format!("http://127.0.0.1:{}", free_port()),
            agent,
            database,
            serve: None,
            _agent: Proc(agent_proc),
            dir,
        };
        d.start_serve();
        d
    }

    fn start_serve(&mut self) {
        assert!(self.serve.is_none());
        let mut cmd = Command::new(STRATUS);
        cmd.args(["serve", "--listen", self.api.trim_start_matches("http://")])
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .args(["--shutdown-timeout", "20"])
            .stdout(Stdio::null())
            .stderr(log(&self.dir, "serve.log"));
        if let Some(db) = &self.database {
            cmd.args(["--database", db]);
        }
        self.serve = Some(Proc(tied(&mut cmd).spawn().expect("stratus serve starts")));
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until {
            let out = self.cli_raw(&["--server", &self.api, "config", "list"]);
            // 401 (not logged in yet) or 0: the API answers.
            if matches!(out.status.code(), Some(0 | 7)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "stratus serve did not answer in 60 s; see {}",
            self.dir.display()
        );
    }

    fn kill9_serve(&mut self) {
        let mut p = self.serve.take().expect("serve runs");
        p.0.kill().unwrap();
        p.0.wait().unwrap();
    }

    /// SIGTERM, then the exit status (bounded).
    fn stop_serve(&mut self) -> std::process::ExitStatus {
        let mut p = self.serve.take().expect("serve runs");
        let pid = p.0.id() as libc::pid_t;
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let until = Instant::now() + Duration::from_secs(40);
        while Instant::now() < until {
            if let Some(s) = p.0.try_wait().unwrap() {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("serve did not stop within 40 s of SIGTERM");
    }

    fn cli_raw(&self, args: &[&str]) -> Output {
        Command::new(STRATUS)
            .args(args)
            .env("STRATUS_CLI_CONFIG", self.dir.join("cli.toml"))
            .env_remove("STRATUS_URL")
            .env_remove("STRATUS_TOKEN")
            .stdin(Stdio::null())
            .output()
            .expect("the stratus CLI runs")
    }

    /// Run the CLI; its standard output, or a panic with what it said.
    fn cli(&self, args: &[&str]) -> String {
        let out = self.cli_raw(args);
        assert!(
            out.status.success(),
            "stratus {args:?} exited {:?}: {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn cli_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.cli(&a)).expect("JSON output")
    }

    /// The token of the CLI's saved login.
    fn token(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("cli.toml")).unwrap();
        let login: toml::Value = toml::from_str(&text).unwrap();
        login["token"].as_str().unwrap().to_string()
    }

    fn client(&self) -> StratusClient {
        StratusClient::from_url(&self.api)
            .unwrap()
            .with_token(&self.token())
    }
}

fn log(dir: &Path, name: &str) -> Stdio {
    Stdio::from(std::fs::File::create(dir.join(name)).unwrap())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The walk-through: log in, build the datacenter, create a VM and run every action on it.
fn walk_through(d: &Deployment) {
    let password = d.dir.join("data").join("admin-password");
    d.cli(&[
        "login",
        &d.api,
        "--user",
        "admin",
        "--password-file",
        password.to_str().unwrap(),
    ]);
    let token = d.dir.join("agent-token");
    let token = token.to_str().unwrap();
    d.cli(&["zone", "create", "z1"]);
    d.cli(&["cluster", "create", "c1", "--zone", "z1"]);
    for i in 0..CLI_HOSTS {
        let url = format!("http://{}/h/{i}", d.agent);
        d.cli(&[
            "host",
            "add",
            &format!("h{i}"),
            "--cluster",
            "c1",
            "--url",
            &url,
            "--token-file",
            token,
        ]);
    }
    d.cli(&[
        "backup-storage",
        "create",
        "bs",
        "--url",
        "file:///srv/images",
        "--zone",
        "z1",
    ]);
    d.cli(&[
        "primary-storage",
        "create",
        "local",
        "--zone",
        "z1",
        "--cluster",
        "c1",
    ]);
    d.cli(&[
        "image",
        "add",
        "tiny",
        "--url",
        "file:///srv/images/tiny.qcow2",
        "--size-mib",
        "16",
    ]);
    d.cli(&[
        "offering",
        "create",
        "small",
        "--cpu",
        "1",
        "--memory-mib",
        "256",
    ]);
    d.cli(&["disk-offering", "create", "d10", "--size-mib", "10"]);
    d.cli(&["l2", "create", "l2a", "--zone", "z1", "--cluster", "c1"]);
    d.cli(&["l3", "create", "net1", "--l2", "l2a", "--dns", "10.20.0.1"]);
    d.cli(&[
        "ip-range",
        "add",
        "--l3",
        "net1",
        "--start",
        "10.20.0.10",
        "--end",
        "10.20.3.250",
        "--gateway",
        "10.20.0.1",
        "--prefix",
        "22",
    ]);
    let hosts = d.cli_json(&["host", "list", "-q", "status=Connected"]);
    assert_eq!(hosts["items"].as_array().unwrap().len(), CLI_HOSTS);

    let vm = d.cli_json(&[
        "vm",
        "create",
        "web1",
        "--offering",
        "small",
        "--image",
        "tiny",
        "--l3",
        "net1",
        "--data-disk",
        "d10",
    ]);
    assert_eq!(vm["state"], "Running", "{vm}");
    let running = d.cli_json(&["vm", "list", "-q", "state=Running"]);
    assert_eq!(running["items"][0]["name"], "web1");
    for action in [
        &["vm", "stop", "web1"][..],
        &["vm", "start", "web1"],
        &["vm", "reboot", "web1"],
        &["vm", "migrate", "web1"],
        &[
            "volume",
            "create",
            "extra",
            "--size-mib",
            "20",
            "--vm",
            "web1",
        ],
        &["volume", "detach", "extra"],
        &["volume", "attach", "extra", "--vm", "web1"],
        &["volume", "detach", "extra"],
        &["volume", "delete", "extra"],
        &["vm", "destroy", "web1"],
        &["vm", "recover", "web1"],
        &["vm", "start", "web1"],
    ] {
        d.cli(action);
    }
    assert_eq!(d.cli_json(&["vm", "get", "web1"])["state"], "Running");
    // A refused action exits with the conflict code and says why.
    let out = d.cli_raw(&["vm", "start", "web1"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_state"));
    let out = d.cli_raw(&["vm", "get", "nosuchvm"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let out = d.cli_raw(&["vm", "frobnicate", "web1"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    d.cli(&["vm", "destroy", "web1"]);
    d.cli(&["vm", "expunge", "web1"]);
    // A token for a program, shown once, that works.
    let issued = d.cli_json(&["token", "create", "--note", "e2e", "--ttl-s", "600"]);
    let t = issued["token"].as_str().expect("the new token").to_string();
    let who = d.cli_json(&["--token", &t, "get", "zone", "z1"]);
    assert_eq!(who["name"], "z1", "{who}");
    let bad = d.cli_raw(&["token", "create", "--ttl-s", "5"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    // The event log through the CLI: web1's life, in order.
    let events = d.cli_json(&["events", "--filter", "vm.*", "--last", "1000"]);
    let topics: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["topic"].as_str().unwrap())
        .collect();
    assert_eq!(topics.first(), Some(&"vm.created"), "{topics:?}");
    assert_eq!(topics.last(), Some(&"vm.deleted"), "{topics:?}");
    assert!(topics.contains(&"vm.state_changed"), "{topics:?}");
    // The audit log: the login and every change, never a token.
    let logins = d.cli_json(&[
        "list",
        "audit",
        "-q",
        "path=/v1/auth/login",
        "-q",
        "status=200",
    ]);
    assert_eq!(logins["items"].as_array().unwrap().len(), 1, "{logins}");
    let all = d.cli(&["list", "audit", "-o", "json", "--limit", "100000"]);
    assert!(!all.contains(&d.token()));
    let expunges = d.cli_json(&["list", "audit", "-q", "path~=%/actions/expunge"]);
    // The CLI submits and then waits for the job: the request was accepted with a job.
    let e = &expunges["items"][0];
    assert_eq!(e["status"], 202, "{expunges}");
    assert!(
        e["job_uuid"].is_string() && e["user_uuid"].is_string(),
        "{expunges}"
    );
}

/// Submit `n` VM creations through the API at once; their job uuids.
async fn submit_vms(c: &StratusClient, prefix: &str, n: usize) -> Vec<String> {
    let find = |kind: &'static str, name: &'static str| {
        let c = c.clone();
        async move {
            let items = c.list(kind, &[&format!("name={name}")]).await.unwrap();
            items[0]["uuid"].as_str().unwrap().to_string()
        }
    };
    let offering = find("instance-offerings", "small").await;
    let image = find("images", "tiny").await;
    let l3 = find("l3-networks", "net1").await;
    let mut tasks = Vec::new();
    for i in 0..n {
        let c = c.clone();
        let body = json!({"name": format!("{prefix}-{i}"), "instance_offering_uuid": offering,
            "image_uuid": image, "l3_network_uuids": [l3]});
        tasks.push(tokio::spawn(async move {
            c.submit("POST", "/v1/vms", Some(&body)).await
        }));
    }
    let mut jobs = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        let s = t.await.unwrap();
        jobs.push(
            s.unwrap_or_else(|e| panic!("{prefix}-{i} was refused: {e}"))
                .job
                .to_string(),
        );
    }
    jobs
}

/// Wait (bounded) until no job runs and no VM or volume is in a transitional state, twice in a
/// row (a job that ends may start another step's work).
async fn settle(c: &StratusClient) {
    let until = Instant::now() + Duration::from_secs(300);
    let mut quiet = 0;
    loop {
        // A read that fails is "not settled yet", never "nothing there".
        let running = c.count("jobs", &["state=Running"]).await.ok();
        let vms = c.list("vms", &[]).await.map(|vms| {
            vms.iter().any(|v| {
                v["state"]
                    .as_str()
                    .and_then(|s| s.parse::<VmState>().ok())
                    .is_none_or(VmState::is_transitional)
            })
        });
        let volumes = c.list("volumes", &[]).await.map(|vs| {
            vs.iter().any(|v| {
                v["state"]
                    .as_str()
                    .and_then(|s| s.parse::<VolumeState>().ok())
                    .is_none_or(VolumeState::is_transitional)
            })
        });
        let still = running != Some(0) || vms != Ok(false) || volumes != Ok(false);
        quiet = if still { 0 } else { quiet + 1 };
        if quiet == 2 {
            return;
        }
        assert!(
            Instant::now() < until,
            "not settled in 300 s: {running:?} jobs running"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The books, read through the API: host counters equal their reservations, each reservation
/// belongs to a VM on that host that holds capacity and each such VM has one, every address is
/// counted by its range and belongs to a NIC of an existing VM.
async fn check_books(c: &StratusClient) {
    let vms: HashMap<String, Value> = c
        .list("vms", &[])
        .await
        .unwrap()
        .into_iter()
        .map(|v| (v["uuid"].as_str().unwrap().to_string(), v))
        .collect();
    let reservations = c.list("reservations", &[]).await.unwrap();
    let mut used: HashMap<String, (i64, i64)> = HashMap::new();
    let mut held: HashMap<String, usize> = HashMap::new();
    for r in &reservations {
        let vm = vms
            .get(r["vm_uuid"].as_str().unwrap())
            .unwrap_or_else(|| panic!("reservation {r} of no VM"));
        assert_eq!(vm["host_uuid"], r["host_uuid"], "reservation {r} of {vm}");
        let e = used
            .entry(r["host_uuid"].as_str().unwrap().into())
            .or_default();
        e.0 += r["cpu"].as_i64().unwrap();
        e.1 += r["memory_mib"].as_i64().unwrap();
        *held
            .entry(r["vm_uuid"].as_str().unwrap().into())
            .or_default() += 1;
    }
    for h in c.list("hosts", &[]).await.unwrap() {
        let (cpu, mem) = used
            .get(h["uuid"].as_str().unwrap())
            .copied()
            .unwrap_or((0, 0));
        assert_eq!(
            (
                h["cpu_used"].as_i64().unwrap(),
                h["memory_used_mib"].as_i64().unwrap()
            ),
            (cpu, mem),
            "host {h}"
        );
    }
    for (u, vm) in &vms {
        let state: VmState = vm["state"].as_str().unwrap().parse().unwrap();
        let n = held.get(u).copied().unwrap_or(0);
        assert_eq!(
            n,
            usize::from(state.holds_capacity()),
            "VM {vm} holds {n} reservations"
        );
    }
    let nics = c.list("vm-nics", &[]).await.unwrap();
    for n in &nics {
        assert!(
            vms.contains_key(n["vm_uuid"].as_str().unwrap()),
            "NIC {n} of no VM"
        );
    }
    let used_ips = c.count("used-ips", &[]).await.unwrap();
    let counted: i64 = c
        .list("ip-ranges", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r["used"].as_i64().unwrap())
        .sum();
    let addressed = nics.iter().filter(|n| !n["ip"].is_null()).count() as u64;
    assert_eq!(
        (used_ips, counted as u64),
        (addressed, addressed),
        "addresses"
    );
}

/// The hosts the CLI did not add, through the API.
async fn add_hosts(d: &Deployment, c: &StratusClient) {
    let token = std::fs::read_to_string(d.dir.join("agent-token")).unwrap();
    let cluster = c.list("clusters", &["name=c1"]).await.unwrap()[0]["uuid"].clone();
    let mut tasks = Vec::new();
    for i in CLI_HOSTS..HOSTS {
        let c = c.clone();
        let body = json!({"name": format!("h{i}"), "cluster_uuid": cluster,
            "address": format!("http://{}/h/{i}", d.agent), "token": token.trim()});
        tasks.push(tokio::spawn(async move {
            c.submit("POST", "/v1/hosts", Some(&body)).await
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("host add accepted");
    }
    settle(c).await;
    assert_eq!(
        c.count("hosts", &["status=Connected"]).await.unwrap(),
        HOSTS as u64
    );
}

/// What the event readers got: the SSE follower's numbers in arrival order, and the
/// webhook's (at least once each).
struct Readers {
    followed: Arc<Mutex<Vec<i64>>>,
    hooked: Arc<Mutex<BTreeSet<i64>>>,
    /// Events the webhook got with a wrong signature.
    forged: Arc<Mutex<Vec<i64>>>,
    /// The webhook gets the events after this one.
    hook_from: i64,
    follower: tokio::task::JoinHandle<anyhow::Result<i64>>,
}

/// Follow the event log from its start over SSE, and register a webhook (every event) with a
/// receiver that checks each signature.
async fn start_readers(d: &Deployment, c: &StratusClient) -> Readers {
    let followed = Arc::new(Mutex::new(Vec::new()));
    let f = followed.clone();
    let follow = stratus_deploy::sse::Follow {
        addr: d.api.trim_start_matches("http://").parse().unwrap(),
        token: d.token(),
        filter: String::new(),
        after: Some(0),
        reconnect_for: Duration::from_secs(120),
    };
    let follower = tokio::spawn(async move {
        stratus_deploy::sse::follow(&follow, |m| {
            f.lock().unwrap().push(m.seq);
            true
        })
        .await
    });
    let hooked = Arc::new(Mutex::new(BTreeSet::new()));
    let forged = Arc::new(Mutex::new(Vec::new()));
    let (h, b) = (hooked.clone(), forged.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |hs: axum::http::HeaderMap, body: axum::body::Bytes| {
            let (h, b) = (h.clone(), b.clone());
            async move {
                let sig = hs.get(H_SIGNATURE).and_then(|v| v.to_str().ok());
                let e: Value = serde_json::from_slice(&body).unwrap_or_default();
                let seq = e["seq"].as_i64().unwrap_or(-1);
                if sig != Some(signature(WEBHOOK_SECRET, &body).as_str()) {
                    b.lock().unwrap().push(seq);
                    return axum::http::StatusCode::BAD_REQUEST;
                }
                h.lock().unwrap().insert(seq);
                axum::http::StatusCode::OK
            }
        }),
    );
    let l = stratus_rt::http::Listener::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let url = format!("http://{}/hook", l.addr());
    l.serve(app);
    let body = json!({"url": url, "secret": WEBHOOK_SECRET});
    let hook = c.submit("POST", "/v1/webhooks", Some(&body)).await.unwrap();
    let v = c
        .get(&format!("/v1/jobs/{}?wait=30", hook.job))
        .await
        .unwrap();
    let hook_from = v["result"]["cursor"]
        .as_i64()
        .expect("the webhook's cursor");
    Readers {
        followed,
        hooked,
        forged,
        hook_from,
        follower,
    }
}

/// Every event so far reached both readers: the follower got 1..=last in order, each once;
/// the webhook every one after its start (bounded wait).
async fn check_readers(c: &StratusClient, r: &Readers) -> i64 {
    let top = c.get("/v1/events?sort=-seq&limit=1").await.unwrap();
    let last = top["items"][0]["seq"]
        .as_i64()
        .expect("events were written");
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let followed = r.followed.lock().unwrap().clone();
        let hooked = r.hooked.lock().unwrap().clone();
        let forged = r.forged.lock().unwrap().clone();
        assert!(
            forged.is_empty(),
            "webhook deliveries with a wrong signature: {forged:?}"
        );
        let follower_done = followed.last().is_some_and(|s| *s >= last);
        let hook_done = ((r.hook_from + 1)..=last).all(|s| hooked.contains(&s));
        if follower_done && hook_done {
            let want: Vec<i64> = (1..=followed.len() as i64).collect();
            assert_eq!(
                followed, want,
                "the SSE follower missed or repeated an event"
            );
            return last;
        }
        assert!(
            !r.follower.is_finished(),
            "the follower ended: {:?}",
            followed.last()
        );
        assert!(
            Instant::now() < until,
            "not every event arrived in 120 s: last {last}, followed up to {:?}, webhook missing {:?}",
            followed.last(),
            ((r.hook_from + 1)..=last).find(|s| !hooked.contains(s))
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn deployment_survives_kill_and_restart(name: &str, database: Option<String>) {
    let mut d = Deployment::start(name, database);
    walk_through(&d);
    let rt = rt();
    let readers = rt.block_on(async {
        let c = d.client();
        add_hosts(&d, &c).await;
        let readers = start_readers(&d, &c).await;
        let first = submit_vms(&c, "batch", 280).await;
        assert_eq!(first.len(), 280);
        settle(&c).await;
        assert_eq!(c.count("vms", &["state=Running"]).await.unwrap(), 280);
        check_books(&c).await;
        readers
    });
    // kill -9 while creations run: the restart finishes or rolls back each.
    let jobs = rt.block_on(async {
        let c = d.client();
        let jobs = submit_vms(&c, "killed", 200).await;
        assert_eq!(jobs.len(), 200, "every create was accepted before the kill");
        tokio::time::sleep(Duration::from_millis(700)).await;
        // The kill must land on work in flight, or the restart proves nothing.
        let mut running = 0;
        for j in &jobs {
            let v = c.get(&format!("/v1/jobs/{j}")).await.unwrap();
            running += usize::from(v["state"] == "Running");
        }
        assert!(running > 0, "no create was still running at the kill");
        jobs
    });
    d.kill9_serve();
    d.start_serve();
    rt.block_on(async {
        let c = d.client();
        settle(&c).await;
        let mut succeeded = 0;
        for j in &jobs {
            let v = c.get(&format!("/v1/jobs/{j}")).await.unwrap();
            match v["state"].as_str() {
                Some("Succeeded") => succeeded += 1,
                Some("Failed") => {}
                _ => panic!("job {v} did not end"),
            }
        }
        // Each create that succeeded has its VM running; each that failed left none.
        let running = c.count("vms", &["state=Running"]).await.unwrap();
        assert_eq!(running, 280 + succeeded, "VMs running after the restart");
        assert_eq!(c.count("vms", &[]).await.unwrap(), running, "VMs left over");
        check_books(&c).await;
        // The node works on after its restart.
        let more = submit_vms(&c, "after", 19).await;
        assert_eq!(more.len(), 19);
        settle(&c).await;
        assert_eq!(
            c.count("vms", &["state=Running"]).await.unwrap(),
            running + 19
        );
        check_books(&c).await;
        // No event lost across the kill, none repeated to the follower.
        let last = check_readers(&c, &readers).await;
        eprintln!("{name}: {last} events followed over SSE and delivered to the webhook");
        readers.follower.abort();
    });
    // A graceful stop exits 0.
    let status = d.stop_serve();
    assert!(status.success(), "serve exited {status:?}");
    let _ = std::fs::remove_dir_all(&d.dir);
}

#[test]
#[ignore = "minutes long: run by ci/e2e"]
fn sqlite_deployment_walk_through_kill_and_restart() {
    deployment_survives_kill_and_restart("sqlite", None);
}

#[test]
#[ignore = "minutes long: run by ci/e2e"]
fn postgres_deployment_walk_through_kill_and_restart() {
    let Ok(url) = std::env::var("STRATUS_TEST_PG_URL") else {
        assert!(
            std::env::var("CI").is_err(),
            "CI is set but STRATUS_TEST_PG_URL is not: ci/e2e must start PostgreSQL"
        );
        eprintln!("STRATUS_TEST_PG_URL not set; skipping the PostgreSQL deployment test");
        return;
    };
    let db = format!("stratus_e2e_{}", std::process::id());
    rt().block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {db}"))
            .execute(&mut conn)
            .await
            .unwrap();
    });
    let (base, _) = url.rsplit_once('/').unwrap();
    deployment_survives_kill_and_restart("postgres", Some(format!("{base}/{db}")));
}
