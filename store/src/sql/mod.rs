//! SQL backends on sqlx: SQLite (the embedded default, WAL) and PostgreSQL (shared by a cluster).
//!
//! Each kind gets its own table (`r_<kind>`) with one typed column per declared field, created —
//! and extended with new columns — from the kind's metadata when the store opens; indexed and
//! unique fields get indexes the same way. The fixed part of the schema (the `stratus_kinds`
//! catalogue) comes from `sqlx::migrate!` (see `core/migrations/`).
//!
//! Guarded updates read the row (`FOR UPDATE` on PostgreSQL; SQLite has one writer) and apply
//! [`ResolvedUpdate::apply`], the code the in-memory store runs, so the backends cannot drift
//! apart on what a guard means. The conformance suite checks the rest.

mod gen;

use super::batch::{check_missing, check_version, resolve_batch, ResolvedWrite};
use super::meta::{KindMeta, Record, Schema};
use super::query::resolve;
use super::value::{FieldType, JsonText, Value};
use super::{Batch, Query, Store, StoreError, KEY_RETENTION};
use async_trait::async_trait;
use gen::{Dialect, Param, Sql};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, PgConnection, Row as _, SqliteConnection};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use stratus_rt::clock::now_ms;
use uuid::Uuid;

/// Rows per multi-row INSERT statement.
const INSERT_CHUNK: usize = 100;

const UNATTRIBUTED: &str = "unique violation could not be attributed";

/// What one write transaction does.
enum TxWork<'a> {
    /// Create or extend tables and indexes.
    Setup(&'a [(String, String, &'static str, &'static str)]),
    Apply {
        writes: Vec<ResolvedWrite>,
        now: i64,
        multi_row: bool,
        /// The batch's idempotency key ([`Batch::key`]).
        key: Option<Uuid>,
    },
}

/// Errors inside a transaction: our own, or the driver's (mapped once at the end).
enum TxError {
    Store(StoreError),
    Sql(sqlx::Error),
    /// A multi-row insert hit a unique violation: replay row by row to attribute it.
    RetrySingle,
}

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> Self {
        TxError::Store(e)
    }
}

