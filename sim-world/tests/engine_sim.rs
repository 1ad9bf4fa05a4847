//! The engine under madsim: a management node killed in the middle of a chain finishes the
//! chain's rollback after restart (exactly once per flow), and bus + queues + flows with random
//! delays and failures are deterministic per seed.
#![cfg(madsim)]

use async_trait::async_trait;
use madsim::runtime::{Handle, Runtime};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stratus_core::bus::Message;
use stratus_core::engine::{engine_kinds, Engine, EngineOptions};
use stratus_core::error::{Error, ErrorCode};
use stratus_core::extension::Extensions;
use stratus_core::flow::{ChainTarget, Flow, FlowChain};
use stratus_core::job::JobState;
use stratus_sim_world::Trace;
use stratus_store::{Batch, Db, Expect, MemStore, Query, Resource, Row, Schema, Update};
use uuid::Uuid;

stratus_store::resource! {
    /// A shared counter (think: a host's free capacity).
    pub struct Pool: "sim_pool" {
        free: i64,
    }
}

stratus_store::resource! {
    /// One unit taken from the pool by one flow of one chain: makes the flow idempotent.
    pub struct Hold: "sim_hold" {
        resource_uuid: Uuid [index],
        flow: String,
    }
}

fn schema() -> Schema {
    let mut s = Schema::new().with(Pool::META).with(Hold::META);
    for k in engine_kinds() {
        s.add(k);
    }
    s
}

const POOL: Uuid = Uuid::from_u128(0xB001);
const RESOURCE: Uuid = Uuid::from_u128(0xAAAA);

type Log = Arc<Mutex<Vec<String>>>;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Ctx {
    resource: Uuid,
}

/// Sleeps, then takes one unit from the pool (recording a hold in the same batch). Rollback
/// returns the unit only if the hold exists, so it is safe to replay and safe for a flow that
/// never got to take anything.
struct TakeUnit {
    name: &'static str,
    db: Db,
    log: Log,
}

fn hold_uuid(resource: Uuid, flow: &str) -> Uuid {
    stratus_core::ids::name_uuid(&resource.to_string(), flow)
}

