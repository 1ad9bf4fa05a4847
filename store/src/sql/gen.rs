//! SQL text generation for both dialects: table and index DDL from kind metadata, queries from
//! resolved queries, and the write statements. Values always travel as bound parameters; only
//! identifiers checked by [`check_ident`] are written into SQL text.

use crate::meta::{FieldRef, KindMeta, Record, Schema};
use crate::query::{Hop, Op, ResolvedCond, ResolvedQuery};
use crate::value::{FieldType, Value};
use crate::StoreError;
use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// A bound parameter.
#[derive(Debug, Clone)]
pub enum Param {
    Int(i64),
    Float(f64),
    Text(String),
    Bool(bool),
    /// A typed NULL.
    Null(FieldType),
}

impl Param {
    /// The parameter for value `v` of a field of type `ty`.
    pub fn of(ty: FieldType, v: &Value) -> Param {
        match v {
            Value::Null => Param::Null(ty),
            Value::Bool(b) => Param::Bool(*b),
            Value::Int(i) | Value::Time(i) => Param::Int(*i),
            Value::Float(f) => Param::Float(*f),
            Value::Text(s) => Param::Text(s.clone()),
            Value::Uuid(u) => Param::Text(u.to_string()),
            Value::Json(j) => Param::Text(j.as_str().to_string()),
        }
    }
}

/// SQL text plus its parameters, built in one pass.
pub struct Sql {
    pub dialect: Dialect,
    pub text: String,
    pub params: Vec<Param>,
}

impl Sql {
    pub fn new(dialect: Dialect) -> Self {
        Sql {
            dialect,
            text: String::with_capacity(256),
            params: Vec::new(),
        }
    }

    pub fn push(&mut self, s: &str) -> &mut Self {
        self.text.push_str(s);
        self
    }

    pub fn param(&mut self, p: Param) -> &mut Self {
        self.params.push(p);
        match self.dialect {
            // Anonymous `?` parameters, bound in order of appearance (the text is always built
            // left to right). Numbered `?N` would make SQLite look each name up in a list,
            // which is quadratic in the number of parameters of a multi-row insert.
            Dialect::Sqlite => self.text.push('?'),
            Dialect::Postgres => {
                write!(self.text, "${}", self.params.len()).expect("write to string")
            }
        }
        self
    }

    /// A parameter for a column of type `ty` (PostgreSQL JSONB needs a cast from text).
    pub fn column_param(&mut self, ty: FieldType, v: &Value) -> &mut Self {
        self.param(Param::of(ty, v));
        if self.dialect == Dialect::Postgres && ty == FieldType::Json {
            self.push("::jsonb");
        }
        self
    }
}

/// Only plain lower-case identifiers reach SQL text.
pub fn check_ident(s: &str) -> Result<(), StoreError> {
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

/// The table holding kind `kind`.
pub fn table(kind: &KindMeta) -> String {
    format!("\"r_{}\"", kind.name)
}

fn column_name(kind: &KindMeta, f: FieldRef) -> &'static str {
    match f {
        FieldRef::Uuid => "uuid",
        FieldRef::Version => "version",
        FieldRef::Created => "created_ms",
        FieldRef::Updated => "updated_ms",
        FieldRef::Declared(i) => kind.fields[i].name,
    }
}

/// `alias."column"` for field `f`.
pub fn column(alias: &str, kind: &KindMeta, f: FieldRef) -> String {
    format!("{alias}.\"{}\"", column_name(kind, f))
}

fn sql_type(d: Dialect, ty: FieldType) -> &'static str {
    match (d, ty) {
        (Dialect::Sqlite, FieldType::Bool | FieldType::Int | FieldType::Time) => "INTEGER",
        (Dialect::Sqlite, FieldType::Float) => "REAL",
        (Dialect::Sqlite, FieldType::Text | FieldType::Uuid | FieldType::Json) => "TEXT",
        (Dialect::Postgres, FieldType::Bool) => "BOOLEAN",
        (Dialect::Postgres, FieldType::Int | FieldType::Time) => "BIGINT",
        (Dialect::Postgres, FieldType::Float) => "DOUBLE PRECISION",
        // Byte order for text, like the other backends.
        (Dialect::Postgres, FieldType::Text | FieldType::Uuid) => "TEXT COLLATE \"C\"",
        (Dialect::Postgres, FieldType::Json) => "JSONB",
    }
}

