//! The store: resources (uuid, kind, fields, version, timestamps), queried and changed through
//! one async trait with three backends.
//!
//! - [`MemStore`]: deterministic, in memory; the simulation and fast tests use it.
//! - `SqlStore` (std build only): sqlx on SQLite (the embedded default, WAL) or PostgreSQL (what
//!   a cluster of management nodes shares).
//!
//! The flow journal, jobs, config entries and events are kinds like any other, so they share the
//! same atomic commit. [`conformance`] holds the one suite every backend must pass.

mod batch;
#[cfg(feature = "testing")]
pub mod conformance;
mod mem;
mod meta;
mod query;
#[cfg(not(madsim))]
pub mod sql;
mod value;

pub use batch::{
    resolve_batch, Batch, Bound, Expect, ResolvedUpdate, ResolvedWrite, Update, Write,
    KEY_RETENTION,
};
pub use mem::MemStore;
pub use meta::{
    check_value, FieldMeta, FieldRef, KindMeta, Record, RecordJson, Relation, Resource, Row,
    Schema, BUILTIN_FIELDS,
};
pub use query::{
    hop, like_escape, like_match, op_holds, resolve, resolve_cond, Cond, Hop, Op, Query,
    ResolvedCond, ResolvedQuery, ResolvedSort, Sort,
};
pub use value::{
    decode_field, FieldType, FieldValue, Json, JsonText, Millis, UnknownVariant, Value,
};

/// For [`text_enum!`]'s JSON schemas (the API's OpenAPI document).
pub use schemars;

