use super::*;
use crate::job::{Job, JobState};
use std::sync::Mutex;
use stratus_store::{MemStore, Resource, Schema};

type Log = Arc<Mutex<Vec<String>>>;

#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
struct Ctx {
    done: Vec<String>,
}

struct Step {
    name: &'static str,
    log: Log,
    fail_run: bool,
    fail_rollback: bool,
    panic_run: bool,
    /// Never finishes running (a node that dies during it).
    hang_run: bool,
    nothing_to_undo: bool,
}

fn step(name: &'static str, log: &Log) -> Step {
    Step {
        name,
        log: log.clone(),
        fail_run: false,
        fail_rollback: false,
        panic_run: false,
        hang_run: false,
        nothing_to_undo: false,
    }
}

#[async_trait]
impl Flow<Ctx> for Step {
    fn name(&self) -> &'static str {
        self.name
    }
    async fn run(&self, ctx: &mut Ctx) -> Result<(), Error> {
        self.log.lock().unwrap().push(format!("run {}", self.name));
        if self.panic_run {
            panic!("{} exploded", self.name);
        }
        if self.hang_run {
            std::future::pending::<()>().await;
        }
        if self.fail_run {
            return Err(Error::new(
                ErrorCode::AgentError,
                format!("{} failed", self.name),
            ));
        }
        ctx.done.push(self.name.to_string());
        Ok(())
    }
    async fn rollback(&self, ctx: &mut Ctx) -> Result<(), Error> {
        self.log
            .lock()
            .unwrap()
            .push(format!("rollback {}", self.name));
        ctx.done.retain(|d| d != self.name);
        if self.fail_rollback {
            return Err(Error::internal(format!("{} rollback failed", self.name)));
        }
        Ok(())
    }
    fn undoes(&self) -> bool {
        !self.nothing_to_undo
    }
}

struct Env {
    db: Db,
    journal: Journal,
    jobs: Jobs,
    queues: Queues,
}

fn env(boot: u128) -> (Env, Arc<MemStore>) {
    let store = Arc::new(MemStore::new(
        Schema::new().with(ChainRecord::META).with(Job::META),
    ));
    (env_on(store.clone(), boot), store)
}

fn env_on(store: Arc<MemStore>, boot: u128) -> Env {
    let db = Db::new(store);
    let ids = Arc::new(Ids::from_seed(boot as u64));
    let node = Uuid::from_u128(1);
    Env {
        journal: Journal::new(db.clone(), ids.clone(), node, Uuid::from_u128(boot)),
        jobs: Jobs::new(db.clone(), ids, node, Uuid::from_u128(boot)),
        queues: Queues::new(),
        db,
    }
}

fn target() -> ChainTarget {
    ChainTarget {
        resource: Uuid::from_u128(77),
        queue: "vm-77".into(),
        job: None,
    }
}

fn logged(log: &Log) -> Vec<String> {
    log.lock().unwrap().clone()
}

#[tokio::test]
async fn a_chain_runs_in_order_and_leaves_no_journal() {
    let (e, _) = env(10);
    let log = Log::default();
    let chain = FlowChain::new("test.ok")
        .then(step("a", &log))
        .then(step("b", &log))
        .then(step("c", &log));
    let ctx = chain
        .run(&e.journal, target(), Ctx::default())
        .await
        .unwrap();
    assert_eq!(ctx.done, vec!["a", "b", "c"]);
    assert_eq!(logged(&log), vec!["run a", "run b", "run c"]);
    assert!(e.journal.in_progress().await.unwrap().is_empty());
}

