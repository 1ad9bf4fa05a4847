//! The reference model: what a case has asked for so far, enough to generate operations that
//! name things that can exist and to keep shrinking meaningful (an operation on the third VM
//! goes when the VM's creation is shrunk away; a restart goes with its crash).
//!
//! The model does not predict whether an operation succeeds (capacity, armed faults and a
//! crashed host decide that); the runner keeps the expected state of each resource and checks
//! every outcome against it.

use crate::ops::{
    AgentFault, HostAction, Member, Offering, Op, Tenant, VmAction, FAILABLE, GROUP_MAX,
};
use proptest::prelude::*;
use proptest::strategy::Union;
use proptest_state_machine::ReferenceStateMachine;
use std::collections::BTreeSet;

/// Simulated hosts in the datacenter a case starts with (all added).
pub const BASE_HOSTS: usize = 3;
/// Simulated hosts that run but are not in the database until an `AddHost`.
pub const SPARE_HOSTS: usize = 2;
pub const ALL_HOSTS: usize = BASE_HOSTS + SPARE_HOSTS;
/// Addresses in zone 0's first range (small, so exhaustion happens).
pub const IPS: u16 = 24;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelState {
    /// The madsim seed of the case.
    pub seed: u64,
    /// VMs and volumes asked for (created or not).
    pub vms: usize,
    pub volumes: usize,
    /// Clusters and zones the case created (besides the datacenter's own, index 0).
    pub clusters: usize,
    pub zones: usize,
    pub crashed: BTreeSet<usize>,
    pub partitioned: BTreeSet<usize>,
    pub mgmt_up: bool,
}

impl ModelState {
    pub fn new(seed: u64) -> Self {
        ModelState {
            seed,
            vms: 0,
            volumes: 0,
            clusters: 0,
            zones: 0,
            crashed: BTreeSet::new(),
            partitioned: BTreeSet::new(),
            mgmt_up: true,
        }
    }

    /// Whether `op` may come next.
    pub fn allows(&self, op: &Op) -> bool {
        match op {
            Op::Vm { vm, .. } => *vm < self.vms,
            Op::CreateVolume { attach, .. } => attach.is_none_or(|v| v < self.vms),
            Op::AttachVolume { volume, vm } => *volume < self.volumes && *vm < self.vms,
            Op::DetachVolume { volume } | Op::DeleteVolume { volume } => *volume < self.volumes,
            Op::Host { host, .. } | Op::DeleteHost { host } => *host < ALL_HOSTS,
            Op::AddHost { host } => (BASE_HOSTS..ALL_HOSTS).contains(host),
            Op::DeleteCluster { cluster } => *cluster <= self.clusters,
            Op::DeleteZone { zone } => *zone <= self.zones,
            Op::CrashHost { host } => *host < ALL_HOSTS && !self.crashed.contains(host),
            Op::RestartHost { host } => self.crashed.contains(host),
            Op::PartitionHost { host } => *host < ALL_HOSTS && !self.partitioned.contains(host),
            Op::HealHost { host } => self.partitioned.contains(host),
            Op::KillMgmt => self.mgmt_up,
            Op::RestartMgmt => !self.mgmt_up,
            Op::Group { members } => self.allows_group(members),
            Op::CreateVm { .. }
            | Op::CreateCluster
            | Op::CreateZone
            | Op::AddIpRange
            | Op::FailNext { .. }
            | Op::AgentFault { .. }
            | Op::Settle => true,
        }
    }

    /// A group: two to [`GROUP_MAX`] members, API operations on resources that existed before
    /// it and at most one fault, each allowed in turn.
    fn allows_group(&self, members: &[Member]) -> bool {
        let faults = members.iter().filter(|m| m.op.is_group_fault()).count();
        let kinds_ok = members
            .iter()
            .all(|m| m.op.is_concurrent_api() || m.op.is_group_fault());
        if !(2..=GROUP_MAX).contains(&members.len()) || faults > 1 || !kinds_ok {
            return false;
        }
        let before = self.clone();
        let mut s = self.clone();
        for m in members {
            let names_new = match &m.op {
                Op::Vm { vm, .. } => *vm >= before.vms,
                Op::CreateVolume { attach, .. } => attach.is_some_and(|v| v >= before.vms),
                Op::AttachVolume { volume, vm } => *volume >= before.volumes || *vm >= before.vms,
                Op::DetachVolume { volume } | Op::DeleteVolume { volume } => {
                    *volume >= before.volumes
                }
                _ => false,
            };
            if names_new || !s.allows(&m.op) {
                return false;
            }
            s = s.apply(&m.op);
        }
        true
    }

