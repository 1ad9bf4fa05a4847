//! Resource-kind metadata: the one definition per kind that drives storage, queries and the CLI.
//!
//! A kind is declared once with [`resource!`](crate::resource); the macro produces the Rust
//! struct, its [`KindMeta`] (fields, types, indexes, relations) and the conversions. The stores
//! build their indexes from the metadata, the query resolver checks conditions against it, and
//! the API lists and filters by it.

use super::value::{decode_field, FieldType, FieldValue, JsonText, Value};
use super::StoreError;
use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use uuid::Uuid;

/// One declared field of a kind.
#[derive(Debug, Clone, Copy)]
pub struct FieldMeta {
    pub name: &'static str,
    pub ty: FieldType,
    pub nullable: bool,
    /// Keep an index on this field (equality and range lookups, relation joins).
    pub indexed: bool,
    /// No two rows of the kind share a non-null value.
    pub unique: bool,
    /// Shown as a column by the CLI's list view.
    pub column: bool,
    /// Never shown by the API (tokens, passwords).
    pub secret: bool,
    /// Bookkeeping whose change alone is no event (progress, heartbeats, delivery state).
    pub quiet: bool,
}

/// A named path from one kind to related rows of another: the rows of `target` whose field
/// `remote` equals this row's field `local`. `uuid` is allowed on either side, so both
/// many-to-one (`host`: local `host_uuid`, remote `uuid`) and one-to-many (`nics`: local `uuid`,
/// remote `vm_uuid`) relations are expressed the same way.
#[derive(Debug, Clone, Copy)]
pub struct Relation {
    pub name: &'static str,
    pub target: &'static str,
    pub local: &'static str,
    pub remote: &'static str,
}

/// Metadata of one resource kind.
#[derive(Debug)]
pub struct KindMeta {
    pub name: &'static str,
    pub fields: &'static [FieldMeta],
    pub relations: &'static [Relation],
}

/// The fields every row has besides its declared ones.
pub const BUILTIN_FIELDS: [(&str, FieldType); 4] = [
    ("uuid", FieldType::Uuid),
    ("version", FieldType::Int),
    ("created_ms", FieldType::Time),
    ("updated_ms", FieldType::Time),
];

/// A field of a kind, declared or built in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldRef {
    Uuid,
    Version,
    Created,
    Updated,
    Declared(usize),
}

impl KindMeta {
    pub fn field_index(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|f| f.name == name)
    }

    pub fn field(&self, name: &str) -> Option<&'static FieldMeta> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Resolve a field name (declared or built in) to a reference and its type.
    pub fn resolve_field(&self, name: &str) -> Option<(FieldRef, FieldType)> {
        match name {
            "uuid" => Some((FieldRef::Uuid, FieldType::Uuid)),
            "version" => Some((FieldRef::Version, FieldType::Int)),
            "created_ms" => Some((FieldRef::Created, FieldType::Time)),
            "updated_ms" => Some((FieldRef::Updated, FieldType::Time)),
            _ => self
                .field_index(name)
                .map(|i| (FieldRef::Declared(i), self.fields[i].ty)),
        }
    }

    pub fn relation(&self, name: &str) -> Option<&'static Relation> {
        self.relations.iter().find(|r| r.name == name)
    }

    /// Names of all queryable fields (built-in first), for error messages and the CLI.
    pub fn field_names(&self) -> Vec<&'static str> {
        BUILTIN_FIELDS
            .iter()
            .map(|(n, _)| *n)
            .chain(self.fields.iter().map(|f| f.name))
            .collect()
    }

    pub fn columns(&self) -> Vec<&'static str> {
        std::iter::once("uuid")
            .chain(self.fields.iter().filter(|f| f.column).map(|f| f.name))
            .collect()
    }
}

/// All kinds a store knows. Built once at start-up.
#[derive(Debug, Default, Clone)]
pub struct Schema {
    kinds: BTreeMap<&'static str, &'static KindMeta>,
}

impl Schema {
    pub fn new() -> Self {
        Schema::default()
    }

    pub fn with(mut self, meta: &'static KindMeta) -> Self {
        self.add(meta);
        self
    }

    pub fn add(&mut self, meta: &'static KindMeta) {
        self.kinds.insert(meta.name, meta);
    }