#[tokio::test]
async fn failure_rolls_back_the_failed_flow_and_all_before_it_in_reverse() {
    let (e, _) = env(10);
    let log = Log::default();
    let mut c = step("c", &log);
    c.fail_run = true;
    let chain = FlowChain::new("test.fail")
        .then(step("a", &log))
        .then(step("b", &log))
        .then(c)
        .then(step("d", &log));
    let f = chain
        .run(&e.journal, target(), Ctx::default())
        .await
        .unwrap_err();
    assert_eq!(f.error.code, ErrorCode::AgentError);
    assert_eq!(f.failed_flow, Some("c"));
    assert!(f.rollback_errors.is_empty());
    assert!(
        f.ctx.done.is_empty(),
        "context rolled back too: {:?}",
        f.ctx
    );
    assert_eq!(
        logged(&log),
        vec![
            "run a",
            "run b",
            "run c",
            "rollback c",
            "rollback b",
            "rollback a"
        ]
    );
    assert!(e.journal.in_progress().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_failing_rollback_is_recorded_and_the_rest_still_roll_back() {
    let (e, _) = env(10);
    let log = Log::default();
    let mut b = step("b", &log);
    b.fail_rollback = true;
    let mut c = step("c", &log);
    c.panic_run = true;
    let chain = FlowChain::new("test.rbfail")
        .then(step("a", &log))
        .then(b)
        .then(c);
    let f = chain
        .run(&e.journal, target(), Ctx::default())
        .await
        .unwrap_err();
    assert_eq!(f.error.code, ErrorCode::Internal);
    assert!(f.error.message.contains("c exploded"), "{}", f.error);
    assert_eq!(f.rollback_errors.len(), 1);
    assert_eq!(f.rollback_errors[0].0, "b");
    assert_eq!(
        logged(&log),
        vec![
            "run a",
            "run b",
            "run c",
            "rollback c",
            // A failing rollback is tried ROLLBACK_ATTEMPTS times before it is recorded.
            "rollback b",
            "rollback b",
            "rollback b",
            "rollback b",
            "rollback a"
        ]
    );
    assert_eq!(super::ROLLBACK_ATTEMPTS, 4);
}

/// Write a journal record as a dead node would have left it.
async fn orphan(
    e: &Env,
    chain: &str,
    state: ChainState,
    next: i64,
    cursor: i64,
    job: Option<Uuid>,
) -> Uuid {
    let id = Uuid::from_u128(500);
    let rec = ChainRecord {
        chain: chain.into(),
        resource_uuid: Uuid::from_u128(77),
        queue: "vm-77".into(),
        job,
        node: Uuid::from_u128(1),
        boot: Uuid::from_u128(9), // a boot that is gone
        state,
        next,
        cursor,
        epoch: 0,
        context: JsonText::of(&serde_json::json!({"done": ["a", "b"]})),
        error: None,
        rollback_errors: Json(Vec::new()),
    };
    e.db.insert(Row::new(id, rec)).await.unwrap();
    id
}

fn registry(log: &Log, on_interrupt: OnInterrupt) -> ChainRegistry {
    let r = ChainRegistry::new();
    r.register(Arc::new(
        FlowChain::<Ctx>::new("test.recover")
            .then(step("a", log))
            .then(step("b", log))
            .then(step("c", log))
            .then(step("d", log))
            .on_interrupt(on_interrupt),
    ));
    r
}

#[tokio::test]
async fn recovery_rolls_back_an_interrupted_chain_once_per_flow_and_fails_its_job() {
    let (e, _) = env(10);
    let log = Log::default();
    let job = e.jobs.create(None, "vm.create", None).await.unwrap();
    // Make the job look orphaned too: it belongs to the dead boot's chain.
    orphan(&e, "test.recover", ChainState::Running, 2, -1, Some(job)).await;
    let reg = registry(&log, OnInterrupt::RollBack);
    // Our own boot (10) and the dead one (9): nothing of a live boot is touched.
    let report = recover_orphans(
        &e.journal,
        &reg,
        &e.queues,
        &e.jobs,
        &[Uuid::from_u128(9)],
        |_| true,
    )
    .await
    .unwrap();
    assert_eq!(report.found, 0, "boot 9 declared live: not an orphan");
    let report = recover_orphans(
        &e.journal,
        &reg,
        &e.queues,
        &e.jobs,
        &[Uuid::from_u128(10)],
        |_| true,
    )
    .await
    .unwrap();
    assert_eq!(
        report,
        RecoveryReport {
            found: 1,
            rolled_back: 1,
            ..Default::default()
        }
    );
    // Flow c (index 2) may have been in flight: it is rolled back too, then b and a.
    assert_eq!(logged(&log), vec!["rollback c", "rollback b", "rollback a"]);
    assert!(e.journal.in_progress().await.unwrap().is_empty());
    let j = e.jobs.get(job).await.unwrap();
    assert_eq!(j.state, JobState::Failed);
    // A second pass finds nothing: each rollback ran exactly once.
    let again = recover_orphans(&e.journal, &reg, &e.queues, &e.jobs, &[], |_| true)
        .await
        .unwrap();
    assert_eq!(again.found, 0);
    assert_eq!(logged(&log).len(), 3);
}

#[tokio::test]
async fn a_chain_claimed_by_another_node_first_is_left_to_it() {
    let (a, store) = env(10);
    let b = env_on(store, 11);
    let log = Log::default();
    let job = a.jobs.create(None, "vm.create", None).await.unwrap();
    let id = orphan(&a, "test.recover", ChainState::Running, 2, -1, Some(job)).await;
    let (reg_a, reg_b) = (
        registry(&log, OnInterrupt::RollBack),
        registry(&log, OnInterrupt::RollBack),
    );
    // Both read the dead boot's record; a claims it and recovers it; b comes second with what
    // it read.
    let stale = b.db.must_get::<ChainRecord>(id).await.unwrap();
    let ra = recover_orphans(&a.journal, &reg_a, &a.queues, &a.jobs, &[], |_| true)
        .await
        .unwrap();
    assert_eq!(ra.rolled_back, 1, "{ra:?}");
    let chain = reg_b.get("test.recover").expect("registered");
    assert!(matches!(
        chain.resume(&b.journal, &stale).await,
        RecoveryOutcome::TakenElsewhere
    ));
    // Claimed and still running there (the record's boot is a's now): b leaves it too.
    let id2 = Uuid::from_u128(501);
    let mut rec = (*stale).clone();
    rec.boot = Uuid::from_u128(10);
    b.db.commit(Batch::new().insert(&Row::new(id2, rec)))
        .await
        .unwrap();
    let mut stale2 = stale.clone();
    stale2.uuid = id2;
    assert!(matches!(
        chain.resume(&b.journal, &stale2).await,
        RecoveryOutcome::TakenElsewhere
    ));
    assert_eq!(
        logged(&log),
        vec!["rollback c", "rollback b", "rollback a"],
        "each rollback ran once, on a"
    );
    // The job ends with a's outcome, not an error of b's.
    let j = a.jobs.get(job).await.unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert_ne!(j.error_code.as_deref(), Some("internal"), "{j:?}");
}

#[tokio::test]
async fn recovery_continues_a_rollback_from_its_cursor() {
    let (e, _) = env(10);
    let log = Log::default();
    orphan(&e, "test.recover", ChainState::RollingBack, 3, 1, None).await;
    let reg = registry(&log, OnInterrupt::RollBack);
    let report = recover_orphans(&e.journal, &reg, &e.queues, &e.jobs, &[], |_| true)
        .await
        .unwrap();
    assert_eq!(report.rolled_back, 1);
    assert_eq!(logged(&log), vec!["rollback b", "rollback a"]);
}

#[tokio::test]
async fn recovery_finishes_chains_declared_finish_and_skips_resources_owned_elsewhere() {
    let (e, _) = env(10);
    let log = Log::default();
    orphan(&e, "test.recover", ChainState::Running, 2, -1, None).await;
    let reg = registry(&log, OnInterrupt::Finish);
    let report = recover_orphans(&e.journal, &reg, &e.queues, &e.jobs, &[], |_| false)
        .await
        .unwrap();
    assert_eq!(report.found, 0, "not ours");
    let report = recover_orphans(&e.journal, &reg, &e.queues, &e.jobs, &[], |_| true)
        .await
        .unwrap();
    assert_eq!(report.finished, 1);
    assert_eq!(logged(&log), vec!["run c", "run d"]);
    assert!(e.journal.in_progress().await.unwrap().is_empty());
}

/// A journal whose position lies outside its chain is a bug: tests panic; a release build
/// reports it unrecoverable (an internal error naming the invariant) and leaves the journal
/// for a person, undoing nothing.
async fn recover_a_broken_journal(state: ChainState, next: i64, cursor: i64) {
    let (e, _) = env(10);
    let log = Log::default();
    orphan(&e, "test.recover", state, next, cursor, None).await;
    let reg = registry(&log, OnInterrupt::RollBack);
    let report = recover_orphans(&e.journal, &reg, &e.queues, &e.jobs, &[], |_| true)
        .await
        .unwrap();
    assert_eq!(report.unrecoverable, 1);
    assert!(logged(&log).is_empty());
    assert_eq!(e.journal.in_progress().await.unwrap().len(), 1);
}

#[tokio::test]
#[cfg_attr(
    debug_assertions,
    should_panic(expected = "cursor 4 outside its 4 flows")
)]
async fn a_rollback_cursor_past_the_chain_is_a_broken_invariant() {
    recover_a_broken_journal(ChainState::RollingBack, 4, 4).await;
}