impl From<sqlx::Error> for TxError {
    fn from(e: sqlx::Error) -> Self {
        TxError::Sql(e)
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Decode a row selected with [`gen::select_columns`].
fn decode<'r, R>(row: &'r R, kind: &'static KindMeta) -> Result<Record, TxError>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    f64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let uuid: String = row.try_get(0)?;
    let corrupt =
        |what: String| TxError::Store(StoreError::Corrupt(format!("{} {uuid}: {what}", kind.name)));
    let parsed = Uuid::parse_str(&uuid).map_err(|e| corrupt(e.to_string()))?;
    let mut values = Vec::with_capacity(kind.fields.len());
    for (i, f) in kind.fields.iter().enumerate() {
        let c = 4 + i;
        let v = match f.ty {
            FieldType::Bool => row.try_get::<Option<bool>, _>(c)?.map(Value::Bool),
            FieldType::Int => row.try_get::<Option<i64>, _>(c)?.map(Value::Int),
            FieldType::Time => row.try_get::<Option<i64>, _>(c)?.map(Value::Time),
            FieldType::Float => row.try_get::<Option<f64>, _>(c)?.map(Value::Float),
            FieldType::Text => row.try_get::<Option<String>, _>(c)?.map(Value::Text),
            FieldType::Uuid => match row.try_get::<Option<String>, _>(c)? {
                Some(s) => Some(Value::Uuid(
                    Uuid::parse_str(&s).map_err(|e| corrupt(format!("{}: {e}", f.name)))?,
                )),
                None => None,
            },
            FieldType::Json => match row.try_get::<Option<String>, _>(c)? {
                Some(s) => Some(Value::Json(
                    JsonText::parse(s).map_err(|e| corrupt(format!("{}: {e}", f.name)))?,
                )),
                None => None,
            },
        };
        let v = v.unwrap_or(Value::Null);
        if v.is_null() && !f.nullable {
            return Err(corrupt(format!("{} is null", f.name)));
        }
        values.push(v);
    }
    Ok(Record {
        kind,
        uuid: parsed,
        version: row.try_get::<i64, _>(1)? as u64,
        created_ms: row.try_get(2)?,
        updated_ms: row.try_get(3)?,
        values,
    })
}

macro_rules! bind_params {
    ($q:expr, $params:expr) => {{
        let mut q = $q;
        for p in $params {
            q = match p {
                Param::Int(i) => q.bind(*i),
                Param::Float(f) => q.bind(*f),
                Param::Text(s) => q.bind(s.as_str()),
                Param::Bool(b) => q.bind(*b),
                Param::Null(FieldType::Bool) => q.bind(None::<bool>),
                Param::Null(FieldType::Int | FieldType::Time) => q.bind(None::<i64>),
                Param::Null(FieldType::Float) => q.bind(None::<f64>),
                Param::Null(FieldType::Text | FieldType::Uuid | FieldType::Json) => {
                    q.bind(None::<String>)
                }
            };
        }
        q
    }};
}

/// A connection inside a transaction, of either backend.
enum Tx<'a> {
    Sqlite(&'a mut SqliteConnection),
    Postgres(&'a mut PgConnection),
}

impl Tx<'_> {
    fn dialect(&self) -> Dialect {
        match self {
            Tx::Sqlite(_) => Dialect::Sqlite,
            Tx::Postgres(_) => Dialect::Postgres,
        }
    }

    async fn fetch_record(
        &mut self,
        sql: &Sql,
        kind: &'static KindMeta,
    ) -> Result<Option<Record>, TxError> {
        match self {
            Tx::Sqlite(c) => match bind_params!(sqlx::query(&sql.text), &sql.params)
                .fetch_optional(&mut **c)
                .await?
            {
                Some(r) => Ok(Some(decode(&r, kind)?)),
                None => Ok(None),
            },
            Tx::Postgres(c) => match bind_params!(sqlx::query(&sql.text), &sql.params)
                .fetch_optional(&mut **c)
                .await?
            {
                Some(r) => Ok(Some(decode(&r, kind)?)),
                None => Ok(None),
            },
        }
    }

    async fn fetch_i64(&mut self, sql: &Sql) -> Result<Option<i64>, sqlx::Error> {
        match self {
            Tx::Sqlite(c) => bind_params!(sqlx::query(&sql.text), &sql.params)
                .fetch_optional(&mut **c)
                .await?
                .map(|r| r.try_get(0))
                .transpose(),
            Tx::Postgres(c) => bind_params!(sqlx::query(&sql.text), &sql.params)
                .fetch_optional(&mut **c)
                .await?
                .map(|r| r.try_get(0))
                .transpose(),
        }
    }

    async fn fetch_strings(&mut self, sql: &Sql) -> Result<Vec<String>, sqlx::Error> {
        match self {
            Tx::Sqlite(c) => bind_params!(sqlx::query(&sql.text), &sql.params)
                .fetch_all(&mut **c)
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect(),
            Tx::Postgres(c) => bind_params!(sqlx::query(&sql.text), &sql.params)
                .fetch_all(&mut **c)
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect(),
        }
    }

    async fn execute(&mut self, sql: &Sql) -> Result<u64, sqlx::Error> {
        Ok(match self {
            Tx::Sqlite(c) => bind_params!(sqlx::query(&sql.text), &sql.params)
                .execute(&mut **c)
                .await?
                .rows_affected(),
            Tx::Postgres(c) => bind_params!(sqlx::query(&sql.text), &sql.params)
                .execute(&mut **c)
                .await?
                .rows_affected(),
        })
    }

    async fn ddl(&mut self, text: String) -> Result<(), TxError> {
        let sql = Sql {
            dialect: self.dialect(),
            text,
            params: Vec::new(),
        };
        self.execute(&sql)
            .await
            .map_err(|e| TxError::Store(StoreError::Backend(format!("{}: {e}", sql.text))))?;
        Ok(())
    }
}

/// What the commit of the batch keyed `key` answered, if it applied and is remembered.
async fn commit_answer(tx: &mut Tx<'_>, key: Uuid) -> Result<Option<Vec<u64>>, TxError> {
    let mut sql = Sql::new(tx.dialect());
    sql.push("SELECT versions FROM stratus_commit_keys WHERE key = ")
        .param(Param::Text(key.to_string()));
    match tx.fetch_strings(&sql).await?.first() {
        Some(text) => serde_json::from_str(text)
            .map(Some)
            .map_err(|e| TxError::Store(StoreError::Corrupt(format!("commit key {key}: {e}")))),
        None => Ok(None),
    }
}

/// Remember the batch keyed `key` and its answer, in the commit's transaction; with `prune`,
/// forget
/// the keys past [`KEY_RETENTION`] first.
async fn remember_commit(
    tx: &mut Tx<'_>,
    key: Uuid,
    versions: &[u64],
    now: i64,
    prune: bool,
) -> Result<(), TxError> {
    let d = tx.dialect();
    if prune {
        let mut sql = Sql::new(d);
        sql.push("DELETE FROM stratus_commit_keys WHERE at_ms < ")
            .param(Param::Int(now - KEY_RETENTION.as_millis() as i64));
        tx.execute(&sql).await?;
    }
    let answer = serde_json::to_string(versions)
        .map_err(|e| TxError::Store(StoreError::Backend(format!("commit key {key}: {e}"))))?;
    let mut sql = Sql::new(d);
    sql.push("INSERT INTO stratus_commit_keys (key, versions, at_ms) VALUES (")
        .param(Param::Text(key.to_string()))
        .push(", ")
        .param(Param::Text(answer))
        .push(", ")
        .param(Param::Int(now))
        .push(")");
    tx.execute(&sql).await?;
    Ok(())
}

/// Commit if `out` is Ok, roll back otherwise.
async fn finish<DB: sqlx::Database, T>(
    tx: sqlx::Transaction<'_, DB>,
    out: Result<T, TxError>,
) -> Result<T, TxError> {
    match out {
        Ok(v) => {
            tx.commit().await?;
            Ok(v)
        }
        Err(e) => {
            // Best effort: dropping the transaction rolls back too.
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

/// SQLite has one writer at a time: the store keeps one dedicated write connection (taken
/// through an async mutex, the equivalent of a pool of one without its per-use overhead) and a
/// pool of read-only connections that WAL lets run beside it.
struct SqliteWriter {
    opts: SqliteConnectOptions,
    conn: tokio::sync::Mutex<Option<SqliteConnection>>,
}

enum Pools {
    Sqlite {
        write: Box<SqliteWriter>,
        read: SqlitePool,
    },
    Postgres(PgPool),
}

/// The sqlx-backed store.
pub struct SqlStore {
    schema: Schema,
    pools: Pools,
    /// Unique index name → (kind, field), to turn constraint errors into `Duplicate`.
    unique_indexes: HashMap<String, (&'static str, &'static str)>,
    /// Keyed commits so far, to prune the remembered keys every [`PRUNE_KEYS_EVERY`].
    keyed_commits: AtomicU64,
}

/// Remembered commit keys are pruned once per this many keyed commits.
const PRUNE_KEYS_EVERY: u64 = 256;

impl SqlStore {
    /// Open by URL: `sqlite://PATH` (created if missing) or `postgres://...`.
    pub async fn open(url: &str, schema: Schema) -> Result<SqlStore, StoreError> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            SqlStore::open_sqlite(Path::new(path), schema).await
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            SqlStore::open_postgres(url, schema).await
        } else {
            Err(StoreError::Backend(format!(
                "unsupported database URL {url:?}; use sqlite://PATH or postgres://..."
            )))
        }
    }

    /// SQLite in WAL mode: one writer connection, several readers.
    pub async fn open_sqlite(path: &Path, schema: Schema) -> Result<SqlStore, StoreError> {
        schema.validate()?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Backend(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .pragma("cache_size", "-16384");
        let mut conn = opts.connect().await.map_err(backend)?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&mut conn)
            .await
            .map_err(|e| StoreError::Backend(format!("migration failed: {e}")))?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts.clone().read_only(true))
            .await
            .map_err(backend)?;
        let mut store = SqlStore {
            unique_indexes: HashMap::new(),
            keyed_commits: AtomicU64::new(0),
            schema,
            pools: Pools::Sqlite {
                write: Box::new(SqliteWriter {
                    opts,
                    conn: tokio::sync::Mutex::new(Some(conn)),
                }),
                read,
            },
        };
        store.ensure_schema().await?;
        Ok(store)
    }

    pub async fn open_postgres(url: &str, schema: Schema) -> Result<SqlStore, StoreError> {
        schema.validate()?;
        let opts = PgConnectOptions::from_str(url).map_err(backend)?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts)
            .await
            .map_err(backend)?;
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .map_err(|e| StoreError::Backend(format!("migration failed: {e}")))?;
        let mut store = SqlStore {
            unique_indexes: HashMap::new(),
            keyed_commits: AtomicU64::new(0),
            schema,
            pools: Pools::Postgres(pool),
        };
        store.ensure_schema().await?;
        Ok(store)
    }

