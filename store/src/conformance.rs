//! The conformance suite: the same cases, run against every backend (`MemStore`, SQLite,
//! PostgreSQL). Each case works on rows tagged with its own run id, so the suite can run against a
//! shared, non-empty database.
//!
//! Call [`run_all`] with a store built on [`schema`]. Cases panic (assert) on a mismatch.

use super::{
    Batch, Cond, Db, Expect, FieldType, Json, JsonText, Millis, Op, Query, Resource, Row, Schema,
    Store, StoreError, Update, Value,
};
use crate::ErrorClass;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

crate::resource! {
    /// A rack: parent of widgets.
    pub struct CsRack: "cs_rack" {
        run: String [index],
        name: String [unique],
        row: i64 [index],
    }
    relations {
        widgets: "cs_widget" (uuid = rack_uuid),
    }
}

crate::resource! {
    /// A widget with one field of every type.
    pub struct CsWidget: "cs_widget" {
        run: String [index],
        name: String [unique],
        size: i64 [index],
        weight: f64,
        active: bool,
        label: Option<String>,
        tag: Option<Uuid>,
        seen: Option<Millis>,
        doc: Option<JsonText>,
        list: Json<Vec<String>>,
        rack_uuid: Option<Uuid> [index],
        counter: i64,
    }
    relations {
        rack: "cs_rack" (rack_uuid = uuid),
        parts: "cs_part" (uuid = widget_uuid),
    }
}

crate::resource! {
    /// A part of a widget (two hops from a rack).
    pub struct CsPart: "cs_part" {
        run: String [index],
        widget_uuid: Uuid [index],
        serial: String,
    }
    relations {
        widget: "cs_widget" (widget_uuid = uuid),
    }
}

/// The kinds the suite needs.
pub fn schema() -> Schema {
    Schema::new()
        .with(CsRack::META)
        .with(CsWidget::META)
        .with(CsPart::META)
}

struct Case {
    db: Db,
    run: String,
    ids: Ids,
}

impl Case {
    fn new(store: &Arc<dyn Store>, ids: &Ids) -> Self {
        Case {
            db: Db::new(store.clone()),
            run: ids.uuid().simple().to_string(),
            ids: ids.clone(),
        }
    }

    fn name(&self, n: &str) -> String {
        format!("{n}-{}", &self.run[20..])
    }

    fn widget(&self, name: &str, size: i64) -> Row<CsWidget> {
        widget(self.ids.uuid(), &self.run, &self.name(name), size)
    }

    fn q(&self) -> Query {
        Query::of::<CsWidget>().eq("run", self.run.as_str())
    }

    async fn names(&self, q: Query) -> Vec<String> {
        let suffix = format!("-{}", &self.run[20..]);
        self.db
            .select::<CsWidget>(&q)
            .await
            .unwrap()
            .into_iter()
            .map(|w| w.name.trim_end_matches(&suffix).to_string())
            .collect()
    }

    async fn insert_all(&self, rows: &[Row<CsWidget>]) {
        let mut b = Batch::new();
        for r in rows {
            b = b.insert(r);
        }
        self.db.commit(b).await.unwrap();
    }
}

fn code(e: StoreError) -> ErrorClass {
    e.class()
}

/// The suite's row UUIDs: the high half counts up (they increase, as the stack's time-ordered
/// ones do), the low half is drawn from one generator per run (seeded by the simulation under
/// madsim, by the OS otherwise), so runs against one shared database never meet.
#[derive(Clone)]
pub struct Ids(Arc<Mutex<ChaCha8Rng>>);

/// The counting half of every UUID the suite makes.
static SEQ: AtomicU64 = AtomicU64::new(1);

impl Ids {
    fn uuid(&self) -> Uuid {
        let low = self.0.lock().unwrap_or_else(|e| e.into_inner()).next_u64();
        Uuid::from_u64_pair(SEQ.fetch_add(1, Ordering::Relaxed), low)
    }
}

