//! Webhooks: where the event log is delivered out of process.

use stratus_store::Millis;
use uuid::Uuid;

stratus_store::resource! {
    /// An HTTP endpoint that gets every event matching `filter` (of its account's resources;
    /// all of them for the root account), one POST per event, signed with `secret`. Delivery
    /// goes from the event log itself: `cursor` is the last event handled, moved only after the
    /// endpoint answered 2xx, so every event arrives at least once, also across restarts.
    pub struct Webhook: "webhook" {
        url: String [column],
        /// Comma-separated globs over the topic; empty: every event.
        filter: String [column],
        /// The HMAC-SHA256 key of the `x-stratus-signature` header.
        secret: String [secret],
        account_uuid: Option<Uuid> [index, column],
        cursor: i64 [column, quiet],
        /// Events delivered so far.
        delivered: i64 [column, quiet],
        /// Failed attempts in a row at the event after `cursor`.
        attempts: i64 [column, quiet],
        next_attempt_ms: Millis [quiet],
        last_status: Option<i64> [quiet],
        last_error: Option<String> [column, quiet],
    }
}