    pub fn apply(mut self, op: &Op) -> Self {
        match op {
            Op::Group { members } => {
                for m in members {
                    self = self.apply(&m.op);
                }
            }
            Op::CreateVm { .. } => self.vms += 1,
            Op::CreateVolume { .. } => self.volumes += 1,
            Op::CreateCluster => self.clusters += 1,
            Op::CreateZone => self.zones += 1,
            Op::CrashHost { host } => {
                self.crashed.insert(*host);
            }
            Op::RestartHost { host } => {
                self.crashed.remove(host);
            }
            Op::PartitionHost { host } => {
                self.partitioned.insert(*host);
            }
            Op::HealHost { host } => {
                self.partitioned.remove(host);
            }
            Op::KillMgmt => self.mgmt_up = false,
            Op::RestartMgmt => self.mgmt_up = true,
            _ => {}
        }
        self
    }

    /// The operations that may come next, weighted: mostly VM work, some volumes and
    /// infrastructure, a steady trickle of faults.
    pub fn next_ops(&self) -> BoxedStrategy<Op> {
        let mut arms: Vec<(u32, BoxedStrategy<Op>)> = vec![
            (
                50,
                (
                    prop_oneof![
                        4 => Just(Offering::Small),
                        4 => Just(Offering::Medium),
                        1 => Just(Offering::Huge)
                    ],
                    prop::option::weighted(0.2, 0..IPS + 2),
                    tenant(),
                )
                    .prop_map(|(offering, static_ip, tenant)| Op::CreateVm {
                        offering,
                        static_ip,
                        tenant,
                    })
                    .boxed(),
            ),
            (
                15,
                (prop::option::of(0..self.vms.max(1)), tenant())
                    .prop_map(|(attach, tenant)| Op::CreateVolume { attach, tenant })
                    .boxed(),
            ),
            (
                15,
                (
                    0..ALL_HOSTS,
                    prop::sample::select(vec![
                        HostAction::Maintenance,
                        HostAction::Enable,
                        HostAction::Disable,
                    ]),
                )
                    .prop_map(|(host, action)| Op::Host { host, action })
                    .boxed(),
            ),
            (
                5,
                (BASE_HOSTS..ALL_HOSTS)
                    .prop_map(|host| Op::AddHost { host })
                    .boxed(),
            ),
            (
                5,
                (0..ALL_HOSTS)
                    .prop_map(|host| Op::DeleteHost { host })
                    .boxed(),
            ),
            (5, Just(Op::CreateCluster).boxed()),
            (5, Just(Op::CreateZone).boxed()),
            // The datacenter's own cluster and zone go rarely (everything goes with them).
            (1, Just(Op::DeleteCluster { cluster: 0 }).boxed()),
            (1, Just(Op::DeleteZone { zone: 0 }).boxed()),
            (5, Just(Op::AddIpRange).boxed()),
            (
                30,
                (prop::sample::select(FAILABLE.to_vec()), 1..=3u32)
                    .prop_map(|(kind, n)| Op::FailNext { kind, n })
                    .boxed(),
            ),
            (
                20,
                (
                    prop::sample::select(AgentFault::ALL.to_vec()),
                    prop::sample::select(FAILABLE.to_vec()),
                    1..=2u32,
                )
                    .prop_map(|(fault, kind, n)| Op::AgentFault { fault, kind, n })
                    .boxed(),
            ),
            (15, Just(Op::Settle).boxed()),
        ];
        if self.clusters > 0 {
            arms.push((
                10,
                (1..=self.clusters)
                    .prop_map(|cluster| Op::DeleteCluster { cluster })
                    .boxed(),
            ));
        }
        if self.zones > 0 {
            arms.push((
                10,
                (1..=self.zones)
                    .prop_map(|zone| Op::DeleteZone { zone })
                    .boxed(),
            ));
        }
        if self.vms > 0 {
            arms.push((
                110,
                (
                    0..self.vms,
                    prop::sample::select(VmAction::ALL.to_vec()),
                    prop::bool::weighted(0.05),
                )
                    .prop_map(|(vm, action, foreign)| Op::Vm {
                        vm,
                        action,
                        foreign,
                    })
                    .boxed(),
            ));
        }
        if self.volumes > 0 {
            let (vols, vms) = (self.volumes, self.vms.max(1));
            arms.push((
                20,
                prop_oneof![
                    (0..vols, 0..vms).prop_map(|(volume, vm)| Op::AttachVolume { volume, vm }),
                    (0..vols).prop_map(|volume| Op::DetachVolume { volume }),
                    (0..vols).prop_map(|volume| Op::DeleteVolume { volume }),
                ]
                .boxed(),
            ));
        }
        let up: Vec<usize> = (0..ALL_HOSTS)
            .filter(|h| !self.crashed.contains(h))
            .collect();
        if !up.is_empty() {
            arms.push((
                5,
                prop::sample::select(up)
                    .prop_map(|host| Op::CrashHost { host })
                    .boxed(),
            ));
        }
        if !self.crashed.is_empty() {
            let down: Vec<usize> = self.crashed.iter().copied().collect();
            arms.push((
                20,
                prop::sample::select(down)
                    .prop_map(|host| Op::RestartHost { host })
                    .boxed(),
            ));
        }
        let whole: Vec<usize> = (0..ALL_HOSTS)
            .filter(|h| !self.partitioned.contains(h))
            .collect();
        if !whole.is_empty() {
            arms.push((
                5,
                prop::sample::select(whole)
                    .prop_map(|host| Op::PartitionHost { host })
                    .boxed(),
            ));
        }
        if !self.partitioned.is_empty() {
            let cut: Vec<usize> = self.partitioned.iter().copied().collect();
            arms.push((
                20,
                prop::sample::select(cut)
                    .prop_map(|host| Op::HealHost { host })
                    .boxed(),
            ));
        }
        if self.mgmt_up {
            arms.push((5, Just(Op::KillMgmt).boxed()));
            arms.push((25, self.group()));
        } else {
            arms.push((30, Just(Op::RestartMgmt).boxed()));
        }
        Union::new_weighted(arms).boxed()
    }

