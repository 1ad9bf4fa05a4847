//! In-memory store: deterministic, used by the simulation and by fast tests.
//!
//! One mutex guards all tables; it is taken only inside synchronous sections (never across an
//! await), which makes every call atomic. Rows of a kind live in a hash map by uuid, and each
//! indexed or unique field keeps a hash map from value to the set of uuids holding it. Nothing
//! reads a map in its own order: readers that need an order sort what they found (by uuid
//! unless the query sorts), and the hasher is fixed, so seeded runs stay reproducible. (They
//! were `BTreeMap`s: searching their nodes was a large part of the 30,000-host run's profile.)

use super::batch::{check_missing, check_version, resolve_batch, ResolvedUpdate, ResolvedWrite};
use super::meta::{FieldRef, KindMeta, Record, Schema};
use super::query::{op_holds, resolve, Hop, ResolvedCond, ResolvedQuery};
use super::value::{FieldType, Value};
use super::{Batch, Query, ReadRecord, Store, StoreError, KEY_RETENTION};
use async_trait::async_trait;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, MutexGuard};
use stratus_rt::clock::now_ms;
use uuid::Uuid;

/// An index key: a non-null value of one field (so always one type).
#[derive(Debug, Clone)]
#[repr(transparent)]
struct Key(Value);

impl Key {
    /// Look up an index by a value without copying it (a text key would allocate).
    fn of(v: &Value) -> &Key {
        // SAFETY: `Key` is `repr(transparent)` over `Value`, so the two references have the
        // same layout and validity.
        unsafe { &*(v as *const Value as *const Key) }
    }
}

impl PartialEq for Key {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Key {}
/// Consistent with `Eq` (which is `Value::compare`): integers and times that compare equal
/// hash alike, floats by their bits (`total_cmp`), and every JSON value alike (JSON values
/// compare equal to each other; they are never indexed).
impl Hash for Key {
    fn hash<H: Hasher>(&self, h: &mut H) {
        match &self.0 {
            Value::Null => 0u8.hash(h),
            Value::Bool(b) => b.hash(h),
            Value::Int(i) | Value::Time(i) => i.hash(h),
            Value::Float(f) => f.to_bits().hash(h),
            Value::Text(s) => s.as_bytes().hash(h),
            Value::Uuid(u) => u.hash(h),
            Value::Json(_) => 1u8.hash(h),
        }
    }
}
impl PartialOrd for Key {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Key {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0
            .compare(&o.0)
            .unwrap_or_else(|| self.0.type_name().cmp(o.0.type_name()))
    }
}

/// The uuids holding one value. A hash set: the set of a value most rows share (a VM state, a
/// job's operation, the boot of the only node) holds up to every row of the kind, and moving a
/// random uuid in and out of a 100,000-entry `BTreeSet` was most of the cost of a commit in the
/// 30,000-host run. Nothing iterates a set for its order: lookups sort what they copy out, and
/// the other readers only ask whether some member matches. The hasher is fixed (seeded runs stay
/// reproducible).
type UuidSet = HashSet<Uuid, Fixed>;

/// The fixed-seed hasher of every map here.
type Fixed = foldhash::fast::FixedState;

type Index = HashMap<Key, UuidSet, Fixed>;

fn index_add(ix: &mut Index, v: &Value, uuid: Uuid) {
    if v.is_null() {
        return;
    }
    match ix.get_mut(Key::of(v)) {
        Some(set) => {
            set.insert(uuid);
        }
        None => {
            ix.insert(Key(v.clone()), UuidSet::from_iter([uuid]));
        }
    }
}

fn index_del(ix: &mut Index, v: &Value, uuid: Uuid) {
    if v.is_null() {
        return;
    }
    let k = Key::of(v);
    if let Some(set) = ix.get_mut(k) {
        set.remove(&uuid);
        if set.is_empty() {
            ix.remove(k);
        }
    }
}

/// Move `uuid`'s entry in index `ix` (if the field is indexed) from `old` to `new`, when they
/// differ.
fn index_move(ix: &mut Option<Index>, old: &Value, new: &Value, uuid: Uuid) {
    if let Some(ix) = ix {
        if old.compare(new) != Some(Ordering::Equal) {
            index_del(ix, old, uuid);
            index_add(ix, new, uuid);
        }
    }
}

#[derive(Default)]
struct Table {
    rows: HashMap<Uuid, Record, Fixed>,
    /// One entry per declared field; `Some` when the field is indexed.
    idx: Vec<Option<Index>>,
}

impl Table {
    fn new(meta: &super::KindMeta) -> Self {
        Table {
            rows: HashMap::default(),
            idx: meta
                .fields
                .iter()
                .map(|f| (f.indexed && f.ty != FieldType::Json).then(Index::default))
                .collect(),
        }
    }