    pub fn kind(&self, name: &str) -> Result<&'static KindMeta, StoreError> {
        self.kinds
            .get(name)
            .copied()
            .ok_or_else(|| StoreError::UnknownKind(name.to_string()))
    }

    pub fn kinds(&self) -> impl Iterator<Item = &'static KindMeta> + '_ {
        self.kinds.values().copied()
    }

    /// Check that every relation points at a known kind and existing fields.
    pub fn validate(&self) -> Result<(), StoreError> {
        for k in self.kinds() {
            for r in k.relations {
                let t = self.kind(r.target)?;
                let bad = |f: &str, m: &KindMeta| m.resolve_field(f).is_none() && f != "uuid";
                if bad(r.local, k) || bad(r.remote, t) {
                    return Err(StoreError::InvalidQuery(format!(
                        "relation {}.{} names a field that does not exist",
                        k.name, r.name
                    )));
                }
            }
        }
        Ok(())
    }
}

/// A stored row in its generic form: declared field values in declaration order.
#[derive(Clone)]
pub struct Record {
    pub kind: &'static KindMeta,
    pub uuid: Uuid,
    pub version: u64,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub values: Vec<Value>,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct(self.kind.name);
        d.field("uuid", &self.uuid).field("version", &self.version);
        for (m, v) in self.kind.fields.iter().zip(&self.values) {
            d.field(m.name, v);
        }
        d.finish()
    }
}

impl PartialEq for Record {
    fn eq(&self, o: &Self) -> bool {
        self.kind.name == o.kind.name
            && self.uuid == o.uuid
            && self.version == o.version
            && self.created_ms == o.created_ms
            && self.updated_ms == o.updated_ms
            && self.values == o.values
    }
}

impl Record {
    /// A new record (version 0; the store assigns version and timestamps on insert).
    pub fn new(kind: &'static KindMeta, uuid: Uuid, values: Vec<Value>) -> Self {
        Record {
            kind,
            uuid,
            version: 0,
            created_ms: 0,
            updated_ms: 0,
            values,
        }
    }

    /// A record of `kind` with every field null (fill with [`Record::set`]).
    pub fn empty(kind: &'static KindMeta, uuid: Uuid) -> Self {
        Record::new(kind, uuid, vec![Value::Null; kind.fields.len()])
    }

    pub fn get(&self, field: &str) -> Option<&Value> {
        self.kind.field_index(field).map(|i| &self.values[i])
    }

    /// Declared field `field` as a `V` (what [`super::Db::project`] readers take).
    pub fn decode<V: FieldValue>(&self, field: &str) -> Result<V, StoreError> {
        let v = self.get(field).ok_or_else(|| StoreError::UnknownField {
            kind: self.kind.name.to_string(),
            field: field.to_string(),
        })?;
        decode_field(self.kind.name, field, v)
    }

    /// Value of a field reference as an owned value (built-ins included).
    pub fn value_of(&self, f: FieldRef) -> Value {
        match f {
            FieldRef::Uuid => Value::Uuid(self.uuid),
            FieldRef::Version => Value::Int(self.version as i64),
            FieldRef::Created => Value::Time(self.created_ms),
            FieldRef::Updated => Value::Time(self.updated_ms),
            FieldRef::Declared(i) => self.values[i].clone(),
        }
    }

    /// Compare a field with `other` without cloning declared values.
    pub fn with_value<T>(&self, f: FieldRef, g: impl FnOnce(&Value) -> T) -> T {
        match f {
            FieldRef::Declared(i) => g(&self.values[i]),
            other => g(&self.value_of(other)),
        }
    }

    pub fn set(&mut self, field: &str, v: impl Into<Value>) -> Result<(), StoreError> {
        let i = self
            .kind
            .field_index(field)
            .ok_or_else(|| StoreError::UnknownField {
                kind: self.kind.name.to_string(),
                field: field.to_string(),
            })?;
        self.values[i] = v.into();
        Ok(())
    }

    /// Check every value against its declared type and nullability.
    pub fn check(&self) -> Result<(), StoreError> {
        if self.values.len() != self.kind.fields.len() {
            return Err(StoreError::InvalidWrite(format!(
                "{} record has {} values for {} fields",
                self.kind.name,
                self.values.len(),
                self.kind.fields.len()
            )));
        }
        for (m, v) in self.kind.fields.iter().zip(&self.values) {
            check_value(self.kind, m, v)?;
        }
        Ok(())
    }

    /// The record as the API shows it (secret fields left out), to serialize.
    pub fn api_json(&self) -> RecordJson<'_> {
        RecordJson {
            record: self,
            secrets: false,
        }
    }
}

