//! The simulated hypervisor: capacity, VMs and volumes of one host, with per-command latency
//! drawn from the seed.
//!
//! A host's [`SimHostState`] is its hardware and disk: it lives outside the host's madsim node,
//! so it survives a crash. A crash loses the running VMs (they are found stopped after restart)
//! and keeps the volumes.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use stratus_agent_protocol::{
    AgentError, AgentErrorCode, CommandKind, ConsoleReply, CreateVolumeCmd, DiskSpec, HostFacts,
    PowerState, ReceiveReply, ReportEvent, VmSpec, VmStatus, VolumeStatus,
};
use stratus_kvm_agent::Hypervisor;
use tokio::sync::mpsc;
use uuid::Uuid;

/// Hardware of a simulated host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostProfile {
    pub cpu_cores: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
}

#[derive(Debug, Clone)]
pub struct SimVm {
    pub spec: VmSpec,
    pub state: PowerState,
}

/// What is on a host: survives the host's crashes (like its disks do).
#[derive(Debug)]
pub struct SimHostState {
    pub profile: HostProfile,
    pub vms: BTreeMap<Uuid, SimVm>,
    /// Volume uuid → size.
    pub volumes: BTreeMap<Uuid, u64>,
    /// Images cached on local storage (not counted against volumes).
    pub images: BTreeSet<Uuid>,
    /// Commands executed, by kind (for reports).
    pub executed: BTreeMap<CommandKind, u64>,
    /// Local storage taken by something else (a disk that filled up: the disk-full fault).
    pub filled_mib: u64,
    /// How far the host's clock is ahead of the management node's (behind when negative).
    pub clock_offset_ms: i64,
}

impl SimHostState {
    pub fn new(profile: HostProfile) -> Self {
        SimHostState {
            profile,
            vms: BTreeMap::new(),
            volumes: BTreeMap::new(),
            images: BTreeSet::new(),
            executed: BTreeMap::new(),
            filled_mib: 0,
            clock_offset_ms: 0,
        }
    }

    fn memory_in_use(&self) -> u64 {
        self.vms
            .values()
            .filter(|v| v.state == PowerState::Running || v.state == PowerState::Paused)
            .map(|v| v.spec.memory_mib)
            .sum()
    }

    fn disk_in_use(&self) -> u64 {
        self.volumes.values().sum::<u64>() + self.filled_mib
    }

    /// The disk fills up: everything free is taken (new volumes and migrations in fail).
    pub fn fill_disk(&mut self) {
        self.filled_mib = 0;
        self.filled_mib = self.profile.disk_mib.saturating_sub(self.disk_in_use());
    }

    /// What filled the disk is removed.
    pub fn free_disk(&mut self) {
        self.filled_mib = 0;
    }

    /// The host lost power: every VM is stopped.
    pub fn power_loss(&mut self) {
        for vm in self.vms.values_mut() {
            vm.state = PowerState::Stopped;
        }
    }
}

/// Latency of each command kind: uniform in `[min, max]` milliseconds.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LatencyProfile {
    pub by_kind: BTreeMap<CommandKind, (u64, u64)>,
}

impl Default for LatencyProfile {
    fn default() -> Self {
        use CommandKind::*;
        let by_kind = [
            (Connect, (5, 50)),
            (Ping, (1, 10)),
            (VmStatus, (1, 10)),
            (VmStart, (300, 1500)),
            (VmStop, (200, 1000)),
            (VmReboot, (500, 2000)),
            (VmDestroy, (100, 500)),
            (VmMigrate, (1000, 5000)),
            (VmReceive, (100, 500)),
            (VolumeCreate, (200, 2000)),
            (VolumeDelete, (50, 300)),
            (VolumeAttach, (50, 300)),
            (VolumeDetach, (50, 300)),
        ]
        .into_iter()
        .collect();
        LatencyProfile { by_kind }
    }
}

