//! Extension points: the plugin registry.
//!
//! Plugins implement the hook traits below and are registered once at start-up; the registry is
//! then frozen and shared. Services call the hooks at fixed points of their workflows; plugins
//! never call into a service's internals (they talk to services through the bus like anyone
//! else).

use crate::cascade::CascadeParticipant;
use crate::error::Error;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use uuid::Uuid;

stratus_store::text_enum! {
    /// VM operations with before/after hooks.
    pub enum VmOp {
        Create = "create",
        Start = "start",
        Stop = "stop",
        Reboot = "reboot",
        Destroy = "destroy",
        Recover = "recover",
        Expunge = "expunge",
        Migrate = "migrate",
    }
}

/// What a VM hook is told about the VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub uuid: Uuid,
    pub name: String,
    pub host: Option<Uuid>,
    pub state: String,
}

/// Hooks around VM operations. `before` may veto the operation with an error; `after` is told
/// the outcome and cannot change it.
#[async_trait]
pub trait VmHook: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    async fn before(&self, _op: VmOp, _vm: &VmInfo) -> Result<(), Error> {
        Ok(())
    }
    async fn after(&self, _op: VmOp, _vm: &VmInfo, _outcome: Result<(), &Error>) {}
}

/// What a host hook is told about the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    pub uuid: Uuid,
    pub name: String,
    pub address: String,
    pub cluster: Uuid,
}

/// Hooks on host connection changes. A `connected` error fails the connect.
#[async_trait]
pub trait HostHook: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    async fn connected(&self, _host: &HostInfo) -> Result<(), Error> {
        Ok(())
    }
    async fn disconnected(&self, _host: &HostInfo) {}
}

/// What a VM needs from a host.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AllocationSpec {
    pub cpu: i64,
    pub memory_mib: i64,
    /// Local disk needed for the VM's volumes.
    pub disk_mib: i64,
    pub l2_networks: Vec<Uuid>,
    pub zone: Option<Uuid>,
    pub cluster: Option<Uuid>,
    pub host: Option<Uuid>,
    pub avoid_hosts: Vec<Uuid>,
}

/// A host still in the running for an allocation, with its free capacity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostCandidate {
    pub host: Uuid,
    pub cluster: Uuid,
    pub zone: Uuid,
    pub cpu_free: i64,
    pub memory_free_mib: i64,
    pub disk_free_mib: i64,
    pub vms: i64,
}

/// An allocator filter removes hosts that cannot take the VM. Filters run in registration order
/// after the built-in ones; when a filter leaves no host, its name appears in the error.
pub trait AllocatorFilter: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn filter(&self, spec: &AllocationSpec, candidates: Vec<HostCandidate>) -> Vec<HostCandidate>;
}

/// One API request that asked for a change, as it was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub at_ms: i64,
    /// Who asked (none: nobody authenticated, as at a login).
    pub account: Option<Uuid>,
    pub user: Option<Uuid>,
    pub method: String,
    pub path: String,
    /// The resource the answer names, and the job it started.
    pub resource: Option<Uuid>,
    pub job: Option<Uuid>,
    /// The HTTP status of the answer, and its error code when it refused or failed.
    pub status: u16,
    pub code: Option<String>,
    /// The client's address.
    pub client: Option<String>,
}

/// An audit sink sees every API request that asks for a change, once it is answered (the
/// built-in one, `services::audit::StoreAudit`, keeps them as `audit` rows).
#[async_trait]
pub trait AuditSink: Send + Sync + 'static {
    async fn record(&self, record: &AuditRecord);
}

/// The frozen registry of all plugins.
#[derive(Default, Clone)]
pub struct Extensions {
    pub vm_hooks: Vec<Arc<dyn VmHook>>,
    pub host_hooks: Vec<Arc<dyn HostHook>>,
    pub allocator_filters: Vec<Arc<dyn AllocatorFilter>>,
    pub cascade: Vec<Arc<dyn CascadeParticipant>>,
    pub audit: Vec<Arc<dyn AuditSink>>,
}

/// Each plugin by what names it (hooks and filters by name, cascade participants by the kind
/// they delete); audit sinks have no name and are counted.
impl std::fmt::Debug for Extensions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn names<T: ?Sized>(v: &[Arc<T>], name: impl Fn(&T) -> &'static str) -> Vec<&'static str> {
            v.iter().map(|p| name(p)).collect()
        }
        f.debug_struct("Extensions")
            .field("vm_hooks", &names(&self.vm_hooks, |h| h.name()))
            .field("host_hooks", &names(&self.host_hooks, |h| h.name()))
            .field(
                "allocator_filters",
                &names(&self.allocator_filters, |a| a.name()),
            )
            .field("cascade", &names(&self.cascade, |c| c.kind()))
            .field("audit", &self.audit.len())
            .finish()
    }
}

impl Extensions {
    pub fn builder() -> ExtensionsBuilder {
        ExtensionsBuilder::default()
    }

    /// Run every VM `before` hook in order; the first error vetoes the operation.
    pub async fn vm_before(&self, op: VmOp, vm: &VmInfo) -> Result<(), Error> {
        for h in &self.vm_hooks {
            h.before(op, vm)
                .await
                .map_err(|e| e.context(format!("{} hook {} refused", op, h.name())))?;
        }
        Ok(())
    }

    pub async fn vm_after(&self, op: VmOp, vm: &VmInfo, outcome: Result<(), &Error>) {
        for h in &self.vm_hooks {
            h.after(op, vm, outcome).await;
        }
    }

