//! Queries: conditions over a kind's fields and its related kinds' fields, sort, paging.
//!
//! A [`Query`] names fields by path (`name`, `host.name`, `nics.ip`); [`resolve`] checks it
//! against the schema and coerces the values once, so every backend answers the same query with
//! the same error or the same rows.
//!
//! Semantics shared by all backends:
//! - A condition on a related path (`nics.ip = 10.0.0.5`) holds when *some* related row
//!   satisfies it.
//! - Comparisons with a null field are false (as in SQL); use `is-null` / `not-null`.
//! - `like` is case-sensitive; `%` matches any run of characters, `_` one character, `\` escapes.
//! - Text orders byte-wise; null sorts before every value; ties are broken by `uuid`, so paging
//!   over a stable data set neither repeats nor skips a row.

use super::meta::{FieldRef, KindMeta, Relation, Schema};
use super::value::{FieldType, Value};
use super::{Resource, StoreError};
use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Eq(Value),
    Ne(Value),
    Gt(Value),
    Ge(Value),
    Lt(Value),
    Le(Value),
    In(Vec<Value>),
    NotIn(Vec<Value>),
    Like(String),
    NotLike(String),
    IsNull,
    NotNull,
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Eq(_) => "=",
            Op::Ne(_) => "!=",
            Op::Gt(_) => ">",
            Op::Ge(_) => ">=",
            Op::Lt(_) => "<",
            Op::Le(_) => "<=",
            Op::In(_) => "in",
            Op::NotIn(_) => "not-in",
            Op::Like(_) => "like",
            Op::NotLike(_) => "not-like",
            Op::IsNull => "is-null",
            Op::NotNull => "not-null",
        }
    }
}

/// One condition: a field path and an operator with its operand(s).
#[derive(Debug, Clone, PartialEq)]
pub struct Cond {
    pub path: String,
    pub op: Op,
}

impl Cond {
    pub fn new(path: impl Into<String>, op: Op) -> Self {
        Cond {
            path: path.into(),
            op,
        }
    }

