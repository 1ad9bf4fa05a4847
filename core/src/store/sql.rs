//! SQL backends on sqlx: SQLite (the embedded default, WAL) and PostgreSQL (shared by a cluster).
//!
//! All kinds live in one `resources` table (see `migrations/`); declared fields are a JSON object.
//! The SQL for queries is generated once from the resolved query for both dialects; per-kind
//! expression indexes come from the kinds' metadata. Guarded updates read the row (`FOR UPDATE`
//! on PostgreSQL; SQLite has one writer) and apply [`ResolvedUpdate::apply`], the same code the
//! in-memory store runs, so the three backends cannot drift apart on semantics.

use super::batch::{resolve_batch, Expect, ResolvedUpdate, ResolvedWrite};
use super::meta::{FieldRef, KindMeta, Record, Schema};
use super::query::{resolve, Hop, Op, ResolvedCond, ResolvedQuery};
use super::value::{FieldType, Value};
use super::{Batch, Query, Store, StoreError};
use crate::clock::now_ms;
use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{PgConnection, Row as _, SqliteConnection};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// A bound parameter.
#[derive(Debug, Clone)]
enum Param {
    Int(i64),
    Float(f64),
    Text(String),
    Bool(bool),
}

impl Param {
    fn from_value(v: &Value) -> Param {
        match v {
            Value::Bool(b) => Param::Bool(*b),
            Value::Int(i) | Value::Time(i) => Param::Int(*i),
            Value::Float(f) => Param::Float(*f),
            Value::Text(s) => Param::Text(s.clone()),
            Value::Uuid(u) => Param::Text(u.to_string()),
            Value::Json(j) => Param::Text(j.to_string()),
            Value::Null => Param::Text(String::new()),
        }
    }
}

/// SQL text plus its parameters, built in one pass.
struct Sql {
    dialect: Dialect,
    text: String,
    params: Vec<Param>,
}

impl Sql {
    fn new(dialect: Dialect) -> Self {
        Sql {
            dialect,
            text: String::with_capacity(256),
            params: Vec::new(),
        }
    }
    fn push(&mut self, s: &str) -> &mut Self {
        self.text.push_str(s);
        self
    }
    fn param(&mut self, p: Param) -> &mut Self {
        self.params.push(p);
        let n = self.params.len();
        match self.dialect {
            Dialect::Sqlite => write!(self.text, "?{n}"),
            Dialect::Postgres => write!(self.text, "${n}"),
        }
        .expect("write to string");
        self
    }
}

/// Guard against anything but plain identifiers reaching SQL text (kind and field names are
/// inlined so that SQLite can use the partial expression indexes).
fn check_ident(s: &str) -> Result<(), StoreError> {
    let ok = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidQuery(format!(
            "{s:?} is not a valid identifier"
        )))
    }
}

/// The SQL expression for field `f` of the row aliased `alias`, typed so that comparisons and
/// ordering follow the shared semantics (byte order for text, numeric for numbers).
fn field_expr(d: Dialect, alias: &str, kind: &KindMeta, f: FieldRef) -> String {
    let col = |c: &str| {
        if alias.is_empty() {
            c.to_string()
        } else {
            format!("{alias}.{c}")
        }
    };
    match f {
        FieldRef::Uuid => match d {
            Dialect::Sqlite => col("uuid"),
            Dialect::Postgres => format!("({} COLLATE \"C\")", col("uuid")),
        },
        FieldRef::Version => col("version"),
        FieldRef::Created => col("created_ms"),
        FieldRef::Updated => col("updated_ms"),
        FieldRef::Declared(i) => {
            let m = &kind.fields[i];
            let fields = col("fields");
            match d {
                Dialect::Sqlite => format!("json_extract({fields}, '$.{}')", m.name),
                Dialect::Postgres => {
                    let text = format!("({fields}->>'{}')", m.name);
                    match m.ty {
                        FieldType::Int | FieldType::Time => format!("({text}::bigint)"),
                        FieldType::Float => format!("({text}::double precision)"),
                        FieldType::Bool => format!("({text}::boolean)"),
                        FieldType::Text | FieldType::Uuid => format!("({text} COLLATE \"C\")"),
                        FieldType::Json => text,
                    }
                }
            }
        }
    }
}

