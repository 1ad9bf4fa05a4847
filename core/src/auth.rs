//! Authentication: passwords hashed with argon2id, bearer tokens that are random 32 bytes shown
//! once and kept only as their SHA-256, each with an expiry. [`Auth::authenticate`] turns a
//! token into the [`Caller`] every API request acts as.

use crate::config::ConfigDef;
use crate::error::{Error, ErrorCode};
use crate::ids::Ids;
use crate::model::{root_account, Account, ApiToken, User};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use stratus_store::{Batch, Db, Expect, Query, Row};
use uuid::Uuid;

pub static TOKEN_TTL: ConfigDef = ConfigDef::duration(
    "auth.token.ttl",
    "How long a token given at login stays valid",
    "24h",
    60_000,
    365 * 86_400_000,
);

pub fn config_defs() -> Vec<&'static ConfigDef> {
    vec![&TOKEN_TTL]
}

/// The name of the first user and of its account.
pub const ADMIN: &str = "admin";

/// Who a request acts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub user: Uuid,
    pub account: Uuid,
    pub admin: bool,
    /// The token the request carried.
    pub token: Uuid,
}

/// A token just issued: the secret, shown once.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Issued {
    pub token: String,
    pub token_uuid: Uuid,
    pub user_uuid: Uuid,
    pub account_uuid: Uuid,
    pub expires_ms: i64,
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of a token, as kept in the store. A token is 256 random bits, so a fast hash
/// suffices (a password needs a slow one).
pub fn token_hash(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// An argon2id PHC string of `password` (the crate's defaults: 19 MiB, 2 passes).
pub fn hash_password(ids: &Ids, password: &str) -> Result<String, Error> {
    let secret = ids.secret();
    let salt = SaltString::encode_b64(&secret[..16])
        .map_err(|e| Error::internal(format!("cannot make a salt: {e}")))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::internal(format!("cannot hash a password: {e}")))
}

/// The hash of a new password, checked first.
pub fn new_password_hash(ids: &Ids, password: &str) -> Result<String, Error> {
    check_password(password)?;
    hash_password(ids, password)
}