/// Every field type survives a round trip, nulls included; versions and timestamps are set.
pub async fn round_trip_every_field_type(store: &Arc<dyn Store>, ids: &Ids) {
    let c = Case::new(store, ids);
    let mut full = c.widget("full", -9_007_199_254_740_993);
    full.weight = 0.1 + 0.2;
    full.active = true;
    full.label = Some("héllo 'quoted' \"double\" \\ % _ 💡".into());
    full.tag = Some(c.ids.uuid());
    full.seen = Some(Millis(1_700_000_000_123));
    full.doc = Some(JsonText::of(
        &serde_json::json!({"a": [1, 2.5, "x", null, {"b": true}], "n": -3}),
    ));
    full.list = Json(vec!["one".into(), "two".into()]);
    full.counter = i64::MAX;
    let empty = c.widget("empty", 0);
    c.insert_all(&[full.clone(), empty.clone()]).await;
    for want in [&full, &empty] {
        let got = c.db.must_get::<CsWidget>(want.uuid).await.unwrap();
        assert_eq!(got.data, want.data, "round trip on {}", store.backend());
        assert_eq!(got.version, 1);
        assert!(got.created_ms > 0 && got.created_ms == got.updated_ms);
    }
    assert!(c.db.get::<CsWidget>(c.ids.uuid()).await.unwrap().is_none());
    // Extreme floats and the smallest int.
    let mut edge = c.widget("edge", i64::MIN);
    edge.weight = f64::MAX;
    c.insert_all(&[edge.clone()]).await;
    assert_eq!(
        c.db.must_get::<CsWidget>(edge.uuid).await.unwrap().data,
        edge.data
    );
}

/// Each operator selects exactly the rows it should, on own fields.
pub async fn every_query_operator(store: &Arc<dyn Store>, ids: &Ids) {
    let c = Case::new(store, ids);
    let tag = c.ids.uuid();
    let mut rows: Vec<Row<CsWidget>> = (0..8).map(|i| c.widget(&format!("w{i}"), i)).collect();
    rows[1].label = Some("alpha".into());
    rows[2].label = Some("Alpha".into());
    rows[3].label = Some("beta_1".into());
    rows[4].label = Some("beta%2".into());
    rows[5].tag = Some(tag);
    rows[6].seen = Some(Millis(5_000));
    rows[7].seen = Some(Millis(9_000));
    rows[7].doc = Some(JsonText::of(&serde_json::json!([1])));
    c.insert_all(&rows).await;
    let n = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let cases: Vec<(Query, Vec<String>)> = vec![
        (c.q().eq("size", 3i64), n(&["w3"])),
        (
            c.q().ne("size", 3i64),
            n(&["w0", "w1", "w2", "w4", "w5", "w6", "w7"]),
        ),
        (c.q().gt("size", 5i64), n(&["w6", "w7"])),
        (c.q().ge("size", 6i64), n(&["w6", "w7"])),
        (c.q().lt("size", 2i64), n(&["w0", "w1"])),
        (c.q().le("size", 1i64), n(&["w0", "w1"])),
        (c.q().gt("weight", 1.5), n(&["w7"])),
        (c.q().eq("active", true).lt("size", 4i64), n(&["w0", "w2"])),
        (c.q().is_in("size", [1i64, 3, 99]), n(&["w1", "w3"])),
        (
            c.q().not_in("size", [0i64, 1, 2, 3, 4]),
            n(&["w5", "w6", "w7"]),
        ),
        (c.q().eq("label", "alpha"), n(&["w1"])),
        (c.q().ne("label", "alpha"), n(&["w2", "w3", "w4"])),
        (c.q().like("label", "%lpha"), n(&["w1", "w2"])),
        (c.q().like("label", "a%"), n(&["w1"])),
        (c.q().like("label", "beta_1"), n(&["w3"])),
        (c.q().like("label", "beta\\_%"), n(&["w3"])),
        (c.q().like("label", "beta\\%%"), n(&["w4"])),
        (c.q().not_like("label", "%lpha"), n(&["w3", "w4"])),
        (c.q().is_null("label").lt("size", 6i64), n(&["w0", "w5"])),
        (c.q().not_null("label"), n(&["w1", "w2", "w3", "w4"])),
        (c.q().eq("tag", tag), n(&["w5"])),
        (c.q().eq("tag", tag.to_string().as_str()), n(&["w5"])),
        (c.q().ge("seen", Value::Time(5_000)), n(&["w6", "w7"])),
        (c.q().gt("seen", Value::Time(5_000)), n(&["w7"])),
        (c.q().not_null("doc"), n(&["w7"])),
        (c.q().is_null("doc").ge("size", 6i64), n(&["w6"])),
        (c.q().eq("uuid", rows[2].uuid), n(&["w2"])),
        (
            c.q().is_in("uuid", [rows[2].uuid, rows[4].uuid]),
            n(&["w2", "w4"]),
        ),
        (c.q().gt("label", "B"), n(&["w1", "w3", "w4"])),
        (c.q().eq("size", "4"), n(&["w4"])),
    ];
    for (q, want) in cases {
        let mut got = c.names(q.clone()).await;
        got.sort();
        assert_eq!(got, want, "{} on {}", q, store.backend());
        let count = c.db.count(&q).await.unwrap();
        assert_eq!(
            count as usize,
            want.len(),
            "count {} on {}",
            q,
            store.backend()
        );
    }
}