    /// Parse the text form used by the REST API and CLI:
    /// `f=v`, `f!=v`, `f>v`, `f>=v`, `f<v`, `f<=v`, `f?=a,b` (in), `f!?=a,b` (not in),
    /// `f~=pat` (like), `f!~=pat` (not like), `f=null` (is null), `f!=null` (not null).
    pub fn parse(text: &str) -> Result<Cond, StoreError> {
        const OPS: [&str; 9] = ["!?=", "!~=", "?=", "~=", "!=", ">=", "<=", ">", "<"];
        let bad = || {
            StoreError::InvalidQuery(format!(
                "cannot parse condition {text:?}; expected FIELD OP VALUE with OP one of = != > >= < <= ?= !?= ~= !~="
            ))
        };
        let (path, op, value) = OPS
            .iter()
            .filter_map(|op| text.find(op).map(|i| (i, *op)))
            .chain(text.find('=').map(|i| (i, "=")))
            .min_by_key(|(i, op)| (*i, std::cmp::Reverse(op.len())))
            .map(|(i, op)| (&text[..i], op, &text[i + op.len()..]))
            .ok_or_else(bad)?;
        let path = path.trim();
        if path.is_empty() {
            return Err(bad());
        }
        let v = || Value::Text(value.to_string());
        let list = || {
            value
                .split(',')
                .map(|s| Value::Text(s.to_string()))
                .collect()
        };
        let op = match op {
            "=" if value == "null" => Op::IsNull,
            "!=" if value == "null" => Op::NotNull,
            "=" => Op::Eq(v()),
            "!=" => Op::Ne(v()),
            ">" => Op::Gt(v()),
            ">=" => Op::Ge(v()),
            "<" => Op::Lt(v()),
            "<=" => Op::Le(v()),
            "?=" => Op::In(list()),
            "!?=" => Op::NotIn(list()),
            "~=" => Op::Like(value.to_string()),
            "!~=" => Op::NotLike(value.to_string()),
            _ => return Err(bad()),
        };
        Ok(Cond::new(path, op))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sort {
    pub field: String,
    pub desc: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub kind: String,
    pub conds: Vec<Cond>,
    pub sort: Vec<Sort>,
    pub limit: Option<u64>,
    pub offset: u64,
}

impl Query {
    pub fn new(kind: impl Into<String>) -> Self {
        Query {
            kind: kind.into(),
            conds: Vec::new(),
            sort: Vec::new(),
            limit: None,
            offset: 0,
        }
    }

    pub fn of<T: Resource>() -> Self {
        Query::new(T::META.name)
    }

    pub fn cond(mut self, c: Cond) -> Self {
        self.conds.push(c);
        self
    }
    fn op(self, path: &str, op: Op) -> Self {
        self.cond(Cond::new(path, op))
    }
    pub fn eq(self, path: &str, v: impl Into<Value>) -> Self {
        self.op(path, Op::Eq(v.into()))
    }
    pub fn ne(self, path: &str, v: impl Into<Value>) -> Self {
        self.op(path, Op::Ne(v.into()))
    }
    pub fn gt(self, path: &str, v: impl Into<Value>) -> Self {
        self.op(path, Op::Gt(v.into()))
    }
    pub fn ge(self, path: &str, v: impl Into<Value>) -> Self {
        self.op(path, Op::Ge(v.into()))
    }
    pub fn lt(self, path: &str, v: impl Into<Value>) -> Self {
        self.op(path, Op::Lt(v.into()))
    }
    pub fn le(self, path: &str, v: impl Into<Value>) -> Self {
        self.op(path, Op::Le(v.into()))
    }
    pub fn is_in<V: Into<Value>>(self, path: &str, vs: impl IntoIterator<Item = V>) -> Self {
        self.op(path, Op::In(vs.into_iter().map(Into::into).collect()))
    }
    pub fn not_in<V: Into<Value>>(self, path: &str, vs: impl IntoIterator<Item = V>) -> Self {
        self.op(path, Op::NotIn(vs.into_iter().map(Into::into).collect()))
    }
    pub fn like(self, path: &str, pattern: &str) -> Self {
        self.op(path, Op::Like(pattern.to_string()))
    }
    pub fn not_like(self, path: &str, pattern: &str) -> Self {
        self.op(path, Op::NotLike(pattern.to_string()))
    }
    pub fn is_null(self, path: &str) -> Self {
        self.op(path, Op::IsNull)
    }
    pub fn not_null(self, path: &str) -> Self {
        self.op(path, Op::NotNull)
    }
    pub fn sort_asc(mut self, field: &str) -> Self {
        self.sort.push(Sort {
            field: field.to_string(),
            desc: false,
        });
        self
    }
    pub fn sort_desc(mut self, field: &str) -> Self {
        self.sort.push(Sort {
            field: field.to_string(),
            desc: true,
        });
        self
    }
    pub fn limit(mut self, n: u64) -> Self {
        self.limit = Some(n);
        self
    }
    pub fn offset(mut self, n: u64) -> Self {
        self.offset = n;
        self
    }
}

impl fmt::Display for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        for c in &self.conds {
            write!(f, " {} {}", c.path, c.op.name())?;
        }
        Ok(())
    }
}

/// One step of a related path: the relation and the kinds on both ends.
#[derive(Debug, Clone, Copy)]
pub struct Hop {
    pub rel: &'static Relation,
    pub from: &'static KindMeta,
    pub to: &'static KindMeta,
    pub local: FieldRef,
    pub remote: FieldRef,
}

/// A condition checked against the schema, with operands coerced to the field's type.
#[derive(Debug, Clone)]
pub struct ResolvedCond {
    pub hops: Vec<Hop>,
    /// The kind that holds the field (the last hop's target, or the queried kind).
    pub kind: &'static KindMeta,
    pub field: FieldRef,
    pub field_name: String,
    pub ty: FieldType,
    pub op: Op,
}

#[derive(Debug, Clone)]
pub struct ResolvedSort {
    pub field: FieldRef,
    pub field_name: String,
    pub ty: FieldType,
    pub desc: bool,
}

#[derive(Debug, Clone)]
pub struct ResolvedQuery {
    pub kind: &'static KindMeta,
    pub conds: Vec<ResolvedCond>,
    pub sort: Vec<ResolvedSort>,
    pub limit: Option<u64>,
    pub offset: u64,
}

fn unknown_field(kind: &KindMeta, name: &str) -> StoreError {
    let relations: Vec<_> = kind.relations.iter().map(|r| r.name).collect();
    StoreError::InvalidQuery(format!(
        "{} has no field {:?}; fields: {}; relations: {}",
        kind.name,
        name,
        kind.field_names().join(", "),
        if relations.is_empty() {
            "none".to_string()
        } else {
            relations.join(", ")
        }
    ))
}