/// A record as a JSON object, written as it is serialized: `uuid`, the fields, `version`,
/// `created_ms` and `updated_ms`, keys sorted as serde_json's own maps sort them. The API's
/// answers and job results were built as `serde_json::Value` trees first (a string and a map
/// node per field), then written.
pub struct RecordJson<'a> {
    record: &'a Record,
    secrets: bool,
}

impl serde::Serialize for RecordJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        use std::borrow::Cow;
        let r = self.record;
        let mut entries: Vec<(&str, Cow<'_, Value>)> = Vec::with_capacity(r.values.len() + 4);
        entries.push(("uuid", Cow::Owned(Value::Uuid(r.uuid))));
        for (m, v) in r.kind.fields.iter().zip(&r.values) {
            if self.secrets || !m.secret {
                entries.push((m.name, Cow::Borrowed(v)));
            }
        }
        entries.push(("version", Cow::Owned(Value::Int(r.version as i64))));
        entries.push(("created_ms", Cow::Owned(Value::Int(r.created_ms))));
        entries.push(("updated_ms", Cow::Owned(Value::Int(r.updated_ms))));
        entries.sort_unstable_by_key(|e| e.0);
        let mut map = s.serialize_map(Some(entries.len()))?;
        for (k, v) in &entries {
            map.serialize_entry(k, v.as_ref())?;
        }
        map.end()
    }
}

/// Check one value against its field's metadata.
pub fn check_value(kind: &KindMeta, m: &FieldMeta, v: &Value) -> Result<(), StoreError> {
    if v.is_null() {
        if m.nullable {
            return Ok(());
        }
        return Err(StoreError::InvalidWrite(format!(
            "{}.{} may not be null",
            kind.name, m.name
        )));
    }
    if !v.matches_type(m.ty) {
        return Err(StoreError::TypeMismatch {
            kind: kind.name.to_string(),
            field: m.name.to_string(),
            expected: m.ty,
            found: v.type_name(),
        });
    }
    if let Value::Float(f) = v {
        if !f.is_finite() {
            return Err(StoreError::InvalidWrite(format!(
                "{}.{} must be a finite number",
                kind.name, m.name
            )));
        }
    }
    Ok(())
}

/// A Rust struct that is a resource kind. Implemented by [`resource!`](crate::resource).
pub trait Resource: Sized + Clone + Send + Sync + 'static {
    const META: &'static KindMeta;
    fn to_values(&self) -> Vec<Value>;
    fn from_values(values: &[Value]) -> Result<Self, StoreError>;
}

/// A typed row: identity and version plus the resource's fields (reachable through `Deref`).
#[derive(Debug, Clone, PartialEq)]
pub struct Row<T> {
    pub uuid: Uuid,
    pub version: u64,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub data: T,
}

impl<T: Resource> Row<T> {
    pub fn new(uuid: Uuid, data: T) -> Self {
        Row {
            uuid,
            version: 0,
            created_ms: 0,
            updated_ms: 0,
            data,
        }
    }

    pub fn from_record(r: &Record) -> Result<Self, StoreError> {
        if r.kind.name != T::META.name {
            return Err(StoreError::Corrupt(format!(
                "expected a {} record, got {}",
                T::META.name,
                r.kind.name
            )));
        }
        Ok(Row {
            uuid: r.uuid,
            version: r.version,
            created_ms: r.created_ms,
            updated_ms: r.updated_ms,
            data: T::from_values(&r.values)?,
        })
    }

    pub fn to_record(&self) -> Record {
        Record {
            kind: T::META,
            uuid: self.uuid,
            version: self.version,
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
            values: self.data.to_values(),
        }
    }
}

impl<T> Deref for Row<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.data
    }
}

impl<T> DerefMut for Row<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.data
    }
}

impl<T: Resource> Row<T> {
    /// The row as the API shows it (secret fields left out, as [`Record::api_json`]), as text.
    pub fn api_text(&self) -> JsonText {
        JsonText::of(&self.to_record().api_json())
    }
}

/// A row serializes as its full record (secret fields included: rows cross the bus between
/// management nodes; the API shows [`Record::api_json`], which leaves secrets out).
impl<T: Resource> serde::Serialize for Row<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let record = self.to_record();
        RecordJson {
            record: &record,
            secrets: true,
        }
        .serialize(s)
    }
}