impl LatencyProfile {
    /// No latency at all (unit tests).
    pub fn zero() -> Self {
        LatencyProfile {
            by_kind: CommandKind::ALL.into_iter().map(|k| (k, (0, 0))).collect(),
        }
    }
}

#[doc(hidden)]
pub struct Inner {
    state: Arc<Mutex<SimHostState>>,
    latency: LatencyProfile,
    rng: Mutex<ChaCha8Rng>,
    events_tx: mpsc::UnboundedSender<ReportEvent>,
    events_rx: Mutex<Option<mpsc::UnboundedReceiver<ReportEvent>>>,
}

/// A simulated hypervisor over a shared [`SimHostState`]. Clones share everything, so the
/// harness can hold one to crash VMs while the agent runs another.
#[derive(Clone)]
pub struct SimHypervisor {
    inner: Arc<Inner>,
}

impl std::ops::Deref for SimHypervisor {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

fn no_capacity(what: &str) -> AgentError {
    AgentError::new(AgentErrorCode::InsufficientCapacity, what.to_string())
}

impl SimHypervisor {
    /// A hypervisor over `state`; its randomness is drawn from `seed`.
    pub fn new(state: Arc<Mutex<SimHostState>>, latency: LatencyProfile, seed: u64) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        SimHypervisor {
            inner: Arc::new(Inner {
                state,
                latency,
                rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
                events_tx: tx,
                events_rx: Mutex::new(Some(rx)),
            }),
        }
    }

    pub fn state(&self) -> MutexGuard<'_, SimHostState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait as long as a command of `kind` takes, and count it.
    async fn work(&self, kind: CommandKind) {
        let (lo, hi) = self.latency.by_kind.get(&kind).copied().unwrap_or((0, 0));
        let ms = if hi > lo {
            self.rng
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .gen_range(lo..=hi)
        } else {
            lo
        };
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        *self.state().executed.entry(kind).or_default() += 1;
    }

    /// A VM crashes on its own; the agent reports it.
    pub fn crash_vm(&self, vm: Uuid) -> bool {
        let crashed = match self.state().vms.get_mut(&vm) {
            Some(v) if v.state == PowerState::Running => {
                v.state = PowerState::Crashed;
                true
            }
            _ => false,
        };
        if crashed {
            let _ = self.events_tx.send(ReportEvent::VmState {
                vm,
                state: PowerState::Crashed,
            });
        }
        crashed
    }
}

#[async_trait::async_trait]
impl Hypervisor for SimHypervisor {
    async fn facts(&self) -> Result<HostFacts, AgentError> {
        self.work(CommandKind::Connect).await;
        let s = self.state();
        Ok(HostFacts {
            host_uuid: None,
            hypervisor: "sim-kvm".into(),
            cpu_cores: s.profile.cpu_cores,
            memory_mib: s.profile.memory_mib,
            disk_mib: s.profile.disk_mib,
            vms: s
                .vms
                .iter()
                .map(|(u, v)| VmStatus {
                    uuid: *u,
                    state: v.state,
                })
                .collect(),
            volumes: s
                .volumes
                .iter()
                .map(|(u, sz)| VolumeStatus {
                    uuid: *u,
                    size_mib: *sz,
                })
                .collect(),
        })
    }

    async fn vms(&self) -> Vec<VmStatus> {
        self.state()
            .vms
            .iter()
            .map(|(u, v)| VmStatus {
                uuid: *u,
                state: v.state,
            })
            .collect()
    }

    async fn volumes(&self) -> Vec<VolumeStatus> {
        self.state()
            .volumes
            .iter()
            .map(|(u, sz)| VolumeStatus {
                uuid: *u,
                size_mib: *sz,
            })
            .collect()
    }

    async fn vm_status(&self, vm: Uuid) -> Option<VmStatus> {
        self.state().vms.get(&vm).map(|v| VmStatus {
            uuid: vm,
            state: v.state,
        })
    }

