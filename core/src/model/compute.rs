//! Instance and disk offerings, VM instances and their state machine.

use super::EnableState;
use crate::error::{Error, ErrorCode};
use uuid::Uuid;

stratus_store::resource! {
    /// CPU and memory of a VM.
    pub struct InstanceOffering: "instance_offering" {
        name: String [index, column],
        cpu: i64 [column],
        memory_mib: i64 [column],
        state: EnableState [column],
    }
    relations {
        vms: "vm" (uuid = instance_offering_uuid),
    }
}

stratus_store::resource! {
    /// Size of a data volume.
    pub struct DiskOffering: "disk_offering" {
        name: String [index, column],
        size_mib: i64 [column],
        state: EnableState [column],
    }
    relations {
        volumes: "volume" (uuid = disk_offering_uuid),
    }
}

stratus_store::text_enum! {
    /// A VM's state (after ZStack's).
    pub enum VmState {
        Created = "Created",
        Starting = "Starting",
        Running = "Running",
        Stopping = "Stopping",
        Stopped = "Stopped",
        Rebooting = "Rebooting",
        Migrating = "Migrating",
        Pausing = "Pausing",
        Paused = "Paused",
        Resuming = "Resuming",
        Crashed = "Crashed",
        Unknown = "Unknown",
        Destroying = "Destroying",
        Destroyed = "Destroyed",
        Expunging = "Expunging",
        Error = "Error",
    }
}

stratus_store::text_enum! {
    /// Operations on a VM, for the state machine and error messages.
    pub enum VmAction {
        Start = "start",
        Stop = "stop",
        Reboot = "reboot",
        Destroy = "destroy",
        Recover = "recover",
        Expunge = "expunge",
        Migrate = "migrate",
        AttachVolume = "attach-volume",
        DetachVolume = "detach-volume",
    }
}

impl VmState {
    /// States an operation is in the middle of.
    pub fn is_transitional(self) -> bool {
        matches!(
            self,
            VmState::Created
                | VmState::Starting
                | VmState::Stopping
                | VmState::Rebooting
                | VmState::Migrating
                | VmState::Pausing
                | VmState::Resuming
                | VmState::Destroying
                | VmState::Expunging
        )
    }

    /// Whether a VM in this state holds CPU and memory on a host.
    pub fn holds_capacity(self) -> bool {
        matches!(
            self,
            VmState::Starting
                | VmState::Running
                | VmState::Stopping
                | VmState::Rebooting
                | VmState::Migrating
                | VmState::Pausing
                | VmState::Paused
                | VmState::Resuming
                | VmState::Unknown
                | VmState::Crashed
        )
    }

    /// The states `action` may start from.
    pub fn allowed_from(action: VmAction) -> &'static [VmState] {
        use VmState::*;
        match action {
            VmAction::Start => &[Stopped],
            VmAction::Stop => &[Running, Paused, Crashed, Unknown],
            VmAction::Reboot => &[Running],
            VmAction::Destroy => &[Running, Stopped, Paused, Crashed, Unknown, Error],
            VmAction::Recover => &[Destroyed],
            VmAction::Expunge => &[Destroyed],
            VmAction::Migrate => &[Running],
            VmAction::AttachVolume | VmAction::DetachVolume => &[Running, Stopped],
        }
    }

    pub fn allows(self, action: VmAction) -> bool {
        VmState::allowed_from(action).contains(&self)
    }

    /// Actions possible from this state.
    pub fn actions(self) -> Vec<VmAction> {
        VmAction::ALL
            .iter()
            .copied()
            .filter(|a| self.allows(*a))
            .collect()
    }

    /// Refuse `action` unless this state allows it, with an error that says which states do and
    /// what can be done instead.
    pub fn check(self, vm: Uuid, action: VmAction) -> Result<(), Error> {
        if self.allows(action) {
            return Ok(());
        }
        let allowed: Vec<&str> = VmState::allowed_from(action)
            .iter()
            .map(|s| s.as_str())
            .collect();
        let now: Vec<&str> = self.actions().iter().map(|a| a.as_str()).collect();
        Err(Error::new(
            ErrorCode::InvalidState,
            format!(
                "vm {vm} is {self}; {action} is allowed only when it is {}; from {self} you can: {}",
                allowed.join(" or "),
                if now.is_empty() { "nothing (wait for the current operation)".to_string() } else { now.join(", ") }
            ),
        ))
    }
}

stratus_store::resource! {
    /// A virtual machine.
    pub struct Vm: "vm" {
        name: String [index, column],
        zone_uuid: Uuid [index],
        cluster_uuid: Option<Uuid> [index],
        /// The host it runs on (set while it holds capacity there).
        host_uuid: Option<Uuid> [index, column],
        /// The last host it ran on; with local storage, where its volumes are.
        last_host_uuid: Option<Uuid> [index],
        instance_offering_uuid: Uuid [index],
        image_uuid: Uuid [index],
        root_volume_uuid: Option<Uuid>,
        default_l3_uuid: Option<Uuid>,
        state: VmState [index, column],
        cpu: i64 [column],
        memory_mib: i64 [column],
        description: Option<String>,
        /// The account it belongs to (none: the cloud's own).
        account_uuid: Option<Uuid> [index, column],
    }
    relations {
        zone: "zone" (zone_uuid = uuid),
        cluster: "cluster" (cluster_uuid = uuid),
        host: "host" (host_uuid = uuid),
        nics: "vm_nic" (uuid = vm_uuid),
        volumes: "volume" (uuid = vm_uuid),
        reservations: "reservation" (uuid = vm_uuid),
        offering: "instance_offering" (instance_offering_uuid = uuid),
        image: "image" (image_uuid = uuid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_the_state_and_the_way_out() {
        let vm = Uuid::from_u128(1);
        assert!(VmState::Stopped.check(vm, VmAction::Start).is_ok());
        let e = VmState::Stopped.check(vm, VmAction::Stop).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidState);
        assert!(e.message.contains("is Stopped"), "{}", e.message);
        assert!(e.message.contains("Running or Paused"), "{}", e.message);
        assert!(
            e.message.contains("you can: start, destroy"),
            "{}",
            e.message
        );
        let e = VmState::Starting.check(vm, VmAction::Destroy).unwrap_err();
        assert!(
            e.message.contains("wait for the current operation"),
            "{}",
            e.message
        );
    }

    #[test]
    fn transitional_states_and_capacity() {
        for s in VmState::ALL {
            if s.is_transitional() {
                assert!(
                    s.actions().is_empty(),
                    "{s} allows actions while transitional"
                );
            }
        }
        assert!(VmState::Running.holds_capacity());
        assert!(!VmState::Stopped.holds_capacity());
        assert!(!VmState::Destroyed.holds_capacity());
    }
}