use async_trait::async_trait;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StoreError {
    #[error("unknown resource kind {0:?}")]
    UnknownKind(String),
    #[error("{kind} has no field {field:?}")]
    UnknownField { kind: String, field: String },
    #[error("{kind}.{field} is {}, got a {found} value", expected.as_str())]
    TypeMismatch {
        kind: String,
        field: String,
        expected: FieldType,
        found: &'static str,
    },
    #[error("invalid query: {0}")]
    InvalidQuery(String),
    #[error("invalid write: {0}")]
    InvalidWrite(String),
    #[error("{kind} {uuid} does not exist")]
    NotFound { kind: String, uuid: Uuid },
    #[error("{kind} {uuid} already exists")]
    AlreadyExists { kind: String, uuid: Uuid },
    #[error("{kind}.{field} = {value} is already used by another {kind}")]
    Duplicate {
        kind: String,
        field: String,
        value: String,
    },
    #[error("{kind} {uuid} was changed concurrently (expected version {expected}, found {found})")]
    Conflict {
        kind: String,
        uuid: Uuid,
        expected: u64,
        found: u64,
    },
    #[error("{kind} {uuid}: {detail}")]
    ConditionFailed {
        kind: String,
        uuid: Uuid,
        detail: String,
    },
    #[error("store backend failed: {0}")]
    Backend(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// What kind of failure a [`StoreError`] is, for callers that branch on it. The management
/// plane maps each class to the stable error code its API answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The query or write itself is wrong (unknown kind or field, type mismatch, bad value).
    InvalidArgument,
    NotFound,
    /// The uuid, or a unique field's value, is taken.
    AlreadyExists,
    /// An expected version did not match: somebody else changed the row first.
    Conflict,
    /// A guard of the batch was false (a bound, an expected value).
    ConditionFailed,
    /// The backend failed (connection, I/O).
    Backend,
    /// Stored data does not decode: a bug or a damaged database.
    Corrupt,
}

impl StoreError {
    pub fn class(&self) -> ErrorClass {
        match self {
            StoreError::UnknownKind(_)
            | StoreError::UnknownField { .. }
            | StoreError::TypeMismatch { .. }
            | StoreError::InvalidQuery(_)
            | StoreError::InvalidWrite(_) => ErrorClass::InvalidArgument,
            StoreError::NotFound { .. } => ErrorClass::NotFound,
            StoreError::AlreadyExists { .. } | StoreError::Duplicate { .. } => {
                ErrorClass::AlreadyExists
            }
            StoreError::Conflict { .. } => ErrorClass::Conflict,
            StoreError::ConditionFailed { .. } => ErrorClass::ConditionFailed,
            StoreError::Backend(_) => ErrorClass::Backend,
            StoreError::Corrupt(_) => ErrorClass::Corrupt,
        }
    }
}

/// What [`Store::get_with`] and [`Store::query_with`] hand each row to. It may run under the
/// store's lock (the in-memory store's), so it must not call the store.
pub type ReadRecord<'a> = dyn for<'r> FnMut(&'r Record) + Send + 'a;

/// The storage interface. All methods are atomic; none holds a lock across an await of the
/// caller.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Short backend name (`mem`, `sqlite`, `postgres`).
    fn backend(&self) -> &'static str;
    fn schema(&self) -> &Schema;
    async fn get(&self, kind: &str, uuid: Uuid) -> Result<Option<Record>, StoreError>;
    /// Rows matching the query, sorted by the query's sort keys then by uuid.
    async fn query(&self, q: &Query) -> Result<Vec<Record>, StoreError>;
    /// Number of rows matching the query's conditions (ignores sort and paging).
    async fn count(&self, q: &Query) -> Result<u64, StoreError>;
    /// Apply every write or none. Returns the new version of each written row (0 for deletes and
    /// no-ops).
    async fn commit(&self, batch: Batch) -> Result<Vec<u64>, StoreError>;
    /// Hand the row, if any, to `read` without copying it (a backend that keeps rows in memory
    /// lends its own; copying every row read showed in profiles of the 30,000-host run).
    /// Returns whether there was a row.
    async fn get_with(
        &self,
        kind: &str,
        uuid: Uuid,
        read: &mut ReadRecord<'_>,
    ) -> Result<bool, StoreError> {
        let r = self.get(kind, uuid).await?;
        if let Some(r) = &r {
            read(r);
        }
        Ok(r.is_some())
    }
    /// Hand the rows of [`Store::query`], in its order, to `read` without copying them.
    async fn query_with(&self, q: &Query, read: &mut ReadRecord<'_>) -> Result<(), StoreError> {
        for r in self.query(q).await? {
            read(&r);
        }
        Ok(())
    }
}

/// A cheap, clonable handle with typed helpers over any [`Store`].
#[derive(Clone)]
pub struct Db {
    inner: Arc<dyn Store>,
    keys: Arc<CommitKeySource>,
    hook: Option<Arc<dyn CommitHook>>,
}

/// How a [`CommitHook`] commits a batch: with the [`Db`]'s key and retries, without the hook.
pub type CommitFn<'a> = &'a (dyn Fn(Batch) -> BoxedCommit<'a> + Send + Sync);

/// What a [`Db`] runs every commit through (an event log that adds its rows to the batch whose
/// change they describe). It commits the batch, with what it adds, through `commit`; a batch
/// it adds nothing to it passes on as it is.
#[async_trait]
pub trait CommitHook: Send + Sync + 'static {
    async fn commit(&self, b: Batch, commit: CommitFn<'_>) -> Result<Vec<u64>, StoreError>;
}

/// The boxed future of a [`CommitFn`].
pub type BoxedCommit<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u64>, StoreError>> + Send + 'a>>;

/// Commit keys unique across handles and processes: a random prefix drawn per handle (seeded
/// under madsim), then a count.
struct CommitKeySource {
    prefix: u64,
    next: AtomicU64,
}

/// Attempts of a commit that fails in the backend (an error, a timeout, an answer lost after it
/// applied): the batch is keyed, so an attempt after one that applied is answered from it.
const COMMIT_ATTEMPTS: u32 = 4;
/// The wait before the second attempt; it doubles before each further one, up to
/// [`COMMIT_BACKOFF_CAP`].
const COMMIT_BACKOFF: Duration = Duration::from_millis(50);
const COMMIT_BACKOFF_CAP: Duration = Duration::from_secs(5);

impl Db {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Db {
            inner: store,
            keys: Arc::new(CommitKeySource {
                prefix: madsim::rand::random::<u64>(),
                next: AtomicU64::new(0),
            }),
            hook: None,
        }
    }

    /// This handle (and its clones) with every commit going through `hook`.
    pub fn with_hook(mut self, hook: Arc<dyn CommitHook>) -> Self {
        self.hook = Some(hook);
        self
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    pub fn schema(&self) -> &Schema {
        self.inner.schema()
    }

    pub async fn get<T: Resource>(&self, uuid: Uuid) -> Result<Option<Row<T>>, StoreError> {
        let mut row = None;
        self.inner
            .get_with(T::META.name, uuid, &mut |r| row = Some(Row::from_record(r)))
            .await?;
        row.transpose()
    }

    /// Like [`Db::get`] but a missing row is a `NotFound` error.
    pub async fn must_get<T: Resource>(&self, uuid: Uuid) -> Result<Row<T>, StoreError> {
        self.get(uuid).await?.ok_or_else(|| StoreError::NotFound {
            kind: T::META.name.to_string(),
            uuid,
        })
    }

    pub async fn select<T: Resource>(&self, q: &Query) -> Result<Vec<Row<T>>, StoreError> {
        debug_assert_eq!(q.kind, T::META.name);
        let mut rows = Vec::new();
        self.inner
            .query_with(q, &mut |r| rows.push(Row::from_record(r)))
            .await?;
        rows.into_iter().collect()
    }

    /// The uuids of the rows matching `q`, in its order, without building typed rows (the
    /// memory store lends its own; the SQL stores still read whole records).
    pub async fn uuids(&self, q: &Query) -> Result<Vec<Uuid>, StoreError> {
        self.project(q, |r| Ok(r.uuid)).await
    }

    /// What `read` takes of each row matching `q`, in its order, without building typed rows:
    /// a reader of a few fields ([`Record::decode`]) does not copy the others. `read` may run
    /// under the in-memory store's lock, so it must not call the store.
    pub async fn project<R: Send>(
        &self,
        q: &Query,
        mut read: impl FnMut(&Record) -> Result<R, StoreError> + Send,
    ) -> Result<Vec<R>, StoreError> {
        let mut out = Vec::new();
        self.inner.query_with(q, &mut |r| out.push(read(r))).await?;
        out.into_iter().collect()
    }

    /// What `read` takes of row `uuid` of `T`, if there is one ([`Db::project`] for one row).
    pub async fn peek<T: Resource, R: Send>(
        &self,
        uuid: Uuid,
        read: impl FnOnce(&Record) -> Result<R, StoreError> + Send,
    ) -> Result<Option<R>, StoreError> {
        let mut read = Some(read);
        let mut out = None;
        self.inner
            .get_with(T::META.name, uuid, &mut |r| {
                out = read.take().map(|f| f(r));
            })
            .await?;
        out.transpose()
    }

    pub async fn count(&self, q: &Query) -> Result<u64, StoreError> {
        self.inner.count(q).await
    }

    pub async fn query(&self, q: &Query) -> Result<Vec<Record>, StoreError> {
        self.inner.query(q).await
    }

    /// Commit `b` (keyed here unless it has a key), retried when the backend fails: a commit
    /// applies once however many attempts it takes, and a backend error reaches the caller only
    /// after [`COMMIT_ATTEMPTS`].
    pub async fn commit(&self, b: Batch) -> Result<Vec<u64>, StoreError> {
        self.commit_retried(b, None).await
    }

    /// [`Db::commit`] for bookkeeping a node must not drop while it lives (its journal, its
    /// jobs' outcomes): retried until it applies or `patience` has passed.
    pub async fn commit_patiently(
        &self,
        b: Batch,
        patience: Duration,
    ) -> Result<Vec<u64>, StoreError> {
        self.commit_retried(b, Some(patience)).await
    }

    async fn commit_retried(
        &self,
        b: Batch,
        patience: Option<Duration>,
    ) -> Result<Vec<u64>, StoreError> {
        if b.is_empty() {
            return Ok(Vec::new());
        }
        match &self.hook {
            None => self.attempts(b, patience).await,
            Some(hook) => {
                let n = b.len();
                let commit = |b| -> BoxedCommit<'_> { Box::pin(self.attempts(b, patience)) };
                let mut versions = hook.commit(b, &commit).await?;
                // The caller's writes come first; what the hook added is its own.
                versions.truncate(n);
                Ok(versions)
            }
        }
    }

    /// Commit `b`, keyed here unless it has a key, attempting again while the backend fails.
    async fn attempts(&self, b: Batch, patience: Option<Duration>) -> Result<Vec<u64>, StoreError> {
        let b = match b.key {
            Some(_) => b,
            None => {
                let n = self.keys.next.fetch_add(1, Ordering::Relaxed);
                b.keyed(Uuid::from_u64_pair(self.keys.prefix, n))
            }
        };
        let started = tokio::time::Instant::now();
        let mut wait = COMMIT_BACKOFF;
        let mut attempt = 1;
        loop {
            let out = self.inner.commit(b.clone()).await;
            let again = match &out {
                Err(e) if e.class() == ErrorClass::Backend => match patience {
                    None => attempt < COMMIT_ATTEMPTS,
                    Some(p) => started.elapsed() + wait <= p,
                },
                _ => false,
            };
            if !again {
                return out;
            }
            if let Err(e) = &out {
                tracing::debug!(error = %e, attempt, "store commit failed; retrying");
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(COMMIT_BACKOFF_CAP);
            attempt += 1;
        }
    }

    /// Delete every row matching `q` (retention: old jobs, events, audit records, tokens),
    /// reading uuids `q.limit` at a time (default 10,000) and deleting `per_commit` to a
    /// commit. Returns how many.
    pub async fn delete_matching(&self, q: &Query, per_commit: usize) -> Result<usize, StoreError> {
        let kind = self.schema().kind(&q.kind)?.name;
        let page = q.limit.unwrap_or(10_000);
        let q = q.clone().limit(page);
        let mut gone = 0;
        loop {
            let old = self.uuids(&q).await?;
            for chunk in old.chunks(per_commit.max(1)) {
                let b = chunk.iter().fold(Batch::new(), |b, &id| {
                    b.delete_kind(kind, id, Expect::Maybe)
                });
                self.commit(b).await?;
            }
            gone += old.len();
            if (old.len() as u64) < page {
                return Ok(gone);
            }
        }
    }

    /// Insert one row; returns it with its stored version.
    pub async fn insert<T: Resource>(&self, mut row: Row<T>) -> Result<Row<T>, StoreError> {
        let v = self.commit(Batch::new().insert(&row)).await?;
        row.version = v[0];
        Ok(row)
    }
}
