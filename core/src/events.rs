//! The event log: canonical events (a resource created, updated, changed state or deleted; a
//! job started or finished) written in the same batch as the change they describe, numbered
//! by `seq` without gaps in commit order. Readers — `GET /v1/events` over Server-Sent Events,
//! webhooks — resume after the last `seq` they had and so miss nothing and repeat nothing.
//!
//! [`EventLog`] is a [`CommitHook`] on the engine's [`Db`]: it derives the events of a batch
//! from its writes, and commits batches that carry events one at a time on this node, so a
//! number is never skipped (a batch that fails gives its numbers back) and a reader that sees
//! event `n` has already seen every event before it. Batches without events (the journal's,
//! leases, reservations) do not wait for that turn.
//!
//! Invariants: an event is never written without its change nor a change of an evented kind
//! without its events; `seq` is unique (the event's uuid is derived from it, so two writers
//! that drew the same number cannot both commit).

use crate::config::ConfigDef;
use serde_json::{Map, Value as J};
use std::sync::Arc;
use stratus_rt::clock::now_ms;
use stratus_store::{
    like_escape, like_match, Batch, CommitFn, CommitHook, Cond, Db, Expect, JsonText, Op, Query,
    Record, Resource, Row, StoreError, Value, Write,
};
use tokio::sync::{watch, Mutex};
use uuid::Uuid;

stratus_store::resource! {
    /// One change, as `/v1/events` and webhooks deliver it.
    pub struct Event: "event" {
        /// 1, 2, 3, … in commit order, without gaps.
        seq: i64 [unique, column],
        /// `<kind>.created|updated|state_changed|deleted`, `job.started|finished`.
        topic: String [index, column],
        resource_kind: String [column],
        resource_uuid: Uuid [index, column],
        /// The account owning the resource (a non-admin reads its own account's events).
        account_uuid: Option<Uuid> [index],
        /// Created: the row as the API shows it. Updated, state changed: the fields set.
        data: Option<JsonText>,
    }
}

/// How long events stay readable before they are pruned.
pub static RETENTION: ConfigDef = ConfigDef::duration(
    "event.retention",
    "How long an event stays readable (by /v1/events and webhooks that fell behind) before it is pruned",
    "72h",
    60_000,
    90 * 24 * 3_600_000,
);

/// The kinds whose changes are events. Not: the journal, reservations, used IPs, tokens, audit
/// rows, config entries (their churn is bookkeeping, or their rows are secret).
const EVENTED: &[&str] = &[
    "zone",
    "cluster",
    "host",
    "primary_storage",
    "backup_storage",
    "image",
    "volume",
    "l2_network",
    "l3_network",
    "ip_range",
    "vm_nic",
    "instance_offering",
    "disk_offering",
    "vm",
    "account",
    "user",
    "job",
    "webhook",
];

/// An event before it has its number.
#[derive(Debug, Clone)]
struct Draft {
    topic: String,
    kind: &'static str,
    uuid: Uuid,
    account: Option<Uuid>,
    data: Option<JsonText>,
}

/// The event log of one node. See the module docs.
pub struct EventLog {
    /// Without the hook: the log's own reads and its prune commits.
    db: Db,
    /// The number the next event gets; `None`: read it from the store first. Held across the
    /// commit of each batch with events, its retries included: a batch whose answer was lost
    /// is committed again under the same key, and must carry the same numbers then (the store
    /// answers a key it applied from what it applied).
    next: Mutex<Option<i64>>,
    /// The last number committed through this node.
    latest: watch::Sender<i64>,
}

impl EventLog {
    pub fn new(db: Db) -> Arc<EventLog> {
        Arc::new(EventLog {
            db,
            next: Mutex::new(None),
            latest: watch::Sender::new(0),
        })
    }