    /// A concurrent group: two to four API operations (mostly on the case's VMs, so that some
    /// race on the same one), and in half the groups a fault landing among them — a slow
    /// command against a node kill is the race the sequential ops never make.
    fn group(&self) -> BoxedStrategy<Op> {
        let (vms, vols) = (self.vms, self.volumes);
        let mut api: Vec<(u32, BoxedStrategy<Op>)> = vec![(
            2,
            (
                prop_oneof![Just(Offering::Small), Just(Offering::Medium)],
                tenant(),
            )
                .prop_map(|(offering, tenant)| Op::CreateVm {
                    offering,
                    static_ip: None,
                    tenant,
                })
                .boxed(),
        )];
        if vms > 0 {
            api.push((
                8,
                (0..vms, prop::sample::select(VmAction::ALL.to_vec()))
                    .prop_map(|(vm, action)| Op::Vm {
                        vm,
                        action,
                        foreign: false,
                    })
                    .boxed(),
            ));
            api.push((
                1,
                (0..vms)
                    .prop_map(|vm| Op::CreateVolume {
                        attach: Some(vm),
                        tenant: Tenant::Admin,
                    })
                    .boxed(),
            ));
        }
        if vols > 0 {
            let vms1 = vms.max(1);
            api.push((
                3,
                prop_oneof![
                    (0..vols, 0..vms1).prop_map(|(volume, vm)| Op::AttachVolume { volume, vm }),
                    (0..vols).prop_map(|volume| Op::DetachVolume { volume }),
                    (0..vols).prop_map(|volume| Op::DeleteVolume { volume }),
                ]
                .boxed(),
            ));
        }
        let api = Union::new_weighted(api);
        let up: Vec<usize> = (0..ALL_HOSTS)
            .filter(|h| !self.crashed.contains(h) && !self.partitioned.contains(h))
            .collect();
        let mut faults: Vec<(u32, BoxedStrategy<Op>)> = vec![
            (4, Just(Op::KillMgmt).boxed()),
            (
                4,
                (
                    prop::sample::select(AgentFault::ALL.to_vec()),
                    prop::sample::select(FAILABLE.to_vec()),
                    1..=2u32,
                )
                    .prop_map(|(fault, kind, n)| Op::AgentFault { fault, kind, n })
                    .boxed(),
            ),
            (
                2,
                (prop::sample::select(FAILABLE.to_vec()), 1..=2u32)
                    .prop_map(|(kind, n)| Op::FailNext { kind, n })
                    .boxed(),
            ),
        ];
        if !up.is_empty() {
            faults.push((
                1,
                prop::sample::select(up.clone())
                    .prop_map(|host| Op::CrashHost { host })
                    .boxed(),
            ));
            faults.push((
                1,
                prop::sample::select(up)
                    .prop_map(|host| Op::PartitionHost { host })
                    .boxed(),
            ));
        }
        let member = |op: BoxedStrategy<Op>| {
            (0..4_000u32, op).prop_map(|(after_ms, op)| Member { after_ms, op })
        };
        (
            prop::collection::vec(member(api.boxed()), 2..=4),
            prop::option::of(member(Union::new_weighted(faults).boxed())),
        )
            .prop_map(|(mut members, fault)| {
                members.extend(fault);
                Op::Group { members }
            })
            .boxed()
    }
}

