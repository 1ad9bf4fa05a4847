//! Webhooks: created and deleted as jobs; delivered by the node that owns each webhook on the
//! hash ring, from the event log after the webhook's persisted `cursor` (the outbox), one POST
//! per event signed with HMAC-SHA256, again with exponential backoff until the endpoint
//! answers 2xx. A restart resumes from the cursor, so delivery is at least once.

use super::Cloud;
use crate::bus::Message;
use crate::error::Error;
use crate::events::{event_json, Filter};
use crate::model::{root_account, Account, Webhook};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::sync::{Arc, Weak};
use std::time::Duration;
use stratus_rt::clock::now_ms;
use stratus_rt::http::{parse_url, HttpClient};
use stratus_store::{Batch, Expect, Millis, Query, Row, Update, Value};
use uuid::Uuid;

/// The header carrying `sha256=<hex HMAC-SHA256 of the body keyed by the secret>`.
pub const H_SIGNATURE: &str = "x-stratus-signature";
/// The header carrying the event's topic.
pub const H_EVENT: &str = "x-stratus-event";
/// The header carrying the event's sequence number (a receiver drops repeats by it).
pub const H_SEQ: &str = "x-stratus-seq";

/// Events one delivery round takes per webhook.
const ROUND: u64 = 200;
/// How long an endpoint has to answer one POST.
const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// The wait after the first failure; it doubles after each further one up to [`BACKOFF_CAP`].
const BACKOFF: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(300);

#[derive(Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhook {
    /// `http://IP:PORT/PATH` (plain HTTP to an address: deliveries carry an HMAC, not TLS).
    pub url: String,
    #[serde(default)]
    pub filter: String,
    pub secret: String,
    #[serde(default)]
    pub account_uuid: Option<Uuid>,
}
impl Message for CreateWebhook {
    type Reply = Row<Webhook>;
    const NAME: &'static str = "webhook.create";
}

/// Debug without the secret.
impl std::fmt::Debug for CreateWebhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateWebhook")
            .field("url", &self.url)
            .field("filter", &self.filter)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeleteWebhook {
    pub uuid: Uuid,
}
impl Message for DeleteWebhook {
    type Reply = ();
    const NAME: &'static str = "webhook.delete";
    fn routing_key(&self) -> Option<Uuid> {
        Some(self.uuid)
    }
}

pub fn register(cloud: &Arc<Cloud>) -> Result<(), Error> {
    cloud.handle(|c: Arc<Cloud>, m: CreateWebhook| async move {
        parse_url(&m.url).map_err(|e| {
            Error::invalid(format!(
                "webhook url must be http://IP:PORT/PATH; {:?}: {e}",
                m.url
            ))
        })?;
        Filter::parse(&m.filter)?;
        if m.secret.len() < 16 || m.secret.len() > 256 {
            return Err(Error::invalid(
                "webhook secret must be 16 to 256 characters",
            ));
        }
        // From now on: the events before it was made are not its.
        let cursor = match &c.engine.events {
            Some(log) => log.last_seq().await?,
            None => {
                return Err(Error::invalid(
                    "this node keeps no event log, so it has no webhooks",
                ))
            }
        };
        let row = Row::new(
            c.engine.ids.uuid(),
            Webhook {
                url: m.url,
                filter: m.filter,
                secret: m.secret,
                account_uuid: m.account_uuid,
                cursor,
                delivered: 0,
                attempts: 0,
                next_attempt_ms: Millis(0),
                last_status: None,
                last_error: None,
            },
        );
        Ok(c.db().insert(row).await?)
    })?;
    cloud.handle(|c: Arc<Cloud>, m: DeleteWebhook| async move {
        c.must_exist::<Webhook>(m.uuid).await?;
        c.db()
            .commit(Batch::new().delete::<Webhook>(m.uuid, Expect::Maybe))
            .await?;
        Ok(())
    })?;
    Ok(())
}

/// `sha256=<hex>` of `body` keyed by `secret`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    format!("sha256={}", crate::auth::hex(&mac.finalize().into_bytes()))
}

/// Deliver the webhooks this node owns until the node is gone: a round when events commit
/// here, and at least every second (for events of other nodes and for retries).
pub async fn deliver_forever(cloud: Weak<Cloud>) {
    let Some(mut wake) = cloud
        .upgrade()
        .and_then(|c| c.engine.events.as_ref().map(|l| l.subscribe()))
    else {
        return;
    };
    let http = HttpClient::new(2);
    loop {
        let _ = tokio::time::timeout(Duration::from_secs(1), wake.changed()).await;
        let Some(c) = cloud.upgrade() else { return };
        if let Err(e) = round(&c, &http).await {
            tracing::warn!(error = %e, "webhook delivery round failed");
        }
    }
}

