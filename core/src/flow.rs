//! Workflows that roll back completely.
//!
//! A [`FlowChain`] runs its [`Flow`]s in order over a shared typed context. When a flow fails
//! (or panics), that flow and every flow before it roll back in reverse order; a rollback that
//! fails is recorded and the others still run.
//!
//! Every chain is journaled in the store as it runs (kind `flow_chain`): which flows completed,
//! the context after each, and, while rolling back, which flow is next. If the management node
//! dies mid-chain, [`recover_orphans`] on the resource's next owner finishes the job from the
//! journal: by default it rolls back every flow that may have run (the interrupted one included),
//! or, for chains declared [`OnInterrupt::Finish`] and chains interrupted in a forward-only
//! flow (past their point of no return), runs the remaining flows.
//!
//! Contract for flows (what makes replay safe):
//! - `run` and `rollback` are idempotent: running either twice has the effect of running it once,
//!   and `rollback` of a flow that never ran, or half ran, is harmless.
//! - The context is journaled *after* each flow completes, so the rollback of an interrupted flow
//!   sees the context from before it ran. A flow therefore records what it is about to do where
//!   its rollback can find it (an id chosen in an earlier step, or a field written to the
//!   resource's row in the same atomic batch as the side effect).
//! - In a chain that rolls back when interrupted, the step before a flow with nothing to undo
//!   ([`Flow::undoes`]) that is not forward-only is not journaled: a crash during that flow is
//!   recovered as a crash during the flow before it, from the context that flow started with.
//!   That is the case above, and not a new one: a crash between a flow's completion and its
//!   journal write was always recovered so.
//!
//! Fencing: a command a chain gave up on (its answer timed out, its node died) may still run on
//! the host. Every flow runs in a [`RunningChain`] scope that the agent client reads: its
//! commands carry the chain's id and epoch, which the journal holds (0 forward; a rollback
//! runs at a later epoch, and a take-over by recovery at a later one still). Before a rollback
//! or a taken-over chain sends its first command to a host, the client fences the chain there
//! at its epoch: the agent refuses the older epochs' commands from then on and the client waits
//! until none of them still runs, so nothing is undone or redone while its command is under way.

use crate::error::{Error, ErrorCode};
use crate::hashring::NodeId;
use crate::ids::Ids;
use crate::job::Jobs;
use crate::queue::Queues;
use async_trait::async_trait;
use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use stratus_store::{Batch, Db, Expect, Json, JsonText, Query, Row, Update, Value};
use uuid::Uuid;

/// The chain a flow runs in, for the commands the flow sends ([`current_chain`]).
#[derive(Debug)]
pub struct RunningChain {
    pub chain: Uuid,
    /// The epoch of the chain's commands (the journal's).
    pub epoch: u64,
    /// Hosts this run has fenced the chain on; `None` on a chain's first forward run, which
    /// has nothing older to fence.
    fenced: Option<Mutex<HashSet<Uuid>>>,
}

impl RunningChain {
    fn new(chain: Uuid, epoch: u64) -> Arc<Self> {
        Arc::new(RunningChain {
            chain,
            epoch,
            fenced: (epoch > 0).then(Mutex::default),
        })
    }

    /// Whether the chain must be fenced on `host` before a command goes there: true once per
    /// host (the caller fences it, or fails and is asked again next time).
    pub fn must_fence(&self, host: Uuid) -> bool {
        self.fenced
            .as_ref()
            .is_some_and(|f| !f.lock().unwrap_or_else(|e| e.into_inner()).contains(&host))
    }

    /// Record that the chain is fenced on `host`.
    pub fn fenced_on(&self, host: Uuid) {
        if let Some(f) = &self.fenced {
            f.lock().unwrap_or_else(|e| e.into_inner()).insert(host);
        }
    }
}

tokio::task_local! {
    static CURRENT: Arc<RunningChain>;
}

/// The chain the calling flow runs in, if any.
pub fn current_chain() -> Option<Arc<RunningChain>> {
    CURRENT.try_with(Arc::clone).ok()
}

