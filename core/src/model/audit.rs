//! The audit log: one row per API request that asked for a change.

use stratus_store::Millis;
use uuid::Uuid;

stratus_store::resource! {
    /// An API request that asked for a change, as it was answered.
    pub struct Audit: "audit" {
        at_ms: Millis [index, column],
        account_uuid: Option<Uuid> [index, column],
        user_uuid: Option<Uuid> [index, column],
        method: String [column],
        path: String [column],
        resource_uuid: Option<Uuid> [index, column],
        job_uuid: Option<Uuid> [index],
        status: i64 [column],
        code: Option<String> [column],
        client: Option<String>,
    }
}