    pub async fn host_connected(&self, host: &HostInfo) -> Result<(), Error> {
        for h in &self.host_hooks {
            h.connected(host)
                .await
                .map_err(|e| e.context(format!("host hook {} refused", h.name())))?;
        }
        Ok(())
    }

    pub async fn host_disconnected(&self, host: &HostInfo) {
        for h in &self.host_hooks {
            h.disconnected(host).await;
        }
    }

    /// Apply every allocator filter; returns the survivors, or the name of the filter that left
    /// none.
    pub fn filter_hosts(
        &self,
        spec: &AllocationSpec,
        mut candidates: Vec<HostCandidate>,
    ) -> Result<Vec<HostCandidate>, &'static str> {
        for f in &self.allocator_filters {
            candidates = f.filter(spec, candidates);
            if candidates.is_empty() {
                return Err(f.name());
            }
        }
        Ok(candidates)
    }

    pub async fn audit(&self, record: &AuditRecord) {
        for a in &self.audit {
            a.record(record).await;
        }
    }
}

/// Collects plugins at start-up.
#[derive(Default)]
pub struct ExtensionsBuilder {
    ext: Extensions,
}

impl ExtensionsBuilder {
    pub fn vm_hook(mut self, h: impl VmHook) -> Self {
        self.ext.vm_hooks.push(Arc::new(h));
        self
    }
    pub fn host_hook(mut self, h: impl HostHook) -> Self {
        self.ext.host_hooks.push(Arc::new(h));
        self
    }
    pub fn allocator_filter(mut self, f: impl AllocatorFilter) -> Self {
        self.ext.allocator_filters.push(Arc::new(f));
        self
    }
    pub fn cascade(mut self, p: Arc<dyn CascadeParticipant>) -> Self {
        self.ext.cascade.push(p);
        self
    }
    pub fn audit(mut self, a: impl AuditSink) -> Self {
        self.ext.audit.push(Arc::new(a));
        self
    }
    pub fn build(self) -> Arc<Extensions> {
        Arc::new(self.ext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use std::sync::Mutex;

    struct Quota {
        seen: Arc<Mutex<Vec<String>>>,
    }

    #[async_trait]
    impl VmHook for Quota {
        fn name(&self) -> &'static str {
            "quota"
        }
        async fn before(&self, op: VmOp, vm: &VmInfo) -> Result<(), Error> {
            self.seen
                .lock()
                .unwrap()
                .push(format!("before {op} {}", vm.name));
            if vm.name == "too-big" {
                return Err(Error::new(ErrorCode::CapacityExhausted, "quota exceeded"));
            }
            Ok(())
        }
        async fn after(&self, op: VmOp, vm: &VmInfo, outcome: Result<(), &Error>) {
            self.seen.lock().unwrap().push(format!(
                "after {op} {} ok={}",
                vm.name,
                outcome.is_ok()
            ));
        }
    }

    struct EvenHostsOnly;
    impl AllocatorFilter for EvenHostsOnly {
        fn name(&self) -> &'static str {
            "even-hosts"
        }
        fn filter(&self, _spec: &AllocationSpec, c: Vec<HostCandidate>) -> Vec<HostCandidate> {
            c.into_iter()
                .filter(|h| h.host.as_u128() % 2 == 0)
                .collect()
        }
    }

    fn vm(name: &str) -> VmInfo {
        VmInfo {
            uuid: Uuid::from_u128(1),
            name: name.into(),
            host: None,
            state: "Created".into(),
        }
    }

    fn cand(h: u128) -> HostCandidate {
        HostCandidate {
            host: Uuid::from_u128(h),
            cluster: Uuid::nil(),
            zone: Uuid::nil(),
            cpu_free: 1,
            memory_free_mib: 1,
            disk_free_mib: 1,
            vms: 0,
        }
    }

    #[test]
    fn debug_names_the_plugins() {
        let ext = Extensions::builder()
            .vm_hook(Quota {
                seen: Arc::default(),
            })
            .allocator_filter(EvenHostsOnly)
            .build();
        let text = format!("{ext:?}");
        assert!(text.contains(r#"vm_hooks: ["quota"]"#), "{text}");
        assert!(
            text.contains(r#"allocator_filters: ["even-hosts"]"#),
            "{text}"
        );
        assert!(text.contains("host_hooks: []"), "{text}");
        assert!(text.contains("audit: 0"), "{text}");
    }

    #[tokio::test]
    async fn vm_hooks_run_and_can_veto() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let ext = Extensions::builder()
            .vm_hook(Quota { seen: seen.clone() })
            .build();
        ext.vm_before(VmOp::Create, &vm("web")).await.unwrap();
        let err = ext
            .vm_before(VmOp::Create, &vm("too-big"))
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::CapacityExhausted);
        assert!(err.message.contains("quota"), "{}", err.message);
        ext.vm_after(VmOp::Create, &vm("web"), Ok(())).await;
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                "before create web",
                "before create too-big",
                "after create web ok=true"
            ]
        );
    }

    #[test]
    fn filters_narrow_candidates_and_name_the_one_that_left_none() {
        let ext = Extensions::builder()
            .allocator_filter(EvenHostsOnly)
            .build();
        let spec = AllocationSpec::default();
        let left = ext
            .filter_hosts(&spec, vec![cand(1), cand(2), cand(4)])
            .unwrap();
        assert_eq!(left.len(), 2);
        assert_eq!(
            ext.filter_hosts(&spec, vec![cand(3)]).unwrap_err(),
            "even-hosts"
        );
    }
}
