//! What a caller may see and touch. An admin account's users reach everything. Any other
//! account reaches its own VMs, volumes, images, L3 networks and webhooks (and their jobs, events
//! and NICs), uses
//! the images and L3 networks of the root account and the offerings, and nothing else: the
//! infrastructure kinds, configuration, accounts and users answer `forbidden`. Another
//! account's resource answers `not_found`, as a missing one does, so its existence does not
//! show. Lists are narrowed by a condition inside the store query, so `count`, `limit` and
//! `offset` count only what the caller may see.

use crate::auth::Caller;
use crate::error::{Error, ErrorCode};
use crate::model::root_account;
use crate::services::Cloud;
use stratus_store::{Cond, Op, Value};
use uuid::Uuid;

/// Kinds an account owns rows of.
const OWNED: &[&str] = &["vm", "volume", "image", "l3_network", "webhook"];
/// Kinds an account reads its own rows of but does not make directly (the API's own records).
const RECORDS: &[&str] = &["job", "event"];
/// Kinds whose root-account rows every account may use.
const SHARED: &[&str] = &["image", "l3_network"];
/// Kinds every account may read.
const CATALOG: &[&str] = &["instance_offering", "disk_offering"];

/// Whether rows of `kind` belong to an account, directly or through their VM.
fn owned_somehow(kind: &str) -> bool {
    OWNED.contains(&kind) || RECORDS.contains(&kind) || kind == "vm_nic"
}

fn forbidden(kind: &str) -> Error {
    Error::new(
        ErrorCode::Forbidden,
        format!("only an admin account's users may use {kind}"),
    )
}

fn in_accounts(path: &str, accounts: &[Uuid]) -> Cond {
    Cond::new(
        path,
        Op::In(accounts.iter().map(|a| Value::from(*a)).collect()),
    )
}

/// The accounts whose `kind` rows `me` may read.
fn readable(me: &Caller, kind: &str) -> Vec<Uuid> {
    if SHARED.contains(&kind) && me.account != root_account() {
        vec![me.account, root_account()]
    } else {
        vec![me.account]
    }
}

/// The condition that narrows a list of `kind` to what `me` may read (none: all of it), or
/// `forbidden`.
pub fn list_condition(me: &Caller, kind: &str) -> Result<Option<Cond>, Error> {
    if me.admin || CATALOG.contains(&kind) {
        return Ok(None);
    }
    match kind {
        k if RECORDS.contains(&k) => Ok(Some(in_accounts("account_uuid", &[me.account]))),
        "vm_nic" => Ok(Some(in_accounts("vm.account_uuid", &[me.account]))),
        k if OWNED.contains(&k) => Ok(Some(in_accounts("account_uuid", &readable(me, k)))),
        k => Err(forbidden(k)),
    }
}

/// Whether `me` may read row `uuid` of `kind` with owner `owner`: `forbidden` for a kind it
/// may not reach, `not_found` for another account's row.
pub fn check_read(me: &Caller, kind: &str, uuid: Uuid, owner: Option<Uuid>) -> Result<(), Error> {
    if me.admin || CATALOG.contains(&kind) {
        return Ok(());
    }
    if !owned_somehow(kind) {
        return Err(forbidden(kind));
    }
    match owner {
        Some(a) if readable(me, kind).contains(&a) => Ok(()),
        _ => Err(Error::not_found(kind, uuid)),
    }
}

/// The owner of row `uuid` of an owned kind (`vm_nic`: its VM's), or `not_found`.
async fn owner(c: &Cloud, kind: &str, uuid: Uuid) -> Result<Option<Uuid>, Error> {
    let (kind, uuid) = if kind == "vm_nic" {
        let nic = c.get::<crate::model::VmNic>(uuid).await?;
        ("vm", nic.vm_uuid)
    } else {
        (kind, uuid)
    };
    let row = c
        .db()
        .store()
        .get(kind, uuid)
        .await?
        .ok_or_else(|| Error::not_found(kind, uuid))?;
    Ok(row.decode::<Option<Uuid>>("account_uuid")?)
}

/// `me` may use row `uuid` of `kind` in a request (read it, name it in a body): else
/// `not_found` (or `forbidden` for a kind it may not reach).
pub async fn check_use(c: &Cloud, me: &Caller, kind: &str, uuid: Uuid) -> Result<(), Error> {
    if me.admin || CATALOG.contains(&kind) {
        return Ok(());
    }
    if !owned_somehow(kind) {
        return Err(forbidden(kind));
    }
    let o = owner(c, kind, uuid).await?;
    check_read(me, kind, uuid, o)
}

/// `me` may change row `uuid` of `kind` (act on it, delete it): only its own account's.
pub async fn check_write(c: &Cloud, me: &Caller, kind: &str, uuid: Uuid) -> Result<(), Error> {
    if me.admin {
        return Ok(());
    }
    if !OWNED.contains(&kind) {
        return Err(forbidden(kind));
    }
    match owner(c, kind, uuid).await? {
        Some(a) if a == me.account => Ok(()),
        _ => Err(Error::not_found(kind, uuid)),
    }
}

/// The owner a new resource gets: the caller's account; an admin may name another.
pub async fn new_owner(c: &Cloud, me: &Caller, asked: Option<Uuid>) -> Result<Uuid, Error> {
    match asked {
        Some(a) if a != me.account => {
            if !me.admin {
                return Err(Error::new(
                    ErrorCode::Forbidden,
                    "only an admin may create resources for another account",
                ));
            }
            c.must_exist::<crate::model::Account>(a).await?;
            Ok(a)
        }
        _ => Ok(me.account),
    }
}

/// Kinds a non-admin may create.
pub fn check_create(me: &Caller, kind: &str) -> Result<(), Error> {
    if me.admin || OWNED.contains(&kind) {
        Ok(())
    } else {
        Err(forbidden(kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(admin: bool) -> Caller {
        Caller {
            user: Uuid::from_u128(1),
            account: Uuid::from_u128(2),
            admin,
            token: Uuid::from_u128(3),
        }
    }

    #[test]
    fn a_plain_account_reads_its_own_rows_and_shared_ones_only() {
        let me = caller(false);
        let other = Some(Uuid::from_u128(9));
        let u = Uuid::from_u128(5);
        assert!(check_read(&me, "vm", u, Some(me.account)).is_ok());
        let e = check_read(&me, "vm", u, other).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound);
        assert_eq!(
            check_read(&me, "vm", u, None).unwrap_err().code,
            ErrorCode::NotFound
        );
        assert!(check_read(&me, "image", u, Some(root_account())).is_ok());
        assert_eq!(
            check_read(&me, "vm", u, Some(root_account()))
                .unwrap_err()
                .code,
            ErrorCode::NotFound
        );
        assert_eq!(
            check_read(&me, "host", u, Some(me.account))
                .unwrap_err()
                .code,
            ErrorCode::Forbidden
        );
        assert!(check_read(&me, "instance_offering", u, None).is_ok());
        assert!(list_condition(&me, "zone").is_err());
        assert!(list_condition(&me, "vm").unwrap().is_some());
        assert!(list_condition(&me, "disk_offering").unwrap().is_none());
        assert!(list_condition(&caller(true), "zone").unwrap().is_none());
        assert!(check_create(&me, "vm").is_ok());
        assert_eq!(
            check_create(&me, "zone").unwrap_err().code,
            ErrorCode::Forbidden
        );
    }
}