/// Whether `password` matches the PHC string `hash`.
pub fn password_matches(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// A password a person chose: refused when too short or too long.
pub fn check_password(password: &str) -> Result<(), Error> {
    let n = password.chars().count();
    if !(8..=1024).contains(&n) {
        return Err(Error::invalid("a password has 8 to 1024 characters"));
    }
    Ok(())
}

fn refused() -> Error {
    Error::new(ErrorCode::Unauthorized, "wrong user name or password")
}

/// The authentication service of a node.
#[derive(Clone)]
pub struct Auth {
    db: Db,
    ids: Arc<Ids>,
}

impl Auth {
    pub fn new(db: Db, ids: Arc<Ids>) -> Self {
        Auth { db, ids }
    }

    /// Create the `admin` account and user when there is no user named `admin`; the user gets
    /// `password` (none: it can only be given tokens, as the simulation's harness does). Returns
    /// whether it was created. Safe to call at every start and from several nodes at once.
    pub async fn bootstrap_admin(&self, password: Option<&str>) -> Result<bool, Error> {
        if self.user_named(ADMIN).await?.is_some() {
            return Ok(false);
        }
        let hash = password
            .map(|p| new_password_hash(&self.ids, p))
            .transpose()?;
        let account = Row::new(root_account(), Account::new(ADMIN, true));
        let user = Row::new(
            self.ids.uuid(),
            User {
                name: ADMIN.into(),
                account_uuid: account.uuid,
                password_hash: hash,
            },
        );
        match self
            .db
            .commit(Batch::new().insert(&account).insert(&user))
            .await
        {
            Ok(_) => Ok(true),
            // Another node made it first.
            Err(e) if e.class() == stratus_store::ErrorClass::AlreadyExists => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// A new token for the user named `name` (the simulation's harness logs in this way).
    pub async fn issue_for(&self, name: &str, ttl: Duration, note: &str) -> Result<Issued, Error> {
        let u = self
            .user_named(name)
            .await?
            .ok_or_else(|| Error::new(ErrorCode::NotFound, format!("no user named {name:?}")))?;
        self.issue(&u, ttl, note).await
    }

    /// A user of `account` (with no password, it can only be given tokens: the simulation's
    /// harness does so).
    pub async fn create_user(
        &self,
        name: &str,
        account: Uuid,
        password: Option<&str>,
    ) -> Result<Row<User>, Error> {
        crate::services::check_name("user", name)?;
        let hash = password
            .map(|p| new_password_hash(&self.ids, p))
            .transpose()?;
        let user = Row::new(
            self.ids.uuid(),
            User {
                name: name.into(),
                account_uuid: account,
                password_hash: hash,
            },
        );
        Ok(self.db.insert(user).await?)
    }

    /// Whether a user of this name exists.
    pub async fn has_user(&self, name: &str) -> Result<bool, Error> {
        Ok(self.user_named(name).await?.is_some())
    }

    async fn user_named(&self, name: &str) -> Result<Option<Row<User>>, Error> {
        let q = Query::of::<User>().eq("name", name).limit(1);
        Ok(self.db.select::<User>(&q).await?.into_iter().next())
    }

    /// A token for `user` and `password`, valid for `ttl`. A wrong name and a wrong password
    /// are refused alike.
    pub async fn login(&self, user: &str, password: &str, ttl: Duration) -> Result<Issued, Error> {
        let Some(u) = self.user_named(user).await? else {
            // As slow as a wrong password, so a name's existence does not show in the time.
            let _ = hash_password(&self.ids, password);
            return Err(refused());
        };
        match &u.password_hash {
            Some(h) if password_matches(h, password) => {}
            _ => return Err(refused()),
        }
        self.issue(&u, ttl, "login").await
    }

    /// A new token for `user`.
    pub async fn issue(
        &self,
        user: &Row<User>,
        ttl: Duration,
        note: &str,
    ) -> Result<Issued, Error> {
        let token = hex(&self.ids.secret());
        let expires_ms = stratus_rt::clock::now_ms() + ttl.as_millis() as i64;
        let row = Row::new(
            self.ids.uuid(),
            ApiToken {
                user_uuid: user.uuid,
                account_uuid: user.account_uuid,
                token_hash: token_hash(&token),
                expires_ms: stratus_store::Millis(expires_ms),
                note: note.into(),
            },
        );
        let token_uuid = row.uuid;
        self.db.insert(row).await?;
        Ok(Issued {
            token,
            token_uuid,
            user_uuid: user.uuid,
            account_uuid: user.account_uuid,
            expires_ms,
        })
    }

    /// The caller a bearer token stands for; `unauthorized` when it is unknown or expired.
    pub async fn authenticate(&self, token: &str) -> Result<Caller, Error> {
        let bad = || Error::new(ErrorCode::Unauthorized, "the token is unknown or expired");
        if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let q = Query::of::<ApiToken>()
            .eq("token_hash", token_hash(token))
            .limit(1);
        let Some(t) = self.db.select::<ApiToken>(&q).await?.into_iter().next() else {
            return Err(bad());
        };
        if t.expires_ms.0 <= stratus_rt::clock::now_ms() {
            return Err(bad());
        }
        let account = self
            .db
            .get::<Account>(t.account_uuid)
            .await?
            .ok_or_else(bad)?;
        Ok(Caller {
            user: t.user_uuid,
            account: t.account_uuid,
            admin: account.admin,
            token: t.uuid,
        })
    }

    /// End a token (logout).
    pub async fn revoke(&self, token: Uuid) -> Result<(), Error> {
        self.db
            .commit(Batch::new().delete::<ApiToken>(token, Expect::Maybe))
            .await?;
        Ok(())
    }

    /// Delete the tokens that have expired (they open nothing already; every login adds one).
    pub async fn purge_expired(&self) -> Result<usize, Error> {
        let now = stratus_rt::clock::now_ms();
        let q = Query::of::<ApiToken>().lt("expires_ms", stratus_store::Value::Time(now));
        Ok(self.db.delete_matching(&q, 1000).await?)
    }
}