/// One step of a chain.
#[async_trait]
pub trait Flow<C: Send>: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    async fn run(&self, ctx: &mut C) -> Result<(), Error>;
    async fn rollback(&self, _ctx: &mut C) -> Result<(), Error> {
        Ok(())
    }
    /// A step past its operation's point of no return (the host already stopped the VM, say):
    /// a failure is retried with backoff instead of rolling back work that cannot be undone.
    /// Only if every attempt fails does the chain roll back.
    fn forward_only(&self) -> bool {
        false
    }
    /// Whether `rollback` has anything to undo. A chain that rolls back when interrupted does
    /// not journal its progress just before a flow with nothing to undo (see the module's
    /// contract).
    fn undoes(&self) -> bool {
        true
    }
}

/// What a chain's step is, as tests and tools see it without running it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowInfo {
    pub name: &'static str,
    /// Past its operation's point of no return: retried, not rolled back.
    pub forward_only: bool,
    /// Its rollback has something to undo.
    pub undoes: bool,
}

/// Attempts of a forward-only flow (backoff 100 ms doubling: about 25 s in all).
pub const FORWARD_ATTEMPTS: u32 = 8;

/// Attempts at a flow's rollback before its failure is recorded and the chain goes on: an
/// agent command that fails once (a host busy for a moment) must not leave a leak behind.
pub const ROLLBACK_ATTEMPTS: u32 = 4;

/// Opens the note an operation's error message ends with when its chain's rollback failed too
/// (the failed steps follow; see [`ChainFailure::into_error`]): what the rollback could not undo
/// is left for state sync, so the world may differ from before the operation.
pub const ROLLBACK_FAILED_NOTE: &str = "(rollback: ";

/// What a chain's context must be: journaled as JSON.
pub trait Context: Serialize + DeserializeOwned + Send + Sync + 'static {}
impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> Context for T {}

/// What recovery does with a chain interrupted in its forward path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnInterrupt {
    /// Roll back every flow that may have run (the default).
    RollBack,
    /// Run the remaining flows (for operations that must not be undone, such as expunge).
    Finish,
}

stratus_store::text_enum! {
    pub enum ChainState {
        Running = "Running",
        RollingBack = "RollingBack",
    }
}

stratus_store::resource! {
    /// The journal of one chain in progress. Deleted when the chain ends.
    ///
    /// No field is indexed: the table holds only the chains in flight (about as many as the
    /// operations running), and its readers — recovery, which asks for boots *not* live, and
    /// the API's list — read all of it. Every chain inserts and deletes its row, so an index
    /// is work at every operation for no reader: the four it had were several set operations
    /// per operation in the memory store (docs/perf-log.md), and index writes in SQL.
    pub struct ChainRecord: "flow_chain" {
        chain: String [column],
        resource_uuid: Uuid [column],
        queue: String,
        job: Option<Uuid>,
        node: Uuid,
        boot: Uuid,
        state: ChainState [column],
        /// Flows `[0, next)` ran to completion; flow `next` may be in flight.
        next: i64 [column],
        /// While rolling back: the next flow to roll back (-1 when none is left).
        cursor: i64,
        /// The epoch of the chain's commands ([`RunningChain`]): 0 forward, one more rolling
        /// back, two more than the record's at each take-over.
        epoch: i64,
        context: JsonText,
        error: Option<String>,
        rollback_errors: Json<Vec<String>>,
    }
}

/// What a chain acts on: the resource, its queue signature and the job, if any.
#[derive(Debug, Clone)]
pub struct ChainTarget {
    pub resource: Uuid,
    pub queue: String,
    /// The job the chain works for; `None`: the running task's ([`crate::job::current`]).
    pub job: Option<Uuid>,
}