    fn index_insert(&mut self, r: &Record) {
        for (ix, v) in self.idx.iter_mut().zip(&r.values) {
            if let Some(ix) = ix {
                index_add(ix, v, r.uuid);
            }
        }
    }

    fn index_remove(&mut self, r: &Record) {
        for (ix, v) in self.idx.iter_mut().zip(&r.values) {
            if let Some(ix) = ix {
                index_del(ix, v, r.uuid);
            }
        }
    }

    /// How many rows have field `f` equal to `v`, when an index (or the primary key) can say.
    fn lookup_len(&self, f: FieldRef, v: &Value) -> Option<usize> {
        match f {
            FieldRef::Uuid => Some(
                v.as_uuid()
                    .filter(|u| self.rows.contains_key(u))
                    .map_or(0, |_| 1),
            ),
            FieldRef::Declared(i) => self.idx[i]
                .as_ref()
                .map(|ix| ix.get(Key::of(v)).map_or(0, |s| s.len())),
            _ => None,
        }
    }

    /// Uuids whose field `f` equals `v`, when an index (or the primary key) can answer.
    fn lookup(&self, f: FieldRef, v: &Value) -> Option<Vec<Uuid>> {
        match f {
            FieldRef::Uuid => Some(
                v.as_uuid()
                    .filter(|u| self.rows.contains_key(u))
                    .into_iter()
                    .collect(),
            ),
            FieldRef::Declared(i) => self.idx[i].as_ref().map(|ix| {
                ix.get(Key::of(v))
                    .map(|s| s.iter().copied().collect())
                    .unwrap_or_default()
            }),
            _ => None,
        }
    }
}

struct Tables {
    tables: HashMap<&'static str, Table, Fixed>,
    keys: CommitKeys,
}

/// The keys of applied batches ([`Batch::key`]) with what each commit answered, forgotten past
/// [`KEY_RETENTION`] or beyond [`KEYS_KEPT`] (a retry comes within moments).
#[derive(Default)]
struct CommitKeys {
    answers: HashMap<Uuid, Vec<u64>>,
    order: VecDeque<(i64, Uuid)>,
}

const KEYS_KEPT: usize = 1 << 17;

impl CommitKeys {
    fn answer(&self, key: Uuid) -> Option<Vec<u64>> {
        self.answers.get(&key).cloned()
    }

    fn remember(&mut self, key: Uuid, versions: Vec<u64>, now: i64) {
        let keep_ms = KEY_RETENTION.as_millis() as i64;
        while let Some(&(at, old)) = self.order.front() {
            if now - at <= keep_ms && self.order.len() < KEYS_KEPT {
                break;
            }
            self.order.pop_front();
            self.answers.remove(&old);
        }
        if self.answers.insert(key, versions).is_none() {
            self.order.push_back((now, key));
        }
    }
}

impl Tables {
    fn table(&self, kind: &str) -> &Table {
        &self.tables[kind]
    }