/// Conditions on related rows: many-to-one, one-to-many and two hops.
pub async fn related_conditions(store: &Arc<dyn Store>, ids: &Ids) {
    let c = Case::new(store, ids);
    let racks: Vec<Row<CsRack>> = (0..3)
        .map(|i| {
            Row::new(
                c.ids.uuid(),
                CsRack {
                    run: c.run.clone(),
                    name: c.name(&format!("r{i}")),
                    row: i,
                },
            )
        })
        .collect();
    let mut ws: Vec<Row<CsWidget>> = (0..6).map(|i| c.widget(&format!("w{i}"), i)).collect();
    for (i, w) in ws.iter_mut().enumerate() {
        w.rack_uuid = (i < 5).then(|| racks[i % 2].uuid);
    }
    let mut b = Batch::new();
    for r in &racks {
        b = b.insert(r);
    }
    for w in &ws {
        b = b.insert(w);
    }
    for (i, serial) in [(0usize, "s-a"), (0, "s-b"), (3, "s-c"), (5, "s-a")] {
        b = b.insert(&Row::new(
            c.ids.uuid(),
            CsPart {
                run: c.run.clone(),
                widget_uuid: ws[i].uuid,
                serial: serial.into(),
            },
        ));
    }
    c.db.commit(b).await.unwrap();
    let r0 = c.name("r0");
    let n = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let cases = vec![
        (c.q().eq("rack.name", r0.as_str()), n(&["w0", "w2", "w4"])),
        (c.q().ge("rack.row", 1i64), n(&["w1", "w3"])),
        (c.q().eq("parts.serial", "s-a"), n(&["w0", "w5"])),
        (c.q().ne("parts.serial", "s-a"), n(&["w0", "w3"])),
        (
            c.q().like("parts.serial", "s-%").eq("rack.row", 0i64),
            n(&["w0"]),
        ),
        (c.q().is_null("rack_uuid"), n(&["w5"])),
    ];
    for (q, want) in cases {
        let mut got = c.names(q.clone()).await;
        got.sort();
        assert_eq!(got, want, "{} on {}", q, store.backend());
    }
    // Two hops: parts whose widget sits in rack r1.
    let r1 = c.name("r1");
    let parts =
        c.db.select::<CsPart>(
            &Query::of::<CsPart>()
                .eq("run", c.run.as_str())
                .eq("widget.rack.name", r1.as_str()),
        )
        .await
        .unwrap();
    assert_eq!(parts.len(), 1, "two hops on {}", store.backend());
    assert_eq!(parts[0].serial, "s-c");
    // One-to-many from the other side: racks with a widget of size 4.
    let rs =
        c.db.select::<CsRack>(
            &Query::of::<CsRack>()
                .eq("run", c.run.as_str())
                .eq("widgets.size", 4i64),
        )
        .await
        .unwrap();
    assert_eq!(
        rs.iter().map(|r| r.uuid).collect::<Vec<_>>(),
        vec![racks[0].uuid]
    );
}

