//! Global configuration: typed, validated entries with defaults, persisted in the store,
//! changeable at run time, with update hooks.
//!
//! Entries are declared as `static` [`ConfigDef`]s and read through typed [`ConfigKey`]s:
//!
//! ```ignore
//! pub static PING_INTERVAL: ConfigDef = ConfigDef::duration("host.ping.interval",
//!     "How often each host is pinged", "60s", 1_000, 3_600_000);
//! let every: Duration = config.get(&PING_INTERVAL.key());
//! ```

use crate::error::Error;
use crate::ids::name_uuid;
use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use stratus_store::{Batch, Db, Query, Row};

/// The type and allowed range of an entry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ConfigType {
    Int {
        min: i64,
        max: i64,
    },
    Float {
        min: f64,
        max: f64,
    },
    Bool,
    /// Milliseconds range.
    Duration {
        min_ms: u64,
        max_ms: u64,
    },
    Choice(&'static [&'static str]),
}

/// One declared entry.
#[derive(Debug)]
pub struct ConfigDef {
    /// Dotted name; the part before the first dot is the category (`host.ping.interval`).
    pub name: &'static str,
    pub description: &'static str,
    pub ty: ConfigType,
    pub default: &'static str,
}

impl ConfigDef {
    pub const fn int(
        name: &'static str,
        description: &'static str,
        default: &'static str,
        min: i64,
        max: i64,
    ) -> Self {
        ConfigDef {
            name,
            description,
            ty: ConfigType::Int { min, max },
            default,
        }
    }
    pub const fn float(
        name: &'static str,
        description: &'static str,
        default: &'static str,
        min: f64,
        max: f64,
    ) -> Self {
        ConfigDef {
            name,
            description,
            ty: ConfigType::Float { min, max },
            default,
        }
    }
    pub const fn boolean(
        name: &'static str,
        description: &'static str,
        default: &'static str,
    ) -> Self {
        ConfigDef {
            name,
            description,
            ty: ConfigType::Bool,
            default,
        }
    }
    pub const fn duration(
        name: &'static str,
        description: &'static str,
        default: &'static str,
        min_ms: u64,
        max_ms: u64,
    ) -> Self {
        ConfigDef {
            name,
            description,
            ty: ConfigType::Duration { min_ms, max_ms },
            default,
        }
    }
    pub const fn choice(
        name: &'static str,
        description: &'static str,
        default: &'static str,
        choices: &'static [&'static str],
    ) -> Self {
        ConfigDef {
            name,
            description,
            ty: ConfigType::Choice(choices),
            default,
        }
    }

    pub fn category(&self) -> &'static str {
        self.name.split('.').next().unwrap_or(self.name)
    }

    /// A typed key to read this entry.
    pub const fn key<T: FromConfig>(&'static self) -> ConfigKey<T> {
        ConfigKey {
            def: self,
            _t: PhantomData,
        }
    }

    fn allowed(&self) -> String {
        match self.ty {
            ConfigType::Int { min, max } => format!("an integer from {min} to {max}"),
            ConfigType::Float { min, max } => format!("a number from {min} to {max}"),
            ConfigType::Bool => "true or false".into(),
            ConfigType::Duration { min_ms, max_ms } => format!(
                "a duration from {} to {} (e.g. 500ms, 10s, 5m, 1h)",
                show_duration(Duration::from_millis(min_ms)),
                show_duration(Duration::from_millis(max_ms))
            ),
            ConfigType::Choice(c) => format!("one of {}", c.join(", ")),
        }
    }

    /// Parse and range-check `text`.
    pub fn parse(&self, text: &str) -> Result<ConfigValue, Error> {
        let t = text.trim();
        let bad = || {
            Error::invalid(format!(
                "{} must be {}; got {:?}",
                self.name,
                self.allowed(),
                text
            ))
        };
        let v = match self.ty {
            ConfigType::Int { min, max } => {
                let i: i64 = t.parse().map_err(|_| bad())?;
                if i < min || i > max {
                    return Err(bad());
                }
                ConfigValue::Int(i)
            }
            ConfigType::Float { min, max } => {
                let f: f64 = t.parse().map_err(|_| bad())?;
                if !f.is_finite() || f < min || f > max {
                    return Err(bad());
                }
                ConfigValue::Float(f)
            }
            ConfigType::Bool => match t {
                "true" => ConfigValue::Bool(true),
                "false" => ConfigValue::Bool(false),
                _ => return Err(bad()),
            },
            ConfigType::Duration { min_ms, max_ms } => {
                let d = parse_duration(t).ok_or_else(bad)?;
                let ms = d.as_millis() as u64;
                if ms < min_ms || ms > max_ms {
                    return Err(bad());
                }
                ConfigValue::Duration(d)
            }
            ConfigType::Choice(c) => {
                if !c.contains(&t) {
                    return Err(bad());
                }
                ConfigValue::Text(t.to_string())
            }
        };
        Ok(v)
    }
}