/// Resolve a relation from `from` into a hop.
pub fn hop(
    schema: &Schema,
    from: &'static KindMeta,
    rel: &'static Relation,
) -> Result<Hop, StoreError> {
    let to = schema.kind(rel.target)?;
    let local = from
        .resolve_field(rel.local)
        .ok_or_else(|| unknown_field(from, rel.local))?
        .0;
    let remote = to
        .resolve_field(rel.remote)
        .ok_or_else(|| unknown_field(to, rel.remote))?
        .0;
    Ok(Hop {
        rel,
        from,
        to,
        local,
        remote,
    })
}

fn coerce(v: &Value, kind: &KindMeta, field: &str, ty: FieldType) -> Result<Value, StoreError> {
    if v.is_null() {
        return Err(StoreError::InvalidQuery(format!(
            "{}.{}: compare with null using is-null / not-null",
            kind.name, field
        )));
    }
    // The value's text is made only for the refusal.
    v.clone().coerce(ty).ok_or_else(|| {
        StoreError::InvalidQuery(format!(
            "{}.{} is {}; {:?} is not a valid {}",
            kind.name,
            field,
            ty.as_str(),
            v.to_string(),
            ty.as_str()
        ))
    })
}

/// Resolve one condition against `root`.
pub fn resolve_cond(
    schema: &Schema,
    root: &'static KindMeta,
    c: &Cond,
) -> Result<ResolvedCond, StoreError> {
    let mut kind = root;
    let mut hops = Vec::new();
    let parts: Vec<&str> = c.path.split('.').collect();
    for part in &parts[..parts.len() - 1] {
        let rel = kind
            .relation(part)
            .ok_or_else(|| unknown_field(kind, part))?;
        let h = hop(schema, kind, rel)?;
        kind = h.to;
        hops.push(h);
    }
    let last = parts[parts.len() - 1];
    let (field, ty) = kind
        .resolve_field(last)
        .ok_or_else(|| unknown_field(kind, last))?;
    let refuse = |why: &str| {
        Err(StoreError::InvalidQuery(format!(
            "{}.{} ({}): operator {} {}",
            kind.name,
            last,
            ty.as_str(),
            c.op.name(),
            why
        )))
    };
    let one = |v: &Value| coerce(v, kind, last, ty);
    let op = match &c.op {
        Op::IsNull | Op::NotNull => c.op.clone(),
        _ if ty == FieldType::Json => return refuse("is not supported on json fields"),
        Op::Like(p) | Op::NotLike(p) => {
            if ty != FieldType::Text {
                return refuse("works on text fields only");
            }
            if matches!(c.op, Op::Like(_)) {
                Op::Like(p.clone())
            } else {
                Op::NotLike(p.clone())
            }
        }
        Op::Eq(v) => Op::Eq(one(v)?),
        Op::Ne(v) => Op::Ne(one(v)?),
        Op::Gt(v) => Op::Gt(one(v)?),
        Op::Ge(v) => Op::Ge(one(v)?),
        Op::Lt(v) => Op::Lt(one(v)?),
        Op::Le(v) => Op::Le(one(v)?),
        Op::In(vs) | Op::NotIn(vs) => {
            if vs.is_empty() {
                return refuse("needs at least one value");
            }
            let vs = vs.iter().map(one).collect::<Result<Vec<_>, _>>()?;
            if matches!(c.op, Op::In(_)) {
                Op::In(vs)
            } else {
                Op::NotIn(vs)
            }
        }
    };
    Ok(ResolvedCond {
        hops,
        kind,
        field,
        field_name: last.to_string(),
        ty,
        op,
    })
}

