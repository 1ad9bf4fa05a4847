//! Accounts and users, created by an admin (as jobs, like every change). Passwords reach this
//! service already hashed: the API hashes them, so no message carries one.

use super::{check_name, Cloud};
use crate::bus::Message;
use crate::error::Error;
use crate::model::{Account, User};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use stratus_store::{Batch, Row, Update, Value};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAccount {
    pub name: String,
    /// Whether its users run the cloud.
    #[serde(default)]
    pub admin: bool,
    #[serde(default)]
    pub vm_limit: Option<i64>,
    #[serde(default)]
    pub vcpu_limit: Option<i64>,
    #[serde(default)]
    pub memory_mib_limit: Option<i64>,
    #[serde(default)]
    pub volume_limit: Option<i64>,
    #[serde(default)]
    pub volume_mib_limit: Option<i64>,
}

/// `PUT /v1/accounts/<uuid>`: an account's quota limits, all of them (one left out or null is
/// unlimited). A limit below what is in use stops new use; nothing is taken away.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetQuotas {
    /// From the request's path, not its body.
    #[schemars(skip)]
    pub uuid: Uuid,
    #[serde(default)]
    pub vm_limit: Option<i64>,
    #[serde(default)]
    pub vcpu_limit: Option<i64>,
    #[serde(default)]
    pub memory_mib_limit: Option<i64>,
    #[serde(default)]
    pub volume_limit: Option<i64>,
    #[serde(default)]
    pub volume_mib_limit: Option<i64>,
}
impl Message for SetQuotas {
    type Reply = Row<Account>;
    const NAME: &'static str = "account.set-quotas";
    fn routing_key(&self) -> Option<Uuid> {
        Some(self.uuid)
    }
}

/// An account's quota limit fields as a message gives them (none: unlimited).
type Limits = [(&'static str, Option<i64>); 5];

impl CreateAccount {
    fn limits(&self) -> Limits {
        [
            ("vm_limit", self.vm_limit),
            ("vcpu_limit", self.vcpu_limit),
            ("memory_mib_limit", self.memory_mib_limit),
            ("volume_limit", self.volume_limit),
            ("volume_mib_limit", self.volume_mib_limit),
        ]
    }
}

impl SetQuotas {
    fn limits(&self) -> Limits {
        [
            ("vm_limit", self.vm_limit),
            ("vcpu_limit", self.vcpu_limit),
            ("memory_mib_limit", self.memory_mib_limit),
            ("volume_limit", self.volume_limit),
            ("volume_mib_limit", self.volume_mib_limit),
        ]
    }
}

fn check_limits(limits: &Limits) -> Result<(), Error> {
    match limits.iter().filter_map(|(_, l)| *l).find(|l| *l < 0) {
        Some(l) => Err(Error::invalid(format!(
            "a quota limit is 0 or more (none: unlimited); got {l}"
        ))),
        None => Ok(()),
    }
}

fn limit_value(v: Option<i64>) -> Value {
    v.map_or(Value::Null, Value::from)
}

impl Message for CreateAccount {
    type Reply = Row<Account>;
    const NAME: &'static str = "account.create";
}

#[derive(Clone, Serialize, Deserialize)]
pub struct CreateUser {
    pub name: String,
    pub account_uuid: Uuid,
    /// An argon2id PHC string ([`crate::auth::hash_password`]).
    pub password_hash: String,
}
impl Message for CreateUser {
    type Reply = Row<User>;
    const NAME: &'static str = "user.create";
}

/// Debug without the hash.
impl std::fmt::Debug for CreateUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateUser")
            .field("name", &self.name)
            .field("account_uuid", &self.account_uuid)
            .finish_non_exhaustive()
    }
}

pub fn register(cloud: &Arc<Cloud>) -> Result<(), Error> {
    cloud.handle(|c: Arc<Cloud>, m: CreateAccount| async move {
        check_name("account", &m.name)?;
        let limits = m.limits();
        check_limits(&limits)?;
        let mut rec = Row::new(c.engine.ids.uuid(), Account::new(m.name, m.admin)).to_record();
        for (field, v) in limits {
            rec.set(field, limit_value(v))?;
        }
        let versions = c
            .db()
            .commit(Batch::new().insert_record(rec.clone()))
            .await?;
        rec.version = versions[0];
        Ok(Row::from_record(&rec)?)
    })?;
    cloud.handle(|c: Arc<Cloud>, m: SetQuotas| async move {
        let limits = m.limits();
        check_limits(&limits)?;
        let u = limits
            .into_iter()
            .fold(Update::of::<Account>(m.uuid), |u, (field, v)| {
                u.set(field, limit_value(v))
            });
        c.db().commit(Batch::new().update(u)).await?;
        c.get::<Account>(m.uuid).await
    })?;
    cloud.handle(|c: Arc<Cloud>, m: CreateUser| async move {
        check_name("user", &m.name)?;
        c.must_exist::<Account>(m.account_uuid).await?;
        let row = Row::new(
            c.engine.ids.uuid(),
            User {
                name: m.name,
                account_uuid: m.account_uuid,
                password_hash: Some(m.password_hash),
            },
        );
        Ok(c.db().insert(row).await?)
    })?;
    Ok(())
}