/// `CREATE TABLE` for a kind. Declared columns are nullable in SQL; the store checks
/// nullability against the metadata before writing, so columns can be added to old tables.
pub fn create_table(d: Dialect, kind: &KindMeta) -> String {
    let text = sql_type(d, FieldType::Text);
    let int = sql_type(d, FieldType::Int);
    let mut s = format!(
        "CREATE TABLE IF NOT EXISTS {} (\"uuid\" {text} PRIMARY KEY NOT NULL, \"version\" {int} NOT NULL, \
         \"created_ms\" {int} NOT NULL, \"updated_ms\" {int} NOT NULL",
        table(kind)
    );
    for f in kind.fields {
        write!(s, ", \"{}\" {}", f.name, sql_type(d, f.ty)).expect("write to string");
    }
    s.push(')');
    if d == Dialect::Sqlite {
        s.push_str(" WITHOUT ROWID");
    }
    s
}

/// `ALTER TABLE ... ADD COLUMN` for a field missing from an existing table.
pub fn add_column(d: Dialect, kind: &KindMeta, field: usize) -> String {
    let f = &kind.fields[field];
    format!(
        "ALTER TABLE {} ADD COLUMN \"{}\" {}",
        table(kind),
        f.name,
        sql_type(d, f.ty)
    )
}

/// Index DDL for every indexed field: (index name, DDL, kind, field).
pub fn index_ddl(
    schema: &Schema,
) -> Result<Vec<(String, String, &'static str, &'static str)>, StoreError> {
    let mut out = Vec::new();
    for k in schema.kinds() {
        for f in k
            .fields
            .iter()
            .filter(|f| f.indexed && f.ty != FieldType::Json)
        {
            let (prefix, unique) = if f.unique {
                ("ux", "UNIQUE ")
            } else {
                ("ix", "")
            };
            let name = format!("{prefix}_{}_{}", k.name, f.name);
            let ddl = format!(
                "CREATE {unique}INDEX IF NOT EXISTS \"{name}\" ON {} (\"{}\")",
                table(k),
                f.name
            );
            out.push((name, ddl, k.name, f.name));
        }
    }
    Ok(out)
}

/// The columns of a row, in decode order: uuid, version, created, updated, then fields.
pub fn select_columns(d: Dialect, kind: &KindMeta, alias: &str) -> String {
    let mut s = format!(
        "{alias}.\"uuid\", {alias}.\"version\", {alias}.\"created_ms\", {alias}.\"updated_ms\""
    );
    for f in kind.fields {
        match (d, f.ty) {
            (Dialect::Postgres, FieldType::Json) => write!(s, ", {alias}.\"{}\"::text", f.name),
            _ => write!(s, ", {alias}.\"{}\"", f.name),
        }
        .expect("write to string");
    }
    s
}