    fn dialect(&self) -> Dialect {
        match self.pools {
            Pools::Sqlite { .. } => Dialect::Sqlite,
            Pools::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Create or extend every kind's table and indexes from the metadata, in one transaction
    /// (PostgreSQL: under an advisory lock, so nodes starting together do not race).
    async fn ensure_schema(&mut self) -> Result<(), StoreError> {
        for k in self.schema.kinds() {
            gen::check_ident(k.name)?;
            for f in k.fields {
                gen::check_ident(f.name)?;
            }
        }
        let indexes = gen::index_ddl(&self.schema)?;
        self.with_tx(TxWork::Setup(&indexes)).await?;
        for (name, _, kind, field) in indexes {
            if name.starts_with("ux_") {
                self.unique_indexes.insert(name, (kind, field));
            }
        }
        Ok(())
    }

    /// Close the pools (waits for connections to finish).
    pub async fn close(&self) {
        match &self.pools {
            Pools::Sqlite { write, read } => {
                read.close().await;
                if let Some(c) = write.conn.lock().await.take() {
                    let _ = c.close().await;
                }
            }
            Pools::Postgres(p) => p.close().await,
        }
    }

    /// Run `work` in one write transaction; commit if it succeeds, roll back otherwise.
    async fn with_tx(&self, work: TxWork<'_>) -> Result<Vec<u64>, StoreError> {
        let out = match &self.pools {
            Pools::Sqlite { write, .. } => {
                let mut guard = write.conn.lock().await;
                if guard.is_none() {
                    *guard = Some(write.opts.connect().await.map_err(backend)?);
                }
                let conn = guard.as_mut().expect("connected above");
                let out = async {
                    let mut tx = conn.begin().await?;
                    let out = self.run_work(&mut Tx::Sqlite(&mut tx), work).await;
                    finish(tx, out).await
                }
                .await;
                // A connection-level failure (not a database error) drops the connection; the
                // next write reconnects.
                if let Err(TxError::Sql(e)) = &out {
                    if !matches!(e, sqlx::Error::Database(_)) {
                        *guard = None;
                    }
                }
                out
            }
            Pools::Postgres(p) => {
                let mut tx = p.begin().await.map_err(backend)?;
                let out = self.run_work(&mut Tx::Postgres(&mut tx), work).await;
                finish(tx, out).await
            }
        };
        out.map_err(|e| self.map_tx_err(e))
    }

    async fn run_work(&self, tx: &mut Tx<'_>, work: TxWork<'_>) -> Result<Vec<u64>, TxError> {
        match work {
            TxWork::Setup(indexes) => setup(tx, &self.schema, indexes).await.map(|_| Vec::new()),
            TxWork::Apply {
                writes,
                now,
                multi_row,
                key: None,
            } => self.apply(tx, writes, now, multi_row).await,
            TxWork::Apply {
                writes,
                now,
                multi_row,
                key: Some(key),
            } => {
                if let Some(versions) = commit_answer(tx, key).await? {
                    return Ok(versions);
                }
                let versions = self.apply(tx, writes, now, multi_row).await?;
                let prune = self
                    .keyed_commits
                    .fetch_add(1, Ordering::Relaxed)
                    .is_multiple_of(PRUNE_KEYS_EVERY);
                remember_commit(tx, key, &versions, now, prune).await?;
                Ok(versions)
            }
        }
    }

    fn map_tx_err(&self, e: TxError) -> StoreError {
        match e {
            TxError::Store(e) => e,
            TxError::Sql(e) => self.map_err(e),
            TxError::RetrySingle => StoreError::Backend(UNATTRIBUTED.into()),
        }
    }

    fn map_err(&self, e: sqlx::Error) -> StoreError {
        if let sqlx::Error::Database(db) = &e {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            // PostgreSQL: serialization failure or deadlock; the caller may retry.
            if code == "40001" || code == "40P01" {
                return StoreError::Backend(format!(
                    "transaction aborted by a concurrent one: {}",
                    db.message()
                ));
            }
        }
        backend(e)
    }

    async fn fetch_records(
        &self,
        sql: &Sql,
        kind: &'static KindMeta,
    ) -> Result<Vec<Record>, TxError> {
        match &self.pools {
            Pools::Sqlite { read, .. } => bind_params!(sqlx::query(&sql.text), &sql.params)
                .fetch_all(read)
                .await?
                .iter()
                .map(|r| decode(r, kind))
                .collect(),
            Pools::Postgres(p) => bind_params!(sqlx::query(&sql.text), &sql.params)
                .fetch_all(p)
                .await?
                .iter()
                .map(|r| decode(r, kind))
                .collect(),
        }
    }

    async fn fetch_count(&self, sql: &Sql) -> Result<i64, sqlx::Error> {
        match &self.pools {
            Pools::Sqlite { read, .. } => bind_params!(sqlx::query(&sql.text), &sql.params)
                .fetch_one(read)
                .await?
                .try_get(0),
            Pools::Postgres(p) => bind_params!(sqlx::query(&sql.text), &sql.params)
                .fetch_one(p)
                .await?
                .try_get(0),
        }
    }

    /// Apply `writes` in one transaction. Inserts go as multi-row statements; if one of those
    /// hits a unique violation the batch is replayed row by row (it rolled back, so nothing
    /// changed) to name the exact row and field.
    async fn transact(
        &self,
        writes: Vec<ResolvedWrite>,
        key: Option<Uuid>,
        now: i64,
    ) -> Result<Vec<u64>, StoreError> {
        if key.is_none() {
            if let Some(r) = self.single_insert(&writes, now).await {
                return r;
            }
        }
        let first = TxWork::Apply {
            writes: writes.clone(),
            now,
            multi_row: true,
            key,
        };
        match self.with_tx(first).await {
            Err(StoreError::Backend(m)) if m == UNATTRIBUTED => {
                self.with_tx(TxWork::Apply {
                    writes,
                    now,
                    multi_row: false,
                    key,
                })
                .await
            }
            other => other,
        }
    }

    /// A batch that is one multi-row insert of one kind needs no explicit transaction: the
    /// statement is atomic by itself, and skipping BEGIN/COMMIT saves two round trips. `None`
    /// when the batch is not of that shape or a unique violation needs the exact replay.
    async fn single_insert(
        &self,
        writes: &[ResolvedWrite],
        now: i64,
    ) -> Option<Result<Vec<u64>, StoreError>> {
        let kind = match writes.first()? {
            ResolvedWrite::Insert { rec, upsert: false } => rec.kind.name,
            _ => return None,
        };
        let recs: Vec<Record> = writes
            .iter()
            .map(|w| match w {
                ResolvedWrite::Insert { rec, upsert: false } if rec.kind.name == kind => {
                    Some(rec.clone())
                }
                _ => None,
            })
            .collect::<Option<_>>()?;
        if recs.len() > INSERT_CHUNK {
            return None;
        }
        let sql = gen::insert(self.dialect(), &recs, now, false);
        let r = match &self.pools {
            Pools::Sqlite { write, .. } => {
                let mut guard = write.conn.lock().await;
                let conn = guard.as_mut()?;
                bind_params!(sqlx::query(&sql.text), &sql.params)
                    .execute(&mut *conn)
                    .await
                    .map(|_| ())
            }
            Pools::Postgres(p) => bind_params!(sqlx::query(&sql.text), &sql.params)
                .execute(p)
                .await
                .map(|_| ()),
        };
        match r {
            Ok(_) => Some(Ok(vec![1; recs.len()])),
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => None,
            Err(e) => Some(Err(self.map_err(e))),
        }
    }

    async fn apply(
        &self,
        tx: &mut Tx<'_>,
        writes: Vec<ResolvedWrite>,
        now: i64,
        multi_row: bool,
    ) -> Result<Vec<u64>, TxError> {
        let d = tx.dialect();
        let mut versions = Vec::with_capacity(writes.len());
        let mut writes = writes.into_iter().peekable();
        while let Some(w) = writes.next() {
            match w {
                ResolvedWrite::Insert { rec, upsert: false } => {
                    let kind = rec.kind;
                    let mut chunk = vec![rec];
                    while multi_row && chunk.len() < INSERT_CHUNK {
                        match writes.next_if(|w| matches!(w, ResolvedWrite::Insert { upsert: false, rec } if rec.kind.name == kind.name)) {
                            Some(ResolvedWrite::Insert { rec, .. }) => chunk.push(rec),
                            _ => break,
                        }
                    }
                    match tx.execute(&gen::insert(d, &chunk, now, false)).await {
                        Ok(_) => versions.extend(std::iter::repeat_n(1, chunk.len())),
                        Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                            if multi_row && chunk.len() > 1 {
                                return Err(TxError::RetrySingle);
                            }
                            return Err(self.unique_error(db.as_ref(), &chunk[0]).into());
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                ResolvedWrite::Insert { rec, upsert: true } => {
                    match tx
                        .fetch_i64(&gen::insert(d, std::slice::from_ref(&rec), now, true))
                        .await
                    {
                        Ok(v) => versions.push(v.unwrap_or(1) as u64),
                        Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                            return Err(self.unique_error(db.as_ref(), &rec).into())
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                ResolvedWrite::Update(u) => {
                    let uuid = u.uuid.to_string();
                    let Some(cur) = tx
                        .fetch_record(&gen::select_for_update(d, u.kind, &uuid), u.kind)
                        .await?
                    else {
                        check_missing(u.kind, u.uuid, u.expect)?;
                        versions.push(0);
                        continue;
                    };
                    check_version(&cur, u.expect)?;
                    let mut new = cur.clone();
                    let mut changed = Vec::new();
                    for (i, v) in u.changes(&cur)? {
                        new.values[i] = v;
                        changed.push(i);
                    }
                    changed.sort_unstable();
                    new.version = cur.version + 1;
                    new.updated_ms = now;
                    match tx
                        .execute(&gen::update(d, &new, &changed, cur.version))
                        .await
                    {
                        Ok(1) => versions.push(new.version),
                        Ok(_) => {
                            return Err(StoreError::Conflict {
                                kind: u.kind.name.to_string(),
                                uuid: u.uuid,
                                expected: cur.version,
                                found: cur.version + 1,
                            }
                            .into())
                        }
                        Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                            return Err(self.unique_error(db.as_ref(), &new).into())
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                ResolvedWrite::Delete { kind, uuid, expect } => {
                    let id = uuid.to_string();
                    match tx
                        .fetch_record(&gen::select_for_update(d, kind, &id), kind)
                        .await?
                    {
                        Some(cur) => {
                            check_version(&cur, expect)?;
                            tx.execute(&gen::delete(d, kind, &id)).await?;
                        }
                        None => check_missing(kind, uuid, expect)?,
                    }
                    versions.push(0);
                }
            }
        }
        Ok(versions)
    }

    /// A unique violation on writing `rec`: `Duplicate` for a unique field, else `AlreadyExists`.
    fn unique_error(&self, db: &dyn sqlx::error::DatabaseError, rec: &Record) -> StoreError {
        let text = format!("{} {}", db.constraint().unwrap_or_default(), db.message());
        for (name, (kind, field)) in &self.unique_indexes {
            // PostgreSQL names the index; SQLite names the column ("r_kind.field").
            if text.contains(name.as_str()) || text.contains(&format!("r_{kind}.{field}")) {
                return StoreError::Duplicate {
                    kind: kind.to_string(),
                    field: field.to_string(),
                    value: rec.get(field).map(|v| v.to_string()).unwrap_or_default(),
                };
            }
        }
        StoreError::AlreadyExists {
            kind: rec.kind.name.to_string(),
            uuid: rec.uuid,
        }
    }
}

/// Tables, missing columns, indexes and the kinds catalogue.
async fn setup(
    tx: &mut Tx<'_>,
    schema: &Schema,
    indexes: &[(String, String, &'static str, &'static str)],
) -> Result<(), TxError> {
    let d = tx.dialect();
    if d == Dialect::Postgres {
        tx.ddl("SELECT pg_advisory_xact_lock(7427301)".into())
            .await?;
    }
    let now = now_ms();
    for k in schema.kinds() {
        tx.ddl(gen::create_table(d, k)).await?;
        let mut sql = Sql::new(d);
        match d {
            Dialect::Sqlite => sql.push("SELECT name FROM pragma_table_info(").param(Param::Text(format!("r_{}", k.name))).push(")"),
            Dialect::Postgres => sql
                .push("SELECT column_name::text FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = ")
                .param(Param::Text(format!("r_{}", k.name))),
        };
        let have: HashSet<String> = tx.fetch_strings(&sql).await?.into_iter().collect();
        for (i, f) in k.fields.iter().enumerate() {
            if !have.contains(f.name) {
                tx.ddl(gen::add_column(d, k, i)).await?;
            }
        }
        let fields: Vec<_> = k
            .fields
            .iter()
            .map(|f| serde_json::json!({"name": f.name, "type": f.ty, "nullable": f.nullable, "indexed": f.indexed, "unique": f.unique}))
            .collect();
        let mut up = Sql::new(d);
        up.push("INSERT INTO stratus_kinds (kind, fields, updated_ms) VALUES (")
            .param(Param::Text(k.name.to_string()))
            .push(", ")
            .param(Param::Text(serde_json::Value::Array(fields).to_string()))
            .push(if d == Dialect::Postgres { "::jsonb, " } else { ", " })
            .param(Param::Int(now))
            .push(") ON CONFLICT (kind) DO UPDATE SET fields = excluded.fields, updated_ms = excluded.updated_ms");
        tx.execute(&up).await?;
    }
    for (_, ddl, _, _) in indexes {
        tx.ddl(ddl.clone()).await?;
    }
    Ok(())
}

#[async_trait]
impl Store for SqlStore {
    fn backend(&self) -> &'static str {
        match self.dialect() {
            Dialect::Sqlite => "sqlite",
            Dialect::Postgres => "postgres",
        }
    }

    fn schema(&self) -> &Schema {
        &self.schema
    }

    async fn get(&self, kind: &str, uuid: Uuid) -> Result<Option<Record>, StoreError> {
        let meta = self.schema.kind(kind)?;
        let q = resolve(&self.schema, &Query::new(meta.name).eq("uuid", uuid))?;
        let sql = gen::select(self.dialect(), &q, false);
        let rows = self
            .fetch_records(&sql, meta)
            .await
            .map_err(|e| self.map_tx_err(e))?;
        Ok(rows.into_iter().next())
    }

    async fn query(&self, q: &Query) -> Result<Vec<Record>, StoreError> {
        let rq = resolve(&self.schema, q)?;
        let sql = gen::select(self.dialect(), &rq, false);
        self.fetch_records(&sql, rq.kind)
            .await
            .map_err(|e| self.map_tx_err(e))
    }

    async fn count(&self, q: &Query) -> Result<u64, StoreError> {
        let rq = resolve(&self.schema, q)?;
        let sql = gen::select(self.dialect(), &rq, true);
        Ok(self.fetch_count(&sql).await.map_err(|e| self.map_err(e))? as u64)
    }

    async fn commit(&self, batch: Batch) -> Result<Vec<u64>, StoreError> {
        let key = batch.key;
        let writes = resolve_batch(&self.schema, batch)?;
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        self.transact(writes, key, now_ms()).await
    }
}