async fn round(c: &Arc<Cloud>, http: &HttpClient) -> Result<(), Error> {
    let now = now_ms();
    let hooks = c
        .db()
        .select::<Webhook>(&Query::of::<Webhook>().limit(10_000))
        .await?;
    let mine: Vec<Row<Webhook>> = hooks
        .into_iter()
        .filter(|h| c.bus().owns(&h.uuid))
        .collect();
    let backlog = match (&c.engine.events, mine.is_empty()) {
        (Some(log), false) => {
            let last = log.last_seq().await?;
            mine.iter().map(|h| (last - h.cursor).max(0)).sum()
        }
        _ => 0,
    };
    c.webhook_backlog
        .store(backlog, std::sync::atomic::Ordering::Relaxed);
    let due = mine.into_iter().filter(|h| h.next_attempt_ms.0 <= now);
    let runs = due.map(|h| deliver(c, http, h));
    for r in futures::future::join_all(runs).await {
        r?;
    }
    Ok(())
}

/// Deliver what `h` has pending, in order, until one POST fails.
async fn deliver(c: &Arc<Cloud>, http: &HttpClient, h: Row<Webhook>) -> Result<(), Error> {
    let Some(log) = &c.engine.events else {
        return Ok(());
    };
    let filter = Filter::parse(&h.filter)?;
    // The root account's webhooks (and an admin account's) get every event.
    let account = match h.account_uuid {
        None => None,
        Some(a) if a == root_account() => None,
        Some(a) => match c.db().get::<Account>(a).await? {
            Some(acc) if acc.admin => None,
            _ => Some(a),
        },
    };
    let events = log.after(h.cursor, ROUND, account).await?;
    let mut cursor = h.cursor;
    // The cursor as last committed.
    let mut recorded = h.cursor;
    let mut failure = None;
    for e in &events {
        if !filter.matches(&e.topic) {
            cursor = e.seq;
            continue;
        }
        let body = serde_json::to_vec(&event_json(e)).expect("JSON of JSON values");
        let sig = signature(&h.secret, &body);
        let seq = e.seq.to_string();
        let headers = [
            (H_SIGNATURE, sig.as_str()),
            (H_EVENT, e.topic.as_str()),
            (H_SEQ, seq.as_str()),
        ];
        match http.post_url(&h.url, &headers, body, POST_TIMEOUT).await {
            Ok(r) if r.is_success() => {
                cursor = e.seq;
                // Each delivery is recorded before the next: a restart repeats at most one.
                let u = Update::of::<Webhook>(h.uuid)
                    .set("cursor", cursor)
                    .set("attempts", 0i64)
                    .set("last_status", Value::Int(r.status.into()))
                    .add("delivered", 1);
                if !record(c, u).await? {
                    return Ok(());
                }
                recorded = cursor;
            }
            Ok(r) => {
                failure = Some((Some(r.status), format!("answered {}", r.status)));
                break;
            }
            Err(err) => {
                failure = Some((None, err.to_string()));
                break;
            }
        }
    }
    let mut u = Update::of::<Webhook>(h.uuid).set("cursor", cursor);
    match failure {
        None if cursor == recorded => return Ok(()),
        None => {}
        Some((status, why)) => {
            let attempts = h.attempts + 1;
            let wait = BACKOFF
                .saturating_mul(1 << (attempts - 1).clamp(0, 20))
                .min(BACKOFF_CAP);
            tracing::debug!(webhook = %h.uuid, attempts, error = %why, "webhook delivery failed");
            u = u
                .set("attempts", attempts)
                .set(
                    "next_attempt_ms",
                    Value::Time(now_ms() + wait.as_millis() as i64),
                )
                .set(
                    "last_status",
                    status.map_or(Value::Null, |s| Value::Int(s.into())),
                )
                .set("last_error", why);
        }
    }
    record(c, u).await?;
    Ok(())
}

/// Commit a webhook's delivery state; `false` when the webhook was deleted meanwhile.
async fn record(c: &Cloud, u: Update) -> Result<bool, Error> {
    match c.db().commit(Batch::new().update(u)).await {
        Ok(_) => Ok(true),
        Err(stratus_store::StoreError::NotFound { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_in_hex() {
        // RFC 4231, test case 2.
        let s = signature("Jefe", b"what do ya want for nothing?");
        assert_eq!(
            s,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