/// Expression used to join over a relation: plain text on both sides (uuids are stored as text).
fn join_expr(d: Dialect, alias: &str, kind: &KindMeta, f: FieldRef) -> String {
    match (d, f) {
        (_, FieldRef::Uuid) => format!("{alias}.uuid"),
        (Dialect::Sqlite, f) => field_expr(d, alias, kind, f),
        (Dialect::Postgres, FieldRef::Declared(i)) => {
            format!("({alias}.fields->>'{}')", kind.fields[i].name)
        }
        (Dialect::Postgres, f) => field_expr(d, alias, kind, f),
    }
}

/// Translate a LIKE pattern (with `\` escapes) to SQLite GLOB, which is case-sensitive.
fn like_to_glob(p: &str) -> String {
    let mut out = String::with_capacity(p.len() + 4);
    let mut chars = p.chars();
    while let Some(c) = chars.next() {
        match c {
            '%' => out.push('*'),
            '_' => out.push('?'),
            '\\' => push_glob_lit(&mut out, chars.next().unwrap_or('\\')),
            c => push_glob_lit(&mut out, c),
        }
    }
    out
}

fn push_glob_lit(out: &mut String, c: char) {
    if matches!(c, '*' | '?' | '[') {
        out.push('[');
        out.push(c);
        out.push(']');
    } else {
        out.push(c);
    }
}

fn push_cond(sql: &mut Sql, c: &ResolvedCond, root: &KindMeta) {
    push_hops(sql, c, root, 0);
}

fn push_hops(sql: &mut Sql, c: &ResolvedCond, kind: &KindMeta, depth: usize) {
    let d = sql.dialect;
    let alias = format!("t{depth}");
    if depth == c.hops.len() {
        push_op(sql, &field_expr(d, &alias, kind, c.field), &c.op);
        return;
    }
    let h: &Hop = &c.hops[depth];
    let next = format!("t{}", depth + 1);
    sql.push(&format!(
        "EXISTS (SELECT 1 FROM resources {next} WHERE {next}.kind = '{}' AND {} = {} AND ",
        h.to.name,
        join_expr(d, &next, h.to, h.remote),
        join_expr(d, &alias, h.from, h.local),
    ));
    push_hops(sql, c, h.to, depth + 1);
    sql.push(")");
}

fn push_op(sql: &mut Sql, expr: &str, op: &Op) {
    let d = sql.dialect;
    let bin = |sql: &mut Sql, o: &str, v: &Value| {
        sql.push(&format!("{expr} {o} "))
            .param(Param::from_value(v));
    };
    let list = |sql: &mut Sql, not: &str, vs: &[Value]| {
        sql.push(&format!("{expr} {not}IN ("));
        for (i, v) in vs.iter().enumerate() {
            if i > 0 {
                sql.push(", ");
            }
            sql.param(Param::from_value(v));
        }
        sql.push(")");
    };
    let like = |sql: &mut Sql, not: bool, p: &str| {
        let n = if not { "NOT " } else { "" };
        match d {
            Dialect::Sqlite => {
                sql.push(&format!("{n}({expr} GLOB "))
                    .param(Param::Text(like_to_glob(p)))
                    .push(")");
            }
            Dialect::Postgres => {
                sql.push(&format!("{n}({expr} LIKE "))
                    .param(Param::Text(p.to_string()))
                    .push(")");
            }
        }
    };
    match op {
        Op::Eq(v) => bin(sql, "=", v),
        Op::Ne(v) => bin(sql, "<>", v),
        Op::Gt(v) => bin(sql, ">", v),
        Op::Ge(v) => bin(sql, ">=", v),
        Op::Lt(v) => bin(sql, "<", v),
        Op::Le(v) => bin(sql, "<=", v),
        Op::In(vs) => list(sql, "", vs),
        Op::NotIn(vs) => list(sql, "NOT ", vs),
        Op::Like(p) => like(sql, false, p),
        Op::NotLike(p) => like(sql, true, p),
        Op::IsNull => {
            sql.push(&format!("{expr} IS NULL"));
        }
        Op::NotNull => {
            sql.push(&format!("{expr} IS NOT NULL"));
        }
    }
}

/// The `fields` column as text, for the shared row decoder.
fn fields_column(d: Dialect) -> &'static str {
    match d {
        Dialect::Sqlite => "fields",
        Dialect::Postgres => "fields::text AS fields",
    }
}