/// Sorting (text byte order, nulls first ascending) and paging that neither repeats nor skips.
pub async fn sort_and_paging_are_stable(store: &Arc<dyn Store>, ids: &Ids) {
    let c = Case::new(store, ids);
    let mut rows: Vec<Row<CsWidget>> = (0..57)
        .map(|i| c.widget(&format!("p{i:02}"), i % 5))
        .collect();
    for (i, r) in rows.iter_mut().enumerate() {
        r.label = match i % 4 {
            0 => None,
            1 => Some("b".into()),
            2 => Some("B".into()),
            _ => Some("a".into()),
        };
    }
    c.insert_all(&rows).await;
    for q in [
        c.q().sort_asc("size"),
        c.q().sort_desc("size"),
        c.q().sort_asc("label").sort_desc("size"),
        c.q().sort_desc("label"),
        c.q(),
    ] {
        let all = c.db.select::<CsWidget>(&q).await.unwrap();
        assert_eq!(all.len(), 57);
        let mut paged = Vec::new();
        for page in 0..6 {
            let p =
                c.db.select::<CsWidget>(&q.clone().limit(10).offset(page * 10))
                    .await
                    .unwrap();
            assert_eq!(p.len(), if page < 5 { 10 } else { 7 });
            paged.extend(p);
        }
        let a: Vec<Uuid> = all.iter().map(|r| r.uuid).collect();
        let b: Vec<Uuid> = paged.iter().map(|r| r.uuid).collect();
        assert_eq!(a, b, "paging {} on {}", q, store.backend());
        assert_eq!(b.iter().collect::<BTreeSet<_>>().len(), 57);
        // The order is the documented one.
        for w in all.windows(2) {
            let mut o = std::cmp::Ordering::Equal;
            for s in &q.sort {
                let x = w[0].to_record();
                let y = w[1].to_record();
                let ord = x
                    .get(&s.field)
                    .unwrap()
                    .compare(y.get(&s.field).unwrap())
                    .unwrap();
                o = if s.desc { ord.reverse() } else { ord };
                if o != std::cmp::Ordering::Equal {
                    break;
                }
            }
            assert!(
                o == std::cmp::Ordering::Less
                    || (o == std::cmp::Ordering::Equal && w[0].uuid < w[1].uuid),
                "order of {} on {}",
                q,
                store.backend()
            );
        }
    }
    let labels: Vec<Option<String>> =
        c.db.select::<CsWidget>(&c.q().sort_asc("label").limit(57))
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.label.clone())
            .collect();
    let first_some = labels.iter().position(|l| l.is_some()).unwrap();
    assert_eq!(first_some, 15, "nulls sort first");
    assert_eq!(
        labels[first_some].as_deref(),
        Some("B"),
        "byte order: B < a < b"
    );
    assert_eq!(labels.last().unwrap().as_deref(), Some("b"));
}

/// Optimistic versions: a stale write is a clear conflict and changes nothing.
pub async fn version_conflicts_are_clear(store: &Arc<dyn Store>, ids: &Ids) {
    let c = Case::new(store, ids);
    let w = c.widget("v", 1);
    c.insert_all(std::slice::from_ref(&w)).await;
    let v = c
        .db
        .commit(Batch::new().update(Update::of::<CsWidget>(w.uuid).version(1).set("size", 2i64)))
        .await
        .unwrap();
    assert_eq!(v, vec![2]);
    let err = c
        .db
        .commit(Batch::new().update(Update::of::<CsWidget>(w.uuid).version(1).set("size", 3i64)))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        StoreError::Conflict {
            kind: "cs_widget".into(),
            uuid: w.uuid,
            expected: 1,
            found: 2
        },
        "on {}",
        store.backend()
    );
    let err =
        c.db.commit(Batch::new().delete::<CsWidget>(w.uuid, Expect::Version(7)))
            .await
            .unwrap_err();
    assert_eq!(code(err), ErrorClass::Conflict);
    let got = c.db.must_get::<CsWidget>(w.uuid).await.unwrap();
    assert_eq!((got.size, got.version), (2, 2));
    assert!(got.updated_ms >= got.created_ms);
    // replace() carries the version it read.
    let mut stale = got.clone();
    stale.size = 10;
    c.db.commit(Batch::new().replace(&got)).await.unwrap();
    let err = c.db.commit(Batch::new().replace(&stale)).await.unwrap_err();
    assert_eq!(code(err), ErrorClass::Conflict);
}