/// Check a query against the schema.
pub fn resolve(schema: &Schema, q: &Query) -> Result<ResolvedQuery, StoreError> {
    let kind = schema.kind(&q.kind)?;
    let conds = q
        .conds
        .iter()
        .map(|c| resolve_cond(schema, kind, c))
        .collect::<Result<Vec<_>, _>>()?;
    let sort = q
        .sort
        .iter()
        .map(|s| {
            let (field, ty) = kind
                .resolve_field(&s.field)
                .ok_or_else(|| unknown_field(kind, &s.field))?;
            if !ty.is_ordered() {
                return Err(StoreError::InvalidQuery(format!(
                    "{}.{} is json and cannot be sorted",
                    kind.name, s.field
                )));
            }
            Ok(ResolvedSort {
                field,
                field_name: s.field.clone(),
                ty,
                desc: s.desc,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ResolvedQuery {
        kind,
        conds,
        sort,
        limit: q.limit,
        offset: q.offset,
    })
}

/// Evaluate an operator on a field value (the reference semantics; SQL backends translate it).
pub fn op_holds(op: &Op, v: &Value) -> bool {
    use std::cmp::Ordering::*;
    match op {
        Op::IsNull => v.is_null(),
        Op::NotNull => !v.is_null(),
        _ if v.is_null() => false,
        Op::Eq(x) => v.compare(x) == Some(Equal),
        Op::Ne(x) => matches!(v.compare(x), Some(Less | Greater)),
        Op::Gt(x) => v.compare(x) == Some(Greater),
        Op::Ge(x) => matches!(v.compare(x), Some(Greater | Equal)),
        Op::Lt(x) => v.compare(x) == Some(Less),
        Op::Le(x) => matches!(v.compare(x), Some(Less | Equal)),
        Op::In(xs) => xs.iter().any(|x| v.compare(x) == Some(Equal)),
        Op::NotIn(xs) => xs
            .iter()
            .all(|x| matches!(v.compare(x), Some(Less | Greater))),
        Op::Like(p) => v.as_text().is_some_and(|t| like_match(p, t)),
        Op::NotLike(p) => v.as_text().is_some_and(|t| !like_match(p, t)),
    }
}

/// SQL `LIKE` with `\` as the escape character, case-sensitive.
pub fn like_match(pattern: &str, text: &str) -> bool {
    #[derive(Clone, Copy, PartialEq)]
    enum Tok {
        Any,
        One,
        Lit(char),
    }
    let mut toks = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        toks.push(match c {
            '%' => Tok::Any,
            '_' => Tok::One,
            '\\' => Tok::Lit(chars.next().unwrap_or('\\')),
            c => Tok::Lit(c),
        });
    }
    let text: Vec<char> = text.chars().collect();
    // Iterative matcher with backtracking to the last `%`.
    let (mut ti, mut pi) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < text.len() {
        match toks.get(pi) {
            Some(Tok::Any) => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(Tok::One) => {
                pi += 1;
                ti += 1;
            }
            Some(Tok::Lit(c)) if *c == text[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    toks[pi..].iter().all(|t| *t == Tok::Any)
}

/// Escape `%`, `_` and `\` so that `s` matches only itself in a `like` pattern.
pub fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_matches_sql_semantics() {
        assert!(like_match("a%", "abc"));
        assert!(like_match("%c", "abc"));
        assert!(like_match("%b%", "abc"));
        assert!(like_match("a_c", "abc"));
        assert!(!like_match("a_c", "abbc"));
        assert!(like_match("%", ""));
        assert!(!like_match("_", ""));
        assert!(!like_match("A%", "abc"), "case-sensitive");
        assert!(like_match("50\\%", "50%"));
        assert!(!like_match("50\\%", "500"));
        assert!(like_match("%a%a%a", "banana a"));
        assert!(like_match("h_llo", "héllo"));
        assert!(like_match(&like_escape("a_b%"), "a_b%"));
        assert!(!like_match(&like_escape("a_b"), "axb"));
    }

    #[test]
    fn parse_reads_every_operator() {
        let p = |s| Cond::parse(s).unwrap();
        assert_eq!(p("name=web").op, Op::Eq("web".into()));
        assert_eq!(p("name!=web").op, Op::Ne("web".into()));
        assert_eq!(p("cpu>=4").op, Op::Ge("4".into()));
        assert_eq!(p("cpu>4").op, Op::Gt("4".into()));
        assert_eq!(p("cpu<=4").op, Op::Le("4".into()));
        assert_eq!(p("cpu<4").op, Op::Lt("4".into()));
        assert_eq!(
            p("state?=Running,Stopped").op,
            Op::In(vec!["Running".into(), "Stopped".into()])
        );
        assert_eq!(p("state!?=Running").op, Op::NotIn(vec!["Running".into()]));
        assert_eq!(p("name~=web%").op, Op::Like("web%".into()));
        assert_eq!(p("name!~=web%").op, Op::NotLike("web%".into()));
        assert_eq!(p("host_uuid=null").op, Op::IsNull);
        assert_eq!(p("host_uuid!=null").op, Op::NotNull);
        assert_eq!(p("nics.ip=10.0.0.5").path, "nics.ip");
        assert_eq!(p("url=a=b").op, Op::Eq("a=b".into()));
        assert!(Cond::parse("novalue").is_err());
        assert!(Cond::parse("=x").is_err());
    }
}