/// A chain that failed and rolled back.
#[derive(Debug)]
pub struct ChainFailure<C> {
    /// Why the chain failed.
    pub error: Error,
    /// The flow that failed (None when the chain was interrupted or could not start).
    pub failed_flow: Option<&'static str>,
    /// Rollbacks that failed, by flow.
    pub rollback_errors: Vec<(&'static str, Error)>,
    pub ctx: C,
}

impl<C> ChainFailure<C> {
    /// The error to report for a chain on `resource`: the chain's own, followed by
    /// [`ROLLBACK_FAILED_NOTE`] and the rollbacks that failed, when any did (what they could not
    /// undo is left for state sync, so the caller must not assume the world is as before).
    pub fn into_error(self, resource: uuid::Uuid) -> Error {
        let mut e = self.error;
        if !self.rollback_errors.is_empty() {
            let what: Vec<String> = self
                .rollback_errors
                .iter()
                .map(|(n, e)| format!("{n}: {e}"))
                .collect();
            tracing::warn!(%resource, rollback_errors = ?what, "rollback left work for state sync");
            e.message = format!("{} {ROLLBACK_FAILED_NOTE}{})", e.message, what.join("; "));
        }
        e
    }
}

/// When an armed fault point fails its flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultWhen {
    /// The flow fails without running.
    Before,
    /// The flow runs, then fails (its effects happened; rollback must undo them).
    After,
    /// The flow runs twice in a row, as a retry or a recovery runs it again; the chain goes on
    /// with the second outcome (steps are idempotent: the second run must change nothing).
    Twice,
    /// The flow's rollback, when it runs, runs twice in a row (undos are idempotent too).
    UndoTwice,
    /// Nothing changes: the point only fires as the flow starts, for a test that kills the
    /// management node there.
    Starts,
}

/// Test hooks that fail a given flow of a given chain (the design's "buggify points"). Nothing
/// is armed in production; the check is one relaxed atomic load then.
#[derive(Default)]
pub struct FaultPoints {
    armed: std::sync::atomic::AtomicBool,
    points: std::sync::Mutex<Vec<ArmedFault>>,
    fired: std::sync::atomic::AtomicU64,
}

/// One armed fault: flow `flow` of chain `chain` fails `times_left` more times, at `when`.
struct ArmedFault {
    chain: String,
    flow: String,
    when: FaultWhen,
    times_left: u32,
}