/// A keyed batch applies once: committed again with its key, it answers what it answered the
/// first time and writes nothing (an insert does not collide with itself, a counter does not
/// move twice); a failed keyed batch is not remembered; another key applies anew.
pub async fn keyed_batches_apply_once(store: &Arc<dyn Store>, ids: &Ids) {
    let c = Case::new(store, ids);
    let w = c.widget("k", 1);
    let key = c.ids.uuid();
    let batch = Batch::new()
        .insert(&w)
        .update(Update::of::<CsWidget>(w.uuid).add("counter", 1))
        .keyed(key);
    let first = store.commit(batch.clone()).await.unwrap();
    let again = store.commit(batch.clone()).await.unwrap();
    assert_eq!(again, first, "on {}", store.backend());
    let got = c.db.must_get::<CsWidget>(w.uuid).await.unwrap();
    assert_eq!((got.counter, got.version), (1, 2), "on {}", store.backend());
    // Without its key, the same batch is a new one: the insert collides.
    let unkeyed = Batch {
        key: None,
        ..batch.clone()
    };
    let err = store.commit(unkeyed).await.unwrap_err();
    assert_eq!(
        code(err),
        ErrorClass::AlreadyExists,
        "on {}",
        store.backend()
    );
    // A keyed batch that fails is not remembered: once its guard holds, it applies.
    let guarded_key = c.ids.uuid();
    let guarded = Batch::new()
        .update(
            Update::of::<CsWidget>(w.uuid)
                .add("counter", -2)
                .at_least("counter", 0),
        )
        .keyed(guarded_key);
    let err = store.commit(guarded.clone()).await.unwrap_err();
    assert_eq!(
        code(err),
        ErrorClass::ConditionFailed,
        "on {}",
        store.backend()
    );
    let more = Batch::new()
        .update(Update::of::<CsWidget>(w.uuid).add("counter", 1))
        .keyed(c.ids.uuid());
    assert_eq!(store.commit(more).await.unwrap(), vec![3]);
    assert_eq!(store.commit(guarded.clone()).await.unwrap(), vec![4]);
    assert_eq!(store.commit(guarded).await.unwrap(), vec![4]);
    let got = c.db.must_get::<CsWidget>(w.uuid).await.unwrap();
    assert_eq!((got.counter, got.version), (0, 4), "on {}", store.backend());
}

