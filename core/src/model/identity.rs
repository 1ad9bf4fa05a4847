//! Who calls the API: accounts (the owners of resources), their users, and the bearer tokens
//! users are given at login.

use stratus_store::Millis;
use uuid::Uuid;

stratus_store::resource! {
    /// An account: resources belong to one; an admin account's users run the cloud.
    pub struct Account: "account" {
        name: String [unique, column],
        admin: bool [column],
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
