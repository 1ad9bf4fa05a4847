//! Accounts and users, created by an admin (as jobs, like every change). Passwords reach this
//! service already hashed: the API hashes them, so no message carries one.

use super::{check_name, Cloud};
use crate::bus::Message;
use crate::error::Error;
use crate::model::{Account, User};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use stratus_store::Row;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAccount {
    pub name: String,
    /// Whether its users run the cloud.
    #[serde(default)]
    pub admin: bool,
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
        let row = Row::new(
            c.engine.ids.uuid(),
            Account {
                name: m.name,
                admin: m.admin,
            },
        );
        Ok(c.db().insert(row).await?)
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
