//! Field types and values, and the conversions between Rust types and stored values.

use super::StoreError;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::cmp::Ordering;
use std::sync::Arc;
use uuid::Uuid;

/// The type of a stored field. Every backend stores and compares each type the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    Bool,
    Int,
    Float,
    Text,
    Uuid,
    /// Milliseconds since the Unix epoch.
    Time,
    /// Arbitrary JSON; only `is-null` / `not-null` can be queried.
    Json,
}

impl FieldType {
    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::Bool => "bool",
            FieldType::Int => "int",
            FieldType::Float => "float",
            FieldType::Text => "text",
            FieldType::Uuid => "uuid",
            FieldType::Time => "time",
            FieldType::Json => "json",
        }
    }
    /// Whether values of this type can be ordered and compared with `< <= > >=`.
    pub fn is_ordered(self) -> bool {
        !matches!(self, FieldType::Json)
    }
}

/// A stored value. `Null` is the absence of a value in a nullable field.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    Uuid(Uuid),
    Time(i64),
    Json(JsonText),
}

/// JSON as its text, checked when made. Shared: journals rewrite a workflow's context at every
/// step, and rows are copied on every read and write of the in-memory store. It was a
/// `serde_json::Value` tree: building the tree of a workflow's context at every journal step,
/// and dropping the one it replaced, allocated a string and a map node per field (a VM create's
/// context has sixteen), where the text is one allocation; a job's result was copied as a tree
/// at every read of the job and serialized again for every answer, where the text goes out as
/// it is.
#[derive(Clone)]
pub struct JsonText(Arc<RawValue>);

impl JsonText {
    /// The JSON of `v` (`null` if `v` cannot be serialized, as a map with non-text keys).
    pub fn of<T: Serialize + ?Sized>(v: &T) -> JsonText {
        JsonText(Arc::from(
            serde_json::value::to_raw_value(v)
                .unwrap_or_else(|_| RawValue::from_string("null".into()).expect("null is JSON")),
        ))
    }

    /// `s` if it is JSON that decodes. It is decoded once to find out: serde_json's raw values
    /// take text nested deeper than its decoder does (127 levels), and such text is refused
    /// here rather than read as `null` later.
    pub fn parse(s: String) -> Result<JsonText, serde_json::Error> {
        serde_json::from_str::<serde_json::Value>(&s)?;
        RawValue::from_string(s).map(|r| JsonText(Arc::from(r)))
    }

    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The JSON as a tree.
    pub fn to_value(&self) -> serde_json::Value {
        self.decode().unwrap_or(serde_json::Value::Null)
    }

    /// Decode the JSON into `T`.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.as_str())
    }
}

/// The same JSON, whatever its spacing and key order (PostgreSQL's `jsonb` gives back its own
/// form of what it was given): equal text first, the trees only when the texts differ.
impl PartialEq for JsonText {
    fn eq(&self, o: &Self) -> bool {
        self.as_str() == o.as_str() || self.to_value() == o.to_value()
    }
}

impl std::fmt::Debug for JsonText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for JsonText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Written as the JSON itself (not as a string holding it).
impl Serialize for JsonText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for JsonText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Box::<RawValue>::deserialize(d).map(|r| JsonText(Arc::from(r)))
    }
}

