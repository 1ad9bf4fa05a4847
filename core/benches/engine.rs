//! Engine throughput: local bus request/reply, queue tasks over 100,000 signatures, and 10-row
//! batch commits on MemStore, SQLite and (with `STRATUS_TEST_PG_URL`) PostgreSQL.
//!
//! `cargo bench -p stratus-core --bench engine` (std build only).

#[cfg(madsim)]
fn main() {}

#[cfg(not(madsim))]
criterion::criterion_main!(benches::all);

#[cfg(not(madsim))]
mod benches {
    use criterion::{criterion_group, Criterion, Throughput};
    use serde::{Deserialize, Serialize};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use stratus_core::bus::{Bus, Message};
    use stratus_core::ids::Ids;
    use stratus_core::queue::Queues;
    use stratus_store::conformance::{schema, CsWidget};
    use stratus_store::sql::SqlStore;
    use stratus_store::{Batch, Json, MemStore, Resource, Row, Schema, Store};
    use uuid::Uuid;

    stratus_store::resource! {
        /// A lean row (think: a NIC or a volume): 4 fields, 1 index.
        pub struct BenchRow: "bench_row" {
            owner_uuid: Uuid [index],
            state: String,
            size: i64,
            note: Option<String>,
        }
    }

    fn bench_schema() -> Schema {
        schema().with(BenchRow::META)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    #[derive(Serialize, Deserialize)]
    struct Ping(u64);
    impl Message for Ping {
        type Reply = u64;
        const NAME: &'static str = "bench.ping";
    }

    const SENDERS: u64 = 64;

    fn bus(c: &mut Criterion) {
        let rt = runtime();
        let bus = Bus::new(Uuid::from_u128(1), Duration::from_secs(30));
        bus.register(|p: Ping| async move { Ok(p.0 + 1) }).unwrap();
        let mut g = c.benchmark_group("bus");
        g.throughput(Throughput::Elements(1));
        g.bench_function("local_request_reply", |b| {
            b.iter_custom(|iters| {
                let bus = bus.clone();
                rt.block_on(async move {
                    let per = iters.div_ceil(SENDERS);
                    let start = Instant::now();
                    let tasks: Vec<_> = (0..SENDERS)
                        .map(|_| {
                            let bus = bus.clone();
                            tokio::spawn(async move {
                                for i in 0..per {
                                    bus.send(Ping(i)).await.unwrap();
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                    start
                        .elapsed()
                        .mul_f64(iters as f64 / (per * SENDERS) as f64)
                })
            })
        });
        g.finish();
    }

    fn queues(c: &mut Criterion) {
        let rt = runtime();
        let sigs: Arc<Vec<String>> = Arc::new((0..100_000).map(|i| format!("vm-{i}")).collect());
        let mut g = c.benchmark_group("queue");
        g.throughput(Throughput::Elements(1));
        g.bench_function("tasks_over_100k_signatures", |b| {
            b.iter_custom(|iters| {
                let sigs = sigs.clone();
                rt.block_on(async move {
                    let q = Queues::new();
                    let per = iters.div_ceil(SENDERS);
                    let start = Instant::now();
                    let tasks: Vec<_> = (0..SENDERS)
                        .map(|w| {
                            let (q, sigs) = (q.clone(), sigs.clone());
                            tokio::spawn(async move {
                                for i in 0..per {
                                    let s = &sigs[((w * per + i) % sigs.len() as u64) as usize];
                                    q.run(s, 1, async { Ok::<(), stratus_core::Error>(()) })
                                        .await
                                        .unwrap();
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                    start
                        .elapsed()
                        .mul_f64(iters as f64 / (per * SENDERS) as f64)
                })
            })
        });
        g.finish();
    }

    fn widget(ids: &Ids, i: u64) -> Row<CsWidget> {
        Row::new(
            ids.uuid(),
            CsWidget {
                run: "bench".into(),
                name: format!("w-{}", ids.uuid().simple()),
                size: i as i64,
                weight: 1.5,
                active: true,
                label: Some("bench".into()),
                tag: None,
                seen: None,
                doc: None,
                list: Json(vec![]),
                rack_uuid: None,
                counter: 0,
            },
        )
    }

    fn lean(ids: &Ids, i: u64) -> Row<BenchRow> {
        Row::new(
            ids.uuid(),
            BenchRow {
                owner_uuid: ids.uuid(),
                state: "Ready".into(),
                size: i as i64,
                note: None,
            },
        )
    }

    /// Sequential commits of 10-row insert batches: `widget` rows (12 fields, 4 indexes, one
    /// unique) and `lean` rows (4 fields, 1 index).
    fn commit_bench(
        c: &mut Criterion,
        name: &str,
        rt: &tokio::runtime::Runtime,
        store: Arc<dyn Store>,
    ) {
        let ids = Arc::new(Ids::from_seed(1));
        let mut g = c.benchmark_group("store");
        g.throughput(Throughput::Elements(1));
        g.sample_size(20);
        for (shape, make) in [
            (
                "widget",
                (|ids: &Ids, i| widget(ids, i).to_record()) as fn(&Ids, u64) -> _,
            ),
            ("lean", |ids: &Ids, i| lean(ids, i).to_record()),
        ] {
            g.bench_function(format!("{name}_commit_10_{shape}_rows"), |b| {
                b.iter_custom(|iters| {
                    let (store, ids) = (store.clone(), ids.clone());
                    rt.block_on(async move {
                        let batches: Vec<Batch> = (0..iters)
                            .map(|i| {
                                (0..10).fold(Batch::new(), |b, j| {
                                    b.insert_record(make(&ids, i * 10 + j))
                                })
                            })
                            .collect();
                        let start = Instant::now();
                        for b in batches {
                            store.commit(b).await.unwrap();
                        }
                        start.elapsed()
                    })
                })
            });
        }
        g.finish();
    }

    fn stores(c: &mut Criterion) {
        let rt = runtime();
        commit_bench(c, "mem", &rt, Arc::new(MemStore::new(bench_schema())));
        let dir = std::env::temp_dir().join(format!("stratus-bench-{}", std::process::id()));
        let sqlite = rt
            .block_on(SqlStore::open_sqlite(&dir.join("bench.db"), bench_schema()))
            .unwrap();
        commit_bench(c, "sqlite", &rt, Arc::new(sqlite));
        if let Ok(url) = std::env::var("STRATUS_TEST_PG_URL") {
            let pg = rt.block_on(SqlStore::open(&url, bench_schema())).unwrap();
            commit_bench(c, "postgres", &rt, Arc::new(pg));
        } else {
            eprintln!("STRATUS_TEST_PG_URL not set: skipping the PostgreSQL commit bench");
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    criterion_group! {
        name = all;
        config = Criterion::default().measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
        targets = bus, queues, stores
    }
}