    /// Rows reached from `r` over hop `h`, in no order.
    fn related<'a>(&'a self, h: &Hop, r: &Record) -> Vec<&'a Record> {
        let key = r.value_of(h.local);
        if key.is_null() {
            return Vec::new();
        }
        let t = self.table(h.to.name);
        match t.lookup(h.remote, &key) {
            Some(uuids) => uuids.iter().filter_map(|u| t.rows.get(u)).collect(),
            None => t
                .rows
                .values()
                .filter(|x| x.with_value(h.remote, |v| v.compare(&key) == Some(Ordering::Equal)))
                .collect(),
        }
    }

    fn holds(&self, r: &Record, c: &ResolvedCond, hop: usize) -> bool {
        if hop == c.hops.len() {
            return r.with_value(c.field, |v| op_holds(&c.op, v));
        }
        self.related(&c.hops[hop], r)
            .into_iter()
            .any(|x| self.holds(x, c, hop + 1))
    }

    /// Candidate uuids (sorted) from the most selective indexed equality, if any. Only the
    /// chosen index entry is copied: copying every one first made a query for the volumes of
    /// one host that are `Ready` copy all the `Ready` volumes of the datacenter (a large part of
    /// the 30,000-host run's wall time, docs/perf-log.md).
    fn candidates(&self, q: &ResolvedQuery) -> Option<Vec<Uuid>> {
        let t = self.table(q.kind.name);
        let mut best: Option<(usize, &ResolvedCond)> = None;
        for c in q.conds.iter().filter(|c| c.hops.is_empty()) {
            let size = match &c.op {
                super::Op::Eq(v) => t.lookup_len(c.field, v),
                super::Op::In(vs) => vs
                    .iter()
                    .map(|v| t.lookup_len(c.field, v))
                    .sum::<Option<usize>>(),
                _ => None,
            };
            if let Some(n) = size {
                if best.is_none_or(|(b, _)| n < b) {
                    best = Some((n, c));
                }
            }
        }
        let (_, c) = best?;
        let mut found: Vec<Uuid> = match &c.op {
            super::Op::Eq(v) => t.lookup(c.field, v)?,
            super::Op::In(vs) => {
                let mut all = BTreeSet::new();
                for v in vs {
                    all.extend(t.lookup(c.field, v)?);
                }
                all.into_iter().collect()
            }
            _ => return None,
        };
        found.sort_unstable();
        Some(found)
    }

    fn matching<'a>(&'a self, q: &ResolvedQuery, stop_after: Option<usize>) -> Vec<&'a Record> {
        let t = self.table(q.kind.name);
        let keep = |r: &&Record| q.conds.iter().all(|c| self.holds(r, c, 0));
        let mut out = Vec::new();
        let mut push = |r: &'a Record| {
            out.push(r);
            stop_after.is_some_and(|n| out.len() >= n)
        };
        match self.candidates(q) {
            Some(uuids) => {
                for u in uuids {
                    if let Some(r) = t.rows.get(&u).filter(keep) {
                        if push(r) {
                            break;
                        }
                    }
                }
            }
            None => {
                // The map has no order: find them all, then keep the first by uuid.
                let mut all: Vec<&Record> = t.rows.values().filter(keep).collect();
                all.sort_unstable_by_key(|r| r.uuid);
                for r in all {
                    if push(r) {
                        break;
                    }
                }
            }
        }
        out
    }
}

/// The deterministic in-memory backend.
pub struct MemStore {
    schema: Schema,
    inner: Mutex<Tables>,
}