impl Value {
    /// The JSON of `v` (see [`JsonText::of`]).
    pub fn json<T: Serialize + ?Sized>(v: &T) -> Value {
        Value::Json(JsonText::of(v))
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Text(_) => "text",
            Value::Uuid(_) => "uuid",
            Value::Time(_) => "time",
            Value::Json(_) => "json",
        }
    }

    pub fn matches_type(&self, ty: FieldType) -> bool {
        matches!(
            (self, ty),
            (Value::Null, _)
                | (Value::Bool(_), FieldType::Bool)
                | (Value::Int(_), FieldType::Int)
                | (Value::Float(_), FieldType::Float)
                | (Value::Text(_), FieldType::Text)
                | (Value::Uuid(_), FieldType::Uuid)
                | (Value::Time(_), FieldType::Time)
                | (Value::Json(_), FieldType::Json)
        )
    }

    /// Convert a value given by a caller (often text from a query string) to `ty`.
    /// Returns `None` when the value cannot represent a `ty`.
    pub fn coerce(self, ty: FieldType) -> Option<Value> {
        if self.matches_type(ty) {
            if let Value::Float(f) = self {
                return f.is_finite().then_some(Value::Float(f));
            }
            return Some(self);
        }
        match (self, ty) {
            (Value::Int(i), FieldType::Float) => Some(Value::Float(i as f64)),
            (Value::Int(i), FieldType::Time) => Some(Value::Time(i)),
            (Value::Time(t), FieldType::Int) => Some(Value::Int(t)),
            (Value::Text(s), FieldType::Bool) => match s.as_str() {
                "true" => Some(Value::Bool(true)),
                "false" => Some(Value::Bool(false)),
                _ => None,
            },
            (Value::Text(s), FieldType::Int) => s.trim().parse().ok().map(Value::Int),
            (Value::Text(s), FieldType::Time) => s.trim().parse().ok().map(Value::Time),
            (Value::Text(s), FieldType::Float) => s
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .map(Value::Float),
            (Value::Text(s), FieldType::Uuid) => Uuid::parse_str(s.trim()).ok().map(Value::Uuid),
            (Value::Uuid(u), FieldType::Text) => Some(Value::Text(u.to_string())),
            (Value::Text(s), FieldType::Json) => JsonText::parse(s).ok().map(Value::Json),
            _ => None,
        }
    }

    /// The JSON form used by the SQL backends and the API, as a tree (its `Serialize` writes
    /// the same form straight to text).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    /// Parse the JSON form back, checking it against the field type.
    pub fn from_json(ty: FieldType, j: &serde_json::Value) -> Option<Value> {
        use serde_json::Value as J;
        if j.is_null() {
            return Some(Value::Null);
        }
        Some(match ty {
            FieldType::Bool => match j {
                J::Bool(b) => Value::Bool(*b),
                // SQLite has no boolean; json_set of an expression may store 0/1.
                J::Number(n) => Value::Bool(n.as_i64()? != 0),
                _ => return None,
            },
            FieldType::Int => Value::Int(j.as_i64()?),
            FieldType::Time => Value::Time(j.as_i64()?),
            FieldType::Float => Value::Float(j.as_f64()?),
            FieldType::Text => Value::Text(j.as_str()?.to_string()),
            FieldType::Uuid => Value::Uuid(Uuid::parse_str(j.as_str()?).ok()?),
            FieldType::Json => Value::json(j),
        })
    }

    /// Order two values of the same field type; `Null` sorts first. `None` when the two cannot be
    /// compared (different types or JSON).
    pub fn compare(&self, other: &Value) -> Option<Ordering> {
        match (self, other) {
            (Value::Null, Value::Null) => Some(Ordering::Equal),
            (Value::Null, _) => Some(Ordering::Less),
            (_, Value::Null) => Some(Ordering::Greater),
            (Value::Bool(a), Value::Bool(b)) => Some(a.cmp(b)),
            (Value::Int(a), Value::Int(b)) | (Value::Time(a), Value::Time(b)) => Some(a.cmp(b)),
            (Value::Float(a), Value::Float(b)) => Some(a.total_cmp(b)),
            (Value::Text(a), Value::Text(b)) => Some(a.as_bytes().cmp(b.as_bytes())),
            (Value::Uuid(a), Value::Uuid(b)) => Some(a.cmp(b)),
            _ => None,
        }
    }

    pub fn as_uuid(&self) -> Option<Uuid> {
        match self {
            Value::Uuid(u) => Some(*u),
            _ => None,
        }
    }
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) | Value::Time(i) => Some(*i),
            _ => None,
        }
    }
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }
}

/// The JSON form: numbers, text, a uuid as its hyphenated text, JSON as it is, and `null` for
/// null and for floats JSON cannot hold (infinities, NaN).
impl Serialize for Value {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) | Value::Time(i) => s.serialize_i64(*i),
            Value::Float(f) if f.is_finite() => s.serialize_f64(*f),
            Value::Float(_) => s.serialize_unit(),
            Value::Text(t) => s.serialize_str(t),
            Value::Uuid(u) => {
                s.serialize_str(u.hyphenated().encode_lower(&mut Uuid::encode_buffer()))
            }
            Value::Json(j) => j.serialize(s),
        }
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Text(s) => f.write_str(s),
            other => write!(f, "{}", other.to_json()),
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Text(s.to_string())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Text(s)
    }
}
impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}
impl From<f64> for Value {
    fn from(f: f64) -> Self {
        Value::Float(f)
    }
}
impl From<Uuid> for Value {
    fn from(u: Uuid) -> Self {
        Value::Uuid(u)
    }
}

/// A Rust type that can be a stored field.
pub trait FieldValue: Sized {
    const TYPE: FieldType;
    const NULLABLE: bool = false;
    fn to_value(&self) -> Value;
    fn from_value(v: &Value) -> Option<Self>;
}