    /// Changes each time events commit on this node (readers wake on it; a reader also polls,
    /// for events other nodes commit).
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.latest.subscribe()
    }

    /// The last number committed through this node (0: none yet).
    pub fn latest(&self) -> i64 {
        *self.latest.borrow()
    }

    /// The highest number in the store (0: none yet).
    pub async fn last_seq(&self) -> Result<i64, StoreError> {
        let q = Query::of::<Event>().sort_desc("seq").limit(1);
        Ok(self
            .db
            .project(&q, |r| r.decode::<i64>("seq"))
            .await?
            .first()
            .copied()
            .unwrap_or(0))
    }

    /// Up to `limit` events after `after`, in order, of `account` only when given.
    pub async fn after(
        &self,
        after: i64,
        limit: u64,
        account: Option<Uuid>,
    ) -> Result<Vec<Row<Event>>, StoreError> {
        let mut q = Query::of::<Event>()
            .cond(Cond::new("seq", Op::Gt(Value::Int(after))))
            .sort_asc("seq")
            .limit(limit);
        if let Some(a) = account {
            q = q.eq("account_uuid", a);
        }
        self.db.select(&q).await
    }

    /// What `b` describes, with each owner read for updates and deletes of owned kinds. A write
    /// that may be a no-op (`Expect::Maybe`) describes something only when its row exists.
    async fn describe(&self, b: &Batch) -> Result<Vec<Draft>, StoreError> {
        let mut out = Vec::new();
        for w in &b.writes {
            let (kind, uuid) = match w {
                Write::Insert(r) | Write::Upsert(r) => (r.kind.name, r.uuid),
                Write::Update(u) => (u.kind, u.uuid),
                Write::Delete { kind, uuid, .. } => (*kind, *uuid),
            };
            if !EVENTED.contains(&kind) {
                continue;
            }
            // A job's events are its start and its end; its purge is retention, not a change
            // (and a purge batch of a thousand jobs would be a thousand owner reads).
            if kind == "job" && matches!(w, Write::Delete { .. }) {
                continue;
            }
            let meta = self.db.schema().kind(kind)?;
            let owned = meta.field("account_uuid").is_some();
            let maybe = matches!(
                w,
                Write::Update(u) if u.expect == Expect::Maybe
            ) || matches!(
                w,
                Write::Delete {
                    expect: Expect::Maybe,
                    ..
                }
            );
            let draft = match w {
                Write::Insert(r) | Write::Upsert(r) => Draft {
                    topic: topic(
                        kind,
                        if matches!(w, Write::Insert(_)) {
                            "created"
                        } else {
                            "updated"
                        },
                    ),
                    kind,
                    uuid,
                    account: if owned { owned_by(r)? } else { None },
                    data: Some(JsonText::of(&created(r))),
                },
                Write::Update(u) => {
                    let mut set = Map::new();
                    for (f, v) in &u.set {
                        let told = meta.field(f).is_some_and(|m| !m.secret && !m.quiet);
                        if told {
                            set.insert((*f).to_string(), v.to_json());
                        }
                    }
                    if set.is_empty() {
                        continue;
                    }
                    let Some(account) = self.owner(kind, uuid, owned, maybe).await? else {
                        continue;
                    };
                    let what = match set.get("state") {
                        Some(s) if kind == "job" && s != "Running" => "finished",
                        Some(_) => "state_changed",
                        None => "updated",
                    };
                    Draft {
                        topic: topic(kind, what),
                        kind,
                        uuid,
                        account,
                        data: Some(JsonText::of(&J::Object(set))),
                    }
                }
                Write::Delete { .. } => {
                    let Some(account) = self.owner(kind, uuid, owned, maybe).await? else {
                        continue;
                    };
                    Draft {
                        topic: topic(kind, "deleted"),
                        kind,
                        uuid,
                        account,
                        data: None,
                    }
                }
            };
            out.push(draft);
        }
        Ok(out)
    }

    /// The owner of a row an update or delete touches (`Some(None)`: a kind without owners),
    /// read only when needed; `None` when a write that may do nothing finds no row.
    async fn owner(
        &self,
        kind: &str,
        uuid: Uuid,
        owned: bool,
        maybe: bool,
    ) -> Result<Option<Option<Uuid>>, StoreError> {
        if !owned && !maybe {
            return Ok(Some(None));
        }
        let mut found = None;
        self.db
            .store()
            .get_with(kind, uuid, &mut |r| {
                found = Some(if owned { owned_by(r) } else { Ok(None) })
            })
            .await?;
        found.transpose()
    }

    /// Delete the events older than `retention`, a page at a time, but never the newest: the
    /// numbering goes on from it after a restart (were it gone, numbers would start again at 1
    /// and readers resuming after a higher one would miss what follows). Returns how many.
    pub async fn prune(&self, retention: std::time::Duration) -> Result<usize, StoreError> {
        let cutoff = now_ms() - retention.as_millis() as i64;
        let newest = self.last_seq().await?;
        let q = Query::of::<Event>()
            .lt("created_ms", Value::Time(cutoff))
            .lt("seq", newest)
            .limit(10_000);
        self.db.delete_matching(&q, 1000).await
    }
}

fn topic(kind: &str, what: &str) -> String {
    match (kind, what) {
        ("job", "created") => "job.started".into(),
        _ => format!("{kind}.{what}"),
    }
}

