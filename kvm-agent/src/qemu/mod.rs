//! The QEMU backend of the agent (std build): a QEMU process per VM driven over QMP, qcow2
//! volumes made with `qemu-img`, images fetched once into a cache, Linux bridges, taps and
//! dnsmasq for the networks ([`net`]).
//!
//! Everything lives under the state directory, so a restarted agent finds it again:
//! - `images/<uuid>.img`: the image cache (checksum checked when the image has one);
//! - `volumes/<uuid>.qcow2`: volumes (a root volume is an overlay on its image);
//! - `vms/<uuid>/`: `vm.json` (the spec and the phase), `qmp.sock`, `qemu.pid`, `console.log`
//!   (the serial console), `qemu.log` (QEMU's own output);
//! - `net/<bridge>/`: what the agent made for a bridge, and its dnsmasq.
//!
//! QEMU runs in its own process group, so an agent that stops or is killed leaves its VMs
//! running; the next agent re-adopts them from their pid files and monitors. A QEMU that exits
//! without being told is reported at once (its monitor closes): `Stopped` when the guest shut
//! down, `Crashed` otherwise.
//!
//! Each command cleans up after its own failure: a VM that does not start leaves no process,
//! tap or record; a volume that cannot be made leaves no file.

mod cmdline;
mod exec;
pub mod net;
mod qmp;

pub use cmdline::Accel;

use async_trait::async_trait;
use cmdline::{disk_id, node_name, VmFiles};
use net::Networks;
use qmp::Qmp;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stratus_agent_protocol::*;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::Hypervisor;

/// How the backend runs.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub state_dir: PathBuf,
    /// Put before every interface name the agent makes or looks up.
    pub bridge_prefix: String,
    pub qemu: String,
    pub qemu_img: String,
    pub dnsmasq: String,
    /// `None`: KVM when it runs guests here, else TCG ([`detect_accel`]).
    pub accel: Option<Accel>,
    /// The address migrations come in on (the agent's own).
    pub migration_ip: IpAddr,
    /// The host's token: shown to the management node when fetching an image it serves.
    pub token: String,
}

/// How long a stop waits for QEMU to quit after `quit`, and then after SIGKILL.
const QUIT_WAIT: Duration = Duration::from_secs(5);
/// How long a detach waits for the guest to let go of the disk.
const DETACH_WAIT: Duration = Duration::from_secs(30);
/// A destination that was made ready lets go of it after this long without the VM or its
/// disks coming.
const INCOMING_IDLE: Duration = Duration::from_secs(120);
/// How long each phase of a migration may run: the management node's default
/// `agent.timeout.vm_migrate`, after which it has rolled the migration back anyway.
const MIGRATE_LIMIT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Phase {
    /// Being started (its network is held; not reported yet).
    Starting,
    Running,
    /// A migration's destination, not yet sent the VM (not reported).
    Incoming,
    Stopped,
    Crashed,
}

impl Phase {
    /// Whether the VM holds its taps and bridge.
    fn holds_network(self) -> bool {
        !matches!(self, Phase::Stopped)
    }
}

/// What `vm.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    spec: VmSpec,
    phase: Phase,
    /// While incoming: the ports it waits on.
    #[serde(default)]
    ready: Option<ReceiveReply>,
}

struct VmState {
    rec: Record,
    qmp: Option<Arc<Qmp>>,
    pid: Option<u32>,
    /// The agent stops it: its exit is no crash.
    expect_exit: bool,
    /// The guest shut itself down (QMP `SHUTDOWN` from the guest).
    guest_shutdown: bool,
}

struct Slot {
    /// One command at a time per VM.
    op: tokio::sync::Mutex<()>,
    st: Mutex<VmState>,
}

struct Inner {
    cfg: QemuConfig,
    accel: Accel,
    version: String,
    vms: Mutex<HashMap<Uuid, Arc<Slot>>>,
    /// Volumes here and their sizes (MiB).
    volumes: Mutex<HashMap<Uuid, u64>>,
    net: Networks,
    /// One network change at a time.
    net_lock: tokio::sync::Mutex<()>,
    /// One image fetch or volume creation at a time.
    disk_lock: tokio::sync::Mutex<()>,
    events_tx: mpsc::UnboundedSender<ReportEvent>,
    events_rx: Mutex<Option<mpsc::UnboundedReceiver<ReportEvent>>>,
    /// The management node's address: the one place the host's token is shown for an image.
    management: Mutex<Option<SocketAddr>>,
}

/// The QEMU hypervisor. Cheap to clone.
#[derive(Clone)]
pub struct QemuHypervisor {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A console log is cut to its last this many bytes when its VM starts.
const CONSOLE_KEEP: u64 = 1 << 20;

/// Cut `path` to its last `keep` bytes when it is longer than twice that.
fn keep_tail(path: &Path, keep: u64) {
    let Ok(len) = std::fs::metadata(path).map(|m| m.len()) else {
        return;
    };
    if len <= 2 * keep {
        return;
    }
    if let Ok((text, _)) = QemuHypervisor::tail(path, keep) {
        let _ = write_atomic(path, text.as_bytes());
    }
}

/// Refuse a VM with more NICs or a higher disk index than the PCI layout has room for.
fn fits(spec: &VmSpec) -> Result<(), AgentError> {
    if spec.nics.len() > cmdline::MAX_NICS {
        return Err(AgentError::new(
            AgentErrorCode::InvalidArgument,
            format!(
                "{} NICs; a VM here has at most {}",
                spec.nics.len(),
                cmdline::MAX_NICS
            ),
        ));
    }
    match spec
        .disks
        .iter()
        .find(|d| cmdline::disk_slot(d.device).is_none())
    {
        Some(d) => Err(AgentError::new(
            AgentErrorCode::InvalidArgument,
            format!(
                "disk device index {} is above {}, the last PCI slot for disks",
                d.device,
                cmdline::MAX_DISK_DEVICE
            ),
        )),
        None => Ok(()),
    }
}

fn io_err(what: &str, e: std::io::Error) -> AgentError {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        return AgentError::new(
            AgentErrorCode::InsufficientCapacity,
            format!("{what}: no space left on the host"),
        );
    }
    AgentError::failed(format!("{what}: {e}"))
}

