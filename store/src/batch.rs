//! Atomic batches of writes with optimistic version checks and guarded updates.
//!
//! A batch is applied all or nothing. Each write can demand a version (`Expect::Version`), and an
//! update can carry pre-conditions (`when`) and bounds on the new value of its fields, which is
//! how shared counters (host capacity, IP pools) change without locks: "add -4 to `cpu_free` if
//! the result stays >= 0" either applies or fails the whole batch with `ConditionFailed`.

use super::meta::{FieldRef, KindMeta, Record, Schema};
use super::query::{resolve_cond, Cond, ResolvedCond};
use super::value::{FieldType, Value};
use super::{Resource, Row, StoreError};
use uuid::Uuid;

/// What a write expects of the row it touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The row must exist (any version).
    Exists,
    /// The row must exist with exactly this version.
    Version(u64),
    /// Fine if the row is missing (the write is then a no-op): idempotent clean-ups.
    Maybe,
}

/// The new value of an integer field must lie within `[at_least, at_most]`, where the upper
/// bound may also be the (new) value of another field of the same row (`used <= total`). A
/// bound never clamps: a batch that would break one fails whole (`ConditionFailed`).
#[derive(Debug, Clone, PartialEq)]
pub struct Bound {
    pub field: &'static str,
    pub at_least: Option<i64>,
    pub at_most: Option<i64>,
    pub at_most_field: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub kind: &'static str,
    pub uuid: Uuid,
    pub expect: Expect,
    pub set: Vec<(&'static str, Value)>,
    pub add: Vec<(&'static str, i64)>,
    /// Conditions on the row's current fields (own fields only).
    pub when: Vec<Cond>,
    pub bounds: Vec<Bound>,
}

impl Update {
    pub fn new(kind: &'static str, uuid: Uuid) -> Self {
        Update {
            kind,
            uuid,
            expect: Expect::Exists,
            set: Vec::new(),
            add: Vec::new(),
            when: Vec::new(),
            bounds: Vec::new(),
        }
    }
    pub fn of<T: Resource>(uuid: Uuid) -> Self {
        Update::new(T::META.name, uuid)
    }
    /// The row must have version `v` (else `Conflict`).
    pub fn version(mut self, v: u64) -> Self {
        self.expect = Expect::Version(v);
        self
    }
    /// A missing row is fine: the update is then a no-op ([`Expect::Maybe`]).
    pub fn if_exists(mut self) -> Self {
        self.expect = Expect::Maybe;
        self
    }
    pub fn set(mut self, field: &'static str, v: impl Into<Value>) -> Self {
        self.set.push((field, v.into()));
        self
    }
    pub fn add(mut self, field: &'static str, delta: i64) -> Self {
        self.add.push((field, delta));
        self
    }
    pub fn when(mut self, c: Cond) -> Self {
        self.when.push(c);
        self
    }
    /// Shorthand for `when(field = v)`.
    pub fn when_eq(self, field: &str, v: impl Into<Value>) -> Self {
        self.when(Cond::new(field, super::Op::Eq(v.into())))
    }
    /// The batch fails unless the new value of `field` is at least `min`.
    pub fn at_least(mut self, field: &'static str, min: i64) -> Self {
        self.bounds.push(Bound {
            field,
            at_least: Some(min),
            at_most: None,
            at_most_field: None,
        });
        self
    }
    /// The batch fails unless the new value of `field` is at most `max`.
    pub fn at_most(mut self, field: &'static str, max: i64) -> Self {
        self.bounds.push(Bound {
            field,
            at_least: None,
            at_most: Some(max),
            at_most_field: None,
        });
        self
    }
    /// The batch fails unless the new value of `field` is at most the new value of `other`
    /// (an integer field of the same row).
    pub fn at_most_field(mut self, field: &'static str, other: &'static str) -> Self {
        self.bounds.push(Bound {
            field,
            at_least: None,
            at_most: None,
            at_most_field: Some(other),
        });
        self
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Insert a new row; fails with `AlreadyExists` if the uuid is taken.
    Insert(Record),
    /// Insert, or replace every field of an existing row.
    Upsert(Record),
    Update(Update),
    Delete {
        kind: &'static str,
        uuid: Uuid,
        expect: Expect,
    },
}

/// An ordered list of writes applied atomically.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    pub writes: Vec<Write>,
    /// The commit's idempotency key: a batch committed again with the key of one that applied
    /// is not applied again while the store remembers the key ([`KEY_RETENTION`]); the commit
    /// answers what the first one did. A caller retries a commit whose answer was lost with it
    /// ([`crate::Db::commit`] keys every batch).
    pub key: Option<Uuid>,
}

/// How long a store remembers a commit key: far longer than a caller retries a commit.
pub const KEY_RETENTION: std::time::Duration = std::time::Duration::from_secs(600);

impl Batch {
    pub fn new() -> Self {
        Batch::default()
    }
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
    /// The batch with idempotency key `key` ([`Batch::key`]).
    pub fn keyed(mut self, key: Uuid) -> Self {
        self.key = Some(key);
        self
    }
    pub fn len(&self) -> usize {
        self.writes.len()
    }
    pub fn push(&mut self, w: Write) -> &mut Self {
        self.writes.push(w);
        self
    }
    pub fn insert<T: Resource>(mut self, row: &Row<T>) -> Self {
        self.writes.push(Write::Insert(row.to_record()));
        self
    }
    pub fn insert_record(mut self, r: Record) -> Self {
        self.writes.push(Write::Insert(r));
        self
    }
    pub fn upsert<T: Resource>(mut self, row: &Row<T>) -> Self {
        self.writes.push(Write::Upsert(row.to_record()));
        self
    }
    pub fn upsert_record(mut self, r: Record) -> Self {
        self.writes.push(Write::Upsert(r));
        self
    }
    pub fn update(mut self, u: Update) -> Self {
        self.writes.push(Write::Update(u));
        self
    }
    /// Replace all fields of `row`, demanding that its version is still `row.version`.
    pub fn replace<T: Resource>(mut self, row: &Row<T>) -> Self {
        let mut u = Update::of::<T>(row.uuid).version(row.version);
        for (m, v) in T::META.fields.iter().zip(row.data.to_values()) {
            u.set.push((m.name, v));
        }
        self.writes.push(Write::Update(u));
        self
    }
    pub fn delete<T: Resource>(self, uuid: Uuid, expect: Expect) -> Self {
        self.delete_kind(T::META.name, uuid, expect)
    }
    pub fn delete_kind(mut self, kind: &'static str, uuid: Uuid, expect: Expect) -> Self {
        self.writes.push(Write::Delete { kind, uuid, expect });
        self
    }
    pub fn extend(mut self, other: Batch) -> Self {
        self.writes.extend(other.writes);
        self
    }
}

/// A write checked against the schema.
#[derive(Debug, Clone)]
pub enum ResolvedWrite {
    Insert {
        rec: Record,
        upsert: bool,
    },
    Update(ResolvedUpdate),
    Delete {
        kind: &'static KindMeta,
        uuid: Uuid,
        expect: Expect,
    },
}

#[derive(Debug, Clone)]
pub struct ResolvedUpdate {
    pub kind: &'static KindMeta,
    pub uuid: Uuid,
    pub expect: Expect,
    pub set: Vec<(usize, Value)>,
    pub add: Vec<(usize, i64)>,
    pub when: Vec<ResolvedCond>,
    pub bounds: Vec<ResolvedBound>,
}

/// A bound on the new value of field `field` (indexes into the kind's fields).
#[derive(Debug, Clone, Copy)]
pub struct ResolvedBound {
    pub field: usize,
    pub at_least: Option<i64>,
    pub at_most: Option<i64>,
    /// A field whose new value is also an upper bound.
    pub at_most_field: Option<usize>,
}

impl ResolvedUpdate {
    /// Apply to a current record (already known to exist and match) in place, or say why the
    /// guard failed; on an error the record is unchanged.
    pub fn apply(&self, rec: &mut Record) -> Result<(), StoreError> {
        for (i, v) in self.changes(rec)? {
            rec.values[i] = v;
        }
        Ok(())
    }

    /// The new values of the fields this update changes (each field once, in the order first
    /// touched), checked against its conditions and bounds; `rec` is only read.
    pub fn changes(&self, rec: &Record) -> Result<Vec<(usize, Value)>, StoreError> {
        for c in &self.when {
            if !rec.with_value(c.field, |v| super::query::op_holds(&c.op, v)) {
                return Err(StoreError::ConditionFailed {
                    kind: self.kind.name.to_string(),
                    uuid: self.uuid,
                    detail: format!("condition {} {} does not hold", c.field_name, c.op.name()),
                });
            }
        }
        let mut out: Vec<(usize, Value)> = Vec::with_capacity(self.set.len() + self.add.len());
        fn current<'a>(out: &'a [(usize, Value)], rec: &'a Record, i: usize) -> &'a Value {
            out.iter()
                .find(|(j, _)| *j == i)
                .map_or(&rec.values[i], |(_, v)| v)
        }
        fn put(out: &mut Vec<(usize, Value)>, i: usize, v: Value) {
            match out.iter_mut().find(|(j, _)| *j == i) {
                Some(slot) => slot.1 = v,
                None => out.push((i, v)),
            }
        }
        for (i, v) in &self.set {
            put(&mut out, *i, v.clone());
        }
        for (i, d) in &self.add {
            let name = self.kind.fields[*i].name;
            let cur = current(&out, rec, *i);
            let old = cur.as_int().ok_or_else(|| StoreError::ConditionFailed {
                kind: self.kind.name.to_string(),
                uuid: self.uuid,
                detail: format!("{name} is null and cannot be incremented"),
            })?;
            let new = old
                .checked_add(*d)
                .ok_or_else(|| StoreError::InvalidWrite(format!("{name} would overflow")))?;
            let new = match cur {
                Value::Time(_) => Value::Time(new),
                _ => Value::Int(new),
            };
            put(&mut out, *i, new);
        }
        for ResolvedBound {
            field: i,
            at_least: min,
            at_most,
            at_most_field,
        } in &self.bounds
        {
            let name = self.kind.fields[*i].name;
            let v = current(&out, rec, *i).as_int();
            let other = at_most_field.and_then(|j| current(&out, rec, j).as_int());
            let max = match (at_most, other) {
                (Some(a), Some(b)) => Some((*a).min(b)),
                (a, b) => a.or(b),
            };
            let ok = v.is_some_and(|v| min.is_none_or(|m| v >= m) && max.is_none_or(|m| v <= m));
            if !ok {
                return Err(StoreError::ConditionFailed {
                    kind: self.kind.name.to_string(),
                    uuid: self.uuid,
                    detail: format!(
                        "{name} would become {} (allowed {}..={})",
                        v.map(|v| v.to_string()).unwrap_or_else(|| "null".into()),
                        min.map(|m| m.to_string()).unwrap_or_default(),
                        max.map(|m| m.to_string()).unwrap_or_default()
                    ),
                });
            }
        }
        Ok(out)
    }
}

/// `Expect::Version` against the current row (the other expectations are about existence);
/// every backend checks it the same way.
pub(super) fn check_version(cur: &Record, e: Expect) -> Result<(), StoreError> {
    match e {
        Expect::Version(v) if cur.version != v => Err(StoreError::Conflict {
            kind: cur.kind.name.to_string(),
            uuid: cur.uuid,
            expected: v,
            found: cur.version,
        }),
        _ => Ok(()),
    }
}

/// An update or delete found no row: fine only under `Expect::Maybe`; every backend says so the
/// same way.
pub(super) fn check_missing(kind: &KindMeta, uuid: Uuid, e: Expect) -> Result<(), StoreError> {
    match e {
        Expect::Maybe => Ok(()),
        _ => Err(StoreError::NotFound {
            kind: kind.name.to_string(),
            uuid,
        }),
    }
}

fn declared(kind: &'static KindMeta, field: &str, what: &str) -> Result<usize, StoreError> {
    kind.field_index(field).ok_or_else(|| {
        if kind.resolve_field(field).is_some() {
            StoreError::InvalidWrite(format!(
                "{}.{field} is built in and cannot be {what}",
                kind.name
            ))
        } else {
            StoreError::UnknownField {
                kind: kind.name.to_string(),
                field: field.to_string(),
            }
        }
    })
}

/// Check a batch against the schema.
pub fn resolve_batch(schema: &Schema, batch: Batch) -> Result<Vec<ResolvedWrite>, StoreError> {
    batch
        .writes
        .into_iter()
        .map(|w| {
            Ok(match w {
                Write::Insert(r) => {
                    let kind = schema.kind(r.kind.name)?;
                    r.check()?;
                    ResolvedWrite::Insert {
                        rec: Record { kind, ..r },
                        upsert: false,
                    }
                }
                Write::Upsert(r) => {
                    let kind = schema.kind(r.kind.name)?;
                    r.check()?;
                    ResolvedWrite::Insert {
                        rec: Record { kind, ..r },
                        upsert: true,
                    }
                }
                Write::Delete { kind, uuid, expect } => ResolvedWrite::Delete {
                    kind: schema.kind(kind)?,
                    uuid,
                    expect,
                },
                Write::Update(u) => {
                    let kind = schema.kind(u.kind)?;
                    let mut set = Vec::new();
                    for (f, v) in u.set {
                        let i = declared(kind, f, "set")?;
                        super::meta::check_value(kind, &kind.fields[i], &v)?;
                        set.push((i, v));
                    }
                    let mut add = Vec::new();
                    for (f, d) in &u.add {
                        let i = declared(kind, f, "incremented")?;
                        if !matches!(kind.fields[i].ty, FieldType::Int | FieldType::Time) {
                            return Err(StoreError::InvalidWrite(format!(
                                "{}.{f} is {} and cannot be incremented",
                                kind.name,
                                kind.fields[i].ty.as_str()
                            )));
                        }
                        if set.iter().any(|(j, _)| *j == i) {
                            return Err(StoreError::InvalidWrite(format!(
                                "{}.{f} is both set and incremented",
                                kind.name
                            )));
                        }
                        add.push((i, *d));
                    }
                    let mut bounds = Vec::new();
                    for b in u.bounds {
                        let i = declared(kind, b.field, "bounded")?;
                        if !matches!(kind.fields[i].ty, FieldType::Int | FieldType::Time) {
                            return Err(StoreError::InvalidWrite(format!(
                                "{}.{} is not an integer and cannot be bounded",
                                kind.name, b.field
                            )));
                        }
                        let other = match b.at_most_field {
                            Some(f) => {
                                let j = declared(kind, f, "a bound")?;
                                if !matches!(kind.fields[j].ty, FieldType::Int | FieldType::Time) {
                                    return Err(StoreError::InvalidWrite(format!(
                                        "{}.{f} is not an integer and cannot bound {}",
                                        kind.name, b.field
                                    )));
                                }
                                Some(j)
                            }
                            None => None,
                        };
                        bounds.push(ResolvedBound {
                            field: i,
                            at_least: b.at_least,
                            at_most: b.at_most,
                            at_most_field: other,
                        });
                    }
                    let when = u
                        .when
                        .iter()
                        .map(|c| {
                            let rc = resolve_cond(schema, kind, c)?;
                            if !rc.hops.is_empty() {
                                return Err(StoreError::InvalidWrite(format!(
                                    "update condition {} must name an own field of {}",
                                    c.path, kind.name
                                )));
                            }
                            Ok(rc)
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    ResolvedWrite::Update(ResolvedUpdate {
                        kind,
                        uuid: u.uuid,
                        expect: u.expect,
                        set,
                        add,
                        when,
                        bounds,
                    })
                }
            })
        })
        .collect()
}

impl FieldRef {
    pub fn declared_index(self) -> Option<usize> {
        match self {
            FieldRef::Declared(i) => Some(i),
            _ => None,
        }
    }
}