/// A new row as the API shows it, without what the store has not given it yet (version,
/// times: the event's own time is its `created_ms`).
fn created(r: &Record) -> J {
    let mut v = serde_json::to_value(r.api_json()).unwrap_or(J::Null);
    if let Some(o) = v.as_object_mut() {
        for k in ["version", "created_ms", "updated_ms"] {
            o.remove(k);
        }
    }
    v
}

/// The owner of a row of a kind with `account_uuid` (a field that does not decode is a
/// corrupt row, not an unowned one).
fn owned_by(r: &Record) -> Result<Option<Uuid>, StoreError> {
    r.decode::<Option<Uuid>>("account_uuid")
}

/// An event as readers get it (the SSE `data`, a webhook's body).
pub fn event_json(e: &Row<Event>) -> J {
    serde_json::json!({
        "seq": e.seq,
        "topic": e.topic,
        "resource_kind": e.resource_kind,
        "resource_uuid": e.resource_uuid,
        "account_uuid": e.account_uuid,
        "at_ms": e.created_ms,
        "data": e.data,
    })
}

/// The uuid of event `seq`: two writers that drew the same number collide on it.
pub fn event_uuid(seq: i64) -> Uuid {
    Uuid::from_u64_pair(0x5354_5241_5455_5345, seq as u64)
}

#[async_trait::async_trait]
impl CommitHook for EventLog {
    async fn commit(&self, b: Batch, commit: CommitFn<'_>) -> Result<Vec<u64>, StoreError> {
        let drafts = self.describe(&b).await?;
        if drafts.is_empty() {
            return commit(b).await;
        }
        let mut next = self.next.lock().await;
        // Another node drew the same numbers: read the highest again and renumber (bounded:
        // each round some other writer advanced the log).
        for _ in 0..8 {
            let first = match *next {
                Some(n) => n,
                None => self.last_seq().await? + 1,
            };
            let mut with = b.clone();
            for (i, d) in drafts.iter().enumerate() {
                let seq = first + i as i64;
                let e = Event {
                    seq,
                    topic: d.topic.clone(),
                    resource_kind: d.kind.to_string(),
                    resource_uuid: d.uuid,
                    account_uuid: d.account,
                    data: d.data.clone(),
                };
                with = with.insert(&Row::new(event_uuid(seq), e));
            }
            match commit(with).await {
                Ok(v) => {
                    let last = first + drafts.len() as i64 - 1;
                    *next = Some(last + 1);
                    self.latest.send_replace(last);
                    return Ok(v);
                }
                Err(
                    StoreError::AlreadyExists { kind, .. } | StoreError::Duplicate { kind, .. },
                ) if kind == Event::META.name => {
                    *next = None;
                }
                Err(e) => {
                    // Nothing applied, unless the backend failed after it did: read the
                    // highest number again before the next batch.
                    if e.class() == stratus_store::ErrorClass::Backend {
                        *next = None;
                    }
                    return Err(e);
                }
            }
        }
        Err(StoreError::Backend(
            "event numbers kept colliding with another writer's".into(),
        ))
    }
}

/// An event filter: comma-separated globs over the topic (`*` any run, `?` one character);
/// empty matches everything.
#[derive(Debug, Clone, Default)]
pub struct Filter(Vec<String>);

impl Filter {
    pub fn parse(globs: &str) -> Result<Filter, crate::error::Error> {
        let mut pats = Vec::new();
        for g in globs.split(',').map(str::trim).filter(|g| !g.is_empty()) {
            if g.len() > 200 || !g.chars().all(|c| c.is_ascii_graphic()) {
                return Err(crate::error::Error::invalid(format!(
                    "bad event filter {g:?}: a glob of printable ASCII, at most 200 characters"
                )));
            }
            let mut like = String::new();
            for c in g.chars() {
                match c {
                    '*' => like.push('%'),
                    '?' => like.push('_'),
                    c => like.push_str(&like_escape(&c.to_string())),
                }
            }
            pats.push(like);
        }
        Ok(Filter(pats))
    }