macro_rules! scalar_field {
    ($t:ty, $ft:ident, $variant:ident, |$x:ident| $to:expr, |$y:ident| $from:expr) => {
        impl FieldValue for $t {
            const TYPE: FieldType = FieldType::$ft;
            fn to_value(&self) -> Value {
                let $x = self;
                Value::$variant($to)
            }
            fn from_value(v: &Value) -> Option<Self> {
                match v {
                    Value::$variant($y) => $from,
                    _ => None,
                }
            }
        }
    };
}

scalar_field!(bool, Bool, Bool, |x| *x, |y| Some(*y));
scalar_field!(i64, Int, Int, |x| *x, |y| Some(*y));
scalar_field!(u64, Int, Int, |x| *x as i64, |y| u64::try_from(*y).ok());
scalar_field!(i32, Int, Int, |x| i64::from(*x), |y| i32::try_from(*y).ok());
scalar_field!(u32, Int, Int, |x| i64::from(*x), |y| u32::try_from(*y).ok());
scalar_field!(u16, Int, Int, |x| i64::from(*x), |y| u16::try_from(*y).ok());
scalar_field!(f64, Float, Float, |x| *x, |y| Some(*y));
scalar_field!(String, Text, Text, |x| x.clone(), |y| Some(y.clone()));
scalar_field!(Uuid, Uuid, Uuid, |x| *x, |y| Some(*y));
scalar_field!(JsonText, Json, Json, |x| x.clone(), |y| Some(y.clone()));

/// A point in time, in milliseconds since the Unix epoch.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Millis(pub i64);

scalar_field!(Millis, Time, Time, |x| x.0, |y| Some(Millis(*y)));

impl<T: FieldValue> FieldValue for Option<T> {
    const TYPE: FieldType = T::TYPE;
    const NULLABLE: bool = true;
    fn to_value(&self) -> Value {
        match self {
            Some(v) => v.to_value(),
            None => Value::Null,
        }
    }
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Null => Some(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// Any serde type stored as a JSON field (lists, small structs).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Json<T>(pub T);

impl<T: Serialize + serde::de::DeserializeOwned> FieldValue for Json<T> {
    const TYPE: FieldType = FieldType::Json;
    fn to_value(&self) -> Value {
        Value::json(&self.0)
    }
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Json(j) => j.decode().ok().map(Json),
            _ => None,
        }
    }
}

/// Read field `field` of kind `kind` from `v`, with a clear error when the stored value does not
/// fit the Rust type.
pub fn decode_field<T: FieldValue>(kind: &str, field: &str, v: &Value) -> Result<T, StoreError> {
    T::from_value(v).ok_or_else(|| {
        StoreError::Corrupt(format!(
            "{kind}.{field}: stored {} does not fit {}",
            v.type_name(),
            std::any::type_name::<T>()
        ))
    })
}

/// A text that names no variant of a [`text_enum!`] enum; the message lists the valid ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UnknownVariant(pub String);