#[tokio::test]
#[cfg_attr(
    debug_assertions,
    should_panic(expected = "next 5 outside its 4 flows")
)]
async fn a_next_flow_past_the_chain_is_a_broken_invariant() {
    recover_a_broken_journal(ChainState::Running, 5, -1).await;
}

#[tokio::test]
#[cfg_attr(
    debug_assertions,
    should_panic(expected = "next -1 outside its 4 flows")
)]
async fn a_negative_next_flow_is_a_broken_invariant() {
    recover_a_broken_journal(ChainState::Running, -1, -1).await;
}

#[tokio::test]
async fn an_unknown_chain_is_reported_and_left_in_the_journal() {
    let (e, _) = env(10);
    orphan(&e, "no.such.chain", ChainState::Running, 1, -1, None).await;
    let reg = ChainRegistry::new();
    let report = recover_orphans(&e.journal, &reg, &e.queues, &e.jobs, &[], |_| true)
        .await
        .unwrap();
    assert_eq!(report.unrecoverable, 1);
    assert_eq!(e.journal.in_progress().await.unwrap().len(), 1);
}

#[tokio::test]
async fn armed_fault_points_fail_exactly_their_flow() {
    let (e, _) = env(10);
    let log = Log::default();
    let chain = FlowChain::new("test.faults")
        .then(step("a", &log))
        .then(step("b", &log))
        .then(step("c", &log));
    e.journal
        .faults()
        .arm("test.faults", "b", FaultWhen::After, 1);
    let f = chain
        .run(&e.journal, target(), Ctx::default())
        .await
        .unwrap_err();
    assert!(f.error.message.contains("test.faults/b"), "{}", f.error);
    assert_eq!(
        logged(&log),
        vec!["run a", "run b", "rollback b", "rollback a"]
    );
    log.lock().unwrap().clear();
    e.journal
        .faults()
        .arm("test.faults", "a", FaultWhen::Before, 1);
    chain
        .run(&e.journal, target(), Ctx::default())
        .await
        .unwrap_err();
    assert_eq!(
        logged(&log),
        vec!["rollback a"],
        "a never ran but its rollback is called (idempotent)"
    );
    log.lock().unwrap().clear();
    assert!(
        chain
            .run(&e.journal, target(), Ctx::default())
            .await
            .is_ok(),
        "disarmed after firing"
    );
    assert_eq!(e.journal.faults().fired(), 2);
}