#[async_trait]
impl Flow<Ctx> for TakeUnit {
    fn name(&self) -> &'static str {
        self.name
    }
    async fn run(&self, ctx: &mut Ctx) -> Result<(), Error> {
        self.log.lock().unwrap().push(format!("run {}", self.name));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let hold = Row::new(
            hold_uuid(ctx.resource, self.name),
            Hold {
                resource_uuid: ctx.resource,
                flow: self.name.into(),
            },
        );
        self.db
            .commit(
                Batch::new()
                    .insert(&hold)
                    .update(Update::of::<Pool>(POOL).add("free", -1).at_least("free", 0)),
            )
            .await?;
        Ok(())
    }
    async fn rollback(&self, ctx: &mut Ctx) -> Result<(), Error> {
        self.log
            .lock()
            .unwrap()
            .push(format!("rollback {}", self.name));
        let r = self
            .db
            .commit(
                Batch::new()
                    .delete::<Hold>(hold_uuid(ctx.resource, self.name), Expect::Exists)
                    .update(Update::of::<Pool>(POOL).add("free", 1)),
            )
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.class() == stratus_store::ErrorClass::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

fn chain(db: &Db, log: &Log) -> Arc<FlowChain<Ctx>> {
    let f = |name| TakeUnit {
        name,
        db: db.clone(),
        log: log.clone(),
    };
    Arc::new(
        FlowChain::new("sim.take-four")
            .then(f("a"))
            .then(f("b"))
            .then(f("c"))
            .then(f("d")),
    )
}

fn count(log: &Log, line: &str) -> usize {
    log.lock().unwrap().iter().filter(|l| *l == line).count()
}

#[test]
fn a_node_killed_mid_chain_rolls_the_chain_back_once_per_flow_after_restart() {
    let rt = Runtime::with_seed_and_config(7, madsim::Config::default());
    rt.block_on(async {
        let store = Arc::new(MemStore::new(schema()));
        let db = Db::new(store.clone());
        db.insert(Row::new(POOL, Pool { free: 10 })).await.unwrap();
        let log = Log::default();
        let jobs: Arc<Mutex<Vec<Uuid>>> = Arc::default();
        let boots = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let node = Handle::current()
            .create_node()
            .name("mgmt")
            .ip("10.0.0.1".parse().unwrap())
            .init({
                let (store, log, jobs, boots) =
                    (store.clone(), log.clone(), jobs.clone(), boots.clone());
                move || {
                    let (store, log, jobs, boots) =
                        (store.clone(), log.clone(), jobs.clone(), boots.clone());
                    async move {
                        let boot = boots.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let engine = Engine::start(
                            store,
                            EngineOptions {
                                node: Uuid::from_u128(1),
                                seed: None,
                                extensions: Extensions::builder().build(),
                                config: vec![],
                                faults: None,
                                events: false,
                            },
                        )
                        .await
                        .unwrap();
                        let chain = chain(&engine.db, &log);
                        engine.chains.register(chain.clone());
                        let report = engine.recover(&[]).await.unwrap();
                        log.lock()
                            .unwrap()
                            .push(format!("boot {boot}: recovered {}", report.rolled_back));
                        if boot == 0 {
                            let job = engine
                                .jobs
                                .create(None, "sim.take-four", Some(RESOURCE))
                                .await
                                .unwrap();
                            jobs.lock().unwrap().push(job);
                            let target = ChainTarget {
                                resource: RESOURCE,
                                queue: format!("r-{RESOURCE}"),
                                job: Some(job),
                            };
                            let e = engine.clone();
                            let out = e
                                .queues
                                .run(&target.queue.clone(), 1, async {
                                    let ctx = Ctx { resource: RESOURCE };
                                    (chain.run(&e.journal, target, ctx).await).map_err(|f| f.error)
                                })
                                .await;
                            log.lock()
                                .unwrap()
                                .push(format!("chain returned ok={}", out.is_ok()));
                        }
                    }
                }
            })
            .build();
        // Flows a and b complete at t=1s and t=2s; c is in flight at 2.5s.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(
            db.must_get::<Pool>(POOL).await.unwrap().free,
            8,
            "a and b took a unit each"
        );
        Handle::current().kill(node.id());
        assert_eq!(
            db.select::<stratus_core::flow::ChainRecord>(&Query::new("flow_chain"))
                .await
                .unwrap()
                .len(),
            1
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        Handle::current().restart(node.id());
        tokio::time::sleep(Duration::from_secs(30)).await;

        let lines = log.lock().unwrap().clone();
        assert!(
            !lines.iter().any(|l| l.starts_with("chain returned")),
            "the chain never returned: {lines:?}"
        );
        assert_eq!(count(&log, "run a"), 1);
        assert_eq!(count(&log, "run b"), 1);
        assert_eq!(count(&log, "run c"), 1);
        assert_eq!(count(&log, "run d"), 0);
        for f in ["a", "b", "c"] {
            assert_eq!(
                count(&log, &format!("rollback {f}")),
                1,
                "rollback {f} exactly once: {lines:?}"
            );
        }
        assert_eq!(count(&log, "rollback d"), 0, "d never started");
        assert!(
            lines.contains(&"boot 1: recovered 1".to_string()),
            "{lines:?}"
        );
        // Nothing left half done: the pool is whole, no holds, no journal, the job is closed.
        assert_eq!(db.must_get::<Pool>(POOL).await.unwrap().free, 10);
        assert_eq!(db.count(&Query::of::<Hold>()).await.unwrap(), 0);
        assert_eq!(db.count(&Query::new("flow_chain")).await.unwrap(), 0);
        let job = jobs.lock().unwrap()[0];
        let j = db.must_get::<stratus_core::job::Job>(job).await.unwrap();
        assert_eq!(j.state, JobState::Failed);
        assert_eq!(j.error_code.as_deref(), Some("node_unavailable"));
    });
}

// ---- determinism: bus + queues + flows with random delays and failures ----

#[derive(Debug, Serialize, Deserialize)]
struct Work {
    n: u32,
}
impl Message for Work {
    type Reply = u32;
    const NAME: &'static str = "sim.work";
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct WorkCtx {
    n: u32,
    steps: u32,
}

/// A flow that sleeps a random time and fails with some probability; all randomness comes from
/// the engine's seeded generator.
struct Jitter {
    name: &'static str,
    engine: std::sync::Weak<Engine>,
    trace: Trace,
    start: tokio::time::Instant,
}

impl Jitter {
    fn draw(&self) -> (u64, bool) {
        let e = self.engine.upgrade().expect("engine alive");
        e.ids
            .with_rng(|r| (r.gen_range(1..40u64), r.gen_bool(0.08)))
    }
    fn note(&self, what: &str, n: u32) {
        self.trace.record(
            self.start.elapsed().as_nanos(),
            &format!("{what} {} {n}", self.name),
        );
    }
}

#[async_trait]
impl Flow<WorkCtx> for Jitter {
    fn name(&self) -> &'static str {
        self.name
    }
    async fn run(&self, ctx: &mut WorkCtx) -> Result<(), Error> {
        let (ms, fail) = self.draw();
        tokio::time::sleep(Duration::from_millis(ms)).await;
        self.note("run", ctx.n);
        if fail {
            return Err(Error::new(ErrorCode::AgentError, "injected"));
        }
        ctx.steps += 1;
        Ok(())
    }
    async fn rollback(&self, ctx: &mut WorkCtx) -> Result<(), Error> {
        let (ms, _) = self.draw();
        tokio::time::sleep(Duration::from_millis(ms)).await;
        self.note("rollback", ctx.n);
        Ok(())
    }
}

/// Run the workload in the current simulation; returns (trace hash, events).
async fn workload() -> (u64, u64) {
    let trace = Trace::new();
    let start = tokio::time::Instant::now();
    let store = Arc::new(MemStore::new(schema()));
    let engine = Engine::start(
        store,
        EngineOptions {
            node: Uuid::from_u128(1),
            seed: None,
            extensions: Extensions::builder().build(),
            config: vec![],
            faults: None,
            events: false,
        },
    )
    .await
    .unwrap();
    let jitter = |name| Jitter {
        name,
        engine: Arc::downgrade(&engine),
        trace: trace.clone(),
        start,
    };
    let chain = Arc::new(
        FlowChain::new("sim.jitter")
            .then(jitter("alloc"))
            .then(jitter("prepare"))
            .then(jitter("start")),
    );
    let e = Arc::downgrade(&engine);
    engine
        .bus
        .register(move |m: Work| {
            let (e, chain) = (e.upgrade().expect("engine"), chain.clone());
            async move {
                let queue = format!("r-{}", m.n % 17);
                let target = ChainTarget {
                    resource: Uuid::from_u128(m.n as u128),
                    queue: queue.clone(),
                    job: None,
                };
                let ctx = WorkCtx { n: m.n, steps: 0 };
                let work = async {
                    (chain.run(&e.journal, target, ctx).await)
                        .map(|c| c.steps)
                        .map_err(|f| f.error)
                };
                e.queues.run(&queue, 2, work).await
            }
        })
        .unwrap();
    let mut senders = Vec::new();
    for n in 0..300u32 {
        let bus = engine.bus.clone();
        let trace = trace.clone();
        senders.push(tokio::spawn(async move {
            let out = bus
                .send_timeout(Work { n }, Duration::from_millis(400))
                .await;
            let what = match out {
                Ok(steps) => format!("ok {n} {steps}"),
                Err(e) => format!("err {n} {}", e.code),
            };
            trace.record(start.elapsed().as_nanos(), &what);
        }));
    }
    for s in senders {
        s.await.unwrap();
    }
    // Let handlers that outlived their callers finish.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(engine.queues.stats().running, 0);
    assert!(
        engine.journal.in_progress().await.unwrap().is_empty(),
        "every chain ended"
    );
    (trace.hash(), trace.events())
}

fn run_seed(seed: u64) -> (u64, u64) {
    Runtime::with_seed_and_config(seed, madsim::Config::default()).block_on(workload())
}

#[test]
fn same_seed_same_trace_different_seed_different_trace() {
    let a = run_seed(42);
    let b = run_seed(42);
    let c = run_seed(43);
    assert_eq!(a, b, "same seed, same trace");
    assert_ne!(a.0, c.0, "a different seed changes the trace");
    assert!(a.1 > 600, "the workload did something: {} events", a.1);
}

#[test]
fn madsim_determinism_check_passes() {
    Runtime::check_determinism(42, madsim::Config::default(), workload);
}

/// Seeded by `MADSIM_TEST_SEED` (or the clock); with `MADSIM_TEST_CHECK_DETERMINISM=1` madsim runs it
/// twice and compares every random draw.
#[madsim::test]
async fn engine_workload_under_madsim_test() {
    let (_, events) = workload().await;
    assert!(events > 600);
}
