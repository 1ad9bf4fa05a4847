//! Account quotas. What an account's VMs and volumes hold is counted on its row (`*_used`) and
//! changes only in the batch that inserts or deletes a VM or volume row, by increments bounded
//! by the account's limits (`at_most`: a request past a limit fails the batch, and nothing of
//! it is written) and never below zero — so `used` is always the sum over the rows the account
//! owns, as a host's counters are the sum of its reservations.

use crate::error::{Error, ErrorCode};
use crate::model::Account;
use stratus_store::{Db, Update};
use uuid::Uuid;

/// What a VM or a set of volumes holds of an account's quotas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Charge {
    pub vms: i64,
    pub vcpus: i64,
    pub memory_mib: i64,
    pub volumes: i64,
    pub volume_mib: i64,
}

impl Charge {
    pub fn vm(cpu: i64, memory_mib: i64) -> Charge {
        Charge {
            vms: 1,
            vcpus: cpu,
            memory_mib,
            ..Charge::default()
        }
    }

    pub fn volumes(count: i64, mib: i64) -> Charge {
        Charge {
            volumes: count,
            volume_mib: mib,
            ..Charge::default()
        }
    }

    /// (used field, amount) of each quota.
    fn amounts(&self) -> [(&'static str, i64); 5] {
        [
            ("vms_used", self.vms),
            ("vcpus_used", self.vcpus),
            ("memory_mib_used", self.memory_mib),
            ("volumes_used", self.volumes),
            ("volume_mib_used", self.volume_mib),
        ]
    }

    /// (used field, amount, in use, limit, name) of each quota of `a`, in [`Charge::amounts`]'
    /// order.
    #[allow(clippy::type_complexity)]
    fn parts(&self, a: &Account) -> [(&'static str, i64, i64, Option<i64>, &'static str); 5] {
        let of_a = [
            (a.vms_used, a.vm_limit, "VMs"),
            (a.vcpus_used, a.vcpu_limit, "vCPUs"),
            (a.memory_mib_used, a.memory_mib_limit, "MiB of memory"),
            (a.volumes_used, a.volume_limit, "volumes"),
            (a.volume_mib_used, a.volume_mib_limit, "MiB of volumes"),
        ];
        let amounts = self.amounts();
        std::array::from_fn(|i| {
            let ((field, n), (used, limit, what)) = (amounts[i], of_a[i]);
            (field, n, used, limit, what)
        })
    }
}

/// The update that takes `c` from `account`, bounded by its limits; `None` when the resource
/// belongs to no account (the cloud's own). The limits are read here: one changed at the same
/// moment applies from the next request.
pub async fn take(db: &Db, account: Option<Uuid>, c: &Charge) -> Result<Option<Update>, Error> {
    let Some(uuid) = account else {
        return Ok(None);
    };
    let a = db
        .get::<Account>(uuid)
        .await?
        .ok_or_else(|| Error::not_found("account", uuid))?;
    let mut u = Update::of::<Account>(uuid);
    for (field, n, _, limit, _) in c.parts(&a) {
        if n == 0 {
            continue;
        }
        if n < 0 {
            return Err(Error::invariant(format!("a quota take of {n} on {field}")));
        }
        u = u.add(field, n);
        if let Some(l) = limit {
            u = u.at_most(field, l);
        }
    }
    Ok(Some(u))
}

/// The update that gives `c` back to `account` (none when it belongs to no account, or the
/// account is gone). Below zero is a broken invariant: the batch fails.
pub fn give_back(account: Option<Uuid>, c: &Charge) -> Option<Update> {
    let uuid = account?;
    let mut u = Update::of::<Account>(uuid).if_exists();
    for (field, n) in c.amounts() {
        if n != 0 {
            u = u.add(field, -n).at_least(field, 0);
        }
    }
    Some(u)
}

/// After a batch with [`take`] failed a condition: the `quota_exceeded` error naming the quota
/// that has no room, or `None` when every quota had room (another condition failed) or there
/// is no account to charge. A failed read of the account is its own error, never "room".
pub async fn exceeded(db: &Db, account: Option<Uuid>, c: &Charge) -> Result<Option<Error>, Error> {
    let Some(account) = account else {
        return Ok(None);
    };
    let Some(a) = db.get::<Account>(account).await? else {
        return Ok(None);
    };
    Ok(c.parts(&a)
        .into_iter()
        .find_map(|(_, n, used, limit, what)| {
            let l = limit?;
            (n > 0 && used + n > l).then(|| {
                Error::new(
                    ErrorCode::QuotaExceeded,
                    format!(
                        "account {} has {used} of its {l} {what} in use; {n} more do not fit",
                        a.name
                    ),
                )
            })
        }))
}