    async fn start_vm(&self, spec: &VmSpec) -> Result<(), AgentError> {
        self.work(CommandKind::VmStart).await;
        let mut s = self.state();
        for d in &spec.disks {
            if !s.volumes.contains_key(&d.volume) {
                return Err(AgentError::not_found(format!(
                    "volume {} is not on this host",
                    d.volume
                )));
            }
        }
        let running = s.vms.get(&spec.uuid).map(|v| v.state);
        if running == Some(PowerState::Running) {
            return Ok(());
        }
        if s.memory_in_use() + spec.memory_mib > s.profile.memory_mib {
            return Err(no_capacity("not enough free memory for the VM"));
        }
        s.vms.insert(
            spec.uuid,
            SimVm {
                spec: spec.clone(),
                state: PowerState::Running,
            },
        );
        Ok(())
    }

    async fn stop_vm(&self, vm: Uuid, _graceful: Duration, _force: bool) -> Result<(), AgentError> {
        self.work(CommandKind::VmStop).await;
        match self.state().vms.get_mut(&vm) {
            Some(v) => {
                v.state = PowerState::Stopped;
                Ok(())
            }
            None => Err(AgentError::not_found(format!(
                "VM {vm} is not on this host"
            ))),
        }
    }

    async fn reboot_vm(&self, vm: Uuid) -> Result<(), AgentError> {
        self.work(CommandKind::VmReboot).await;
        match self.state().vms.get_mut(&vm) {
            Some(v) if v.state == PowerState::Running || v.state == PowerState::Crashed => {
                v.state = PowerState::Running;
                Ok(())
            }
            Some(_) => Err(AgentError::failed(format!("VM {vm} is not running"))),
            None => Err(AgentError::not_found(format!(
                "VM {vm} is not on this host"
            ))),
        }
    }

    async fn destroy_vm(&self, vm: Uuid) -> Result<(), AgentError> {
        self.work(CommandKind::VmDestroy).await;
        self.state().vms.remove(&vm);
        Ok(())
    }

    async fn vm_spec(&self, vm: Uuid) -> Result<VmSpec, AgentError> {
        let s = self.state();
        let v = s
            .vms
            .get(&vm)
            .ok_or_else(|| AgentError::not_found(format!("VM {vm} is not on this host")))?;
        if v.state != PowerState::Running {
            return Err(AgentError::failed(format!("VM {vm} is not running")));
        }
        let mut spec = v.spec.clone();
        // Disks travel with their current sizes.
        for d in &mut spec.disks {
            d.size_mib = s.volumes.get(&d.volume).copied().unwrap_or(d.size_mib);
        }
        Ok(spec)
    }

    async fn receive_vm(&self, spec: &VmSpec) -> Result<ReceiveReply, AgentError> {
        self.work(CommandKind::VmReceive).await;
        let mut s = self.state();
        // A simulated VM is taken whole: no port to send it to.
        let whole = ReceiveReply::default();
        if s.vms
            .get(&spec.uuid)
            .is_some_and(|v| v.state == PowerState::Running)
        {
            return Ok(whole);
        }
        let new_disk: u64 = spec
            .disks
            .iter()
            .filter(|d| !s.volumes.contains_key(&d.volume))
            .map(|d| d.size_mib)
            .sum();
        if s.disk_in_use() + new_disk > s.profile.disk_mib {
            return Err(no_capacity(
                "not enough local storage for the migrating disks",
            ));
        }
        if s.memory_in_use() + spec.memory_mib > s.profile.memory_mib {
            return Err(no_capacity("not enough free memory for the migrating VM"));
        }
        for d in &spec.disks {
            s.volumes.insert(d.volume, d.size_mib);
        }
        s.vms.insert(
            spec.uuid,
            SimVm {
                spec: spec.clone(),
                state: PowerState::Running,
            },
        );
        Ok(whole)
    }