impl MemStore {
    pub fn new(schema: Schema) -> Self {
        let tables = schema.kinds().map(|k| (k.name, Table::new(k))).collect();
        MemStore {
            schema,
            inner: Mutex::new(Tables {
                tables,
                keys: CommitKeys::default(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of rows of `kind` (cheap; for metrics and invariant checks).
    pub fn len(&self, kind: &str) -> usize {
        self.lock().tables.get(kind).map_or(0, |t| t.rows.len())
    }

    pub fn is_empty(&self) -> bool {
        self.lock().tables.values().all(|t| t.rows.is_empty())
    }

    /// Hand the rows matching `q`, in its order, to `read`.
    fn query_sync(&self, q: &ResolvedQuery, read: &mut ReadRecord<'_>) {
        let t = self.lock();
        let offset = q.offset as usize;
        if q.sort.is_empty() {
            let stop = q.limit.map(|l| offset + l as usize);
            let rows = t.matching(q, stop);
            rows.into_iter().skip(offset).for_each(read);
            return;
        }
        let mut rows = t.matching(q, None);
        rows.sort_by(|a, b| {
            for s in &q.sort {
                let o = a.with_value(s.field, |x| b.with_value(s.field, |y| x.compare(y)));
                let o = o.unwrap_or(Ordering::Equal);
                let o = if s.desc { o.reverse() } else { o };
                if o != Ordering::Equal {
                    return o;
                }
            }
            a.uuid.cmp(&b.uuid)
        });
        let take = q.limit.map_or(usize::MAX, |l| l as usize);
        rows.into_iter().skip(offset).take(take).for_each(read);
    }

    fn commit_sync(
        &self,
        writes: Vec<ResolvedWrite>,
        key: Option<Uuid>,
    ) -> Result<Vec<u64>, StoreError> {
        let now = now_ms();
        let mut t = self.lock();
        let Some(key) = key else {
            return apply(&mut t, writes, now);
        };
        if let Some(versions) = t.keys.answer(key) {
            return Ok(versions);
        }
        let versions = apply(&mut t, writes, now)?;
        t.keys.remember(key, versions.clone(), now);
        Ok(versions)
    }
}

/// Apply every write or none.
fn apply(t: &mut Tables, writes: Vec<ResolvedWrite>, now: i64) -> Result<Vec<u64>, StoreError> {
    if let [ResolvedWrite::Update(u)] = writes.as_slice() {
        return update_one(t, u, now).map(|v| vec![v]);
    }
    // Stage every write on an overlay; the tables change only if all succeed.
    let mut overlay: BTreeMap<(&'static str, Uuid), Option<Record>> = BTreeMap::new();
    let mut versions = Vec::with_capacity(writes.len());
    let current = |t: &Tables,
                   o: &BTreeMap<(&'static str, Uuid), Option<Record>>,
                   k: &'static str,
                   u: Uuid| match o.get(&(k, u)) {
        Some(x) => x.clone(),
        None => t.table(k).rows.get(&u).cloned(),
    };
    for w in writes {
        match w {
            ResolvedWrite::Insert { mut rec, upsert } => {
                let key = (rec.kind.name, rec.uuid);
                let existing = match overlay.get(&key) {
                    Some(x) => x.as_ref().map(|r| (r.version, r.created_ms)),
                    None => t
                        .table(key.0)
                        .rows
                        .get(&key.1)
                        .map(|r| (r.version, r.created_ms)),
                };
                match existing {
                    Some(_) if !upsert => {
                        return Err(StoreError::AlreadyExists {
                            kind: key.0.to_string(),
                            uuid: key.1,
                        })
                    }
                    Some((version, created)) => {
                        rec.version = version + 1;
                        rec.created_ms = created;
                    }
                    None => {
                        rec.version = 1;
                        rec.created_ms = now;
                    }
                }
                rec.updated_ms = now;
                versions.push(rec.version);
                overlay.insert(key, Some(rec));
            }
            ResolvedWrite::Update(u) => {
                let Some(cur) = current(t, &overlay, u.kind.name, u.uuid) else {
                    check_missing(u.kind, u.uuid, u.expect)?;
                    versions.push(0);
                    continue;
                };
                check_version(&cur, u.expect)?;
                let mut rec = cur;
                u.apply(&mut rec)?;
                rec.version += 1;
                rec.updated_ms = now;
                versions.push(rec.version);
                overlay.insert((u.kind.name, u.uuid), Some(rec));
            }
            ResolvedWrite::Delete { kind, uuid, expect } => {
                match current(t, &overlay, kind.name, uuid) {
                    Some(cur) => {
                        check_version(&cur, expect)?;
                        overlay.insert((kind.name, uuid), None);
                    }
                    None => check_missing(kind, uuid, expect)?,
                }
                versions.push(0);
            }
        }
    }
    check_unique(t, &overlay)?;
    for ((kind, uuid), new) in overlay {
        let table = t.tables.get_mut(kind).expect("kind resolved");
        let Table { rows, idx } = table;
        match (rows.get_mut(&uuid), new) {
            (Some(row), Some(new)) => {
                for (i, ix) in idx.iter_mut().enumerate() {
                    index_move(ix, &row.values[i], &new.values[i], uuid);
                }
                *row = new;
            }
            (Some(_), None) => {
                let old = rows.remove(&uuid).expect("present");
                table.index_remove(&old);
            }
            (None, Some(new)) => {
                table.index_insert(&new);
                table.rows.insert(uuid, new);
            }
            (None, None) => {}
        }
    }
    Ok(versions)
}

/// A batch of one update (most of them: journal steps, state changes, counters), changed in
/// place: only the fields it changes are copied, where the general path stages a copy of the
/// whole row.
fn update_one(t: &mut Tables, u: &ResolvedUpdate, now: i64) -> Result<u64, StoreError> {
    let table = t.tables.get_mut(u.kind.name).expect("kind resolved");
    let Some(row) = table.rows.get_mut(&u.uuid) else {
        check_missing(u.kind, u.uuid, u.expect)?;
        return Ok(0);
    };
    check_version(row, u.expect)?;
    let changes = u.changes(row)?;
    for (i, v) in &changes {
        if u.kind.fields[*i].unique && held_elsewhere(&table.idx[*i], v, u.uuid, |_| false) {
            return Err(duplicate(u.kind, *i, v));
        }
    }
    for (i, v) in changes {
        index_move(&mut table.idx[i], &row.values[i], &v, u.uuid);
        row.values[i] = v;
    }
    row.version += 1;
    row.updated_ms = now;
    Ok(row.version)
}

fn check_unique(
    t: &Tables,
    overlay: &BTreeMap<(&'static str, Uuid), Option<Record>>,
) -> Result<(), StoreError> {
    let mut seen: BTreeMap<(&'static str, usize, Key), Uuid> = BTreeMap::new();
    for ((kind, uuid), rec) in overlay {
        let Some(rec) = rec else { continue };
        let table = t.table(kind);
        for (i, m) in rec.kind.fields.iter().enumerate() {
            let v = &rec.values[i];
            if !m.unique || v.is_null() {
                continue;
            }
            if let Some(prev) = seen.insert((kind, i, Key(v.clone())), *uuid) {
                if prev != *uuid {
                    return Err(duplicate(rec.kind, i, v));
                }
            }
            // A holder that this batch rewrites is checked by its own overlay entry.
            let rewritten = |u: &Uuid| overlay.contains_key(&(*kind, *u));
            if held_elsewhere(&table.idx[i], v, *uuid, rewritten) {
                return Err(duplicate(rec.kind, i, v));
            }
        }
    }
    Ok(())
}

/// Whether a row other than `uuid` (and not `skip`ped) holds `v` in index `ix`.
fn held_elsewhere(ix: &Option<Index>, v: &Value, uuid: Uuid, skip: impl Fn(&Uuid) -> bool) -> bool {
    if v.is_null() {
        return false;
    }
    ix.as_ref()
        .and_then(|ix| ix.get(Key::of(v)))
        .is_some_and(|h| h.iter().any(|u| *u != uuid && !skip(u)))
}

fn duplicate(kind: &KindMeta, field: usize, v: &Value) -> StoreError {
    StoreError::Duplicate {
        kind: kind.name.to_string(),
        field: kind.fields[field].name.to_string(),
        value: v.to_string(),
    }
}

#[async_trait]
impl Store for MemStore {
    fn backend(&self) -> &'static str {
        "mem"
    }

    fn schema(&self) -> &Schema {
        &self.schema
    }

    async fn get(&self, kind: &str, uuid: Uuid) -> Result<Option<Record>, StoreError> {
        let mut row = None;
        self.get_with(kind, uuid, &mut |r| row = Some(r.clone()))
            .await?;
        Ok(row)
    }

    async fn query(&self, q: &Query) -> Result<Vec<Record>, StoreError> {
        let mut rows = Vec::new();
        self.query_with(q, &mut |r| rows.push(r.clone())).await?;
        Ok(rows)
    }

    async fn get_with(
        &self,
        kind: &str,
        uuid: Uuid,
        read: &mut ReadRecord<'_>,
    ) -> Result<bool, StoreError> {
        let meta = self.schema.kind(kind)?;
        let t = self.lock();
        let row = t.table(meta.name).rows.get(&uuid);
        if let Some(r) = row {
            read(r);
        }
        Ok(row.is_some())
    }

    async fn query_with(&self, q: &Query, read: &mut ReadRecord<'_>) -> Result<(), StoreError> {
        let rq = resolve(&self.schema, q)?;
        self.query_sync(&rq, read);
        Ok(())
    }

    async fn count(&self, q: &Query) -> Result<u64, StoreError> {
        let mut rq = resolve(&self.schema, q)?;
        rq.sort.clear();
        rq.limit = None;
        rq.offset = 0;
        if rq.conds.is_empty() {
            return Ok(self.lock().table(rq.kind.name).rows.len() as u64);
        }
        if let [c] = rq.conds.as_slice() {
            if let (true, super::Op::Eq(v)) = (c.hops.is_empty(), &c.op) {
                if let Some(n) = self.lock().table(rq.kind.name).lookup_len(c.field, v) {
                    return Ok(n as u64);
                }
            }
        }
        Ok(self.lock().matching(&rq, None).len() as u64)
    }

    async fn commit(&self, batch: Batch) -> Result<Vec<u64>, StoreError> {
        let key = batch.key;
        let writes = resolve_batch(&self.schema, batch)?;
        self.commit_sync(writes, key)
    }
}