/// Write `data` to `path` through a temporary file and a rename: never half-written.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), AgentError> {
    let tmp = path.with_extension("tmp");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io_err("cannot make a directory", e))?;
    }
    std::fs::write(&tmp, data)
        .map_err(|e| io_err(&format!("cannot write {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(&format!("cannot write {}", path.display()), e))
}

/// KVM when `/dev/kvm` opens and a QEMU under KVM starts without complaint within two seconds
/// (a nested KVM that lacks CPU features warns, and then fails guests); TCG otherwise. Returns
/// the choice and why.
pub async fn detect_accel(qemu: &str) -> (Accel, String) {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return (Accel::Tcg, format!("/dev/kvm: {e}"));
    }
    let probe = tokio::process::Command::new(qemu)
        .args([
            "-machine",
            "pc,accel=kvm",
            "-m",
            "16",
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            "none",
            "-monitor",
            "none",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match probe {
        Ok(c) => c,
        Err(e) => return (Accel::Tcg, format!("cannot run {qemu}: {e}")),
    };
    let exited = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
    let _ = child.start_kill();
    let _ = child.wait().await;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use tokio::io::AsyncReadExt;
        let _ = e.read_to_string(&mut err).await;
    }
    match exited {
        Ok(status) => (
            Accel::Tcg,
            format!("QEMU under KVM exited ({status:?}): {}", err.trim()),
        ),
        Err(_) if !err.trim().is_empty() => (Accel::Tcg, format!("QEMU under KVM: {}", err.trim())),
        Err(_) => (Accel::Kvm, "QEMU runs under KVM".into()),
    }
}

impl QemuHypervisor {
    /// Open the state directory, detect the accelerator, re-adopt the VMs still running and
    /// set the networks to what they need.
    pub async fn open(cfg: QemuConfig) -> Result<QemuHypervisor, AgentError> {
        // The state directory may be passed through (0711) but only `net/` read by others:
        // dnsmasq drops to `nobody` and then reads its hosts file there. Disks and records are
        // root's alone.
        use std::os::unix::fs::PermissionsExt;
        let mode = |d: &Path, m: u32| -> Result<(), AgentError> {
            std::fs::create_dir_all(d)
                .and_then(|()| std::fs::set_permissions(d, std::fs::Permissions::from_mode(m)))
                .map_err(|e| io_err(&format!("cannot make {}", d.display()), e))
        };
        mode(&cfg.state_dir, 0o711)?;
        for d in ["images", "volumes", "vms"] {
            mode(&cfg.state_dir.join(d), 0o700)?;
        }
        mode(&cfg.state_dir.join("net"), 0o755)?;
        for dir in cfg.state_dir.join("net").ancestors() {
            let m = std::fs::metadata(dir)
                .map_err(|e| io_err(&format!("cannot look at {}", dir.display()), e))?;
            if m.permissions().mode() & 0o001 == 0 {
                return Err(AgentError::new(
                    AgentErrorCode::InvalidArgument,
                    format!(
                        "{} is closed to others: dnsmasq (which runs as nobody) could not read \
                         its hosts under {}; make it traversable (chmod o+x) or choose another \
                         --state-dir",
                        dir.display(),
                        cfg.state_dir.display()
                    ),
                ));
            }
        }
        let version = exec::run(&exec::argv([cfg.qemu.as_str(), "--version"]))
            .await?
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        let accel = match cfg.accel {
            Some(a) => a,
            None => {
                let (a, why) = detect_accel(&cfg.qemu).await;
                tracing::info!(accel = a.as_str(), why, "accelerator chosen");
                a
            }
        };
        let net = Networks::new(&cfg.bridge_prefix, &cfg.state_dir, &cfg.dnsmasq)
            .map_err(|e| io_err("cannot make the network state directory", e))?;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let hv = QemuHypervisor {
            inner: Arc::new(Inner {
                cfg,
                accel,
                version,
                vms: Mutex::default(),
                volumes: Mutex::default(),
                net,
                net_lock: tokio::sync::Mutex::new(()),
                disk_lock: tokio::sync::Mutex::new(()),
                events_tx,
                events_rx: Mutex::new(Some(events_rx)),
                management: Mutex::new(None),
            }),
        };
        hv.load_volumes().await?;
        hv.adopt().await;
        // A network that cannot be set up fails the commands that need it, not the agent.
        if let Err(e) = hv.sync_network(None).await {
            tracing::error!(error = %e, "cannot set up the networks of the VMs here");
        }
        Ok(hv)
    }

    pub fn accel(&self) -> Accel {
        self.inner.accel
    }

    fn dir(&self, sub: &str) -> PathBuf {
        self.inner.cfg.state_dir.join(sub)
    }

    fn volume_path(&self, v: Uuid) -> PathBuf {
        self.dir("volumes").join(format!("{v}.qcow2"))
    }

    fn vm_dir(&self, vm: Uuid) -> PathBuf {
        self.dir("vms").join(vm.to_string())
    }

    async fn load_volumes(&self) -> Result<(), AgentError> {
        let dir = self.dir("volumes");
        let entries = std::fs::read_dir(&dir).map_err(|e| io_err("cannot read volumes", e))?;
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name
                .strip_suffix(".qcow2")
                .and_then(|s| Uuid::parse_str(s).ok())
            else {
                // A creation cut short by a crash.
                tracing::info!(file = %p.display(), "removing a leftover volume file");
                let _ = std::fs::remove_file(&p);
                continue;
            };
            match self.image_info(&p).await {
                Ok((_, size)) => {
                    lock(&self.inner.volumes).insert(id, size.div_ceil(1 << 20));
                }
                // Not reported: the management node's state sync decides what it is.
                Err(e) => tracing::error!(volume = %id, error = %e, "an unreadable volume"),
            }
        }
        Ok(())
    }

    /// Format and virtual size (bytes) of a disk image.
    async fn image_info(&self, p: &Path) -> Result<(String, u64), AgentError> {
        let out = exec::run(&exec::argv([
            self.inner.cfg.qemu_img.as_str(),
            "info",
            "-U",
            "--output=json",
            &p.display().to_string(),
        ]))
        .await?;
        let v: Value = serde_json::from_str(&out)
            .map_err(|e| AgentError::failed(format!("qemu-img info {}: {e}", p.display())))?;
        Ok((
            v["format"].as_str().unwrap_or("raw").to_string(),
            v["virtual-size"].as_u64().unwrap_or(0),
        ))
    }

    /// Find the VMs of the state directory: running ones are re-adopted through their monitor;
    /// those that should run but do not are crashed; half-received ones are dropped.
    async fn adopt(&self) {
        let Ok(entries) = std::fs::read_dir(self.dir("vms")) else {
            return;
        };
        for e in entries.flatten() {
            let Ok(vm) = Uuid::parse_str(&e.file_name().to_string_lossy()) else {
                continue;
            };
            let dir = e.path();
            let rec: Record = match std::fs::read(dir.join("vm.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                Some(r) => r,
                None => {
                    let _ = std::fs::remove_dir_all(&dir);
                    continue;
                }
            };
            let mut pid = exec::read_pid(&dir.join("qemu.pid"))
                .filter(|p| exec::alive_with(*p, &vm.to_string()));
            let mut qmp = match pid {
                Some(_) => Qmp::connect(&dir.join("qmp.sock"), Duration::from_secs(2))
                    .await
                    .ok(),
                None => None,
            };
            let mut rec = rec;
            let never_ran = !dir.join("console.log").exists();
            match (rec.phase, &qmp) {
                (Phase::Starting, _) if !never_ran => {
                    // A start cut short: the VM is stopped; its half-started QEMU goes.
                    if let Some(pid) = pid.take() {
                        exec::kill(pid, libc::SIGKILL);
                    }
                    qmp = None;
                    self.remove_taps(&rec.spec).await;
                    rec.phase = Phase::Stopped;
                }
                (Phase::Incoming, _) | (Phase::Starting, _) => {
                    // Never became this host's: let go of it.
                    if let Some(pid) = pid {
                        exec::kill(pid, libc::SIGKILL);
                    }
                    if rec.phase == Phase::Incoming {
                        for d in &rec.spec.disks {
                            let _ = std::fs::remove_file(self.volume_path(d.volume));
                            lock(&self.inner.volumes).remove(&d.volume);
                        }
                    }
                    for n in &rec.spec.nics {
                        self.inner.net.remove_tap(n.uuid).await;
                    }
                    let _ = std::fs::remove_dir_all(&dir);
                    continue;
                }
                (Phase::Running, Some(_)) => {
                    tracing::info!(%vm, pid = ?pid, "re-adopted a running VM");
                }
                (Phase::Running, None) => {
                    tracing::warn!(%vm, "a VM died while the agent was away: crashed");
                    rec.phase = Phase::Crashed;
                }
                (_, Some(_)) => {
                    // Running though stopped on record (a stop cut short): running it is.
                    rec.phase = Phase::Running;
                }
                (_, None) => {}
            }
            let slot = Arc::new(Slot {
                op: tokio::sync::Mutex::new(()),
                st: Mutex::new(VmState {
                    rec,
                    qmp: qmp.clone(),
                    pid,
                    expect_exit: false,
                    guest_shutdown: false,
                }),
            });
            let _ = self.persist(vm, &slot);
            lock(&self.inner.vms).insert(vm, slot);
            if let Some(q) = qmp {
                self.watch(vm, q);
            }
        }
    }

    fn persist(&self, vm: Uuid, slot: &Slot) -> Result<(), AgentError> {
        let rec = lock(&slot.st).rec.clone();
        let data =
            serde_json::to_vec_pretty(&rec).map_err(|e| AgentError::failed(e.to_string()))?;
        write_atomic(&self.vm_dir(vm).join("vm.json"), &data)
    }

    fn slot(&self, vm: Uuid) -> Option<Arc<Slot>> {
        lock(&self.inner.vms).get(&vm).cloned()
    }

    /// Bridges and dnsmasqs for the NICs of the VMs that hold their network, nothing else. An
    /// error only for what `need` (a VM being started or received) needs: a bridge of another
    /// VM that cannot be set up is logged, and does not hold this one back.
    async fn sync_network(&self, need: Option<&VmSpec>) -> Result<(), AgentError> {
        let _g = self.inner.net_lock.lock().await;
        let prefix = self.inner.net.prefix();
        let specs: Vec<VmSpec> = {
            let vms = lock(&self.inner.vms);
            vms.values()
                .filter_map(|s| {
                    let st = lock(&s.st);
                    st.rec.phase.holds_network().then(|| st.rec.spec.clone())
                })
                .collect()
        };
        let mut nics = Vec::new();
        for spec in &specs {
            match net::wants(prefix, &spec.nics) {
                Ok(_) => nics.extend(spec.nics.iter().cloned()),
                Err(e) if need.is_some_and(|n| n.uuid == spec.uuid) => return Err(e),
                Err(e) => {
                    tracing::warn!(vm = %spec.uuid, error = %e, "a VM's NICs cannot be served")
                }
            }
        }
        let wants = net::wants(prefix, &nics)?;
        let mut failed = self.inner.net.apply(&wants).await;
        for nic in need.map(|n| n.nics.as_slice()).unwrap_or_default() {
            if let Some(e) = failed.remove(&net::bridge(prefix, nic)?) {
                return Err(e);
            }
        }
        Ok(())
    }

    async fn remove_taps(&self, spec: &VmSpec) {
        for n in &spec.nics {
            self.inner.net.remove_tap(n.uuid).await;
        }
    }

    /// Start QEMU for `spec` (taps made first); connected to its monitor.
    async fn spawn(
        &self,
        spec: &VmSpec,
        incoming: Option<SocketAddr>,
    ) -> Result<(Arc<Qmp>, u32), AgentError> {
        let dir = self.vm_dir(spec.uuid);
        std::fs::create_dir_all(&dir).map_err(|e| io_err("cannot make the VM's directory", e))?;
        let (sock, console, pidfile, log) = (
            dir.join("qmp.sock"),
            dir.join("console.log"),
            dir.join("qemu.pid"),
            dir.join("qemu.log"),
        );
        let _ = std::fs::remove_file(&sock);
        let _ = std::fs::remove_file(&pidfile);
        keep_tail(&console, CONSOLE_KEEP);
        let mut taps = Vec::new();
        for n in &spec.nics {
            taps.push(self.inner.net.add_tap(n).await?);
        }
        let args = cmdline::qemu_args(
            spec,
            self.inner.accel,
            &VmFiles {
                qmp: &sock,
                console: &console,
                pidfile: &pidfile,
            },
            |v| self.volume_path(v).display().to_string(),
            &taps,
            incoming,
        );
        let out = std::fs::File::create(&log).map_err(|e| io_err("cannot make qemu.log", e))?;
        let mut child = tokio::process::Command::new(&self.inner.cfg.qemu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(|e| io_err("qemu.log", e))?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .map_err(|e| AgentError::failed(format!("cannot run {}: {e}", self.inner.cfg.qemu)))?;
        let pid = child.id().unwrap_or(0);
        tracing::debug!(vm = %spec.uuid, pid, args = %args.join(" "), "QEMU started");
        // Reap it when it ends (a re-adopted QEMU is the init process's child instead).
        let (exited_tx, mut exited) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = exited_tx.send(status);
        });
        let qmp = tokio::select! {
            q = Qmp::connect(&sock, Duration::from_secs(15)) => q,
            _ = &mut exited => {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(AgentError::failed(format!("QEMU exited at once: {}", text.trim())));
            }
        };
        match qmp {
            Ok(q) => Ok((q, pid)),
            Err(e) => {
                exec::kill(pid, libc::SIGKILL);
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                Err(AgentError::failed(format!("{e}: {}", text.trim())))
            }
        }
    }

    /// Follow a QEMU's monitor until it closes, then settle what its exit means.
    fn watch(&self, vm: Uuid, qmp: Arc<Qmp>) {
        let hv = self.clone();
        let mut events = qmp.subscribe();
        tokio::spawn(async move {
            let note = |ev: &Value| {
                if ev["event"] == "SHUTDOWN" && ev["data"]["guest"] == true {
                    if let Some(s) = hv.slot(vm) {
                        lock(&s.st).guest_shutdown = true;
                    }
                }
            };
            loop {
                tokio::select! {
                    // Events first: a guest's SHUTDOWN comes just before the monitor closes.
                    biased;
                    ev = events.recv() => match ev {
                        Ok(ev) => note(&ev),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(_) => break,
                    },
                    _ = qmp.closed() => break,
                }
            }
            while let Ok(ev) = events.try_recv() {
                note(&ev);
            }
            hv.exited(vm, &qmp).await;
        });
    }

    /// A QEMU's monitor closed.
    async fn exited(&self, vm: Uuid, qmp: &Arc<Qmp>) {
        let Some(slot) = self.slot(vm) else { return };
        let (phase, report, spec) = {
            let mut st = lock(&slot.st);
            if !st.qmp.as_ref().is_some_and(|q| Arc::ptr_eq(q, qmp)) {
                return; // An older QEMU of this VM, already dealt with.
            }
            st.qmp = None;
            st.pid = None;
            let was = st.rec.phase;
            let report = match was {
                Phase::Incoming | Phase::Starting => None,
                _ if st.expect_exit => None,
                _ if st.guest_shutdown => {
                    st.rec.phase = Phase::Stopped;
                    Some(PowerState::Stopped)
                }
                _ => {
                    st.rec.phase = Phase::Crashed;
                    Some(PowerState::Crashed)
                }
            };
            (was, report, st.rec.spec.clone())
        };
        if phase == Phase::Incoming {
            // The migration did not come (or failed): this was never the VM's host.
            let _op = slot.op.lock().await;
            if !self.slot(vm).is_some_and(|s| Arc::ptr_eq(&s, &slot)) {
                return; // A newer receive of it.
            }
            let said =
                std::fs::read_to_string(self.vm_dir(vm).join("qemu.log")).unwrap_or_default();
            tracing::info!(%vm, qemu = %said.trim(), "an incoming migration ended without the VM; letting go");
            self.forget(vm, &spec, true).await;
            return;
        }
        let Some(state) = report else { return };
        tracing::warn!(%vm, ?state, "QEMU exited on its own");
        let _ = self.persist(vm, &slot);
        if state == PowerState::Stopped {
            // After any command on the VM: one that started it again meanwhile keeps its taps.
            let _op = slot.op.lock().await;
            let still = {
                let st = lock(&slot.st);
                st.qmp.is_none() && st.rec.phase == Phase::Stopped
            };
            if !still {
                return;
            }
            self.remove_taps(&spec).await;
            let _ = self.sync_network(None).await;
        }
        let _ = self
            .inner
            .events_tx
            .send(ReportEvent::VmState { vm, state });
    }

    /// Drop a VM from this host: its record, taps and (with `disks`) its volumes.
    async fn forget(&self, vm: Uuid, spec: &VmSpec, disks: bool) {
        lock(&self.inner.vms).remove(&vm);
        self.remove_taps(spec).await;
        if disks {
            for d in &spec.disks {
                let _ = std::fs::remove_file(self.volume_path(d.volume));
                lock(&self.inner.volumes).remove(&d.volume);
            }
        }
        let _ = std::fs::remove_dir_all(self.vm_dir(vm));
        if let Err(e) = self.sync_network(None).await {
            tracing::warn!(error = %e, "cannot tidy the networks");
        }
    }

    /// Make a running QEMU quit: the guest is asked first (ACPI) for `graceful` unless `force`,
    /// then QEMU is told to quit, then killed. Returns once it has gone.
    async fn halt(&self, slot: &Slot, graceful: Duration, force: bool) {
        let (qmp, pid, uuid) = {
            let mut st = lock(&slot.st);
            st.expect_exit = true;
            (st.qmp.clone(), st.pid, st.rec.spec.uuid)
        };
        let Some(qmp) = qmp else {
            // A QEMU without a monitor (one that could not be re-adopted): killed.
            if let Some(pid) = pid {
                exec::kill(pid, libc::SIGKILL);
                exec::wait_gone(pid, &uuid.to_string(), QUIT_WAIT).await;
                lock(&slot.st).pid = None;
            }
            return;
        };
        if !force && !graceful.is_zero() && qmp.execute("system_powerdown", None).await.is_ok() {
            let _ = tokio::time::timeout(graceful, qmp.closed()).await;
        }
        if !qmp.is_closed() {
            let _ = qmp.execute("quit", None).await;
            let _ = tokio::time::timeout(QUIT_WAIT, qmp.closed()).await;
        }
        if !qmp.is_closed() {
            if let Some(pid) = pid {
                exec::kill(pid, libc::SIGKILL);
            }
            let _ = tokio::time::timeout(QUIT_WAIT, qmp.closed()).await;
        }
        if let Some(pid) = pid {
            exec::wait_gone(pid, &uuid.to_string(), QUIT_WAIT).await;
        }
        let mut st = lock(&slot.st);
        if st.qmp.as_ref().is_some_and(|q| Arc::ptr_eq(q, &qmp)) {
            st.qmp = None;
            st.pid = None;
        }
    }

    /// Start `spec` here (the caller holds the VM's `op` lock).
    async fn start_locked(&self, slot: &Slot, spec: &VmSpec) -> Result<(), AgentError> {
        fits(spec)?;
        for d in &spec.disks {
            if !self.volume_path(d.volume).exists() {
                return Err(AgentError::not_found(format!(
                    "volume {} is not on this host",
                    d.volume
                )));
            }
        }
        {
            let mut st = lock(&slot.st);
            st.rec.spec = spec.clone();
            st.rec.phase = Phase::Starting;
            st.expect_exit = false;
            st.guest_shutdown = false;
        }
        self.persist(spec.uuid, slot)?;
        let started = async {
            self.sync_network(Some(spec)).await?;
            self.spawn(spec, None).await
        }
        .await;
        match started {
            Ok((qmp, pid)) => {
                {
                    let mut st = lock(&slot.st);
                    st.rec.phase = Phase::Running;
                    st.qmp = Some(qmp.clone());
                    st.pid = Some(pid);
                }
                if let Err(e) = self.persist(spec.uuid, slot) {
                    // Running without a record, a restarted agent would not know it: it goes.
                    self.halt(slot, Duration::ZERO, true).await;
                    lock(&slot.st).rec.phase = Phase::Stopped;
                    self.remove_taps(spec).await;
                    let _ = self.sync_network(None).await;
                    return Err(e);
                }
                self.watch(spec.uuid, qmp);
                Ok(())
            }
            Err(e) => {
                lock(&slot.st).rec.phase = Phase::Stopped;
                let _ = self.persist(spec.uuid, slot);
                self.remove_taps(spec).await;
                let _ = self.sync_network(None).await;
                Err(e)
            }
        }
    }

    fn running_qmp(slot: &Slot) -> Option<Arc<Qmp>> {
        lock(&slot.st).qmp.clone().filter(|q| !q.is_closed())
    }

    /// Fetch an image into the cache (once), checking its checksum; its path and format.
    async fn image(&self, image: &ImageRef) -> Result<(PathBuf, String), AgentError> {
        let path = self.dir("images").join(format!("{}.img", image.uuid));
        if !path.exists() {
            let part = path.with_extension("part");
            let fetched = self.fetch(image, &part).await;
            if let Err(e) = fetched {
                let _ = std::fs::remove_file(&part);
                return Err(e);
            }
            if let Err(e) = self.check_image(&part).await {
                let _ = std::fs::remove_file(&part);
                return Err(e);
            }
            std::fs::rename(&part, &path).map_err(|e| io_err("cannot keep the image", e))?;
        }
        let (format, _) = self.image_info(&path).await?;
        Ok((path, format))
    }

    /// Refuse an image that would make a volume read other files of the host: one with a
    /// backing file or an external data file of its own.
    async fn check_image(&self, p: &Path) -> Result<(), AgentError> {
        let out = exec::run(&exec::argv([
            self.inner.cfg.qemu_img.as_str(),
            "info",
            "--output=json",
            &p.display().to_string(),
        ]))
        .await?;
        let v: Value = serde_json::from_str(&out)
            .map_err(|e| AgentError::failed(format!("qemu-img info: {e}")))?;
        let backing = v.get("backing-filename").and_then(Value::as_str);
        let data_file = v["format-specific"]["data"]
            .get("data-file")
            .and_then(Value::as_str);
        match backing.or(data_file) {
            Some(f) => Err(AgentError::new(
                AgentErrorCode::InvalidArgument,
                format!("the image refers to another file ({f}); images must stand alone"),
            )),
            None => Ok(()),
        }
    }

    async fn fetch(&self, image: &ImageRef, to: &Path) -> Result<(), AgentError> {
        use sha2::Digest;
        let mut hash = sha2::Sha256::new();
        if let Some(p) = image.url.strip_prefix("file://") {
            use std::io::{Read, Write};
            let mut src = std::fs::File::open(p).map_err(|e| {
                let what = format!("image {} at {}: {e}", image.uuid, image.url);
                if e.kind() == std::io::ErrorKind::NotFound {
                    AgentError::not_found(what)
                } else {
                    AgentError::failed(what)
                }
            })?;
            let mut dst =
                std::fs::File::create(to).map_err(|e| io_err("cannot cache the image", e))?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = src
                    .read(&mut buf)
                    .map_err(|e| io_err(&format!("cannot read {}", image.url), e))?;
                if n == 0 {
                    break;
                }
                hash.update(&buf[..n]);
                dst.write_all(&buf[..n])
                    .map_err(|e| io_err("cannot cache the image", e))?;
            }
            dst.sync_all()
                .map_err(|e| io_err("cannot cache the image", e))?;
        } else if image.url.starts_with("http://") {
            let client = stratus_rt::http::HttpClient::new(1);
            let (addr, path) = stratus_rt::http::parse_url(&image.url).map_err(|e| {
                AgentError::new(
                    AgentErrorCode::InvalidArgument,
                    format!("{}: {e}", image.url),
                )
            })?;
            // The token goes to the management node only, never to an address an image names.
            let to_node = *lock(&self.inner.management) == Some(addr);
            let with_token = [(H_TOKEN, self.inner.cfg.token.as_str())];
            let headers: &[(&'static str, &str)] = if to_node { &with_token } else { &[] };
            let r = client
                .get(addr, &path, headers, Duration::from_secs(3600))
                .await
                .map_err(|e| {
                    AgentError::new(AgentErrorCode::Unreachable, format!("{}: {e}", image.url))
                })?;
            if r.status == 404 {
                return Err(AgentError::not_found(format!("image {}: 404", image.url)));
            }
            if r.status == 401 || r.status == 403 {
                return Err(AgentError::new(
                    AgentErrorCode::Unauthorized,
                    format!("image {}: {}", image.url, r.status),
                ));
            }
            if !r.is_success() {
                return Err(AgentError::failed(format!(
                    "image {}: {}",
                    image.url, r.status
                )));
            }
            hash.update(&r.body);
            std::fs::write(to, &r.body).map_err(|e| io_err("cannot cache the image", e))?;
        } else {
            return Err(AgentError::new(
                AgentErrorCode::InvalidArgument,
                format!(
                    "image URL {} is neither file:// nor http:// (this agent fetches no others)",
                    image.url
                ),
            ));
        }
        let got = hex::encode(hash.finalize());
        if let Some(want) = &image.checksum {
            let want = want.strip_prefix("sha256:").unwrap_or(want).to_lowercase();
            if want != got {
                return Err(AgentError::new(
                    AgentErrorCode::InvalidArgument,
                    format!(
                        "image {} has sha256 {got}, not {want} as its record says",
                        image.url
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Free space for volumes, MiB (a filesystem that cannot say is an error, not "full").
    fn free_mib(&self) -> Result<u64, AgentError> {
        exec::filesystem_space(&self.dir("volumes"))
            .map(|(free, _)| free >> 20)
            .map_err(|e| io_err("cannot read the free space", e))
    }

    /// The last `max` bytes of a file and its length.
    fn tail(path: &Path, max: u64) -> std::io::Result<(String, u64)> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((String::new(), 0)),
            Err(e) => return Err(e),
        };
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
        let mut buf = Vec::new();
        f.take(max).read_to_end(&mut buf)?;
        Ok((String::from_utf8_lossy(&buf).into_owned(), len))
    }

    /// After a VM's QEMU came in: it runs here now, or let go of it after a while idle.
    fn watch_incoming(&self, vm: Uuid, qmp: Arc<Qmp>) {
        let hv = self.clone();
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let (mut busy_at, mut last_written) = (start, 0u64);
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if qmp.is_closed() {
                    return; // `exited` lets go of it.
                }
                let status = qmp.status().await.unwrap_or_default();
                let migration = qmp
                    .execute("query-migrate", None)
                    .await
                    .ok()
                    .and_then(|v| v["status"].as_str().map(str::to_string))
                    .unwrap_or_default();
                // Arrived: running, or in whatever state the source was in (paused, say).
                if status == "running" || migration == "completed" {
                    let Some(slot) = hv.slot(vm) else { return };
                    let disks = {
                        let mut st = lock(&slot.st);
                        st.rec.phase = Phase::Running;
                        st.rec.ready = None;
                        st.rec.spec.disks.clone()
                    };
                    for d in disks {
                        lock(&hv.inner.volumes).insert(d.volume, d.size_mib);
                    }
                    let _ = hv.persist(vm, &slot);
                    // The disks came through the NBD server; it has served its turn.
                    let _ = qmp.execute("nbd-server-stop", None).await;
                    tracing::info!(%vm, secs = start.elapsed().as_secs_f64(), "a migrated VM runs here");
                    return;
                }
                // Busy: the migration stream runs, or the disks are being written through the
                // NBD server (QEMU 7.2 reports no incoming status before the stream connects).
                let written: u64 = qmp
                    .execute("query-blockstats", Some(json!({"query-nodes": true})))
                    .await
                    .ok()
                    .and_then(|v| v.as_array().cloned())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|b| b["stats"]["wr_bytes"].as_u64())
                    .sum();
                let streaming = matches!(migration.as_str(), "active" | "setup" | "device");
                if streaming || written != last_written {
                    last_written = written;
                    busy_at = tokio::time::Instant::now();
                }
                if busy_at.elapsed() > INCOMING_IDLE || start.elapsed() > MIGRATE_LIMIT {
                    tracing::warn!(%vm, "no migration came; letting go of the incoming VM");
                    let _ = qmp.execute("quit", None).await;
                    return;
                }
            }
        });
    }
}

/// Poll `what` every 100 ms until `done` says it is (Ok(true)) or it failed (Err), within
/// [`MIGRATE_LIMIT`].
async fn poll<F, Fut>(what: &str, mut done: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, String>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if done().await? {
            return Ok(());
        }
        if start.elapsed() > MIGRATE_LIMIT {
            return Err(format!("{what}: not done after {MIGRATE_LIMIT:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A live migration with local disks, the source's side: mirror every disk to the
/// destination's NBD server until the copies are in step, send the VM with QEMU's migration
/// paused before the switch-over, complete the mirrors there (the guest is paused: nothing more
/// is written), and let the switch-over go.
async fn send(
    qmp: &Qmp,
    disks: &[Uuid],
    jobs: &[String],
    vm_to: SocketAddr,
    disks_to: SocketAddr,
) -> Result<(), String> {
    let e = |e: qmp::QmpError| e.to_string();
    for (v, job) in disks.iter().zip(jobs) {
        let node = node_name(*v);
        qmp.execute(
            "drive-mirror",
            Some(
                json!({"job-id": job, "device": node, "sync": "full", "mode": "existing",
                "format": "raw", "target": format!("nbd://{disks_to}/{node}")}),
            ),
        )
        .await
        .map_err(e)?;
    }
    let in_step = || async {
        let v = qmp.execute("query-block-jobs", None).await.map_err(e)?;
        let list = v.as_array().cloned().unwrap_or_default();
        for j in jobs {
            match list.iter().find(|x| x["device"] == j.as_str()) {
                Some(x) if x["ready"] == true => {}
                Some(_) => return Ok(false),
                None => return Err(format!("disk copy {j} ended early")),
            }
        }
        Ok(true)
    };
    poll("copying the disks", in_step).await?;
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [
            {"capability": "pause-before-switchover", "state": true},
            // The disks went by the mirrors, not by QEMU's (deprecated) block migration.
            {"capability": "block", "state": false}]})),
    )
    .await
    .map_err(e)?;
    qmp.execute("migrate", Some(json!({"uri": format!("tcp:{vm_to}")})))
        .await
        .map_err(e)?;
    let status = || async {
        let v = qmp.execute("query-migrate", None).await.map_err(e)?;
        Ok::<Value, String>(v)
    };
    poll("sending the VM", || async {
        let v = status().await?;
        match v["status"].as_str().unwrap_or("") {
            "pre-switchover" => Ok(true),
            "failed" | "cancelled" => Err(v["error-desc"].as_str().unwrap_or("failed").to_string()),
            _ => Ok(false),
        }
    })
    .await?;
    for j in jobs {
        qmp.execute("block-job-cancel", Some(json!({"device": j})))
            .await
            .map_err(e)?;
    }
    poll("completing the disk copies", || async {
        let v = qmp.execute("query-block-jobs", None).await.map_err(e)?;
        Ok(!v.as_array().is_some_and(|l| {
            l.iter()
                .any(|x| jobs.iter().any(|j| x["device"] == j.as_str()))
        }))
    })
    .await?;
    qmp.execute("migrate-continue", Some(json!({"state": "pre-switchover"})))
        .await
        .map_err(e)?;
    poll("switching over", || async {
        let v = status().await?;
        match v["status"].as_str().unwrap_or("") {
            "completed" => {
                tracing::info!(
                    downtime_ms = v["downtime"].as_u64(),
                    total_ms = v["total-time"].as_u64(),
                    "migrated"
                );
                Ok(true)
            }
            "failed" | "cancelled" => Err(v["error-desc"].as_str().unwrap_or("failed").to_string()),
            _ => Ok(false),
        }
    })
    .await
}

#[async_trait]
impl Hypervisor for QemuHypervisor {
    async fn facts(&self) -> Result<HostFacts, AgentError> {
        let cpu = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|k| k.parse::<u64>().ok())
            })
            .map_or(0, |kib| kib / 1024);
        let used: u64 = lock(&self.inner.volumes).values().sum();
        Ok(HostFacts {
            host_uuid: None,
            hypervisor: format!("{} ({})", self.inner.version, self.inner.accel.as_str()),
            cpu_cores: cpu,
            memory_mib,
            // What volumes may take: the free space and what the volumes here hold already.
            disk_mib: self.free_mib()? + used,
            vms: self.vms().await,
            volumes: self.volumes().await,
        })
    }

    async fn vms(&self) -> Vec<VmStatus> {
        let ids: Vec<Uuid> = lock(&self.inner.vms).keys().copied().collect();
        let mut out = Vec::new();
        for vm in ids {
            if let Some(s) = self.vm_status(vm).await {
                out.push(s);
            }
        }
        out.sort_by_key(|s| s.uuid);
        out
    }

    async fn volumes(&self) -> Vec<VolumeStatus> {
        let mut v: Vec<VolumeStatus> = lock(&self.inner.volumes)
            .iter()
            .map(|(&uuid, &size_mib)| VolumeStatus { uuid, size_mib })
            .collect();
        v.sort_by_key(|s| s.uuid);
        v
    }

    async fn vm_status(&self, vm: Uuid) -> Option<VmStatus> {
        let slot = self.slot(vm)?;
        let (phase, qmp) = {
            let st = lock(&slot.st);
            (st.rec.phase, st.qmp.clone())
        };
        let state = match phase {
            Phase::Starting | Phase::Incoming => return None,
            Phase::Stopped => PowerState::Stopped,
            Phase::Crashed => PowerState::Crashed,
            Phase::Running => match qmp {
                None => PowerState::Crashed,
                Some(q) => match q.status().await.as_deref() {
                    Ok("running") => PowerState::Running,
                    Ok(_) => PowerState::Paused,
                    // Closing now: `exited` settles it.
                    Err(_) => PowerState::Crashed,
                },
            },
        };
        Some(VmStatus { uuid: vm, state })
    }

    async fn start_vm(&self, spec: &VmSpec) -> Result<(), AgentError> {
        let slot = {
            let mut vms = lock(&self.inner.vms);
            vms.entry(spec.uuid)
                .or_insert_with(|| {
                    Arc::new(Slot {
                        op: tokio::sync::Mutex::new(()),
                        st: Mutex::new(VmState {
                            rec: Record {
                                spec: spec.clone(),
                                phase: Phase::Stopped,
                                ready: None,
                            },
                            qmp: None,
                            pid: None,
                            expect_exit: false,
                            guest_shutdown: false,
                        }),
                    })
                })
                .clone()
        };
        let _op = slot.op.lock().await;
        if let Some(q) = Self::running_qmp(&slot) {
            if lock(&slot.st).rec.phase == Phase::Running {
                if matches!(q.status().await.as_deref(), Ok("paused")) {
                    q.execute("cont", None)
                        .await
                        .map_err(|e| AgentError::failed(e.to_string()))?;
                }
                return Ok(());
            }
        }
        let r = self.start_locked(&slot, spec).await;
        if r.is_err() && !self.vm_dir(spec.uuid).join("console.log").exists() {
            // Never ran here: no record of it either.
            lock(&self.inner.vms).remove(&spec.uuid);
            let _ = std::fs::remove_dir_all(self.vm_dir(spec.uuid));
        }
        r
    }

    async fn stop_vm(&self, vm: Uuid, graceful: Duration, force: bool) -> Result<(), AgentError> {
        let slot = self
            .slot(vm)
            .ok_or_else(|| AgentError::not_found(format!("VM {vm} is not on this host")))?;
        let _op = slot.op.lock().await;
        self.halt(&slot, graceful, force).await;
        let spec = {
            let mut st = lock(&slot.st);
            st.rec.phase = Phase::Stopped;
            st.rec.spec.clone()
        };
        self.persist(vm, &slot)?;
        self.remove_taps(&spec).await;
        self.sync_network(None).await
    }

    async fn reboot_vm(&self, vm: Uuid) -> Result<(), AgentError> {
        let slot = self
            .slot(vm)
            .ok_or_else(|| AgentError::not_found(format!("VM {vm} is not on this host")))?;
        let _op = slot.op.lock().await;
        if let Some(q) = Self::running_qmp(&slot) {
            return q
                .execute("system_reset", None)
                .await
                .map(|_| ())
                .map_err(|e| AgentError::failed(e.to_string()));
        }
        // Crashed or stopped: start it again.
        let spec = lock(&slot.st).rec.spec.clone();
        self.start_locked(&slot, &spec).await
    }

    async fn destroy_vm(&self, vm: Uuid) -> Result<(), AgentError> {
        let Some(slot) = self.slot(vm) else {
            return Ok(());
        };
        let _op = slot.op.lock().await;
        self.halt(&slot, Duration::ZERO, true).await;
        let spec = lock(&slot.st).rec.spec.clone();
        self.forget(vm, &spec, false).await;
        Ok(())
    }

    async fn vm_spec(&self, vm: Uuid) -> Result<VmSpec, AgentError> {
        let slot = self
            .slot(vm)
            .ok_or_else(|| AgentError::not_found(format!("VM {vm} is not on this host")))?;
        let st = lock(&slot.st);
        if st.rec.phase != Phase::Running || st.qmp.is_none() {
            return Err(AgentError::failed(format!("VM {vm} is not running")));
        }
        let mut spec = st.rec.spec.clone();
        let vols = lock(&self.inner.volumes);
        for d in &mut spec.disks {
            d.size_mib = vols.get(&d.volume).copied().unwrap_or(d.size_mib);
        }
        Ok(spec)
    }

    async fn receive_vm(&self, spec: &VmSpec) -> Result<ReceiveReply, AgentError> {
        if let Some(slot) = self.slot(spec.uuid) {
            let st = lock(&slot.st);
            match st.rec.phase {
                Phase::Running if st.qmp.is_some() => return Ok(ReceiveReply::default()),
                Phase::Incoming => return Ok(st.rec.ready.unwrap_or_default()),
                _ => {
                    return Err(AgentError::new(
                        AgentErrorCode::AlreadyExists,
                        format!("VM {} is here already ({:?})", spec.uuid, st.rec.phase),
                    ))
                }
            }
        }
        fits(spec)?;
        let need: u64 = spec.disks.iter().map(|d| d.size_mib).sum();
        if need > self.free_mib()? {
            return Err(AgentError::new(
                AgentErrorCode::InsufficientCapacity,
                format!("no space: the VM's disks take {need} MiB"),
            ));
        }
        for d in &spec.disks {
            if self.volume_path(d.volume).exists() {
                return Err(AgentError::new(
                    AgentErrorCode::AlreadyExists,
                    format!("volume {} is here already", d.volume),
                ));
            }
        }
        // Two ports the system hands out, both held while they are chosen (so they differ).
        let listen = || {
            std::net::TcpListener::bind((self.inner.cfg.migration_ip, 0))
                .map_err(|e| io_err("no port for the migration", e))
        };
        let (a, b) = (listen()?, listen()?);
        let port_of = |l: &std::net::TcpListener| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(|e| io_err("no port for the migration", e))
        };
        let (port, disk_port) = (port_of(&a)?, port_of(&b)?);
        drop((a, b));
        let ready = ReceiveReply {
            migration_port: Some(port),
            disk_port: Some(disk_port),
        };
        let slot = Arc::new(Slot {
            op: tokio::sync::Mutex::new(()),
            st: Mutex::new(VmState {
                rec: Record {
                    spec: spec.clone(),
                    phase: Phase::Incoming,
                    ready: Some(ready),
                },
                qmp: None,
                pid: None,
                expect_exit: false,
                guest_shutdown: false,
            }),
        });
        lock(&self.inner.vms).insert(spec.uuid, slot.clone());
        let _op = slot.op.lock().await;
        let made = async {
            self.persist(spec.uuid, &slot)?;
            let _disks = self.inner.disk_lock.lock().await;
            for d in &spec.disks {
                let p = self.volume_path(d.volume);
                let args = cmdline::blank_args(&p, d.size_mib);
                let mut argv = vec![self.inner.cfg.qemu_img.clone()];
                argv.extend(args);
                exec::run(&argv).await?;
            }
            drop(_disks);
            self.sync_network(Some(spec)).await?;
            let at = SocketAddr::new(self.inner.cfg.migration_ip, port);
            let (qmp, pid) = self.spawn(spec, Some(at)).await?;
            // The disks come first, written through an NBD server into the blank volumes.
            let exported = async {
                let ip = self.inner.cfg.migration_ip.to_string();
                qmp.execute(
                    "nbd-server-start",
                    Some(json!({"addr": {"type": "inet",
                        "data": {"host": ip, "port": disk_port.to_string()}}})),
                )
                .await?;
                for d in &spec.disks {
                    let node = node_name(d.volume);
                    qmp.execute(
                        "block-export-add",
                        Some(json!({"type": "nbd", "id": format!("x{node}"),
                            "node-name": node, "name": node, "writable": true})),
                    )
                    .await?;
                }
                Ok::<(), qmp::QmpError>(())
            }
            .await;
            match exported {
                Ok(()) => Ok((qmp, pid)),
                Err(e) => {
                    exec::kill(pid, libc::SIGKILL);
                    Err(AgentError::failed(format!("cannot take the disks: {e}")))
                }
            }
        }
        .await;
        match made {
            Ok((qmp, pid)) => {
                {
                    let mut st = lock(&slot.st);
                    st.qmp = Some(qmp.clone());
                    st.pid = Some(pid);
                }
                self.watch(spec.uuid, qmp.clone());
                self.watch_incoming(spec.uuid, qmp);
                Ok(ready)
            }
            Err(e) => {
                self.forget(spec.uuid, spec, true).await;
                Err(e)
            }
        }
    }

    async fn send_vm(
        &self,
        vm: Uuid,
        dest: IpAddr,
        ready: &ReceiveReply,
    ) -> Result<(), AgentError> {
        let slot = self
            .slot(vm)
            .ok_or_else(|| AgentError::not_found(format!("VM {vm} is not on this host")))?;
        let _op = slot.op.lock().await;
        let qmp = Self::running_qmp(&slot)
            .ok_or_else(|| AgentError::failed(format!("VM {vm} is not running")))?;
        let (Some(port), Some(disk_port)) = (ready.migration_port, ready.disk_port) else {
            return Err(AgentError::new(
                AgentErrorCode::InvalidArgument,
                "the destination named no port for the VM or for its disks",
            ));
        };
        let disks: Vec<Uuid> = lock(&slot.st)
            .rec
            .spec
            .disks
            .iter()
            .map(|d| d.volume)
            .collect();
        let jobs: Vec<String> = disks
            .iter()
            .map(|&v| format!("m{}", node_name(v)))
            .collect();
        let sent = send(
            &qmp,
            &disks,
            &jobs,
            SocketAddr::new(dest, port),
            SocketAddr::new(dest, disk_port),
        )
        .await;
        let sent = match sent {
            // Done after all (its end was not seen in time): it runs there, not here.
            Err(_)
                if qmp
                    .execute("query-migrate", None)
                    .await
                    .is_ok_and(|v| v["status"] == "completed") =>
            {
                Ok(())
            }
            other => other,
        };
        if let Err(e) = &sent {
            tracing::warn!(%vm, error = %e, "migration failed; the VM stays here");
            let _ = qmp.execute("migrate_cancel", None).await;
            for j in &jobs {
                let _ = qmp
                    .execute(
                        "block-job-cancel",
                        Some(json!({"device": j, "force": true})),
                    )
                    .await;
            }
            if qmp.status().await.as_deref().is_ok_and(|s| s != "running") {
                let _ = qmp.execute("cont", None).await;
            }
        }
        sent.map_err(|e| AgentError::failed(format!("migration of {vm} to {dest}: {e}")))
    }

    async fn release_migrated(&self, vm: Uuid) -> Result<(), AgentError> {
        let Some(slot) = self.slot(vm) else {
            return Ok(());
        };
        let _op = slot.op.lock().await;
        self.halt(&slot, Duration::ZERO, true).await;
        let spec = lock(&slot.st).rec.spec.clone();
        self.forget(vm, &spec, true).await;
        Ok(())
    }

    async fn create_volume(&self, cmd: &CreateVolumeCmd) -> Result<VolumeStatus, AgentError> {
        let _g = self.inner.disk_lock.lock().await;
        if let Some(&size_mib) = lock(&self.inner.volumes).get(&cmd.volume) {
            return Ok(VolumeStatus {
                uuid: cmd.volume,
                size_mib,
            });
        }
        let free = self.free_mib()?;
        if cmd.size_mib > free {
            return Err(AgentError::new(
                AgentErrorCode::InsufficientCapacity,
                format!("no space: {} MiB asked, {free} MiB free", cmd.size_mib),
            ));
        }
        let path = self.volume_path(cmd.volume);
        let part = path.with_extension("part");
        let made = async {
            let args = match &cmd.image {
                Some(image) => {
                    let (base, format) = self.image(image).await?;
                    let (_, vsize) = self.image_info(&base).await?;
                    let size = cmd.size_mib.max(vsize.div_ceil(1 << 20));
                    (cmdline::overlay_args(&base, &format, &part, size), size)
                }
                None => (cmdline::blank_args(&part, cmd.size_mib), cmd.size_mib),
            };
            let mut argv = vec![self.inner.cfg.qemu_img.clone()];
            argv.extend(args.0);
            exec::run(&argv).await?;
            std::fs::rename(&part, &path).map_err(|e| io_err("cannot keep the volume", e))?;
            Ok::<u64, AgentError>(args.1)
        }
        .await;
        match made {
            Ok(size_mib) => {
                lock(&self.inner.volumes).insert(cmd.volume, size_mib);
                Ok(VolumeStatus {
                    uuid: cmd.volume,
                    size_mib,
                })
            }
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                Err(e)
            }
        }
    }

    async fn delete_volume(&self, volume: Uuid) -> Result<(), AgentError> {
        let user = {
            let vms = lock(&self.inner.vms);
            vms.iter()
                .find(|(_, s)| {
                    lock(&s.st)
                        .rec
                        .spec
                        .disks
                        .iter()
                        .any(|d| d.volume == volume)
                })
                .map(|(u, _)| *u)
        };
        if let Some(vm) = user {
            return Err(AgentError::failed(format!(
                "volume {volume} is a disk of VM {vm}"
            )));
        }
        let _g = self.inner.disk_lock.lock().await;
        match std::fs::remove_file(self.volume_path(volume)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("cannot delete the volume", e)),
        }
        lock(&self.inner.volumes).remove(&volume);
        Ok(())
    }

    async fn attach_volume(&self, vm: Uuid, disk: &DiskSpec) -> Result<(), AgentError> {
        let slot = self
            .slot(vm)
            .ok_or_else(|| AgentError::not_found(format!("VM {vm} is not on this host")))?;
        if !self.volume_path(disk.volume).exists() {
            return Err(AgentError::not_found(format!(
                "volume {} is not on this host",
                disk.volume
            )));
        }
        let _op = slot.op.lock().await;
        if lock(&slot.st)
            .rec
            .spec
            .disks
            .iter()
            .any(|d| d.volume == disk.volume)
        {
            return Ok(());
        }
        let slot_no = cmdline::disk_slot(disk.device).ok_or_else(|| {
            AgentError::new(
                AgentErrorCode::InvalidArgument,
                format!("disk device index {} has no PCI slot", disk.device),
            )
        })?;
        if let Some(q) = Self::running_qmp(&slot) {
            let node = node_name(disk.volume);
            let file = self.volume_path(disk.volume).display().to_string();
            q.execute(
                "blockdev-add",
                Some(json!({"driver": "qcow2", "node-name": node,
                    "file": {"driver": "file", "filename": file}})),
            )
            .await
            .map_err(|e| AgentError::failed(e.to_string()))?;
            if let Err(e) = q
                .execute(
                    "device_add",
                    Some(json!({"driver": "virtio-blk-pci", "drive": node,
                        "id": disk_id(disk.volume), "addr": format!("{slot_no:#x}")})),
                )
                .await
            {
                let _ = q
                    .execute("blockdev-del", Some(json!({"node-name": node})))
                    .await;
                return Err(AgentError::failed(e.to_string()));
            }
        }
        lock(&slot.st).rec.spec.disks.push(disk.clone());
        self.persist(vm, &slot)
    }

    async fn detach_volume(&self, vm: Uuid, volume: Uuid) -> Result<(), AgentError> {
        let Some(slot) = self.slot(vm) else {
            return Ok(());
        };
        let _op = slot.op.lock().await;
        if !lock(&slot.st)
            .rec
            .spec
            .disks
            .iter()
            .any(|d| d.volume == volume)
        {
            return Ok(());
        }
        if let Some(q) = Self::running_qmp(&slot) {
            let id = disk_id(volume);
            let mut events = q.subscribe();
            match q.execute("device_del", Some(json!({"id": id}))).await {
                Ok(_) => {
                    let gone = tokio::time::timeout(DETACH_WAIT, async {
                        while let Ok(ev) = events.recv().await {
                            if ev["event"] == "DEVICE_DELETED"
                                && ev["data"]["device"] == id.as_str()
                            {
                                return true;
                            }
                        }
                        false
                    })
                    .await;
                    if gone != Ok(true) {
                        return Err(AgentError::failed(format!(
                            "the guest of VM {vm} did not let go of volume {volume} within {DETACH_WAIT:?}"
                        )));
                    }
                }
                // Not there (attached while stopped, say): nothing to unplug.
                Err(qmp::QmpError::Refused { class, .. }) if class == "DeviceNotFound" => {}
                Err(e) => return Err(AgentError::failed(e.to_string())),
            }
            let _ = q
                .execute(
                    "blockdev-del",
                    Some(json!({"node-name": node_name(volume)})),
                )
                .await;
        }
        lock(&slot.st).rec.spec.disks.retain(|d| d.volume != volume);
        self.persist(vm, &slot)
    }

    async fn console(&self, vm: Uuid, max_bytes: u64) -> Result<ConsoleReply, AgentError> {
        if self.slot(vm).is_none() {
            return Err(AgentError::not_found(format!(
                "VM {vm} is not on this host"
            )));
        }
        let (text, total_bytes) = Self::tail(&self.vm_dir(vm).join("console.log"), max_bytes)
            .map_err(|e| io_err("cannot read the console", e))?;
        Ok(ConsoleReply { text, total_bytes })
    }

    fn management_node(&self, report_url: &str) {
        if let Ok((addr, _)) = stratus_rt::http::parse_url(report_url) {
            *lock(&self.inner.management) = Some(addr);
        }
    }

    fn take_events(&self) -> Option<mpsc::UnboundedReceiver<ReportEvent>> {
        lock(&self.inner.events_rx).take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_console_log_keeps_its_end() {
        let dir = std::env::temp_dir().join(format!("stratus-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("console.log");
        std::fs::write(&log, "a".repeat(300)).unwrap();
        keep_tail(&log, 100);
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text, "a".repeat(100), "cut to its last 100 bytes");
        keep_tail(&log, 100);
        assert_eq!(
            std::fs::read_to_string(&log).unwrap().len(),
            100,
            "short enough: kept"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