/// Parse `500ms`, `10s`, `5m`, `1h`, or a bare number of seconds.
pub fn parse_duration(t: &str) -> Option<Duration> {
    let t = t.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let ms = match unit.trim() {
        "" | "s" => n.checked_mul(1000)?,
        "ms" => n,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

/// Shortest exact form: `90s`, `500ms`, `5m`, `1h`.
pub fn show_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// A current value.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Duration(Duration),
    Text(String),
}

impl std::fmt::Display for ConfigValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigValue::Int(i) => write!(f, "{i}"),
            ConfigValue::Float(x) => write!(f, "{x}"),
            ConfigValue::Bool(b) => write!(f, "{b}"),
            ConfigValue::Duration(d) => f.write_str(&show_duration(*d)),
            ConfigValue::Text(s) => f.write_str(s),
        }
    }
}

/// Rust types a config entry can be read as.
pub trait FromConfig: Sized {
    fn from_config(v: &ConfigValue) -> Option<Self>;
}
impl FromConfig for i64 {
    fn from_config(v: &ConfigValue) -> Option<Self> {
        match v {
            ConfigValue::Int(i) => Some(*i),
            _ => None,
        }
    }
}
impl FromConfig for f64 {
    fn from_config(v: &ConfigValue) -> Option<Self> {
        match v {
            ConfigValue::Float(f) => Some(*f),
            ConfigValue::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
}
impl FromConfig for bool {
    fn from_config(v: &ConfigValue) -> Option<Self> {
        match v {
            ConfigValue::Bool(b) => Some(*b),
            _ => None,
        }
    }
}
impl FromConfig for Duration {
    fn from_config(v: &ConfigValue) -> Option<Self> {
        match v {
            ConfigValue::Duration(d) => Some(*d),
            _ => None,
        }
    }
}
impl FromConfig for String {
    fn from_config(v: &ConfigValue) -> Option<Self> {
        Some(v.to_string())
    }
}

/// A typed handle to one entry.
pub struct ConfigKey<T> {
    pub def: &'static ConfigDef,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for ConfigKey<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for ConfigKey<T> {}

stratus_store::resource! {
    /// A persisted config value (only entries changed from their default are stored).
    pub struct ConfigEntry: "global_config" {
        name: String [unique, column],
        value: String [column],
    }
}

type Hook = Arc<dyn Fn(&ConfigValue, &ConfigValue) + Send + Sync>;

/// The node's view of global configuration.
pub struct GlobalConfig {
    db: Db,
    defs: BTreeMap<&'static str, &'static ConfigDef>,
    values: RwLock<HashMap<&'static str, ConfigValue>>,
    hooks: RwLock<HashMap<&'static str, Vec<Hook>>>,
}

/// One entry as shown by the API.
#[derive(Debug, Clone, PartialEq, serde::Serialize, schemars::JsonSchema)]
pub struct ConfigView {
    pub name: &'static str,
    pub category: &'static str,
    pub description: &'static str,
    pub value: String,
    pub default: &'static str,
    pub allowed: String,
}

impl GlobalConfig {
    /// Every entry starts at its default. Panics if a default does not parse (a bug in a
    /// static declaration, caught by the first test that builds the config).
    pub fn new(db: Db, defs: &[&'static ConfigDef]) -> Self {
        let mut values = HashMap::new();
        let mut by_name = BTreeMap::new();
        for d in defs {
            let v = d
                .parse(d.default)
                .unwrap_or_else(|e| panic!("bad default for config {}: {e}", d.name));
            values.insert(d.name, v);
            by_name.insert(d.name, *d);
        }
        GlobalConfig {
            db,
            defs: by_name,
            values: RwLock::new(values),
            hooks: RwLock::new(HashMap::new()),
        }
    }

    fn def(&self, name: &str) -> Result<&'static ConfigDef, Error> {
        self.defs.get(name).copied().ok_or_else(|| {
            let prefix = name.split('.').next().unwrap_or(name);
            let near: Vec<_> = self
                .defs
                .keys()
                .filter(|k| k.starts_with(prefix))
                .copied()
                .collect();
            Error::invalid(format!(
                "no config entry {name:?}{}",
                if near.is_empty() {
                    String::new()
                } else {
                    format!("; entries in {prefix}: {}", near.join(", "))
                }
            ))
        })
    }

    /// Load persisted values; an unparsable stored value is reported and the default kept.
    pub async fn load(&self) -> Result<(), Error> {
        for row in self
            .db
            .select::<ConfigEntry>(&Query::of::<ConfigEntry>())
            .await?
        {
            match self
                .def(&row.name)
                .and_then(|d| Ok((d, d.parse(&row.value)?)))
            {
                Ok((d, v)) => {
                    self.values
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(d.name, v);
                }
                Err(e) => {
                    tracing::warn!(entry = %row.name, error = %e, "ignoring stored config value")
                }
            }
        }
        Ok(())
    }

    /// Read an entry.
    pub fn get<T: FromConfig>(&self, key: &ConfigKey<T>) -> T {
        let values = self.values.read().unwrap_or_else(|e| e.into_inner());
        values
            .get(key.def.name)
            .and_then(T::from_config)
            .or_else(|| {
                key.def
                    .parse(key.def.default)
                    .ok()
                    .as_ref()
                    .and_then(T::from_config)
            })
            .unwrap_or_else(|| panic!("config {} read as the wrong type", key.def.name))
    }

    /// Validate, persist, apply and announce a new value.
    pub async fn set(&self, name: &str, text: &str) -> Result<ConfigValue, Error> {
        let def = self.def(name)?;
        let new = def.parse(text)?;
        let row = Row::new(
            name_uuid("global_config", def.name),
            ConfigEntry {
                name: def.name.to_string(),
                value: new.to_string(),
            },
        );
        self.db.commit(Batch::new().upsert(&row)).await?;
        Ok(self.apply(def, new))
    }

    /// Apply a value another node has set (already persisted).
    pub fn apply_remote(&self, name: &str, text: &str) -> Result<(), Error> {
        let def = self.def(name)?;
        let v = def.parse(text)?;
        self.apply(def, v);
        Ok(())
    }

    fn apply(&self, def: &'static ConfigDef, new: ConfigValue) -> ConfigValue {
        let old = self
            .values
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(def.name, new.clone());
        if old.as_ref() != Some(&new) {
            let hooks: Vec<Hook> = self
                .hooks
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(def.name)
                .cloned()
                .unwrap_or_default();
            let old = old.unwrap_or_else(|| new.clone());
            for h in hooks {
                h(&old, &new);
            }
        }
        new
    }

    /// Call `hook(old, new)` whenever entry `name` changes.
    pub fn on_update(
        &self,
        def: &'static ConfigDef,
        hook: impl Fn(&ConfigValue, &ConfigValue) + Send + Sync + 'static,
    ) {
        self.hooks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(def.name)
            .or_default()
            .push(Arc::new(hook));
    }

    pub fn list(&self) -> Vec<ConfigView> {
        let values = self.values.read().unwrap_or_else(|e| e.into_inner());
        self.defs
            .values()
            .map(|d| ConfigView {
                name: d.name,
                category: d.category(),
                description: d.description,
                value: values
                    .get(d.name)
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
                default: d.default,
                allowed: d.allowed(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use std::sync::atomic::{AtomicI64, Ordering};
    use stratus_store::{MemStore, Resource, Schema};

    static INTERVAL: ConfigDef =
        ConfigDef::duration("host.ping.interval", "ping period", "60s", 1_000, 3_600_000);
    static RATIO: ConfigDef =
        ConfigDef::float("allocator.cpu.overcommit", "cpu ratio", "10", 1.0, 100.0);
    static FAILS: ConfigDef = ConfigDef::int(
        "host.ping.failures",
        "failures before disconnect",
        "3",
        1,
        100,
    );
    static MODE: ConfigDef = ConfigDef::choice(
        "vm.orphan.policy",
        "what to do",
        "destroy",
        &["destroy", "report"],
    );
    static FLAG: ConfigDef = ConfigDef::boolean("vm.sync.enabled", "sync", "true");

    fn store() -> Arc<MemStore> {
        Arc::new(MemStore::new(Schema::new().with(ConfigEntry::META)))
    }

    fn config(s: Arc<MemStore>) -> GlobalConfig {
        GlobalConfig::new(Db::new(s), &[&INTERVAL, &RATIO, &FAILS, &MODE, &FLAG])
    }

    #[tokio::test]
    async fn defaults_typed_reads_and_persisted_changes() {
        let s = store();
        let c = config(s.clone());
        assert_eq!(c.get(&INTERVAL.key::<Duration>()), Duration::from_secs(60));
        assert_eq!(c.get(&RATIO.key::<f64>()), 10.0);
        assert_eq!(c.get(&FAILS.key::<i64>()), 3);
        assert!(c.get(&FLAG.key::<bool>()));
        c.set("host.ping.interval", "5m").await.unwrap();
        c.set("allocator.cpu.overcommit", "4.5").await.unwrap();
        // A new node reading the same store sees the changes.
        let c2 = config(s);
        c2.load().await.unwrap();
        assert_eq!(
            c2.get(&INTERVAL.key::<Duration>()),
            Duration::from_secs(300)
        );
        assert_eq!(c2.get(&RATIO.key::<f64>()), 4.5);
        let view = c2.list();
        assert_eq!(view.len(), 5);
        assert!(view
            .iter()
            .any(|v| v.name == "host.ping.interval" && v.value == "5m" && v.category == "host"));
    }

    #[tokio::test]
    async fn bad_values_name_the_entry_and_the_allowed_range() {
        let c = config(store());
        let e = c.set("host.ping.interval", "0s").await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert!(e.message.contains("host.ping.interval"), "{}", e.message);
        assert!(e.message.contains("from 1s to 1h"), "{}", e.message);
        let e = c.set("host.ping.failures", "many").await.unwrap_err();
        assert!(
            e.message.contains("an integer from 1 to 100"),
            "{}",
            e.message
        );
        let e = c.set("vm.orphan.policy", "ignore").await.unwrap_err();
        assert!(
            e.message.contains("one of destroy, report"),
            "{}",
            e.message
        );
        let e = c.set("host.ping.nope", "1").await.unwrap_err();
        assert!(
            e.message.contains("host.ping.interval"),
            "suggests entries: {}",
            e.message
        );
        assert_eq!(c.get(&FAILS.key::<i64>()), 3, "unchanged");
    }

    #[tokio::test]
    async fn update_hooks_see_old_and_new_values_only_on_change() {
        let c = config(store());
        let seen = Arc::new(AtomicI64::new(0));
        let s = seen.clone();
        c.on_update(&FAILS, move |old, new| {
            assert_eq!(old, &ConfigValue::Int(3));
            if let ConfigValue::Int(n) = new {
                s.store(*n, Ordering::SeqCst);
            }
        });
        c.set("host.ping.failures", "7").await.unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 7);
        seen.store(0, Ordering::SeqCst);
        c.apply_remote("host.ping.failures", "7").unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 0, "no change, no call");
    }

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("10"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("10parsecs"), None);
        assert_eq!(show_duration(Duration::from_secs(90)), "90s");
        assert_eq!(show_duration(Duration::from_secs(300)), "5m");
        assert_eq!(show_duration(Duration::from_millis(1500)), "1500ms");
    }
}