/// The proptest-state-machine glue: the initial state carries the case's madsim seed.
pub struct Model;

impl ReferenceStateMachine for Model {
    type State = ModelState;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<ModelState> {
        any::<u64>().no_shrink().prop_map(ModelState::new).boxed()
    }

    fn transitions(state: &ModelState) -> BoxedStrategy<Op> {
        state.next_ops()
    }

    fn apply(state: ModelState, op: &Op) -> ModelState {
        state.apply(op)
    }

    fn preconditions(state: &ModelState, op: &Op) -> bool {
        state.allows(op)
    }
}

/// Whether a whole sequence is valid from a fresh state (replay files are checked with it).
pub fn valid_sequence(seed: u64, ops: &[Op]) -> Result<(), String> {
    let mut s = ModelState::new(seed);
    for (i, op) in ops.iter().enumerate() {
        if !s.allows(op) {
            return Err(format!("operation {i} ({op}) is not allowed there"));
        }
        s = s.apply(op);
    }
    Ok(())
}

/// Who sends a create: mostly the admin, now and then one of the two capped accounts.
fn tenant() -> BoxedStrategy<Tenant> {
    prop_oneof![
        4 => Just(Tenant::Admin),
        1 => Just(Tenant::A),
        1 => Just(Tenant::B)
    ]
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::test_runner::{Config, TestRunner};

    #[test]
    fn generated_sequences_satisfy_their_preconditions() {
        let mut runner = TestRunner::new(Config {
            cases: 64,
            ..Config::default()
        });
        runner
            .run(&Model::sequential_strategy(1..60usize), |(s, ops, _)| {
                prop_assert!(valid_sequence(s.seed, &ops).is_ok());
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn a_restart_needs_its_crash() {
        let s = ModelState::new(1);
        assert!(!s.allows(&Op::RestartHost { host: 0 }));
        let s = s.apply(&Op::CrashHost { host: 0 });
        assert!(s.allows(&Op::RestartHost { host: 0 }));
        assert!(!s.allows(&Op::CrashHost { host: 0 }));
        assert!(!s.allows(&Op::Vm {
            vm: 0,
            action: VmAction::Start,
            foreign: false,
        }));
        assert!(valid_sequence(1, &[Op::KillMgmt, Op::KillMgmt]).is_err());
    }

    #[test]
    fn a_group_names_what_existed_before_it_and_has_one_fault_at_most() {
        let m = |op| Member { after_ms: 0, op };
        let vm = |vm, action| Op::Vm {
            vm,
            action,
            foreign: false,
        };
        let create = Op::CreateVm {
            tenant: Tenant::Admin,
            offering: Offering::Small,
            static_ip: None,
        };
        let s = ModelState::new(1).apply(&create);
        let group = |members| Op::Group { members };
        let race = group(vec![
            m(vm(0, VmAction::Stop)),
            m(vm(0, VmAction::Destroy)),
            m(Op::KillMgmt),
        ]);
        assert!(s.allows(&race));
        assert!(!s.clone().apply(&race).mgmt_up, "the kill is applied");
        let names_new = group(vec![m(create.clone()), m(vm(1, VmAction::Stop))]);
        assert!(!s.allows(&names_new), "vm 1 is created by the group itself");
        let two_faults = group(vec![
            m(vm(0, VmAction::Stop)),
            m(Op::KillMgmt),
            m(Op::CrashHost { host: 0 }),
        ]);
        assert!(!s.allows(&two_faults));
        assert!(
            !s.allows(&group(vec![m(vm(0, VmAction::Stop))])),
            "one alone"
        );
        let not_concurrent = group(vec![m(vm(0, VmAction::Stop)), m(Op::Settle)]);
        assert!(!s.allows(&not_concurrent));
    }

    #[test]
    fn generated_sequences_have_groups_with_and_without_faults() {
        let mut runner = TestRunner::new(Config {
            cases: 32,
            ..Config::default()
        });
        let seen = std::cell::RefCell::new((0, 0));
        runner
            .run(&Model::sequential_strategy(60..61usize), |(_, ops, _)| {
                for op in &ops {
                    if let Op::Group { members } = op {
                        let faulted = members.iter().any(|m| m.op.is_group_fault());
                        let mut n = seen.borrow_mut();
                        if faulted {
                            n.1 += 1
                        } else {
                            n.0 += 1
                        }
                    }
                }
                Ok(())
            })
            .unwrap();
        let (plain, faulted) = seen.into_inner();
        assert!(plain > 0 && faulted > 0, "{plain} plain, {faulted} faulted");
    }
}