/// Translate a LIKE pattern (with `\` escapes) to SQLite GLOB, which is case-sensitive.
pub fn like_to_glob(p: &str) -> String {
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

fn push_cond(sql: &mut Sql, c: &ResolvedCond, kind: &KindMeta, depth: usize) {
    let alias = format!("t{depth}");
    if depth == c.hops.len() {
        push_op(sql, &column(&alias, kind, c.field), c.ty, &c.op);
        return;
    }
    let h: &Hop = &c.hops[depth];
    let next = format!("t{}", depth + 1);
    sql.push(&format!(
        "EXISTS (SELECT 1 FROM {} {next} WHERE {} = {} AND ",
        table(h.to),
        column(&next, h.to, h.remote),
        column(&alias, h.from, h.local),
    ));
    push_cond(sql, c, h.to, depth + 1);
    sql.push(")");
}

fn push_op(sql: &mut Sql, expr: &str, ty: FieldType, op: &Op) {
    let d = sql.dialect;
    let bin = |sql: &mut Sql, o: &str, v: &Value| {
        sql.push(&format!("{expr} {o} ")).param(Param::of(ty, v));
    };
    let list = |sql: &mut Sql, not: &str, vs: &[Value]| {
        sql.push(&format!("{expr} {not}IN ("));
        for (i, v) in vs.iter().enumerate() {
            if i > 0 {
                sql.push(", ");
            }
            sql.param(Param::of(ty, v));
        }
        sql.push(")");
    };
    let like = |sql: &mut Sql, not: bool, p: &str| {
        let n = if not { "NOT " } else { "" };
        match d {
            Dialect::Sqlite => sql
                .push(&format!("{n}({expr} GLOB "))
                .param(Param::Text(like_to_glob(p)))
                .push(")"),
            Dialect::Postgres => sql
                .push(&format!("{n}({expr} LIKE "))
                .param(Param::Text(p.to_string()))
                .push(")"),
        };
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

/// `SELECT` (or `SELECT COUNT(*)`) for a resolved query.
pub fn select(d: Dialect, q: &ResolvedQuery, count: bool) -> Sql {
    let mut sql = Sql::new(d);
    if count {
        sql.push("SELECT COUNT(*)");
    } else {
        sql.push("SELECT ").push(&select_columns(d, q.kind, "t0"));
    }
    sql.push(&format!(" FROM {} t0", table(q.kind)));
    for (i, c) in q.conds.iter().enumerate() {
        sql.push(if i == 0 { " WHERE " } else { " AND " });
        push_cond(&mut sql, c, q.kind, 0);
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
        sql.push(&format!("{} {dir}, ", column("t0", q.kind, s.field)));
    }
    sql.push("t0.\"uuid\" ASC");
    match (q.limit, d) {
        (Some(l), _) => {
            sql.push(&format!(" LIMIT {l}"));
        }
        (None, Dialect::Sqlite) if q.offset > 0 => {
            sql.push(" LIMIT -1");
        }
        _ => {}
    }
    if q.offset > 0 {
        sql.push(&format!(" OFFSET {}", q.offset));
    }
    sql
}

/// One row by uuid, locked for the transaction on PostgreSQL (SQLite has a single writer).
pub fn select_for_update(d: Dialect, kind: &KindMeta, uuid: &str) -> Sql {
    let mut sql = Sql::new(d);
    sql.push(&format!(
        "SELECT {} FROM {} t0 WHERE t0.\"uuid\" = ",
        select_columns(d, kind, "t0"),
        table(kind)
    ))
    .param(Param::Text(uuid.to_string()));
    if d == Dialect::Postgres {
        sql.push(" FOR UPDATE");
    }
    sql
}

/// A multi-row `INSERT` of records of one kind (version 1), or an upsert of one record.
pub fn insert(d: Dialect, recs: &[Record], now: i64, upsert: bool) -> Sql {
    let kind = recs[0].kind;
    let mut sql = Sql::new(d);
    sql.push(&format!(
        "INSERT INTO {} (\"uuid\", \"version\", \"created_ms\", \"updated_ms\"",
        table(kind)
    ));
    for f in kind.fields {
        sql.push(&format!(", \"{}\"", f.name));
    }
    sql.push(") VALUES ");
    for (i, r) in recs.iter().enumerate() {
        sql.push(if i == 0 { "(" } else { ", (" })
            .param(Param::Text(r.uuid.to_string()))
            .push(", 1, ")
            .param(Param::Int(now))
            .push(", ")
            .param(Param::Int(now));
        for (f, v) in kind.fields.iter().zip(&r.values) {
            sql.push(", ").column_param(f.ty, v);
        }
        sql.push(")");
    }
    if upsert {
        let t = table(kind);
        sql.push(&format!(
            " ON CONFLICT (\"uuid\") DO UPDATE SET \"version\" = {t}.\"version\" + 1, \"updated_ms\" = excluded.\"updated_ms\""
        ));
        for f in kind.fields {
            sql.push(&format!(", \"{0}\" = excluded.\"{0}\"", f.name));
        }
        sql.push(" RETURNING \"version\"");
    }
    sql
}

/// `UPDATE` of the given fields of a row, guarded by its current version.
pub fn update(d: Dialect, new: &Record, fields: &[usize], old_version: u64) -> Sql {
    let kind = new.kind;
    let mut sql = Sql::new(d);
    sql.push(&format!("UPDATE {} SET \"version\" = ", table(kind)))
        .param(Param::Int(new.version as i64))
        .push(", \"updated_ms\" = ")
        .param(Param::Int(new.updated_ms));
    for &i in fields {
        let f = &kind.fields[i];
        sql.push(&format!(", \"{}\" = ", f.name))
            .column_param(f.ty, &new.values[i]);
    }
    sql.push(" WHERE \"uuid\" = ")
        .param(Param::Text(new.uuid.to_string()))
        .push(" AND \"version\" = ")
        .param(Param::Int(old_version as i64));
    sql
}

pub fn delete(d: Dialect, kind: &KindMeta, uuid: &str) -> Sql {
    let mut sql = Sql::new(d);
    sql.push(&format!("DELETE FROM {} WHERE \"uuid\" = ", table(kind)))
        .param(Param::Text(uuid.to_string()));
    sql
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::like_match;

    #[test]
    fn glob_translation_keeps_like_semantics() {
        for (pat, text) in [
            ("a%", "abc"),
            ("a_c", "abc"),
            ("50\\%", "50%"),
            ("x*y", "x*y"),
            ("[a]", "[a]"),
        ] {
            assert!(like_match(pat, text), "{pat} {text}");
        }
        assert_eq!(like_to_glob("a%b_c"), "a*b?c");
        assert_eq!(like_to_glob("x*y?[z"), "x[*]y[?][[]z");
        assert_eq!(like_to_glob("50\\%"), "50%");
    }

    #[test]
    fn identifiers_are_checked() {
        assert!(check_ident("vm_nic").is_ok());
        assert!(check_ident("bad'name").is_err());
        assert!(check_ident("Bad").is_err());
        assert!(check_ident("1x").is_err());
        assert!(check_ident("").is_err());
    }
}