impl<'de, T: Resource> serde::Deserialize<'de> for Row<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let j = serde_json::Value::deserialize(d)?;
        let obj = j
            .as_object()
            .ok_or_else(|| D::Error::custom("a row must be a JSON object"))?;
        let get = |k: &str| obj.get(k).unwrap_or(&serde_json::Value::Null);
        let uuid = get("uuid")
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
            .ok_or_else(|| D::Error::custom("row without a valid uuid"))?;
        let mut values = Vec::with_capacity(T::META.fields.len());
        for m in T::META.fields {
            let v = Value::from_json(m.ty, get(m.name)).ok_or_else(|| {
                D::Error::custom(format!("{}.{} has the wrong type", T::META.name, m.name))
            })?;
            values.push(v);
        }
        Ok(Row {
            uuid,
            version: get("version").as_u64().unwrap_or(0),
            created_ms: get("created_ms").as_i64().unwrap_or(0),
            updated_ms: get("updated_ms").as_i64().unwrap_or(0),
            data: T::from_values(&values).map_err(|e| D::Error::custom(e.to_string()))?,
        })
    }
}

#[doc(hidden)]
#[macro_export]
macro_rules! __field_flag {
    (index, index) => {
        true
    };
    (unique, unique) => {
        true
    };
    (column, column) => {
        true
    };
    (secret, secret) => {
        true
    };
    (quiet, quiet) => {
        true
    };
    ($want:ident, $have:ident) => {
        false
    };
}