/// A batch that fails on any of its writes leaves the store exactly as it was.
pub async fn failed_batch_leaves_nothing(store: &Arc<dyn Store>, ids: &Ids) {
    let c = Case::new(store, ids);
    let a = c.widget("a", 1);
    let b = c.widget("b", 2);
    c.insert_all(&[a.clone(), b.clone()]).await;
    let before = c.db.select::<CsWidget>(&c.q()).await.unwrap();
    let failing_writes: Vec<(Batch, ErrorClass)> = vec![
        (
            Batch::new()
                .insert(&c.widget("new1", 5))
                .update(Update::of::<CsWidget>(a.uuid).set("size", 50i64))
                .update(Update::of::<CsWidget>(b.uuid).version(9).set("size", 60i64)),
            ErrorClass::Conflict,
        ),
        (
            Batch::new()
                .update(Update::of::<CsWidget>(a.uuid).add("counter", 5))
                .insert(&c.widget("new2", 5))
                .insert(&Row::new(a.uuid, a.data.clone())),
            ErrorClass::AlreadyExists,
        ),
        (
            Batch::new()
                .delete::<CsWidget>(a.uuid, Expect::Exists)
                .update(
                    Update::of::<CsWidget>(b.uuid)
                        .add("counter", -1)
                        .at_least("counter", 0),
                ),
            ErrorClass::ConditionFailed,
        ),
        (
            Batch::new()
                .insert(&c.widget("new3", 5))
                .insert(&c.widget("a", 7)),
            ErrorClass::AlreadyExists,
        ),
        (
            Batch::new()
                .update(Update::of::<CsWidget>(a.uuid).set("label", "x"))
                .delete::<CsWidget>(c.ids.uuid(), Expect::Exists),
            ErrorClass::NotFound,
        ),
        (
            Batch::new()
                .update(Update::of::<CsWidget>(a.uuid).set("label", "x"))
                .update(Update::of::<CsWidget>(b.uuid).set("size", "big")),
            ErrorClass::InvalidArgument,
        ),
    ];
    for (i, (batch, want)) in failing_writes.into_iter().enumerate() {
        let err = c.db.commit(batch).await.unwrap_err();
        assert_eq!(
            code(err.clone()),
            want,
            "batch {i} on {}: {err}",
            store.backend()
        );
        let after = c.db.select::<CsWidget>(&c.q()).await.unwrap();
        assert_eq!(
            after,
            before,
            "batch {i} on {} left changes",
            store.backend()
        );
    }
}

