//! Who calls the API: accounts (the owners of resources), their users, and the bearer tokens
//! users are given at login.

use stratus_store::Millis;
use uuid::Uuid;

stratus_store::resource! {
    /// An account: resources belong to one; an admin account's users run the cloud. Its quotas
    /// (`*_limit`, none: unlimited) bound what its VMs and volumes hold (`*_used`), taken and
    /// given back in the batch that creates or removes each VM or volume row.
    pub struct Account: "account" {
        name: String [unique, column],
        admin: bool [column],
        vm_limit: Option<i64>,
        vcpu_limit: Option<i64>,
        memory_mib_limit: Option<i64>,
        volume_limit: Option<i64>,
        volume_mib_limit: Option<i64>,
        vms_used: i64 [column],
        vcpus_used: i64,
        memory_mib_used: i64,
        volumes_used: i64,
        volume_mib_used: i64,
    }
    relations {
        users: "user" (uuid = account_uuid),
    }
}

stratus_store::resource! {
    /// A person or a program acting for an account.
    pub struct User: "user" {
        name: String [unique, column],
        account_uuid: Uuid [index, column],
        /// The argon2id hash (PHC string); none for a user that cannot log in with a password.
        password_hash: Option<String> [secret],
    }
    relations {
        account: "account" (account_uuid = uuid),
    }
}

stratus_store::resource! {
    /// A bearer token: the token itself is shown once and only its SHA-256 is kept.
    pub struct ApiToken: "api_token" {
        user_uuid: Uuid [index, column],
        account_uuid: Uuid [index, column],
        token_hash: String [unique, secret],
        expires_ms: Millis [column],
        /// `login`, or what the user called it.
        note: String,
    }
    relations {
        user: "user" (user_uuid = uuid),
    }
}

/// The account `admin` belongs to, made at the first start: what it owns (images, L3
/// networks) every account may use.
pub fn root_account() -> Uuid {
    crate::ids::name_uuid("account", "admin")
}

impl Account {
    /// A new account with no quota limits and nothing in use.
    pub fn new(name: impl Into<String>, admin: bool) -> Account {
        Account {
            name: name.into(),
            admin,
            vm_limit: None,
            vcpu_limit: None,
            memory_mib_limit: None,
            volume_limit: None,
            volume_mib_limit: None,
            vms_used: 0,
            vcpus_used: 0,
            memory_mib_used: 0,
            volumes_used: 0,
            volume_mib_used: 0,
        }
    }
}