#[tokio::test]
async fn twice_runs_a_flow_again_and_undo_twice_its_rollback() {
    let (e, _) = env(10);
    let log = Log::default();
    let chain = FlowChain::new("test.twice")
        .then(step("a", &log))
        .then(step("b", &log))
        .then(step("c", &log));
    let faults = e.journal.faults();
    faults.arm("test.twice", "b", FaultWhen::Twice, 1);
    chain
        .run(&e.journal, target(), Ctx::default())
        .await
        .unwrap();
    assert_eq!(logged(&log), vec!["run a", "run b", "run b", "run c"]);
    log.lock().unwrap().clear();
    faults.arm("test.twice", "c", FaultWhen::After, 1);
    faults.arm("test.twice", "a", FaultWhen::UndoTwice, 1);
    chain
        .run(&e.journal, target(), Ctx::default())
        .await
        .unwrap_err();
    assert_eq!(
        logged(&log),
        vec![
            "run a",
            "run b",
            "run c",
            "rollback c",
            "rollback b",
            "rollback a",
            "rollback a"
        ]
    );
    assert_eq!(faults.fired(), 3);
}

/// A memory store that counts the journal's commits and can refuse to remove a journal.
struct JournalWatch {
    mem: MemStore,
    commits: std::sync::atomic::AtomicUsize,
    refuse_removal: bool,
}