/// Insert, upsert, delete, guarded updates and unique fields.
pub async fn writes_and_guards(store: &Arc<dyn Store>, ids: &Ids) {
    let c = Case::new(store, ids);
    let w = c.widget("g", 1);
    c.insert_all(std::slice::from_ref(&w)).await;
    // Insert of an existing uuid.
    let err = c.db.commit(Batch::new().insert(&w)).await.unwrap_err();
    assert_eq!(code(err), ErrorClass::AlreadyExists);
    // Unique field.
    let err =
        c.db.commit(Batch::new().insert(&c.widget("g", 9)))
            .await
            .unwrap_err();
    assert!(
        matches!(err, StoreError::Duplicate { ref field, .. } if field == "name"),
        "{err}"
    );
    // A row may keep its own unique value, and two rows may swap through a delete.
    c.db.commit(Batch::new().update(Update::of::<CsWidget>(w.uuid).set("name", c.name("g"))))
        .await
        .unwrap();
    // An update may not take another row's unique value; the row stays as it was.
    let other = c.widget("g-other", 2);
    c.insert_all(std::slice::from_ref(&other)).await;
    let err =
        c.db.commit(
            Batch::new().update(
                Update::of::<CsWidget>(other.uuid)
                    .set("name", c.name("g"))
                    .set("size", 7i64),
            ),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Duplicate { ref field, .. } if field == "name"),
        "{err}"
    );
    let kept = c.db.must_get::<CsWidget>(other.uuid).await.unwrap();
    assert_eq!(
        (kept.name.as_str(), kept.size),
        (c.name("g-other").as_str(), 2)
    );
    let by_name = c.q().eq("name", c.name("g-other"));
    assert_eq!(c.db.select::<CsWidget>(&by_name).await.unwrap().len(), 1);
    c.db.commit(Batch::new().delete::<CsWidget>(other.uuid, Expect::Exists))
        .await
        .unwrap();
    // Upsert inserts then replaces.
    let mut u = c.widget("up", 3);
    let v = c.db.commit(Batch::new().upsert(&u)).await.unwrap();
    assert_eq!(v, vec![1]);
    u.size = 4;
    let v = c.db.commit(Batch::new().upsert(&u)).await.unwrap();
    assert_eq!(v, vec![2]);
    assert_eq!(c.db.must_get::<CsWidget>(u.uuid).await.unwrap().size, 4);
    // Guards: when-conditions and bounds.
    let add = |d: i64| {
        Update::of::<CsWidget>(w.uuid)
            .add("counter", d)
            .at_least("counter", 0)
            .at_most("counter", 10)
    };
    c.db.commit(Batch::new().update(add(10))).await.unwrap();
    assert_eq!(
        code(c.db.commit(Batch::new().update(add(1))).await.unwrap_err()),
        ErrorClass::ConditionFailed
    );
    c.db.commit(Batch::new().update(add(-10))).await.unwrap();
    assert_eq!(
        code(c.db.commit(Batch::new().update(add(-1))).await.unwrap_err()),
        ErrorClass::ConditionFailed
    );
    let guarded = |size: i64| {
        Update::of::<CsWidget>(w.uuid)
            .when_eq("size", size)
            .set("label", "ok")
    };
    assert_eq!(
        code(
            c.db.commit(Batch::new().update(guarded(2)))
                .await
                .unwrap_err()
        ),
        ErrorClass::ConditionFailed
    );
    c.db.commit(Batch::new().update(guarded(1))).await.unwrap();
    let got = c.db.must_get::<CsWidget>(w.uuid).await.unwrap();
    assert_eq!((got.counter, got.label.as_deref()), (0, Some("ok")));
    let when_in = Update::of::<CsWidget>(w.uuid)
        .when(Cond::new("label", Op::In(vec!["ok".into(), "fine".into()])))
        .when(Cond::new("tag", Op::IsNull))
        .set("size", 5i64);
    c.db.commit(Batch::new().update(when_in)).await.unwrap();
    // Updates and deletes of missing rows.
    let ghost = c.ids.uuid();
    let err =
        c.db.commit(Batch::new().update(Update::of::<CsWidget>(ghost).set("size", 1i64)))
            .await
            .unwrap_err();
    assert_eq!(code(err), ErrorClass::NotFound);
    let v =
        c.db.commit(
            Batch::new()
                .update(Update::of::<CsWidget>(ghost).if_exists().set("size", 1i64))
                .delete::<CsWidget>(ghost, Expect::Maybe),
        )
        .await
        .unwrap();
    assert_eq!(v, vec![0, 0]);
    // Insert, update and delete of the same row in one batch.
    let t = c.widget("tmp", 1);
    let v =
        c.db.commit(
            Batch::new()
                .insert(&t)
                .update(Update::of::<CsWidget>(t.uuid).version(1).add("size", 1))
                .delete::<CsWidget>(t.uuid, Expect::Version(2)),
        )
        .await
        .unwrap();
    assert_eq!(v, vec![1, 2, 0]);
    assert!(c.db.get::<CsWidget>(t.uuid).await.unwrap().is_none());
    // A delete frees the unique value for a new row in the same batch.
    let again = c.widget("g", 2);
    c.db.commit(
        Batch::new()
            .delete::<CsWidget>(w.uuid, Expect::Exists)
            .insert(&again),
    )
    .await
    .unwrap();
    assert_eq!(c.names(c.q().eq("size", 2i64)).await, vec!["g".to_string()]);
}