fn select_sql(d: Dialect, q: &ResolvedQuery, count: bool) -> Sql {
    let mut sql = Sql::new(d);
    let fields = match d {
        Dialect::Sqlite => "t0.fields AS fields",
        Dialect::Postgres => "t0.fields::text AS fields",
    };
    if count {
        sql.push("SELECT COUNT(*) AS n");
    } else {
        sql.push(&format!(
            "SELECT t0.uuid, t0.version, t0.created_ms, t0.updated_ms, {fields}"
        ));
    }
    sql.push(&format!(
        " FROM resources t0 WHERE t0.kind = '{}'",
        q.kind.name
    ));
    for c in &q.conds {
        sql.push(" AND ");
        push_cond(&mut sql, c, q.kind);
    }
    if count {
        return sql;
    }
    sql.push(" ORDER BY ");
    for s in &q.sort {
        let dir = if s.desc {
            "DESC NULLS LAST"
        } else {
            "ASC NULLS FIRST"
        };
        sql.push(&format!("{} {dir}, ", field_expr(d, "t0", q.kind, s.field)));
    }
    sql.push(&format!(
        "{} ASC",
        field_expr(d, "t0", q.kind, FieldRef::Uuid)
    ));
    match (q.limit, d) {
        (Some(l), _) => sql.push(&format!(" LIMIT {l}")),
        (None, Dialect::Sqlite) if q.offset > 0 => sql.push(" LIMIT -1"),
        _ => &mut sql,
    };
    if q.offset > 0 {
        sql.push(&format!(" OFFSET {}", q.offset));
    }
    sql
}

/// Index DDL for every indexed field of every kind.
fn index_ddl(
    d: Dialect,
    schema: &Schema,
) -> Result<Vec<(String, String, &'static str, &'static str)>, StoreError> {
    let mut out = Vec::new();
    for k in schema.kinds() {
        check_ident(k.name)?;
        for (i, f) in k.fields.iter().enumerate() {
            check_ident(f.name)?;
            if !f.indexed || f.ty == FieldType::Json {
                continue;
            }
            let (prefix, unique) = if f.unique {
                ("ux", "UNIQUE ")
            } else {
                ("ix", "")
            };
            let name = format!("{prefix}_{}_{}", k.name, f.name);
            let expr = field_expr(d, "", k, FieldRef::Declared(i));
            let ddl = format!(
                "CREATE {unique}INDEX IF NOT EXISTS {name} ON resources (({expr})) WHERE kind = '{}'",
                k.name
            );
            out.push((name, ddl, k.name, f.name));
        }
    }
    Ok(out)
}

struct RawRow {
    uuid: String,
    version: i64,
    created_ms: i64,
    updated_ms: i64,
    fields: String,
}

fn record_from_raw(kind: &'static KindMeta, raw: RawRow) -> Result<Record, StoreError> {
    let corrupt = |what: String| StoreError::Corrupt(format!("{} {}: {what}", kind.name, raw.uuid));
    let uuid = Uuid::parse_str(&raw.uuid).map_err(|e| corrupt(e.to_string()))?;
    let obj: serde_json::Value =
        serde_json::from_str(&raw.fields).map_err(|e| corrupt(e.to_string()))?;
    let mut values = Vec::with_capacity(kind.fields.len());
    for m in kind.fields {
        let j = obj.get(m.name).unwrap_or(&serde_json::Value::Null);
        let v =
            Value::from_json(m.ty, j).ok_or_else(|| corrupt(format!("{} holds {j}", m.name)))?;
        if v.is_null() && !m.nullable {
            return Err(corrupt(format!("{} is null", m.name)));
        }
        values.push(v);
    }
    Ok(Record {
        kind,
        uuid,
        version: raw.version as u64,
        created_ms: raw.created_ms,
        updated_ms: raw.updated_ms,
        values,
    })
}

fn fields_json(r: &Record) -> String {
    let mut map = serde_json::Map::with_capacity(r.values.len());
    for (m, v) in r.kind.fields.iter().zip(&r.values) {
        map.insert(m.name.to_string(), v.to_json());
    }
    serde_json::Value::Object(map).to_string()
}