impl FaultPoints {
    /// Fail flow `flow` of chain `chain` the next `times` times it runs.
    pub fn arm(&self, chain: &str, flow: &str, when: FaultWhen, times: u32) {
        let fault = ArmedFault {
            chain: chain.to_string(),
            flow: flow.to_string(),
            when,
            times_left: times,
        };
        self.points
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(fault);
        self.armed.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn clear(&self) {
        self.points
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.armed
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many armed faults fired so far.
    pub fn fired(&self) -> u64 {
        self.fired.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn take(&self, chain: &str, flow: &str, when: FaultWhen) -> bool {
        if !self.armed.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        let mut points = self.points.lock().unwrap_or_else(|e| e.into_inner());
        let Some(armed) = points
            .iter_mut()
            .find(|p| p.chain == chain && p.flow == flow && p.when == when && p.times_left > 0)
        else {
            return false;
        };
        armed.times_left -= 1;
        points.retain(|p| p.times_left > 0);
        self.fired
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        true
    }
}

fn injected(chain: &str, flow: &str) -> Error {
    Error::new(
        ErrorCode::AgentError,
        format!("fault injected at {chain}/{flow}"),
    )
}

/// Where chains are journaled. Cheap to clone.
#[derive(Clone)]
pub struct Journal {
    db: Db,
    ids: Arc<Ids>,
    node: NodeId,
    boot: Uuid,
    faults: Arc<FaultPoints>,
}

/// How long a journal write or a job's outcome is retried while the store fails: bookkeeping
/// the node must not drop while it lives (recovery only runs at a start).
pub const BOOKKEEPING_PATIENCE: Duration = Duration::from_secs(300);

impl Journal {
    pub fn new(db: Db, ids: Arc<Ids>, node: NodeId, boot: Uuid) -> Self {
        Journal {
            db,
            ids,
            node,
            boot,
            faults: Arc::default(),
        }
    }

    /// The fault points armed for this node's chains.
    pub fn faults(&self) -> &Arc<FaultPoints> {
        &self.faults
    }

    /// Share fault points across restarts of a node (the simulation keeps them outside).
    pub fn with_faults(mut self, faults: Arc<FaultPoints>) -> Self {
        self.faults = faults;
        self
    }

    pub fn boot(&self) -> Uuid {
        self.boot
    }

    async fn write(&self, b: Batch) -> Result<(), Error> {
        self.db.commit_patiently(b, BOOKKEEPING_PATIENCE).await?;
        Ok(())
    }

    async fn start(
        &self,
        id: Uuid,
        chain: &str,
        t: &ChainTarget,
        ctx: JsonText,
    ) -> Result<(), Error> {
        let rec = ChainRecord {
            chain: chain.to_string(),
            resource_uuid: t.resource,
            queue: t.queue.clone(),
            job: t.job.or_else(crate::job::current),
            node: self.node,
            boot: self.boot,
            state: ChainState::Running,
            next: 0,
            cursor: -1,
            epoch: 0,
            context: ctx,
            error: None,
            rollback_errors: Json(Vec::new()),
        };
        self.write(Batch::new().insert(&Row::new(id, rec))).await
    }

    async fn step(&self, id: Uuid, next: usize, ctx: JsonText) -> Result<(), Error> {
        self.write(
            Batch::new().update(
                Update::of::<ChainRecord>(id)
                    .set("next", next as i64)
                    .set("context", Value::Json(ctx)),
            ),
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn rolling_back(
        &self,
        id: Uuid,
        epoch: u64,
        cursor: i64,
        error: &Error,
        errors: &[String],
        ctx: JsonText,
    ) {
        let u = Update::of::<ChainRecord>(id)
            .if_exists()
            .set("state", ChainState::RollingBack.as_str())
            .set("epoch", epoch as i64)
            .set("cursor", cursor)
            .set("error", error.to_string())
            .set("rollback_errors", Value::json(errors))
            .set("context", Value::Json(ctx));
        if let Err(e) = self.write(Batch::new().update(u)).await {
            tracing::error!(chain = %id, error = %e, "cannot journal rollback progress");
        }
    }

    /// Make this node the chain's runner, at `epoch`, if the record still names the runner
    /// recovery found (`from`): two nodes never take one chain over.
    async fn take_over(&self, id: Uuid, from: Uuid, epoch: u64) -> Result<(), Error> {
        self.write(
            Batch::new().update(
                Update::of::<ChainRecord>(id)
                    .when_eq("boot", from)
                    .set("node", self.node)
                    .set("boot", self.boot)
                    .set("epoch", epoch as i64),
            ),
        )
        .await
    }

    /// Remove the journal of a chain that ended.
    async fn remove(&self, id: Uuid) -> Result<(), Error> {
        self.write(Batch::new().delete::<ChainRecord>(id, Expect::Maybe))
            .await
    }

    /// Remove the journal of a chain whose outcome is already settled (rolled back, or found
    /// finished by recovery); a failure is only logged.
    async fn end(&self, id: Uuid) {
        if let Err(e) = self.remove(id).await {
            tracing::error!(chain = %id, error = %e, "cannot remove a finished chain's journal");
        }
    }

    /// Chains in progress (for the API and the invariant checks).
    pub async fn in_progress(&self) -> Result<Vec<Row<ChainRecord>>, Error> {
        Ok(self
            .db
            .select::<ChainRecord>(&Query::of::<ChainRecord>())
            .await?)
    }
}

fn panicked(flow: &str, p: Box<dyn std::any::Any + Send>) -> Error {
    Error::internal(format!(
        "flow {flow} panicked: {}",
        crate::bus::panic_message(p.as_ref())
    ))
}

/// An ordered list of flows over context `C`.
pub struct FlowChain<C> {
    name: &'static str,
    flows: Vec<Arc<dyn Flow<C>>>,
    on_interrupt: OnInterrupt,
}

impl<C: Context> FlowChain<C> {
    pub fn new(name: &'static str) -> Self {
        FlowChain {
            name,
            flows: Vec::new(),
            on_interrupt: OnInterrupt::RollBack,
        }
    }

    pub fn then(mut self, f: impl Flow<C>) -> Self {
        self.flows.push(Arc::new(f));
        self
    }

    pub fn then_arc(mut self, f: Arc<dyn Flow<C>>) -> Self {
        self.flows.push(f);
        self
    }

    pub fn on_interrupt(mut self, o: OnInterrupt) -> Self {
        self.on_interrupt = o;
        self
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The chain's steps in order.
    pub fn flows(&self) -> Vec<FlowInfo> {
        let info = |f: &Arc<dyn Flow<C>>| FlowInfo {
            name: f.name(),
            forward_only: f.forward_only(),
            undoes: f.undoes(),
        };
        self.flows.iter().map(info).collect()
    }

    /// Run the chain; on failure everything that ran is rolled back before this returns.
    pub async fn run(
        &self,
        journal: &Journal,
        target: ChainTarget,
        ctx: C,
    ) -> Result<C, ChainFailure<C>> {
        let id = journal.ids.uuid();
        if let Err(e) = journal
            .start(id, self.name, &target, JsonText::of(&ctx))
            .await
        {
            return Err(ChainFailure {
                error: e.context(format!("chain {} could not start", self.name)),
                failed_flow: None,
                rollback_errors: Vec::new(),
                ctx,
            });
        }
        self.forward(journal, id, 0, 0, ctx).await
    }

    /// Run one flow once, with the armed fault points.
    async fn attempt(
        &self,
        journal: &Journal,
        flow: &dyn Flow<C>,
        run: &Arc<RunningChain>,
        ctx: &mut C,
    ) -> Result<(), Error> {
        let faults = &journal.faults;
        if faults.take(self.name, flow.name(), FaultWhen::Before) {
            return Err(injected(self.name, flow.name()));
        }
        faults.take(self.name, flow.name(), FaultWhen::Starts);
        let outcome = self.run_once(flow, run, ctx).await;
        match outcome {
            Ok(()) if faults.take(self.name, flow.name(), FaultWhen::After) => {
                Err(injected(self.name, flow.name()))
            }
            Ok(()) if faults.take(self.name, flow.name(), FaultWhen::Twice) => {
                self.run_once(flow, run, ctx).await
            }
            r => r,
        }
    }

    async fn run_once(
        &self,
        flow: &dyn Flow<C>,
        run: &Arc<RunningChain>,
        ctx: &mut C,
    ) -> Result<(), Error> {
        let fut = AssertUnwindSafe(flow.run(ctx)).catch_unwind();
        match CURRENT.scope(run.clone(), fut).await {
            Ok(r) => r,
            Err(p) => Err(panicked(flow.name(), p)),
        }
    }

    async fn undo_once(
        &self,
        flow: &dyn Flow<C>,
        run: &Arc<RunningChain>,
        ctx: &mut C,
    ) -> Result<(), Error> {
        let fut = AssertUnwindSafe(flow.rollback(ctx)).catch_unwind();
        match CURRENT.scope(run.clone(), fut).await {
            Ok(r) => r,
            Err(p) => Err(panicked(flow.name(), p)),
        }
    }

    async fn forward(
        &self,
        journal: &Journal,
        id: Uuid,
        epoch: u64,
        start: usize,
        mut ctx: C,
    ) -> Result<C, ChainFailure<C>> {
        let run = RunningChain::new(id, epoch);
        for i in start..self.flows.len() {
            let flow = &self.flows[i];
            let attempts = if flow.forward_only() {
                FORWARD_ATTEMPTS
            } else {
                1
            };
            let mut delay = Duration::from_millis(100);
            let mut outcome = Ok(());
            for attempt in 0..attempts {
                outcome = self.attempt(journal, flow.as_ref(), &run, &mut ctx).await;
                match &outcome {
                    Ok(()) => break,
                    Err(e) if attempt + 1 < attempts => {
                        tracing::warn!(chain = self.name, flow = flow.name(), error = %e, attempt, "forward-only flow failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                    Err(_) => {}
                }
            }
            if let Err(e) = outcome {
                tracing::debug!(chain = self.name, flow = flow.name(), error = %e, "flow failed; rolling back");
                let failed = Some(flow.name());
                return Err(self
                    .roll_back(journal, id, epoch + 1, i as i64, e, failed, Vec::new(), ctx)
                    .await);
            }
            // After the last flow, removing the journal is what records that the chain
            // finished: writing `next` = the number of flows first would only add a commit
            // (a crash before the removal finds the journal as it was while this flow ran,
            // which is the crash the journal is for).
            let recorded = if i + 1 == self.flows.len() {
                journal.remove(id).await
            } else if self.on_interrupt == OnInterrupt::RollBack
                && !self.flows[i + 1].undoes()
                && !self.flows[i + 1].forward_only()
            {
                // The next flow has nothing to undo: a crash during it is recovered as a crash
                // during this one (the module's contract).
                Ok(())
            } else {
                journal.step(id, i + 1, JsonText::of(&ctx)).await
            };
            if let Err(e) = recorded {
                // The flow ran but the journal cannot say so: undo it with the others.
                let e = e.context("cannot journal chain progress");
                return Err(self
                    .roll_back(journal, id, epoch + 1, i as i64, e, None, Vec::new(), ctx)
                    .await);
            }
        }
        if start >= self.flows.len() {
            // No flow left to run (an empty chain): nothing removed the journal yet.
            journal.end(id).await;
        }
        Ok(ctx)
    }

    /// Roll back flows `from, from-1, ..., 0`, at `epoch`.
    #[allow(clippy::too_many_arguments)]
    async fn roll_back(
        &self,
        journal: &Journal,
        id: Uuid,
        epoch: u64,
        from: i64,
        error: Error,
        failed_flow: Option<&'static str>,
        mut errors: Vec<(&'static str, Error)>,
        mut ctx: C,
    ) -> ChainFailure<C> {
        let texts = |errors: &[(&str, Error)]| {
            errors
                .iter()
                .map(|(f, e)| format!("{f}: {e}"))
                .collect::<Vec<_>>()
        };
        journal
            .rolling_back(id, epoch, from, &error, &texts(&errors), JsonText::of(&ctx))
            .await;
        let run = RunningChain::new(id, epoch);
        let mut k = from;
        while k >= 0 {
            let flow = &self.flows[k as usize];
            let mut delay = Duration::from_millis(100);
            let mut r = Ok(());
            for attempt in 0..ROLLBACK_ATTEMPTS {
                r = self.undo_once(flow.as_ref(), &run, &mut ctx).await;
                let faults = &journal.faults;
                if r.is_ok() && faults.take(self.name, flow.name(), FaultWhen::UndoTwice) {
                    r = self.undo_once(flow.as_ref(), &run, &mut ctx).await;
                }
                match &r {
                    Err(e) if attempt + 1 < ROLLBACK_ATTEMPTS => {
                        tracing::debug!(chain = self.name, flow = flow.name(), error = %e, attempt, "rollback failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                    _ => break,
                }
            }
            if let Err(e) = r {
                tracing::warn!(chain = self.name, flow = flow.name(), error = %e, "rollback failed; continuing");
                errors.push((flow.name(), e));
            }
            k -= 1;
            journal
                .rolling_back(id, epoch, k, &error, &texts(&errors), JsonText::of(&ctx))
                .await;
        }
        journal.end(id).await;
        ChainFailure {
            error,
            failed_flow,
            rollback_errors: errors,
            ctx,
        }
    }

    /// Finish an interrupted chain from its journal record.
    async fn resume(&self, journal: &Journal, rec: &Row<ChainRecord>) -> RecoveryOutcome {
        let ctx: C = match rec.context.decode() {
            Ok(c) => c,
            Err(e) => {
                return RecoveryOutcome::Unrecoverable(format!("context does not decode: {e}"))
            }
        };
        // The journal's positions: `next`, the flow about to run (`len` once all ran);
        // `cursor`, the flow to undo next (-1 once all are undone). Anything else is a broken
        // journal, left in place for a person to look at.
        let len = self.flows.len() as i64;
        let outside = match rec.state {
            ChainState::RollingBack if !(-1..len).contains(&rec.cursor) => {
                Some(format!("cursor {}", rec.cursor))
            }
            ChainState::Running if !(0..=len).contains(&rec.next) => {
                Some(format!("next {}", rec.next))
            }
            _ => None,
        };
        if let Some(position) = outside {
            let e = Error::invariant(format!(
                "journal {} of chain {}: {position} outside its {len} flows",
                rec.uuid, self.name
            ));
            return RecoveryOutcome::Unrecoverable(e.message);
        }
        // Above any epoch the node that ran it may still use (its rollback's is the record's
        // plus one, should it not be dead after all).
        let epoch = match u64::try_from(rec.epoch) {
            Ok(e) => e + 2,
            Err(_) => {
                let e = Error::invariant(format!(
                    "journal {} of chain {}: epoch {}",
                    rec.uuid, self.name, rec.epoch
                ));
                return RecoveryOutcome::Unrecoverable(e.message);
            }
        };
        match journal.take_over(rec.uuid, rec.boot, epoch).await {
            Ok(()) => {}
            // The record's boot is no longer the dead one: a peer claimed it (or the chain
            // ended and its record went).
            Err(e) if matches!(e.code, ErrorCode::ConditionFailed | ErrorCode::NotFound) => {
                return RecoveryOutcome::TakenElsewhere
            }
            Err(e) => {
                return RecoveryOutcome::Unrecoverable(format!("cannot take over the journal: {e}"))
            }
        }
        let interrupted = Error::new(
            ErrorCode::NodeUnavailable,
            "interrupted: the management node running it stopped",
        );
        let failure = match rec.state {
            ChainState::RollingBack => {
                let error = rec
                    .error
                    .clone()
                    .map_or(interrupted, |m| Error::new(ErrorCode::Internal, m));
                let prior = rec
                    .rollback_errors
                    .0
                    .iter()
                    .map(|m| ("earlier", Error::internal(m.clone())))
                    .collect();
                self.roll_back(
                    journal, rec.uuid, epoch, rec.cursor, error, None, prior, ctx,
                )
                .await
            }
            ChainState::Running if rec.next >= len => {
                journal.end(rec.uuid).await;
                return RecoveryOutcome::Finished;
            }
            // Interrupted past the point of no return: finished, whatever the chain's policy
            // (rolling back there undid a migration the database had already switched: swarm).
            ChainState::Running => match self.on_interrupt {
                OnInterrupt::RollBack if !self.flows[rec.next as usize].forward_only() => {
                    self.roll_back(
                        journal,
                        rec.uuid,
                        epoch,
                        rec.next,
                        interrupted,
                        None,
                        Vec::new(),
                        ctx,
                    )
                    .await
                }
                _ => match self
                    .forward(journal, rec.uuid, epoch, rec.next as usize, ctx)
                    .await
                {
                    Ok(_) => return RecoveryOutcome::Finished,
                    Err(f) => f,
                },
            },
        };
        RecoveryOutcome::RolledBack {
            error: failure.error,
            rollback_errors: failure.rollback_errors.len(),
        }
    }
}

/// The result of recovering one chain.
#[derive(Debug, Clone, PartialEq)]
pub enum RecoveryOutcome {
    Finished,
    RolledBack {
        error: Error,
        rollback_errors: usize,
    },
    Unrecoverable(String),
    /// Another node took the chain over first (its guarded update won): that node finishes
    /// it and closes its job; this one does nothing.
    TakenElsewhere,
}

impl crate::queue::QueuedOutput for RecoveryOutcome {
    fn queue_failed(e: Error) -> Self {
        RecoveryOutcome::Unrecoverable(e.message)
    }
}

/// A chain that recovery can resume by name.
#[async_trait]
trait Resumable: Send + Sync {
    async fn resume(&self, journal: &Journal, rec: &Row<ChainRecord>) -> RecoveryOutcome;
    fn flow_names(&self) -> Vec<&'static str>;
}

#[async_trait]
impl<C: Context> Resumable for FlowChain<C> {
    async fn resume(&self, journal: &Journal, rec: &Row<ChainRecord>) -> RecoveryOutcome {
        FlowChain::resume(self, journal, rec).await
    }
    fn flow_names(&self) -> Vec<&'static str> {
        self.flows().iter().map(|f| f.name).collect()
    }
}

/// Chain definitions by name, for recovery. Services register their chains at start-up.
#[derive(Default)]
pub struct ChainRegistry {
    chains: RwLock<HashMap<&'static str, Arc<dyn Resumable>>>,
}

impl ChainRegistry {
    pub fn new() -> Self {
        ChainRegistry::default()
    }

    pub fn register<C: Context>(&self, chain: Arc<FlowChain<C>>) {
        self.chains
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(chain.name, chain);
    }

    /// Where a journaled chain is, for people: the flow it runs or rolls back, and the share
    /// of its flows done (percent).
    pub fn position(&self, rec: &ChainRecord) -> Option<(String, i64)> {
        let names = self.get(&rec.chain)?.flow_names();
        let n = names.len().max(1) as i64;
        let at = |i: i64| names.get(usize::try_from(i).ok()?).copied();
        match rec.state {
            ChainState::RollingBack => {
                let name = at(rec.cursor).unwrap_or("done");
                Some((
                    format!("rolling back {name}"),
                    100 * (rec.cursor + 1).max(0) / n,
                ))
            }
            _ => Some((
                at(rec.next).unwrap_or("finishing").to_string(),
                100 * rec.next / n,
            )),
        }
    }

    fn get(&self, name: &str) -> Option<Arc<dyn Resumable>> {
        self.chains
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }
}

/// What a recovery pass did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct RecoveryReport {
    pub found: usize,
    pub finished: usize,
    pub rolled_back: usize,
    pub rollback_errors: usize,
    pub unrecoverable: usize,
    /// Claimed by another node first (exactly one node recovers a chain).
    pub taken_elsewhere: usize,
}

/// Resume every journaled chain whose node boot is no longer live and whose resource this node
/// owns. Each runs in its resource's queue; their jobs are closed with the outcome.
pub async fn recover_orphans(
    journal: &Journal,
    registry: &ChainRegistry,
    queues: &Queues,
    jobs: &Jobs,
    live_boots: &[Uuid],
    owns: impl Fn(&Uuid) -> bool,
) -> Result<RecoveryReport, Error> {
    let mut q = Query::of::<ChainRecord>();
    if !live_boots.is_empty() {
        q = q.not_in("boot", live_boots.iter().copied());
    }
    let orphans: Vec<Row<ChainRecord>> = journal
        .db
        .select::<ChainRecord>(&q)
        .await?
        .into_iter()
        .filter(|r| r.boot != journal.boot && owns(&r.resource_uuid))
        .collect();
    let mut report = RecoveryReport {
        found: orphans.len(),
        ..Default::default()
    };
    let runs = orphans.iter().map(|rec| async move {
        let outcome = match registry.get(&rec.chain) {
            Some(chain) => queues.run(&rec.queue, 1, chain.resume(journal, rec)).await,
            None => RecoveryOutcome::Unrecoverable(format!(
                "no chain named {} is registered",
                rec.chain
            )),
        };
        if let Some(job) = rec.job {
            let result = match &outcome {
                RecoveryOutcome::Finished => {
                    Some(Ok(JsonText::of(&serde_json::json!({"recovered": true}))))
                }
                RecoveryOutcome::RolledBack { error, .. } => Some(Err(error.clone())),
                RecoveryOutcome::Unrecoverable(m) => Some(Err(Error::internal(m.clone()))),
                // Its job is the claimer's to close.
                RecoveryOutcome::TakenElsewhere => None,
            };
            if let Some(result) = result {
                if let Err(e) = jobs.finish(job, result).await {
                    tracing::warn!(%job, error = %e, "cannot close a recovered chain's job");
                }
            }
        }
        (rec, outcome)
    });
    for (rec, outcome) in futures::future::join_all(runs).await {
        match outcome {
            RecoveryOutcome::Finished => report.finished += 1,
            RecoveryOutcome::RolledBack {
                rollback_errors, ..
            } => {
                report.rolled_back += 1;
                report.rollback_errors += rollback_errors;
            }
            RecoveryOutcome::Unrecoverable(why) => {
                tracing::error!(chain = %rec.chain, id = %rec.uuid, %why, "cannot recover chain");
                report.unrecoverable += 1;
            }
            RecoveryOutcome::TakenElsewhere => report.taken_elsewhere += 1,
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests;