/// Queries and writes that do not fit the schema are refused with the same code everywhere.
pub async fn bad_requests_are_refused(store: &Arc<dyn Store>, ids: &Ids) {
    let c = Case::new(store, ids);
    let bad_queries = [
        Query::new("no_such_kind"),
        c.q().eq("nope", 1i64),
        c.q().eq("size", "big"),
        c.q().like("size", "1%"),
        c.q().eq("doc", "x"),
        c.q().eq("rack.nope", "x"),
        c.q().eq("nope.name", "x"),
        c.q().eq("label", Value::Null),
        c.q().sort_asc("doc"),
        c.q().sort_asc("nope"),
        c.q().cond(Cond::new("size", Op::In(vec![]))),
    ];
    for q in bad_queries {
        let err = c.db.query(&q).await.unwrap_err();
        assert_eq!(
            code(err),
            ErrorClass::InvalidArgument,
            "{q} on {}",
            store.backend()
        );
    }
    let mut r = c.widget("bad", 1).to_record();
    r.values[2] = Value::Text("big".into());
    let err =
        c.db.commit(Batch::new().insert_record(r))
            .await
            .unwrap_err();
    assert!(matches!(
        err,
        StoreError::TypeMismatch {
            expected: FieldType::Int,
            ..
        }
    ));
    let err =
        c.db.commit(Batch::new().update(Update::of::<CsWidget>(c.ids.uuid()).add("label", 1)))
            .await
            .unwrap_err();
    assert_eq!(code(err), ErrorClass::InvalidArgument);
    let err = c
        .db
        .commit(Batch::new().update(Update::of::<CsWidget>(c.ids.uuid()).set("uuid", c.ids.uuid())))
        .await
        .unwrap_err();
    assert_eq!(code(err), ErrorClass::InvalidArgument);
    let mut nan = c.widget("nan", 1);
    nan.weight = f64::NAN;
    let err = c.db.commit(Batch::new().insert(&nan)).await.unwrap_err();
    assert_eq!(code(err), ErrorClass::InvalidArgument);
}

/// 50 tasks race guarded decrements of one counter: it never goes below zero and no decrement
/// is lost.
pub async fn concurrent_decrements_never_overdraw(store: &Arc<dyn Store>, ids: &Ids) {
    for start in [30i64, 100] {
        let c = Case::new(store, ids);
        let mut w = c.widget(&format!("cap{start}"), 1);
        w.counter = start;
        c.insert_all(std::slice::from_ref(&w)).await;
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let db = c.db.clone();
            let uuid = w.uuid;
            tasks.push(tokio::spawn(async move {
                db.commit(
                    Batch::new().update(
                        Update::of::<CsWidget>(uuid)
                            .add("counter", -1)
                            .at_least("counter", 0),
                    ),
                )
                .await
            }));
        }
        let mut ok = 0i64;
        for t in tasks {
            match t.await.expect("task") {
                Ok(_) => ok += 1,
                Err(e) => assert_eq!(
                    code(e),
                    ErrorClass::ConditionFailed,
                    "on {}",
                    store.backend()
                ),
            }
        }
        let got = c.db.must_get::<CsWidget>(w.uuid).await.unwrap();
        assert_eq!(
            ok,
            start.min(50),
            "successful decrements on {}",
            store.backend()
        );
        assert_eq!(
            got.counter,
            start - ok,
            "lost decrement on {}",
            store.backend()
        );
        assert!(got.counter >= 0);
        assert_eq!(got.version as i64, 1 + ok);
    }
}

/// A widget of run `run`: its other fields follow from `size`, lists and options empty.
pub fn widget(uuid: Uuid, run: &str, name: &str, size: i64) -> Row<CsWidget> {
    Row::new(
        uuid,
        CsWidget {
            run: run.to_string(),
            name: name.to_string(),
            size,
            weight: size as f64 / 4.0,
            active: size % 2 == 0,
            label: None,
            tag: None,
            seen: None,
            doc: None,
            list: Json(Vec::new()),
            rack_uuid: None,
            counter: 0,
        },
    )
}

/// Run every case against `store` (which must include [`schema`]).
pub async fn run_all(store: Arc<dyn Store>) {
    let seed = madsim::rand::random::<u64>();
    let ids = Ids(Arc::new(Mutex::new(ChaCha8Rng::seed_from_u64(seed))));
    round_trip_every_field_type(&store, &ids).await;
    every_query_operator(&store, &ids).await;
    related_conditions(&store, &ids).await;
    sort_and_paging_are_stable(&store, &ids).await;
    version_conflicts_are_clear(&store, &ids).await;
    failed_batch_leaves_nothing(&store, &ids).await;
    keyed_batches_apply_once(&store, &ids).await;
    writes_and_guards(&store, &ids).await;
    bad_requests_are_refused(&store, &ids).await;
    concurrent_decrements_never_overdraw(&store, &ids).await;
}