    pub fn matches(&self, topic: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|p| like_match(p, topic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Job;
    use crate::model::{EnableState, Zone};
    use stratus_store::{MemStore, Schema, Update};

    fn logged() -> (Db, Arc<EventLog>) {
        let store: Arc<dyn stratus_store::Store> = Arc::new(MemStore::new(
            Schema::new()
                .with(Zone::META)
                .with(Job::META)
                .with(Event::META),
        ));
        let log = EventLog::new(Db::new(store.clone()));
        (Db::new(store).with_hook(log.clone()), log)
    }

    fn zone(name: &str) -> Zone {
        Zone {
            name: name.into(),
            description: None,
            state: EnableState::Enabled,
        }
    }

    async fn topics(log: &EventLog) -> Vec<(i64, String)> {
        let all = log.after(0, 1000, None).await.unwrap();
        all.iter().map(|e| (e.seq, e.topic.clone())).collect()
    }

    #[tokio::test]
    async fn changes_commit_with_their_events_numbered_without_gaps() {
        let (db, log) = logged();
        let z = Row::new(Uuid::from_u128(1), zone("z1"));
        db.insert(z.clone()).await.unwrap();
        // A batch that fails (the uuid is taken) writes no event and gives its number back.
        assert!(db.insert(z.clone()).await.is_err());
        let set = Update::of::<Zone>(z.uuid).set("state", "Disabled");
        db.commit(Batch::new().update(set)).await.unwrap();
        let renamed = Update::of::<Zone>(z.uuid).set("description", "d");
        db.commit(Batch::new().update(renamed)).await.unwrap();
        // A quiet field's change alone, and a delete that finds no row, are no events.
        let job = Row::new(
            Uuid::from_u128(2),
            Job {
                operation: "x".into(),
                resource_uuid: None,
                state: crate::job::JobState::Running,
                progress: 0,
                progress_note: None,
                result: None,
                error_code: None,
                error_message: None,
                node: Uuid::nil(),
                boot: Uuid::nil(),
                finished_ms: None,
                account_uuid: None,
            },
        );
        db.insert(job.clone()).await.unwrap();
        let progress = Update::of::<Job>(job.uuid).set("progress", 50i64);
        db.commit(Batch::new().update(progress)).await.unwrap();
        let done = Update::of::<Job>(job.uuid).set("state", "Succeeded");
        db.commit(Batch::new().update(done)).await.unwrap();
        // A job's purge is no event either.
        db.commit(Batch::new().delete::<Job>(job.uuid, Expect::Exists))
            .await
            .unwrap();
        let gone = Batch::new().delete::<Zone>(Uuid::from_u128(9), Expect::Maybe);
        db.commit(gone).await.unwrap();
        db.commit(Batch::new().delete::<Zone>(z.uuid, Expect::Exists))
            .await
            .unwrap();
        let want = [
            "zone.created",
            "zone.state_changed",
            "zone.updated",
            "job.started",
            "job.finished",
            "zone.deleted",
        ];
        let got = topics(&log).await;
        assert_eq!(got.len(), want.len(), "{got:?}");
        for (i, ((seq, t), w)) in got.iter().zip(want).enumerate() {
            assert_eq!((*seq, t.as_str()), (i as i64 + 1, w));
        }
        assert_eq!(log.latest(), 6);
        assert_eq!(log.last_seq().await.unwrap(), 6);
    }

    #[tokio::test]
    async fn pruning_deletes_only_events_older_than_the_retention() {
        let (db, log) = logged();
        db.insert(Row::new(Uuid::from_u128(1), zone("z1")))
            .await
            .unwrap();
        let day = std::time::Duration::from_secs(86_400);
        assert_eq!(log.prune(day).await.unwrap(), 0);
        assert_eq!(topics(&log).await.len(), 1);
        db.insert(Row::new(Uuid::from_u128(2), zone("z2")))
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        // Everything is old, but the newest event stays.
        assert_eq!(log.prune(std::time::Duration::ZERO).await.unwrap(), 1);
        assert_eq!(topics(&log).await, [(2, "zone.created".to_string())]);
        // A log started again on the store (a restart) numbers on from it.
        let again = EventLog::new(Db::new(db.store().clone()));
        let db = Db::new(db.store().clone()).with_hook(again.clone());
        db.insert(Row::new(Uuid::from_u128(3), zone("z3")))
            .await
            .unwrap();
        assert_eq!(topics(&again).await.last().unwrap().0, 3);
    }

    #[test]
    fn filters_are_globs_over_topics() {
        let f = Filter::parse("vm.*, job.finished").unwrap();
        assert!(f.matches("vm.created"));
        assert!(f.matches("job.finished"));
        assert!(!f.matches("job.started"));
        assert!(!f.matches("volume.created"));
        assert!(Filter::parse("").unwrap().matches("anything"));
        assert!(Filter::parse("v?.created").unwrap().matches("vm.created"));
        // SQL wildcards are literal.
        assert!(!Filter::parse("vm%").unwrap().matches("vm.created"));
        assert!(Filter::parse("a b").is_err());
    }
}