/// Declare an enum stored as a text field (resource states and the like). Generates
/// `as_str`, `Display`, `FromStr`, serde (as the same strings) and `FieldValue`.
#[macro_export]
macro_rules! text_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident { $( $(#[$vmeta:meta])* $variant:ident = $text:literal ),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        $vis enum $name { $( $(#[$vmeta])* $variant ),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[ $( $name::$variant ),+ ];
            pub fn as_str(self) -> &'static str {
                match self { $( $name::$variant => $text ),+ }
            }
        }
        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl ::std::str::FromStr for $name {
            type Err = $crate::UnknownVariant;
            fn from_str(s: &str) -> ::std::result::Result<Self, Self::Err> {
                match s {
                    $( $text => Ok($name::$variant), )+
                    _ => Err($crate::UnknownVariant(format!(
                        "{:?} is not a valid {}; expected one of: {}",
                        s, stringify!($name), [$($text),+].join(", ")
                    ))),
                }
            }
        }
        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> ::std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> ::std::result::Result<Self, D::Error> {
                let s = <::std::string::String as ::serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(|e: $crate::UnknownVariant| <D::Error as ::serde::de::Error>::custom(e.0))
            }
        }
        impl $crate::schemars::JsonSchema for $name {
            fn schema_name() -> ::std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut $crate::schemars::SchemaGenerator) -> $crate::schemars::Schema {
                $crate::schemars::json_schema!({"type": "string", "enum": [$($text),+]})
            }
        }
        impl $crate::FieldValue for $name {
            const TYPE: $crate::FieldType = $crate::FieldType::Text;
            fn to_value(&self) -> $crate::Value {
                $crate::Value::Text(self.as_str().to_string())
            }
            fn from_value(v: &$crate::Value) -> Option<Self> {
                match v {
                    $crate::Value::Text(s) => s.parse().ok(),
                    _ => None,
                }
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coerce_parses_text_into_each_type() {
        let u = Uuid::from_u128(42);
        assert_eq!(
            Value::from("12").coerce(FieldType::Int),
            Some(Value::Int(12))
        );
        assert_eq!(
            Value::from("1.5").coerce(FieldType::Float),
            Some(Value::Float(1.5))
        );
        assert_eq!(
            Value::from("true").coerce(FieldType::Bool),
            Some(Value::Bool(true))
        );
        assert_eq!(
            Value::Text(u.to_string()).coerce(FieldType::Uuid),
            Some(Value::Uuid(u))
        );
        assert_eq!(Value::from("x").coerce(FieldType::Int), None);
        assert_eq!(Value::Float(f64::NAN).coerce(FieldType::Float), None);
        assert_eq!(
            Value::Int(3).coerce(FieldType::Float),
            Some(Value::Float(3.0))
        );
    }

    #[test]
    fn json_form_round_trips_every_type() {
        let cases = [
            (FieldType::Bool, Value::Bool(true)),
            (FieldType::Int, Value::Int(-9_007_199_254_740_993)),
            (FieldType::Float, Value::Float(0.1 + 0.2)),
            (FieldType::Text, Value::from("héllo \"q\"")),
            (FieldType::Uuid, Value::Uuid(Uuid::from_u128(7))),
            (FieldType::Time, Value::Time(1_700_000_000_123)),
            (
                FieldType::Json,
                Value::json(&serde_json::json!({"a": [1, 2]})),
            ),
            (FieldType::Text, Value::Null),
        ];
        for (ty, v) in cases {
            assert_eq!(Value::from_json(ty, &v.to_json()), Some(v));
        }
    }

    #[test]
    fn json_text_is_the_same_json_whatever_its_spacing_and_key_order() {
        let ours = JsonText::of(&serde_json::json!({"b": [1, 2], "a": "x"}));
        let theirs = JsonText::parse(r#"{ "a": "x",  "b": [1,2] }"#.into()).expect("JSON");
        assert_eq!(ours, theirs);
        assert_ne!(
            ours,
            JsonText::of(&serde_json::json!({"a": "x", "b": [2, 1]}))
        );
        assert_eq!(
            theirs.to_value(),
            serde_json::json!({"a": "x", "b": [1, 2]})
        );
        assert!(JsonText::parse("{\"a\": ".into()).is_err(), "not JSON");
        // serde_json decodes at most 127 levels of nesting (its recursion limit is 128 calls
        // deep). The hand-written depth count this replaces let 128 through, which would have
        // read as `null` later.
        const MAX_NESTING: usize = 127;
        let nested = |n| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(JsonText::parse(nested(MAX_NESTING)).is_ok());
        let deep = nested(MAX_NESTING + 1);
        assert!(serde_json::from_str::<serde_json::Value>(&deep).is_err());
        assert!(
            JsonText::parse(deep).is_err(),
            "deeper than serde_json decodes: refused, not read as null later"
        );
        assert_eq!(
            Value::from("[1").coerce(FieldType::Json),
            None,
            "text that is not JSON is no JSON value"
        );
    }

    #[test]
    fn json_text_is_written_as_the_json_itself() {
        #[derive(Serialize)]
        struct View {
            result: JsonText,
        }
        let v = View {
            result: JsonText::of(&serde_json::json!({"vm": {"state": "Running"}})),
        };
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            r#"{"result":{"vm":{"state":"Running"}}}"#
        );
        // Read back from an answer's bytes and from a tree, as a client does.
        #[derive(Deserialize)]
        struct Back {
            result: JsonText,
        }
        let text = serde_json::to_string(&v).unwrap();
        let back: Back = serde_json::from_str(&text).unwrap();
        assert_eq!(back.result, v.result);
        let tree: serde_json::Value = serde_json::from_str(&text).unwrap();
        let back: Back = serde_json::from_value(tree).unwrap();
        assert_eq!(back.result, v.result);
        // A map serde_json cannot write (its keys are not text) becomes `null`, not a panic.
        let odd: std::collections::BTreeMap<(i32, i32), i32> = [((1, 2), 3)].into();
        assert_eq!(JsonText::of(&odd).as_str(), "null");
    }

    #[test]
    fn null_sorts_first_and_types_do_not_mix() {
        assert_eq!(Value::Null.compare(&Value::Int(0)), Some(Ordering::Less));
        assert_eq!(Value::Int(1).compare(&Value::Text("1".into())), None);
        assert_eq!(
            Value::from("B").compare(&Value::from("a")),
            Some(Ordering::Less)
        );
    }
}
