//! The VM service's bus handlers: each operation runs its chain in the VM's queue.

use super::chain::run_chain;
use super::create::CreateCtx;
use super::migrate::MigrateCtx;
use super::power::PowerCtx;
use super::{create, lifecycle, migrate, power, vm_queue};
use super::{CreateVm, DestroyVm, ExpungeVm, MigrateVm, RebootVm, RecoverVm, StartVm, StopVm};
use crate::error::Error;
use crate::flow::{FlowChain, FlowInfo};
use crate::model::*;
use crate::services::Cloud;
use std::sync::Arc;

pub(super) struct Chains {
    create: Arc<FlowChain<CreateCtx>>,
    start: Arc<FlowChain<PowerCtx>>,
    stop: Arc<FlowChain<PowerCtx>>,
    reboot: Arc<FlowChain<PowerCtx>>,
    destroy: Arc<FlowChain<PowerCtx>>,
    recover: Arc<FlowChain<PowerCtx>>,
    expunge: Arc<FlowChain<PowerCtx>>,
    migrate: Arc<FlowChain<MigrateCtx>>,
}

impl Chains {
    pub(super) fn new(w: &std::sync::Weak<Cloud>) -> Self {
        Chains {
            create: Arc::new(create::chain(w)),
            start: Arc::new(power::start_chain(w)),
            stop: Arc::new(power::stop_chain(w)),
            reboot: Arc::new(power::reboot_chain(w)),
            destroy: Arc::new(lifecycle::destroy_chain(w)),
            recover: Arc::new(lifecycle::recover_chain(w)),
            expunge: Arc::new(lifecycle::expunge_chain(w)),
            migrate: Arc::new(migrate::chain(w)),
        }
    }

    /// Each chain's name and steps (see [`super::chain_catalogue`]).
    pub(super) fn catalogue(&self) -> Vec<(&'static str, Vec<FlowInfo>)> {
        vec![
            (self.create.name(), self.create.flows()),
            (self.start.name(), self.start.flows()),
            (self.stop.name(), self.stop.flows()),
            (self.reboot.name(), self.reboot.flows()),
            (self.destroy.name(), self.destroy.flows()),
            (self.recover.name(), self.recover.flows()),
            (self.expunge.name(), self.expunge.flows()),
            (self.migrate.name(), self.migrate.flows()),
        ]
    }
}

pub fn register(cloud: &Arc<Cloud>) -> Result<(), Error> {
    let w = Arc::downgrade(cloud);
    let ch = Arc::new(Chains::new(&w));
    let reg = &cloud.engine.chains;
    reg.register(ch.create.clone());
    reg.register(ch.start.clone());
    reg.register(ch.stop.clone());
    reg.register(ch.reboot.clone());
    reg.register(ch.destroy.clone());
    reg.register(ch.recover.clone());
    reg.register(ch.expunge.clone());
    reg.register(ch.migrate.clone());

    let chains = ch.clone();
    cloud.handle(move |c: Arc<Cloud>, m: CreateVm| {
        let ch = chains.clone();
        async move {
            let vm = m.uuid.unwrap_or_else(|| c.engine.ids.uuid());
            let ctx = create::plan(&c, &m, vm).await?;
            let q = vm_queue(vm);
            c.engine
                .queues
                .run(&q, 1, run_chain(&c, &ch.create, vm, ctx))
                .await?;
            c.get::<Vm>(vm).await
        }
    })?;

    macro_rules! power_op {
        ($msg:ty, $chain:ident, |$m:ident| $force:expr) => {{
            let chains = ch.clone();
            cloud.handle(move |c: Arc<Cloud>, $m: $msg| {
                let ch = chains.clone();
                async move {
                    c.must_exist::<Vm>($m.uuid).await?;
                    let q = vm_queue($m.uuid);
                    let ctx = PowerCtx::new($m.uuid, $force);
                    c.engine
                        .queues
                        .run(&q, 1, run_chain(&c, &ch.$chain, $m.uuid, ctx))
                        .await?;
                    c.get::<Vm>($m.uuid).await
                }
            })?;
        }};
    }
    power_op!(StartVm, start, |m| false);
    power_op!(StopVm, stop, |m| m.force);
    power_op!(RebootVm, reboot, |m| false);
    power_op!(DestroyVm, destroy, |m| m.force);
    power_op!(RecoverVm, recover, |m| false);

    let chains = ch.clone();
    cloud.handle(move |c: Arc<Cloud>, m: ExpungeVm| {
        let ch = chains.clone();
        async move {
            c.must_exist::<Vm>(m.uuid).await?;
            let q = vm_queue(m.uuid);
            c.engine
                .queues
                .run(&q, 1, async {
                    let state = c.get::<Vm>(m.uuid).await?.state;
                    if m.force && !matches!(state, VmState::Destroyed | VmState::Expunging) {
                        run_chain(&c, &ch.destroy, m.uuid, PowerCtx::new(m.uuid, true)).await?;
                    }
                    run_chain(&c, &ch.expunge, m.uuid, PowerCtx::new(m.uuid, m.force)).await
                })
                .await?;
            Ok(())
        }
    })?;

    let chains = ch.clone();
    cloud.handle(move |c: Arc<Cloud>, m: MigrateVm| {
        let ch = chains.clone();
        async move {
            let q = vm_queue(m.uuid);
            c.engine
                .queues
                .run(&q, 1, async {
                    let vm = c.get::<Vm>(m.uuid).await?;
                    vm.state.check(vm.uuid, VmAction::Migrate)?;
                    let src = vm
                        .host_uuid
                        .ok_or_else(|| Error::internal(format!("running vm {} has no host", vm.uuid)))?;
                    if let Some(d) = m.host_uuid {
                        if d == src {
                            return Err(Error::invalid(format!("vm {} already runs on host {d}", vm.uuid)));
                        }
                        if Some(c.get::<Host>(d).await?.cluster_uuid) != vm.cluster_uuid {
                            return Err(Error::invalid(format!(
                                "host {d} is in another cluster; VMs on local storage migrate within their cluster"
                            )));
                        }
                    }
                    let ctx = MigrateCtx {
                        vm: vm.uuid,
                        src,
                        dest_req: m.host_uuid,
                        dest: None,
                    };
                    run_chain(&c, &ch.migrate, vm.uuid, ctx).await
                })
                .await?;
            c.get::<Vm>(m.uuid).await
        }
    })?;
    Ok(())
}
