//! Who the management nodes are: each writes a heartbeat row (`mgmt_node`: its boot, the URL
//! peers reach it at, the time) every `management.heartbeat.interval`; a node whose heartbeat
//! is older than `management.heartbeat.timeout` is dead. Every node derives the same live set
//! from the same rows, and so the same ring.
//!
//! A node acts as an owner only while it holds its lease: its last heartbeat written less than
//! [`lease_ms`] ago, half the timeout. The other half is the margin for the clocks of two nodes
//! to disagree (NTP keeps them within milliseconds): a node that cannot write its heartbeat has
//! stopped acting as an owner before any peer can find it dead.

use crate::config::ConfigDef;
use crate::error::Error;
use std::sync::atomic::{AtomicI64, Ordering};
use stratus_store::{Batch, Db, Query, Row};
use uuid::Uuid;

stratus_store::resource! {
    /// A management node, as its heartbeats say.
    pub struct MgmtNode: "mgmt_node" {
        /// Its current run (a restart draws a new one).
        boot: Uuid,
        /// Where peers reach it (`http://IP:PORT`).
        url: String [column],
        /// When it last wrote this row, by its own clock (ms since the Unix epoch).
        heartbeat_ms: i64 [column, quiet],
        started_ms: i64,
    }
}

pub static HEARTBEAT_INTERVAL: ConfigDef = ConfigDef::duration(
    "management.heartbeat.interval",
    "How often a management node writes its heartbeat",
    "2s",
    100,
    60_000,
);

pub static HEARTBEAT_TIMEOUT: ConfigDef = ConfigDef::duration(
    "management.heartbeat.timeout",
    "A management node whose heartbeat is older than this is dead, and its peers take over its \
     resources; it stops acting as an owner after half of it without a heartbeat written",
    "10s",
    500,
    600_000,
);

/// The config entries of this module.
pub fn config_defs() -> Vec<&'static ConfigDef> {
    vec![&HEARTBEAT_INTERVAL, &HEARTBEAT_TIMEOUT]
}

/// How long after its last heartbeat written a node may act as an owner.
pub fn lease_ms(timeout_ms: i64) -> i64 {
    timeout_ms / 2
}

/// One member as its row says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub node: Uuid,
    pub boot: Uuid,
    pub url: String,
    pub heartbeat_ms: i64,
}

/// The members alive at `now_ms`: a heartbeat at most `timeout_ms` old (one from the future,
/// a clock ahead of ours, counts as fresh), sorted by node.
pub fn live(members: &[Member], now_ms: i64, timeout_ms: i64) -> Vec<Member> {
    let mut v: Vec<Member> = members
        .iter()
        .filter(|m| now_ms - m.heartbeat_ms <= timeout_ms)
        .cloned()
        .collect();
    v.sort_by_key(|m| m.node);
    v
}

/// This node's heartbeats.
pub struct Membership {
    db: Db,
    node: Uuid,
    boot: Uuid,
    url: String,
    started_ms: i64,
    /// When the last heartbeat was written (0: never).
    last_beat_ms: AtomicI64,
}

impl Membership {
    pub fn new(db: Db, node: Uuid, boot: Uuid, url: impl Into<String>) -> Self {
        Membership {
            db,
            node,
            boot,
            url: url.into(),
            started_ms: stratus_rt::clock::now_ms(),
            last_beat_ms: AtomicI64::new(0),
        }
    }

    /// Write this node's heartbeat (its row, made or replaced) at `now_ms`.
    pub async fn beat(&self, now_ms: i64) -> Result<(), Error> {
        let row = Row::new(
            self.node,
            MgmtNode {
                boot: self.boot,
                url: self.url.clone(),
                heartbeat_ms: now_ms,
                started_ms: self.started_ms,
            },
        );
        self.db.commit(Batch::new().upsert(&row)).await?;
        self.last_beat_ms.fetch_max(now_ms, Ordering::Relaxed);
        Ok(())
    }

    /// Every node's row.
    pub async fn members(&self) -> Result<Vec<Member>, Error> {
        Ok(self
            .db
            .select::<MgmtNode>(&Query::of::<MgmtNode>())
            .await?
            .into_iter()
            .map(|r| Member {
                node: r.uuid,
                boot: r.boot,
                url: r.url.clone(),
                heartbeat_ms: r.heartbeat_ms,
            })
            .collect())
    }

    /// Whether this node still holds its lease at `now_ms`: a heartbeat written within
    /// [`lease_ms`] of `timeout_ms`.
    pub fn holds_lease(&self, now_ms: i64, timeout_ms: i64) -> bool {
        let last = self.last_beat_ms.load(Ordering::Relaxed);
        last > 0 && now_ms - last <= lease_ms(timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use stratus_store::{MemStore, Resource, Schema};

    fn member(n: u128, heartbeat_ms: i64) -> Member {
        Member {
            node: Uuid::from_u128(n),
            boot: Uuid::from_u128(100 + n),
            url: format!("http://10.0.0.{n}:8080"),
            heartbeat_ms,
        }
    }

    #[test]
    fn the_live_set_is_the_fresh_heartbeats_and_the_lease_is_shorter_than_the_timeout() {
        let rows = [member(3, 1_000), member(1, 9_000), member(2, 12_500)];
        // At 11,000 with a 10 s timeout: 1 and 3 are fresh, 2 is ahead of our clock.
        let ids = |v: Vec<Member>| v.into_iter().map(|m| m.node.as_u128()).collect::<Vec<_>>();
        assert_eq!(ids(live(&rows, 11_000, 10_000)), [1, 2, 3]);
        assert_eq!(
            ids(live(&rows, 11_001, 10_000)),
            [1, 2],
            "3 is 10,001 ms old"
        );
        assert_eq!(ids(live(&rows, 30_000, 10_000)), Vec::<u128>::new());
        assert!(lease_ms(10_000) < 10_000);
    }

    #[tokio::test]
    async fn heartbeats_make_the_rows_every_node_reads_and_the_lease_follows_them() {
        let db = Db::new(Arc::new(MemStore::new(Schema::new().with(MgmtNode::META))));
        let a = Membership::new(
            db.clone(),
            Uuid::from_u128(1),
            Uuid::from_u128(11),
            "http://a",
        );
        let b = Membership::new(
            db.clone(),
            Uuid::from_u128(2),
            Uuid::from_u128(12),
            "http://b",
        );
        assert!(!a.holds_lease(1_000, 10_000), "no heartbeat yet");
        a.beat(1_000).await.unwrap();
        b.beat(1_500).await.unwrap();
        a.beat(3_000).await.unwrap();
        let mut seen = b.members().await.unwrap();
        seen.sort_by_key(|m| m.node);
        assert_eq!(
            seen.len(),
            2,
            "one row per node, replaced by each heartbeat"
        );
        assert_eq!(
            (seen[0].heartbeat_ms, seen[0].url.as_str()),
            (3_000, "http://a")
        );
        assert_eq!(seen[1].boot, Uuid::from_u128(12));
        assert!(a.holds_lease(8_000, 10_000));
        assert!(
            !a.holds_lease(8_001, 10_000),
            "5 s without a heartbeat written"
        );
        // b stops beating: dead to a after the timeout, while a's lease is long gone for b.
        assert_eq!(live(&seen, 11_500, 10_000).len(), 2);
        assert_eq!(live(&seen, 11_501, 10_000).len(), 1);
    }
}