#[async_trait]
impl stratus_store::Store for JournalWatch {
    fn backend(&self) -> &'static str {
        "journal-watch"
    }
    fn schema(&self) -> &Schema {
        self.mem.schema()
    }
    async fn get(
        &self,
        kind: &str,
        uuid: Uuid,
    ) -> Result<Option<stratus_store::Record>, stratus_store::StoreError> {
        self.mem.get(kind, uuid).await
    }
    async fn query(
        &self,
        q: &stratus_store::Query,
    ) -> Result<Vec<stratus_store::Record>, stratus_store::StoreError> {
        self.mem.query(q).await
    }
    async fn count(&self, q: &stratus_store::Query) -> Result<u64, stratus_store::StoreError> {
        self.mem.count(q).await
    }
    async fn commit(&self, batch: Batch) -> Result<Vec<u64>, stratus_store::StoreError> {
        use stratus_store::Write;
        let journal = |w: &Write| match w {
            Write::Insert(r) | Write::Upsert(r) => r.kind.name == ChainRecord::META.name,
            Write::Update(u) => u.kind == ChainRecord::META.name,
            Write::Delete { kind, .. } => *kind == ChainRecord::META.name,
        };
        if batch.writes.iter().any(journal) {
            self.commits
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        let removal = |w: &Write| matches!(w, Write::Delete { .. }) && journal(w);
        if self.refuse_removal && batch.writes.iter().any(removal) {
            return Err(stratus_store::StoreError::InvalidWrite(
                "journal removal refused by the test".into(),
            ));
        }
        self.mem.commit(batch).await
    }
}

fn watched(refuse_removal: bool) -> (Env, Arc<JournalWatch>) {
    let store = Arc::new(JournalWatch {
        mem: MemStore::new(Schema::new().with(ChainRecord::META).with(Job::META)),
        commits: Default::default(),
        refuse_removal,
    });
    let db = Db::new(store.clone());
    let ids = Arc::new(Ids::from_seed(10));
    let (node, boot) = (Uuid::from_u128(1), Uuid::from_u128(10));
    let env = Env {
        journal: Journal::new(db.clone(), ids.clone(), node, boot),
        jobs: Jobs::new(db.clone(), ids, node, boot),
        queues: Queues::new(),
        db,
    };
    (env, store)
}