/// Declare a resource kind: the struct, its metadata and its conversions, in one place.
///
/// ```ignore
/// stratus_store::resource! {
///     /// A zone: the top of the resource tree.
///     pub struct Zone: "zone" {
///         name: String [index, column],
///         description: Option<String>,
///     }
///     relations {
///         clusters: "cluster" (uuid = zone_uuid),
///     }
/// }
/// ```
/// Field options: `index` (kept in an index), `unique` (no two rows share a non-null value,
/// implies an index), `column` (shown by the CLI list view), `secret` (never shown by the API),
/// `quiet` (a change of it alone is no event: progress, heartbeats, delivery bookkeeping).
#[macro_export]
macro_rules! resource {
    (
        $(#[$smeta:meta])*
        $vis:vis struct $name:ident : $kind:literal {
            $( $(#[$fmeta:meta])* $fname:ident : $fty:ty $( [ $($opt:ident),* ] )? ),* $(,)?
        }
        $( relations { $( $rname:ident : $rtarget:literal ( $rlocal:ident = $rremote:ident ) ),* $(,)? } )?
    ) => {
        $(#[$smeta])*
        #[derive(Debug, Clone, PartialEq, ::serde::Serialize, ::serde::Deserialize)]
        $vis struct $name {
            $( $(#[$fmeta])* pub $fname : $fty ),*
        }

        impl $crate::Resource for $name {
            const META: &'static $crate::KindMeta = &$crate::KindMeta {
                name: $kind,
                fields: &[ $(
                    $crate::FieldMeta {
                        name: stringify!($fname),
                        ty: <$fty as $crate::FieldValue>::TYPE,
                        nullable: <$fty as $crate::FieldValue>::NULLABLE,
                        indexed: false $( $( || $crate::__field_flag!(index, $opt) || $crate::__field_flag!(unique, $opt) )* )?,
                        unique: false $( $( || $crate::__field_flag!(unique, $opt) )* )?,
                        column: false $( $( || $crate::__field_flag!(column, $opt) )* )?,
                        secret: false $( $( || $crate::__field_flag!(secret, $opt) )* )?,
                        quiet: false $( $( || $crate::__field_flag!(quiet, $opt) )* )?,
                    }
                ),* ],
                relations: &[ $( $(
                    $crate::Relation {
                        name: stringify!($rname),
                        target: $rtarget,
                        local: stringify!($rlocal),
                        remote: stringify!($rremote),
                    }
                ),* )? ],
            };

            fn to_values(&self) -> ::std::vec::Vec<$crate::Value> {
                ::std::vec![ $( $crate::FieldValue::to_value(&self.$fname) ),* ]
            }

            #[allow(unused_assignments, unused_mut, unused_variables)]
            fn from_values(values: &[$crate::Value]) -> ::std::result::Result<Self, $crate::StoreError> {
                let mut i = 0usize;
                $(
                    let $fname: $fty = $crate::decode_field($kind, stringify!($fname), values.get(i).unwrap_or(&$crate::Value::Null))?;
                    i += 1;
                )*
                Ok($name { $( $fname ),* })
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Json;

    crate::resource! {
        /// A kind used only by these tests.
        pub struct Probe: "probe" {
            name: String [unique, column],
            size: i64 [index],
            owner_uuid: Option<Uuid> [index],
            tags: Json<Vec<String>>,
        }
        relations {
            owner: "probe" (owner_uuid = uuid),
            children: "probe" (uuid = owner_uuid),
        }
    }

    #[test]
    fn macro_builds_metadata_and_round_trips() {
        let m = Probe::META;
        assert_eq!(m.name, "probe");
        assert_eq!(m.fields.len(), 4);
        assert!(m.fields[0].unique && m.fields[0].indexed && m.fields[0].column);
        assert!(m.fields[1].indexed && !m.fields[1].unique);
        assert!(m.fields[2].nullable && m.fields[2].ty == FieldType::Uuid);
        assert_eq!(m.fields[3].ty, FieldType::Json);
        assert_eq!(m.relation("children").unwrap().remote, "owner_uuid");
        assert_eq!(m.columns(), vec!["uuid", "name"]);
        let p = Probe {
            name: "a".into(),
            size: 3,
            owner_uuid: None,
            tags: Json(vec!["x".into()]),
        };
        let row = Row::new(Uuid::from_u128(1), p.clone());
        let rec = row.to_record();
        rec.check().unwrap();
        assert_eq!(Row::<Probe>::from_record(&rec).unwrap().data, p);
        let json = serde_json::to_string(&row).unwrap();
        let back: Row<Probe> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, row);
        assert!(Schema::new().with(Probe::META).validate().is_ok());
    }

    crate::resource! {
        /// A kind with a secret and a float, for the API form.
        pub struct Shown: "shown" {
            zeta: String,
            token: String [secret],
            ratio: f64,
            extra: Json<serde_json::Value>,
            alpha: Option<Uuid>,
        }
    }

    #[test]
    fn the_api_form_sorts_keys_leaves_secrets_out_and_writes_json_as_it_is() {
        let row = Row {
            uuid: Uuid::from_u128(9),
            version: 3,
            created_ms: 10,
            updated_ms: 20,
            data: Shown {
                zeta: "z \"q\"".into(),
                token: "hidden".into(),
                ratio: f64::NAN,
                extra: Json(serde_json::json!(null)),
                alpha: None,
            },
        };
        let plain = serde_json::to_string(&row.to_record().api_json()).unwrap();
        assert_eq!(
            plain,
            r#"{"alpha":null,"created_ms":10,"extra":null,"ratio":null,"updated_ms":20,"uuid":"00000000-0000-0000-0000-000000000009","version":3,"zeta":"z \"q\""}"#
        );
        assert_eq!(row.api_text().as_str(), plain);
        // A JSON field goes out as it is stored (here with its own spacing and key order).
        let mut rec = row.to_record();
        let stored = JsonText::parse(r#"{"b": [1, 2], "a":null}"#.into()).unwrap();
        rec.set("extra", Value::Json(stored)).unwrap();
        let text = serde_json::to_string(&rec.api_json()).unwrap();
        assert_eq!(
            text,
            plain.replace(r#""extra":null"#, r#""extra":{"b": [1, 2], "a":null}"#)
        );
        // Rows crossing the bus keep their secrets.
        let full = serde_json::to_value(&row).unwrap();
        assert_eq!(full["token"], "hidden");
        assert_eq!(full["ratio"], serde_json::Value::Null);
    }

    #[test]
    fn decode_reads_one_field_or_says_which_is_wrong() {
        let row = Row::new(
            Uuid::from_u128(4),
            Probe {
                name: "p".into(),
                size: 7,
                owner_uuid: Some(Uuid::from_u128(5)),
                tags: Json(Vec::new()),
            },
        );
        let rec = row.to_record();
        assert_eq!(rec.decode::<i64>("size").unwrap(), 7);
        assert_eq!(
            rec.decode::<Option<Uuid>>("owner_uuid").unwrap(),
            Some(Uuid::from_u128(5))
        );
        assert!(matches!(
            rec.decode::<i64>("nope"),
            Err(StoreError::UnknownField { .. })
        ));
        let e = rec.decode::<i64>("name").unwrap_err();
        assert!(e.to_string().contains("probe.name"), "{e}");
    }

    #[test]
    fn check_refuses_wrong_types_and_nulls() {
        let mut rec = Record::empty(Probe::META, Uuid::from_u128(2));
        assert!(rec.check().is_err(), "name may not be null");
        rec.set("name", "n").unwrap();
        rec.set("size", Value::Text("big".into())).unwrap();
        rec.set("tags", Value::json(&serde_json::json!([])))
            .unwrap();
        assert!(matches!(rec.check(), Err(StoreError::TypeMismatch { .. })));
        assert!(rec.set("nope", 1i64).is_err());
    }
}