fn raw_from_row<R>(row: &R) -> Result<RawRow, sqlx::Error>
where
    R: sqlx::Row,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    String: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok(RawRow {
        uuid: row.try_get("uuid")?,
        version: row.try_get("version")?,
        created_ms: row.try_get("created_ms")?,
        updated_ms: row.try_get("updated_ms")?,
        fields: row.try_get("fields")?,
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

    async fn fetch_optional(&mut self, sql: &Sql) -> Result<Option<RawRow>, sqlx::Error> {
        match self {
            Tx::Sqlite(c) => bind_params!(sqlx::query(&sql.text), &sql.params)
                .fetch_optional(&mut **c)
                .await?
                .map(|r| raw_from_row(&r))
                .transpose(),
            Tx::Postgres(c) => bind_params!(sqlx::query(&sql.text), &sql.params)
                .fetch_optional(&mut **c)
                .await?
                .map(|r| raw_from_row(&r))
                .transpose(),
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
}

#[derive(Clone)]
enum Pools {
    Sqlite { write: SqlitePool, read: SqlitePool },
    Postgres(PgPool),
}

/// The sqlx-backed store.
pub struct SqlStore {
    schema: Schema,
    pools: Pools,
    /// Unique index name → (kind, field), to turn constraint errors into `Duplicate`.
    unique_indexes: HashMap<String, (&'static str, &'static str)>,
}

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
            .pragma("cache_size", "-65536");
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts.clone())
            .await
            .map_err(backend)?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&write)
            .await
            .map_err(|e| StoreError::Backend(format!("migration failed: {e}")))?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts.read_only(true))
            .await
            .map_err(backend)?;
        let store = SqlStore {
            unique_indexes: HashMap::new(),
            schema,
            pools: Pools::Sqlite { write, read },
        };
        store.ensure_indexes().await
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
        let store = SqlStore {
            unique_indexes: HashMap::new(),
            schema,
            pools: Pools::Postgres(pool),
        };
        store.ensure_indexes().await
    }

    fn dialect(&self) -> Dialect {
        match self.pools {
            Pools::Sqlite { .. } => Dialect::Sqlite,
            Pools::Postgres(_) => Dialect::Postgres,
        }
    }

    async fn ensure_indexes(mut self) -> Result<SqlStore, StoreError> {
        for (name, ddl, kind, field) in index_ddl(self.dialect(), &self.schema)? {
            self.execute_ddl(&ddl).await?;
            if name.starts_with("ux_") {
                self.unique_indexes.insert(name, (kind, field));
            }
        }
        Ok(self)
    }

    /// Close the pools (waits for connections to finish).
    pub async fn close(&self) {
        match &self.pools {
            Pools::Sqlite { write, read } => {
                read.close().await;
                write.close().await;
            }
            Pools::Postgres(p) => p.close().await,
        }
    }

    async fn fetch_all(&self, sql: &Sql) -> Result<Vec<RawRow>, sqlx::Error> {
        match &self.pools {
            Pools::Sqlite { read, .. } => bind_params!(sqlx::query(&sql.text), &sql.params)
                .fetch_all(read)
                .await?
                .iter()
                .map(raw_from_row)
                .collect(),
            Pools::Postgres(p) => bind_params!(sqlx::query(&sql.text), &sql.params)
                .fetch_all(p)
                .await?
                .iter()
                .map(raw_from_row)
                .collect(),
        }
    }

    async fn fetch_count(&self, sql: &Sql) -> Result<i64, sqlx::Error> {
        match &self.pools {
            Pools::Sqlite { read, .. } => bind_params!(sqlx::query(&sql.text), &sql.params)
                .fetch_one(read)
                .await?
                .try_get("n"),
            Pools::Postgres(p) => bind_params!(sqlx::query(&sql.text), &sql.params)
                .fetch_one(p)
                .await?
                .try_get("n"),
        }
    }

    /// Apply `writes` in one transaction: all or nothing.
    async fn transact(&self, writes: Vec<ResolvedWrite>, now: i64) -> Result<Vec<u64>, StoreError> {
        match &self.pools {
            Pools::Sqlite { write, .. } => {
                let mut tx = write.begin().await.map_err(backend)?;
                let out = self.apply(&mut Tx::Sqlite(&mut tx), writes, now).await;
                self.finish(tx, out).await
            }
            Pools::Postgres(p) => {
                let mut tx = p.begin().await.map_err(backend)?;
                let out = self.apply(&mut Tx::Postgres(&mut tx), writes, now).await;
                self.finish(tx, out).await
            }
        }
    }

    async fn execute_ddl(&self, ddl: &str) -> Result<(), StoreError> {
        match &self.pools {
            Pools::Sqlite { write, .. } => sqlx::query(ddl).execute(write).await.map(|_| ()),
            Pools::Postgres(p) => sqlx::query(ddl).execute(p).await.map(|_| ()),
        }
        .map_err(|e| StoreError::Backend(format!("{ddl}: {e}")))
    }

    async fn finish<DB: sqlx::Database, T>(
        &self,
        tx: sqlx::Transaction<'_, DB>,
        out: Result<T, TxError>,
    ) -> Result<T, StoreError> {
        match out {
            Ok(v) => {
                tx.commit().await.map_err(|e| self.map_err(e))?;
                Ok(v)
            }
            Err(e) => {
                // Rolling back is best effort: dropping the transaction rolls back too.
                let _ = tx.rollback().await;
                Err(match e {
                    TxError::Store(e) => e,
                    TxError::Sql(e) => self.map_err(e),
                })
            }
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

    async fn apply(
        &self,
        tx: &mut Tx<'_>,
        writes: Vec<ResolvedWrite>,
        now: i64,
    ) -> Result<Vec<u64>, TxError> {
        let d = tx.dialect();
        let mut versions = Vec::with_capacity(writes.len());
        for w in writes {
            match w {
                ResolvedWrite::Insert { rec, upsert } => {
                    let mut sql = Sql::new(d);
                    sql.push("INSERT INTO resources (kind, uuid, version, created_ms, updated_ms, fields) VALUES (")
                        .param(Param::Text(rec.kind.name.to_string()))
                        .push(", ")
                        .param(Param::Text(rec.uuid.to_string()))
                        .push(", 1, ")
                        .param(Param::Int(now))
                        .push(", ")
                        .param(Param::Int(now))
                        .push(", ")
                        .param(Param::Text(fields_json(&rec)));
                    if d == Dialect::Postgres {
                        sql.push("::jsonb");
                    }
                    sql.push(")");
                    if upsert {
                        sql.push(
                            " ON CONFLICT (kind, uuid) DO UPDATE SET version = resources.version + 1, \
                             updated_ms = excluded.updated_ms, fields = excluded.fields",
                        );
                    }
                    sql.push(" RETURNING uuid, version, created_ms, updated_ms, ")
                        .push(fields_column(d));
                    match tx.fetch_optional(&sql).await {
                        Ok(Some(raw)) => versions.push(raw.version as u64),
                        Ok(None) => {
                            return Err(StoreError::Backend("insert returned no row".into()).into())
                        }
                        Err(e) => return Err(self.unique_error(e, &rec)),
                    }
                }
                ResolvedWrite::Update(u) => {
                    let Some(cur) = self.lock_row(tx, u.kind, u.uuid).await? else {
                        if u.expect == Expect::Maybe {
                            versions.push(0);
                            continue;
                        }
                        return Err(StoreError::NotFound {
                            kind: u.kind.name.to_string(),
                            uuid: u.uuid,
                        }
                        .into());
                    };
                    check_expect(&cur, u.expect)?;
                    versions.push(self.write_update(tx, &u, cur, now).await?);
                }
                ResolvedWrite::Delete { kind, uuid, expect } => {
                    match self.lock_row(tx, kind, uuid).await? {
                        Some(cur) => {
                            check_expect(&cur, expect)?;
                            let mut sql = Sql::new(d);
                            sql.push(&format!(
                                "DELETE FROM resources WHERE kind = '{}' AND uuid = ",
                                kind.name
                            ))
                            .param(Param::Text(uuid.to_string()));
                            tx.execute(&sql).await?;
                        }
                        None if expect == Expect::Maybe => {}
                        None => {
                            return Err(StoreError::NotFound {
                                kind: kind.name.to_string(),
                                uuid,
                            }
                            .into())
                        }
                    }
                    versions.push(0);
                }
            }
        }
        Ok(versions)
    }

    async fn lock_row(
        &self,
        tx: &mut Tx<'_>,
        kind: &'static KindMeta,
        uuid: Uuid,
    ) -> Result<Option<Record>, TxError> {
        let d = tx.dialect();
        let mut sql = Sql::new(d);
        sql.push(&format!(
            "SELECT uuid, version, created_ms, updated_ms, {} FROM resources WHERE kind = '{}' AND uuid = ",
            fields_column(d),
            kind.name
        ))
        .param(Param::Text(uuid.to_string()));
        if d == Dialect::Postgres {
            sql.push(" FOR UPDATE");
        }
        match tx.fetch_optional(&sql).await? {
            Some(raw) => Ok(Some(record_from_raw(kind, raw)?)),
            None => Ok(None),
        }
    }

    async fn write_update(
        &self,
        tx: &mut Tx<'_>,
        u: &ResolvedUpdate,
        cur: Record,
        now: i64,
    ) -> Result<u64, TxError> {
        let values = u.apply(&cur)?;
        let new = Record {
            values,
            version: cur.version + 1,
            updated_ms: now,
            ..cur
        };
        let d = tx.dialect();
        let mut sql = Sql::new(d);
        sql.push("UPDATE resources SET version = ")
            .param(Param::Int(new.version as i64))
            .push(", updated_ms = ")
            .param(Param::Int(now))
            .push(", fields = ")
            .param(Param::Text(fields_json(&new)));
        if d == Dialect::Postgres {
            sql.push("::jsonb");
        }
        sql.push(&format!(" WHERE kind = '{}' AND uuid = ", u.kind.name))
            .param(Param::Text(u.uuid.to_string()))
            .push(" AND version = ")
            .param(Param::Int(cur.version as i64));
        match tx.execute(&sql).await {
            Ok(1) => Ok(new.version),
            Ok(_) => Err(StoreError::Conflict {
                kind: u.kind.name.to_string(),
                uuid: u.uuid,
                expected: cur.version,
                found: cur.version + 1,
            }
            .into()),
            Err(e) => Err(self.unique_error(e, &new)),
        }
    }

    /// Turn a unique violation on writing `rec` into `AlreadyExists` or `Duplicate`.
    fn unique_error(&self, e: sqlx::Error, rec: &Record) -> TxError {
        if let sqlx::Error::Database(db) = &e {
            if db.is_unique_violation() {
                let text = format!("{} {}", db.constraint().unwrap_or_default(), db.message());
                for (name, (kind, field)) in &self.unique_indexes {
                    if text.contains(name.as_str()) {
                        return StoreError::Duplicate {
                            kind: kind.to_string(),
                            field: field.to_string(),
                            value: rec.get(field).map(|v| v.to_string()).unwrap_or_default(),
                        }
                        .into();
                    }
                }
                return StoreError::AlreadyExists {
                    kind: rec.kind.name.to_string(),
                    uuid: rec.uuid,
                }
                .into();
            }
        }
        TxError::Sql(e)
    }
}

fn check_expect(cur: &Record, e: Expect) -> Result<(), StoreError> {
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

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Errors inside a transaction: our own, or the driver's (mapped once at the end).
enum TxError {
    Store(StoreError),
    Sql(sqlx::Error),
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
        let sql = select_sql(self.dialect(), &q, false);
        let rows = self.fetch_all(&sql).await.map_err(|e| self.map_err(e))?;
        rows.into_iter()
            .next()
            .map(|r| record_from_raw(meta, r))
            .transpose()
    }

    async fn query(&self, q: &Query) -> Result<Vec<Record>, StoreError> {
        let rq = resolve(&self.schema, q)?;
        let sql = select_sql(self.dialect(), &rq, false);
        let rows = self.fetch_all(&sql).await.map_err(|e| self.map_err(e))?;
        rows.into_iter()
            .map(|r| record_from_raw(rq.kind, r))
            .collect()
    }

    async fn count(&self, q: &Query) -> Result<u64, StoreError> {
        let rq = resolve(&self.schema, q)?;
        let sql = select_sql(self.dialect(), &rq, true);
        Ok(self.fetch_count(&sql).await.map_err(|e| self.map_err(e))? as u64)
    }

    async fn commit(&self, batch: Batch) -> Result<Vec<u64>, StoreError> {
        let writes = resolve_batch(&self.schema, &batch)?;
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        self.transact(writes, now).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::like_match;

    #[test]
    fn glob_translation_keeps_like_semantics() {
        for (pat, text) in [
            ("a%", "abc"),
            ("a_c", "abc"),
            ("50\\%", "50%"),
            ("x*y", "x*y"),
            ("[a]", "[a]"),
            ("a?", "a?"),
        ] {
            assert!(like_match(pat, text), "{pat} {text}");
            let g = like_to_glob(pat);
            assert!(!g.is_empty());
        }
        assert_eq!(like_to_glob("a%b_c"), "a*b?c");
        assert_eq!(like_to_glob("x*y?[z"), "x[*]y[?][[]z");
        assert_eq!(like_to_glob("50\\%"), "50%");
    }

    #[test]
    fn identifiers_are_checked() {
        assert!(check_ident("vm_nic").is_ok());
        assert!(check_ident("bad'name").is_err());
        assert!(check_ident("1x").is_err());
        assert!(check_ident("").is_err());
    }
}