#[tokio::test]
async fn the_last_flow_is_recorded_by_removing_the_journal() {
    let (e, store) = watched(false);
    let log = Log::default();
    let chain = FlowChain::new("test.ok")
        .then(step("a", &log))
        .then(step("b", &log))
        .then(step("c", &log));
    chain
        .run(&e.journal, target(), Ctx::default())
        .await
        .unwrap();
    // The insert, `next` after a and after b, and the removal after c.
    assert_eq!(store.commits.load(std::sync::atomic::Ordering::SeqCst), 4);
    assert!(e.journal.in_progress().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_chain_whose_journal_cannot_record_its_end_rolls_back() {
    let (e, _) = watched(true);
    let log = Log::default();
    let chain = FlowChain::new("test.stuck")
        .then(step("a", &log))
        .then(step("b", &log));
    let f = chain
        .run(&e.journal, target(), Ctx::default())
        .await
        .unwrap_err();
    assert!(
        f.error.message.contains("cannot journal chain progress"),
        "{}",
        f.error
    );
    assert_eq!(
        logged(&log),
        vec!["run a", "run b", "rollback b", "rollback a"]
    );
}

fn no_undo(name: &'static str, log: &Log) -> Step {
    let mut s = step(name, log);
    s.nothing_to_undo = true;
    s
}

#[tokio::test]
async fn the_step_before_a_flow_with_nothing_to_undo_is_not_journaled() {
    let log = Log::default();
    let chain = || {
        FlowChain::new("test.skip")
            .then(step("a", &log))
            .then(no_undo("b", &log))
            .then(step("c", &log))
    };
    let (e, store) = watched(false);
    chain()
        .run(&e.journal, target(), Ctx::default())
        .await
        .unwrap();
    // The insert, `next` after b (c has something to undo) and the removal after c.
    assert_eq!(store.commits.load(std::sync::atomic::Ordering::SeqCst), 3);
    // A chain that finishes when interrupted must know b ran: every step is journaled.
    let (e, store) = watched(false);
    chain()
        .on_interrupt(OnInterrupt::Finish)
        .run(&e.journal, target(), Ctx::default())
        .await
        .unwrap();
    assert_eq!(store.commits.load(std::sync::atomic::Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_node_dying_in_a_flow_with_nothing_to_undo_rolls_back_the_flow_before_it() {
    let (e, store) = env(10);
    let log = Log::default();
    let mut b = no_undo("b", &log);
    b.hang_run = true;
    let chain = FlowChain::new("test.skip")
        .then(step("a", &log))
        .then(b)
        .then(step("c", &log));
    let mut run = Box::pin(chain.run(&e.journal, target(), Ctx::default()));
    assert!(
        futures::poll!(run.as_mut()).is_pending(),
        "b never finishes"
    );
    // The node dies while b runs.
    drop(run);
    let rec = e.journal.in_progress().await.unwrap();
    assert_eq!(rec.len(), 1);
    assert_eq!(
        rec[0].next, 0,
        "a may be in flight, as far as the journal knows"
    );
    assert_eq!(rec[0].context.to_value(), serde_json::json!({"done": []}));
    // The node comes back with a new boot and recovers what the old one left.
    let e = env_on(store, 11);
    let reg = ChainRegistry::new();
    reg.register(Arc::new(chain));
    let report = recover_orphans(&e.journal, &reg, &e.queues, &e.jobs, &[], |_| true)
        .await
        .unwrap();
    assert_eq!(report.rolled_back, 1);
    assert_eq!(logged(&log), vec!["run a", "run b", "rollback a"]);
    assert!(e.journal.in_progress().await.unwrap().is_empty());
}

/// Logs the chain scope it runs and rolls back in: epoch, and whether a host must be fenced.
struct Scoped {
    log: Log,
}

impl Scoped {
    fn note(&self, what: &str) {
        let host = Uuid::from_u128(3);
        let line = match current_chain() {
            Some(c) => format!("{what} epoch {} fence {}", c.epoch, c.must_fence(host)),
            None => format!("{what} outside a chain"),
        };
        self.log.lock().unwrap().push(line);
        if let Some(c) = current_chain() {
            c.fenced_on(host);
        }
    }
}

#[async_trait]
impl Flow<Ctx> for Scoped {
    fn name(&self) -> &'static str {
        "scoped"
    }
    async fn run(&self, _ctx: &mut Ctx) -> Result<(), Error> {
        self.note("run");
        Ok(())
    }
    async fn rollback(&self, _ctx: &mut Ctx) -> Result<(), Error> {
        self.note("undo");
        self.note("undo again");
        Ok(())
    }
}

#[tokio::test]
async fn flows_run_at_their_chains_epoch_and_a_rollback_fences_each_host_once() {
    let (e, _) = env(10);
    let log = Log::default();
    let failing = Step {
        fail_run: true,
        ..step("b", &log)
    };
    let chain = FlowChain::new("test.scope")
        .then(Scoped { log: log.clone() })
        .then(failing);
    assert!(chain
        .run(&e.journal, target(), Ctx::default())
        .await
        .is_err());
    assert_eq!(
        logged(&log),
        vec![
            "run epoch 0 fence false",
            "run b",
            "rollback b",
            "undo epoch 1 fence true",
            "undo again epoch 1 fence false",
        ]
    );
    assert!(current_chain().is_none(), "the scope ends with the flow");
}

#[tokio::test]
async fn a_taken_over_chain_runs_two_epochs_above_its_journal() {
    for (state, next, cursor, expect) in [
        (ChainState::Running, 1, -1, "undo epoch 2 fence true"),
        (ChainState::RollingBack, 1, 0, "undo epoch 2 fence true"),
    ] {
        let (e, _) = env(10);
        let log = Log::default();
        orphan(&e, "test.scope", state, next, cursor, None).await;
        let reg = ChainRegistry::new();
        reg.register(Arc::new(
            FlowChain::<Ctx>::new("test.scope")
                .then(Scoped { log: log.clone() })
                .then(step("b", &log)),
        ));
        let report = recover_orphans(&e.journal, &reg, &e.queues, &e.jobs, &[], |_| true)
            .await
            .unwrap();
        assert_eq!(report.rolled_back, 1, "{state:?}");
        assert_eq!(
            logged(&log)
                .iter()
                .find(|l| l.starts_with("undo "))
                .unwrap(),
            expect
        );
    }
}