    async fn send_vm(
        &self,
        vm: Uuid,
        dest: std::net::IpAddr,
        _ready: &ReceiveReply,
    ) -> Result<(), AgentError> {
        Err(AgentError::new(
            AgentErrorCode::InvalidArgument,
            format!("a simulated host takes VM {vm} whole; it cannot send it to {dest}"),
        ))
    }

    async fn release_migrated(&self, vm: Uuid) -> Result<(), AgentError> {
        self.work(CommandKind::VmMigrate).await;
        let mut s = self.state();
        if let Some(v) = s.vms.remove(&vm) {
            for d in v.spec.disks {
                s.volumes.remove(&d.volume);
            }
        }
        Ok(())
    }

    async fn create_volume(&self, cmd: &CreateVolumeCmd) -> Result<VolumeStatus, AgentError> {
        self.work(CommandKind::VolumeCreate).await;
        let mut s = self.state();
        if let Some(size) = s.volumes.get(&cmd.volume) {
            return Ok(VolumeStatus {
                uuid: cmd.volume,
                size_mib: *size,
            });
        }
        if s.disk_in_use() + cmd.size_mib > s.profile.disk_mib {
            return Err(no_capacity("not enough local storage"));
        }
        if let Some(img) = &cmd.image {
            s.images.insert(img.uuid);
        }
        s.volumes.insert(cmd.volume, cmd.size_mib);
        Ok(VolumeStatus {
            uuid: cmd.volume,
            size_mib: cmd.size_mib,
        })
    }

    async fn delete_volume(&self, volume: Uuid) -> Result<(), AgentError> {
        self.work(CommandKind::VolumeDelete).await;
        let mut s = self.state();
        if let Some(vm) = s
            .vms
            .values()
            .find(|v| v.spec.disks.iter().any(|d| d.volume == volume))
        {
            return Err(AgentError::failed(format!(
                "volume {volume} is still a disk of VM {}",
                vm.spec.uuid
            )));
        }
        s.volumes.remove(&volume);
        Ok(())
    }

    async fn attach_volume(&self, vm: Uuid, disk: &DiskSpec) -> Result<(), AgentError> {
        self.work(CommandKind::VolumeAttach).await;
        let mut s = self.state();
        if !s.volumes.contains_key(&disk.volume) {
            return Err(AgentError::not_found(format!(
                "volume {} is not on this host",
                disk.volume
            )));
        }
        let v = s
            .vms
            .get_mut(&vm)
            .ok_or_else(|| AgentError::not_found(format!("VM {vm} is not on this host")))?;
        if !v.spec.disks.iter().any(|d| d.volume == disk.volume) {
            v.spec.disks.push(disk.clone());
        }
        Ok(())
    }

    async fn detach_volume(&self, vm: Uuid, volume: Uuid) -> Result<(), AgentError> {
        self.work(CommandKind::VolumeDetach).await;
        if let Some(v) = self.state().vms.get_mut(&vm) {
            v.spec.disks.retain(|d| d.volume != volume);
        }
        Ok(())
    }

    async fn console(&self, vm: Uuid, max_bytes: u64) -> Result<ConsoleReply, AgentError> {
        self.work(CommandKind::VmConsole).await;
        let s = self.state();
        let v = s
            .vms
            .get(&vm)
            .ok_or_else(|| AgentError::not_found(format!("VM {vm} is not on this host")))?;
        // A simulated VM has no serial port; its console says what the host knows of it.
        let text = format!("simulated VM {} ({}): {:?}\n", v.spec.name, vm, v.state);
        let total_bytes = text.len() as u64;
        let skip = text.len().saturating_sub(max_bytes as usize);
        Ok(ConsoleReply {
            text: String::from_utf8_lossy(&text.as_bytes()[skip..]).into_owned(),
            total_bytes,
        })
    }

    fn take_events(&self) -> Option<mpsc::UnboundedReceiver<ReportEvent>> {
        self.events_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}
